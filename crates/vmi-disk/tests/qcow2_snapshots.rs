//! qcow2 internal snapshots cross-checked with qemu-img in both directions: snapshots made by vmi
//! are listed, converted (`convert -l`) and applied by qemu-img; snapshots made by qemu-img are
//! listed, read, applied and deleted by vmi; `qemu-img check` is clean after every operation.

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vmi_disk::formats::qcow2::snapshot;
use vmi_disk::{CheckMode, Format, Image, OpenOptions};
use vmi_testkit::*;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn open_rw(p: &Path) -> Image {
    Image::open(
        p,
        &OpenOptions::new().format(Some(Format::Qcow2)).write(true),
    )
    .unwrap()
}

fn open_ro(p: &Path) -> Image {
    Image::open(p, &OpenOptions::new().format(Some(Format::Qcow2))).unwrap()
}

/// Write the same bytes into the image (through vmi) and into the expected raw file.
fn write_both(img: &Image, raw: &Path, seed: u64, offset: u64, len: usize) {
    let data = pattern(seed, len);
    img.write_at(&data, offset).unwrap();
    let f = FsOpen::new().write(true).open(raw).unwrap();
    f.write_all_at(&data, offset).unwrap();
}

/// A qcow2 image made by qemu-img from a scattered raw file, with compressed and plain clusters.
fn fixture(
    dir: &Path,
    name: &str,
    opts: &str,
    compressed: bool,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let raw = dir.join(format!("{name}.raw"));
    scattered_raw(&raw, 8 * MIB, 24, 7);
    let img = dir.join(format!("{name}.qcow2"));
    let extra: &[&str] = if compressed { &["-c"] } else { &[] };
    qemu_convert(&raw, "raw", &img, "qcow2", opts, extra);
    (raw, img)
}

fn snapshot_names(path: &Path) -> Vec<String> {
    let info = qemu_info(path, "qcow2");
    info["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn qemu_snapshot_to_raw(img: &Path, name: &str, out: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "-l",
        &format!("snapshot.name={name}"),
        s(img),
        s(out),
    ]);
}

fn check_vmi_and_qemu_clean(path: &Path) {
    assert_qemu_check_clean(path, "qcow2");
    let img = open_ro(path);
    let r = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert_eq!(r.leaks, 0, "{:?}", r.messages);
}

fn vmi_snapshots_round_trip_through_qemu(opts: &str, compressed: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, img_path) = fixture(d, "a", opts, compressed);
    let before = d.join("before.raw");
    std::fs::copy(&raw, &before).unwrap();
    {
        let img = open_rw(&img_path);
        let info = snapshot::create(&img, "before").unwrap();
        assert_eq!(info.id, "1");
        // Overwrite some clusters shared with the snapshot, partially and wholly.
        write_both(&img, &raw, 11, 0, 4096);
        write_both(&img, &raw, 12, 3 * MIB + 100, 200_000);
        write_both(&img, &raw, 13, 8 * MIB - 65536, 65536);
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    assert_eq!(snapshot_names(&img_path), vec!["before".to_string()]);
    assert_qemu_identical(&img_path, "qcow2", &raw, "raw");
    // qemu reads the snapshot's contents.
    let snap_raw = d.join("snap.raw");
    qemu_snapshot_to_raw(&img_path, "before", &snap_raw);
    assert_qemu_identical(&snap_raw, "raw", &before, "raw");
    // vmi reads it too.
    let view = snapshot::open_snapshot(&img_path, &OpenOptions::new(), "before").unwrap();
    assert_image_matches_raw(&view, &before);
    drop(view);
    // qemu applies vmi's snapshot.
    let q = d.join("q.qcow2");
    std::fs::copy(&img_path, &q).unwrap();
    qemu_img(&["snapshot", "-a", "before", s(&q)]);
    assert_qemu_check_clean(&q, "qcow2");
    assert_qemu_identical(&q, "qcow2", &before, "raw");
    // vmi applies it.
    {
        let img = open_rw(&img_path);
        snapshot::apply(&img, "before").unwrap();
        assert_image_matches_raw(&img, &before);
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    assert_qemu_identical(&img_path, "qcow2", &before, "raw");
    // Writes after the revert leave the snapshot intact; then delete it.
    {
        let img = open_rw(&img_path);
        write_both(&img, &before, 14, MIB, 70_000);
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    qemu_snapshot_to_raw(&img_path, "before", &snap_raw);
    assert_qemu_identical(&img_path, "qcow2", &before, "raw");
    {
        let img = open_rw(&img_path);
        snapshot::delete(&img, "1").unwrap();
        assert!(snapshot::list(&img).is_empty());
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    assert!(snapshot_names(&img_path).is_empty());
    assert_qemu_identical(&img_path, "qcow2", &before, "raw");
}

#[test]
fn vmi_snapshots_are_listed_converted_and_applied_by_qemu() {
    vmi_snapshots_round_trip_through_qemu("", false);
}

#[test]
fn vmi_snapshots_of_compressed_images_keep_refcounts_exact() {
    vmi_snapshots_round_trip_through_qemu("cluster_size=4096", true);
}

#[test]
fn vmi_snapshots_work_with_compat_0_10_and_extended_l2() {
    vmi_snapshots_round_trip_through_qemu("compat=0.10", false);
    vmi_snapshots_round_trip_through_qemu("extended_l2=on", false);
    vmi_snapshots_round_trip_through_qemu("refcount_bits=2,cluster_size=512", false);
}

#[test]
fn qemu_snapshots_are_read_applied_and_deleted_by_vmi() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, img_path) = fixture(d, "b", "", false);
    qemu_img(&["snapshot", "-c", "first", s(&img_path)]);
    qemu_io(&img_path, "qcow2", "write -P 0x33 1M 300k");
    qemu_img(&["snapshot", "-c", "second", s(&img_path)]);
    qemu_io(&img_path, "qcow2", "write -P 0x44 0 64k");
    let first = d.join("first.raw");
    let second = d.join("second.raw");
    qemu_snapshot_to_raw(&img_path, "first", &first);
    qemu_snapshot_to_raw(&img_path, "second", &second);
    assert_qemu_identical(&first, "raw", &raw, "raw");
    {
        let img = open_ro(&img_path);
        let list = snapshot::list(&img);
        let names: Vec<_> = list
            .iter()
            .map(|s| (s.id.as_str(), s.name.as_str()))
            .collect();
        assert_eq!(names, vec![("1", "first"), ("2", "second")]);
        assert_eq!(list[0].vm_state_size, 0);
    }
    for (name, expect) in [("first", &first), ("2", &second)] {
        let view = snapshot::open_snapshot(&img_path, &OpenOptions::new(), name).unwrap();
        assert_image_matches_raw(&view, expect);
    }
    {
        let img = open_rw(&img_path);
        snapshot::apply(&img, "second").unwrap();
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    assert_qemu_identical(&img_path, "qcow2", &second, "raw");
    {
        let img = open_rw(&img_path);
        snapshot::delete(&img, "first").unwrap();
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    assert_eq!(snapshot_names(&img_path), vec!["second".to_string()]);
    qemu_snapshot_to_raw(&img_path, "second", &first);
    assert_qemu_identical(&first, "raw", &second, "raw");
    // A vmi snapshot next to a qemu one gets the next id; qemu deletes it cleanly.
    {
        let img = open_rw(&img_path);
        assert_eq!(snapshot::create(&img, "third").unwrap().id, "3");
        img.close().unwrap();
    }
    qemu_img(&["snapshot", "-d", "third", s(&img_path)]);
    qemu_img(&["snapshot", "-d", "second", s(&img_path)]);
    assert_qemu_check_clean(&img_path, "qcow2");
    assert_qemu_identical(&img_path, "qcow2", &second, "raw");
}

#[test]
fn applying_a_snapshot_restores_the_disk_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, img_path) = fixture(d, "c", "", false);
    {
        let img = open_rw(&img_path);
        snapshot::create(&img, "small").unwrap();
        img.resize(40 * MIB).unwrap();
        img.write_at(&[1u8; 4096], 39 * MIB).unwrap();
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    assert_eq!(qemu_info(&img_path, "qcow2")["virtual-size"], 40 * MIB);
    {
        let img = open_rw(&img_path);
        snapshot::apply(&img, "small").unwrap();
        assert_eq!(img.virtual_size(), 8 * MIB);
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    assert_qemu_identical(&img_path, "qcow2", &raw, "raw");
}

#[test]
fn many_snapshots_deleted_in_any_order_leave_no_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, img_path) = fixture(d, "m", "cluster_size=16384", false);
    let mut expected = Vec::new();
    {
        let img = open_rw(&img_path);
        for k in 0..5u64 {
            let e = d.join(format!("e{k}.raw"));
            std::fs::copy(&raw, &e).unwrap();
            expected.push(e);
            snapshot::create(&img, &format!("s{k}")).unwrap();
            write_both(&img, &raw, 100 + k, k * MIB + 5000, 100_000);
        }
        img.close().unwrap();
    }
    check_vmi_and_qemu_clean(&img_path);
    for (k, e) in expected.iter().enumerate() {
        let out = d.join("out.raw");
        qemu_snapshot_to_raw(&img_path, &format!("s{k}"), &out);
        assert_qemu_identical(&out, "raw", e, "raw");
    }
    for k in [2u64, 0, 4, 1, 3] {
        let img = open_rw(&img_path);
        snapshot::delete(&img, &format!("s{k}")).unwrap();
        img.close().unwrap();
        check_vmi_and_qemu_clean(&img_path);
        assert_qemu_identical(&img_path, "qcow2", &raw, "raw");
    }
    // Everything the snapshots held is free again: qemu agrees no cluster is shared.
    let (_, check) = qemu_check(&img_path, "qcow2");
    assert_eq!(check["leaks"].as_u64().unwrap_or(0), 0);
}

#[test]
fn snapshot_operations_refuse_what_they_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, img_path) = fixture(d, "r", "", false);
    let img = open_rw(&img_path);
    snapshot::create(&img, "x").unwrap();
    let dup = snapshot::create(&img, "x").unwrap_err();
    assert!(dup.to_string().contains("already exists"), "{dup}");
    let missing = snapshot::apply(&img, "nope").unwrap_err();
    assert!(missing.to_string().contains("no snapshot"), "{missing}");
    img.close().unwrap();
    let ro = open_ro(&img_path);
    assert!(snapshot::create(&ro, "y").is_err());
    let one_bit = d.join("one.qcow2");
    qemu_create(&one_bit, "qcow2", "refcount_bits=1", MIB);
    let img = open_rw(&one_bit);
    let e = snapshot::create(&img, "z").unwrap_err();
    assert!(e.to_string().contains("refcount"), "{e}");
    let raw = d.join("plain.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let r = Image::open(
        &raw,
        &OpenOptions::new().format(Some(Format::Raw)).write(true),
    )
    .unwrap();
    let e = snapshot::create(&r, "z").unwrap_err();
    assert!(e.to_string().contains("qcow2"), "{e}");
}
