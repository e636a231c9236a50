//! Fixture builders: deterministic pseudo-random content written at scattered offsets, so every
//! test image has data, holes, zero runs and unaligned edges in reproducible places.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vmi_disk::Image;

/// One written range of a fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// Deterministic data for `len` bytes from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// Write a sparse raw file of `size` bytes with `count` random extents (random offsets, lengths from
/// 1 byte to 256 KiB, some all-zero, some all-0xff) and return the extents written.
pub fn scattered_raw(path: &Path, size: u64, count: usize, seed: u64) -> Vec<Extent> {
    let f = File::create(path).expect("create fixture");
    f.set_len(size).expect("size fixture");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut extents = Vec::new();
    for i in 0..count {
        let len = rng.gen_range(1..=256 * 1024u64).min(size);
        let offset = rng.gen_range(0..=size - len);
        let data = match i % 7 {
            5 => vec![0u8; len as usize],
            6 => vec![0xffu8; len as usize],
            _ => pattern(seed ^ (i as u64 + 1), len as usize),
        };
        f.write_all_at(&data, offset).expect("write fixture");
        extents.push(Extent { offset, len });
    }
    // Always touch the first and last bytes: edge handling is where drivers break.
    f.write_all_at(b"vmi-first-sector", 0)
        .expect("write fixture");
    f.write_all_at(&[0x5a], size - 1).expect("write fixture");
    extents
}

/// Read a whole file.
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .expect("open")
        .read_to_end(&mut v)
        .expect("read");
    v
}

/// Read an image's whole guest content through vmi (tests only: small images).
pub fn read_image(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(img.virtual_size()).expect("small test image")];
    let chunk = 1 << 20;
    for (i, c) in v.chunks_mut(chunk).enumerate() {
        img.read_at(c, (i * chunk) as u64).expect("read image");
    }
    v
}

/// Assert an image's guest content equals a raw file's bytes, reporting the first difference.
pub fn assert_image_matches_raw(img: &Image, raw: &Path) {
    let expect = read_file(raw);
    assert_eq!(
        img.virtual_size(),
        expect.len() as u64,
        "virtual size of {}",
        img.path().display()
    );
    let got = read_image(img);
    if let Some(i) = got.iter().zip(&expect).position(|(a, b)| a != b) {
        panic!(
            "{} differs from {} at byte {i}: {:#04x} != {:#04x}",
            img.path().display(),
            raw.display(),
            got[i],
            expect[i]
        );
    }
}
