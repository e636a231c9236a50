//! The structures of dynamic and differencing VHDs (spec "Dynamic Disk Header Format", "Block
//! Allocation Table and Data Blocks", "Implementing a Dynamic Disk", "Implementing a Differencing
//! Disk"): the dynamic disk header with its parent locators, the block allocation table (BAT) and
//! the per-block sector bitmaps.

use super::footer::{checksum, FOOTER_SIZE};
use crate::error::{Error, Result};
use zerocopy::byteorder::{BigEndian, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the dynamic disk header (spec "Dynamic Disk Header Format").
pub const HEADER_SIZE: u64 = 1024;

/// `"cxsparse"`, the cookie of the dynamic disk header (spec: "Cookie").
pub const HEADER_COOKIE: [u8; 8] = *b"cxsparse";

/// Dynamic disk header version 1.0 (spec: "Header Version").
pub const HEADER_VERSION: u32 = 0x0001_0000;

/// Byte offset of the checksum field inside the dynamic disk header.
pub const HEADER_CHECKSUM_AT: usize = 36;

/// BAT entry of a block that is not allocated (spec: "unused entries ... 0xFFFFFFFF").
pub const BAT_UNALLOCATED: u32 = 0xFFFF_FFFF;

/// Sector size: the unit of BAT entries, bitmaps and locator offsets.
pub const SECTOR: u64 = 512;

/// Default block size, the spec's and qemu's (2 MiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

/// Smallest block size accepted: one sector (qemu's lower bound; the spec only asks for a power
/// of two).
pub const MIN_BLOCK_SIZE: u32 = 512;

/// Largest block size accepted: 256 MiB. The spec's default is 2 MiB and Hyper-V creates 512 KiB
/// and 2 MiB blocks; the cap keeps a block's sector bitmap at 64 KiB.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// Largest BAT accepted: 16 Mi entries (64 MiB held in memory), which covers the 2040 GiB maximum
/// disk with blocks of 128 KiB or more. Every BAT must also lie within the file.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 24;

/// Number of parent locator entries in the header (spec: "Parent Locator Entries", 8 x 24 bytes).
pub const LOCATOR_COUNT: usize = 8;

/// Longest parent locator payload read (bytes): a path of 16 Ki UTF-16 units. Anything longer is
/// refused before it is read.
pub const MAX_LOCATOR_LEN: u32 = 32 * 1024;

/// Platform code of a relative Windows path in UTF-16LE (spec: "W2ru").
pub const PLATFORM_W2RU: [u8; 4] = *b"W2ru";
/// Platform code of an absolute Windows path in UTF-16LE (spec: "W2ku").
pub const PLATFORM_W2KU: [u8; 4] = *b"W2ku";
/// Platform code of a Mac OS X file URL in UTF-8 (spec: "MacX").
pub const PLATFORM_MACX: [u8; 4] = *b"MacX";

/// One parent locator entry (spec "Parent Locator Entries").
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLocator {
    /// Platform code ("W2ru", "W2ku", "MacX", or zero when unused).
    pub platform_code: [u8; 4],
    /// Platform data space: room reserved for the locator (written in bytes, as Hyper-V does;
    /// the spec says sectors; readers use the data length only).
    pub data_space: U32<BigEndian>,
    /// Platform data length: bytes of locator data.
    pub data_length: U32<BigEndian>,
    /// Reserved: zero.
    pub reserved: U32<BigEndian>,
    /// Platform data offset: absolute file offset of the locator data.
    pub data_offset: U64<BigEndian>,
}

/// The dynamic disk header exactly as stored (spec "Dynamic Disk Header Format"), big-endian.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// Cookie: "cxsparse".
    pub cookie: [u8; 8],
    /// Data offset: unused, all ones.
    pub data_offset: U64<BigEndian>,
    /// Table offset: absolute file offset of the BAT.
    pub table_offset: U64<BigEndian>,
    /// Header version: 0x00010000.
    pub header_version: U32<BigEndian>,
    /// Max table entries: number of BAT entries.
    pub max_table_entries: U32<BigEndian>,
    /// Block size: bytes of guest data per block (a power of two, 2 MiB by default).
    pub block_size: U32<BigEndian>,
    /// Checksum: ones' complement of the byte sum with this field taken as zero.
    pub checksum: U32<BigEndian>,
    /// Parent unique id (differencing disks): the parent footer's unique id.
    pub parent_unique_id: [u8; 16],
    /// Parent time stamp: the parent's modification time, seconds since January 1, 2000 UTC.
    pub parent_timestamp: U32<BigEndian>,
    /// Reserved: zero.
    pub reserved1: U32<BigEndian>,
    /// Parent unicode name: the parent's file name in UTF-16 big-endian, NUL padded.
    pub parent_unicode_name: [u8; 512],
    /// Parent locator entries.
    pub locators: [RawLocator; LOCATOR_COUNT],
    /// Reserved: zeroes.
    pub reserved2: [u8; 256],
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_SIZE as usize);

/// A dynamic disk header that passed its checks.
#[derive(Debug, Clone)]
pub struct Header {
    /// The raw structure.
    pub raw: RawHeader,
    /// Offset of the BAT.
    pub bat_offset: u64,
    /// Entries of the BAT.
    pub entries: u32,
    /// Block size in bytes.
    pub block_size: u32,
}

impl Header {
    /// Parse and validate the header read at `offset` of a file of `file_len` bytes for a disk of
    /// `virtual_size` bytes: cookie, checksum, block size, BAT size against the caps, the disk
    /// size and the file size.
    pub fn parse(bytes: &[u8], offset: u64, file_len: u64, virtual_size: u64) -> Result<Header> {
        let what = format!("dynamic disk header at offset {offset}");
        let raw = RawHeader::read_from_bytes(bytes)
            .map_err(|_| Error::invalid(format!("{what}: short read")))?;
        if raw.cookie != HEADER_COOKIE {
            return Err(Error::invalid(format!(
                "{what}: cookie is {:?}, expected \"cxsparse\"",
                String::from_utf8_lossy(&raw.cookie)
            )));
        }
        let stored = raw.checksum.get();
        let computed = checksum(bytes, HEADER_CHECKSUM_AT);
        if stored != computed {
            return Err(Error::invalid(format!(
                "{what}: checksum is {stored:#010x}, the header sums to {computed:#010x}"
            )));
        }
        let block_size = raw.block_size.get();
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::invalid(format!(
                "{what}: block size {block_size} is not a power of two between {MIN_BLOCK_SIZE} \
                 and {MAX_BLOCK_SIZE}"
            )));
        }
        let entries = raw.max_table_entries.get();
        if entries > MAX_TABLE_ENTRIES {
            return Err(Error::limit(format!(
                "{what}: {entries} BAT entries, more than the {MAX_TABLE_ENTRIES} supported"
            )));
        }
        let covered = u64::from(entries) * u64::from(block_size);
        if covered < virtual_size {
            return Err(Error::invalid(format!(
                "{what}: {entries} BAT entries of {block_size}-byte blocks cover {covered} bytes, \
                 less than the disk's {virtual_size}"
            )));
        }
        let bat_offset = raw.table_offset.get();
        bat_offset
            .checked_add(u64::from(entries) * 4)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{what}: BAT of {entries} entries at offset {bat_offset} extends beyond the \
                     {file_len}-byte file"
                ))
            })?;
        if bat_offset % SECTOR != 0 || bat_offset < FOOTER_SIZE {
            return Err(Error::invalid(format!(
                "{what}: BAT offset {bat_offset} is not a sector boundary after the footer copy"
            )));
        }
        Ok(Header {
            raw,
            bat_offset,
            entries,
            block_size,
        })
    }

    /// Serialise with a fresh checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut raw = self.raw.clone();
        raw.checksum.set(0);
        let mut out = raw.as_bytes().to_vec();
        let sum = checksum(&out, HEADER_CHECKSUM_AT);
        out[HEADER_CHECKSUM_AT..HEADER_CHECKSUM_AT + 4].copy_from_slice(&sum.to_be_bytes());
        out
    }

    /// A new header for `entries` blocks of `block_size` bytes with the BAT at `bat_offset`.
    pub fn new(bat_offset: u64, entries: u32, block_size: u32) -> Header {
        let mut raw = RawHeader::new_zeroed();
        raw.cookie = HEADER_COOKIE;
        raw.data_offset.set(u64::MAX);
        raw.table_offset.set(bat_offset);
        raw.header_version.set(HEADER_VERSION);
        raw.max_table_entries.set(entries);
        raw.block_size.set(block_size);
        Header {
            raw,
            bat_offset,
            entries,
            block_size,
        }
    }

    /// Bytes of a block's sector bitmap: one bit per sector, padded to a whole sector.
    pub fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size)
    }

    /// The parent's file name from the header's parent unicode name (UTF-16 big-endian).
    pub fn parent_unicode_name(&self) -> Option<String> {
        decode_utf16(&self.raw.parent_unicode_name, false)
    }
}

/// Bytes of the sector bitmap of a block of `block_size` bytes.
pub fn bitmap_size(block_size: u32) -> u64 {
    (u64::from(block_size) / SECTOR)
        .div_ceil(8)
        .next_multiple_of(SECTOR)
}

/// Whether sector `index` of a block is marked present in `bitmap` (spec: most significant bit
/// of byte 0 is the block's first sector).
pub fn bit(bitmap: &[u8], index: u64) -> bool {
    usize::try_from(index / 8)
        .ok()
        .and_then(|i| bitmap.get(i))
        .is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
}

/// Decode a NUL-terminated UTF-16 string (big-endian unless `little`), `None` when empty or
/// malformed.
pub fn decode_utf16(bytes: &[u8], little: bool) -> Option<String> {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| {
            if little {
                u16::from_le_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    let s = String::from_utf16(&units).ok()?;
    (!s.is_empty()).then_some(s)
}

/// Encode `s` as UTF-16 (big-endian unless `little`), without a terminator.
pub fn encode_utf16(s: &str, little: bool) -> Vec<u8> {
    s.encode_utf16()
        .flat_map(|u| {
            if little {
                u.to_le_bytes()
            } else {
                u.to_be_bytes()
            }
        })
        .collect()
}

/// Turn a locator's payload into a host path name: backslashes become slashes, a leading `.\`
/// is dropped, a `file://` URL loses its scheme and host. `None` when the payload is not text.
pub fn locator_to_name(platform: [u8; 4], data: &[u8]) -> Option<String> {
    let text = match &platform {
        p if *p == PLATFORM_W2RU || *p == PLATFORM_W2KU => decode_utf16(data, true)?,
        p if *p == PLATFORM_MACX => {
            let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
            let rest = s.strip_prefix("file://")?;
            // file://localhost/path or file:///path
            let rest = rest.strip_prefix("localhost").unwrap_or(rest);
            rest.to_string()
        }
        _ => return None,
    };
    let mut name = text.replace('\\', "/");
    while let Some(rest) = name.strip_prefix("./") {
        name = rest.to_string();
    }
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(entries: u32, block: u32) -> Vec<u8> {
        Header::new(1536, entries, block).to_bytes()
    }

    #[test]
    fn a_new_header_parses_back() {
        let h = Header::parse(&header(512, DEFAULT_BLOCK_SIZE), 512, 1 << 20, 1 << 30).unwrap();
        assert_eq!(h.entries, 512);
        assert_eq!(h.bitmap_size(), 512);
    }

    #[test]
    fn parse_rejects_a_bad_checksum() {
        let mut b = header(512, DEFAULT_BLOCK_SIZE);
        b[20] ^= 0x40;
        let e = Header::parse(&b, 512, 1 << 20, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn parse_rejects_block_sizes_zero_odd_and_huge() {
        for bs in [0, 3000, 256, 1 << 31] {
            let e = Header::parse(&header(1 << 20, bs), 512, 1 << 30, 1 << 20).unwrap_err();
            assert!(e.to_string().contains("block size"), "{bs}: {e}");
        }
    }

    #[test]
    fn parse_rejects_a_bat_beyond_the_file_and_huge_tables() {
        let e =
            Header::parse(&header(1 << 20, DEFAULT_BLOCK_SIZE), 512, 1 << 20, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("beyond"), "{e}");
        let e = Header::parse(&header(u32::MAX, 512), 512, 1 << 40, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("BAT entries"), "{e}");
    }

    #[test]
    fn parse_rejects_a_bat_too_small_for_the_disk() {
        let e = Header::parse(&header(1, DEFAULT_BLOCK_SIZE), 512, 1 << 20, 1 << 30).unwrap_err();
        assert!(e.to_string().contains("cover"), "{e}");
    }

    #[test]
    fn bitmap_bits_are_most_significant_first() {
        let bm = [0x80u8, 0x01];
        assert!(bit(&bm, 0));
        assert!(!bit(&bm, 1));
        assert!(bit(&bm, 15));
        assert!(!bit(&bm, 1000));
    }

    #[test]
    fn locators_become_host_names() {
        let w = encode_utf16(".\\base.vhd", true);
        assert_eq!(
            locator_to_name(PLATFORM_W2RU, &w).as_deref(),
            Some("base.vhd")
        );
        let m = b"file://localhost/srv/base.vhd";
        assert_eq!(
            locator_to_name(PLATFORM_MACX, m).as_deref(),
            Some("/srv/base.vhd")
        );
        assert_eq!(locator_to_name(*b"Wi2r", b"x"), None);
    }
}
