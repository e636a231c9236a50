//! Fuzz the registry's image listing query (filters, sort keys, limit, marker → SQL) on arbitrary
//! query strings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmi_registry::fuzzing::list_query(data);
});
