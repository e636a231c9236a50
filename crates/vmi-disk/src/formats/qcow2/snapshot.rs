//! The internal snapshot table (qemu `docs/interop/qcow2.txt`, "Snapshots"): read and bounded, so
//! `info` can list snapshots and `check` can count the clusters their L1 tables reference.

use crate::driver::SnapshotInfo;
use crate::error::{Error, Result};
use crate::storage::Storage;

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

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
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
        let end = at
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= file_len && e - offset <= MAX_SNAPSHOT_TABLE)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "qcow2 snapshot table entry at {at:#x} runs past the file end or {MAX_SNAPSHOT_TABLE} bytes"
                ))
            })?;
        let _ = end;
        storage
            .read_at(buf, at)
            .map_err(|e| Error::io(format!("reading snapshot table at {at:#x}"), e))
    };
    for i in 0..count {
        let mut fixed = [0u8; ENTRY_FIXED as usize];
        read(&mut fixed, pos)?;
        let l1_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = be16(&fixed, 12);
        let name_len = be16(&fixed, 14);
        let date_sec = be32(&fixed, 16);
        let date_nsec = be32(&fixed, 20);
        let vm_clock = be64(&fixed, 24);
        let mut vm_state = u64::from(be32(&fixed, 32));
        let extra_len = be32(&fixed, 36);
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
        if extra.len() >= 8 {
            vm_state = be64(extra, 0);
        }
        if extra.len() >= 24 {
            let ic = be64(extra, 16);
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
