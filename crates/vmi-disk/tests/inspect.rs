//! Safety inspection of untrusted images, per format: what a registry runs on every upload.
//! Each unsafe construct is made by qemu-img (or by hand where qemu cannot make it) and must be
//! reported with the right violation; each plain image of every format must be found safe.

use std::path::Path;
use vmi_disk::inspect::{inspect_path, InspectOptions, ViolationKind};
use vmi_disk::Format;
use vmi_testkit::qemu::{qemu_convert, qemu_create};

fn kinds(path: &Path, expected: Option<Format>) -> (Format, Vec<ViolationKind>) {
    let o = InspectOptions {
        expected_format: expected,
        ..Default::default()
    };
    let i = inspect_path(path, &o).unwrap_or_else(|e| panic!("inspect {}: {e}", path.display()));
    (i.format, i.violations.iter().map(|v| v.kind).collect())
}

#[test]
fn plain_images_of_every_format_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    vmi_testkit::scattered_raw(&raw, 8 << 20, 10, 7);
    for (name, fmt, opts, expect) in [
        ("a.qcow2", "qcow2", "", Format::Qcow2),
        ("a.vmdk", "vmdk", "subformat=monolithicSparse", Format::Vmdk),
        ("s.vmdk", "vmdk", "subformat=streamOptimized", Format::Vmdk),
        ("d.vhd", "vpc", "subformat=dynamic", Format::Vpc),
        ("f.vhd", "vpc", "subformat=fixed", Format::Vpc),
        ("a.vhdx", "vhdx", "", Format::Vhdx),
        ("a.vdi", "vdi", "", Format::Vdi),
    ] {
        let p = dir.path().join(name);
        qemu_convert(&raw, "raw", &p, fmt, opts, &[]);
        let (f, v) = kinds(&p, Some(expect));
        assert_eq!(f, expect, "{name}");
        assert!(v.is_empty(), "{name}: {v:?}");
    }
    let (f, v) = kinds(&raw, Some(Format::Raw));
    assert_eq!((f, v.len()), (Format::Raw, 0));
}

#[test]
fn qcow2_with_a_backing_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "qcow2", "", 1 << 20);
    let top = dir.path().join("top.qcow2");
    let o = format!("backing_file={},backing_fmt=qcow2", base.display());
    qemu_create(&top, "qcow2", &o, 1 << 20);
    let (_, v) = kinds(&top, Some(Format::Qcow2));
    assert_eq!(v, vec![ViolationKind::BackingFile]);
}

#[test]
fn qcow2_with_an_external_data_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top.qcow2");
    let o = format!("data_file={}", dir.path().join("data.raw").display());
    qemu_create(&top, "qcow2", &o, 1 << 20);
    let (_, v) = kinds(&top, Some(Format::Qcow2));
    assert_eq!(v, vec![ViolationKind::DataFile]);
}

#[test]
fn qcow2_with_an_unknown_incompatible_feature_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    qemu_create(&p, "qcow2", "", 1 << 20);
    let mut b = std::fs::read(&p).unwrap();
    // Header v3: incompatible_features is the big-endian u64 at byte 72; set bit 40.
    b[72 + 2] |= 1;
    std::fs::write(&p, &b).unwrap();
    let (_, v) = kinds(&p, Some(Format::Qcow2));
    assert_eq!(v, vec![ViolationKind::UnknownFeatures]);
}

#[test]
fn vmdk_descriptors_with_extents_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("flat.vmdk");
    qemu_create(&flat, "vmdk", "subformat=monolithicFlat", 1 << 20);
    let (f, v) = kinds(&flat, Some(Format::Vmdk));
    assert_eq!(f, Format::Vmdk);
    assert_eq!(v, vec![ViolationKind::Extents]);
    // A descriptor naming a host file.
    let evil = dir.path().join("evil.vmdk");
    let text = std::fs::read_to_string(&flat)
        .unwrap()
        .replace("\"flat-flat.vmdk\"", "\"/etc/passwd\"");
    std::fs::write(&evil, text).unwrap();
    let i = inspect_path(&evil, &InspectOptions::default()).unwrap();
    assert!(!i.is_safe());
    assert!(
        i.violations
            .iter()
            .any(|v| v.detail.contains("/etc/passwd")),
        "{:?}",
        i.violations
    );
}

#[test]
fn declared_format_that_differs_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&p, "qcow2", "", 1 << 20);
    let (f, v) = kinds(&p, Some(Format::Raw));
    assert_eq!(f, Format::Qcow2);
    assert_eq!(v, vec![ViolationKind::FormatMismatch]);
}

#[test]
fn a_vdi_header_inside_an_iso_is_a_polyglot() {
    let dir = tempfile::tempdir().unwrap();
    let vdi = dir.path().join("a.vdi");
    qemu_create(&vdi, "vdi", "", 1 << 20);
    let mut b = std::fs::read(&vdi).unwrap();
    b.resize(b.len().max(64 * 1024), 0);
    let sectors = u32::try_from(b.len() / 2048).unwrap();
    // ISO 9660 (ECMA-119 §8.4) primary volume descriptor at sector 16, then a set terminator.
    let pvd = &mut b[32768..34816];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[80..84].copy_from_slice(&sectors.to_le_bytes());
    pvd[84..88].copy_from_slice(&sectors.to_be_bytes());
    pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
    pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
    pvd[881] = 1;
    let term = &mut b[34816..36864];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    let p = dir.path().join("poly.iso");
    std::fs::write(&p, &b).unwrap();
    let i = inspect_path(&p, &InspectOptions::default()).unwrap();
    assert_eq!(i.matches, vec![Format::Vdi, Format::Iso], "{:?}", i.matches);
    assert!(
        i.violations
            .iter()
            .any(|v| v.kind == ViolationKind::MultipleFormats),
        "{:?}",
        i.violations
    );
}
