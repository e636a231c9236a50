//! Unit tests of the VHD driver over in-memory storage: probing, the footer-copy policy, the
//! allocation path, bitmaps of differencing disks, resizing.

use super::*;
use crate::gate::Gate;
use crate::options::FormatOptions;
use crate::storage::MemStorage;

fn opts(o: &str, size: u64) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).unwrap();
    CreateOptions::new(size).options(fo)
}

/// Create an image in memory, run `f` on it, return the file bytes.
fn build(o: &str, size: u64, f: impl FnOnce(&Image)) -> Vec<u8> {
    let img = Image::create_on(
        Box::new(MemStorage::new()),
        Path::new("t.vhd"),
        Format::Vpc,
        &opts(o, size),
    )
    .unwrap();
    f(&img);
    let s = img.driver().file(0).unwrap();
    let mut bytes = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut bytes, 0).unwrap();
    bytes
}

fn open_bytes(bytes: Vec<u8>) -> Result<Image> {
    Image::from_storage(
        Box::new(MemStorage::from_bytes(bytes)),
        Path::new("t.vhd"),
        Some(Format::Vpc),
        true,
        &Gate::new(),
    )
}

fn probe_bytes(bytes: &[u8]) -> Option<Confidence> {
    let head = &bytes[..bytes.len().min(crate::formats::PROBE_HEAD)];
    let tail = &bytes[bytes.len().saturating_sub(512)..];
    probe(&ProbeInput {
        head,
        tail,
        len: bytes.len() as u64,
    })
}

#[test]
fn probe_is_certain_for_dynamic_and_consistent_fixed_disks() {
    let d = build("", 8 << 20, |_| {});
    assert_eq!(probe_bytes(&d), Some(Confidence::Certain));
    let f = build("subformat=fixed,force_size=on", 8 << 20, |_| {});
    assert_eq!(probe_bytes(&f), Some(Confidence::Certain));
}

#[test]
fn probe_ignores_a_fixed_footer_when_the_file_size_disagrees() {
    let mut f = build("subformat=fixed,force_size=on", 8 << 20, |_| {});
    let footer = f.split_off(f.len() - 512);
    f.extend_from_slice(&[0u8; 4096]);
    f.extend_from_slice(&footer);
    assert_eq!(probe_bytes(&f), None);
}

#[test]
fn probe_ignores_a_fixed_footer_with_a_bad_checksum() {
    let mut f = build("subformat=fixed,force_size=on", 8 << 20, |_| {});
    let n = f.len();
    f[n - 512 + 100] ^= 1;
    assert_eq!(probe_bytes(&f), None);
}

#[test]
fn dynamic_writes_allocate_blocks_and_read_back_after_reopen() {
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let bytes = build("", 16 << 20, |img| {
        img.write_at(&data, (2 << 20) + 100).unwrap();
        img.write_at(&data, 0).unwrap();
    });
    let img = open_bytes(bytes).unwrap();
    let mut buf = vec![0u8; 5000];
    img.read_at(&mut buf, (2 << 20) + 100).unwrap();
    assert_eq!(buf, data);
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data);
    img.read_at(&mut buf, 5 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let st = img.block_status(8 << 20, 4 << 20).unwrap();
    assert_eq!(st.kind, crate::BlockKind::Unallocated);
}

#[test]
fn write_zeroes_on_an_unallocated_dynamic_block_allocates_nothing() {
    let before = build("", 16 << 20, |_| {}).len();
    let after = build("", 16 << 20, |img| img.write_zeroes(0, 4 << 20).unwrap()).len();
    assert_eq!(before, after);
}

#[test]
fn a_damaged_end_footer_falls_back_to_the_copy_at_offset_0() {
    let mut bytes = build("", 8 << 20, |img| img.write_at(&[7u8; 512], 0).unwrap());
    let n = bytes.len();
    bytes[n - 512 + 70] ^= 0xff;
    let img = open_bytes(bytes).unwrap();
    let mut b = [0u8; 512];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [7u8; 512]);
    let report = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert!(
        report.messages.iter().any(|m| m.contains("offset 0")),
        "{:?}",
        report.messages
    );
}

#[test]
fn both_footers_damaged_is_an_error() {
    let mut bytes = build("", 8 << 20, |_| {});
    let n = bytes.len();
    bytes[n - 512 + 70] ^= 0xff;
    bytes[70] ^= 0xff;
    let e = open_bytes(bytes).unwrap_err();
    assert!(e.to_string().contains("both VHD footers"), "{e}");
}

#[test]
fn open_rejects_a_bat_entry_beyond_the_file() {
    let mut bytes = build("", 8 << 20, |_| {});
    bytes[1536..1540].copy_from_slice(&0x0010_0000u32.to_be_bytes());
    let e = open_bytes(bytes).unwrap_err();
    assert!(e.to_string().contains("BAT entry 0"), "{e}");
}

#[test]
fn open_rejects_a_bat_entry_pointing_at_the_header() {
    let mut bytes = build("", 8 << 20, |img| img.write_at(&[1], 0).unwrap());
    bytes[1536..1540].copy_from_slice(&1u32.to_be_bytes());
    let e = open_bytes(bytes).unwrap_err();
    assert!(e.to_string().contains("overlapping metadata"), "{e}");
}

#[test]
fn cleared_bitmap_bits_read_as_zero_in_a_dynamic_disk() {
    let mut bytes = build("", 4 << 20, |img| img.write_at(&[9u8; 2048], 0).unwrap());
    let block = u32::from_be_bytes(bytes[1536..1540].try_into().unwrap()) as usize * 512;
    bytes[block] = 0b1010_0000; // sectors 0 and 2 present, 1 and 3 not
    let img = open_bytes(bytes).unwrap();
    let mut b = vec![0u8; 2048];
    img.read_at(&mut b, 0).unwrap();
    assert!(b[..512].iter().all(|&x| x == 9));
    assert!(b[512..1024].iter().all(|&x| x == 0));
    assert!(b[1024..1536].iter().all(|&x| x == 9));
    assert!(b[1536..].iter().all(|&x| x == 0));
    // Writing into a sector that is not present marks it and keeps the rest of it zero.
    img.write_at(&[5u8; 10], 600).unwrap();
    img.read_at(&mut b, 0).unwrap();
    assert!(b[512..600].iter().all(|&x| x == 0));
    assert!(b[600..610].iter().all(|&x| x == 5));
    assert!(b[610..1024].iter().all(|&x| x == 0));
}

#[test]
fn force_size_keeps_the_exact_size_and_chs_rounds_up() {
    let img = open_bytes(build("force_size=on", 1000 << 20, |_| {})).unwrap();
    assert_eq!(img.virtual_size(), 1000 << 20);
    let img = open_bytes(build("", 1000 << 20, |_| {})).unwrap();
    assert_eq!(img.virtual_size(), 1_048_707_072);
}

#[test]
fn fixed_and_dynamic_disks_grow() {
    for o in ["subformat=fixed,force_size=on", "force_size=on"] {
        let bytes = build(o, 4 << 20, |img| {
            img.write_at(&[3u8; 512], (4 << 20) - 512).unwrap();
            img.resize(300 << 20).unwrap();
            img.write_at(&[4u8; 512], (300 << 20) - 512).unwrap();
        });
        let img = open_bytes(bytes).unwrap();
        assert_eq!(img.virtual_size(), 300 << 20, "{o}");
        let mut b = [0u8; 512];
        img.read_at(&mut b, (4 << 20) - 512).unwrap();
        assert_eq!(b, [3u8; 512], "{o}");
        img.read_at(&mut b, 4 << 20).unwrap();
        assert_eq!(b, [0u8; 512], "{o}: the old footer must not show");
        img.read_at(&mut b, (300 << 20) - 512).unwrap();
        assert_eq!(b, [4u8; 512], "{o}");
    }
}

#[test]
fn chs_sized_disks_refuse_sizes_the_geometry_cannot_express() {
    let img = Image::create_on(
        Box::new(MemStorage::new()),
        Path::new("t.vhd"),
        Format::Vpc,
        &opts("", 10 << 20),
    )
    .unwrap();
    let e = img.resize(20 << 20).unwrap_err();
    assert!(e.to_string().contains("try"), "{e}");
}

#[test]
fn fixed_disks_refuse_a_backing_file() {
    let o = opts("subformat=fixed", 1 << 20).backing(BackingSpec {
        name: "base.vhd".into(),
        format: None,
    });
    let e = Image::create_on(
        Box::new(MemStorage::new()),
        Path::new("t.vhd"),
        Format::Vpc,
        &o,
    )
    .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Usage);
}

#[test]
fn unknown_options_are_refused() {
    let e = Image::create_on(
        Box::new(MemStorage::new()),
        Path::new("t.vhd"),
        Format::Vpc,
        &opts("cluster_size=64k", 1 << 20),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cluster_size"), "{e}");
}

#[test]
fn creating_a_child_refuses_protocol_prefixes_and_non_vhd_parents() {
    for (name, format) in [
        ("nbd:127.0.0.1:10809", None),
        ("json:{}", None),
        ("base.qcow2", Some(Format::Qcow2)),
    ] {
        let o = opts("", 1 << 20).backing(BackingSpec {
            name: name.into(),
            format,
        });
        let e = Image::create_on(
            Box::new(MemStorage::new()),
            Path::new("/tmp/child.vhd"),
            Format::Vpc,
            &o,
        )
        .unwrap_err();
        assert!(
            matches!(
                e.kind(),
                crate::ErrorKind::Refused | crate::ErrorKind::Usage
            ),
            "{name}: {e}"
        );
    }
}

#[test]
fn a_child_without_usable_locators_names_its_parent_by_unicode_name() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("base.vhd");
    Image::create(&parent, Format::Vpc, &opts("", 4 << 20))
        .unwrap()
        .close()
        .unwrap();
    let child = dir.path().join("child.vhd");
    let o = opts("", 4 << 20).backing(BackingSpec {
        name: "base.vhd".into(),
        format: None,
    });
    Image::create(&child, Format::Vpc, &o)
        .unwrap()
        .close()
        .unwrap();
    let mut bytes = std::fs::read(&child).unwrap();
    // Wipe the platform codes of all locators (header at 512, locators at +576, 24 bytes each).
    for i in 0..LOCATOR_COUNT {
        let at = 512 + 576 + 24 * i;
        bytes[at..at + 4].fill(0);
    }
    let sum = !bytes[512..1536]
        .iter()
        .enumerate()
        .filter(|(i, _)| !(36..40).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(u32::from(b)));
    bytes[548..552].copy_from_slice(&sum.to_be_bytes());
    // The child records the parent's unique id (footer offset 68, header offset 40).
    let pbytes = std::fs::read(&parent).unwrap();
    assert_eq!(bytes[512 + 40..512 + 56], pbytes[68..84]);
    let img = open_bytes(bytes).unwrap();
    assert_eq!(img.driver().backing().unwrap().name, "base.vhd");
    let child_driver = img.driver().as_any().downcast_ref::<VhdDriver>().unwrap();
    let parent_img = Image::open(&parent, &crate::OpenOptions::new()).unwrap();
    let parent_driver = parent_img
        .driver()
        .as_any()
        .downcast_ref::<VhdDriver>()
        .unwrap();
    assert_eq!(child_driver.disk_type(), DiskType::Differencing);
    assert_eq!(
        child_driver.parent_unique_id(),
        Some(parent_driver.unique_id())
    );
}

#[test]
fn check_reports_blocks_that_overlap() {
    let mut bytes = build("force_size=on", 8 << 20, |img| {
        img.write_at(&[1], 0).unwrap();
        img.write_at(&[2], 2 << 20).unwrap();
    });
    let first: [u8; 4] = bytes[1536..1540].try_into().unwrap();
    bytes[1540..1544].copy_from_slice(&first);
    let img = open_bytes(bytes).unwrap();
    let r = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.messages);
    assert_eq!(r.allocated_clusters, Some(2));
    assert_eq!(r.total_clusters, Some(4));
}

#[test]
fn check_repair_all_rewrites_a_damaged_footer_copy() {
    let mut bytes = build("", 8 << 20, |_| {});
    bytes[70] ^= 0xff;
    let storage = MemStorage::from_bytes(bytes);
    let img = Image::from_storage(
        Box::new(storage),
        Path::new("t.vhd"),
        Some(Format::Vpc),
        true,
        &Gate::new(),
    )
    .unwrap();
    let r = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert_eq!(r.corruptions, 1);
    let r = img.driver().check(CheckMode::RepairAll).unwrap();
    assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1));
    let s = img.driver().file(0).unwrap();
    let mut fixed = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut fixed, 0).unwrap();
    let n = fixed.len();
    assert_eq!(fixed[..512], fixed[n - 512..]);
    let again = open_bytes(fixed).unwrap();
    let r = again.driver().check(CheckMode::ReadOnly).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
}
