//! Compressed loopback images (cloop V2.0, read only; qemu's `block/cloop.c` semantics; see
//! `docs/formats/cloop.md`).
//!
//! Layout: a 128-byte shell-script preamble (`#!/bin/sh\n#V2.0 Format\n...`), the block size
//! (big-endian u32 at 128), the block count (big-endian u32 at 132), then `count + 1` big-endian u64
//! offsets at 136: block *i* is the zlib stream in `[offsets[i], offsets[i + 1])` and inflates to
//! exactly one block. Every block is a [`MapKind::Compressed`] unit.

use crate::driver::{Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, Format, OpenContext, ProbeInput};
use crate::storage::Storage;
use std::any::Any;

/// The preamble qemu's probe matches (the cloop V2.0 script line by line).
pub(crate) const MAGIC_V2: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
/// Byte offset of the block size; the preamble takes the bytes before it.
pub(crate) const HEADER_OFF: u64 = 128;
/// Byte offset of the offsets table.
pub(crate) const OFFSETS_OFF: u64 = 136;
/// Largest block size (qemu's `MAX_BLOCK_SIZE`, 64 MiB): one block is inflated into memory.
pub(crate) const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Largest compressed block (qemu: twice the largest block size).
pub(crate) const MAX_COMPRESSED_BLOCK: u64 = 2 * MAX_BLOCK_SIZE as u64;
/// Largest offsets table (qemu's 512 MiB cap, 16 TB at 256 KiB blocks). It must also lie within
/// the file.
pub(crate) const MAX_OFFSETS_BYTES: u64 = 512 << 20;

/// `probe`: the V2.0 preamble, as qemu's `cloop_probe` matches it (score 2: certain here, since
/// nothing else starts with it).
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    (input.head.len() >= MAGIC_V2.len() && input.head.starts_with(MAGIC_V2))
        .then_some(Confidence::Certain)
}

/// An open cloop image.
#[derive(Debug)]
pub struct CloopDriver {
    storage: Box<dyn Storage>,
    block_size: u64,
    /// `blocks + 1` offsets, non-decreasing, within the file.
    offsets: Vec<u64>,
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    if ctx.writable {
        return Err(Error::usage("cloop images are read-only"));
    }
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    if file_len < OFFSETS_OFF {
        return Err(Error::invalid(format!(
            "file is {file_len} bytes, shorter than the {OFFSETS_OFF}-byte cloop header"
        )));
    }
    let mut h = [0u8; 8];
    storage
        .read_at(&mut h, HEADER_OFF)
        .map_err(|e| Error::io("reading cloop header", e))?;
    let block_size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let blocks = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    if block_size == 0 {
        return Err(Error::invalid("cloop block size cannot be zero"));
    }
    if block_size % 512 != 0 {
        return Err(Error::invalid(format!(
            "cloop block size {block_size} must be a multiple of 512"
        )));
    }
    if block_size > MAX_BLOCK_SIZE {
        return Err(Error::limit(format!(
            "cloop block size {block_size} must be {} MiB or less",
            MAX_BLOCK_SIZE >> 20
        )));
    }
    let table = (u64::from(blocks) + 1) * 8;
    if table > MAX_OFFSETS_BYTES {
        return Err(Error::limit(format!(
            "cloop image of {blocks} blocks needs a {table}-byte offsets table, more than \
             {MAX_OFFSETS_BYTES}"
        )));
    }
    if OFFSETS_OFF + table > file_len {
        return Err(Error::invalid(format!(
            "cloop offsets table of {blocks} blocks runs past the end of the file ({file_len} \
             bytes)"
        )));
    }
    let mut raw = vec![0u8; table as usize];
    storage
        .read_at(&mut raw, OFFSETS_OFF)
        .map_err(|e| Error::io("reading cloop offsets table", e))?;
    let offsets: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    for (i, w) in offsets.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::invalid(format!(
                "cloop offsets not monotonically increasing at index {}",
                i + 1
            )));
        }
        if w[1] - w[0] > MAX_COMPRESSED_BLOCK {
            return Err(Error::invalid(format!(
                "cloop compressed block {i} of {} bytes is larger than {MAX_COMPRESSED_BLOCK}",
                w[1] - w[0]
            )));
        }
    }
    if let Some(&last) = offsets.last() {
        if last > file_len {
            return Err(Error::invalid(format!(
                "cloop blocks end at byte {last}, beyond the end of the file ({file_len} bytes)"
            )));
        }
    }
    Ok(Box::new(CloopDriver {
        storage,
        block_size: u64::from(block_size),
        offsets,
    }))
}

impl Driver for CloopDriver {
    fn format(&self) -> Format {
        Format::Cloop
    }

    fn virtual_size(&self) -> u64 {
        // blocks < 2^26 (table cap), block size <= 2^26.
        (self.offsets.len() as u64 - 1) * self.block_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let within = offset % self.block_size;
        Ok(Mapping {
            start: offset,
            len: (self.block_size - within).min(len),
            kind: MapKind::Compressed {
                unit: offset - within,
            },
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.storage.as_ref()),
            _ => Err(Error::invalid(format!("cloop images have no file {index}"))),
        }
    }

    /// qemu: one `inflate(Z_FINISH)` must end the zlib stream with exactly one block.
    fn read_compressed(&self, unit: u64, out: &mut Vec<u8>) -> Result<()> {
        let block = unit / self.block_size;
        let (start, end) = usize::try_from(block)
            .ok()
            .and_then(|b| Some((*self.offsets.get(b)?, *self.offsets.get(b + 1)?)))
            .ok_or_else(|| Error::invalid(format!("no cloop block at guest offset {unit}")))?;
        // Bounded by MAX_COMPRESSED_BLOCK and MAX_BLOCK_SIZE.
        let mut input = vec![0u8; (end - start) as usize];
        self.storage
            .read_at(&mut input, start)
            .map_err(|e| Error::io(format!("reading cloop block {block} at {start:#x}"), e))?;
        out.clear();
        out.resize(self.block_size as usize, 0);
        let bad = || {
            Error::invalid(format!(
                "cloop block {block} does not inflate to its {} bytes",
                self.block_size
            ))
        };
        let mut z = flate2::Decompress::new(true);
        let st = z
            .decompress(&input, out, flate2::FlushDecompress::Finish)
            .map_err(|e| bad().with_source(e))?;
        if st != flate2::Status::StreamEnd || z.total_out() != self.block_size {
            return Err(bad());
        }
        Ok(())
    }

    fn info(&self) -> FormatInfo {
        // qemu prints no format-specific data for cloop.
        FormatInfo::default()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
