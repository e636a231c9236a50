//! The Parallels format extension (qemu `docs/interop/parallels.txt`, "Format Extension"; qemu's
//! `block/parallels-ext.c`): one cluster at the header's `ext_off`, holding a magic, an MD5
//! checksum of the rest of the cluster, and a list of features ending in a zero magic. The only
//! feature defined is the dirty bitmap: its size, a UUID naming it, its granularity and an L1
//! table whose entries are 0 (all clear), 1 (all set) or the sector of a cluster of bitmap data.
//!
//! vmi validates the extension exactly where qemu does (a read-only open) and with qemu's
//! checks, so that an image qemu refuses is refused with the same reason. The bitmaps are kept
//! as parsed (qemu loads them as read-only dirty bitmaps and `qemu-img info` does not print them);
//! their data clusters are only checked to lie in the file, never read.

use super::header::{Layout, SECTOR};
use crate::error::{Error, Result};
use crate::storage::Storage;
use md5::{Digest, Md5};
use std::collections::HashSet;

/// Magic of the extension cluster.
pub(crate) const EXT_MAGIC: u64 = 0xAB23_4CEF_23DC_EA87;
/// Magic of the terminating feature.
pub(crate) const END_OF_FEATURES: u64 = 0;
/// Magic of the dirty bitmap feature.
pub(crate) const DIRTY_BITMAP_MAGIC: u64 = 0x2038_5FAE_252C_B34A;
/// Bytes of the extension header: magic and MD5 checksum.
pub(crate) const EXT_HEADER_LEN: usize = 24;
/// Bytes of a feature header: magic, flags, data size, unused.
pub(crate) const FEATURE_HEADER_LEN: usize = 24;
/// Bytes of the dirty bitmap feature before its L1 table: size, UUID, granularity, L1 size.
pub(crate) const BITMAP_FEATURE_LEN: usize = 32;
/// Largest extension cluster read into memory. qemu reads one cluster whatever its size (up to
/// 2 GiB); vmi refuses to hold more than this for a structure that is a few hundred bytes in
/// practice.
pub(crate) const MAX_EXT_CLUSTER: u64 = 64 << 20;

/// One dirty bitmap the extension declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The bitmap's name: its UUID, as qemu names it.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// The L1 table: 0 all clear, 1 all set, else the sector of a cluster of bitmap data.
    pub l1: Vec<u64>,
}

/// What the extension holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extension {
    /// The dirty bitmaps, in order.
    pub bitmaps: Vec<DirtyBitmap>,
    /// Exclusive end (bytes) of the extension cluster and the bitmap data clusters.
    pub end: u64,
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

/// Read and validate the extension cluster at sector `ext_off`.
pub(crate) fn read(storage: &dyn Storage, layout: &Layout, file_len: u64) -> Result<Extension> {
    let cs = layout.cluster_size;
    let start = layout.ext_off * SECTOR;
    let end = start
        .checked_add(cs)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| {
            Error::invalid(format!(
            "Parallels format extension at sector {} is outside the image file ({file_len} bytes)",
            layout.ext_off
        ))
        })?;
    if cs > MAX_EXT_CLUSTER {
        return Err(Error::limit(format!(
            "Parallels format extension cluster of {cs} bytes is larger than {MAX_EXT_CLUSTER}"
        )));
    }
    let mut cluster = vec![0u8; cs as usize];
    storage.read_at(&mut cluster, start).map_err(|e| {
        Error::io(
            format!("reading Parallels format extension at {start:#x}"),
            e,
        )
    })?;
    let mut ext = parse(&cluster, layout, file_len)?;
    ext.end = ext.end.max(end);
    Ok(ext)
}

/// Parse an extension cluster (`cluster.len()` is the cluster size).
pub(crate) fn parse(cluster: &[u8], layout: &Layout, file_len: u64) -> Result<Extension> {
    if cluster.len() < EXT_HEADER_LEN {
        return Err(Error::invalid(
            "Parallels format extension cluster is too small",
        ));
    }
    let magic = le64(cluster, 0);
    if magic != EXT_MAGIC {
        return Err(Error::invalid(format!(
            "wrong Parallels format extension magic {magic:#x}, expected {EXT_MAGIC:#x}"
        )));
    }
    let body = &cluster[EXT_HEADER_LEN..];
    if Md5::digest(body).as_slice() != &cluster[8..24] {
        return Err(Error::invalid(
            "wrong checksum in the Parallels format extension header: the extension is corrupted",
        ));
    }
    let mut ext = Extension::default();
    let mut names = HashSet::new();
    let mut pos = 0usize;
    loop {
        let remaining = body.len() - pos;
        if remaining < FEATURE_HEADER_LEN {
            return Err(Error::invalid(format!(
                "Parallels format extension: {remaining} bytes left, too few for a feature header"
            )));
        }
        let fh = &body[pos..pos + FEATURE_HEADER_LEN];
        let (fmagic, flags, data_size) = (le64(fh, 0), le64(fh, 8), le32(fh, 16));
        pos += FEATURE_HEADER_LEN;
        let remaining = body.len() - pos;
        if flags != 0 {
            return Err(Error::unsupported(format!(
                "Parallels format extension feature {fmagic:#x} has flags {flags:#x}"
            )));
        }
        let padded = u64::from(data_size).div_ceil(8) * 8;
        if padded > remaining as u64 {
            return Err(Error::invalid(format!(
                "Parallels format extension feature {fmagic:#x}: data size {data_size} exceeds \
                 the extension cluster"
            )));
        }
        let data = &body[pos..pos + data_size as usize];
        match fmagic {
            END_OF_FEATURES => return Ok(ext),
            DIRTY_BITMAP_MAGIC => {
                let bm = parse_bitmap(data, layout, file_len, &mut ext.end)?;
                if !names.insert(bm.name.clone()) {
                    return Err(Error::invalid(format!(
                        "Parallels format extension: bitmap {} appears twice",
                        bm.name
                    )));
                }
                ext.bitmaps.push(bm);
            }
            other => {
                return Err(Error::unsupported(format!(
                    "Parallels format extension: unknown feature {other:#x}"
                )))
            }
        }
        pos += padded as usize;
    }
}

/// Parse one dirty bitmap feature, as qemu's `parallels_load_bitmap` checks it.
fn parse_bitmap(data: &[u8], layout: &Layout, file_len: u64, end: &mut u64) -> Result<DirtyBitmap> {
    if data.len() < BITMAP_FEATURE_LEN {
        return Err(Error::invalid(format!(
            "Parallels dirty bitmap feature of {} bytes, expected at least {BITMAP_FEATURE_LEN}",
            data.len()
        )));
    }
    let size = le64(data, 0);
    if size != layout.total_sectors {
        return Err(Error::invalid(format!(
            "Parallels dirty bitmap size {size} sectors differs from the disk size {} sectors",
            layout.total_sectors
        )));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&data[8..24]);
    let name = uuid::Uuid::from_bytes(id).hyphenated().to_string();
    let granularity = u64::from(le32(data, 24)) * SECTOR;
    if granularity < SECTOR || granularity > u64::from(u32::MAX) || !granularity.is_power_of_two() {
        return Err(Error::invalid(format!(
            "Parallels dirty bitmap {name}: granularity {granularity} is not a power of two of \
             at least {SECTOR} bytes"
        )));
    }
    let l1_size = le32(data, 28);
    let table = &data[BITMAP_FEATURE_LEN..];
    if u64::from(l1_size) * 8 > table.len() as u64 {
        return Err(Error::invalid(format!(
            "Parallels dirty bitmap {name}: L1 table of {l1_size} entries exceeds the feature data"
        )));
    }
    // qemu serialises a bitmap in 64-bit words; the L1 table covers that in whole clusters.
    let bits = layout.virtual_size().div_ceil(granularity);
    let ser_bytes = bits.div_ceil(64) * 8;
    let expected = ser_bytes.div_ceil(layout.cluster_size);
    if expected != u64::from(l1_size) {
        return Err(Error::invalid(format!(
            "Parallels dirty bitmap {name}: L1 table size {l1_size} does not match the bitmap \
             size and cluster size (expected {expected})"
        )));
    }
    let mut l1 = Vec::with_capacity(l1_size as usize);
    for i in 0..l1_size as usize {
        let entry = le64(table, i * 8);
        if entry > 1 {
            let host = entry
                .checked_mul(SECTOR)
                .and_then(|h| h.checked_add(layout.cluster_size))
                .filter(|&e| e <= file_len)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "Parallels dirty bitmap {name}: data cluster at sector {entry} is \
                         outside the image file"
                    ))
                })?;
            *end = (*end).max(host);
        }
        l1.push(entry);
    }
    Ok(DirtyBitmap {
        name,
        granularity,
        l1,
    })
}
