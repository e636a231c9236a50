//! The VDI pre-header and header (VirtualBox `VDIPREHEADER` + `VDIHEADER1`, as qemu's
//! `block/vdi.c` reads them): the on-disk structure, its validation against the file and the
//! named limits, and the block map entry encoding.
//!
//! Layout of the first sector (all integers little-endian):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0x000  | 64   | text, e.g. `<<< Oracle VM VirtualBox Disk Image >>>\n` |
//! | 0x040  | 4    | signature `0xbeda107f` |
//! | 0x044  | 4    | version (major << 16 \| minor), 1.1 |
//! | 0x048  | 4    | header size (from this field on): 0x180, or 0x190 with LCHS geometry |
//! | 0x04c  | 4    | image type: 1 dynamic, 2 static (3 undo and 4 differencing are not supported) |
//! | 0x050  | 4    | image flags |
//! | 0x054  | 256  | description |
//! | 0x154  | 4    | offset of the block map |
//! | 0x158  | 4    | offset of the data blocks |
//! | 0x15c  | 16   | legacy geometry: cylinders, heads, sectors, sector size (512) |
//! | 0x16c  | 4    | unused |
//! | 0x170  | 8    | disk size in bytes |
//! | 0x178  | 4    | block size |
//! | 0x17c  | 4    | extra bytes before each block's data |
//! | 0x180  | 4    | blocks in the image (block map entries) |
//! | 0x184  | 4    | blocks allocated |
//! | 0x188  | 64   | UUIDs: image, last snapshot, link, parent |
//! | 0x1c8  | 56   | unused |

use crate::error::{Error, Result};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "Magic" of every VDI file, at byte 0x40 (VirtualBox `VDI_IMAGE_SIGNATURE`).
pub(crate) const VDI_SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the only header version VirtualBox has written since 2008 and the one qemu reads.
pub(crate) const VDI_VERSION_1_1: u32 = 0x0001_0001;
/// Byte offset of the signature (after the 64-byte text).
pub(crate) const SIGNATURE_OFFSET: usize = 0x40;
/// Text written into images vmi creates (the value is informational; qemu writes its own).
pub(crate) const VDI_TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// Size of the sector the header occupies, and the unit every offset is aligned to (qemu's
/// `SECTOR_SIZE`; VirtualBox aligns the block map and data the same way).
pub(crate) const SECTOR_SIZE: u64 = 512;
/// `VDIHEADER1`: the header size field's value for the plain 1.1 header (fields after the
/// signature and version).
pub(crate) const HEADER1_SIZE: u32 = 0x180;
/// Byte offset of the header size field: the header size counts from here.
const HEADER_SIZE_FIELD: u32 = 0x48;

/// A dynamic image: blocks are allocated on first write.
pub(crate) const VDI_TYPE_DYNAMIC: u32 = 1;
/// A static (fixed) image: every block is allocated at creation.
pub(crate) const VDI_TYPE_STATIC: u32 = 2;

/// Block map entry of a block never written: reads from the parent (zeroes without one).
pub(crate) const VDI_UNALLOCATED: u32 = 0xffff_ffff;
/// Block map entry of a discarded block: reads as zeroes.
pub(crate) const VDI_DISCARDED: u32 = 0xffff_fffe;

/// The block size qemu creates (and the only one it opens): 1 MiB.
pub(crate) const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Smallest block size accepted: one sector (block offsets must stay sector-aligned).
pub(crate) const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted. VirtualBox only writes 1 MiB; the cap bounds the buffer that
/// completing a partial block from a backing image needs.
pub(crate) const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Most block map entries accepted: 2^26 entries is a 256 MiB block map (64 TiB at 1 MiB blocks),
/// the bound on what opening an image holds in memory. The format's own limit (qemu's
/// `VDI_BLOCKS_IN_IMAGE_MAX`, 0x3fffffff) would be a 4 GiB table.
pub(crate) const MAX_BLOCKS: u32 = 1 << 26;
/// Largest disk qemu handles: `VDI_BLOCKS_IN_IMAGE_MAX` blocks of 1 MiB.
pub(crate) const VDI_DISK_SIZE_MAX: u64 = 0x3fff_ffff * DEFAULT_BLOCK_SIZE as u64;

/// The first sector of a VDI image, as stored.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawHeader {
    /// Pre-header: free text naming the creator, NUL-padded.
    pub text: [u8; 64],
    /// Pre-header: [`VDI_SIGNATURE`].
    pub signature: U32,
    /// Pre-header: format version, major in the high 16 bits.
    pub version: U32,
    /// Size of the header that follows, counted from this field.
    pub header_size: U32,
    /// [`VDI_TYPE_DYNAMIC`] or [`VDI_TYPE_STATIC`] (3 undo, 4 differencing).
    pub image_type: U32,
    /// Image flags (unused by qemu and vmi).
    pub image_flags: U32,
    /// Free-form description, NUL-padded.
    pub description: [u8; 256],
    /// Byte offset of the block map (sector-aligned).
    pub offset_bmap: U32,
    /// Byte offset of the first data block (sector-aligned).
    pub offset_data: U32,
    /// Legacy geometry: cylinders (0 when unset).
    pub cylinders: U32,
    /// Legacy geometry: heads.
    pub heads: U32,
    /// Legacy geometry: sectors per track.
    pub sectors: U32,
    /// Legacy geometry: bytes per sector, always 512.
    pub sector_size: U32,
    /// Unused.
    pub unused1: U32,
    /// Guest disk size in bytes.
    pub disk_size: U64,
    /// Bytes of guest data per block.
    pub block_size: U32,
    /// Bytes stored before each block's data (0 in every image qemu or VirtualBox writes).
    pub block_extra: U32,
    /// Number of block map entries.
    pub blocks_in_image: U32,
    /// Number of data blocks stored after `offset_data`.
    pub blocks_allocated: U32,
    /// UUID of this image (VirtualBox byte order).
    pub uuid_image: [u8; 16],
    /// UUID of the last snapshot (changes on every modification in VirtualBox).
    pub uuid_last_snap: [u8; 16],
    /// UUID linking a differencing image to its parent; zero otherwise.
    pub uuid_link: [u8; 16],
    /// UUID of the parent's last snapshot; zero otherwise.
    pub uuid_parent: [u8; 16],
    /// Unused (LCHS geometry in `VDIHEADER1PLUS`), zero.
    pub unused2: [u8; 56],
}

/// Size of [`RawHeader`]: one sector.
pub(crate) const HEADER_LEN: usize = 512;
const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);

/// Byte offset of the blocks-allocated field, rewritten after every allocation.
pub(crate) const BLOCKS_ALLOCATED_OFFSET: u64 = 0x184;

/// The validated facts of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// [`VDI_TYPE_DYNAMIC`] or [`VDI_TYPE_STATIC`].
    pub image_type: u32,
    /// Byte offset of the block map.
    pub offset_bmap: u64,
    /// Byte offset of data block 0.
    pub offset_data: u64,
    /// Guest size, rounded up to a whole sector as qemu does.
    pub disk_size: u64,
    /// Bytes per block (a power of two).
    pub block_size: u64,
    /// Block map entries.
    pub blocks_in_image: u32,
    /// Data blocks stored.
    pub blocks_allocated: u32,
}

impl RawHeader {
    /// Parse the first sector.
    pub(crate) fn parse(sector: &[u8]) -> Result<RawHeader> {
        RawHeader::read_from_prefix(sector)
            .map(|(h, _)| h)
            .map_err(|_| {
                Error::invalid(format!(
                    "VDI header needs {HEADER_LEN} bytes, the file has {}",
                    sector.len()
                ))
            })
    }

    /// Validate every field against the named limits and the file length, as qemu's `vdi_open`
    /// does and more strictly (block map inside the file, no overlap with the data area).
    pub(crate) fn validate(&self, file_len: u64) -> Result<Layout> {
        let signature = self.signature.get();
        if signature != VDI_SIGNATURE {
            return Err(Error::invalid(format!(
                "VDI signature is {signature:#010x}, expected {VDI_SIGNATURE:#010x}"
            )));
        }
        let version = self.version.get();
        if version != VDI_VERSION_1_1 {
            return Err(Error::unsupported(format!(
                "VDI version {}.{} (only 1.1 is supported)",
                version >> 16,
                version & 0xffff
            )));
        }
        let header_size = self.header_size.get();
        // The header must fit in the first sector after the pre-header.
        let max_header = HEADER_LEN as u32 - HEADER_SIZE_FIELD;
        if !(HEADER1_SIZE..=max_header).contains(&header_size) {
            return Err(Error::invalid(format!(
                "VDI header size {header_size:#x} is outside {HEADER1_SIZE:#x}..={max_header:#x}"
            )));
        }
        let image_type = self.image_type.get();
        if image_type != VDI_TYPE_DYNAMIC && image_type != VDI_TYPE_STATIC {
            return Err(Error::unsupported(format!(
                "VDI image type {image_type} (only dynamic (1) and static (2) images are supported)"
            )));
        }
        if self.uuid_link != [0; 16] || self.uuid_parent != [0; 16] {
            return Err(Error::unsupported(
                "VDI differencing image (non-null link or parent UUID)",
            ));
        }
        let sector_size = self.sector_size.get();
        if u64::from(sector_size) != SECTOR_SIZE {
            return Err(Error::unsupported(format!(
                "VDI sector size {sector_size} is not {SECTOR_SIZE}"
            )));
        }
        let block_size = self.block_size.get();
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::invalid(format!(
                "VDI block size {block_size} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            )));
        }
        let block_extra = self.block_extra.get();
        if block_extra != 0 {
            return Err(Error::unsupported(format!(
                "VDI blocks with {block_extra} extra bytes"
            )));
        }
        let offset_bmap = u64::from(self.offset_bmap.get());
        let offset_data = u64::from(self.offset_data.get());
        if offset_bmap % SECTOR_SIZE != 0 || offset_bmap < HEADER_LEN as u64 {
            return Err(Error::invalid(format!(
                "VDI block map offset {offset_bmap:#x} is not a sector after the header"
            )));
        }
        if offset_data % SECTOR_SIZE != 0 {
            return Err(Error::invalid(format!(
                "VDI data offset {offset_data:#x} is not sector-aligned"
            )));
        }
        let blocks_in_image = self.blocks_in_image.get();
        if blocks_in_image > MAX_BLOCKS {
            return Err(Error::limit(format!(
                "VDI image has {blocks_in_image} blocks, more than the {MAX_BLOCKS} supported"
            )));
        }
        // Entries are 4 bytes: no overflow for u32 counts in u64.
        let bmap_end = offset_bmap + u64::from(blocks_in_image) * 4;
        if bmap_end > offset_data {
            return Err(Error::invalid(format!(
                "VDI block map {offset_bmap:#x}..{bmap_end:#x} overlaps the data at {offset_data:#x}"
            )));
        }
        if bmap_end > file_len {
            return Err(Error::invalid(format!(
                "VDI block map {offset_bmap:#x}..{bmap_end:#x} ends beyond the file ({file_len} bytes)"
            )));
        }
        let disk_size = self.disk_size.get();
        let capacity = u64::from(blocks_in_image) * u64::from(block_size);
        if disk_size > capacity {
            return Err(Error::invalid(format!(
                "VDI disk size {disk_size} exceeds the {blocks_in_image} blocks of {block_size} bytes"
            )));
        }
        if disk_size > VDI_DISK_SIZE_MAX {
            return Err(Error::limit(format!(
                "VDI disk size {disk_size} exceeds the maximum {VDI_DISK_SIZE_MAX}"
            )));
        }
        // Odd sizes (VBoxManage convertfromraw) are rounded up to a sector, as qemu does; the
        // capacity is a whole number of sectors, so this stays within it.
        let disk_size = disk_size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let blocks_allocated = self.blocks_allocated.get();
        if blocks_allocated > blocks_in_image {
            return Err(Error::invalid(format!(
                "VDI header says {blocks_allocated} blocks are allocated of {blocks_in_image}"
            )));
        }
        Ok(Layout {
            image_type,
            offset_bmap,
            offset_data,
            disk_size,
            block_size: u64::from(block_size),
            blocks_in_image,
            blocks_allocated,
        })
    }

    /// A fresh header for a new image with random image and snapshot UUIDs.
    pub(crate) fn new(layout: &Layout) -> Result<RawHeader> {
        let mut h = RawHeader::new_zeroed();
        h.text[..VDI_TEXT.len()].copy_from_slice(VDI_TEXT);
        h.signature.set(VDI_SIGNATURE);
        h.version.set(VDI_VERSION_1_1);
        h.header_size.set(HEADER1_SIZE);
        h.image_type.set(layout.image_type);
        let to_u32 = |v: u64, what: &str| {
            u32::try_from(v)
                .map_err(|_| Error::limit(format!("VDI {what} {v} does not fit in 32 bits")))
        };
        h.offset_bmap
            .set(to_u32(layout.offset_bmap, "block map offset")?);
        h.offset_data
            .set(to_u32(layout.offset_data, "data offset")?);
        h.sector_size.set(SECTOR_SIZE as u32);
        h.disk_size.set(layout.disk_size);
        h.block_size.set(to_u32(layout.block_size, "block size")?);
        h.blocks_in_image.set(layout.blocks_in_image);
        h.blocks_allocated.set(layout.blocks_allocated);
        h.uuid_image = uuid::Uuid::new_v4().to_bytes_le();
        h.uuid_last_snap = uuid::Uuid::new_v4().to_bytes_le();
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            image_type: VDI_TYPE_DYNAMIC,
            offset_bmap: 512,
            offset_data: 1024,
            disk_size: 10 << 20,
            block_size: 1 << 20,
            blocks_in_image: 10,
            blocks_allocated: 0,
        }
    }

    fn header() -> RawHeader {
        RawHeader::new(&layout()).unwrap()
    }

    #[test]
    fn new_header_validates_to_its_layout() {
        assert_eq!(header().validate(1024).unwrap(), layout());
    }

    #[test]
    fn new_headers_get_distinct_random_uuids() {
        let (a, b) = (header(), header());
        assert_ne!(a.uuid_image, b.uuid_image);
        assert_ne!(a.uuid_image, a.uuid_last_snap);
        assert_eq!(a.uuid_link, [0; 16]);
    }

    #[test]
    fn validate_accepts_the_virtualbox_header_size() {
        let mut h = header();
        // `VDIHEADER1PLUS`: the 1.1 header with the LCHS geometry appended.
        h.header_size.set(0x190);
        assert!(h.validate(1024).is_ok());
    }

    #[test]
    fn validate_rejects_block_size_zero() {
        let mut h = header();
        h.block_size.set(0);
        let e = h.validate(1024).unwrap_err();
        assert!(e.to_string().contains("block size 0"), "{e}");
    }

    #[test]
    fn validate_rejects_version_1_0() {
        let mut h = header();
        h.version.set(0x0001_0000);
        assert_eq!(
            h.validate(1024).unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
    }

    #[test]
    fn validate_rejects_disk_size_beyond_block_capacity() {
        let mut h = header();
        h.disk_size.set(u64::MAX);
        let e = h.validate(1024).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }

    #[test]
    fn validate_rejects_block_map_beyond_file() {
        let mut h = header();
        h.blocks_in_image.set(200);
        h.offset_data.set(4096);
        assert!(h.validate(1024).is_err());
    }

    #[test]
    fn validate_rejects_block_map_overlapping_data() {
        let mut h = header();
        h.blocks_in_image.set(200);
        h.disk_size.set(1 << 20);
        let e = h.validate(1 << 20).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    #[test]
    fn validate_rejects_too_many_blocks() {
        let mut h = header();
        h.blocks_in_image.set(MAX_BLOCKS + 1);
        assert_eq!(
            h.validate(u64::MAX).unwrap_err().kind(),
            crate::ErrorKind::Limit
        );
    }

    #[test]
    fn validate_rounds_odd_disk_size_up_to_a_sector() {
        let mut h = header();
        h.disk_size.set(1000);
        assert_eq!(h.validate(1024).unwrap().disk_size, 1024);
    }

    #[test]
    fn validate_rejects_differencing_images() {
        let mut h = header();
        h.uuid_parent = [1; 16];
        assert_eq!(
            h.validate(1024).unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
    }
}
