//! The VHDX header section ([MS-VHDX] §2.2): the file type identifier at offset 0 (§2.2.1), the
//! two headers at 64 KiB and 128 KiB (§2.2.2) and the two region table copies at 192 KiB and
//! 256 KiB (§2.2.3). Every structure carries a CRC-32C over its whole size with the checksum field
//! taken as zero.

use crate::error::{Error, Result};
use crate::storage::Storage;
use uuid::Uuid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "vhdxfile", the signature of the file type identifier (§2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// "head", the signature of each header (§2.2.2).
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// "regi", the signature of each region table (§2.2.3).
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";

/// 64 KiB: every header-section structure is this far apart (§2.2).
pub const KIB64: u64 = 64 * 1024;
/// 1 MiB: the alignment of regions, the log, payload blocks (§2.2.3.1, §2.3).
pub const MIB: u64 = 1 << 20;
/// Offsets of the two headers (§2.2.2).
pub const HEADER_OFFSETS: [u64; 2] = [KIB64, 2 * KIB64];
/// Offsets of the two region table copies (§2.2.3).
pub const REGION_OFFSETS: [u64; 2] = [3 * KIB64, 4 * KIB64];
/// End of the header section: the first byte a region or the log may use (§2.2).
pub const HEADER_SECTION_END: u64 = MIB;
/// Bytes of a header that the checksum covers (§2.2.2).
pub const HEADER_SIZE: usize = 4096;
/// Bytes of a region table that the checksum covers (§2.2.3).
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// Most region table entries: what fits in 64 KiB after the 16-byte header (§2.2.3.1: 2047).
pub const MAX_REGION_ENTRIES: u32 = 2047;
/// The only header version defined (§2.2.2 `Version`).
pub const HEADER_VERSION: u16 = 1;
/// The only log version defined (§2.2.2 `LogVersion`).
pub const LOG_VERSION: u16 = 0;

/// Region GUID of the block allocation table (§2.2.3.2).
pub const BAT_REGION: Uuid = uuid::uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// Region GUID of the metadata region (§2.2.3.2).
pub const METADATA_REGION: Uuid = uuid::uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");

/// Read a GUID in the on-disk (mixed-endian, Windows `GUID`) layout ([MS-DTYP] §2.3.4.2).
pub fn guid_from(b: &[u8; 16]) -> Uuid {
    Uuid::from_bytes_le(*b)
}

/// Encode a GUID in the on-disk layout.
pub fn guid_to(u: Uuid) -> [u8; 16] {
    u.to_bytes_le()
}

/// CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero.
pub fn crc_with_zero_field(buf: &[u8], at: usize) -> u32 {
    let end = at.saturating_add(4).min(buf.len());
    let head = buf.get(..at).unwrap_or(buf);
    let c = crc32c::crc32c(head);
    let c = crc32c::crc32c_append(c, &[0u8; 4][..end.saturating_sub(at)]);
    crc32c::crc32c_append(c, buf.get(end..).unwrap_or(&[]))
}

/// One header (§2.2.2), 4 KiB.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// `Signature`: "head".
    pub signature: [u8; 4],
    /// `Checksum`: CRC-32C over the 4 KiB header with this field zero.
    pub checksum: U32,
    /// `SequenceNumber`: the valid header with the larger value is current.
    pub sequence_number: U64,
    /// `FileWriteGuid`: changed on the first write of any kind after the file is opened.
    pub file_write_guid: [u8; 16],
    /// `DataWriteGuid`: changed before the first user-visible data change after the file is opened;
    /// children record it as `parent_linkage`.
    pub data_write_guid: [u8; 16],
    /// `LogGuid`: zero when the log is empty; otherwise log entries must carry it.
    pub log_guid: [u8; 16],
    /// `LogVersion`: 0.
    pub log_version: U16,
    /// `Version`: 1.
    pub version: U16,
    /// `LogLength`: bytes of the log, a multiple of 1 MiB.
    pub log_length: U32,
    /// `LogOffset`: file offset of the log, a multiple of 1 MiB.
    pub log_offset: U64,
    /// `Reserved`: zero.
    pub reserved: [u8; 4016],
}

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `SequenceNumber`.
    pub sequence: u64,
    /// `FileWriteGuid`.
    pub file_write_guid: Uuid,
    /// `DataWriteGuid`.
    pub data_write_guid: Uuid,
    /// `LogGuid` (nil when the log is empty).
    pub log_guid: Uuid,
    /// `LogLength`.
    pub log_length: u64,
    /// `LogOffset`.
    pub log_offset: u64,
}

impl Header {
    /// Parse and validate a header (signature, checksum, versions, log placement within `file_len`).
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        let (raw, _) = RawHeader::read_from_prefix(buf)
            .map_err(|_| Error::invalid("vhdx header is truncated"))?;
        if &raw.signature != HEADER_SIGNATURE {
            return Err(Error::invalid(format!(
                "vhdx header signature is {:02x?}, not \"head\"",
                raw.signature
            )));
        }
        let want = crc_with_zero_field(&buf[..HEADER_SIZE], 4);
        if raw.checksum.get() != want {
            return Err(Error::invalid(format!(
                "vhdx header checksum {:#010x} does not match {want:#010x}",
                raw.checksum.get()
            )));
        }
        // §2.2.2: an unknown log version only matters when there is a log to replay.
        let log_guid = guid_from(&raw.log_guid);
        if raw.version.get() != HEADER_VERSION
            || (raw.log_version.get() != LOG_VERSION && !log_guid.is_nil())
        {
            return Err(Error::unsupported(format!(
                "vhdx header version {} (log version {})",
                raw.version.get(),
                raw.log_version.get()
            )));
        }
        let log_length = u64::from(raw.log_length.get());
        let log_offset = raw.log_offset.get();
        if log_length % MIB != 0 || log_offset % MIB != 0 || log_offset < HEADER_SECTION_END {
            return Err(Error::invalid(format!(
                "vhdx log at {log_offset} of {log_length} bytes is not 1 MiB aligned after the header section"
            )));
        }
        let log_end = log_offset
            .checked_add(log_length)
            .ok_or_else(|| Error::invalid("vhdx log offset overflows"))?;
        if log_end > file_len {
            return Err(Error::invalid(format!(
                "vhdx log {log_offset}+{log_length} lies beyond the end of the file ({file_len})"
            )));
        }
        Ok(Header {
            sequence: raw.sequence_number.get(),
            file_write_guid: guid_from(&raw.file_write_guid),
            data_write_guid: guid_from(&raw.data_write_guid),
            log_guid,
            log_length,
            log_offset,
        })
    }

    /// Encode with a fresh checksum.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawHeader {
            signature: *HEADER_SIGNATURE,
            checksum: U32::new(0),
            sequence_number: U64::new(self.sequence),
            file_write_guid: guid_to(self.file_write_guid),
            data_write_guid: guid_to(self.data_write_guid),
            log_guid: guid_to(self.log_guid),
            log_version: U16::new(LOG_VERSION),
            version: U16::new(HEADER_VERSION),
            // Log lengths are validated (and created) below 4 GiB.
            log_length: U32::new(u32::try_from(self.log_length).unwrap_or(u32::MAX)),
            log_offset: U64::new(self.log_offset),
            reserved: [0; 4016],
        };
        let mut buf = raw.as_bytes().to_vec();
        let c = crc32c::crc32c(&buf);
        buf[4..8].copy_from_slice(&c.to_le_bytes());
        buf
    }
}

/// Read both headers; return the current one (valid, highest sequence number) and its slot.
pub fn read_current_header(storage: &dyn Storage, file_len: u64) -> Result<(Header, usize)> {
    let mut best: Option<(Header, usize)> = None;
    let mut errors = Vec::new();
    for (slot, off) in HEADER_OFFSETS.iter().enumerate() {
        let mut buf = vec![0u8; HEADER_SIZE];
        if off + HEADER_SIZE as u64 > file_len {
            errors.push(format!("header {} is beyond the end of the file", slot + 1));
            continue;
        }
        storage
            .read_at(&mut buf, *off)
            .map_err(|e| Error::io(format!("reading vhdx header at {off}"), e))?;
        match Header::parse(&buf, file_len) {
            Ok(h) => {
                if best.as_ref().is_none_or(|(b, _)| h.sequence > b.sequence) {
                    best = Some((h, slot));
                }
            }
            Err(e) => errors.push(format!("header {}: {}", slot + 1, e.message())),
        }
    }
    best.ok_or_else(|| Error::invalid(format!("no valid vhdx header ({})", errors.join("; "))))
}

/// Region table header (§2.2.3.1).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRegionTableHeader {
    /// `Signature`: "regi".
    pub signature: [u8; 4],
    /// `Checksum`: CRC-32C over the 64 KiB table with this field zero.
    pub checksum: U32,
    /// `EntryCount`: at most 2047.
    pub entry_count: U32,
    /// `Reserved`: zero.
    pub reserved: U32,
}

/// Region table entry (§2.2.3.2).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRegionEntry {
    /// `Guid`: which region (BAT, metadata, or unknown).
    pub guid: [u8; 16],
    /// `FileOffset`: 1 MiB aligned, at least 1 MiB.
    pub file_offset: U64,
    /// `Length`: a multiple of 1 MiB.
    pub length: U32,
    /// Bit 0 `Required`: an implementation that does not know the region must refuse the file.
    pub required: U32,
}

/// A validated region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// File offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The regions vhdx knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    /// The block allocation table.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
}

/// Parse a region table (§2.2.3): checksum, entry count, known regions present, no unknown required
/// region, alignment, within `file_len`, no overlaps.
pub fn parse_region_table(buf: &[u8], file_len: u64) -> Result<Regions> {
    let table = buf
        .get(..REGION_TABLE_SIZE)
        .ok_or_else(|| Error::invalid("vhdx region table is truncated"))?;
    let (hdr, mut rest) = RawRegionTableHeader::read_from_prefix(table)
        .map_err(|_| Error::invalid("vhdx region table is truncated"))?;
    if &hdr.signature != REGION_SIGNATURE {
        return Err(Error::invalid(format!(
            "vhdx region table signature is {:02x?}, not \"regi\"",
            hdr.signature
        )));
    }
    let want = crc_with_zero_field(table, 4);
    if hdr.checksum.get() != want {
        return Err(Error::invalid(format!(
            "vhdx region table checksum {:#010x} does not match {want:#010x}",
            hdr.checksum.get()
        )));
    }
    let count = hdr.entry_count.get();
    if count > MAX_REGION_ENTRIES {
        return Err(Error::limit(format!(
            "vhdx region table has {count} entries (at most {MAX_REGION_ENTRIES})"
        )));
    }
    let mut bat = None;
    let mut metadata = None;
    let mut seen: Vec<Region> = Vec::new();
    for i in 0..count {
        let (e, r) = RawRegionEntry::read_from_prefix(rest)
            .map_err(|_| Error::invalid("vhdx region table entries are truncated"))?;
        rest = r;
        let guid = guid_from(&e.guid);
        let region = Region {
            offset: e.file_offset.get(),
            length: u64::from(e.length.get()),
        };
        let end = region
            .offset
            .checked_add(region.length)
            .ok_or_else(|| Error::invalid(format!("vhdx region {guid} offset overflows")))?;
        if region.offset % MIB != 0
            || region.length % MIB != 0
            || region.length == 0
            || region.offset < HEADER_SECTION_END
        {
            return Err(Error::invalid(format!(
                "vhdx region {guid} at {}+{} is not 1 MiB aligned after the header section",
                region.offset, region.length
            )));
        }
        if end > file_len {
            return Err(Error::invalid(format!(
                "vhdx region {guid} at {}+{} lies beyond the end of the file ({file_len})",
                region.offset, region.length
            )));
        }
        if seen
            .iter()
            .any(|s| s.offset < end && region.offset < s.offset + s.length)
        {
            return Err(Error::invalid(format!(
                "vhdx region {guid} at {}+{} overlaps another region",
                region.offset, region.length
            )));
        }
        seen.push(region);
        let slot = if guid == BAT_REGION {
            &mut bat
        } else if guid == METADATA_REGION {
            &mut metadata
        } else if e.required.get() & 1 != 0 {
            return Err(Error::unsupported(format!(
                "vhdx region table entry {i} is an unknown required region {guid}"
            )));
        } else {
            continue;
        };
        if slot.replace(region).is_some() {
            return Err(Error::invalid(format!("vhdx region {guid} appears twice")));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(Error::invalid(
            "vhdx region table lacks the BAT or the metadata region",
        )),
    }
}

/// Read the region table: the first copy if valid, otherwise the second (§2.2.3).
pub fn read_regions(storage: &dyn Storage, file_len: u64) -> Result<Regions> {
    let mut first_err = None;
    for off in REGION_OFFSETS {
        if off + REGION_TABLE_SIZE as u64 > file_len {
            first_err.get_or_insert_with(|| {
                Error::invalid(format!(
                    "vhdx region table at {off} is beyond the end of the file"
                ))
            });
            continue;
        }
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        storage
            .read_at(&mut buf, off)
            .map_err(|e| Error::io(format!("reading vhdx region table at {off}"), e))?;
        match parse_region_table(&buf, file_len) {
            Ok(r) => return Ok(r),
            // An unknown required region is a property of the file, not a damaged copy.
            Err(e) if e.kind() == crate::ErrorKind::Unsupported => return Err(e),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| Error::invalid("no valid vhdx region table")))
}

/// Encode a region table holding the BAT and metadata regions (both marked required).
pub fn encode_region_table(regions: &Regions) -> Vec<u8> {
    let mut buf = vec![0u8; REGION_TABLE_SIZE];
    let hdr = RawRegionTableHeader {
        signature: *REGION_SIGNATURE,
        checksum: U32::new(0),
        entry_count: U32::new(2),
        reserved: U32::new(0),
    };
    buf[..16].copy_from_slice(hdr.as_bytes());
    for (i, (guid, r)) in [
        (BAT_REGION, regions.bat),
        (METADATA_REGION, regions.metadata),
    ]
    .into_iter()
    .enumerate()
    {
        let e = RawRegionEntry {
            guid: guid_to(guid),
            file_offset: U64::new(r.offset),
            length: U32::new(u32::try_from(r.length).unwrap_or(u32::MAX)),
            required: U32::new(1),
        };
        buf[16 + 32 * i..48 + 32 * i].copy_from_slice(e.as_bytes());
    }
    let c = crc32c::crc32c(&buf);
    buf[4..8].copy_from_slice(&c.to_le_bytes());
    buf
}

/// Encode the file type identifier (§2.2.1): signature and a UTF-16 creator string.
pub fn encode_file_identifier(creator: &str) -> Vec<u8> {
    let mut buf = vec![0u8; KIB64 as usize];
    buf[..8].copy_from_slice(FILE_SIGNATURE);
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        buf[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            sequence: 7,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_length: MIB,
            log_offset: MIB,
        }
    }

    #[test]
    fn header_round_trips_through_encode_and_parse() {
        let h = header();
        assert_eq!(Header::parse(&h.encode(), 8 * MIB).unwrap(), h);
    }

    #[test]
    fn header_with_a_flipped_bit_fails_its_checksum() {
        let mut b = header().encode();
        b[100] ^= 1;
        let e = Header::parse(&b, 8 * MIB).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn header_with_log_beyond_the_file_is_rejected() {
        let h = Header {
            log_offset: 16 * MIB,
            ..header()
        };
        assert!(Header::parse(&h.encode(), 8 * MIB).is_err());
    }

    #[test]
    fn region_table_round_trips() {
        let r = Regions {
            bat: Region {
                offset: 2 * MIB,
                length: MIB,
            },
            metadata: Region {
                offset: 3 * MIB,
                length: MIB,
            },
        };
        assert_eq!(
            parse_region_table(&encode_region_table(&r), 8 * MIB).unwrap(),
            r
        );
    }

    #[test]
    fn region_table_refuses_an_unknown_required_region() {
        let r = Regions {
            bat: Region {
                offset: 2 * MIB,
                length: MIB,
            },
            metadata: Region {
                offset: 3 * MIB,
                length: MIB,
            },
        };
        let mut b = encode_region_table(&r);
        b[16..32].copy_from_slice(&guid_to(Uuid::from_u128(99)));
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let c = crc_with_zero_field(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        let e = parse_region_table(&b, 8 * MIB).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported, "{e}");
    }

    #[test]
    fn crc_with_zero_field_ignores_the_stored_checksum() {
        let mut b = vec![1u8; 64];
        let a = crc_with_zero_field(&b, 4);
        b[4..8].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(crc_with_zero_field(&b, 4), a);
    }
}
