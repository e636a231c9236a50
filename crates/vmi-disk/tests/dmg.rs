//! DMG (UDIF): images built here from the format (koly trailer, XML property list or resource
//! fork, mish block tables, zero/raw/ignore/zlib/bzip2/lzfse chunks) read as `qemu-img convert -O
//! raw` reads them; hostile trailers and tables with one corrupted field each; probing.

use std::fs;
use std::io::Write;
use std::path::Path;
use vmi_disk::storage::{FileStorage, MemStorage};
use vmi_disk::{probe, BlockKind, ErrorKind, Format, Image, OpenOptions};
use vmi_testkit::fixtures::{pattern, read_file, read_image};
use vmi_testkit::qemu::{qemu_img_status, qemu_info};

/// One chunk of a fixture.
#[derive(Clone)]
enum Spec {
    Zero(u64),
    Ignore(u64),
    Raw(Vec<u8>),
    Zlib(Vec<u8>),
    Bzip2(Vec<u8>),
    Lzfse(Vec<u8>),
    Comment,
}

const UDZE: u32 = 0;
const UDRW: u32 = 1;
const UDIG: u32 = 2;
const UDZO: u32 = 0x8000_0005;
const UDBZ: u32 = 0x8000_0006;
const ULFO: u32 = 0x8000_0007;
const UDCM: u32 = 0x7fff_fffe;
const UDLE: u32 = 0xffff_ffff;

fn zlib(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

fn bz2(d: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

fn lzfse(d: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    lzfse_rust::encode_bytes(d, &mut out).unwrap();
    out
}

/// Guest data with runs of zeroes and text, so that every compressor has something to do.
fn data(seed: u64, sectors: usize) -> Vec<u8> {
    let mut v = pattern(seed, sectors * 512);
    for (i, b) in v.iter_mut().enumerate() {
        if (i / 700) % 3 == 0 {
            *b = 0;
        } else if (i / 700) % 3 == 1 {
            *b = b"vmi dmg fixture "[i % 16];
        }
    }
    v
}

/// A block table for `specs` starting at guest sector `first`, chunk data at `data_offset` in the
/// data fork; appends the chunk data to `fork` and the guest bytes to `guest`.
fn mish(specs: &[Spec], first: u64, fork: &mut Vec<u8>, guest: &mut Vec<u8>) -> Vec<u8> {
    let data_offset = fork.len() as u64;
    let mut entries = Vec::new();
    let mut sector = 0u64;
    let mut entry = |t: u32, count: u64, payload: &[u8], fork: &mut Vec<u8>, sector: u64| {
        let mut e = [0u8; 40];
        e[..4].copy_from_slice(&t.to_be_bytes());
        e[8..16].copy_from_slice(&sector.to_be_bytes());
        e[16..24].copy_from_slice(&count.to_be_bytes());
        e[24..32].copy_from_slice(&(fork.len() as u64 - data_offset).to_be_bytes());
        e[32..40].copy_from_slice(&(payload.len() as u64).to_be_bytes());
        fork.extend_from_slice(payload);
        entries.extend_from_slice(&e);
    };
    for s in specs {
        match s {
            Spec::Zero(n) | Spec::Ignore(n) => {
                let t = if matches!(s, Spec::Zero(_)) {
                    UDZE
                } else {
                    UDIG
                };
                entry(t, *n, &[], fork, sector);
                guest.extend(std::iter::repeat_n(0u8, (*n * 512) as usize));
                sector += n;
            }
            Spec::Comment => entry(UDCM, 0, &[], fork, sector),
            Spec::Raw(d) | Spec::Zlib(d) | Spec::Bzip2(d) | Spec::Lzfse(d) => {
                let n = (d.len() / 512) as u64;
                let (t, payload) = match s {
                    Spec::Raw(_) => (UDRW, d.clone()),
                    Spec::Zlib(_) => (UDZO, zlib(d)),
                    Spec::Bzip2(_) => (UDBZ, bz2(d)),
                    _ => (ULFO, lzfse(d)),
                };
                entry(t, n, &payload, fork, sector);
                guest.extend_from_slice(d);
                sector += n;
            }
        }
    }
    entry(UDLE, 0, &[], fork, sector);
    let mut m = vec![0u8; 204];
    m[..4].copy_from_slice(b"mish");
    m[4..8].copy_from_slice(&1u32.to_be_bytes());
    m[8..16].copy_from_slice(&first.to_be_bytes());
    m[16..24].copy_from_slice(&sector.to_be_bytes());
    m[24..32].copy_from_slice(&data_offset.to_be_bytes());
    m[200..204].copy_from_slice(&((entries.len() / 40) as u32).to_be_bytes());
    m.extend_from_slice(&entries);
    m
}

fn base64(d: &[u8]) -> String {
    use base64::Engine;
    let s = base64::engine::general_purpose::STANDARD.encode(d);
    // Wrapped and indented as hdiutil writes it.
    s.as_bytes()
        .chunks(52)
        .map(|l| format!("\t\t\t\t{}\n", std::str::from_utf8(l).unwrap()))
        .collect()
}

/// How the block tables are stored.
#[derive(Clone, Copy, PartialEq)]
enum Store {
    Plist,
    ResourceFork,
}

/// Build a UDIF image of one or more partitions (block tables); returns (image, guest bytes).
fn udif(parts: &[Vec<Spec>], store: Store) -> (Vec<u8>, Vec<u8>) {
    let mut fork = Vec::new();
    let mut guest = Vec::new();
    let mut tables = Vec::new();
    for specs in parts {
        let first = (guest.len() / 512) as u64;
        tables.push(mish(specs, first, &mut fork, &mut guest));
    }
    let mut img = fork.clone();
    let mut koly = vec![0u8; 512];
    koly[..4].copy_from_slice(b"koly");
    koly[4..8].copy_from_slice(&4u32.to_be_bytes());
    koly[8..12].copy_from_slice(&512u32.to_be_bytes());
    koly[0x20..0x28].copy_from_slice(&(fork.len() as u64).to_be_bytes());
    match store {
        Store::Plist => {
            let mut xml = String::from(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n\
                 \t<key>resource-fork</key>\n\t<dict>\n\t\t<key>plst</key>\n\t\t<array><dict>\
                 <key>Data</key><data>AAAA</data></dict></array>\n\t\t<key>blkx</key>\n\t\t<array>\n",
            );
            for (i, t) in tables.iter().enumerate() {
                xml.push_str(&format!(
                    "\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n{}\t\t\t\t</data>\n\
                     \t\t\t\t<key>ID</key>\n\t\t\t\t<string>{i}</string>\n\t\t\t</dict>\n",
                    base64(t)
                ));
            }
            xml.push_str("\t\t</array>\n\t</dict>\n</dict>\n</plist>\n");
            koly[0xd8..0xe0].copy_from_slice(&(img.len() as u64).to_be_bytes());
            koly[0xe0..0xe8].copy_from_slice(&(xml.len() as u64).to_be_bytes());
            img.extend_from_slice(xml.as_bytes());
        }
        Store::ResourceFork => {
            let mut data = Vec::new();
            for t in &tables {
                data.extend_from_slice(&(t.len() as u32).to_be_bytes());
                data.extend_from_slice(t);
            }
            let mut rsrc = vec![0u8; 256];
            rsrc[..4].copy_from_slice(&256u32.to_be_bytes());
            rsrc[8..12].copy_from_slice(&(data.len() as u32).to_be_bytes());
            rsrc.extend_from_slice(&data);
            koly[0x28..0x30].copy_from_slice(&(img.len() as u64).to_be_bytes());
            koly[0x30..0x38].copy_from_slice(&(rsrc.len() as u64).to_be_bytes());
            img.extend_from_slice(&rsrc);
        }
    }
    koly[0x1ec..0x1f4].copy_from_slice(&((guest.len() / 512) as u64).to_be_bytes());
    img.extend_from_slice(&koly);
    (img, guest)
}

/// Every chunk type qemu-img 10 reads without optional modules.
fn core_parts() -> Vec<Vec<Spec>> {
    vec![
        vec![
            Spec::Raw(data(1, 9)),
            Spec::Zero(100),
            Spec::Comment,
            Spec::Zlib(data(2, 300)),
            Spec::Ignore(7),
            Spec::Zlib(vec![0u8; 64 * 512]),
        ],
        vec![Spec::Zlib(data(3, 2048)), Spec::Raw(data(4, 1))],
    ]
}

fn open(path: &Path) -> vmi_disk::Result<Image> {
    Image::open(path, &OpenOptions::new().format(Some(Format::Dmg)))
}

/// `qemu-img convert -f dmg -O raw`: the bytes, or qemu's error.
fn qemu_reads(path: &Path) -> Result<Vec<u8>, String> {
    let out = path.with_extension("qemu.raw");
    let (code, _, err) = qemu_img_status(&[
        "convert",
        "-f",
        "dmg",
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
fn dmg_with_zero_raw_ignore_and_zlib_chunks_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    for store in [Store::Plist, Store::ResourceFork] {
        let (bytes, guest) = udif(&core_parts(), store);
        let path = dir.path().join("core.dmg");
        fs::write(&path, &bytes).unwrap();
        let q = qemu_reads(&path).expect("qemu-img reads the fixture");
        assert!(q == guest, "qemu reads the fixture as built");
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        assert_eq!(img.format(), Format::Dmg);
        assert_eq!(
            Some(img.virtual_size()),
            qemu_info(&path, "dmg")["virtual-size"].as_u64()
        );
        assert!(read_image(&img) == guest);
    }
}

#[test]
fn dmg_maps_zero_raw_and_compressed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = udif(&core_parts(), Store::Plist);
    let path = dir.path().join("m.dmg");
    fs::write(&path, &bytes).unwrap();
    let img = open(&path).unwrap();
    let raw = img.block_status(0, img.virtual_size()).unwrap();
    assert_eq!(
        (raw.kind, raw.len, raw.offset),
        (BlockKind::Data, 9 * 512, Some(0))
    );
    let zero = img
        .block_status(9 * 512, img.virtual_size() - 9 * 512)
        .unwrap();
    assert_eq!((zero.kind, zero.len), (BlockKind::Zero, 100 * 512));
    let z = img
        .block_status(109 * 512 + 5, img.virtual_size() - 109 * 512 - 5)
        .unwrap();
    assert_eq!((z.kind, z.len), (BlockKind::Compressed, 300 * 512 - 5));
}

/// qemu-img reads bzip2 and LZFSE chunks only with its optional dmg-bz2 and dmg-lzfse modules.
/// Where they are missing (Debian's qemu-utils has neither), qemu fails the read and vmi's decode
/// is checked against the source bytes alone.
#[test]
fn dmg_with_bzip2_and_lzfse_chunks_reads_the_source_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let parts = vec![vec![
        Spec::Bzip2(data(5, 700)),
        Spec::Zero(3),
        Spec::Lzfse(data(6, 900)),
        Spec::Lzfse(vec![0u8; 512]),
        Spec::Bzip2(data(7, 1)),
    ]];
    let (bytes, guest) = udif(&parts, Store::Plist);
    let path = dir.path().join("bz.dmg");
    fs::write(&path, &bytes).unwrap();
    let img = open(&path).unwrap();
    assert!(read_image(&img) == guest);
    match qemu_reads(&path) {
        Ok(q) => assert!(q == guest, "qemu with its dmg modules agrees"),
        Err(e) => assert!(e.contains("dmg-bzip2 module is missing"), "{e}"),
    }
}

#[test]
fn probing_finds_the_koly_trailer() {
    let (bytes, _) = udif(&core_parts(), Store::Plist);
    assert_eq!(
        probe(&MemStorage::from_bytes(bytes.clone()))
            .unwrap()
            .format,
        Format::Dmg
    );
    // A file whose size is not a multiple of 512 still opens (qemu searches the last 515 bytes).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.dmg");
    let mut odd = bytes.clone();
    odd.extend_from_slice(&[0, 0, 0]);
    fs::write(&path, &odd).unwrap();
    assert!(open(&path).is_ok());
    let s = FileStorage::open(&path, false).unwrap();
    assert_eq!(probe(&s).unwrap().format, Format::Dmg);
}

#[test]
fn writable_opens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = udif(&core_parts(), Store::Plist);
    let path = dir.path().join("w.dmg");
    fs::write(&path, &bytes).unwrap();
    let e = Image::open(
        &path,
        &OpenOptions::new().format(Some(Format::Dmg)).write(true),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
}

fn koly_at(b: &[u8]) -> usize {
    b.len() - 512
}

fn set_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Byte offset of chunk entry `i` of the (only) block table of a resource-fork image.
fn entry_at(b: &[u8], i: usize) -> usize {
    let k = koly_at(b);
    let rsrc = u64::from_be_bytes(b[k + 0x28..k + 0x30].try_into().unwrap()) as usize;
    rsrc + 256 + 4 + 204 + 40 * i
}

/// One corrupted field per case: an error naming the problem at open or at read, never a panic,
/// and never different data.
#[test]
fn hostile_trailers_and_tables_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = udif(
        &[vec![Spec::Zlib(data(8, 64)), Spec::Raw(data(9, 2))]],
        Store::ResourceFork,
    );
    type Corrupt = fn(&mut Vec<u8>);
    let open_cases: [(&str, Corrupt, &str); 9] = [
        (
            "no trailer",
            |b| {
                let k = koly_at(b);
                b[k] = b'x';
            },
            "koly",
        ),
        (
            "data fork after trailer",
            |b| {
                let k = koly_at(b);
                set_be64(b, k + 0x18, 1 << 40);
            },
            "data fork",
        ),
        (
            "resource fork after trailer",
            |b| {
                let k = koly_at(b);
                set_be64(b, k + 0x30, 1 << 40);
            },
            "resource fork",
        ),
        (
            "sector count",
            |b| {
                let k = koly_at(b);
                set_be64(b, k + 0x1ec, u64::MAX);
            },
            "sector count",
        ),
        (
            "chunk sectors",
            |b| {
                let e = entry_at(b, 0);
                set_be64(b, e + 0x10, 1 << 20);
            },
            "sector count",
        ),
        (
            "chunk length",
            |b| {
                let e = entry_at(b, 0);
                set_be64(b, e + 0x20, 1 << 30);
            },
            "length",
        ),
        (
            "chunk beyond file",
            |b| {
                let e = entry_at(b, 1);
                set_be64(b, e + 0x18, 1 << 30);
            },
            "beyond the end of the file",
        ),
        (
            "overlapping chunks",
            |b| {
                let e = entry_at(b, 1);
                set_be64(b, e + 8, 10);
            },
            "overlap",
        ),
        (
            "neither fork nor plist",
            |b| {
                let k = koly_at(b);
                set_be64(b, k + 0x30, 0);
            },
            "neither",
        ),
    ];
    let path = dir.path().join("h.dmg");
    for (what, corrupt, needle) in open_cases {
        let mut b = good.clone();
        corrupt(&mut b);
        fs::write(&path, &b).unwrap();
        let e = open(&path).unwrap_err();
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
    // Corrupt compressed data: the open succeeds, the read fails (as in qemu).
    let mut b = good.clone();
    let e = entry_at(&b, 0);
    let off = u64::from_be_bytes(b[e + 0x18..e + 0x20].try_into().unwrap()) as usize;
    b[off + 10] ^= 0xff;
    b[off + 11] ^= 0xff;
    fs::write(&path, &b).unwrap();
    let img = open(&path).unwrap();
    let mut buf = vec![0u8; 512];
    assert!(img.read_at(&mut buf, 0).is_err());
    assert!(qemu_reads(&path).is_err());
    // A sector no chunk covers fails the read, for qemu and vmi.
    let mut b = good.clone();
    let k = koly_at(&b);
    set_be64(&mut b, k + 0x1ec, 100);
    fs::write(&path, &b).unwrap();
    let img = open(&path).unwrap();
    assert!(img.read_at(&mut buf, 99 * 512).is_err());
    assert!(qemu_reads(&path).is_err());
}

#[test]
fn oversized_or_malformed_property_lists_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = udif(&core_parts(), Store::Plist);
    let path = dir.path().join("p.dmg");
    let k = koly_at(&good);
    let xml_off = u64::from_be_bytes(good[k + 0xd8..k + 0xe0].try_into().unwrap()) as usize;
    // An unterminated <data> element.
    let mut b = good.clone();
    let i = xml_off
        + String::from_utf8_lossy(&good[xml_off..])
            .rfind("</data>")
            .unwrap();
    b[i + 2] = b'x';
    fs::write(&path, &b).unwrap();
    assert!(open(&path).is_err());
    // A property list beyond the 16 MiB qemu reads.
    let mut b = vec![0u8; 17 << 20];
    b.extend_from_slice(&good);
    let k = koly_at(&b);
    set_be64(&mut b, k + 0xd8, 0);
    set_be64(&mut b, k + 0xe0, 17 << 20);
    fs::write(&path, &b).unwrap();
    assert_eq!(open(&path).unwrap_err().kind(), ErrorKind::Limit);
}

#[test]
fn seeded_mutations_of_an_image_never_panic() {
    for store in [Store::Plist, Store::ResourceFork] {
        let (base, _) = udif(&core_parts(), store);
        for i in 0..1500u64 {
            let mut b = base.clone();
            let r = pattern(i, 16);
            for k in 0..4 {
                // Mutate the metadata: trailer, property list or resource fork.
                let span = 2048.min(b.len());
                let at =
                    b.len() - 1 - (usize::from(r[k * 2]) << 8 | usize::from(r[k * 2 + 1])) % span;
                b[at] = r[8 + k];
            }
            vmi_disk::fuzzing::exercise(Some(Format::Dmg), &b);
        }
    }
}
