//! qcow (version 1) read support, cross-checked with qemu-img 10, which still creates the format:
//! plain, compressed (`convert -c -O qcow`) and with a backing file; hostile headers are errors.

use std::path::Path;
use vmi_disk::{Confidence, ErrorKind, Format, Gate, Image, OpenOptions};
use vmi_testkit::fixtures::assert_image_matches_raw;
use vmi_testkit::qemu::{qemu_convert, qemu_create, qemu_img, qemu_io};

const MI: u64 = 1 << 20;

fn open(path: &Path) -> vmi_disk::Result<Image> {
    Image::open(path, &OpenOptions::new())
}

#[test]
fn qemu_made_qcow_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    vmi_testkit::scattered_raw(&raw, 9 * MI + 512, 25, 11);
    let plain = dir.path().join("plain.qcow");
    qemu_convert(&raw, "raw", &plain, "qcow", "", &[]);
    let img = open(&plain).unwrap();
    assert_eq!(img.format(), Format::Qcow);
    assert_eq!(img.probe_result().unwrap().confidence, Confidence::Certain);
    assert_eq!(img.virtual_size(), 9 * MI + 512);
    assert_image_matches_raw(&img, &raw);
}

/// qemu-img 10 fails `convert -c -O qcow` without a message; `qemu-io write -c` still writes
/// compressed qcow clusters.
#[test]
fn compressed_clusters_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow");
    qemu_create(&p, "qcow", "", 3 * MI);
    for (k, off) in [0u64, 8192, 65536, 2 * MI + 4096].iter().enumerate() {
        qemu_io(&p, "qcow", &format!("write -c -P {} {off} 4k", 0x41 + k));
    }
    qemu_io(&p, "qcow", "write -P 0x7e 1M 12k");
    let expect = dir.path().join("expect.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        p.to_str().unwrap(),
        expect.to_str().unwrap(),
    ]);
    let img = open(&p).unwrap();
    let st = img.block_status(0, 4096).unwrap();
    assert_eq!(st.kind, vmi_disk::BlockKind::Compressed);
    assert_image_matches_raw(&img, &expect);
}

#[test]
fn a_qcow_overlay_reads_through_its_backing_file_only_when_the_gate_allows() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    vmi_testkit::scattered_raw(&base, 4 * MI, 10, 5);
    let top = dir.path().join("top.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    qemu_io(&top, "qcow", "write -P 0x5a 1M 64k");
    let expect = dir.path().join("expect.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        expect.to_str().unwrap(),
    ]);
    // Denied by default: the backing file is declared, not followed.
    let e = Image::open(&top, &OpenOptions::new().gate(Gate::deny_all())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    let img = Image::open(
        &top,
        &OpenOptions::new().gate(Gate::new().allow_backing(true)),
    )
    .unwrap();
    assert_eq!(img.driver().backing().unwrap().name, "base.raw");
    assert_eq!(img.chain_len(), 2);
    assert_image_matches_raw(&img, &expect);
}

#[test]
fn qcow_images_are_read_only_and_encrypted_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow");
    qemu_create(&p, "qcow", "", MI);
    let e = Image::open(&p, &OpenOptions::new().write(true)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let mut b = std::fs::read(&p).unwrap();
    b[36..40].copy_from_slice(&1u32.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = open(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("encrypted"), "{e}");
}

#[test]
fn every_corrupt_header_field_is_an_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow");
    let raw = dir.path().join("r.raw");
    vmi_testkit::scattered_raw(&raw, 2 * MI, 8, 1);
    qemu_convert(&raw, "raw", &p, "qcow", "", &[]);
    let orig = std::fs::read(&p).unwrap();
    let cases: &[(&str, usize, &[u8])] = &[
        ("cluster bits below 9", 32, &[8]),
        ("cluster bits above 16", 32, &[17]),
        ("L2 bits above 13", 33, &[14]),
        ("L2 bits below 6", 33, &[5]),
        ("unknown encryption", 36, &[0, 0, 0, 9]),
        ("L1 past the end", 40, &[0, 0, 0, 1, 0, 0, 0, 0]),
        ("huge size", 24, &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
        ("size overflowing", 24, &[0xff; 8]),
        ("size 1", 24, &[0, 0, 0, 0, 0, 0, 0, 1]),
        ("backing name past the end", 8, &[0, 0, 0, 1, 0, 0, 0, 0]),
        ("backing name too long", 16, &[0, 0, 0x10, 0]),
    ];
    for (what, at, bytes) in cases {
        let mut b = orig.clone();
        b[*at..*at + bytes.len()].copy_from_slice(bytes);
        if *what == "backing name too long" {
            b[8..16].copy_from_slice(&48u64.to_be_bytes());
        }
        std::fs::write(&p, &b).unwrap();
        let r = open(&p);
        assert!(r.is_err(), "{what}: opened");
        // Still reported as qcow, never as raw.
        let probed = vmi_disk::probe(&vmi_disk::storage::MemStorage::from_bytes(b)).unwrap();
        assert_eq!(probed.format, Format::Qcow, "{what}");
    }
    // An L2 entry pointing past the end of the file is an error when read.
    let mut b = orig.clone();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    b[l2..l2 + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let img = open(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(img.read_at(&mut buf, 0).is_err());
}
