//! Metadata overlap checks and the corrupt bit (qemu `docs/interop/qcow2.txt`, "incompatible
//! feature bit 1: corrupt"; the checks follow qemu's `qcow2_check_metadata_overlap` in
//! `block/qcow2-refcount.c`).
//!
//! Before any write to the image file, the host range is compared with every metadata structure:
//! the header cluster, the active L1 table, the active L2 tables, the refcount table and blocks,
//! the snapshot table, the snapshots' L1 and L2 tables and the bitmap directory. A write that would
//! land on metadata it is not meant to update is refused, the image is marked corrupt (v3 images
//! get incompatible bit 1 on disk, as qemu sets it) and every later write of this session is
//! refused with [`ErrorKind::Corrupt`]. Only `check -r` may write to such an image again, and it
//! clears the bit once the image is consistent.
//!
//! Active L2 tables and refcount blocks are kept in hash sets (updated as tables are allocated,
//! rebuilt after wholesale changes), so a check costs a few lookups, not a walk of the L1 table.

use super::header::{self, AUTOCLEAR_BITMAPS};
use super::{read_u64s, Inner, L1E_OFFSET_MASK, MAX_L1_SIZE, REFT_OFFSET_MASK};
use crate::error::{Error, ErrorKind, Result};
use std::collections::HashMap;

/// Most snapshot L1 entries read to know the snapshots' L2 tables (qemu only checks these in its
/// most expensive "all" mode); past this the inactive L2 check is skipped.
const MAX_INACTIVE_L1_ENTRIES: u64 = 1 << 22;

/// One kind of metadata structure (qemu's `QCow2MetadataOverlap` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Meta {
    Header,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    InactiveL2,
    BitmapDirectory,
}

impl Meta {
    /// The name qemu prints for it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Meta::Header => "qcow2_header",
            Meta::ActiveL1 => "active L1 table",
            Meta::ActiveL2 => "active L2 table",
            Meta::RefcountTable => "refcount table",
            Meta::RefcountBlock => "refcount block",
            Meta::SnapshotTable => "snapshot table",
            Meta::InactiveL1 => "inactive L1 table",
            Meta::InactiveL2 => "inactive L2 table",
            Meta::BitmapDirectory => "bitmap directory",
        }
    }
}

/// Cluster offsets of the tables that move while the image is open.
#[derive(Debug, Default)]
pub(super) struct MetaIndex {
    /// The sets below describe the current tables.
    valid: bool,
    /// Active L2 table offset → number of L1 entries naming it.
    l2: HashMap<u64, u32>,
    /// Refcount block offset → number of refcount table entries naming it.
    rb: HashMap<u64, u32>,
    /// Clusters of the snapshots' L2 tables (`None`: not read yet, or too many to track).
    inactive_l2: Option<HashMap<u64, u32>>,
    inactive_loaded: bool,
}

/// Count one more (or one fewer) table of `cs` bytes at `off` in `map`, keyed by the clusters it
/// covers (two for an unaligned offset, which only a corrupt image has).
fn bump(map: &mut HashMap<u64, u32>, cs: u64, off: u64, up: bool) {
    if off == 0 {
        return;
    }
    let first = off / cs * cs;
    // An offset in the last cluster of the address space has no second cluster.
    let last = if off % cs == 0 {
        first
    } else {
        first.checked_add(cs).unwrap_or(first)
    };
    for key in [first, last]
        .into_iter()
        .take(if first == last { 1 } else { 2 })
    {
        if up {
            *map.entry(key).or_insert(0) += 1;
        } else if let Some(n) = map.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
            }
        }
    }
}

/// (offset, bytes) of the bitmap directory a bitmaps extension names (spec: "Bitmaps extension":
/// directory size at bytes 8-15, offset at 16-23).
pub(super) fn bitmap_directory(ext: &[u8]) -> Option<(u64, u64)> {
    let word = |at: usize| Some(u64::from_be_bytes(ext.get(at..at + 8)?.try_into().ok()?));
    Some((word(16)?, word(8)?))
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl MetaIndex {
    /// Forget the sets: the L1 table, refcount table or snapshots changed wholesale.
    pub(super) fn invalidate(&mut self) {
        self.valid = false;
        self.inactive_loaded = false;
        self.inactive_l2 = None;
    }
}

impl Inner {
    /// The L1 entry at `l1i` changes from `old` to `new`: keep the active L2 set current.
    pub(super) fn meta_l1_changed(&mut self, old: u64, new: u64) {
        if self.meta.valid {
            let cs = self.g.cs;
            bump(&mut self.meta.l2, cs, old & L1E_OFFSET_MASK, false);
            bump(&mut self.meta.l2, cs, new & L1E_OFFSET_MASK, true);
        }
    }

    /// A refcount table entry changes from `old` to `new`.
    pub(super) fn meta_reftable_changed(&mut self, old: u64, new: u64) {
        if self.meta.valid {
            let cs = self.g.cs;
            bump(&mut self.meta.rb, cs, old & REFT_OFFSET_MASK, false);
            bump(&mut self.meta.rb, cs, new & REFT_OFFSET_MASK, true);
        }
    }

    fn meta_reindex(&mut self) {
        let cs = self.g.cs;
        let mut l2 = HashMap::new();
        for &e in &self.l1 {
            bump(&mut l2, cs, e & L1E_OFFSET_MASK, true);
        }
        let mut rb = HashMap::new();
        for &e in &self.reftable {
            bump(&mut rb, cs, e & REFT_OFFSET_MASK, true);
        }
        self.meta.l2 = l2;
        self.meta.rb = rb;
        self.meta.valid = true;
    }

    fn load_inactive_l2(&mut self) {
        self.meta.inactive_loaded = true;
        self.meta.inactive_l2 = None;
        let total: u64 = self.snaps.iter().map(|s| u64::from(s.l1_size)).sum();
        if total > MAX_INACTIVE_L1_ENTRIES {
            return;
        }
        let Ok(file_len) = self.file_len() else {
            return;
        };
        let cs = self.g.cs;
        let mut set = HashMap::new();
        for sn in &self.snaps {
            let bytes = u64::from(sn.l1_size) * 8;
            if bytes == 0
                || bytes > MAX_L1_SIZE
                || sn.l1_offset.checked_add(bytes).is_none_or(|e| e > file_len)
            {
                continue;
            }
            if let Ok(l1) = read_u64s(
                self.st.as_ref(),
                sn.l1_offset,
                u64::from(sn.l1_size),
                "snapshot L1 table",
            ) {
                for e in l1 {
                    bump(&mut set, cs, e & L1E_OFFSET_MASK, true);
                }
            }
        }
        self.meta.inactive_l2 = Some(set);
    }

    /// The metadata structure `[offset, offset+size)` overlaps, skipping the kinds in `ign`
    /// (qemu's `qcow2_check_metadata_overlap`; the range is widened to whole clusters).
    pub(super) fn overlap(&mut self, ign: &[Meta], offset: u64, size: u64) -> Option<Meta> {
        if size == 0 {
            return None;
        }
        let cs = self.g.cs;
        let chk = |m: Meta| !ign.contains(&m);
        if chk(Meta::Header) && offset < cs {
            return Some(Meta::Header);
        }
        let start = offset / cs * cs;
        let end = offset.saturating_add(size).div_ceil(cs).saturating_mul(cs);
        let len = end - start;
        if chk(Meta::ActiveL1)
            && !self.l1.is_empty()
            && overlaps(start, len, self.l1_offset, self.l1.len() as u64 * 8)
        {
            return Some(Meta::ActiveL1);
        }
        if chk(Meta::RefcountTable)
            && overlaps(
                start,
                len,
                self.reftable_offset,
                self.reftable.len() as u64 * 8,
            )
        {
            return Some(Meta::RefcountTable);
        }
        if chk(Meta::SnapshotTable) && overlaps(start, len, self.snap_offset, self.snap_len) {
            return Some(Meta::SnapshotTable);
        }
        if chk(Meta::InactiveL1)
            && self
                .snaps
                .iter()
                .any(|s| overlaps(start, len, s.l1_offset, u64::from(s.l1_size) * 8))
        {
            return Some(Meta::InactiveL1);
        }
        if !self.meta.valid {
            self.meta_reindex();
        }
        let clusters = len / cs;
        // Keys are cluster offsets: look the range's clusters up, or scan the keys when the
        // range has more clusters than the set has entries.
        let hit = |map: &HashMap<u64, u32>| {
            if clusters <= map.len() as u64 {
                (0..clusters).any(|k| map.contains_key(&(start + k * cs)))
            } else {
                map.keys().any(|&k| overlaps(start, len, k, cs))
            }
        };
        if chk(Meta::ActiveL2) && hit(&self.meta.l2) {
            return Some(Meta::ActiveL2);
        }
        if chk(Meta::RefcountBlock) && hit(&self.meta.rb) {
            return Some(Meta::RefcountBlock);
        }
        if chk(Meta::InactiveL2) && !self.snaps.is_empty() {
            if !self.meta.inactive_loaded {
                self.load_inactive_l2();
            }
            if self.meta.inactive_l2.as_ref().is_some_and(hit) {
                return Some(Meta::InactiveL2);
            }
        }
        if chk(Meta::BitmapDirectory) && self.autoclear & AUTOCLEAR_BITMAPS != 0 {
            if let Some((off, size)) = self.bitmap_dir {
                if overlaps(start, len, off, size) {
                    return Some(Meta::BitmapDirectory);
                }
            }
        }
        None
    }

    /// Refuse a write of `size` bytes at `offset` that would land on metadata other than the kinds
    /// in `ign` (what the write means to update): the image is marked corrupt (qemu's
    /// `qcow2_pre_write_overlap_check`).
    pub(super) fn pre_write(&mut self, ign: &[Meta], offset: u64, size: u64) -> Result<()> {
        if self.corrupt && !self.repairing {
            return Err(self.corrupt_error());
        }
        match self.overlap(ign, offset, size) {
            None => Ok(()),
            Some(m) => Err(self.signal_corruption(format!(
                "Preventing invalid write on metadata (overlaps with {}) at {offset:#x}, {size} bytes",
                m.name()
            ))),
        }
    }

    /// The error every write of a corrupt image gets.
    pub(super) fn corrupt_error(&self) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            "qcow2 image is corrupt; it may not be written (repair it with `vmi check -r all`)",
        )
    }

    /// Mark the image corrupt (incompatible bit 1 on v3 images, as qemu's `qcow2_mark_corrupt`)
    /// and return the error for the caller to hand up. Nothing else is written from now on.
    pub(super) fn signal_corruption(&mut self, what: String) -> Error {
        let first = !self.corrupt;
        self.corrupt = true;
        if first && self.writable && self.g.version >= 3 {
            self.incompatible |= header::INCOMPAT_CORRUPT;
            // Best effort: the write is refused whether or not the bit reaches the disk.
            let _ = self
                .st
                .write_at(&self.incompatible.to_be_bytes(), header::OFF_INCOMPAT)
                .and_then(|()| self.st.sync());
        }
        Error::new(
            ErrorKind::Corrupt,
            format!("qcow2: Marking image as corrupt: {what}; further writes are refused"),
        )
    }

    /// Clear the corrupt bit after a repair left the image consistent (qemu's
    /// `qcow2_mark_consistent`).
    pub(super) fn mark_consistent(&mut self) -> Result<()> {
        self.corrupt = false;
        if self.incompatible & header::INCOMPAT_CORRUPT != 0 {
            self.incompatible &= !header::INCOMPAT_CORRUPT;
            self.st
                .write_at(&self.incompatible.to_be_bytes(), header::OFF_INCOMPAT)
                .and_then(|()| self.st.sync())
                .map_err(|e| Error::io("clearing the qcow2 corrupt bit", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_qcow2_an_unaligned_table_in_the_last_cluster_of_the_address_space_is_indexed_without_overflow(
    ) {
        let mut map = HashMap::new();
        let cs = 65536;
        bump(&mut map, cs, u64::MAX - 511, true);
        assert_eq!(map.get(&(u64::MAX - (cs - 1))), Some(&1));
        bump(&mut map, cs, u64::MAX - 511, false);
        assert!(map.is_empty());
    }

    #[test]
    fn ranges_that_touch_do_not_overlap() {
        assert!(!overlaps(0, 512, 512, 512));
        assert!(overlaps(0, 513, 512, 512));
        assert!(!overlaps(0, 0, 0, 512));
        assert!(overlaps(u64::MAX - 1, 8, u64::MAX - 2, 8));
    }
}
