//! Partition tables: MBR (with extended/logical chains, [`mbr`]) and GPT (both headers, CRC32
//! checks, [`gpt`]), read from any [`Image`]. A disk with neither is one whole-disk volume.
//!
//! Every table is hostile input: counts and sizes are bounded by named constants, partitions must
//! lie inside the disk and must not overlap, chains of extended boot records are bounded and
//! loop-checked. A table that breaks a rule is an error that names the rule, never a panic.

pub mod gpt;
pub mod mbr;

use crate::error::{Error, Result};
use serde::Serialize;
use vmi_disk::Image;

/// The logical sector size the tables are read with.
pub const SECTOR: u64 = 512;

/// Which kind of table a disk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// DOS/MBR partition table.
    Mbr,
    /// GUID partition table.
    Gpt,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// The number Linux gives it (MBR: 1–4 primary, 5… logical; GPT: entry index + 1).
    pub number: u32,
    /// Byte offset in the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// MBR type byte (`0x83`) or GPT type GUID, as text.
    pub type_id: String,
    /// GPT unique partition GUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// GPT partition name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// MBR active flag / GPT legacy BIOS bootable attribute.
    pub bootable: bool,
}

/// A disk's partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    /// MBR or GPT.
    pub kind: TableKind,
    /// The partitions, in number order.
    pub partitions: Vec<Partition>,
    /// GPT disk GUID or MBR disk signature.
    pub disk_id: String,
    /// Problems that did not stop reading (a damaged backup GPT header).
    pub warnings: Vec<String>,
}

/// Read a byte range of the image, checked against its size.
pub(crate) fn read(img: &Image, offset: u64, len: usize) -> Result<Vec<u8>> {
    let end = offset
        .checked_add(len as u64)
        .ok_or_else(|| Error::Partition(format!("read {offset}+{len} overflows")))?;
    if end > img.virtual_size() {
        return Err(Error::Partition(format!(
            "structure at byte {offset} (+{len}) lies past the disk's end ({} bytes)",
            img.virtual_size()
        )));
    }
    let mut buf = vec![0u8; len];
    img.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// The partition table of `img`: `None` for a disk without one (a filesystem on the whole disk).
pub fn read_table(img: &Image) -> Result<Option<PartitionTable>> {
    let Some(mbr) = mbr::read_mbr(img)? else {
        return Ok(None);
    };
    if mbr.protective {
        return gpt::read_gpt(img).map(Some);
    }
    mbr::read_partitions(img, &mbr).map(Some)
}

/// Refuse overlapping partitions and partitions past `disk_len`.
pub(crate) fn check_layout(parts: &[Partition], disk_len: u64) -> Result<()> {
    let mut sorted: Vec<&Partition> = parts.iter().collect();
    sorted.sort_by_key(|p| p.start);
    for p in &sorted {
        let end = p
            .start
            .checked_add(p.len)
            .ok_or_else(|| Error::Partition(format!("partition {} overflows", p.number)))?;
        if end > disk_len {
            return Err(Error::Partition(format!(
                "partition {} ends at byte {end}, past the disk's end ({disk_len} bytes)",
                p.number
            )));
        }
    }
    for w in sorted.windows(2) {
        if w[0].start + w[0].len > w[1].start {
            return Err(Error::Partition(format!(
                "partitions {} and {} overlap",
                w[0].number, w[1].number
            )));
        }
    }
    Ok(())
}

/// Entry point for the fuzz target: `data` as a raw disk, its partition table read. Anything but
/// a panic is a pass.
#[doc(hidden)]
pub fn fuzz_read_table(data: &[u8]) {
    let storage = Box::new(vmi_disk::storage::MemStorage::from_bytes(data.to_vec()));
    if let Ok(img) = Image::from_storage(
        storage,
        std::path::Path::new("fuzz.raw"),
        Some(vmi_disk::Format::Raw),
        false,
        &vmi_disk::Gate::deny_all(),
    ) {
        let _ = read_table(&img);
    }
}
