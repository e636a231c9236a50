//! cloop: V2.0 images built here (the shell preamble, block size, count, offsets table, zlib
//! blocks) read as `qemu-img convert -O raw` reads them; hostile headers with one corrupted field
//! each; probing. (Debian no longer ships `create_compressed_fs`, so the fixtures are built in
//! code from the format.)

use std::fs;
use std::io::Write;
use std::path::Path;
use vmi_disk::storage::MemStorage;
use vmi_disk::{probe, BlockKind, ErrorKind, Format, Image, OpenOptions};
use vmi_testkit::fixtures::{pattern, read_file, read_image};
use vmi_testkit::qemu::{qemu_img_status, qemu_info};

const PREAMBLE: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

fn zlib(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

/// A cloop image of `blocks` blocks of `bs` bytes; returns (image, guest bytes).
fn cloop(bs: usize, blocks: usize) -> (Vec<u8>, Vec<u8>) {
    let mut guest = Vec::new();
    let mut compressed = Vec::new();
    for i in 0..blocks {
        let mut d = pattern(i as u64, bs);
        // Some all-zero blocks and some compressible runs.
        match i % 3 {
            0 => d.fill(0),
            1 => d[..bs / 2].fill(b'c'),
            _ => {}
        }
        compressed.push(zlib(&d));
        guest.extend_from_slice(&d);
    }
    let mut img = PREAMBLE.to_vec();
    img.resize(128, 0);
    img.extend_from_slice(&(bs as u32).to_be_bytes());
    img.extend_from_slice(&(blocks as u32).to_be_bytes());
    let mut off = (136 + 8 * (blocks + 1)) as u64;
    for c in &compressed {
        img.extend_from_slice(&off.to_be_bytes());
        off += c.len() as u64;
    }
    img.extend_from_slice(&off.to_be_bytes());
    for c in &compressed {
        img.extend_from_slice(c);
    }
    (img, guest)
}

fn open(path: &Path) -> vmi_disk::Result<Image> {
    Image::open(path, &OpenOptions::new().format(Some(Format::Cloop)))
}

/// `qemu-img convert -f cloop -O raw`: the bytes, or qemu's error.
fn qemu_reads(path: &Path) -> Result<Vec<u8>, String> {
    let out = path.with_extension("qemu.raw");
    let (code, _, err) = qemu_img_status(&[
        "convert",
        "-f",
        "cloop",
        "-O",
        "raw",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    if code == 0 {
        Ok(read_file(&out))
    } else {
        Err(err)
    }
}

#[test]
fn cloop_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    for (bs, blocks) in [(64 * 1024, 11), (512, 3), (256 * 1024, 1)] {
        let (bytes, guest) = cloop(bs, blocks);
        let path = dir.path().join("a.cloop");
        fs::write(&path, &bytes).unwrap();
        let q = qemu_reads(&path).expect("qemu-img reads the fixture");
        assert!(q == guest, "qemu reads the fixture as built");
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        assert_eq!(img.format(), Format::Cloop);
        assert_eq!(
            Some(img.virtual_size()),
            qemu_info(&path, "cloop")["virtual-size"].as_u64()
        );
        assert!(read_image(&img) == guest, "{bs} x {blocks}");
        let st = img.block_status(img.virtual_size() - 7, 1).unwrap();
        assert_eq!(st.kind, BlockKind::Compressed);
    }
}

#[test]
fn probing_matches_the_v2_preamble() {
    let (bytes, _) = cloop(512, 2);
    assert_eq!(
        probe(&MemStorage::from_bytes(bytes.clone()))
            .unwrap()
            .format,
        Format::Cloop
    );
    let mut other = bytes;
    other[12] = b'3';
    assert_ne!(
        probe(&MemStorage::from_bytes(other)).unwrap().format,
        Format::Cloop
    );
}

#[test]
fn writable_opens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = cloop(512, 2);
    let path = dir.path().join("w.cloop");
    fs::write(&path, &bytes).unwrap();
    let e = Image::open(
        &path,
        &OpenOptions::new().format(Some(Format::Cloop)).write(true),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
}

fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn set64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// One corrupted field per case: qemu refuses it too, vmi names the problem.
#[test]
fn hostile_headers_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = cloop(4096, 4);
    let path = dir.path().join("h.cloop");
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, Corrupt, &str); 8] = [
        ("zero block size", |b| set32(b, 128, 0), "cannot be zero"),
        ("odd block size", |b| set32(b, 128, 1000), "multiple of 512"),
        (
            "huge block size",
            |b| set32(b, 128, 128 << 20),
            "MiB or less",
        ),
        (
            "huge count",
            |b| set32(b, 132, 0x1fff_ffff),
            "offsets table",
        ),
        (
            "table past the end",
            |b| set32(b, 132, 1000),
            "past the end",
        ),
        (
            "decreasing offsets",
            |b| set64(b, 136 + 16, 0),
            "monotonically",
        ),
        (
            "huge compressed block",
            |b| set64(b, 136 + 32, 1 << 40),
            "larger than",
        ),
        (
            "blocks past the end",
            |b| {
                let end = b.len() as u64 + 1;
                set64(b, 136 + 32, end)
            },
            "beyond the end",
        ),
    ];
    for (what, corrupt, needle) in cases {
        let mut b = good.clone();
        corrupt(&mut b);
        fs::write(&path, &b).unwrap();
        let e = open(&path).unwrap_err();
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
    // A corrupt zlib stream or a short block opens and fails the read, for qemu and vmi.
    for what in ["corrupt stream", "short block"] {
        let mut b = good.clone();
        let first = u64::from_be_bytes(b[136 + 8..136 + 16].try_into().unwrap()) as usize;
        if what == "corrupt stream" {
            b[first + 4] ^= 0xff;
            b[first + 5] ^= 0xff;
        } else {
            let d = zlib(&[7u8; 1024]);
            let second = u64::from_be_bytes(b[136 + 16..136 + 24].try_into().unwrap()) as usize;
            assert!(d.len() <= second - first);
            b[first..first + d.len()].copy_from_slice(&d);
        }
        fs::write(&path, &b).unwrap();
        let img = open(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(img.read_at(&mut buf, 4096).is_err(), "{what}");
        assert!(qemu_reads(&path).is_err(), "{what}: qemu fails too");
    }
    fs::write(&path, &good[..100]).unwrap();
    assert!(open(&path).is_err());
}

#[test]
fn seeded_mutations_of_an_image_never_panic() {
    let (base, _) = cloop(4096, 6);
    for i in 0..2000u64 {
        let mut b = base.clone();
        let r = pattern(i, 16);
        for k in 0..4 {
            let at = 128 + (usize::from(r[k * 2]) << 8 | usize::from(r[k * 2 + 1])) % 128;
            b[at] = r[8 + k];
        }
        vmi_disk::fuzzing::exercise(Some(Format::Cloop), &b);
    }
}
