//! Parallels: the conformance suite, qemu-img interoperability in both directions (v1 and v2
//! images, cluster sizes), check and repair against qemu's verdicts, the format extension, and
//! hostile headers with one corrupted field each.

use md5::{Digest, Md5};
use std::fs;
use std::path::Path;
use vmi_disk::formats::parallels::ParallelsDriver;
use vmi_disk::{
    probe, BlockKind, CheckMode, CreateOptions, ErrorKind, Format, FormatOptions, Image,
    OpenOptions,
};
use vmi_testkit::conformance::{run, Caps};
use vmi_testkit::fixtures::{
    assert_image_matches_raw, pattern, read_file, read_image, scattered_raw,
};
use vmi_testkit::qemu::{
    assert_qemu_check_clean, assert_qemu_identical, qemu_check, qemu_convert, qemu_img_status,
    qemu_map,
};

const MIB: u64 = 1 << 20;
/// Header field offsets (qemu `ParallelsHeader`).
const VERSION: usize = 0x10;
const TRACKS: usize = 0x1c;
const BAT_ENTRIES: usize = 0x20;
const NB_SECTORS: usize = 0x24;
const INUSE: usize = 0x2c;
const DATA_OFF: usize = 0x30;
const EXT_OFF: usize = 0x38;
const BAT: usize = 0x40;

fn opts(o: &str, size: u64) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).expect("valid -o");
    CreateOptions::new(size).options(fo)
}

fn open_ro(path: &Path) -> vmi_disk::Result<Image> {
    Image::open(path, &OpenOptions::new().format(Some(Format::Parallels)))
}

fn open_rw(path: &Path) -> vmi_disk::Result<Image> {
    Image::open(
        path,
        &OpenOptions::new()
            .format(Some(Format::Parallels))
            .write(true),
    )
}

fn probed(path: &Path) -> Format {
    let s = vmi_disk::storage::FileStorage::open(path, false).unwrap();
    probe(&s).unwrap().format
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Copy a raw file into a new vmi-written image, skipping zero chunks; chunks straddle clusters.
fn vmi_convert(raw: &Path, dst: &Path, o: &str) {
    let data = read_file(raw);
    let img = Image::create(dst, Format::Parallels, &opts(o, data.len() as u64)).expect("create");
    let chunk = 300 * 1024 + 7;
    for (i, c) in data.chunks(chunk).enumerate() {
        if c.iter().any(|&b| b != 0) {
            img.write_at(c, (i * chunk) as u64).expect("write");
        }
    }
    img.close().expect("close");
}

/// A qemu-written 8 MiB image with 1 MiB clusters and guest clusters 1 and 3 written (host
/// clusters 1 and 2).
fn qemu_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let mut data = vec![0u8; 8 * MIB as usize];
    data[MIB as usize..MIB as usize + 4096].copy_from_slice(&pattern(1, 4096));
    data[3 * MIB as usize..3 * MIB as usize + 4096].copy_from_slice(&pattern(2, 4096));
    fs::write(&raw, &data).unwrap();
    let img = dir.join(name);
    qemu_convert(&raw, "raw", &img, "parallels", "", &[]);
    img
}

/// A v1 ("WithoutFreeSpace") image: 4 KiB clusters, BAT entries in sectors, data offset 0, the
/// clusters stored out of order. Returns the image bytes and the guest content.
fn v1_image() -> (Vec<u8>, Vec<u8>) {
    let (clusters, tracks) = (16u32, 8u32);
    let cs = tracks as usize * 512;
    let data_start = (64 + 4 * clusters as usize).div_ceil(512) * 512;
    let mut img = vec![0u8; data_start];
    img[..16].copy_from_slice(b"WithoutFreeSpace");
    put32(&mut img, VERSION, 2);
    put32(&mut img, TRACKS, tracks);
    put32(&mut img, BAT_ENTRIES, clusters);
    // v1 keeps only the low 32 bits of the size: junk above them must be ignored.
    put64(
        &mut img,
        NB_SECTORS,
        (1 << 40) | u64::from(clusters * tracks),
    );
    let mut guest = vec![0u8; clusters as usize * cs];
    for (n, g) in [5usize, 0, 15, 6].into_iter().enumerate() {
        let d = pattern(30 + n as u64, cs);
        guest[g * cs..(g + 1) * cs].copy_from_slice(&d);
        let sector = (img.len() / 512) as u32;
        put32(&mut img, BAT + 4 * g, sector);
        img.extend_from_slice(&d);
    }
    (img, guest)
}

/// An extension cluster of `cs` bytes with one dirty bitmap (granularity 64 KiB, L1 entries `l1`).
fn extension(cs: usize, size_sectors: u64, l1: &[u64]) -> Vec<u8> {
    let mut c = vec![0u8; cs];
    put64(&mut c, 0, 0xAB23_4CEF_23DC_EA87);
    let data_size = 32 + l1.len() * 8;
    put64(&mut c, 24, 0x2038_5FAE_252C_B34A);
    put32(&mut c, 40, data_size as u32);
    put64(&mut c, 48, size_sectors);
    c[56..72].copy_from_slice(&[0x12; 16]);
    put32(&mut c, 72, 128);
    put32(&mut c, 76, l1.len() as u32);
    for (i, e) in l1.iter().enumerate() {
        put64(&mut c, 80 + i * 8, *e);
    }
    let sum = Md5::digest(&c[24..]);
    c[8..24].copy_from_slice(&sum);
    c
}

/// A qemu-written image with a format extension (one bitmap, L1 = [1]) appended as the last
/// cluster.
fn image_with_extension(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let img = qemu_image(dir, "ext.prl");
    let mut b = read_file(&img);
    let ext_sector = (b.len() / 512) as u64;
    // 8 MiB at 64 KiB granularity: 128 bits, two 64-bit words, one cluster of L1.
    b.extend_from_slice(&extension(MIB as usize, 8 * MIB / 512, &[1]));
    put64(&mut b, EXT_OFF, ext_sector);
    fs::write(&img, &b).unwrap();
    (img, b)
}

#[test]
fn parallels_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Parallels,
        "",
        Caps {
            random_writes: true,
            grow: false,
        },
    );
}

#[test]
fn parallels_with_small_clusters_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Parallels,
        "cluster_size=64k",
        Caps {
            random_writes: true,
            grow: false,
        },
    );
}

#[test]
fn qemu_written_parallels_reads_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 24 * MIB + 512, 40, 21);
    for (name, o) in [("a.prl", ""), ("b.prl", "cluster_size=64k")] {
        let img_path = dir.path().join(name);
        qemu_convert(&raw, "raw", &img_path, "parallels", o, &[]);
        assert_eq!(probed(&img_path), Format::Parallels);
        let img = Image::open(&img_path, &OpenOptions::new()).expect("open qemu's image");
        assert_eq!(img.format(), Format::Parallels);
        assert_image_matches_raw(&img, &raw);
        let report = img.driver().check(CheckMode::ReadOnly).expect("check");
        let (code, q) = qemu_check(&img_path, "parallels");
        assert_eq!(report.exit_code() as i32, code, "{name}: {report:?}");
        assert_eq!(report.image_end_offset, q["image-end-offset"].as_u64());
        assert_eq!(report.allocated_clusters, q["allocated-clusters"].as_u64());
        assert_eq!(report.total_clusters, q["total-clusters"].as_u64());
    }
}

#[test]
fn vmi_written_parallels_is_clean_and_identical_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 24 * MIB + 512, 40, 22);
    for (name, o) in [("a.prl", ""), ("b.prl", "cluster_size=64k")] {
        let img = dir.path().join(name);
        vmi_convert(&raw, &img, o);
        let b = read_file(&img);
        assert_eq!(&b[INUSE..INUSE + 4], &[0; 4], "{name}: in-use mark cleared");
        assert_qemu_check_clean(&img, "parallels");
        assert_qemu_identical(&img, "parallels", &raw, "raw");
    }
}

#[test]
fn create_matches_qemu_img_create_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for (o, size) in [
        ("", 10 * MIB),
        ("cluster_size=64k", 10 * MIB + 512),
        ("", 1),
    ] {
        let q = dir.path().join("q.prl");
        let v = dir.path().join("v.prl");
        let _ = fs::remove_file(&q);
        let _ = fs::remove_file(&v);
        let size_s = size.to_string();
        let mut args = vec!["create", "-q", "-f", "parallels"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.extend([p(&q), size_s.as_str()]);
        let (code, _, err) = qemu_img_status(&args);
        assert_eq!(code, 0, "{err}");
        Image::create(&v, Format::Parallels, &opts(o, size))
            .unwrap()
            .close()
            .unwrap();
        assert!(read_file(&q) == read_file(&v), "{o} {size}: headers differ");
    }
}

#[test]
fn block_status_agrees_with_qemu_map() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 16 * MIB, 12, 23);
    let path = dir.path().join("m.prl");
    qemu_convert(&raw, "raw", &path, "parallels", "cluster_size=64k", &[]);
    let img = open_ro(&path).unwrap();
    let map = qemu_map(&path, "parallels");
    for e in map.as_array().expect("qemu-img map prints a list") {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        for at in [start, start + len - 1] {
            let st = img.block_status(at, 1).unwrap();
            if e["data"] == true {
                let host = e["offset"].as_u64().unwrap() + (at - start);
                assert_eq!(st.kind, BlockKind::Data, "at {at}");
                assert_eq!(st.offset, Some(host), "at {at}");
            } else {
                assert_eq!(st.kind, BlockKind::Unallocated, "at {at}");
            }
        }
    }
}

#[test]
fn v1_image_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, guest) = v1_image();
    let path = dir.path().join("v1.prl");
    fs::write(&path, &bytes).unwrap();
    let out = dir.path().join("v1.raw");
    qemu_convert(&path, "parallels", &out, "raw", "", &[]);
    assert!(read_file(&out) == guest, "qemu reads the fixture as built");
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    assert_eq!(img.format(), Format::Parallels);
    assert_image_matches_raw(&img, &out);
    assert_eq!(
        img.driver().check(CheckMode::ReadOnly).unwrap().exit_code(),
        0
    );
}

#[test]
fn v1_image_takes_writes_qemu_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, mut guest) = v1_image();
    let path = dir.path().join("v1.prl");
    fs::write(&path, &bytes).unwrap();
    let img = open_rw(&path).unwrap();
    let d = pattern(40, 6000);
    img.write_at(&d, 9 * 4096 + 100).unwrap();
    guest[9 * 4096 + 100..9 * 4096 + 6100].copy_from_slice(&d);
    img.close().unwrap();
    assert_qemu_check_clean(&path, "parallels");
    let out = dir.path().join("v1.raw");
    qemu_convert(&path, "parallels", &out, "raw", "", &[]);
    assert!(read_file(&out) == guest);
}

#[test]
fn writable_open_marks_the_image_in_use_until_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "u.prl");
    let img = open_rw(&path).unwrap();
    assert_eq!(&read_file(&path)[INUSE..INUSE + 4], b"Ynot");
    img.close().unwrap();
    assert_eq!(&read_file(&path)[INUSE..INUSE + 4], &[0; 4]);
}

#[test]
fn unclean_image_is_one_corruption_as_for_qemu_and_repair_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "u.prl");
    let mut b = read_file(&path);
    b[INUSE..INUSE + 4].copy_from_slice(b"Ynot");
    fs::write(&path, &b).unwrap();
    let (code, q) = qemu_check(&path, "parallels");
    let r = open_ro(&path)
        .unwrap()
        .driver()
        .check(CheckMode::ReadOnly)
        .unwrap();
    assert_eq!(
        (r.exit_code() as i32, Some(r.corruptions)),
        (code, q["corruptions"].as_u64())
    );
    assert!(r.messages[0].contains("not closed correctly"), "{r:?}");
    let img = open_rw(&path).unwrap();
    let r = img.driver().check(CheckMode::RepairAll).unwrap();
    assert_eq!(
        (r.corruptions_fixed, r.corruptions, r.exit_code()),
        (1, 0, 0)
    );
    img.close().unwrap();
    assert_qemu_check_clean(&path, "parallels");
}

#[test]
fn unclean_image_is_repaired_by_a_writable_open_before_the_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "u.prl");
    let mut b = read_file(&path);
    b[INUSE..INUSE + 4].copy_from_slice(b"Ynot");
    // And a cluster outside the file.
    put32(&mut b, BAT + 4 * 5, 100);
    fs::write(&path, &b).unwrap();
    let img = open_rw(&path).unwrap();
    img.write_at(&[9; 512], 0).unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&path, "parallels");
    let img = open_ro(&path).unwrap();
    let got = read_image(&img);
    assert_eq!(&got[..512], &[9; 512]);
    assert_eq!(
        &got[MIB as usize..MIB as usize + 4096],
        &pattern(1, 4096)[..]
    );
    assert!(got[5 * MIB as usize..6 * MIB as usize]
        .iter()
        .all(|&x| x == 0));
}

#[test]
fn cluster_outside_the_image_is_reported_like_qemu_reads_zero_and_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "o.prl");
    let mut b = read_file(&path);
    put32(&mut b, BAT + 4 * 5, 100);
    fs::write(&path, &b).unwrap();
    // qemu-img 10.0 prints the finding, then aborts on an assertion in its duplicate check
    // (fixed in later qemu): compare the finding only.
    let (_, _, qerr) = qemu_img_status(&["check", "-f", "parallels", p(&path)]);
    assert!(qerr.contains("ERROR cluster 5 is outside image"), "{qerr}");
    let img = open_ro(&path).unwrap();
    let r = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert_eq!((r.exit_code(), r.corruptions), (2, 1), "{r:?}");
    assert!(
        r.messages
            .iter()
            .any(|m| m.contains("cluster 5 is outside image")),
        "{r:?}"
    );
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 5 * MIB).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    drop(img);
    let img = open_rw(&path).unwrap();
    assert_eq!(
        img.driver()
            .check(CheckMode::RepairAll)
            .unwrap()
            .corruptions_fixed,
        1
    );
    img.close().unwrap();
    assert_qemu_check_clean(&path, "parallels");
}

#[test]
fn duplicate_bat_entry_is_a_corruption_and_repair_gives_each_cluster_its_own_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "d.prl");
    let mut b = read_file(&path);
    // Guest cluster 6 names host cluster 1, like guest cluster 1.
    let e1 = u32::from_le_bytes(b[BAT + 4..BAT + 8].try_into().unwrap());
    put32(&mut b, BAT + 4 * 6, e1);
    fs::write(&path, &b).unwrap();
    let img = open_ro(&path).unwrap();
    let r = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert_eq!(r.corruptions, 1, "{r:?}");
    assert!(
        r.messages[0].contains("duplicate offset in BAT entry 6"),
        "{r:?}"
    );
    let before = read_image(&img);
    drop(img);
    let img = open_rw(&path).unwrap();
    let r = img.driver().check(CheckMode::RepairAll).unwrap();
    assert_eq!(r.corruptions_fixed, 1);
    img.write_at(&[7; 100], MIB).unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&path, "parallels");
    let after = read_image(&open_ro(&path).unwrap());
    assert_eq!(
        &after[6 * MIB as usize..7 * MIB as usize],
        &before[MIB as usize..2 * MIB as usize]
    );
    assert_eq!(&after[MIB as usize..MIB as usize + 100], &[7; 100]);
}

#[test]
fn space_leaked_at_the_end_counts_and_repairs_as_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "l.prl");
    let mut b = read_file(&path);
    let clean_len = b.len();
    b.extend_from_slice(&vec![0xaa; (MIB + 4096) as usize]);
    fs::write(&path, &b).unwrap();
    let (code, q) = qemu_check(&path, "parallels");
    let r = open_ro(&path)
        .unwrap()
        .driver()
        .check(CheckMode::ReadOnly)
        .unwrap();
    assert_eq!(
        (r.exit_code() as i32, Some(r.leaks)),
        (code, q["leaks"].as_u64())
    );
    assert_eq!(r.image_end_offset, q["image-end-offset"].as_u64());
    let img = open_rw(&path).unwrap();
    let r = img.driver().check(CheckMode::RepairLeaks).unwrap();
    assert_eq!(r.leaks_fixed, 2);
    img.close().unwrap();
    assert_eq!(read_file(&path).len(), clean_len);
    assert_qemu_check_clean(&path, "parallels");
}

#[test]
fn bad_data_offset_is_a_corruption_as_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "o.prl");
    let mut b = read_file(&path);
    put32(&mut b, DATA_OFF, 1);
    fs::write(&path, &b).unwrap();
    let (code, q) = qemu_check(&path, "parallels");
    let r = open_ro(&path)
        .unwrap()
        .driver()
        .check(CheckMode::ReadOnly)
        .unwrap();
    if vmi_testkit::qemu::qemu_img_version() < (8, 2) {
        // qemu-img before 8.2 did not check the data offset; vmi follows the newer check.
        assert_eq!((r.exit_code(), r.corruptions), (2, 1));
        return;
    }
    assert_eq!(
        (r.exit_code() as i32, Some(r.corruptions)),
        (code, q["corruptions"].as_u64())
    );
    let img = open_rw(&path).unwrap();
    img.driver().check(CheckMode::RepairAll).unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&path, "parallels");
}

#[test]
fn write_zeroes_discards_whole_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "z.prl");
    let img = open_rw(&path).unwrap();
    img.write_zeroes(MIB, MIB).unwrap();
    assert_eq!(
        img.block_status(MIB, MIB).unwrap().kind,
        BlockKind::Unallocated
    );
    // The freed host cluster is reused by the next allocation.
    img.write_at(&[3; 512], 7 * MIB).unwrap();
    assert_eq!(img.block_status(7 * MIB, 1).unwrap().offset, Some(MIB));
    img.close().unwrap();
    assert_qemu_check_clean(&path, "parallels");
}

#[test]
fn resize_is_refused_as_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "r.prl");
    let img = open_rw(&path).unwrap();
    assert_eq!(
        img.resize(16 * MIB).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    img.close().unwrap();
}

#[test]
fn format_extension_with_a_dirty_bitmap_is_read_where_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = image_with_extension(dir.path());
    let (code, _, err) = qemu_img_status(&["info", "-f", "parallels", p(&path)]);
    assert_eq!(code, 0, "{err}");
    let img = open_ro(&path).unwrap();
    let d = img
        .driver()
        .as_any()
        .downcast_ref::<ParallelsDriver>()
        .unwrap();
    let bitmaps = d.dirty_bitmaps();
    assert_eq!(bitmaps.len(), 1);
    assert_eq!(bitmaps[0].name, "12121212-1212-1212-1212-121212121212");
    assert_eq!(bitmaps[0].granularity, 64 * 1024);
    // The extension cluster is not a leak (qemu 10.0 counts it as one, and its repair would cut
    // the extension off; later qemu fixed that).
    assert_eq!(
        img.driver().check(CheckMode::ReadOnly).unwrap().exit_code(),
        0
    );
}

#[test]
fn writes_never_take_the_extension_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (path, b) = image_with_extension(dir.path());
    let ext_at = b.len() - MIB as usize;
    let img = open_rw(&path).unwrap();
    img.write_zeroes(MIB, MIB).unwrap();
    for c in [0, 2, 4, 5] {
        img.write_at(&[c as u8 + 1; 4096], c * MIB).unwrap();
    }
    img.close().unwrap();
    let after = read_file(&path);
    assert_eq!(&after[ext_at..ext_at + MIB as usize], &b[ext_at..]);
    let (code, _, err) = qemu_img_status(&["info", "-f", "parallels", p(&path)]);
    assert_eq!(code, 0, "{err}");
}

/// Recompute the extension checksum after corrupting a field behind it.
fn reseal(b: &mut [u8], e: usize) {
    let sum = Md5::digest(&b[e + 24..e + MIB as usize]);
    b[e + 8..e + 24].copy_from_slice(&sum);
}

/// Corrupt one thing in the extension; qemu and vmi must both refuse the read-only open.
#[test]
fn corrupt_format_extensions_are_refused_like_qemu_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = image_with_extension(dir.path());
    let ext_at = good.len() - MIB as usize;
    type Corrupt = fn(&mut Vec<u8>, usize);
    let cases: [(&str, Corrupt); 9] = [
        ("checksum", |b, e| b[e + 8] ^= 1),
        ("magic", |b, e| b[e] ^= 1),
        ("bitmap size", |b, e| {
            b[e + 48] ^= 1;
            let sum = Md5::digest(&b[e + 24..e + MIB as usize]);
            b[e + 8..e + 24].copy_from_slice(&sum);
        }),
        ("granularity", |b, e| {
            put32(b, e + 72, 3);
            let sum = Md5::digest(&b[e + 24..e + MIB as usize]);
            b[e + 8..e + 24].copy_from_slice(&sum);
        }),
        ("l1 size", |b, e| {
            put32(b, e + 76, 2);
            let sum = Md5::digest(&b[e + 24..e + MIB as usize]);
            b[e + 8..e + 24].copy_from_slice(&sum);
        }),
        ("feature flags", |b, e| {
            b[e + 32] = 1;
            reseal(b, e);
        }),
        ("unknown feature", |b, e| {
            b[e + 24] ^= 1;
            reseal(b, e);
        }),
        ("feature data size", |b, e| {
            put32(b, e + 40, 0x7fff_0000);
            reseal(b, e);
        }),
        ("offset", |b, _| {
            let past_end = (b.len() / 512) as u64;
            put64(b, EXT_OFF, past_end)
        }),
    ];
    for (what, corrupt) in cases {
        let mut b = good.clone();
        corrupt(&mut b, ext_at);
        fs::write(&path, &b).unwrap();
        let (code, _, _) = qemu_img_status(&["info", "-f", "parallels", p(&path)]);
        assert_ne!(code, 0, "{what}: qemu refuses");
        let e = open_ro(&path).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("xtension") || m.contains("bitmap"),
            "{what}: {m}"
        );
        // A writable open ignores the extension, as qemu does.
        open_rw(&path).unwrap().close().unwrap();
    }
}

/// One corrupted header field per case: each is an error naming the problem, never a panic.
#[test]
fn hostile_headers_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "h.prl");
    let good = read_file(&path);
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, Corrupt, &str); 7] = [
        ("zero tracks", |b| put32(b, TRACKS, 0), "zero sectors"),
        (
            "huge tracks",
            |b| put32(b, TRACKS, u32::MAX),
            "sectors per cluster",
        ),
        (
            "huge BAT",
            |b| put32(b, BAT_ENTRIES, 0x1fff_ffff),
            "beyond the end of the file",
        ),
        (
            "BAT over limit",
            |b| put32(b, BAT_ENTRIES, u32::MAX),
            "BAT entries",
        ),
        (
            "size beyond BAT",
            |b| put64(b, NB_SECTORS, 1 << 40),
            "too few",
        ),
        ("version", |b| put32(b, VERSION, 3), "version"),
        (
            "extension offset",
            |b| put64(b, EXT_OFF, u64::MAX),
            "extension offset",
        ),
    ];
    for (what, corrupt, needle) in cases {
        let mut b = good.clone();
        corrupt(&mut b);
        fs::write(&path, &b).unwrap();
        let e = open_ro(&path).unwrap_err();
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
    // Too short for a header.
    fs::write(&path, &good[..40]).unwrap();
    assert!(open_ro(&path).is_err());
}

#[test]
fn probing_tells_both_magics_and_weakly_flags_other_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "p.prl");
    assert_eq!(probed(&path), Format::Parallels);
    let (v1, _) = v1_image();
    let v1_path = dir.path().join("v1.prl");
    fs::write(&v1_path, &v1).unwrap();
    assert_eq!(probed(&v1_path), Format::Parallels);
    // A wrong version is still Parallels (refused when opened), never raw.
    let mut b = read_file(&path);
    put32(&mut b, VERSION, 3);
    fs::write(&path, &b).unwrap();
    assert_eq!(probed(&path), Format::Parallels);
    let e = Image::open(&path, &OpenOptions::new()).unwrap_err();
    assert!(e.to_string().contains("version"), "{e}");
}

#[test]
fn seeded_mutations_of_an_image_never_panic() {
    let (v1, _) = v1_image();
    let dir = tempfile::tempdir().unwrap();
    let q = read_file(&qemu_image(dir.path(), "m.prl"));
    let q = q[..64 * 1024].to_vec();
    for base in [v1, q] {
        for i in 0..2000u64 {
            let mut b = base.clone();
            let r = pattern(i, 16);
            for k in 0..4 {
                let at = (u64::from(r[k * 2]) << 8 | u64::from(r[k * 2 + 1])) as usize % 128;
                b[at] = r[8 + k];
            }
            vmi_disk::fuzzing::exercise(Some(Format::Parallels), &b);
        }
    }
}

/// Writable opens of mutated images (which repair before writing) never panic either.
#[test]
fn seeded_mutations_opened_for_writing_never_panic() {
    let (v1, _) = v1_image();
    for i in 0..600u64 {
        let mut b = v1.clone();
        let r = pattern(1000 + i, 16);
        for k in 0..3 {
            let at = (u64::from(r[k * 2]) << 8 | u64::from(r[k * 2 + 1])) as usize % 128;
            b[at] = r[8 + k];
        }
        let storage = Box::new(vmi_disk::storage::MemStorage::from_bytes(b));
        let Ok(img) = Image::from_storage(
            storage,
            Path::new("m.prl"),
            Some(Format::Parallels),
            true,
            &vmi_disk::Gate::deny_all(),
        ) else {
            continue;
        };
        let size = img.virtual_size();
        if size > 0 {
            let _ = img.write_at(&[1; 700], (u64::from(r[12]) * 997) % size.max(1));
            let _ = img.write_zeroes(0, size.min(8192));
        }
        let _ = img.driver().check(CheckMode::RepairAll);
        let _ = img.close();
    }
}

/// A bitmap data cluster past the end of the file: qemu would read zeroes there, vmi refuses.
#[test]
fn bitmap_data_cluster_outside_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut b) = image_with_extension(dir.path());
    let e = b.len() - MIB as usize;
    put64(&mut b, e + 80, 1 << 40);
    reseal(&mut b, e);
    fs::write(&path, &b).unwrap();
    let err = open_ro(&path).unwrap_err();
    assert!(err.to_string().contains("outside the image file"), "{err}");
}

/// Both tools writing into one image, in turn: each sees the other's data and the image stays
/// clean for qemu.
#[test]
fn qemu_io_and_vmi_write_into_the_same_image_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.prl");
    let img = Image::create(&path, Format::Parallels, &opts("cluster_size=64k", 8 * MIB)).unwrap();
    img.write_at(&[0x11; 70_000], 100).unwrap();
    img.close().unwrap();
    vmi_testkit::qemu::qemu_io(&path, "parallels", "write -P 0x22 1M 128k");
    vmi_testkit::qemu::qemu_io(&path, "parallels", "write -P 0x33 64k 4k");
    let img = open_rw(&path).unwrap();
    img.write_at(&[0x44; 512], 7 * MIB + 512).unwrap();
    img.close().unwrap();
    vmi_testkit::qemu::qemu_io(&path, "parallels", "read -P 0x44 7340544 512");
    vmi_testkit::qemu::qemu_io(&path, "parallels", "read -P 0x22 1M 128k");
    assert_qemu_check_clean(&path, "parallels");
    let got = read_image(&open_ro(&path).unwrap());
    let mut expect = vec![0u8; 8 * MIB as usize];
    expect[100..70_100].fill(0x11);
    expect[MIB as usize..MIB as usize + 128 * 1024].fill(0x22);
    expect[64 * 1024..68 * 1024].fill(0x33);
    expect[7 * MIB as usize + 512..7 * MIB as usize + 1024].fill(0x44);
    assert!(got == expect);
}
