//! VHD (qemu's `vpc`) against qemu-img in both directions, differencing disks, and hostile
//! images. Fixtures are generated in temporary directories.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use vmi_disk::{
    BackingMode, BackingSpec, CreateOptions, ErrorKind, Format, FormatOptions, Gate, Image,
    OpenOptions,
};
use vmi_testkit::conformance::{run, Caps};
use vmi_testkit::fixtures::{
    assert_image_matches_raw, pattern, read_file, read_image, scattered_raw,
};
use vmi_testkit::qemu::{assert_qemu_identical, qemu_convert, qemu_create, qemu_info, qemu_io};

const MIB: u64 = 1 << 20;

fn opts(o: &str, size: u64) -> CreateOptions {
    let mut fo = FormatOptions::new();
    fo.parse(o).unwrap();
    CreateOptions::new(size).options(fo)
}

fn open(path: &Path) -> Image {
    Image::open(path, &OpenOptions::new()).unwrap()
}

fn qemu_size(path: &Path) -> u64 {
    qemu_info(path, "vpc")["virtual-size"].as_u64().unwrap()
}

/// Copy a raw file into a new VHD made by vmi, skipping zero chunks as a converter would.
fn vmi_from_raw(raw: &Path, vhd: &Path, o: &str) {
    let src = Image::open(raw, &OpenOptions::new().format(Some(Format::Raw))).unwrap();
    let dst = Image::create(vhd, Format::Vpc, &opts(o, src.virtual_size())).unwrap();
    let size = src.virtual_size();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        src.read_at(&mut buf[..n], off).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_at(&buf[..n], off).unwrap();
        }
        off += n as u64;
    }
    dst.close().unwrap();
}

fn set_checksum(bytes: &mut [u8], start: usize, len: usize, at: usize) {
    bytes[start + at..start + at + 4].fill(0);
    let sum: u32 = bytes[start..start + len]
        .iter()
        .fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
    bytes[start + at..start + at + 4].copy_from_slice(&(!sum).to_be_bytes());
}

/// Re-checksum both footers (offset 0 and end) and the dynamic header at 512.
fn fix_checksums(bytes: &mut [u8]) {
    let n = bytes.len();
    set_checksum(bytes, 0, 512, 64);
    set_checksum(bytes, n - 512, 512, 64);
    set_checksum(bytes, 512, 1024, 36);
}

#[test]
fn dynamic_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Vpc,
        "subformat=dynamic,force_size=on",
        Caps {
            random_writes: true,
            grow: true,
        },
    );
}

#[test]
fn fixed_conforms() {
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        Format::Vpc,
        "subformat=fixed,force_size=on",
        Caps {
            random_writes: true,
            grow: true,
        },
    );
}

#[test]
fn vmi_reads_what_qemu_writes_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 48 * MIB + 4096, 40, 11);
    for o in [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=dynamic,force_size=on",
        "subformat=fixed,force_size=on",
    ] {
        let vhd = dir.path().join("q.vhd");
        let _ = std::fs::remove_file(&vhd);
        qemu_convert(&raw, "raw", &vhd, "vpc", o, &[]);
        let img = open(&vhd);
        assert_eq!(img.format(), Format::Vpc, "{o}: probed format");
        assert_eq!(img.virtual_size(), qemu_size(&vhd), "{o}");
        let got = read_image(&img);
        let expect = read_file(&raw);
        assert!(got.len() >= expect.len(), "{o}");
        assert!(got[..expect.len()] == expect[..], "{o}: content differs");
        assert!(got[expect.len()..].iter().all(|&b| b == 0), "{o}: tail");
    }
}

#[test]
fn vmi_reads_qemu_sizes_that_are_and_are_not_chs_exact() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        (1u64 << 30, true),
        (1000 * MIB, true),
        (4095 * MIB, true),
        (511 * MIB + 7 * 512, true),
        (127 << 30, false), // dynamic only: a fixed one would be a 127 GiB sparse file
    ];
    for (size, fixed_too) in sizes {
        for sub in ["dynamic", "fixed"] {
            if sub == "fixed" && !fixed_too {
                continue;
            }
            for force in ["off", "on"] {
                let o = format!("subformat={sub},force_size={force}");
                let vhd = dir.path().join("s.vhd");
                let _ = std::fs::remove_file(&vhd);
                qemu_create(&vhd, "vpc", &o, size);
                qemu_io(&vhd, "vpc", "write -P 0xab 0 64k");
                qemu_io(
                    &vhd,
                    "vpc",
                    &format!("write -P 0xcd {} 4k", size / 2 / 512 * 512),
                );
                let img = open(&vhd);
                assert_eq!(img.virtual_size(), qemu_size(&vhd), "{o} {size}");
                let mut b = vec![0u8; 65536];
                img.read_at(&mut b, 0).unwrap();
                assert!(b.iter().all(|&x| x == 0xab), "{o} {size}");
                let mut b = vec![0u8; 4096];
                img.read_at(&mut b, size / 2 / 512 * 512).unwrap();
                assert!(b.iter().all(|&x| x == 0xcd), "{o} {size}");
                img.read_at(&mut b, img.virtual_size() - 4096).unwrap();
                assert!(b.iter().all(|&x| x == 0), "{o} {size}");
                let info = img.driver().info();
                let expect_cluster = (sub == "dynamic").then_some(2 * MIB);
                assert_eq!(info.cluster_size, expect_cluster, "{o}");
            }
        }
    }
}

#[test]
fn qemu_reads_what_vmi_writes_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    scattered_raw(&raw, 40 * MIB + 512 * 3, 40, 5);
    for o in [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=dynamic,force_size=on",
        "subformat=fixed,force_size=on",
    ] {
        let vhd = dir.path().join("v.vhd");
        let _ = std::fs::remove_file(&vhd);
        vmi_from_raw(&raw, &vhd, o);
        assert_qemu_identical(&vhd, "vpc", &raw, "raw");
        let img = open(&vhd);
        assert_eq!(img.virtual_size(), qemu_size(&vhd), "{o}");
        if o.contains("force_size=on") {
            assert_eq!(img.virtual_size(), 40 * MIB + 512 * 3, "{o}");
        }
    }
}

#[test]
fn vmi_sizes_match_qemu_to_the_byte() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        0,
        512,
        1_000_000,
        10 * MIB,
        511 * MIB + 7 * 512,
        1000 * MIB,
        1 << 30,
        4095 * MIB,
        127 << 30,
        200 << 30,
    ];
    for size in sizes {
        for force in ["off", "on"] {
            let o = format!("subformat=dynamic,force_size={force}");
            let q = dir.path().join("q.vhd");
            let v = dir.path().join("v.vhd");
            let _ = std::fs::remove_file(&q);
            let _ = std::fs::remove_file(&v);
            qemu_create(&q, "vpc", &o, size);
            Image::create(&v, Format::Vpc, &opts(&o, size))
                .unwrap()
                .close()
                .unwrap();
            assert_eq!(qemu_size(&v), qemu_size(&q), "{o} {size}");
            assert_eq!(open(&v).virtual_size(), qemu_size(&q), "{o} {size}");
            // Same layout as qemu: footer copy, header, BAT, footer.
            assert_eq!(
                std::fs::metadata(&v).unwrap().len(),
                std::fs::metadata(&q).unwrap().len(),
                "{o} {size}: file length"
            );
        }
    }
    for size in [1_000_000, 10 * MIB, 511 * MIB + 7 * 512] {
        for force in ["off", "on"] {
            let o = format!("subformat=fixed,force_size={force}");
            let q = dir.path().join("qf.vhd");
            let v = dir.path().join("vf.vhd");
            let _ = std::fs::remove_file(&q);
            let _ = std::fs::remove_file(&v);
            qemu_create(&q, "vpc", &o, size);
            Image::create(&v, Format::Vpc, &opts(&o, size))
                .unwrap()
                .close()
                .unwrap();
            assert_eq!(qemu_size(&v), qemu_size(&q), "{o} {size}");
            assert_eq!(
                std::fs::metadata(&v).unwrap().len(),
                std::fs::metadata(&q).unwrap().len(),
                "{o} {size}: file length"
            );
        }
    }
}

/// Parent with data in blocks 0 and 2 only (so qemu, which ignores the parent, can compare the
/// child against the flattened content: every block the parent fills, the child copies).
fn differencing_fixture(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let size = 16 * MIB;
    let parent = dir.join("parent.vhd");
    let mut expect = vec![0u8; size as usize];
    {
        let p = Image::create(&parent, Format::Vpc, &opts("force_size=on", size)).unwrap();
        for (off, len, seed) in [(0u64, 2 * MIB, 1u64), (4 * MIB + 512, 100_000, 2)] {
            let d = pattern(seed, len as usize);
            p.write_at(&d, off).unwrap();
            expect[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        p.close().unwrap();
    }
    let child = dir.join("child.vhd");
    {
        let o = opts("", size).backing(BackingSpec {
            name: "parent.vhd".into(),
            format: Some(Format::Vpc),
        });
        let mut c = Image::create(&child, Format::Vpc, &o).unwrap();
        assert_eq!(c.virtual_size(), size);
        c.set_backing(Some(open(&parent)));
        for (off, len, seed) in [
            (4096u64, 8192u64, 3u64),
            (4 * MIB + 50_000, 1000, 4),
            (10 * MIB, 2 * MIB, 5),
            (14 * MIB + 7, 33, 6),
        ] {
            let d = pattern(seed, len as usize);
            c.write_at(&d, off).unwrap();
            expect[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        c.write_zeroes(4 * MIB + 60_000, 1000).unwrap();
        expect[(4 * MIB + 60_000) as usize..(4 * MIB + 61_000) as usize].fill(0);
        c.close().unwrap();
    }
    (child, expect)
}

#[test]
fn differencing_child_reads_through_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (child, expect) = differencing_fixture(dir.path());
    let img = Image::open(
        &child,
        &OpenOptions::new().gate(Gate::new().allow_backing(true)),
    )
    .unwrap();
    assert_eq!(img.chain_len(), 2);
    assert_eq!(img.driver().backing().unwrap().name, "parent.vhd");
    let got = read_image(&img);
    if let Some(i) = got.iter().zip(&expect).position(|(a, b)| a != b) {
        panic!("byte {i}: {:#04x} != {:#04x}", got[i], expect[i]);
    }
    // qemu reads the child as a dynamic disk; every block the parent fills was copied up.
    let raw = dir.path().join("expect.raw");
    std::fs::write(&raw, &expect).unwrap();
    assert_qemu_identical(&child, "vpc", &raw, "raw");
}

#[test]
fn differencing_child_needs_the_gate_to_allow_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _) = differencing_fixture(dir.path());
    let e = Image::open(&child, &OpenOptions::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

#[test]
fn differencing_child_refuses_a_parent_with_another_unique_id() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _) = differencing_fixture(dir.path());
    // Another disk put at the parent's name: same size, different Unique Id.
    let parent = dir.path().join("parent.vhd");
    std::fs::remove_file(&parent).unwrap();
    Image::create(&parent, Format::Vpc, &opts("force_size=on", 16 * MIB))
        .unwrap()
        .close()
        .unwrap();
    let e = Image::open(
        &child,
        &OpenOptions::new().gate(Gate::new().allow_backing(true)),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("child.vhd") && msg.contains("Parent Unique ID"),
        "{msg}"
    );
    // Without the chain the child still opens on its own.
    Image::open(&child, &OpenOptions::new().backing(BackingMode::Skip)).unwrap();
}

#[test]
fn cleared_bitmap_bits_of_a_differencing_disk_read_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (child, mut expect) = differencing_fixture(dir.path());
    // Hand-edit the child: block 0's sectors 8..16 (4 KiB..8 KiB) go back to the parent.
    let mut bytes = read_file(&child);
    let bat = 1536;
    let entry = u32::from_be_bytes(bytes[bat..bat + 4].try_into().unwrap()) as usize * 512;
    bytes[entry + 1] = 0x00;
    std::fs::write(&child, &bytes).unwrap();
    let parent = open(&dir.path().join("parent.vhd"));
    let mut from_parent = vec![0u8; 4096];
    parent.read_at(&mut from_parent, 4096).unwrap();
    expect[4096..8192].copy_from_slice(&from_parent);
    let img = Image::open(
        &child,
        &OpenOptions::new().gate(Gate::new().allow_backing(true)),
    )
    .unwrap();
    let got = read_image(&img);
    assert!(got == expect);
    let st = img.block_status(4096, 4096).unwrap();
    assert_eq!(
        st.depth, 1,
        "sectors with cleared bits come from the parent"
    );
}

#[test]
fn hostile_parent_locator_naming_etc_passwd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _) = differencing_fixture(dir.path());
    let mut bytes = read_file(&child);
    // Point the relative locator (W2ru, slot 0) at /etc/passwd, padded with NULs.
    let off = u64::from_be_bytes(bytes[512 + 576 + 16..512 + 576 + 24].try_into().unwrap());
    let len = u32::from_be_bytes(bytes[512 + 576 + 8..512 + 576 + 12].try_into().unwrap());
    let name: Vec<u8> = "/etc/passwd"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    assert!(name.len() <= len as usize);
    let field = &mut bytes[off as usize..off as usize + len as usize];
    field.fill(0);
    field[..name.len()].copy_from_slice(&name);
    std::fs::write(&child, &bytes).unwrap();
    let e = Image::open(
        &child,
        &OpenOptions::new().gate(Gate::new().allow_backing(true)),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
}

fn small_dynamic(dir: &Path) -> Vec<u8> {
    let p = dir.join("small.vhd");
    let img = Image::create(&p, Format::Vpc, &opts("force_size=on", 2 * MIB + 8192)).unwrap();
    img.write_at(&pattern(9, 7_000), 2 * MIB - 1000).unwrap();
    img.close().unwrap();
    read_file(&p)
}

/// A differencing child (one block copied up) of [`small_dynamic`].
fn small_differencing(dir: &Path) -> Vec<u8> {
    let dir = &dir.join("diff");
    std::fs::create_dir(dir).unwrap();
    small_dynamic(dir);
    let p = dir.join("small-child.vhd");
    let o = opts("", 2 * MIB + 8192).backing(BackingSpec {
        name: "small.vhd".into(),
        format: Some(Format::Vpc),
    });
    let mut img = Image::create(&p, Format::Vpc, &o).unwrap();
    img.set_backing(Some(open(&dir.join("small.vhd"))));
    img.write_at(&pattern(10, 3000), 2 * MIB + 100).unwrap();
    img.close().unwrap();
    read_file(&p)
}

fn open_bytes(dir: &Path, bytes: &[u8]) -> vmi_disk::Result<Image> {
    let p = dir.join("hostile.vhd");
    std::fs::write(&p, bytes).unwrap();
    let img = Image::open(&p, &OpenOptions::new().format(Some(Format::Vpc)))?;
    // Everything that opens must also read without panicking.
    let mut buf = vec![0u8; 4096];
    let _ = img.read_at(&mut buf, 0);
    Ok(img)
}

#[test]
fn hostile_images_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_dynamic(dir.path());
    assert!(open_bytes(dir.path(), &good).is_ok());
    let n = good.len();

    // Truncated: the allocated block no longer fits.
    let e = open_bytes(dir.path(), &good[..n / 2]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let e = open_bytes(dir.path(), &good[..300]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");

    // Wrong checksum on both footers.
    let mut b = good.clone();
    b[n - 512 + 40] ^= 1;
    b[40] ^= 1;
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");

    // BAT entry beyond the file.
    let mut b = good.clone();
    b[1536..1540].copy_from_slice(&0x7fff_0000u32.to_be_bytes());
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(e.to_string().contains("beyond"), "{e}");

    // Block size 0 and huge.
    for bs in [0u32, 0x8000_0000] {
        let mut b = good.clone();
        b[512 + 32..512 + 36].copy_from_slice(&bs.to_be_bytes());
        fix_checksums(&mut b);
        let e = open_bytes(dir.path(), &b).unwrap_err();
        assert!(e.to_string().contains("block size"), "{bs}: {e}");
    }

    // Max table entries huge.
    let mut b = good.clone();
    b[512 + 28..512 + 32].copy_from_slice(&u32::MAX.to_be_bytes());
    fix_checksums(&mut b);
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Limit, "{e}");

    // Header checksum wrong.
    let mut b = good.clone();
    b[512 + 60] ^= 1;
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(e.to_string().contains("dynamic disk header"), "{e}");

    // Header offset beyond the file.
    let mut b = good.clone();
    for at in [0, n - 512] {
        b[at + 16..at + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
    }
    fix_checksums(&mut b);
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(e.to_string().contains("header"), "{e}");

    // A fixed footer claiming more data than the file holds.
    let f = dir.path().join("f.vhd");
    Image::create(&f, Format::Vpc, &opts("subformat=fixed,force_size=on", MIB))
        .unwrap()
        .close()
        .unwrap();
    let mut b = read_file(&f);
    let m = b.len();
    b[m - 512 + 48..m - 512 + 56].copy_from_slice(&(64 * MIB).to_be_bytes());
    set_checksum(&mut b, m - 512, 512, 64);
    let e = open_bytes(dir.path(), &b).unwrap_err();
    assert!(e.to_string().contains("holds only"), "{e}");
}

#[test]
fn fixed_vhds_are_probed_only_when_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f.vhd");
    Image::create(&f, Format::Vpc, &opts("subformat=fixed,force_size=on", MIB))
        .unwrap()
        .close()
        .unwrap();
    assert_eq!(open(&f).format(), Format::Vpc);
    // A raw disk that happens to end with a fixed footer of another size stays raw.
    let mut b = read_file(&f);
    let footer = b.split_off(b.len() - 512);
    b.extend_from_slice(&vec![0u8; 8192]);
    b.extend_from_slice(&footer);
    std::fs::write(&f, &b).unwrap();
    assert_eq!(open(&f).format(), Format::Raw);
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_dynamic(dir.path());
    let diff = small_differencing(dir.path());
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for i in 0..2000 {
        let src = if i % 4 == 0 { &diff } else { &base };
        let mut b = src.clone();
        let n = b.len();
        for _ in 0..rng.gen_range(1..=4) {
            // Mostly metadata: footer copy, header, BAT, locators, bitmaps; sometimes the end.
            let at = match rng.gen_range(0..4) {
                0 => n - 512 + rng.gen_range(0..512),
                1 => rng.gen_range(0..n),
                _ => rng.gen_range(0..4096.min(n)),
            };
            b[at] = rng.gen();
        }
        if rng.gen_bool(0.5) {
            fix_checksums(&mut b);
        }
        if rng.gen_bool(0.05) {
            b.truncate(rng.gen_range(0..n));
        }
        vmi_disk::fuzzing::exercise(Some(Format::Vpc), &b);
        if i % 8 == 0 {
            vmi_disk::fuzzing::exercise(None, &b);
        }
    }
}

#[test]
fn vmi_reads_qemu_fixed_images_through_the_probe_and_matches_raw() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    scattered_raw(&raw, 8 * MIB, 10, 3);
    let vhd = dir.path().join("r.vhd");
    qemu_convert(
        &raw,
        "raw",
        &vhd,
        "vpc",
        "subformat=fixed,force_size=on",
        &[],
    );
    let img = open(&vhd);
    assert_eq!(img.format(), Format::Vpc);
    assert_image_matches_raw(&img, &raw);
}

#[test]
fn qemu_reads_vmi_images_after_growing() {
    let dir = tempfile::tempdir().unwrap();
    for o in [
        "subformat=dynamic,force_size=on",
        "subformat=fixed,force_size=on",
    ] {
        let vhd = dir.path().join("g.vhd");
        let raw = dir.path().join("g.raw");
        let _ = std::fs::remove_file(&vhd);
        let (small, big) = (4 * MIB, 300 * MIB);
        let head = pattern(21, 100_000);
        let tail = pattern(22, 70_000);
        {
            let img = Image::create(&vhd, Format::Vpc, &opts(o, small)).unwrap();
            img.write_at(&head, small - 100_000).unwrap();
            img.close().unwrap();
        }
        {
            let img = Image::open(&vhd, &OpenOptions::new().write(true)).unwrap();
            // 150 BAT entries no longer fit before the first block: the BAT moves.
            img.resize(big).unwrap();
            img.write_at(&tail, big - 70_000).unwrap();
            img.close().unwrap();
        }
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(big).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &head, small - 100_000).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &tail, big - 70_000).unwrap();
        assert_eq!(qemu_size(&vhd), big, "{o}");
        assert_qemu_identical(&vhd, "vpc", &raw, "raw");
        let img = open(&vhd);
        assert_eq!(img.virtual_size(), big, "{o}");
        for (off, expect) in [
            (small - 100_000, head.clone()),
            (big - 70_000, tail.clone()),
            (small, vec![0u8; 1 << 20]),
        ] {
            let mut got = vec![0u8; expect.len()];
            img.read_at(&mut got, off).unwrap();
            assert!(got == expect, "{o}: at {off}");
        }
    }
}
