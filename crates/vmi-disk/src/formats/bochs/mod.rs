//! Bochs growing disk images (read only; the "Redolog"/"Growing" image `bximage` writes, with
//! qemu's `block/bochs.c` semantics; see `docs/formats/bochs.md`).
//!
//! A 512-byte little-endian header (magic `Bochs Virtual HD Image`, type `Redolog`, subtype
//! `Growing`, version 1 or 2, header size, catalog entries, bitmap size, extent size, disk size)
//! is followed by the catalog (one u32 per extent: `0xffffffff` unallocated, else the index of the
//! extent's slot) and the slots: each a bitmap (one bit per sector of the extent) followed by the
//! extent's sectors. A sector reads from its slot when its bit is set, else as zeroes.

use crate::driver::{Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, Format, OpenContext, ProbeInput};
use crate::storage::Storage;
use std::any::Any;

/// Header magic (NUL-terminated in a 32-byte field).
pub(crate) const MAGIC: &[u8] = b"Bochs Virtual HD Image";
/// Image type (16-byte field).
pub(crate) const TYPE_REDOLOG: &[u8] = b"Redolog";
/// Subtype of the only kind qemu reads (16-byte field).
pub(crate) const SUBTYPE_GROWING: &[u8] = b"Growing";
/// Header version 2 (a reserved word at byte 84, the disk size at 88).
pub(crate) const VERSION_2: u32 = 0x0002_0000;
/// Header version 1 (the disk size at byte 84).
pub(crate) const VERSION_1: u32 = 0x0001_0000;
/// Bytes of the header.
pub(crate) const HEADER_LEN: usize = 512;
/// Catalog entry of an extent never written.
pub(crate) const UNALLOCATED: u32 = 0xffff_ffff;
/// Most catalog entries (qemu: 1M, what the largest image `bximage` creates needs, ~8 TB).
pub(crate) const MAX_CATALOG: u32 = 0x10_0000;
/// Largest extent (qemu: 8 MiB).
pub(crate) const MAX_EXTENT: u32 = 0x80_0000;
/// The sector.
const SECTOR: u64 = 512;
/// Most extents one `map` call walks when merging unallocated ones.
const MAX_MAP_EXTENTS: u64 = 1 << 16;

/// Whether the NUL-terminated string in `field` equals `want` (C's `strcmp` on the field).
fn field_is(field: &[u8], want: &[u8]) -> bool {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end] == want
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
    })
}

/// Whether a header names a growing redolog of a version qemu reads (qemu's `bochs_probe`).
fn header_matches(h: &[u8]) -> bool {
    h.len() >= HEADER_LEN
        && field_is(&h[..32], MAGIC)
        && field_is(&h[32..48], TYPE_REDOLOG)
        && field_is(&h[48..64], SUBTYPE_GROWING)
        && matches!(le32(h, 64), VERSION_1 | VERSION_2)
}

/// `probe`: qemu's checks (magic, type, subtype, version) on a whole header are certain; the
/// magic alone is weak (another Bochs image kind, which qemu and vmi do not read).
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    if header_matches(input.head) {
        Some(Confidence::Certain)
    } else if input.head.get(..32).is_some_and(|m| field_is(m, MAGIC)) {
        Some(Confidence::Weak)
    } else {
        None
    }
}

/// An open Bochs image.
#[derive(Debug)]
pub struct BochsDriver {
    storage: Box<dyn Storage>,
    size: u64,
    catalog: Vec<u32>,
    /// Start of the slots.
    data_offset: u64,
    /// Bytes of a slot's bitmap, in whole sectors.
    bitmap_bytes: u64,
    /// Bytes per extent.
    extent: u64,
    file_len: u64,
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    if ctx.writable {
        return Err(Error::usage("bochs images are read-only"));
    }
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    if file_len < HEADER_LEN as u64 {
        return Err(Error::invalid(format!(
            "file is {file_len} bytes, shorter than the {HEADER_LEN}-byte Bochs header"
        )));
    }
    let mut h = [0u8; HEADER_LEN];
    storage
        .read_at(&mut h, 0)
        .map_err(|e| Error::io("reading Bochs header", e))?;
    if !header_matches(&h) {
        return Err(Error::invalid(
            "image not in Bochs format (a growing redolog of version 1 or 2)",
        ));
    }
    let disk = if le32(&h, 64) == VERSION_1 {
        le64(&h, 84)
    } else {
        le64(&h, 88)
    };
    let size = disk / SECTOR * SECTOR;
    let header_size = u64::from(le32(&h, 68));
    let entries = le32(&h, 72);
    let bitmap = le32(&h, 76);
    let extent = le32(&h, 80);
    if entries > MAX_CATALOG {
        return Err(Error::limit(format!(
            "Bochs catalog of {entries} entries is too large (at most {MAX_CATALOG})"
        )));
    }
    if extent < SECTOR as u32 {
        return Err(Error::invalid(format!(
            "Bochs extent size {extent} must be at least 512"
        )));
    }
    if !extent.is_power_of_two() {
        return Err(Error::invalid(format!(
            "Bochs extent size {extent} is not a power of two"
        )));
    }
    if extent > MAX_EXTENT {
        return Err(Error::limit(format!(
            "Bochs extent size {extent} is too large (at most {MAX_EXTENT})"
        )));
    }
    let extent = u64::from(extent);
    if u64::from(entries) < size.div_ceil(extent) {
        return Err(Error::invalid(format!(
            "Bochs catalog of {entries} entries is too small for a disk of {size} bytes"
        )));
    }
    let catalog_end = header_size + u64::from(entries) * 4;
    if catalog_end > file_len {
        return Err(Error::invalid(format!(
            "Bochs catalog ends at byte {catalog_end}, beyond the end of the file ({file_len} \
             bytes)"
        )));
    }
    let mut raw = vec![0u8; entries as usize * 4];
    storage
        .read_at(&mut raw, header_size)
        .map_err(|e| Error::io("reading Bochs catalog", e))?;
    let catalog = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // qemu computes the bitmap's sectors in 32-bit arithmetic: a zero size wraps to 2^23 sectors.
    let bitmap_blocks = 1 + u64::from(bitmap.wrapping_sub(1) / 512);
    Ok(Box::new(BochsDriver {
        storage,
        size,
        catalog,
        data_offset: catalog_end,
        bitmap_bytes: bitmap_blocks * SECTOR,
        extent,
        file_len,
    }))
}

impl BochsDriver {
    /// Host offset of the slot holding extent `index`, or `None` when unallocated.
    fn slot(&self, index: u64) -> Result<Option<u64>> {
        let entry = usize::try_from(index)
            .ok()
            .and_then(|i| self.catalog.get(i))
            .copied()
            .ok_or_else(|| Error::invalid(format!("Bochs extent {index} has no catalog entry")))?;
        if entry == UNALLOCATED {
            return Ok(None);
        }
        // The slot must start within the file; `map` checks what it reads of it.
        let slot = self.bitmap_bytes + self.extent;
        u64::from(entry)
            .checked_mul(slot)
            .and_then(|o| o.checked_add(self.data_offset))
            .filter(|&o| o < self.file_len)
            .map(Some)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Bochs catalog entry {entry} of extent {index} names a slot beyond the end \
                     of the file ({} bytes)",
                    self.file_len
                ))
            })
    }
}

impl Driver for BochsDriver {
    fn format(&self) -> Format {
        Format::Bochs
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
        let index = offset / self.extent;
        let within = offset % self.extent;
        let to_end = (self.extent - within).min(len);
        let Some(slot) = self.slot(index)? else {
            // Merge following unallocated extents.
            let mut covered = to_end;
            let mut next = index + 1;
            while covered < len
                && next - index <= MAX_MAP_EXTENTS
                && matches!(self.slot(next), Ok(None))
            {
                covered += self.extent.min(len - covered);
                next += 1;
            }
            return Ok(Mapping {
                start: offset,
                len: covered,
                kind: MapKind::Unallocated,
            });
        };
        // The sectors' bits, from this sector to the end of the range or the extent.
        let first = within / SECTOR;
        let last = (within + to_end - 1) / SECTOR;
        let (from, to) = (slot + first / 8, slot + last / 8 + 1);
        if to > self.file_len {
            return Err(Error::invalid(format!(
                "Bochs bitmap of extent {index} at {slot:#x} runs past the end of the file"
            )));
        }
        let mut bits = vec![0u8; (to - from) as usize];
        self.storage
            .read_at(&mut bits, from)
            .map_err(|e| Error::io(format!("reading Bochs bitmap at {from:#x}"), e))?;
        let bit = |s: u64| {
            let rel = s - (first / 8) * 8;
            bits.get((rel / 8) as usize)
                .is_some_and(|b| (b >> (rel % 8)) & 1 == 1)
        };
        let set = bit(first);
        let mut s = first + 1;
        while s <= last && bit(s) == set {
            s += 1;
        }
        let n = (s * SECTOR - within).min(to_end);
        if !set {
            return Ok(Mapping {
                start: offset,
                len: n,
                kind: MapKind::Unallocated,
            });
        }
        let host = slot + self.bitmap_bytes + within;
        if host + n > self.file_len {
            return Err(Error::invalid(format!(
                "Bochs data of extent {index} at {host:#x} runs past the end of the file"
            )));
        }
        Ok(Mapping {
            start: offset,
            len: n,
            kind: MapKind::Data {
                file: 0,
                offset: host,
            },
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.storage.as_ref()),
            _ => Err(Error::invalid(format!("bochs images have no file {index}"))),
        }
    }

    fn info(&self) -> FormatInfo {
        // qemu prints no format-specific data for bochs.
        FormatInfo::default()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
