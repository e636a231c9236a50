//! The internal snapshot table (qemu `docs/interop/qcow2.txt`, "Snapshots"): read and bounded, so
//! `info` can list snapshots and `check` can count the clusters their L1 tables reference.

use crate::driver::SnapshotInfo;
use crate::error::{Error, Result};
use crate::storage::Storage;
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
        });
        pos = (pos + ENTRY_FIXED + var_len).div_ceil(8) * 8;
    }
    Ok((out, pos - offset))
}
