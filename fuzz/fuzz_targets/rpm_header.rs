//! Fuzz the rpm header blob parser (rpmdb.sqlite rows) used by `vmi guest inspect`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmi_guest::rpmdb::parse_header(data);
});
