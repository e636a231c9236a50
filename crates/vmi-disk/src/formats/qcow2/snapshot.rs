//! Internal snapshots (qemu `docs/interop/qcow2.txt`, "Snapshots"): the snapshot table, read and
//! bounded, and the operations on it with `qemu-img snapshot`'s semantics (disk state only).
//!
//! - [`create`] copies the active L1 table, counts one more reference to every L2 table and every
//!   data cluster the active image reaches (so a cluster's refcount is the number of L1 tables —
//!   active and snapshots — that reach it, as qemu keeps it), clears the "copied" flags that no
//!   longer hold, and appends an entry with the extra data qemu 5.2+ writes (64-bit VM state size,
//!   disk size, icount 0 as `qemu-img snapshot -c` writes it).
//! - [`apply`] makes a copy of the snapshot's L1 table the active one, restores the disk size and
//!   drops the references the old active table held.
//! - [`delete`] drops the snapshot's references and its L1 table, and sets the "copied" flags
//!   again where a cluster's refcount fell back to one.
//! - [`open_snapshot`] opens a read-only view whose guest contents are the snapshot's.
//!
//! Writes after a snapshot are copy-on-write at both levels: the write path copies an L2 table
//! whose refcount is above one and a data cluster whose refcount is above one.

use super::{
    check_table, read_u64s, u64s_to_bytes, Inner, Qcow2Driver, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
    MAX_L1_SIZE, OFLAG_COMPRESSED, OFLAG_COPIED,
};
use crate::driver::SnapshotInfo;
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::storage::Storage;
use std::path::Path;
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// The fixed part of a snapshot table entry (spec: "Snapshot table entry", bytes 0-39); extra
/// data, the id string and the name follow, padded to 8 bytes.
#[derive(Debug, Clone, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSnapshot {
    /// Bytes 0-7: offset of this snapshot's L1 table.
    pub l1_table_offset: U64,
    /// Bytes 8-11: entries in that L1 table.
    pub l1_size: U32,
    /// Bytes 12-13: length of the unique id string.
    pub id_str_size: U16,
    /// Bytes 14-15: length of the name.
    pub name_size: U16,
    /// Bytes 16-19: creation time, seconds since the epoch.
    pub date_sec: U32,
    /// Bytes 20-23: creation time, nanoseconds.
    pub date_nsec: U32,
    /// Bytes 24-31: guest run time in nanoseconds.
    pub vm_clock_nsec: U64,
    /// Bytes 32-35: size of the saved VM state (32-bit; the extra data may hold a 64-bit one).
    pub vm_state_size: U32,
    /// Bytes 36-39: length of the extra data that follows.
    pub extra_data_size: U32,
}

/// Most snapshots an image may declare (qemu's QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table read (qemu's QCOW_MAX_SNAPSHOTS_SIZE, 64 MiB).
pub const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// Largest extra data per snapshot entry (qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA).
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Fixed part of a snapshot table entry (spec: bytes 0-39).
const ENTRY_FIXED: u64 = 40;

/// One snapshot, with what `check` needs besides what `info` shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// What `info` lists.
    pub info: SnapshotInfo,
    /// Host offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries in it.
    pub l1_size: u32,
    /// Virtual disk size when the snapshot was taken (extra data bytes 8-15), when recorded.
    pub disk_size: Option<u64>,
    /// The entry as stored (fixed part, extra data, id, name; no padding), rewritten verbatim
    /// when the table is rewritten so extra data vmi does not know survives.
    pub raw: Vec<u8>,
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Read `count` snapshot entries starting at host offset `offset` (cluster-aligned).
pub fn read_table(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
    cluster_size: u64,
    file_len: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    if count == 0 {
        return Ok((Vec::new(), 0));
    }
    if count > MAX_SNAPSHOTS {
        return Err(Error::limit(format!(
            "qcow2 image declares {count} snapshots, more than {MAX_SNAPSHOTS}"
        )));
    }
    if offset % cluster_size != 0 || offset == 0 || offset >= file_len {
        return Err(Error::invalid(format!(
            "qcow2 snapshot table offset {offset:#x} is unaligned or outside the file ({file_len} bytes)"
        )));
    }
    let mut pos = offset;
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let read = |buf: &mut [u8], at: u64| -> Result<()> {
        at.checked_add(buf.len() as u64)
            .filter(|&e| e <= file_len && e - offset <= MAX_SNAPSHOT_TABLE)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "qcow2 snapshot table entry at {at:#x} runs past the file end or {MAX_SNAPSHOT_TABLE} bytes"
                ))
            })?;
        storage
            .read_at(buf, at)
            .map_err(|e| Error::io(format!("reading snapshot table at {at:#x}"), e))
    };
    for i in 0..count {
        let mut fixed = [0u8; ENTRY_FIXED as usize];
        read(&mut fixed, pos)?;
        let raw = RawSnapshot::read_from_bytes(&fixed[..])
            .map_err(|_| Error::invalid("qcow2 snapshot entry has the wrong size"))?;
        let l1_offset = raw.l1_table_offset.get();
        let l1_size = raw.l1_size.get();
        let id_len = raw.id_str_size.get();
        let name_len = raw.name_size.get();
        let date_sec = raw.date_sec.get();
        let date_nsec = raw.date_nsec.get();
        let vm_clock = raw.vm_clock_nsec.get();
        let mut vm_state = u64::from(raw.vm_state_size.get());
        let extra_len = raw.extra_data_size.get();
        if extra_len > MAX_EXTRA_DATA {
            return Err(Error::invalid(format!(
                "qcow2 snapshot {i} has {extra_len} bytes of extra data, more than {MAX_EXTRA_DATA}"
            )));
        }
        let var_len = u64::from(extra_len) + u64::from(id_len) + u64::from(name_len);
        let mut var = vec![0u8; var_len as usize];
        read(&mut var, pos + ENTRY_FIXED)?;
        let extra = &var[..extra_len as usize];
        let mut icount = None;
        let disk_size = be64(extra, 8);
        // Extra data (spec): 64-bit VM state size, virtual disk size, icount (-1: none).
        if let Some(v) = be64(extra, 0) {
            vm_state = v;
        }
        if let Some(ic) = be64(extra, 16) {
            if ic != u64::MAX {
                icount = Some(ic);
            }
        }
        let id_end = extra_len as usize + id_len as usize;
        let id = String::from_utf8_lossy(&var[extra_len as usize..id_end]).into_owned();
        let name = String::from_utf8_lossy(&var[id_end..]).into_owned();
        out.push(Snapshot {
            info: SnapshotInfo {
                id,
                name,
                vm_state_size: vm_state,
                date_sec: u64::from(date_sec),
                date_nsec,
                vm_clock_sec: vm_clock / 1_000_000_000,
                vm_clock_nsec: (vm_clock % 1_000_000_000) as u32,
                icount,
            },
            l1_offset,
            l1_size,
            disk_size,
            raw: [&fixed[..], &var[..]].concat(),
        });
        pos = (pos + ENTRY_FIXED + var_len).div_ceil(8) * 8;
    }
    Ok((out, pos - offset))
}

/// Extra data vmi writes (spec: "Snapshot table entry", bytes 40+): vm_state_size_large,
/// disk_size and icount — 24 bytes, as qemu 5.2 and later write it.
const EXTRA_DATA_LEN: u32 = 24;
/// Longest snapshot name or id accepted (both are u16-sized in the entry; qemu's
/// `QEMUSnapshotInfo` name is 256 bytes).
pub const MAX_NAME_LEN: usize = 255;

/// Serialize a new snapshot table entry (no padding).
fn entry_bytes(info: &SnapshotInfo, l1_offset: u64, l1_size: u32, disk_size: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(64 + info.id.len() + info.name.len());
    e.extend_from_slice(&l1_offset.to_be_bytes());
    e.extend_from_slice(&l1_size.to_be_bytes());
    e.extend_from_slice(&(info.id.len() as u16).to_be_bytes());
    e.extend_from_slice(&(info.name.len() as u16).to_be_bytes());
    e.extend_from_slice(&(info.date_sec as u32).to_be_bytes());
    e.extend_from_slice(&info.date_nsec.to_be_bytes());
    let clock = info
        .vm_clock_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(info.vm_clock_nsec));
    e.extend_from_slice(&clock.to_be_bytes());
    e.extend_from_slice(&(info.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
    e.extend_from_slice(&EXTRA_DATA_LEN.to_be_bytes());
    e.extend_from_slice(&info.vm_state_size.to_be_bytes());
    e.extend_from_slice(&disk_size.to_be_bytes());
    e.extend_from_slice(&info.icount.unwrap_or(u64::MAX).to_be_bytes());
    e.extend_from_slice(info.id.as_bytes());
    e.extend_from_slice(info.name.as_bytes());
    e
}

/// The first snapshot whose id or name is `key` (qemu's `bdrv_snapshot_find`).
fn find(snaps: &[Snapshot], key: &str) -> Result<usize> {
    snaps
        .iter()
        .position(|s| s.info.id == key)
        .or_else(|| snaps.iter().position(|s| s.info.name == key))
        .ok_or_else(|| Error::usage(format!("no snapshot with id or name '{key}'")))
}

impl Inner {
    /// Host clusters an L2 entry holds a reference to (a data cluster, or every cluster a
    /// compressed span touches).
    fn entry_clusters(&self, entry: u64, out: &mut Vec<u64>) {
        let cs = self.g.cs;
        if entry & OFLAG_COMPRESSED != 0 {
            let (host, len) = self.g.compressed_span(entry);
            let mut c = host / cs * cs;
            let last = (host + len.max(1) - 1) / cs * cs;
            while c <= last {
                out.push(c);
                c += cs;
            }
        } else {
            let host = entry & L2E_OFFSET_MASK;
            if host != 0 {
                out.push(host);
            }
        }
    }

    /// Every cluster the L1 table `l1` reaches (its L2 tables and their clusters), once per
    /// reference, handed to `f` one L2 table at a time.
    fn walk_l1(
        &mut self,
        l1: &[u64],
        f: &mut dyn FnMut(&mut Inner, &[u64]) -> Result<()>,
    ) -> Result<()> {
        let mut refs = Vec::new();
        for &l1e in l1 {
            let off = l1e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            refs.clear();
            refs.push(off);
            for idx in 0..self.g.l2_entries {
                let (e, _) = self.l2_entry(off, idx)?;
                self.entry_clusters(e, &mut refs);
            }
            f(self, &refs)?;
        }
        Ok(())
    }

    /// Read a snapshot's L1 table.
    fn read_snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        let bytes = u64::from(sn.l1_size) * 8;
        if bytes > MAX_L1_SIZE {
            return Err(Error::limit(format!(
                "qcow2 snapshot '{}' L1 table has {} entries, more than {MAX_L1_SIZE} bytes",
                sn.info.name, sn.l1_size
            )));
        }
        if sn.l1_size == 0 {
            return Ok(Vec::new());
        }
        check_table(
            "snapshot L1 table",
            sn.l1_offset,
            bytes,
            self.g.cs,
            self.file_len()?,
        )?;
        read_u64s(
            self.st.as_ref(),
            sn.l1_offset,
            u64::from(sn.l1_size),
            "snapshot L1 table",
        )
    }

    fn snapshot_preconditions(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.corrupt {
            return Err(self.corrupt_error());
        }
        if self.g.has_data_file {
            return Err(Error::unsupported(
                "internal snapshots of qcow2 images with an external data file",
            ));
        }
        if self.g.refcount_order == 0 {
            return Err(Error::unsupported(
                "internal snapshots need refcounts of at least 2 bits (this image has refcount_bits=1)",
            ));
        }
        // A snapshot operation rewrites refcounts of everything the tables reach: on an image
        // whose metadata is inconsistent it would spread the damage (double references).
        self.require_consistent("change internal snapshots")
    }

    /// Write `snaps` as the new snapshot table and point the header at it; the old table's
    /// clusters are released on the next flush.
    fn rewrite_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<()> {
        let cs = self.g.cs;
        let mut table = Vec::new();
        for sn in &snaps {
            table.extend_from_slice(&sn.raw);
            table.resize(table.len().div_ceil(8) * 8, 0);
        }
        if table.len() as u64 > MAX_SNAPSHOT_TABLE || snaps.len() as u64 > u64::from(MAX_SNAPSHOTS)
        {
            return Err(Error::limit(format!(
                "qcow2 snapshot table of {} entries ({} bytes) exceeds {MAX_SNAPSHOTS} entries or {MAX_SNAPSHOT_TABLE} bytes",
                snaps.len(),
                table.len()
            )));
        }
        let old = (self.snap_offset, self.snap_len, !self.snaps.is_empty());
        let new_off = if table.is_empty() {
            0
        } else {
            let clusters = (table.len() as u64).div_ceil(cs);
            let off = self.alloc(clusters)?;
            self.pre_write(&[], off, clusters * cs)?;
            table.resize((clusters * cs) as usize, 0);
            self.st
                .write_at(&table, off)
                .map_err(super::io_err(format!("writing snapshot table at {off:#x}")))?;
            off
        };
        // Refcounts, tables and the new snapshot table reach the disk before the header names it.
        self.flush()?;
        self.snap_len = if table.is_empty() {
            0
        } else {
            table.len() as u64
        };
        self.snap_offset = new_off;
        self.snaps = snaps;
        self.meta.invalidate();
        self.write_header()?;
        self.st.sync().map_err(super::io_err("syncing".into()))?;
        if old.2 && old.0 != 0 {
            let mut c = old.0 / cs * cs;
            while c < old.0 + old.1 {
                self.pending_free.push(c);
                c += cs;
            }
        }
        Ok(())
    }

    /// Set the "copied" flag (spec: L1/L2 bit 63, "refcount is exactly one") on every active L1
    /// and L2 entry whose cluster's refcount is one, and clear it elsewhere.
    fn fix_copied_flags(&mut self) -> Result<()> {
        let l1 = self.l1.clone();
        for (i, &l1e) in l1.iter().enumerate() {
            let off = l1e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let sole = self.rc_get(off)? == 1;
            let want = if sole { off | OFLAG_COPIED } else { off };
            if want != l1e {
                self.l1[i] = want;
                self.l1_dirty = true;
            }
            for idx in 0..self.g.l2_entries {
                let (e, bitmap) = self.l2_entry(off, idx)?;
                if e & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let host = e & L2E_OFFSET_MASK;
                let copied = host != 0 && self.rc_get(host)? == 1;
                let want = if copied {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                if want != e {
                    self.set_l2_entry(off, idx, want, bitmap)?;
                }
            }
        }
        Ok(())
    }

    fn snapshot_create(&mut self, name: &str) -> Result<SnapshotInfo> {
        self.snapshot_preconditions()?;
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(Error::usage(format!(
                "snapshot name must be 1 to {MAX_NAME_LEN} bytes long"
            )));
        }
        if self.snaps.iter().any(|s| s.info.name == name) {
            return Err(Error::usage(format!(
                "a snapshot named '{name}' already exists"
            )));
        }
        // qemu's find_new_snapshot_id: one more than the largest numeric id.
        let id = self
            .snaps
            .iter()
            .filter_map(|s| s.info.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        self.flush()?;
        let cs = self.g.cs;
        // The snapshot's copy of the L1 table, without "copied" flags (they describe the
        // active table only).
        let l1: Vec<u64> = self.l1.iter().map(|e| e & !OFLAG_COPIED).collect();
        let l1_size = u32::try_from(l1.len())
            .map_err(|_| Error::limit("qcow2 L1 table has more than 2^32 entries"))?;
        let l1_offset = if l1.is_empty() {
            0
        } else {
            let clusters = (l1.len() as u64 * 8).div_ceil(cs);
            let off = self.alloc(clusters)?;
            self.pre_write(&[], off, clusters * cs)?;
            let mut bytes = u64s_to_bytes(&l1);
            bytes.resize((clusters * cs) as usize, 0);
            self.st
                .write_at(&bytes, off)
                .map_err(super::io_err(format!(
                    "writing snapshot L1 table at {off:#x}"
                )))?;
            off
        };
        // One more reference to everything the active table reaches.
        self.walk_l1(&l1, &mut |i, refs| {
            for &c in refs {
                i.rc_add(c, 1)?;
            }
            Ok(())
        })?;
        self.l1 = l1;
        self.l1_dirty = true;
        self.fix_copied_flags()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let info = SnapshotInfo {
            id: id.to_string(),
            name: name.to_string(),
            vm_state_size: 0,
            date_sec: now.as_secs().min(u64::from(u32::MAX)),
            date_nsec: now.subsec_nanos(),
            vm_clock_sec: 0,
            vm_clock_nsec: 0,
            // qemu-img records icount 0 (no record/replay) for snapshots it makes offline.
            icount: Some(0),
        };
        let raw = entry_bytes(&info, l1_offset, l1_size, self.size);
        let mut snaps = self.snaps.clone();
        snaps.push(Snapshot {
            info: info.clone(),
            l1_offset,
            l1_size,
            disk_size: Some(self.size),
            raw,
        });
        self.rewrite_snapshot_table(snaps)?;
        self.flush()?;
        Ok(info)
    }

    fn snapshot_apply(&mut self, key: &str) -> Result<()> {
        self.snapshot_preconditions()?;
        let at = find(&self.snaps, key)?;
        let sn = self.snaps[at].clone();
        self.flush()?;
        let cs = self.g.cs;
        let new_size = sn.disk_size.unwrap_or(self.size);
        let per_l1 = self.g.l2_entries * cs;
        let needed = new_size.div_ceil(per_l1);
        let mut l1: Vec<u64> = self
            .read_snapshot_l1(&sn)?
            .into_iter()
            .map(|e| e & !OFLAG_COPIED)
            .collect();
        if (l1.len() as u64) < needed {
            if needed * 8 > MAX_L1_SIZE {
                return Err(Error::limit(format!(
                    "snapshot disk size {new_size} needs an L1 table larger than {MAX_L1_SIZE} bytes"
                )));
            }
            l1.resize(needed as usize, 0);
        }
        // References for the new active table first, so nothing it reaches is freed below.
        self.walk_l1(&l1, &mut |i, refs| {
            for &c in refs {
                i.rc_add(c, 1)?;
            }
            Ok(())
        })?;
        let old_l1 = std::mem::replace(&mut self.l1, l1);
        self.meta.invalidate();
        let old_clusters = (old_l1.len() as u64 * 8).div_ceil(cs);
        let new_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        if new_clusters > old_clusters || self.l1_offset == 0 {
            let old = self.l1_offset;
            self.l1_offset = self.alloc(new_clusters.max(1))?;
            if old != 0 {
                for k in 0..old_clusters {
                    self.pending_free.push(old + k * cs);
                }
            }
        }
        self.l1_dirty = true;
        self.size = new_size;
        self.header_dirty = true;
        // The old active table's references go once the new one is on disk.
        self.walk_l1(&old_l1, &mut |i, refs| {
            i.pending_free.extend_from_slice(refs);
            Ok(())
        })?;
        self.flush()?;
        // Freed tables may be reused as data from now on: forget cached copies.
        self.l2.clear();
        self.fix_copied_flags()?;
        self.flush()
    }

    fn snapshot_delete(&mut self, key: &str) -> Result<SnapshotInfo> {
        self.snapshot_preconditions()?;
        let at = find(&self.snaps, key)?;
        let sn = self.snaps[at].clone();
        self.flush()?;
        let cs = self.g.cs;
        let l1 = self.read_snapshot_l1(&sn)?;
        self.walk_l1(&l1, &mut |i, refs| {
            i.pending_free.extend_from_slice(refs);
            Ok(())
        })?;
        if sn.l1_offset != 0 {
            let clusters = (u64::from(sn.l1_size) * 8).div_ceil(cs);
            for k in 0..clusters {
                self.pending_free.push(sn.l1_offset + k * cs);
            }
        }
        let mut snaps = self.snaps.clone();
        snaps.remove(at);
        self.rewrite_snapshot_table(snaps)?;
        self.flush()?;
        self.l2.clear();
        self.fix_copied_flags()?;
        self.flush()?;
        Ok(sn.info)
    }

    /// Show the snapshot's L1 table and size instead of the active ones (read-only images).
    fn view_snapshot(&mut self, key: &str) -> Result<()> {
        if self.writable {
            return Err(Error::usage(
                "a snapshot view needs an image opened read-only",
            ));
        }
        let at = find(&self.snaps, key)?;
        let sn = self.snaps[at].clone();
        let l1 = self.read_snapshot_l1(&sn)?;
        let size = sn.disk_size.unwrap_or(self.size);
        let needed = size.div_ceil(self.g.l2_entries * self.g.cs);
        if (l1.len() as u64) < needed {
            return Err(Error::invalid(format!(
                "qcow2 snapshot '{}' L1 table has {} entries but its disk size {size} needs {needed}",
                sn.info.name,
                l1.len()
            )));
        }
        self.l1 = l1;
        self.l1_offset = sn.l1_offset;
        self.size = size;
        self.l2.clear();
        self.meta.invalidate();
        Ok(())
    }
}

fn driver(img: &Image) -> Result<&Qcow2Driver> {
    img.driver()
        .as_any()
        .downcast_ref::<Qcow2Driver>()
        .ok_or_else(|| {
            Error::unsupported(format!(
                "internal snapshots need a qcow2 image; {} is {}",
                img.path().display(),
                img.format()
            ))
        })
}

/// The image's internal snapshots (any format: those without snapshots list none).
pub fn list(img: &Image) -> Vec<SnapshotInfo> {
    img.driver().info().snapshots
}

/// Create an internal snapshot named `name` of the current disk state (`qemu-img snapshot -c`).
/// The image must be a qcow2 image opened for writing. Names must be unique.
pub fn create(img: &Image, name: &str) -> Result<SnapshotInfo> {
    driver(img)?
        .lock_settled(None)
        .snapshot_create(name)
        .map_err(|e| e.with_path(img.path()))
}

/// Revert the disk to snapshot `key` (id or name; `qemu-img snapshot -a`). The snapshot stays.
pub fn apply(img: &Image, key: &str) -> Result<()> {
    driver(img)?
        .lock_settled(None)
        .snapshot_apply(key)
        .map_err(|e| e.with_path(img.path()))
}

/// Delete snapshot `key` (id or name; `qemu-img snapshot -d`), freeing what only it referenced.
pub fn delete(img: &Image, key: &str) -> Result<SnapshotInfo> {
    driver(img)?
        .lock_settled(None)
        .snapshot_delete(key)
        .map_err(|e| e.with_path(img.path()))
}

/// Open the qcow2 image at `path` read-only with the guest contents of snapshot `key` (id or
/// name) — for `convert -l`. The backing chain opens as `opts` says.
pub fn open_snapshot(path: &Path, opts: &OpenOptions, key: &str) -> Result<Image> {
    let img = Image::open(path, &opts.clone().write(false))?;
    view(&img, key)?;
    Ok(img)
}

/// Make a qcow2 image opened read-only show the guest contents (and size) of snapshot `key`
/// (id or name) from now on. Call it before reading: the image forgets its active state.
pub fn view(img: &Image, key: &str) -> Result<()> {
    driver(img)?
        .lock()
        .view_snapshot(key)
        .map_err(|e| e.with_path(img.path()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn info(id: &str, name: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            name: name.into(),
            vm_state_size: 0,
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_sec: 3,
            vm_clock_nsec: 7,
            icount: Some(0),
        }
    }

    #[test]
    fn a_written_entry_reads_back_with_its_disk_size_and_extra_data() {
        let e = entry_bytes(&info("4", "before upgrade"), 0x30000, 2, 1 << 30);
        let mut table = e.clone();
        table.resize(table.len().div_ceil(8) * 8, 0);
        let second = entry_bytes(&info("5", "x"), 0x40000, 1, 4096);
        table.extend_from_slice(&second);
        let st = MemStorage::new();
        st.set_len(0x10000 + 4096).unwrap();
        st.write_at(&table, 0x10000).unwrap();
        let (snaps, len) = read_table(&st, 0x10000, 2, 0x10000, 0x11000).unwrap();
        assert_eq!(len as usize, table.len().div_ceil(8) * 8);
        assert_eq!(snaps[0].info, info("4", "before upgrade"));
        assert_eq!(snaps[0].disk_size, Some(1 << 30));
        assert_eq!((snaps[0].l1_offset, snaps[0].l1_size), (0x30000, 2));
        assert_eq!(snaps[0].raw, e);
        assert_eq!(snaps[1].info.name, "x");
        assert_eq!(snaps[1].disk_size, Some(4096));
    }

    #[test]
    fn lookups_take_the_id_before_the_name() {
        let mk = |id: &str, name: &str| Snapshot {
            info: info(id, name),
            l1_offset: 0,
            l1_size: 0,
            disk_size: None,
            raw: Vec::new(),
        };
        let snaps = [mk("1", "2"), mk("2", "a")];
        assert_eq!(find(&snaps, "2").unwrap(), 1);
        assert_eq!(find(&snaps, "a").unwrap(), 1);
        assert!(find(&snaps, "zz").is_err());
    }
}
