//! The DOS/MBR partition table: four primary entries in sector 0 (offset 446, 16 bytes each,
//! signature 0x55 0xAA at 510), and extended partitions (types 0x05, 0x0F, 0x85) holding a chain
//! of extended boot records, each with one logical partition (relative to that EBR) and a link
//! to the next EBR (relative to the extended partition's start) — as Linux's `msdos.c` and
//! util-linux's `sfdisk` read them.

use super::{check_layout, read, Partition, PartitionTable, TableKind, SECTOR};
use crate::error::{Error, Result};
use std::collections::HashSet;
use vmi_disk::Image;

/// Offset of the first partition entry in an MBR or EBR.
const ENTRIES_OFFSET: usize = 446;
/// Size of one entry.
const ENTRY_SIZE: usize = 16;
/// The boot signature at bytes 510–511.
const SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// Type byte of the protective MBR partition of a GPT disk.
pub const TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// Most logical partitions followed in one extended chain (Linux stops far earlier in practice;
/// a chain past this is hostile).
pub const MAX_LOGICAL: usize = 256;

/// One 16-byte entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// 0x80 active, 0x00 inactive.
    pub status: u8,
    /// The partition type.
    pub kind: u8,
    /// First sector (LBA).
    pub lba: u32,
    /// Sector count.
    pub sectors: u32,
}

impl Entry {
    fn parse(b: &[u8]) -> Entry {
        let u32le = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Entry {
            status: b[0],
            kind: b[4],
            lba: u32le(8),
            sectors: u32le(12),
        }
    }

    fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0F | 0x85)
    }

    fn is_empty(&self) -> bool {
        self.kind == 0 || self.sectors == 0
    }
}

/// Sector 0 read as an MBR.
#[derive(Debug, Clone)]
pub struct Mbr {
    /// The four primary entries.
    pub entries: [Entry; 4],
    /// Bytes 440–443.
    pub disk_signature: u32,
    /// True when an entry has type 0xEE (the disk is GPT).
    pub protective: bool,
}

/// Parse the four entries of a boot record: `None` when the sector has no boot signature or its
/// entries are not a partition table (a status byte other than 0x00/0x80: a filesystem's boot
/// sector rather than a table).
pub fn parse_boot_record(sector: &[u8]) -> Option<[Entry; 4]> {
    if sector.len() < 512 || sector[510..512] != SIGNATURE {
        return None;
    }
    let mut entries = [Entry {
        status: 0,
        kind: 0,
        lba: 0,
        sectors: 0,
    }; 4];
    for (i, e) in entries.iter_mut().enumerate() {
        let o = ENTRIES_OFFSET + i * ENTRY_SIZE;
        *e = Entry::parse(&sector[o..o + ENTRY_SIZE]);
        if e.status != 0 && e.status != 0x80 {
            return None;
        }
    }
    Some(entries)
}

/// Read sector 0: `None` when it holds no partition table.
pub fn read_mbr(img: &Image) -> Result<Option<Mbr>> {
    if img.virtual_size() < SECTOR {
        return Ok(None);
    }
    let s = read(img, 0, SECTOR as usize)?;
    let Some(entries) = parse_boot_record(&s) else {
        return Ok(None);
    };
    if entries.iter().all(Entry::is_empty) {
        return Ok(None);
    }
    Ok(Some(Mbr {
        entries,
        disk_signature: u32::from_le_bytes([s[440], s[441], s[442], s[443]]),
        protective: entries.iter().any(|e| e.kind == TYPE_GPT_PROTECTIVE),
    }))
}

fn span(lba: u64, sectors: u64) -> Result<(u64, u64)> {
    let start = lba
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::Partition("start overflows".into()))?;
    let len = sectors
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::Partition("length overflows".into()))?;
    Ok((start, len))
}

/// The partitions of an MBR disk: primaries and the logical partitions of its extended partition.
pub fn read_partitions(img: &Image, mbr: &Mbr) -> Result<PartitionTable> {
    let disk = img.virtual_size();
    let mut parts = Vec::new();
    let mut extended: Option<(u64, u64)> = None;
    for (i, e) in mbr.entries.iter().enumerate() {
        if e.is_empty() {
            continue;
        }
        let (start, len) = span(u64::from(e.lba), u64::from(e.sectors))?;
        if e.lba == 0 {
            return Err(Error::Partition(format!(
                "partition {} starts at sector 0, over the table itself",
                i + 1
            )));
        }
        if e.is_extended() {
            if extended.is_some() {
                return Err(Error::Partition(
                    "more than one extended partition in the MBR".into(),
                ));
            }
            extended = Some((u64::from(e.lba), u64::from(e.sectors)));
        }
        parts.push(Partition {
            number: i as u32 + 1,
            start,
            len,
            type_id: format!("0x{:02x}", e.kind),
            guid: None,
            name: None,
            bootable: e.status == 0x80,
        });
    }
    check_layout(&parts, disk)?;
    // The extended partition is a container: report the logical partitions in it instead.
    parts.retain(|p| !matches!(p.type_id.as_str(), "0x05" | "0x0f" | "0x85"));
    if let Some((ext_lba, ext_sectors)) = extended {
        parts.extend(read_logical(img, ext_lba, ext_sectors)?);
    }
    check_layout(&parts, disk)?;
    Ok(PartitionTable {
        kind: TableKind::Mbr,
        partitions: parts,
        disk_id: format!("0x{:08x}", mbr.disk_signature),
        warnings: Vec::new(),
    })
}

/// Walk the EBR chain of the extended partition at `ext_lba` (`ext_sectors` long).
fn read_logical(img: &Image, ext_lba: u64, ext_sectors: u64) -> Result<Vec<Partition>> {
    let ext_end = ext_lba + ext_sectors;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut ebr = ext_lba;
    loop {
        if !seen.insert(ebr) {
            return Err(Error::Partition(format!(
                "the extended partition's chain loops back to sector {ebr}"
            )));
        }
        if out.len() >= MAX_LOGICAL {
            return Err(Error::Partition(format!(
                "more than {MAX_LOGICAL} logical partitions"
            )));
        }
        if ebr >= ext_end {
            return Err(Error::Partition(format!(
                "extended boot record at sector {ebr} lies outside the extended partition"
            )));
        }
        let (off, _) = span(ebr, 1)?;
        let s = read(img, off, SECTOR as usize)?;
        let entries = parse_boot_record(&s).ok_or_else(|| {
            Error::Partition(format!(
                "extended boot record at sector {ebr} has no valid signature or entries"
            ))
        })?;
        let logical = entries[0];
        if !logical.is_empty() {
            let first = ebr
                .checked_add(u64::from(logical.lba))
                .ok_or_else(|| Error::Partition("logical start overflows".into()))?;
            let last = first + u64::from(logical.sectors);
            if logical.lba == 0 || last > ext_end {
                return Err(Error::Partition(format!(
                    "logical partition {} lies outside its extended partition",
                    out.len() + 5
                )));
            }
            let (start, len) = span(first, u64::from(logical.sectors))?;
            out.push(Partition {
                number: out.len() as u32 + 5,
                start,
                len,
                type_id: format!("0x{:02x}", logical.kind),
                guid: None,
                name: None,
                bootable: logical.status == 0x80,
            });
        }
        let next = entries[1];
        if next.is_empty() || !next.is_extended() {
            break;
        }
        ebr = ext_lba
            .checked_add(u64::from(next.lba))
            .ok_or_else(|| Error::Partition("EBR link overflows".into()))?;
    }
    Ok(out)
}
