//! Fuzz the MBR/GPT parser: arbitrary bytes as a raw disk, read its partition table.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmi_guest::partition::fuzz_read_table(data);
});
