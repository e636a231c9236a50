//! Fuzz the FAT layer: boot sector and FAT parsing for sparsify, directory listing and file reads
//! through fatfs with vmi's bounded path resolution.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmi_guest::fat::fuzz(data);
});
