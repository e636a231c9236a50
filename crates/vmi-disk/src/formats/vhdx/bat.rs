//! The block allocation table ([MS-VHDX] §2.5): one 64-bit entry per payload block, with a sector
//! bitmap entry after every `chunk ratio` payload entries (§2.5.1), the payload block states
//! (§2.5.1.1) and sector bitmap block states (§2.5.1.2).

use super::header::MIB;
use super::metadata::Metadata;
use crate::error::{Error, Result};

/// Payload block state: no data; reads as zero, or the parent's data in a differencing disk.
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
/// Payload block state: contents undefined (vmi reads zeroes / the parent).
pub const PAYLOAD_UNDEFINED: u64 = 1;
/// Payload block state: reads as zeroes.
pub const PAYLOAD_ZERO: u64 = 2;
/// Payload block state: unmapped by the guest (vmi reads zeroes / the parent).
pub const PAYLOAD_UNMAPPED: u64 = 3;
/// Payload block state: all data is in the block at `FileOffsetMB`.
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
/// Payload block state: differencing disks only; the sector bitmap says which sectors are here.
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block state: not allocated (§2.5.1.2).
pub const BITMAP_NOT_PRESENT: u64 = 0;
/// Sector bitmap block state: allocated at `FileOffsetMB`.
pub const BITMAP_PRESENT: u64 = 6;
/// Bits 0-2 of an entry hold the state (§2.5.1).
const STATE_MASK: u64 = 7;
/// Bits 20-63 hold the file offset in MiB (§2.5.1).
const OFFSET_SHIFT: u32 = 20;
/// Sectors one sector bitmap block describes: 2^23 bits in 1 MiB (§2.5.1: chunk ratio).
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;
/// Size of a sector bitmap block (§2.5.1.2).
pub const BITMAP_BLOCK_SIZE: u64 = MIB;
/// Largest BAT vmi keeps in memory: 64 MiB (8 Mi entries: 64 TiB at 8 MiB blocks, 8 TiB at 1 MiB).
pub const MAX_BAT_BYTES: u64 = 64 << 20;

/// The entry's state bits.
pub fn state(entry: u64) -> u64 {
    entry & STATE_MASK
}

/// The entry's file offset in bytes.
pub fn offset(entry: u64) -> u64 {
    (entry >> OFFSET_SHIFT) << OFFSET_SHIFT
}

/// Build an entry from a 1 MiB-aligned offset and a state.
pub fn entry(offset: u64, state: u64) -> u64 {
    (offset >> OFFSET_SHIFT << OFFSET_SHIFT) | (state & STATE_MASK)
}

/// The BAT's shape, derived from the metadata (§2.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size.
    pub sector: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks covering the virtual size.
    pub payload_blocks: u64,
    /// Total BAT entries.
    pub entries: u64,
}

impl Geometry {
    /// Compute the geometry for `virtual_size` (metadata already validated).
    pub fn new(m: &Metadata, virtual_size: u64) -> Result<Geometry> {
        let block_size = u64::from(m.block_size);
        let sector = u64::from(m.logical_sector);
        let chunk_ratio = SECTORS_PER_BITMAP * sector / block_size;
        if chunk_ratio == 0 {
            return Err(Error::invalid(format!(
                "vhdx block size {block_size} and sector size {sector} give no chunk ratio"
            )));
        }
        let payload_blocks = virtual_size.div_ceil(block_size);
        let bitmap_blocks = payload_blocks.div_ceil(chunk_ratio);
        let entries = if m.has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else if payload_blocks == 0 {
            0
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        if entries * 8 > MAX_BAT_BYTES {
            return Err(Error::limit(format!(
                "vhdx BAT has {entries} entries ({} bytes, at most {MAX_BAT_BYTES})",
                entries * 8
            )));
        }
        Ok(Geometry {
            block_size,
            sector,
            chunk_ratio,
            payload_blocks,
            entries,
        })
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap block covering payload block `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Whether BAT index `i` is a sector bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// Sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.sector
    }

    /// Bit index, within its sector bitmap block, of the first sector of payload block `block`.
    pub fn bitmap_bit(&self, block: u64) -> u64 {
        (block % self.chunk_ratio) * self.sectors_per_block()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn meta(block_size: u32, has_parent: bool) -> Metadata {
        Metadata {
            block_size,
            leave_allocated: false,
            has_parent,
            virtual_size: 0,
            logical_sector: 512,
            physical_sector: 512,
            page83: Uuid::nil(),
            parent_locator: Vec::new(),
        }
    }

    #[test]
    fn chunk_ratio_follows_the_spec_formula() {
        let g = Geometry::new(&meta(32 << 20, false), 1 << 30).unwrap();
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.payload_blocks, 32);
        assert_eq!(g.entries, 32);
    }

    #[test]
    fn sector_bitmap_entries_interleave_after_each_chunk() {
        let g = Geometry::new(&meta(256 << 20, false), 5 << 30).unwrap();
        assert_eq!(g.chunk_ratio, 16);
        assert_eq!(g.payload_index(15), 15);
        assert_eq!(g.payload_index(16), 17);
        assert_eq!(g.bitmap_index(3), 16);
        assert!(g.is_bitmap_index(16));
        assert_eq!(g.entries, 20 + 19 / 16);
    }

    #[test]
    fn differencing_disks_have_whole_chunks_of_entries() {
        let g = Geometry::new(&meta(256 << 20, true), 5 << 30).unwrap();
        assert_eq!(g.entries, 2 * 17);
    }

    #[test]
    fn entry_packs_offset_and_state() {
        let e = entry(5 * MIB, PAYLOAD_FULLY_PRESENT);
        assert_eq!(offset(e), 5 * MIB);
        assert_eq!(state(e), PAYLOAD_FULLY_PRESENT);
    }
}
