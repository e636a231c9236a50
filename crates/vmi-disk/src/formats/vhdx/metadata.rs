//! The VHDX metadata region ([MS-VHDX] §2.6): the metadata table (§2.6.1) and the known items
//! (§2.6.2): file parameters, virtual disk size, page 83 data, logical and physical sector size, and
//! the parent locator of differencing disks (§2.6.2.6).

use super::header::{guid_from, guid_to, KIB64, MIB};
use crate::error::{Error, Result};
use crate::storage::Storage;
use uuid::Uuid;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "metadata", the table signature (§2.6.1.1).
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// The table occupies the first 64 KiB of the region; items follow (§2.6.1).
pub const METADATA_TABLE_SIZE: u64 = KIB64;
/// Most metadata table entries (§2.6.1.1: 2047).
pub const MAX_METADATA_ENTRIES: u16 = 2047;
/// Largest metadata item (§2.6.1.2: `Length` at most 1 MiB).
pub const MAX_METADATA_ITEM: u32 = 1 << 20;
/// Most key/value pairs vmi accepts in a parent locator (the spec names five keys).
pub const MAX_LOCATOR_ENTRIES: u16 = 64;
/// Smallest and largest block size (§2.6.2.1: a power of two from 1 MiB to 256 MiB).
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest virtual disk (§2.6.2.2: 64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// File parameters item (§2.6.2.1).
pub const FILE_PARAMETERS: Uuid = uuid::uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Virtual disk size item (§2.6.2.2).
pub const VIRTUAL_DISK_SIZE: Uuid = uuid::uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Page 83 data item (§2.6.2.3).
pub const PAGE83_DATA: Uuid = uuid::uuid!("BECA12AB-B2E6-4523-93EF-C309E000C746");
/// Logical sector size item (§2.6.2.4).
pub const LOGICAL_SECTOR_SIZE: Uuid = uuid::uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Physical sector size item (§2.6.2.5).
pub const PHYSICAL_SECTOR_SIZE: Uuid = uuid::uuid!("CDA348C7-445D-4471-9CC9-E9885251C556");
/// Parent locator item (§2.6.2.6).
pub const PARENT_LOCATOR: Uuid = uuid::uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/// Locator type of a VHDX parent locator (§2.6.2.6.1).
pub const VHDX_LOCATOR_TYPE: Uuid = uuid::uuid!("B04AEFB7-D19E-4A81-B789-25B8E9445913");

/// Entry flag bits (§2.6.1.2).
const FLAG_IS_VIRTUAL_DISK: u32 = 1 << 1;
const FLAG_IS_REQUIRED: u32 = 1 << 2;
/// File parameters flag bits (§2.6.2.1).
const PARAM_LEAVE_ALLOCATED: u32 = 1;
const PARAM_HAS_PARENT: u32 = 2;

/// Metadata table header (§2.6.1.1), 32 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawMetadataHeader {
    /// `Signature`: "metadata".
    pub signature: [u8; 8],
    /// `Reserved`: zero.
    pub reserved: U16,
    /// `EntryCount`: at most 2047.
    pub entry_count: U16,
    /// `Reserved2`: zero.
    pub reserved2: [u8; 20],
}

/// Metadata table entry (§2.6.1.2), 32 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawMetadataEntry {
    /// `ItemId`: which item.
    pub item_id: [u8; 16],
    /// `Offset`: from the start of the metadata region, at least 64 KiB (or 0 with length 0).
    pub offset: U32,
    /// `Length`: at most 1 MiB.
    pub length: U32,
    /// Bit 0 `IsUser`, bit 1 `IsVirtualDisk`, bit 2 `IsRequired`.
    pub flags: U32,
    /// `Reserved2`: zero.
    pub reserved: U32,
}

/// Parent locator header (§2.6.2.6.1), 20 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLocatorHeader {
    /// `LocatorType`: the VHDX locator GUID.
    pub locator_type: [u8; 16],
    /// `Reserved`: zero.
    pub reserved: U16,
    /// `KeyValueCount`: entries that follow.
    pub key_value_count: U16,
}

/// Parent locator entry (§2.6.2.6.2), 12 bytes; offsets are from the start of the locator item and
/// strings are UTF-16LE without terminator.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLocatorEntry {
    /// `KeyOffset`.
    pub key_offset: U32,
    /// `ValueOffset`.
    pub value_offset: U32,
    /// `KeyLength` in bytes.
    pub key_length: U16,
    /// `ValueLength` in bytes.
    pub value_length: U16,
}

/// The validated metadata vmi uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Payload block size (§2.6.2.1 `BlockSize`).
    pub block_size: u32,
    /// `LeaveBlocksAllocated` (fixed disks).
    pub leave_allocated: bool,
    /// `HasParent`: a differencing disk.
    pub has_parent: bool,
    /// Virtual disk size.
    pub virtual_size: u64,
    /// Logical sector size: 512 or 4096.
    pub logical_sector: u32,
    /// Physical sector size: 512 or 4096.
    pub physical_sector: u32,
    /// Page 83 data (the disk's SCSI identifier).
    pub page83: Uuid,
    /// Parent locator key/value pairs, for differencing disks.
    pub parent_locator: Vec<(String, String)>,
}

impl Metadata {
    /// The locator value for `key`.
    pub fn locator(&self, key: &str) -> Option<&str> {
        self.parent_locator
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn u32_item(item: &[u8], what: &str) -> Result<u32> {
    let b: [u8; 4] = item
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::invalid(format!("vhdx {what} item is {} bytes", item.len())))?;
    Ok(u32::from_le_bytes(b))
}

fn utf16(b: &[u8], what: &str) -> Result<String> {
    if b.len() % 2 != 0 {
        return Err(Error::invalid(format!(
            "vhdx parent locator {what} has odd length"
        )));
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units)
        .map_err(|_| Error::invalid(format!("vhdx parent locator {what} is not UTF-16")))
}

/// Parse a parent locator item (§2.6.2.6).
pub fn parse_locator(item: &[u8]) -> Result<Vec<(String, String)>> {
    let (hdr, mut rest) = RawLocatorHeader::read_from_prefix(item)
        .map_err(|_| Error::invalid("vhdx parent locator is truncated"))?;
    let ty = guid_from(&hdr.locator_type);
    if ty != VHDX_LOCATOR_TYPE {
        return Err(Error::unsupported(format!("vhdx parent locator type {ty}")));
    }
    let count = hdr.key_value_count.get();
    if count > MAX_LOCATOR_ENTRIES {
        return Err(Error::limit(format!(
            "vhdx parent locator has {count} entries (at most {MAX_LOCATOR_ENTRIES})"
        )));
    }
    let mut out = Vec::new();
    for i in 0..count {
        let (e, r) = RawLocatorEntry::read_from_prefix(rest)
            .map_err(|_| Error::invalid("vhdx parent locator entries are truncated"))?;
        rest = r;
        let slice = |off: u32, len: u16, what: &str| -> Result<&[u8]> {
            let start = usize::try_from(off).unwrap_or(usize::MAX);
            start
                .checked_add(usize::from(len))
                .and_then(|end| item.get(start..end))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "vhdx parent locator entry {i} {what} {off}+{len} lies outside the item ({} bytes)",
                        item.len()
                    ))
                })
        };
        let key = utf16(slice(e.key_offset.get(), e.key_length.get(), "key")?, "key")?;
        let value = utf16(
            slice(e.value_offset.get(), e.value_length.get(), "value")?,
            "value",
        )?;
        out.push((key, value));
    }
    Ok(out)
}

/// Encode a parent locator item.
pub fn encode_locator(entries: &[(String, String)]) -> Vec<u8> {
    let hdr = RawLocatorHeader {
        locator_type: guid_to(VHDX_LOCATOR_TYPE),
        reserved: U16::new(0),
        key_value_count: U16::new(u16::try_from(entries.len()).unwrap_or(0)),
    };
    let mut out = hdr.as_bytes().to_vec();
    let mut strings = Vec::new();
    let base = 20 + 12 * entries.len();
    for (k, v) in entries {
        let kb: Vec<u8> = k.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let vb: Vec<u8> = v.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let ko = base + strings.len();
        strings.extend_from_slice(&kb);
        let vo = base + strings.len();
        strings.extend_from_slice(&vb);
        let e = RawLocatorEntry {
            key_offset: U32::new(ko as u32),
            value_offset: U32::new(vo as u32),
            key_length: U16::new(kb.len() as u16),
            value_length: U16::new(vb.len() as u16),
        };
        out.extend_from_slice(e.as_bytes());
    }
    out.extend_from_slice(&strings);
    out
}

/// Read and validate the metadata region at `offset` of `length` bytes.
pub fn read_metadata(storage: &dyn Storage, offset: u64, length: u64) -> Result<Metadata> {
    if length < METADATA_TABLE_SIZE {
        return Err(Error::invalid(format!(
            "vhdx metadata region is {length} bytes, smaller than its table"
        )));
    }
    let mut table = vec![0u8; METADATA_TABLE_SIZE as usize];
    storage
        .read_at(&mut table, offset)
        .map_err(|e| Error::io(format!("reading vhdx metadata table at {offset}"), e))?;
    let (hdr, mut rest) = RawMetadataHeader::read_from_prefix(&table[..])
        .map_err(|_| Error::invalid("vhdx metadata table is truncated"))?;
    if &hdr.signature != METADATA_SIGNATURE {
        return Err(Error::invalid(format!(
            "vhdx metadata table signature is {:02x?}, not \"metadata\"",
            hdr.signature
        )));
    }
    let count = hdr.entry_count.get();
    if count > MAX_METADATA_ENTRIES {
        return Err(Error::limit(format!(
            "vhdx metadata table has {count} entries (at most {MAX_METADATA_ENTRIES})"
        )));
    }
    let mut params = None;
    let mut size = None;
    let mut logical = None;
    let mut physical = None;
    let mut page83 = None;
    let mut locator = None;
    for i in 0..count {
        let (e, r) = RawMetadataEntry::read_from_prefix(rest)
            .map_err(|_| Error::invalid("vhdx metadata table entries are truncated"))?;
        rest = r;
        let id = guid_from(&e.item_id);
        let (ioff, ilen) = (e.offset.get(), e.length.get());
        if ilen > MAX_METADATA_ITEM {
            return Err(Error::limit(format!(
                "vhdx metadata item {id} is {ilen} bytes (at most {MAX_METADATA_ITEM})"
            )));
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE83_DATA,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ]
        .contains(&id);
        if !known {
            if e.flags.get() & FLAG_IS_REQUIRED != 0 {
                return Err(Error::unsupported(format!(
                    "vhdx metadata entry {i} is an unknown required item {id}"
                )));
            }
            continue;
        }
        if ilen == 0 {
            return Err(Error::invalid(format!("vhdx metadata item {id} is empty")));
        }
        if u64::from(ioff) < METADATA_TABLE_SIZE || u64::from(ioff) + u64::from(ilen) > length {
            return Err(Error::invalid(format!(
                "vhdx metadata item {id} at {ioff}+{ilen} lies outside the metadata region ({length} bytes)"
            )));
        }
        let mut item = vec![0u8; ilen as usize];
        storage
            .read_at(&mut item, offset + u64::from(ioff))
            .map_err(|e| Error::io(format!("reading vhdx metadata item {id}"), e))?;
        match id {
            FILE_PARAMETERS => {
                let bs = u32_item(&item, "file parameters")?;
                let flags = u32_item(item.get(4..).unwrap_or(&[]), "file parameters")?;
                params = Some((bs, flags));
            }
            VIRTUAL_DISK_SIZE => {
                let b: [u8; 8] = item
                    .get(..8)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| Error::invalid("vhdx virtual disk size item is short"))?;
                size = Some(u64::from_le_bytes(b));
            }
            LOGICAL_SECTOR_SIZE => logical = Some(u32_item(&item, "logical sector size")?),
            PHYSICAL_SECTOR_SIZE => physical = Some(u32_item(&item, "physical sector size")?),
            PAGE83_DATA => {
                let b: [u8; 16] = item
                    .get(..16)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| Error::invalid("vhdx page 83 item is short"))?;
                page83 = Some(guid_from(&b));
            }
            _ => locator = Some(parse_locator(&item)?),
        }
    }
    let (block_size, flags) =
        params.ok_or_else(|| Error::invalid("vhdx metadata lacks the file parameters"))?;
    let virtual_size =
        size.ok_or_else(|| Error::invalid("vhdx metadata lacks the virtual disk size"))?;
    let logical_sector =
        logical.ok_or_else(|| Error::invalid("vhdx metadata lacks the logical sector size"))?;
    let physical_sector = physical.unwrap_or(logical_sector);
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::invalid(format!(
            "vhdx block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    for (what, s) in [("logical", logical_sector), ("physical", physical_sector)] {
        if s != 512 && s != 4096 {
            return Err(Error::invalid(format!(
                "vhdx {what} sector size {s} is neither 512 nor 4096"
            )));
        }
    }
    if virtual_size > MAX_VIRTUAL_SIZE || virtual_size % u64::from(logical_sector) != 0 {
        return Err(Error::invalid(format!(
            "vhdx virtual disk size {virtual_size} is not a multiple of {logical_sector} up to 64 TiB"
        )));
    }
    let has_parent = flags & PARAM_HAS_PARENT != 0;
    if has_parent && locator.is_none() {
        return Err(Error::invalid(
            "vhdx differencing disk has no parent locator",
        ));
    }
    Ok(Metadata {
        block_size,
        leave_allocated: flags & PARAM_LEAVE_ALLOCATED != 0,
        has_parent,
        virtual_size,
        logical_sector,
        physical_sector,
        page83: page83.unwrap_or_default(),
        parent_locator: locator.unwrap_or_default(),
    })
}

/// Encode the metadata region contents (table then items), at most 1 MiB.
pub fn encode_metadata(m: &Metadata) -> Vec<u8> {
    let mut params = m.block_size.to_le_bytes().to_vec();
    let flags = (u32::from(m.leave_allocated) * PARAM_LEAVE_ALLOCATED)
        | (u32::from(m.has_parent) * PARAM_HAS_PARENT);
    params.extend_from_slice(&flags.to_le_bytes());
    let mut items: Vec<(Uuid, Vec<u8>, u32)> = vec![
        (FILE_PARAMETERS, params, FLAG_IS_REQUIRED),
        (
            VIRTUAL_DISK_SIZE,
            m.virtual_size.to_le_bytes().to_vec(),
            FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK,
        ),
        (
            PAGE83_DATA,
            guid_to(m.page83).to_vec(),
            FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK,
        ),
        (
            LOGICAL_SECTOR_SIZE,
            m.logical_sector.to_le_bytes().to_vec(),
            FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK,
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            m.physical_sector.to_le_bytes().to_vec(),
            FLAG_IS_REQUIRED | FLAG_IS_VIRTUAL_DISK,
        ),
    ];
    if m.has_parent {
        items.push((
            PARENT_LOCATOR,
            encode_locator(&m.parent_locator),
            // §2.6.2: the parent locator is file metadata, not virtual disk metadata.
            FLAG_IS_REQUIRED,
        ));
    }
    let mut out = vec![0u8; METADATA_TABLE_SIZE as usize];
    let hdr = RawMetadataHeader {
        signature: *METADATA_SIGNATURE,
        reserved: U16::new(0),
        entry_count: U16::new(items.len() as u16),
        reserved2: [0; 20],
    };
    out[..32].copy_from_slice(hdr.as_bytes());
    for (i, (id, data, flags)) in items.into_iter().enumerate() {
        let e = RawMetadataEntry {
            item_id: guid_to(id),
            offset: U32::new(out.len() as u32),
            length: U32::new(data.len() as u32),
            flags: U32::new(flags),
            reserved: U32::new(0),
        };
        out[32 + 32 * i..64 + 32 * i].copy_from_slice(e.as_bytes());
        out.extend_from_slice(&data);
        // Keep items 8-byte aligned.
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    debug_assert!(out.len() as u64 <= MIB);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn meta() -> Metadata {
        Metadata {
            block_size: 8 << 20,
            leave_allocated: false,
            has_parent: true,
            virtual_size: 64 << 20,
            logical_sector: 512,
            physical_sector: 4096,
            page83: Uuid::from_u128(5),
            parent_locator: vec![
                (
                    "parent_linkage".into(),
                    "{00000000-0000-0000-0000-000000000001}".into(),
                ),
                ("relative_path".into(), ".\\base.vhdx".into()),
            ],
        }
    }

    fn store(m: &[u8]) -> MemStorage {
        let mut v = m.to_vec();
        v.resize(MIB as usize, 0);
        MemStorage::from_bytes(v)
    }

    #[test]
    fn metadata_round_trips_with_a_parent_locator() {
        let m = meta();
        let s = store(&encode_metadata(&m));
        assert_eq!(read_metadata(&s, 0, MIB).unwrap(), m);
    }

    #[test]
    fn block_size_that_is_not_a_power_of_two_is_rejected() {
        let m = Metadata {
            block_size: 3 << 20,
            ..meta()
        };
        let s = store(&encode_metadata(&m));
        assert!(read_metadata(&s, 0, MIB).is_err());
    }

    #[test]
    fn virtual_size_beyond_64_tib_is_rejected() {
        let m = Metadata {
            virtual_size: MAX_VIRTUAL_SIZE + 512,
            ..meta()
        };
        let s = store(&encode_metadata(&m));
        assert!(read_metadata(&s, 0, MIB).is_err());
    }

    #[test]
    fn locator_entry_pointing_outside_the_item_is_rejected() {
        let mut b = encode_locator(&meta().parent_locator);
        b[20..24].copy_from_slice(&9999u32.to_le_bytes());
        assert!(parse_locator(&b).is_err());
    }
}
