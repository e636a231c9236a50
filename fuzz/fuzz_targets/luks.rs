//! Fuzz the LUKS header parsers (LUKS1 and LUKS2, with its JSON metadata) without a key: open
//! arbitrary bytes as a LUKS volume, read `info`; reads must fail cleanly ("is encrypted").
#![no_main]

use libfuzzer_sys::fuzz_target;
#[allow(unused_imports)]
use vmi_disk::Format;

fuzz_target!(|data: &[u8]| {
    vmi_disk::fuzzing::exercise(Some(Format::Luks), data);
});
