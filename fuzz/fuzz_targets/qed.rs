//! Fuzz the qed parser: open arbitrary bytes, walk the map, read, check.
#![no_main]

use libfuzzer_sys::fuzz_target;
#[allow(unused_imports)]
use vmi_disk::Format;

fuzz_target!(|data: &[u8]| {
    vmi_disk::fuzzing::exercise(Some(Format::Qed), data);
});
