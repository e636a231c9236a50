//! VDI: the conformance suite, cross-checks with qemu-img in both directions, hostile headers and
//! block maps, and a seeded mutation run over the parser.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vmi_disk::{
    BlockKind, CheckMode, CreateOptions, ErrorKind, Format, FormatOptions, Image, OpenOptions,
};
use vmi_testkit::conformance::{run, Caps};
use vmi_testkit::fixtures::{assert_image_matches_raw, pattern, read_file, scattered_raw};
use vmi_testkit::qemu::{
    assert_qemu_check_clean, assert_qemu_identical, qemu_check, qemu_convert, qemu_create,
    qemu_info, qemu_io, qemu_map,
};

const MIB: u64 = 1 << 20;
/// Byte offsets in the header sector (VirtualBox `VDIHEADER1`).
const SIGNATURE: usize = 0x40;
const VERSION: usize = 0x44;
const DISK_SIZE: usize = 0x170;
const BLOCK_SIZE: usize = 0x178;
const BLOCKS_ALLOCATED: usize = 0x184;
/// Where qemu and vmi put the block map.
const BMAP: usize = 0x200;

fn opts(o: &str, size: u64) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).expect("valid -o");
    CreateOptions::new(size).options(fo)
}

fn open_ro(path: &Path) -> vmi_disk::Result<Image> {
    Image::open(path, &OpenOptions::new())
}

/// Copy a raw file into a new vmi-written VDI, skipping all-zero chunks as a converter would.
/// Chunks are deliberately not block-aligned.
fn vmi_convert(raw: &Path, dst: &Path, o: &str) {
    let data = read_file(raw);
    let img = Image::create(dst, Format::Vdi, &opts(o, data.len() as u64)).expect("create");
    let chunk = 300 * 1024 + 7;
    for (i, c) in data.chunks(chunk).enumerate() {
        if c.iter().any(|&b| b != 0) {
            img.write_at(c, (i * chunk) as u64).expect("write");
        }
    }
    img.close().expect("close");
}

fn u32_at(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A small vmi-written dynamic image: 4 MiB, blocks 1 and 3 written (data blocks 0 and 1).
fn small_image(dir: &Path) -> Vec<u8> {
    let path = dir.join("small.vdi");
    let _ = fs::remove_file(&path);
    let img = Image::create(&path, Format::Vdi, &opts("", 4 * MIB)).expect("create");
    img.write_at(&pattern(7, 4096), MIB + 100).expect("write");
    img.write_at(&pattern(8, 4096), 3 * MIB).expect("write");
    img.close().expect("close");
    read_file(&path)
}

#[test]
fn vdi_dynamic_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Vdi,
        "",
        Caps {
            random_writes: true,
            grow: true,
        },
    );
}

#[test]
fn vdi_static_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Vdi,
        "static=on",
        Caps {
            random_writes: true,
            grow: true,
        },
    );
}

#[test]
fn qemu_written_vdi_reads_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 24 * MIB + 512, 40, 11);
    for (name, o) in [("dyn.vdi", ""), ("static.vdi", "static=on")] {
        let vdi = dir.path().join(name);
        qemu_convert(&raw, "raw", &vdi, "vdi", o, &[]);
        let img = open_ro(&vdi).expect("open qemu's vdi");
        assert_eq!(img.format(), Format::Vdi);
        let info = qemu_info(&vdi, "vdi");
        assert_eq!(
            Some(img.virtual_size()),
            info["virtual-size"].as_u64(),
            "{name}"
        );
        assert_eq!(
            img.driver().info().cluster_size,
            info["cluster-size"].as_u64()
        );
        assert_image_matches_raw(&img, &raw);
        let report = img.driver().check(CheckMode::ReadOnly).expect("check");
        assert_eq!(report.exit_code(), 0, "{name}: {report:?}");
    }
}

#[test]
fn block_status_agrees_with_qemu_map_on_host_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 16 * MIB, 12, 13);
    let vdi = dir.path().join("m.vdi");
    qemu_convert(&raw, "raw", &vdi, "vdi", "", &[]);
    let img = open_ro(&vdi).unwrap();
    let map = qemu_map(&vdi, "vdi");
    for e in map.as_array().expect("qemu-img map prints a list") {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        for at in [start, start + len - 1] {
            let st = img.block_status(at, 1).unwrap();
            if e["data"] == true {
                let host = e["offset"].as_u64().unwrap() + (at - start);
                assert_eq!(st.kind, BlockKind::Data, "at {at}");
                assert_eq!(st.offset, Some(host), "at {at}");
            } else {
                assert_ne!(st.kind, BlockKind::Data, "at {at}");
            }
        }
    }
}

#[test]
fn vmi_written_vdi_is_clean_and_identical_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 24 * MIB + 512, 40, 12);
    for (name, o) in [("dyn.vdi", ""), ("static.vdi", "static=on")] {
        let vdi = dir.path().join(name);
        vmi_convert(&raw, &vdi, o);
        assert_qemu_check_clean(&vdi, "vdi");
        assert_qemu_identical(&vdi, "vdi", &raw, "raw");
    }
}

#[test]
fn vmi_writes_into_a_qemu_created_image_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let vdi = dir.path().join("q.vdi");
    let raw = dir.path().join("expect.raw");
    qemu_create(&vdi, "vdi", "", 8 * MIB);
    qemu_io(&vdi, "vdi", "write -P 0xab 1M 64k");
    let expect = fs::File::create(&raw).unwrap();
    expect.set_len(8 * MIB).unwrap();
    expect.write_all_at(&[0xab; 65536], MIB).unwrap();
    {
        let img = Image::open(&vdi, &OpenOptions::new().write(true)).expect("open rw");
        let data = pattern(3, 100_000);
        img.write_at(&data, 5 * MIB - 50_000).expect("write");
        expect.write_all_at(&data, 5 * MIB - 50_000).unwrap();
        let more = pattern(4, 4096);
        img.write_at(&more, MIB + 4096).expect("write");
        expect.write_all_at(&more, MIB + 4096).unwrap();
        // qemu pads its block map sector with zero bytes: growing must not read them as entries.
        img.resize(20 * MIB).expect("grow");
        expect.set_len(20 * MIB).unwrap();
        img.write_at(&more, 19 * MIB).expect("write");
        expect.write_all_at(&more, 19 * MIB).unwrap();
        img.close().expect("close");
    }
    assert_qemu_check_clean(&vdi, "vdi");
    assert_qemu_identical(&vdi, "vdi", &raw, "raw");
}

#[test]
fn grown_images_are_clean_and_identical_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB to 200 MiB: the block map outgrows its sector and the first data block moves.
    for (name, o) in [("dyn.vdi", ""), ("static.vdi", "static=on")] {
        let vdi = dir.path().join(name);
        let raw = dir.path().join(format!("{name}.raw"));
        let expect = fs::File::create(&raw).unwrap();
        expect.set_len(200 * MIB).unwrap();
        {
            let img = Image::create(&vdi, Format::Vdi, &opts(o, 8 * MIB)).expect("create");
            for (seed, off) in [(1, 0), (2, 5 * MIB + 3), (3, 2 * MIB)] {
                let data = pattern(seed, 70_000);
                img.write_at(&data, off).expect("write");
                expect.write_all_at(&data, off).unwrap();
            }
            img.resize(200 * MIB).expect("grow");
            let data = pattern(4, 5000);
            img.write_at(&data, 150 * MIB).expect("write grown area");
            expect.write_all_at(&data, 150 * MIB).unwrap();
            img.close().expect("close");
        }
        assert_qemu_check_clean(&vdi, "vdi");
        assert_qemu_identical(&vdi, "vdi", &raw, "raw");
        assert_eq!(
            qemu_info(&vdi, "vdi")["virtual-size"].as_u64(),
            Some(200 * MIB)
        );
    }
}

/// A dynamic image laid out as VirtualBox writes them (its text, the 0x190-byte header with LCHS
/// geometry, block map at 1 MiB, data at 2 MiB), with out-of-order data blocks and a discarded
/// block: guest block 0 is data block 1, block 2 is data block 0, block 3 is discarded.
fn virtualbox_style_image(path: &Path) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    let text = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
    h[..text.len()].copy_from_slice(text);
    u32_at(&mut h, SIGNATURE, 0xbeda_107f);
    u32_at(&mut h, VERSION, 0x0001_0001);
    u32_at(&mut h, 0x48, 0x190);
    u32_at(&mut h, 0x4c, 1);
    h[0x54..0x5d].copy_from_slice(b"vbox disk");
    u32_at(&mut h, 0x154, 0x10_0000);
    u32_at(&mut h, 0x158, 0x20_0000);
    u32_at(&mut h, 0x15c, 8);
    u32_at(&mut h, 0x160, 16);
    u32_at(&mut h, 0x164, 63);
    u32_at(&mut h, 0x168, 512);
    h[DISK_SIZE..DISK_SIZE + 8].copy_from_slice(&(4 * MIB).to_le_bytes());
    u32_at(&mut h, BLOCK_SIZE, MIB as u32);
    u32_at(&mut h, 0x180, 4);
    u32_at(&mut h, BLOCKS_ALLOCATED, 2);
    h[0x188..0x1a8].copy_from_slice(&pattern(9, 32));
    // LCHS geometry of VDIHEADER1PLUS.
    u32_at(&mut h, 0x1c8, 8);
    u32_at(&mut h, 0x1cc, 16);
    u32_at(&mut h, 0x1d0, 63);
    u32_at(&mut h, 0x1d4, 512);
    let f = fs::File::create(path).unwrap();
    f.write_all_at(&h, 0).unwrap();
    let map: Vec<u8> = [1u32, 0xffff_ffff, 0, 0xffff_fffe]
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    f.write_all_at(&map, MIB).unwrap();
    let (a, b) = (pattern(21, MIB as usize), pattern(22, MIB as usize));
    f.write_all_at(&a, 2 * MIB).unwrap();
    f.write_all_at(&b, 3 * MIB).unwrap();
    let mut guest = vec![0u8; 4 * MIB as usize];
    guest[..MIB as usize].copy_from_slice(&b);
    guest[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&a);
    guest
}

#[test]
fn virtualbox_layout_reads_and_writes_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let vdi = dir.path().join("vbox.vdi");
    let raw = dir.path().join("vbox.raw");
    let mut guest = virtualbox_style_image(&vdi);
    fs::write(&raw, &guest).unwrap();
    assert_qemu_identical(&vdi, "vdi", &raw, "raw");
    {
        let img = open_ro(&vdi).expect("open");
        assert_image_matches_raw(&img, &raw);
        let report = img.driver().check(CheckMode::ReadOnly).unwrap();
        assert_eq!(report.exit_code(), 0, "{report:?}");
        assert_eq!(
            img.block_status(3 * MIB, MIB).unwrap().kind,
            BlockKind::Zero
        );
    }
    {
        let img = Image::open(&vdi, &OpenOptions::new().write(true)).expect("open rw");
        let data = pattern(23, 10_000);
        img.write_at(&data, MIB + 5).expect("write");
        guest[MIB as usize + 5..MIB as usize + 5 + data.len()].copy_from_slice(&data);
        img.write_at(&data, 3 * MIB + 5)
            .expect("write discarded block");
        guest[3 * MIB as usize + 5..3 * MIB as usize + 5 + data.len()].copy_from_slice(&data);
        img.close().unwrap();
    }
    fs::write(&raw, &guest).unwrap();
    assert_qemu_check_clean(&vdi, "vdi");
    assert_qemu_identical(&vdi, "vdi", &raw, "raw");
    assert_image_matches_raw(&open_ro(&vdi).unwrap(), &raw);
}

#[test]
fn truncated_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let full = small_image(dir.path());
    for len in [0x100, 0x202] {
        let p = dir.path().join(format!("t{len}.vdi"));
        fs::write(&p, &full[..len]).unwrap();
        let e = Image::open(&p, &OpenOptions::new().format(Some(Format::Vdi))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{len}: {e}");
    }
    // Data cut off: the header and map are fine, the second data block is gone.
    let p = dir.path().join("cut.vdi");
    fs::write(&p, &full[..full.len() - 1000]).unwrap();
    let img = open_ro(&p).expect("metadata is intact");
    let mut buf = vec![0u8; 4096];
    let e = img.read_at(&mut buf, 3 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(img.driver().check(CheckMode::ReadOnly).unwrap().corruptions > 0);
}

#[test]
fn bad_signature_is_not_vdi_and_bad_version_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = small_image(dir.path());
    b[SIGNATURE] ^= 1;
    let p = dir.path().join("sig.vdi");
    fs::write(&p, &b).unwrap();
    assert_eq!(open_ro(&p).unwrap().format(), Format::Raw);
    let e = Image::open(&p, &OpenOptions::new().format(Some(Format::Vdi))).unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");

    let mut b = small_image(dir.path());
    u32_at(&mut b, VERSION, 0x0001_0002);
    let p = dir.path().join("ver.vdi");
    fs::write(&p, &b).unwrap();
    let e = open_ro(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("1.2"), "{e}");
}

#[test]
fn huge_disk_size_and_zero_block_size_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (field, value, what) in [
        (DISK_SIZE, u64::MAX, "disk size"),
        (DISK_SIZE, 5 * MIB, "disk size"),
        (BLOCK_SIZE, 0, "block size 0"),
        (BLOCK_SIZE, 3000, "block size 3000"),
    ] {
        let mut b = small_image(dir.path());
        if field == DISK_SIZE {
            b[field..field + 8].copy_from_slice(&value.to_le_bytes());
        } else {
            u32_at(&mut b, field, value as u32);
        }
        let p = dir.path().join("h.vdi");
        fs::write(&p, &b).unwrap();
        let e = open_ro(&p).unwrap_err();
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
}

#[test]
fn block_map_entries_beyond_the_file_are_corruptions() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = small_image(dir.path());
    // Guest block 2 names data block 2: inside the image's 4 blocks but past the file's 2.
    u32_at(&mut b, BMAP + 8, 2);
    u32_at(&mut b, BLOCKS_ALLOCATED, 3);
    let p = dir.path().join("beyond.vdi");
    fs::write(&p, &b).unwrap();
    let img = open_ro(&p).expect("opens read-only");
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, MIB + 100)
        .expect("good blocks still read");
    let e = img.read_at(&mut buf, 2 * MIB).unwrap_err();
    assert!(e.to_string().contains("guest block 2"), "{e}");
    assert!(img.driver().check(CheckMode::ReadOnly).unwrap().corruptions > 0);
    let e = Image::open(&p, &OpenOptions::new().write(true)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");

    // An index past blocks_in_image: qemu reports it too.
    let mut b = small_image(dir.path());
    u32_at(&mut b, BMAP + 8, 1000);
    u32_at(&mut b, BLOCKS_ALLOCATED, 3);
    fs::write(&p, &b).unwrap();
    let report = open_ro(&p)
        .unwrap()
        .driver()
        .check(CheckMode::ReadOnly)
        .unwrap();
    let (code, _) = qemu_check(&p, "vdi");
    assert_eq!(report.exit_code(), 2, "{report:?}");
    assert_eq!(code, 2, "qemu-img check agrees");
}

#[test]
fn duplicated_block_map_entries_are_corruptions_for_vmi_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = small_image(dir.path());
    u32_at(&mut b, BMAP + 12, 0);
    let p = dir.path().join("dup.vdi");
    fs::write(&p, &b).unwrap();
    let img = open_ro(&p).expect("opens read-only");
    let report = img.driver().check(CheckMode::ReadOnly).unwrap();
    assert_eq!(report.corruptions, 1, "{report:?}");
    assert_eq!(report.exit_code(), 2);
    let (code, json) = qemu_check(&p, "vdi");
    assert_eq!(code, 2, "qemu-img check agrees");
    assert_eq!(json["corruptions"].as_u64(), Some(report.corruptions));
    let e = Image::open(&p, &OpenOptions::new().write(true)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

#[test]
fn allocated_count_mismatch_matches_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = small_image(dir.path());
    u32_at(&mut b, BLOCKS_ALLOCATED, 1);
    let p = dir.path().join("count.vdi");
    fs::write(&p, &b).unwrap();
    let report = open_ro(&p)
        .unwrap()
        .driver()
        .check(CheckMode::ReadOnly)
        .unwrap();
    let (code, _) = qemu_check(&p, "vdi");
    assert_eq!(code, 2);
    assert_eq!(report.exit_code(), 2, "{report:?}");
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_image(dir.path());
    assert!(vmi_disk::fuzzing::exercise(Some(Format::Vdi), &base));
    let mut rng = StdRng::seed_from_u64(0x5d1);
    for _ in 0..2000 {
        let mut b = base.clone();
        for _ in 0..rng.gen_range(1..=8) {
            // Mostly the header and block map, where the parser lives.
            let at = if rng.gen_bool(0.9) {
                rng.gen_range(0..BMAP + 16)
            } else {
                rng.gen_range(0..b.len())
            };
            b[at] = match rng.gen_range(0..4) {
                0 => 0,
                1 => 0xff,
                2 => b[at] ^ (1 << rng.gen_range(0..8)),
                _ => rng.gen(),
            };
        }
        if rng.gen_bool(0.05) {
            let cut = rng.gen_range(0..b.len());
            b.truncate(cut);
        }
        vmi_disk::fuzzing::exercise(Some(Format::Vdi), &b);
        vmi_disk::fuzzing::exercise(None, &b);
    }
}

#[test]
fn unallocated_blocks_are_present_zeroes_as_qemu_maps_them() {
    let dir = tempfile::tempdir().unwrap();
    let vdi = dir.path().join("u.vdi");
    qemu_create(&vdi, "vdi", "", 8 * MIB);
    qemu_io(&vdi, "vdi", "write -P 3 2M 1M");
    let img = open_ro(&vdi).unwrap();
    let map = qemu_map(&vdi, "vdi");
    let entries = map.as_array().expect("qemu-img map prints a list");
    assert!(entries.iter().any(|e| e["data"] == false), "{map}");
    for e in entries {
        let st = img.block_status(e["start"].as_u64().unwrap(), 1).unwrap();
        // map --output json: present unless unallocated everywhere, zero for zero runs.
        let present = st.kind != BlockKind::Unallocated;
        let zero = matches!(st.kind, BlockKind::Zero | BlockKind::Unallocated);
        assert_eq!(Some(present), e["present"].as_bool(), "{e}");
        assert_eq!(Some(zero), e["zero"].as_bool(), "{e}");
    }
}
