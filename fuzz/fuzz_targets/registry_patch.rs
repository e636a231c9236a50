//! Fuzz the registry's JSON patch (`PATCH /v2/images/{id}`) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmi_registry::fuzzing::json_patch(data);
});
