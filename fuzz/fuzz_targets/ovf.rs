//! Fuzz the OVF side: descriptor → profile → write → parse (with the strict checks), the `.mf`
//! manifest parser, the VMX, libvirt and VirtualBox config parsers, and the OVA (USTAR) reader,
//! all on arbitrary bytes. Nothing may panic; everything fails with an error instead.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmi_ovf::fuzzing::exercise(data);
});
