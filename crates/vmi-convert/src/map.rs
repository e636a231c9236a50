//! qemu-img map: the guest space as merged ranges of equal status.
//!
//! Consecutive [`Image::block_status`] answers are merged when they come from the same layer, have
//! the same kind and, for data, continue at the next host offset: the same merging qemu-img map
//! does, so `--output=json` lists the same entries.

use serde::Serialize;
use vmi_disk::{BlockKind, BlockStatus, Format, Image, Result};

/// One entry of `map --output=json`, with qemu-img's keys in qemu-img's order.
///
/// qemu-img 7.2 has no `compressed` key (it appeared in 8.x); callers that mimic an older qemu drop
/// it when printing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that answered (0 = top).
    pub depth: usize,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zero.
    pub zero: bool,
    /// Has data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset for uncompressed data (and, as qemu-img reports it, for holes in raw files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapEntry {
    fn of(bs: &BlockStatus) -> MapEntry {
        let (present, zero, data, compressed) = match bs.kind {
            BlockKind::Data => (true, false, true, false),
            BlockKind::Compressed => (true, false, true, true),
            BlockKind::Zero => (true, true, false, false),
            BlockKind::Unallocated => (false, true, false, false),
        };
        MapEntry {
            start: bs.start,
            length: bs.len,
            depth: bs.depth,
            present,
            zero,
            data,
            compressed,
            offset: if bs.kind == BlockKind::Data {
                bs.offset
            } else {
                None
            },
        }
    }

    /// Whether `next` (which starts where `self` ends) extends this entry.
    fn continues_with(&self, next: &MapEntry) -> bool {
        let same = self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed;
        let contiguous = match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => false,
        };
        same && contiguous && self.start + self.length == next.start
    }
}

/// Call `f` with each merged map entry, in guest order. The whole image is covered (an image of
/// size 0 has no entries). Memory use is constant: entries are produced as the map is walked.
pub fn map_entries(img: &Image, f: &mut dyn FnMut(MapEntry) -> Result<()>) -> Result<()> {
    let size = img.virtual_size();
    let identity_mapped = matches!(img.format(), Format::Raw | Format::Iso);
    let mut cur: Option<MapEntry> = None;
    let mut pos = 0u64;
    while pos < size {
        let bs = img.block_status(pos, size - pos)?;
        let mut e = MapEntry::of(&bs);
        if identity_mapped && bs.depth == 0 && bs.kind == BlockKind::Zero {
            // A hole in a raw file still has a host offset: qemu-img prints it.
            e.offset = Some(bs.start);
        }
        match &mut cur {
            Some(c) if c.continues_with(&e) => c.length += e.length,
            _ => {
                if let Some(c) = cur.replace(e) {
                    f(c)?;
                }
            }
        }
        pos += bs.len;
    }
    if let Some(c) = cur {
        f(c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bs(start: u64, len: u64, kind: BlockKind, offset: Option<u64>) -> BlockStatus {
        BlockStatus {
            start,
            len,
            depth: 0,
            kind,
            offset,
        }
    }

    #[test]
    fn data_entries_merge_only_when_host_offsets_continue() {
        let a = MapEntry::of(&bs(0, 10, BlockKind::Data, Some(100)));
        assert!(a.continues_with(&MapEntry::of(&bs(10, 5, BlockKind::Data, Some(110)))));
        assert!(!a.continues_with(&MapEntry::of(&bs(10, 5, BlockKind::Data, Some(200)))));
    }

    #[test]
    fn zero_and_unallocated_entries_never_merge() {
        let z = MapEntry::of(&bs(0, 10, BlockKind::Zero, None));
        assert!(!z.continues_with(&MapEntry::of(&bs(10, 5, BlockKind::Unallocated, None))));
    }

    #[test]
    fn compressed_entries_have_no_offset() {
        let c = MapEntry::of(&bs(0, 10, BlockKind::Compressed, Some(7)));
        assert_eq!(
            (c.present, c.data, c.compressed, c.offset),
            (true, true, true, None)
        );
    }
}
