//! bochs: growing redolog images built here from the format (header v1 and v2, catalog, a bitmap
//! per extent) read as `qemu-img convert -O raw` reads them (qemu-img cannot create bochs images);
//! hostile headers with one corrupted field each; probing.

use std::fs;
use std::path::Path;
use vmi_disk::storage::MemStorage;
use vmi_disk::{probe, BlockKind, ErrorKind, Format, Image, OpenOptions};
use vmi_testkit::fixtures::{pattern, read_file, read_image};
use vmi_testkit::qemu::{qemu_img_status, qemu_info};

const CATALOG: usize = 72;
const BITMAP: usize = 76;
const EXTENT: usize = 80;
const VERSION: usize = 64;
const DISK_V2: usize = 88;

/// Parameters of a fixture.
#[derive(Clone, Copy)]
struct Params {
    v1: bool,
    extent: usize,
    bitmap: usize,
    extents: usize,
    disk: u64,
}

/// A growing redolog: extents 0, 2 and the last allocated (in slots 2, 0, 1), with some sectors'
/// bits set. Returns (image, guest bytes).
fn bochs(p: Params) -> (Vec<u8>, Vec<u8>) {
    let mut img = vec![0u8; 512];
    img[..22].copy_from_slice(b"Bochs Virtual HD Image");
    img[32..39].copy_from_slice(b"Redolog");
    img[48..55].copy_from_slice(b"Growing");
    let version: u32 = if p.v1 { 0x10000 } else { 0x20000 };
    img[VERSION..VERSION + 4].copy_from_slice(&version.to_le_bytes());
    img[68..72].copy_from_slice(&512u32.to_le_bytes());
    img[CATALOG..CATALOG + 4].copy_from_slice(&(p.extents as u32).to_le_bytes());
    img[BITMAP..BITMAP + 4].copy_from_slice(&(p.bitmap as u32).to_le_bytes());
    img[EXTENT..EXTENT + 4].copy_from_slice(&(p.extent as u32).to_le_bytes());
    let disk_at = if p.v1 { 84 } else { DISK_V2 };
    img[disk_at..disk_at + 8].copy_from_slice(&p.disk.to_le_bytes());
    let mut catalog = vec![0xffff_ffffu32; p.extents];
    let allocated = [(0usize, 2u32), (2, 0), (p.extents - 1, 1)];
    for (e, slot) in allocated {
        catalog[e] = slot;
    }
    for c in &catalog {
        img.extend_from_slice(&c.to_le_bytes());
    }
    let bitmap_bytes = p.bitmap.div_ceil(512) * 512;
    let slot_len = bitmap_bytes + p.extent;
    let data_offset = img.len();
    img.resize(data_offset + 3 * slot_len, 0);
    let mut guest = vec![0u8; p.extents * p.extent];
    let sectors = p.extent / 512;
    for (n, (e, slot)) in allocated.into_iter().enumerate() {
        let base = data_offset + slot as usize * slot_len;
        let content = pattern(10 + n as u64, p.extent);
        for s in 0..sectors {
            // A varied set of written sectors: runs and gaps.
            if (s * 7 + n) % 5 < 3 || s == 0 {
                img[base + s / 8] |= 1 << (s % 8);
                let at = base + bitmap_bytes + s * 512;
                img[at..at + 512].copy_from_slice(&content[s * 512..(s + 1) * 512]);
                guest[e * p.extent + s * 512..e * p.extent + (s + 1) * 512]
                    .copy_from_slice(&content[s * 512..(s + 1) * 512]);
            } else {
                // Unwritten sectors hold junk that must not be read.
                let at = base + bitmap_bytes + s * 512;
                img[at..at + 512].fill(0xee);
            }
        }
    }
    guest.truncate(p.disk as usize / 512 * 512);
    (img, guest)
}

fn default_params() -> Params {
    Params {
        v1: false,
        extent: 32 * 1024,
        bitmap: 8,
        extents: 6,
        disk: 6 * 32 * 1024,
    }
}

fn open(path: &Path) -> vmi_disk::Result<Image> {
    Image::open(path, &OpenOptions::new().format(Some(Format::Bochs)))
}

/// `qemu-img convert -f bochs -O raw`: the bytes, or qemu's error.
fn qemu_reads(path: &Path) -> Result<Vec<u8>, String> {
    let out = path.with_extension("qemu.raw");
    let (code, _, err) = qemu_img_status(&[
        "convert",
        "-f",
        "bochs",
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
fn bochs_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = default_params();
    for p in [
        d,
        Params { v1: true, ..d },
        // A disk that ends inside its last extent, a bitmap larger than a sector.
        Params {
            extent: 1 << 20,
            bitmap: 600,
            extents: 4,
            disk: 3 * (1 << 20) + 4096,
            ..d
        },
        Params {
            extent: 4096,
            bitmap: 1,
            extents: 40,
            disk: 40 * 4096,
            ..d
        },
    ] {
        let (bytes, guest) = bochs(p);
        let path = dir.path().join("a.bochs");
        fs::write(&path, &bytes).unwrap();
        let q = qemu_reads(&path).expect("qemu-img reads the fixture");
        assert!(q == guest, "qemu reads the fixture as built");
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        assert_eq!(img.format(), Format::Bochs);
        assert_eq!(
            Some(img.virtual_size()),
            qemu_info(&path, "bochs")["virtual-size"].as_u64()
        );
        assert!(read_image(&img) == guest, "extent {}", p.extent);
    }
}

#[test]
fn map_follows_the_sector_bitmap() {
    let (bytes, _) = bochs(default_params());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.bochs");
    fs::write(&path, &bytes).unwrap();
    let img = open(&path).unwrap();
    let size = img.virtual_size();
    // Extent 0: sector 0 is written (bits 0..2 of the pattern), extent 1 is unallocated.
    assert_eq!(img.block_status(0, size).unwrap().kind, BlockKind::Data);
    let un = img.block_status(32 * 1024, size - 32 * 1024).unwrap();
    assert_eq!((un.kind, un.len), (BlockKind::Unallocated, 32 * 1024));
    let mut off = 0;
    while off < size {
        let st = img.block_status(off, size - off).unwrap();
        assert!(st.len > 0);
        off += st.len;
    }
}

#[test]
fn probing_needs_the_growing_redolog_header() {
    let (bytes, _) = bochs(default_params());
    assert_eq!(
        probe(&MemStorage::from_bytes(bytes.clone()))
            .unwrap()
            .format,
        Format::Bochs
    );
    // Another Bochs kind (an undoable redolog) is Bochs, refused when opened, never raw.
    let mut undoable = bytes;
    undoable[48..57].copy_from_slice(b"Undoable\0");
    assert_eq!(
        probe(&MemStorage::from_bytes(undoable.clone()))
            .unwrap()
            .format,
        Format::Bochs
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.bochs");
    fs::write(&path, &undoable).unwrap();
    let e = Image::open(&path, &OpenOptions::new()).unwrap_err();
    assert!(e.to_string().contains("not in Bochs format"), "{e}");
}

#[test]
fn writable_opens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = bochs(default_params());
    let path = dir.path().join("w.bochs");
    fs::write(&path, &bytes).unwrap();
    let e = Image::open(
        &path,
        &OpenOptions::new().format(Some(Format::Bochs)).write(true),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
}

fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// One corrupted field per case: qemu refuses it too (where it checks), vmi names the problem.
#[test]
fn hostile_headers_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = bochs(default_params());
    let path = dir.path().join("h.bochs");
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, Corrupt, &str); 8] = [
        ("version", |b| set32(b, VERSION, 3), "not in Bochs format"),
        (
            "huge catalog",
            |b| set32(b, CATALOG, 0x10_0001),
            "too large",
        ),
        ("small extent", |b| set32(b, EXTENT, 256), "at least 512"),
        ("odd extent", |b| set32(b, EXTENT, 3 * 4096), "power of two"),
        ("huge extent", |b| set32(b, EXTENT, 1 << 24), "too large"),
        ("catalog too small", |b| set32(b, CATALOG, 2), "too small"),
        (
            "catalog past the end",
            |b| set32(b, 68, 1 << 30),
            "beyond the end",
        ),
        (
            "disk size",
            |b| b[DISK_V2..DISK_V2 + 8].copy_from_slice(&u64::MAX.to_le_bytes()),
            "too small",
        ),
    ];
    for (what, corrupt, needle) in cases {
        let mut b = good.clone();
        corrupt(&mut b);
        fs::write(&path, &b).unwrap();
        let e = open(&path).unwrap_err();
        assert!(e.to_string().contains(needle), "{what}: {e}");
        if what != "catalog past the end" {
            assert!(qemu_reads(&path).is_err(), "{what}: qemu refuses too");
        }
    }
    // A catalog entry naming a slot past the end of the file fails the read, not the open.
    let mut b = good.clone();
    set32(&mut b, 512 + 4 * 2, 1000);
    fs::write(&path, &b).unwrap();
    let img = open(&path).unwrap();
    let mut buf = vec![0u8; 512];
    let e = img.read_at(&mut buf, 2 * 32 * 1024).unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    fs::write(&path, &good[..300]).unwrap();
    assert!(open(&path).is_err());
}

#[test]
fn seeded_mutations_of_an_image_never_panic() {
    let (base, _) = bochs(Params {
        extent: 4096,
        bitmap: 1,
        extents: 8,
        disk: 8 * 4096,
        ..default_params()
    });
    for i in 0..2000u64 {
        let mut b = base.clone();
        let r = pattern(i, 16);
        for k in 0..4 {
            // The header fields and the catalog.
            let at = 64 + (usize::from(r[k * 2]) << 8 | usize::from(r[k * 2 + 1])) % 480;
            b[at] = r[8 + k];
        }
        vmi_disk::fuzzing::exercise(Some(Format::Bochs), &b);
    }
}
