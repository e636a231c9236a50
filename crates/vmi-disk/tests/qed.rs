//! QED read and write, cross-checked with qemu-img in both directions: images qemu-img writes
//! (with and without a backing file) read byte for byte as qemu reads them; images vmi writes pass
//! `qemu-img check` and compare equal to their source; create options, resize, zero clusters, the
//! need-check bit and `check` agree with qemu; hostile headers are errors.

use std::path::Path;
use vmi_disk::{
    CheckMode, CreateOptions, ErrorKind, Format, FormatOptions, Gate, Image, OpenOptions,
};
use vmi_testkit::fixtures::{assert_image_matches_raw, pattern};
use vmi_testkit::qemu::{
    assert_qemu_check_clean, assert_qemu_identical, qemu_check, qemu_convert, qemu_create,
    qemu_img, qemu_info, qemu_io, qemu_map,
};

const MI: u64 = 1 << 20;

fn create(path: &Path, o: &str, size: u64) -> Image {
    let mut fo = FormatOptions::new();
    fo.parse(o).unwrap();
    Image::create(path, Format::Qed, &CreateOptions::new(size).options(fo)).unwrap()
}

fn open_rw(path: &Path) -> Image {
    Image::open(path, &OpenOptions::new().write(true)).unwrap()
}

#[test]
fn qemu_made_qed_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    vmi_testkit::scattered_raw(&raw, 33 * MI + 512, 40, 9);
    for o in [
        "",
        "cluster_size=4k,table_size=2",
        "cluster_size=1M,table_size=16",
    ] {
        let q = dir.path().join("a.qed");
        let _ = std::fs::remove_file(&q);
        qemu_convert(&raw, "raw", &q, "qed", o, &[]);
        let img = Image::open(&q, &OpenOptions::new()).unwrap();
        assert_eq!(img.format(), Format::Qed, "{o}");
        assert_image_matches_raw(&img, &raw);
    }
}

#[test]
fn a_qemu_made_overlay_reads_through_its_backing_file_and_zero_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    vmi_testkit::scattered_raw(&base, 8 * MI, 12, 4);
    let top = dir.path().join("top.qed");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    qemu_io(&top, "qed", "write -P 0x33 100k 200k");
    qemu_io(&top, "qed", "write -z 1M 1M");
    let expect = dir.path().join("expect.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        expect.to_str().unwrap(),
    ]);
    let e = Image::open(&top, &OpenOptions::new().gate(Gate::deny_all())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused);
    let img = Image::open(
        &top,
        &OpenOptions::new().gate(Gate::new().allow_backing(true)),
    )
    .unwrap();
    let b = img.driver().backing().unwrap();
    assert_eq!((b.name.as_str(), b.format), ("base.raw", Some(Format::Raw)));
    assert_image_matches_raw(&img, &expect);
}

#[test]
fn vmi_written_images_pass_qemu_check_and_compare_equal() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 20 * MI;
    std::fs::write(&raw, vec![0u8; size as usize]).unwrap();
    let q = dir.path().join("w.qed");
    let img = create(&q, "cluster_size=64k,table_size=2", size);
    let writes = [
        (0u64, 512usize),
        (65536 - 100, 300),
        (3 * MI + 7, 2 * MI as usize + 13),
        (size - 4096, 4096),
    ];
    let mut expect = vec![0u8; size as usize];
    for (k, (off, n)) in writes.iter().enumerate() {
        let data = pattern(k as u64 + 1, *n);
        img.write_at(&data, *off).unwrap();
        expect[*off as usize..*off as usize + n].copy_from_slice(&data);
    }
    img.write_zeroes(3 * MI + 65536, 65536).unwrap();
    expect[(3 * MI + 65536) as usize..(3 * MI + 131072) as usize].fill(0);
    img.close().unwrap();
    std::fs::write(&raw, &expect).unwrap();
    assert_qemu_check_clean(&q, "qed");
    assert_qemu_identical(&q, "qed", &raw, "raw");
    let info = qemu_info(&q, "qed");
    assert_eq!(info["cluster-size"], 65536);
    // The need-check bit is clear after a clean close.
    let h = std::fs::read(&q).unwrap();
    assert_eq!(h[16] & 2, 0);
    // Reopened for writing, the data is still there and more can be written.
    let img = open_rw(&q);
    img.write_at(&pattern(9, 4096), 10 * MI).unwrap();
    img.close().unwrap();
    expect[(10 * MI) as usize..(10 * MI + 4096) as usize].copy_from_slice(&pattern(9, 4096));
    std::fs::write(&raw, &expect).unwrap();
    assert_qemu_check_clean(&q, "qed");
    assert_qemu_identical(&q, "qed", &raw, "raw");
}

#[test]
fn create_options_match_what_qemu_img_reports() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![7u8; 2 * MI as usize]).unwrap();
    let q = dir.path().join("o.qed");
    create(
        &q,
        "cluster_size=128k,table_size=8,backing_file=base.raw,backing_fmt=raw",
        4 * MI,
    )
    .close()
    .unwrap();
    let mine = qemu_info(&q, "qed");
    let theirs_p = dir.path().join("t.qed");
    qemu_create(
        &theirs_p,
        "qed",
        "cluster_size=128k,table_size=8,backing_file=base.raw,backing_fmt=raw",
        4 * MI,
    );
    let theirs = qemu_info(&theirs_p, "qed");
    for k in [
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
    ] {
        assert_eq!(mine[k], theirs[k], "{k}");
    }
    assert_eq!(
        std::fs::read(&q).unwrap(),
        std::fs::read(&theirs_p).unwrap(),
        "same bytes"
    );
    assert_qemu_check_clean(&q, "qed");
    // Bad options are refused as qemu refuses them, and a table size qemu cannot open.
    for o in [
        "cluster_size=3000",
        "cluster_size=128M",
        "table_size=3",
        "table_size=32",
        "table_size=1",
    ] {
        let mut fo = FormatOptions::new();
        fo.parse(o).unwrap();
        let r = Image::create(
            &dir.path().join("bad.qed"),
            Format::Qed,
            &CreateOptions::new(MI).options(fo),
        );
        assert!(r.is_err(), "{o}");
    }
}

#[test]
fn resize_grows_and_refuses_to_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("r.qed");
    create(&q, "", 4 * MI).close().unwrap();
    let img = open_rw(&q);
    img.resize(16 * MI).unwrap();
    assert!(img.resize(MI).is_err());
    img.close().unwrap();
    assert_eq!(qemu_info(&q, "qed")["virtual-size"], 16 * MI);
    assert_qemu_check_clean(&q, "qed");
}

#[test]
fn zero_clusters_map_as_qemu_maps_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![9u8; 4 * MI as usize]).unwrap();
    let q = dir.path().join("z.qed");
    let img = create(&q, "backing_file=base.raw,backing_fmt=raw", 4 * MI);
    img.write_zeroes(MI, MI).unwrap();
    img.close().unwrap();
    let m = qemu_map(&q, "qed");
    let zero = m
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["start"] == MI)
        .unwrap();
    assert_eq!(
        (zero["zero"].as_bool(), zero["depth"].as_u64()),
        (Some(true), Some(0))
    );
    let img = Image::open(
        &q,
        &OpenOptions::new().gate(Gate::new().allow_backing(true)),
    )
    .unwrap();
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, MI + 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
}

#[test]
fn check_reports_leaks_as_qemu_does_and_a_writable_open_clears_need_check() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("c.qed");
    qemu_create(&q, "qed", "", 8 * MI);
    qemu_io(&q, "qed", "write -P 1 0 128k");
    // A leaked cluster: grow the file by two clusters nothing references.
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + 2 * 65536).unwrap();
    drop(f);
    let (code, theirs) = qemu_check(&q, "qed");
    let img = Image::open(&q, &OpenOptions::new()).unwrap();
    let mine = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert_eq!(u64::from(mine.exit_code()), code as u64);
    assert_eq!(Some(mine.leaks), theirs["leaks"].as_u64());
    assert_eq!(
        mine.allocated_clusters,
        theirs["allocated-clusters"].as_u64()
    );
    drop(img);
    // The need-check bit set (an unclean shutdown): a writable open checks and clears it.
    let mut b = std::fs::read(&q).unwrap();
    b[16] |= 2;
    std::fs::write(&q, &b).unwrap();
    open_rw(&q).close().unwrap();
    assert_eq!(std::fs::read(&q).unwrap()[16] & 2, 0);
}

#[test]
fn every_corrupt_header_field_is_an_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("h.qed");
    qemu_create(&q, "qed", "", 4 * MI);
    qemu_io(&q, "qed", "write -P 1 0 64k");
    let orig = std::fs::read(&q).unwrap();
    let le32 = |v: u32| v.to_le_bytes().to_vec();
    let le64 = |v: u64| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, usize, Vec<u8>)> = vec![
        ("cluster size not a power of two", 4, le32(65535)),
        ("cluster size too small", 4, le32(2048)),
        ("cluster size too large", 4, le32(128 << 20)),
        ("table size not a power of two", 8, le32(3)),
        ("table size too large", 8, le32(32)),
        ("header size zero", 12, le32(0)),
        ("header size huge", 12, le32(u32::MAX)),
        ("unknown feature", 16, le64(8)),
        ("L1 past the end", 40, le64(1 << 40)),
        ("L1 unaligned", 40, le64(65536 + 8)),
        ("L1 inside the header", 40, le64(0)),
        ("image size not sector-aligned", 48, le64(4 * MI + 1)),
        ("image size beyond the tables", 48, le64(u64::MAX - 511)),
        (
            "backing name outside the header",
            56,
            [le32(65530), le32(100)].concat(),
        ),
    ];
    for (what, at, bytes) in cases {
        let mut b = orig.clone();
        b[at..at + bytes.len()].copy_from_slice(&bytes);
        if what.starts_with("backing") {
            b[16] |= 1;
        }
        std::fs::write(&q, &b).unwrap();
        assert!(
            Image::open(&q, &OpenOptions::new()).is_err(),
            "{what}: opened"
        );
        let p = vmi_disk::probe(&vmi_disk::storage::MemStorage::from_bytes(b)).unwrap();
        assert_eq!(p.format, Format::Qed, "{what}: not reported as qed");
    }
    // An L2 entry pointing past the end of the file is an error when read, not a panic.
    let mut b = orig.clone();
    let l1 = u64::from_le_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_le_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    b[l2..l2 + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&q, &b).unwrap();
    let img = Image::open(&q, &OpenOptions::new()).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(img.read_at(&mut buf, 0).is_err());
    let r = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert!(r.corruptions > 0);
}

#[test]
fn rebase_unsafe_rewrites_the_backing_file_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["a.raw", "b.raw"] {
        std::fs::write(dir.path().join(n), vec![1u8; MI as usize]).unwrap();
    }
    let q = dir.path().join("r.qed");
    create(&q, "backing_file=a.raw,backing_fmt=raw", MI)
        .close()
        .unwrap();
    let img = Image::open(
        &q,
        &OpenOptions::new()
            .write(true)
            .backing(vmi_disk::BackingMode::Skip),
    )
    .unwrap();
    let spec = vmi_disk::BackingSpec {
        name: "b.raw".into(),
        format: Some(Format::Raw),
    };
    img.driver().set_backing(Some(&spec), None).unwrap();
    img.close().unwrap();
    let info = qemu_info(&q, "qed");
    assert_eq!(info["backing-filename"], "b.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    let img = Image::open(
        &q,
        &OpenOptions::new()
            .write(true)
            .backing(vmi_disk::BackingMode::Skip),
    )
    .unwrap();
    img.driver().set_backing(None, None).unwrap();
    img.close().unwrap();
    assert!(qemu_info(&q, "qed").get("backing-filename").is_none());
    assert_qemu_check_clean(&q, "qed");
}
