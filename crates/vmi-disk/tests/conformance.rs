//! The conformance suite, run by every writable format.

use vmi_disk::Format;
use vmi_testkit::conformance::{run, Caps};

#[test]
fn raw_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Raw,
        "",
        Caps {
            random_writes: true,
            grow: true,
        },
    );
}

#[test]
fn qed_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Qed,
        "",
        Caps {
            random_writes: true,
            grow: true,
        },
    );
}
