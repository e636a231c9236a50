//! VHDX: conformance, interop with qemu-img in both directions, log replay, differencing disks
//! (which qemu cannot write: checked against a flattened raw built here), hostile images.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;
use vmi_disk::formats::vhdx::log::{encode_entry, LogWrite};
use vmi_disk::formats::vhdx::VhdxDriver;
use vmi_disk::{
    BackingSpec, BlockKind, CreateOptions, ErrorKind, Format, FormatOptions, Gate, Image, MapKind,
    OpenOptions,
};
use vmi_testkit::conformance::{run, Caps};
use vmi_testkit::fixtures::{
    assert_image_matches_raw, pattern, read_file, read_image, scattered_raw,
};
use vmi_testkit::qemu::{
    assert_qemu_check_clean, assert_qemu_identical, qemu_convert, qemu_create, qemu_info,
};

const MIB: u64 = 1 << 20;

fn opts(o: &str, size: u64) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).unwrap();
    CreateOptions::new(size).options(fo)
}

fn open_ro(p: &Path) -> vmi_disk::Result<Image> {
    Image::open(p, &OpenOptions::new().format(Some(Format::Vhdx)))
}

fn open_rw(p: &Path) -> vmi_disk::Result<Image> {
    Image::open(
        p,
        &OpenOptions::new().format(Some(Format::Vhdx)).write(true),
    )
}

/// Copy a raw file into a new vmi-written image, skipping zero chunks (as convert does).
fn vmi_convert(raw: &Path, dst: &Path, o: &str) {
    let src = Image::open(raw, &OpenOptions::new().format(Some(Format::Raw))).unwrap();
    let size = src.virtual_size();
    let img = Image::create(dst, Format::Vhdx, &opts(o, size)).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        src.read_at(&mut buf[..n], off).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            img.write_at(&buf[..n], off).unwrap();
        }
        off += n as u64;
    }
    img.close().unwrap();
}

#[test]
fn dynamic_vhdx_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let caps = Caps {
        random_writes: true,
        grow: true,
    };
    run(dir.path(), Format::Vhdx, "", caps);
}

#[test]
fn fixed_vhdx_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let caps = Caps {
        random_writes: true,
        grow: true,
    };
    run(
        dir.path(),
        Format::Vhdx,
        "subformat=fixed,block_size=4M",
        caps,
    );
}

#[test]
fn qemu_written_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 24 * MIB + 3 * 512;
    scattered_raw(&raw, size, 40, 11);
    for (i, o) in [
        "subformat=dynamic,block_size=1M",
        "subformat=dynamic,block_size=8M",
        "subformat=dynamic,block_size=32M",
        "subformat=fixed,block_size=1M",
        "subformat=fixed,block_size=8M",
        "block_state_zero=off",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("q{i}.vhdx"));
        qemu_convert(&raw, "raw", &img, "vhdx", o, &[]);
        let info = qemu_info(&img, "vhdx");
        let v =
            vmi_disk::probe(&vmi_disk::storage::FileStorage::open(&img, false).unwrap()).unwrap();
        assert_eq!(v.format, Format::Vhdx, "{o}");
        assert_eq!(v.confidence, vmi_disk::Confidence::Certain, "{o}");
        let img = Image::open(&img, &OpenOptions::new()).unwrap();
        assert_eq!(
            Some(img.virtual_size()),
            info["virtual-size"].as_u64(),
            "{o}"
        );
        assert_eq!(
            img.driver().info().cluster_size,
            info["cluster-size"].as_u64(),
            "{o}"
        );
        assert_image_matches_raw(&img, &raw);
    }
}

#[test]
fn vmi_written_images_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 20 * MIB + 512, 40, 12);
    for (i, o) in [
        "subformat=dynamic,block_size=1M",
        "subformat=dynamic,block_size=8M",
        "subformat=fixed,block_size=2M",
        "subformat=fixed",
        "log_size=2M,block_state_zero=off",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("v{i}.vhdx"));
        vmi_convert(&raw, &img, o);
        assert_qemu_check_clean(&img, "vhdx");
        assert_qemu_identical(&img, "vhdx", &raw, "raw");
    }
}

#[test]
fn qemu_reads_what_vmi_wrote_after_reopening_for_writing() {
    // A second session must renew the header GUIDs and keep both headers valid.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 8 * MIB, 10, 13);
    let img = dir.path().join("a.vhdx");
    vmi_convert(&raw, &img, "block_size=1M");
    let extra = pattern(77, 5000);
    {
        let i = open_rw(&img).unwrap();
        i.write_at(&extra, 3 * MIB + 11).unwrap();
        i.close().unwrap();
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(&extra, 3 * MIB + 11)
        .unwrap();
    assert_qemu_check_clean(&img, "vhdx");
    assert_qemu_identical(&img, "vhdx", &raw, "raw");
}

/// The current header (higher valid sequence number): (file offset, bytes).
fn current_header(path: &Path) -> (u64, Vec<u8>) {
    let f = std::fs::File::open(path).unwrap();
    let mut best: Option<(u64, u64, Vec<u8>)> = None;
    for off in [64 * 1024u64, 128 * 1024] {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, off).unwrap();
        let mut z = b.clone();
        z[4..8].fill(0);
        let crc_ok = crc32c::crc32c(&z) == u32::from_le_bytes(b[4..8].try_into().unwrap());
        let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
        if &b[..4] == b"head" && crc_ok && best.as_ref().is_none_or(|(s, _, _)| seq > *s) {
            best = Some((seq, off, b));
        }
    }
    let (_, off, b) = best.expect("a valid header");
    (off, b)
}

fn rewrite_with_crc(path: &Path, off: u64, mut b: Vec<u8>) {
    b[4..8].fill(0);
    let c = crc32c::crc32c(&b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&b, off).unwrap();
}

fn host_offset(img: &Image, guest: u64) -> u64 {
    match img.mapping(guest, 1).unwrap().kind {
        MapKind::Data { offset, .. } => offset,
        k => panic!("guest {guest} is {k:?}"),
    }
}

#[test]
fn pending_log_is_replayed_on_writable_open_and_refused_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, pattern(5, 8 * MIB as usize)).unwrap();
    let img = dir.path().join("log.vhdx");
    qemu_convert(&raw, "raw", &img, "vhdx", "block_size=1M", &[]);
    // The log rewrites one 4 KiB sector of guest data and zeroes another.
    let (h_data, h_zero) = {
        let i = open_ro(&img).unwrap();
        (host_offset(&i, 2 * MIB + 8192), host_offset(&i, 5 * MIB))
    };
    let (hoff, mut hdr) = current_header(&img);
    let log_offset = u64::from_le_bytes(hdr[72..80].try_into().unwrap());
    let guid = Uuid::new_v4();
    let new_sector = pattern(6, 4096);
    let file_len = std::fs::metadata(&img).unwrap().len();
    let entry = encode_entry(
        guid,
        42,
        0,
        file_len,
        &[
            LogWrite::Data {
                offset: h_data,
                sector: new_sector.clone(),
            },
            LogWrite::Zero {
                offset: h_zero,
                len: 4096,
            },
        ],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&entry, log_offset).unwrap();
    hdr[48..64].copy_from_slice(&guid.to_bytes_le());
    rewrite_with_crc(&img, hoff, hdr);

    let mut expect = read_file(&raw);
    expect[(2 * MIB + 8192) as usize..(2 * MIB + 12288) as usize].copy_from_slice(&new_sector);
    expect[(5 * MIB) as usize..(5 * MIB + 4096) as usize].fill(0);
    std::fs::write(&raw, &expect).unwrap();

    // Read-only: replayed in memory, the file is left as it was.
    let before = read_file(&img);
    assert_image_matches_raw(&open_ro(&img).unwrap(), &raw);
    assert!(
        read_file(&img) == before,
        "a read-only open modified the file"
    );

    // Read-write: replayed into the file and the log GUID cleared.
    open_rw(&img).unwrap().close().unwrap();
    let (_, hdr) = current_header(&img);
    assert_eq!(&hdr[48..64], &[0u8; 16], "log GUID cleared");
    assert_image_matches_raw(&open_ro(&img).unwrap(), &raw);
    assert_qemu_check_clean(&img, "vhdx");
    assert_qemu_identical(&img, "vhdx", &raw, "raw");
}

fn backing_gate() -> Gate {
    Gate::new().allow_backing(true)
}

#[test]
fn differencing_child_reads_flattened_content() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let size = 16 * MIB;
    scattered_raw(&raw, size, 30, 21);
    let base = dir.path().join("base.vhdx");
    qemu_convert(&raw, "raw", &base, "vhdx", "block_size=1M", &[]);
    let child = dir.path().join("child.vhdx");
    let copts = opts("block_size=1M", size).backing(BackingSpec {
        name: "base.vhdx".into(),
        format: Some(Format::Vhdx),
    });
    Image::create(&child, Format::Vhdx, &copts)
        .unwrap()
        .close()
        .unwrap();
    let mut expect = read_file(&raw);
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (100, pattern(1, 5)),
        (3 * MIB + 77, pattern(2, 1000)),
        (3 * MIB + 4000, pattern(3, 513)),
        (5 * MIB, pattern(4, MIB as usize)),
        (7 * MIB - 300, pattern(5, 600)),
        (size - 7, pattern(6, 7)),
    ];
    {
        let img =
            Image::open(&child, &OpenOptions::new().write(true).gate(backing_gate())).unwrap();
        assert_eq!(img.chain_len(), 2);
        for (off, d) in &writes {
            img.write_at(d, *off).unwrap();
            expect[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        img.write_zeroes(9 * MIB + 1, 2000).unwrap();
        expect[(9 * MIB + 1) as usize..(9 * MIB + 2001) as usize].fill(0);
        img.write_zeroes(11 * MIB, MIB).unwrap();
        expect[(11 * MIB) as usize..(12 * MIB) as usize].fill(0);
        assert!(read_image(&img) == expect, "before close");
        img.close().unwrap();
    }
    let img = Image::open(&child, &OpenOptions::new().gate(backing_gate())).unwrap();
    assert_eq!(
        img.driver().backing().map(|b| b.name.as_str()),
        Some("base.vhdx")
    );
    let got = read_image(&img);
    if let Some(i) = got.iter().zip(&expect).position(|(a, b)| a != b) {
        panic!("byte {i}: {:#04x} != {:#04x}", got[i], expect[i]);
    }
    // Sectors the child does not hold come from the parent.
    let st = img.block_status(3 * MIB + 8192, 512).unwrap();
    assert_eq!(st.depth, 1, "{st:?}");
    let st = img.block_status(3 * MIB + 77, 1).unwrap();
    assert_eq!((st.depth, st.kind), (0, BlockKind::Data));
    // The default gate refuses to open the parent.
    let e = Image::open(&child, &OpenOptions::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

#[test]
fn child_records_the_parent_data_write_guid_and_detects_a_changed_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    qemu_create(&base, "vhdx", "", 4 * MIB);
    let child = dir.path().join("sub").join("child.vhdx");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    // An absolute parent name is stored relative to the child's folder.
    let copts = opts("", 4 * MIB).backing(BackingSpec {
        name: base.to_str().unwrap().into(),
        format: Some(Format::Vhdx),
    });
    Image::create(&child, Format::Vhdx, &copts)
        .unwrap()
        .close()
        .unwrap();
    let gate = || backing_gate().confine_to(dir.path());
    let parent_guid = {
        let p = open_ro(&base).unwrap();
        p.driver()
            .as_any()
            .downcast_ref::<VhdxDriver>()
            .unwrap()
            .data_write_guid()
    };
    {
        let c = Image::open(&child, &OpenOptions::new().gate(gate())).unwrap();
        assert_eq!(
            c.driver().backing().map(|b| b.name.as_str()),
            Some("../base.vhdx")
        );
        let d = c.driver().as_any().downcast_ref::<VhdxDriver>().unwrap();
        assert_eq!(d.linkages().unwrap(), vec![parent_guid]);
    }
    // Writing to the parent renews its DataWriteGuid: the child no longer matches.
    let p = open_rw(&base).unwrap();
    p.write_at(b"changed", 0).unwrap();
    p.close().unwrap();
    let e = Image::open(&child, &OpenOptions::new().gate(gate())).unwrap_err();
    assert!(e.to_string().contains("parent changed"), "{e}");
}

#[test]
fn differencing_parent_must_be_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![0u8; 2 * MIB as usize]).unwrap();
    let copts = opts("", 2 * MIB).backing(BackingSpec {
        name: "base.raw".into(),
        format: None,
    });
    assert!(Image::create(&dir.path().join("c.vhdx"), Format::Vhdx, &copts).is_err());
    let copts = opts("", 2 * MIB).backing(BackingSpec {
        name: "json:{}".into(),
        format: None,
    });
    let e = Image::create(&dir.path().join("d.vhdx"), Format::Vhdx, &copts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

#[test]
fn parent_locator_naming_a_host_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A parent whose name has as many characters as "/etc/passwd".
    let base = dir.path().join("abcdefghijk");
    qemu_create(&base, "vhdx", "", 4 * MIB);
    let child = dir.path().join("child.vhdx");
    let copts = opts("", 4 * MIB).backing(BackingSpec {
        name: "abcdefghijk".into(),
        format: Some(Format::Vhdx),
    });
    Image::create(&child, Format::Vhdx, &copts)
        .unwrap()
        .close()
        .unwrap();
    let mut bytes = read_file(&child);
    let from: Vec<u8> = "abcdefghijk"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let to: Vec<u8> = "/etc/passwd"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("locator value");
    bytes[at..at + to.len()].copy_from_slice(&to);
    std::fs::write(&child, &bytes).unwrap();
    let img = open_ro_skip(&child);
    assert_eq!(
        img.driver().backing().map(|b| b.name.as_str()),
        Some("/etc/passwd")
    );
    let e = Image::open(&child, &OpenOptions::new().gate(backing_gate())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

fn open_ro_skip(p: &Path) -> Image {
    Image::open(p, &OpenOptions::new().backing(vmi_disk::BackingMode::Skip)).unwrap()
}

/// A small qemu-written image with data, for the hostile tests.
fn hostile_base(dir: &Path) -> PathBuf {
    let raw = dir.join("h.raw");
    scattered_raw(&raw, 4 * MIB, 8, 31);
    let img = dir.join("h.vhdx");
    qemu_convert(&raw, "raw", &img, "vhdx", "block_size=1M", &[]);
    img
}

fn patched(dir: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = read_file(&hostile_base(dir));
    f(&mut b);
    let p = dir.join(name);
    std::fs::write(&p, &b).unwrap();
    p
}

fn fix_crc(b: &mut [u8], at: usize, len: usize) {
    b[at + 4..at + 8].fill(0);
    let c = crc32c::crc32c(&b[at..at + len]);
    b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
}

const REGIONS: [usize; 2] = [192 * 1024, 256 * 1024];

#[test]
fn truncated_images_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for len in [100, 100 * 1024, 3 * MIB as usize] {
        let p = patched(dir.path(), "t.vhdx", |b| b.truncate(len));
        let e = open_ro(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{len}: {e}");
    }
}

#[test]
fn one_bad_header_is_survived_and_two_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = patched(dir.path(), "one.vhdx", |b| b[64 * 1024 + 200] ^= 1);
    open_ro(&p).unwrap();
    let p = patched(dir.path(), "two.vhdx", |b| {
        b[64 * 1024 + 200] ^= 1;
        b[128 * 1024 + 200] ^= 1;
    });
    let e = open_ro(&p).unwrap_err();
    assert!(e.to_string().contains("no valid vhdx header"), "{e}");
}

#[test]
fn unknown_required_region_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = patched(dir.path(), "r.vhdx", |b| {
        for at in REGIONS {
            let n = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
            let e = at + 16 + 32 * n;
            b[e..e + 16].copy_from_slice(&Uuid::new_v4().to_bytes_le());
            b[e + 16..e + 24].copy_from_slice(&(5 * MIB).to_le_bytes());
            b[e + 24..e + 28].copy_from_slice(&(MIB as u32).to_le_bytes());
            b[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
            b[at + 8..at + 12].copy_from_slice(&(n as u32 + 1).to_le_bytes());
            fix_crc(b, at, 64 * 1024);
        }
    });
    let e = open_ro(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("unknown required region"), "{e}");
}

#[test]
fn bat_beyond_the_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = patched(dir.path(), "b.vhdx", |b| {
        for at in REGIONS {
            b[at + 32..at + 40].copy_from_slice(&(1024 * MIB).to_le_bytes());
            fix_crc(b, at, 64 * 1024);
        }
    });
    let e = open_ro(&p).unwrap_err();
    assert!(e.to_string().contains("beyond the end of the file"), "{e}");
}

#[test]
fn bat_entry_beyond_the_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = patched(dir.path(), "e.vhdx", |b| {
        let bat = 2 * MIB as usize;
        b[bat..bat + 8].copy_from_slice(&((4096 * MIB) | 6).to_le_bytes());
    });
    let e = open_ro(&p).unwrap_err();
    assert!(e.to_string().contains("BAT entry 0"), "{e}");
}

#[test]
fn huge_virtual_size_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = patched(dir.path(), "s.vhdx", |b| {
        let meta = 3 * MIB as usize;
        let id = uuid::uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8").to_bytes_le();
        let e = (0..5)
            .map(|i| meta + 32 + 32 * i)
            .find(|&e| b[e..e + 16] == id)
            .expect("virtual size entry");
        let off = meta + u32::from_le_bytes(b[e + 16..e + 20].try_into().unwrap()) as usize;
        b[off..off + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    });
    let e = open_ro(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = read_file(&hostile_base(dir.path()));
    // Mutate where the structures are: header section, BAT start, metadata table and items.
    let hot: [(usize, usize); 3] = [
        (0, 320 * 1024),
        (2 * MIB as usize, 8192),
        (3 * MIB as usize, 64 * 1024 + 512),
    ];
    let mut rng = StdRng::seed_from_u64(0x7668_6478);
    let mut opened = 0;
    for round in 0..2000 {
        let mut b = base.clone();
        for _ in 0..rng.gen_range(1..=8) {
            let (start, len) = hot[rng.gen_range(0..hot.len())];
            let at = start + rng.gen_range(0..len);
            b[at] = rng.gen();
        }
        if round % 2 == 0 {
            // Keep checksums valid so the mutation reaches the deeper parsers.
            for at in [64 * 1024, 128 * 1024] {
                fix_crc(&mut b, at, 4096);
            }
            for at in REGIONS {
                fix_crc(&mut b, at, 64 * 1024);
            }
        }
        if round % 5 == 0 {
            b.truncate(rng.gen_range(0..b.len()));
        }
        opened += usize::from(vmi_disk::fuzzing::exercise(Some(Format::Vhdx), &b));
        if round % 10 == 3 {
            // Writable opens replay logs and allocate: they must not panic either.
            let storage = Box::new(vmi_disk::storage::MemStorage::from_bytes(b));
            let img = Image::from_storage(
                storage,
                Path::new("m.vhdx"),
                Some(Format::Vhdx),
                true,
                &Gate::deny_all(),
            );
            if let Ok(img) = img {
                let size = img.virtual_size();
                for off in [0, size / 3, size.saturating_sub(4096)] {
                    let n = 4096.min(size - off.min(size));
                    let _ = img.write_at(&vec![0x5a; n as usize], off);
                }
                let _ = img.write_zeroes(0, size.min(2 * MIB));
                let _ = img.close();
            }
        }
    }
    // Enough mutants must get past the checksums for the test to mean anything.
    assert!(opened > 100, "only {opened} mutants opened");
}

#[test]
fn log_written_for_a_longer_file_is_rejected_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let img = hostile_base(dir.path());
    let (hoff, mut hdr) = current_header(&img);
    let log_offset = u64::from_le_bytes(hdr[72..80].try_into().unwrap());
    let guid = Uuid::new_v4();
    let file_len = std::fs::metadata(&img).unwrap().len();
    let entry = encode_entry(
        guid,
        1,
        0,
        file_len + MIB,
        &[LogWrite::Zero {
            offset: 2 * MIB,
            len: 4096,
        }],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&entry, log_offset).unwrap();
    hdr[48..64].copy_from_slice(&guid.to_bytes_le());
    rewrite_with_crc(&img, hoff, hdr);
    for e in [open_ro(&img).unwrap_err(), open_rw(&img).unwrap_err()] {
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}

#[test]
fn grown_images_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 6 * MIB + 512, 12, 41);
    for (i, o) in ["block_size=1M", "subformat=fixed,block_size=1M"]
        .iter()
        .enumerate()
    {
        let img = dir.path().join(format!("g{i}.vhdx"));
        vmi_convert(&raw, &img, o);
        let im = open_rw(&img).unwrap();
        im.resize(40 * MIB).unwrap();
        im.write_at(b"tail", 40 * MIB - 4).unwrap();
        im.close().unwrap();
        let grown = dir.path().join(format!("g{i}.raw"));
        std::fs::copy(&raw, &grown).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&grown)
            .unwrap();
        f.set_len(40 * MIB).unwrap();
        f.write_all_at(b"tail", 40 * MIB - 4).unwrap();
        assert_eq!(
            qemu_info(&img, "vhdx")["virtual-size"].as_u64(),
            Some(40 * MIB)
        );
        assert_qemu_check_clean(&img, "vhdx");
        assert_qemu_identical(&img, "vhdx", &grown, "raw");
    }
}

#[test]
fn log_entries_written_by_qemu_replay() {
    // qemu updates the BAT through its log and clears the LogGuid once the entry is applied; the
    // entry stays in the log. Point the header back at it and lose the BAT sector it rewrote: only
    // a correct replay of qemu's own entry brings the data back.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("qlog.vhdx");
    qemu_create(&img, "vhdx", "block_size=1M", 16 * MIB);
    vmi_testkit::qemu::qemu_io(&img, "vhdx", "write -P 0xab 1M 64k");
    vmi_testkit::qemu::qemu_io(&img, "vhdx", "write -P 0xcd 5M 4k");
    let raw = dir.path().join("expect.raw");
    let mut expect = vec![0u8; 16 * MIB as usize];
    expect[MIB as usize..(MIB + 65536) as usize].fill(0xab);
    expect[5 * MIB as usize..(5 * MIB + 4096) as usize].fill(0xcd);
    std::fs::write(&raw, &expect).unwrap();

    let (hoff, mut hdr) = current_header(&img);
    let log_offset = u64::from_le_bytes(hdr[72..80].try_into().unwrap());
    let log_len = u64::from(u32::from_le_bytes(hdr[68..72].try_into().unwrap()));
    let bytes = read_file(&img);
    let (mut best_seq, mut guid, mut target) = (0u64, [0u8; 16], 0u64);
    for at in (log_offset..log_offset + log_len).step_by(4096) {
        let e = &bytes[at as usize..at as usize + 4096];
        let seq = u64::from_le_bytes(e[16..24].try_into().unwrap());
        if &e[..4] == b"loge" && seq > best_seq {
            best_seq = seq;
            guid.copy_from_slice(&e[32..48]);
            // The first descriptor's file offset: the BAT sector qemu rewrote.
            target = u64::from_le_bytes(e[80..88].try_into().unwrap());
        }
    }
    assert!(best_seq > 0, "qemu left no log entry");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0u8; 4096], target).unwrap();
    hdr[48..64].copy_from_slice(&guid);
    rewrite_with_crc(&img, hoff, hdr);

    assert_image_matches_raw(&open_ro(&img).unwrap(), &raw);
    open_rw(&img).unwrap().close().unwrap();
    assert_qemu_check_clean(&img, "vhdx");
    assert_qemu_identical(&img, "vhdx", &raw, "raw");
}
