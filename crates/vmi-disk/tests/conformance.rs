//! The conformance suite, run by every writable format.

use vmi_disk::{Format, Secret};
use vmi_testkit::conformance::{run, run_keyed, Caps};

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

#[test]
fn luks_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run_keyed(
        dir.path(),
        Format::Luks,
        "key-secret=sec0,iter-time=10",
        Caps {
            random_writes: true,
            grow: true,
        },
        Some(Secret::new(b"conformance".to_vec())),
    );
}

#[test]
fn encrypted_qcow2_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run_keyed(
        dir.path(),
        Format::Qcow2,
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        Caps {
            random_writes: true,
            grow: true,
        },
        Some(Secret::new(b"conformance".to_vec())),
    );
}
