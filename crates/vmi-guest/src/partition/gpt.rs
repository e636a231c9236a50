//! The GUID partition table (UEFI 2.10 §5.3): the primary header at LBA 1 and its entry array,
//! the backup header at the last LBA (or where the primary's AlternateLBA says) and its array.
//! Both headers' CRC32 and both arrays' CRC32 are checked; when the primary is damaged the backup
//! is used, and a damaged backup is reported as a warning, as `sgdisk -v` does.

use super::{check_layout, read, Partition, PartitionTable, TableKind, SECTOR};
use crate::error::{Error, Result};
use vmi_disk::Image;

/// "EFI PART", the signature every GPT header begins with.
const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The header's size in revision 1.0 (the smallest allowed HeaderSize).
const MIN_HEADER_SIZE: u32 = 92;
/// Smallest partition entry (UEFI: 128 × 2^n).
const MIN_ENTRY_SIZE: u32 = 128;
/// Largest partition entry accepted (a hostile header asks for more).
pub const MAX_ENTRY_SIZE: u32 = 4096;
/// Most partition entries accepted (tools create 128; Linux accepts far more, but the array must
/// also fit in [`MAX_ARRAY_BYTES`]).
pub const MAX_ENTRIES: u32 = 65536;
/// Largest entry array read (1 MiB: 128 entries of 128 bytes are 16 KiB).
pub const MAX_ARRAY_BYTES: u64 = 1 << 20;
/// GPT attribute bit 2: legacy BIOS bootable.
const ATTR_LEGACY_BOOTABLE: u64 = 1 << 2;

/// A parsed, checked header.
#[derive(Debug, Clone)]
struct Header {
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: [u8; 16],
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// A GUID in its usual text form (the first three fields are little-endian on disk).
pub fn guid_text(b: &[u8]) -> String {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    uuid::Uuid::from_bytes_le(a)
        .hyphenated()
        .to_string()
        .to_uppercase()
}

/// Parse and check the header in `sector` read from `lba`.
fn parse_header(sector: &[u8], lba: u64, disk_sectors: u64) -> Result<Header> {
    if &sector[..8] != SIGNATURE {
        return Err(Error::Partition(format!(
            "no GPT header signature at LBA {lba}"
        )));
    }
    let size = le32(sector, 12);
    if size < MIN_HEADER_SIZE || u64::from(size) > SECTOR {
        return Err(Error::Partition(format!(
            "GPT header at LBA {lba} declares size {size} (must be {MIN_HEADER_SIZE}..={SECTOR})"
        )));
    }
    let stored_crc = le32(sector, 16);
    let mut copy = sector[..size as usize].to_vec();
    copy[16..20].fill(0);
    let crc = crc32fast::hash(&copy);
    if crc != stored_crc {
        return Err(Error::Partition(format!(
            "GPT header at LBA {lba} has a bad CRC32 (stored {stored_crc:#010x}, computed {crc:#010x})"
        )));
    }
    let h = Header {
        my_lba: le64(sector, 24),
        alternate_lba: le64(sector, 32),
        first_usable: le64(sector, 40),
        last_usable: le64(sector, 48),
        disk_guid: sector[56..72].try_into().unwrap_or([0; 16]),
        entries_lba: le64(sector, 72),
        num_entries: le32(sector, 80),
        entry_size: le32(sector, 84),
        entries_crc: le32(sector, 88),
    };
    if h.my_lba != lba {
        return Err(Error::Partition(format!(
            "GPT header at LBA {lba} says it is at LBA {}",
            h.my_lba
        )));
    }
    if h.entry_size < MIN_ENTRY_SIZE
        || h.entry_size > MAX_ENTRY_SIZE
        || !h.entry_size.is_power_of_two()
    {
        return Err(Error::Partition(format!(
            "GPT entry size {} is not a power of two in {MIN_ENTRY_SIZE}..={MAX_ENTRY_SIZE}",
            h.entry_size
        )));
    }
    if h.num_entries > MAX_ENTRIES {
        return Err(Error::Partition(format!(
            "GPT declares {} partition entries (at most {MAX_ENTRIES} accepted)",
            h.num_entries
        )));
    }
    let array = u64::from(h.num_entries) * u64::from(h.entry_size);
    if array > MAX_ARRAY_BYTES {
        return Err(Error::Partition(format!(
            "GPT entry array of {array} bytes is larger than {MAX_ARRAY_BYTES}"
        )));
    }
    if h.first_usable > h.last_usable || h.last_usable >= disk_sectors {
        return Err(Error::Partition(format!(
            "GPT usable range {}..={} does not fit the disk's {disk_sectors} sectors",
            h.first_usable, h.last_usable
        )));
    }
    let array_sectors = array.div_ceil(SECTOR);
    let array_end = h
        .entries_lba
        .checked_add(array_sectors)
        .ok_or_else(|| Error::Partition("GPT entry array position overflows".into()))?;
    if h.entries_lba < 2 || array_end > disk_sectors {
        return Err(Error::Partition(format!(
            "GPT entry array at LBA {} ({array_sectors} sectors) is outside the disk",
            h.entries_lba
        )));
    }
    Ok(h)
}

/// Read and check the header at `lba` and its entry array; returns the partitions.
fn read_at_lba(img: &Image, lba: u64, disk_sectors: u64) -> Result<(Header, Vec<Partition>)> {
    let sector = read(img, lba * SECTOR, SECTOR as usize)?;
    let h = parse_header(&sector, lba, disk_sectors)?;
    let array_len = h.num_entries as usize * h.entry_size as usize;
    let array = read(img, h.entries_lba * SECTOR, array_len)?;
    let crc = crc32fast::hash(&array);
    if crc != h.entries_crc {
        return Err(Error::Partition(format!(
            "GPT entry array at LBA {} has a bad CRC32 (stored {:#010x}, computed {crc:#010x})",
            h.entries_lba, h.entries_crc
        )));
    }
    let mut parts = Vec::new();
    for (i, e) in array.chunks_exact(h.entry_size as usize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let number = i as u32 + 1;
        if first > last || first < h.first_usable || last > h.last_usable {
            return Err(Error::Partition(format!(
                "GPT partition {number} (LBA {first}..={last}) is outside the usable range {}..={}",
                h.first_usable, h.last_usable
            )));
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        parts.push(Partition {
            number,
            start: first * SECTOR,
            len: (last - first + 1) * SECTOR,
            type_id: guid_text(&e[..16]),
            guid: Some(guid_text(&e[16..32])),
            name: Some(String::from_utf16_lossy(&name)),
            bootable: le64(e, 48) & ATTR_LEGACY_BOOTABLE != 0,
        });
    }
    check_layout(&parts, disk_sectors * SECTOR)?;
    Ok((h, parts))
}

/// Read the GPT of a disk whose MBR is protective.
pub fn read_gpt(img: &Image) -> Result<PartitionTable> {
    let disk_sectors = img.virtual_size() / SECTOR;
    if disk_sectors < 3 {
        return Err(Error::Partition("disk too small for a GPT".into()));
    }
    let last = disk_sectors - 1;
    let primary = read_at_lba(img, 1, disk_sectors);
    let backup_lba = match &primary {
        Ok((h, _)) if h.alternate_lba > 1 && h.alternate_lba < disk_sectors => h.alternate_lba,
        _ => last,
    };
    let backup = read_at_lba(img, backup_lba, disk_sectors);
    let mut warnings = Vec::new();
    let (h, parts) = match (primary, backup) {
        (Ok(p), Ok(b)) => {
            if p.1 != b.1 {
                warnings.push("the backup GPT lists other partitions than the primary".into());
            }
            p
        }
        (Ok(p), Err(e)) => {
            warnings.push(format!("backup GPT header unusable: {e}"));
            p
        }
        (Err(e), Ok(b)) => {
            warnings.push(format!(
                "primary GPT header unusable, using the backup: {e}"
            ));
            b
        }
        (Err(p), Err(b)) => {
            return Err(Error::Partition(format!(
                "protective MBR but no usable GPT: primary: {p}; backup: {b}"
            )))
        }
    };
    Ok(PartitionTable {
        kind: TableKind::Gpt,
        partitions: parts,
        disk_id: guid_text(&h.disk_guid),
        warnings,
    })
}
