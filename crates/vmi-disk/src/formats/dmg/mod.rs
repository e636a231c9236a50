//! Apple disk images (UDIF, read only; qemu's `block/dmg.c`, `dmg-bz2.c` and `dmg-lzfse.c`
//! semantics; see `docs/formats/dmg.md`).
//!
//! A UDIF image ends with a 512-byte `koly` trailer that points at block tables ([`table`]): runs
//! of guest sectors ("chunks") that read as zeroes, are stored raw, or are compressed with zlib,
//! bzip2 or LZFSE. The driver maps zero chunks to [`MapKind::Zero`], raw chunks to
//! [`MapKind::Data`], and compressed chunks to [`MapKind::Compressed`] units that
//! [`Driver::read_compressed`] inflates whole (at most 64 MiB, qemu's limit). Sectors no chunk
//! covers fail to read, as in qemu.
//!
//! Decompressors: zlib through `flate2` (zlib-rs, the workspace's inflater); bzip2 through the
//! `bzip2` crate with its default pure-Rust backend (`libbz2-rs-sys`); LZFSE through `lzfse_rust`,
//! chosen over `lzfse` (bindings to Apple's C reference implementation, which qemu uses) because
//! it is Rust end to end (no C build, no FFI on hostile input), offers a streaming reader whose
//! output vmi bounds with `Read::take`, and can also encode, which the tests use to build fixtures.

mod table;

use crate::driver::{Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, Format, OpenContext, ProbeInput};
use crate::storage::Storage;
use std::any::Any;
use std::io::Read;
use table::{Chunk, Kind, KOLY_LEN, KOLY_MAGIC};

/// `probe`: a `koly` trailer ending the file (or followed by up to 3 more bytes, which qemu's
/// open also accepts) with version 4 and a 512-byte header size is certain; the magic alone at
/// the very end is weak. (qemu itself only looks at the file name's `.dmg`.)
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    if input.len < KOLY_LEN || input.tail.len() < KOLY_LEN as usize {
        return None;
    }
    let t = &input.tail[input.tail.len() - KOLY_LEN as usize..];
    let be32 = |at: usize| {
        t.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    // The tail starts `skip` bytes into the trailer.
    for skip in 0..4usize {
        if t.starts_with(&KOLY_MAGIC[skip..])
            && be32(4 - skip) == Some(4)
            && be32(8 - skip) == Some(KOLY_LEN as u32)
        {
            return Some(Confidence::Certain);
        }
    }
    t.starts_with(KOLY_MAGIC).then_some(Confidence::Weak)
}

/// An open DMG image.
#[derive(Debug)]
pub struct DmgDriver {
    storage: Box<dyn Storage>,
    size: u64,
    chunks: Vec<Chunk>,
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    if ctx.writable {
        return Err(Error::usage("dmg images are read-only"));
    }
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    let t = table::read_tables(storage.as_ref(), file_len)?;
    Ok(Box::new(DmgDriver {
        storage,
        size: t.sectors * 512,
        chunks: t.chunks,
    }))
}

impl DmgDriver {
    /// The chunk covering guest sector `sector`.
    fn chunk_at(&self, sector: u64) -> Option<&Chunk> {
        let i = self.chunks.partition_point(|c| c.sector <= sector);
        let c = self.chunks.get(i.checked_sub(1)?)?;
        (sector < c.sector + c.count).then_some(c)
    }

    fn inflate(&self, c: &Chunk, out: &mut Vec<u8>) -> Result<()> {
        // Both bounded by the table's named limits (64 MiB).
        let expect = (c.count * 512) as usize;
        let mut input = vec![0u8; c.length as usize];
        self.storage.read_at(&mut input, c.offset).map_err(|e| {
            Error::io(
                format!(
                    "reading DMG chunk at sector {} from {:#x}",
                    c.sector, c.offset
                ),
                e,
            )
        })?;
        let bad = |what: &str| {
            Error::invalid(format!(
                "DMG {what} chunk at sector {} does not inflate to its {expect} bytes",
                c.sector
            ))
        };
        out.clear();
        out.resize(expect, 0);
        match c.kind {
            Kind::Zlib => {
                // qemu: one inflate(Z_FINISH) must end the stream with exactly the chunk's bytes.
                let mut z = flate2::Decompress::new(true);
                let st = z
                    .decompress(&input, out, flate2::FlushDecompress::Finish)
                    .map_err(|e| bad("zlib").with_source(e))?;
                if st != flate2::Status::StreamEnd || z.total_out() != expect as u64 {
                    return Err(bad("zlib"));
                }
            }
            Kind::Bzip2 => {
                // qemu: one BZ2_bzDecompress must end the stream with exactly the chunk's bytes.
                let mut z = bzip2::Decompress::new(false);
                let st = z
                    .decompress(&input, out)
                    .map_err(|e| bad("bzip2").with_source(e))?;
                if st != bzip2::Status::StreamEnd || z.total_out() != expect as u64 {
                    return Err(bad("bzip2"));
                }
            }
            Kind::Lzfse => {
                // qemu: lzfse_decode_buffer into the chunk's bytes; any non-empty output is
                // accepted (output beyond the chunk is cut, a short one leaves the rest zero).
                out.clear();
                let mut dec = lzfse_rust::LzfseRingDecoder::default();
                let n = dec
                    .reader_bytes(&input)
                    .take(expect as u64)
                    .read_to_end(out)
                    .map_err(|e| bad("lzfse").with_source(e))?;
                if n == 0 {
                    return Err(bad("lzfse"));
                }
                out.resize(expect, 0);
            }
            Kind::Zero | Kind::Raw => {
                return Err(Error::invalid(format!(
                    "DMG chunk at sector {} is not compressed",
                    c.sector
                )))
            }
        }
        Ok(())
    }
}

impl Driver for DmgDriver {
    fn format(&self) -> Format {
        Format::Dmg
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let sector = offset / 512;
        let c = self.chunk_at(sector).ok_or_else(|| {
            Error::invalid(format!(
                "no DMG chunk covers guest offset {offset} (sector {sector})"
            ))
        })?;
        let start = c.sector * 512;
        let within = offset - start;
        let to_end = (c.count * 512 - within).min(len);
        let (kind, n) = match c.kind {
            Kind::Zero => (MapKind::Zero, to_end),
            // A raw chunk shorter than its sectors reads zeroes past its data.
            Kind::Raw if within < c.length => (
                MapKind::Data {
                    file: 0,
                    offset: c.offset + within,
                },
                to_end.min(c.length - within),
            ),
            Kind::Raw => (MapKind::Zero, to_end),
            Kind::Zlib | Kind::Bzip2 | Kind::Lzfse => (MapKind::Compressed { unit: start }, to_end),
        };
        Ok(Mapping {
            start: offset,
            len: n,
            kind,
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.storage.as_ref()),
            _ => Err(Error::invalid(format!("dmg images have no file {index}"))),
        }
    }

    fn read_compressed(&self, unit: u64, out: &mut Vec<u8>) -> Result<()> {
        let c = self
            .chunk_at(unit / 512)
            .filter(|c| c.sector * 512 == unit)
            .ok_or_else(|| Error::invalid(format!("no DMG chunk starts at guest offset {unit}")))?;
        self.inflate(c, out)
    }

    fn info(&self) -> FormatInfo {
        // qemu prints no format-specific data for dmg.
        FormatInfo::default()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
