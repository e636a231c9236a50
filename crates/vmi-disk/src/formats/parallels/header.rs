//! The Parallels image header (qemu `docs/interop/parallels.txt`, "Header"; qemu's
//! `block/parallels.h` `ParallelsHeader`): the on-disk structure, the named limits, and its
//! validation against the file into a [`Layout`].
//!
//! Layout of the first 64 bytes (all integers little-endian):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0x00   | 16   | magic: `WithoutFreeSpace` (v1) or `WithouFreSpacExt` (v2) |
//! | 0x10   | 4    | version, always 2 |
//! | 0x14   | 4    | heads (geometry, informational) |
//! | 0x18   | 4    | cylinders (geometry, informational) |
//! | 0x1c   | 4    | tracks: sectors per cluster |
//! | 0x20   | 4    | BAT entries |
//! | 0x24   | 8    | disk size in sectors (only the low 32 bits count in v1 images) |
//! | 0x2c   | 4    | in use: `0x746F6E59` while open for writing, else 0 |
//! | 0x30   | 4    | data offset in sectors (0 in old v1 images: right after the BAT) |
//! | 0x34   | 4    | flags |
//! | 0x38   | 8    | format extension offset in sectors (0: none) |
//!
//! The BAT follows the header at byte 64: one 32-bit entry per guest cluster, 0 for an
//! unallocated cluster, else the cluster's host offset in sectors (v1) or in clusters (v2).

use crate::error::{Error, Result};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic of v1 images, whose BAT entries count sectors.
pub(crate) const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
/// Magic of v2 images ("extended"), whose BAT entries count clusters.
pub(crate) const MAGIC_V2: &[u8; 16] = b"WithouFreSpacExt";
/// The only header version there is (qemu's `HEADER_VERSION`).
pub(crate) const HEADER_VERSION: u32 = 2;
/// The in-use mark: the image is open for writing, or was not closed cleanly ("Ynot").
pub(crate) const INUSE_MAGIC: u32 = 0x746F_6E59;
/// Bytes of the header; the BAT starts here.
pub(crate) const HEADER_LEN: usize = 64;
/// The sector, unit of every offset in the header.
pub(crate) const SECTOR: u64 = 512;
/// Most sectors per cluster qemu opens (`INT32_MAX / 513`, about 2 GiB clusters).
pub(crate) const MAX_TRACKS: u32 = i32::MAX as u32 / 513;
/// Most BAT entries qemu opens (`INT_MAX / sizeof(uint32_t)`): a BAT of up to 2 GiB. The BAT must
/// also lie within the file, which bounds what opening reads and holds.
pub(crate) const MAX_BAT_ENTRIES: u32 = i32::MAX as u32 / 4;
/// Largest format extension offset qemu accepts, in sectors (`INT64_MAX >> 9`).
pub(crate) const MAX_EXT_OFF: u64 = (i64::MAX as u64) >> 9;
/// The cluster size qemu creates by default (`DEFAULT_CLUSTER_SIZE`).
pub(crate) const DEFAULT_CLUSTER_SIZE: u64 = 1 << 20;
/// Geometry qemu writes into new images: heads, and sectors per cylinder per head.
pub(crate) const HEADS: u32 = 16;
/// Sectors per track in the geometry qemu writes.
pub(crate) const SEC_IN_CYL: u64 = 32;
/// qemu's bound on images it creates: at most 2^32 clusters (`MAX_PARALLELS_IMAGE_FACTOR`).
pub(crate) const MAX_IMAGE_FACTOR: u64 = 1 << 32;

/// The 64-byte header, as stored.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct RawHeader {
    /// [`MAGIC_V1`] or [`MAGIC_V2`].
    pub magic: [u8; 16],
    /// [`HEADER_VERSION`].
    pub version: U32,
    /// Geometry: heads.
    pub heads: U32,
    /// Geometry: cylinders.
    pub cylinders: U32,
    /// Sectors per cluster.
    pub tracks: U32,
    /// Entries in the BAT.
    pub bat_entries: U32,
    /// Disk size in sectors.
    pub nb_sectors: U64,
    /// [`INUSE_MAGIC`] while open for writing.
    pub inuse: U32,
    /// Data area start in sectors.
    pub data_off: U32,
    /// Flags (none defined that change reading).
    pub flags: U32,
    /// Format extension cluster, in sectors; 0 when there is none.
    pub ext_off: U64,
}

/// The validated facts of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// v2 magic (`WithouFreSpacExt`); v1 otherwise.
    pub v2: bool,
    /// Sectors per cluster.
    pub tracks: u32,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// BAT entries.
    pub bat_entries: u32,
    /// Disk size in sectors (v1: low 32 bits of the field).
    pub total_sectors: u64,
    /// What a BAT entry is multiplied by to give sectors (1 in v1, `tracks` in v2).
    pub off_multiplier: u64,
    /// The header was marked in use: the image was not closed cleanly.
    pub unclean: bool,
    /// Start of the data area in sectors (the stored value when valid, else the smallest valid).
    pub data_start: u64,
    /// Whether the stored data offset is valid (qemu's `parallels_test_data_off`).
    pub data_off_ok: bool,
    /// The format extension, in sectors, if any.
    pub ext_off: u64,
}

impl RawHeader {
    /// Read the header from the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let b = bytes.get(..HEADER_LEN).ok_or_else(|| {
            Error::invalid(format!(
                "file is shorter than the {HEADER_LEN}-byte Parallels header"
            ))
        })?;
        RawHeader::read_from_bytes(b)
            .map_err(|_| Error::invalid("unreadable Parallels header".to_string()))
    }

    /// Check every field against the named limits and the file length, as qemu's
    /// `parallels_open` does, and compute the layout.
    pub fn validate(&self, file_len: u64) -> Result<Layout> {
        if self.version.get() != HEADER_VERSION {
            return Err(Error::invalid(format!(
                "image not in Parallels format: version {}, expected {HEADER_VERSION}",
                self.version.get()
            )));
        }
        let v2 = match &self.magic {
            m if m == MAGIC_V2 => true,
            m if m == MAGIC_V1 => false,
            _ => return Err(Error::invalid("image not in Parallels format: bad magic")),
        };
        let tracks = self.tracks.get();
        if tracks == 0 {
            return Err(Error::invalid(
                "Parallels header: zero sectors per track (cluster size 0)",
            ));
        }
        if tracks > MAX_TRACKS {
            return Err(Error::limit(format!(
                "Parallels header: {tracks} sectors per cluster, more than {MAX_TRACKS}"
            )));
        }
        let bat_entries = self.bat_entries.get();
        if bat_entries > MAX_BAT_ENTRIES {
            return Err(Error::limit(format!(
                "Parallels header: {bat_entries} BAT entries, more than {MAX_BAT_ENTRIES}"
            )));
        }
        let bat_end = bat_entry_off(bat_entries);
        if bat_end > file_len {
            return Err(Error::invalid(format!(
                "Parallels BAT of {bat_entries} entries ends at byte {bat_end}, beyond the end \
                 of the file ({file_len} bytes)"
            )));
        }
        let ext_off = self.ext_off.get();
        if ext_off >= MAX_EXT_OFF {
            return Err(Error::invalid(format!(
                "Parallels header: format extension offset {ext_off} sectors is too big"
            )));
        }
        let total_sectors = if v2 {
            self.nb_sectors.get()
        } else {
            self.nb_sectors.get() & 0xffff_ffff
        };
        // Both factors are below 2^31, so the product fits.
        if u64::from(bat_entries) * u64::from(tracks) < total_sectors {
            return Err(Error::invalid(format!(
                "Parallels header: {bat_entries} BAT entries of {tracks} sectors are too few \
                 for a disk of {total_sectors} sectors"
            )));
        }
        let cluster_size = u64::from(tracks) * SECTOR;
        // The smallest valid data offset: right after the BAT, rounded to a cluster in v2.
        let mut min_off = bat_end.div_ceil(SECTOR);
        if v2 {
            min_off = min_off.div_ceil(u64::from(tracks)) * u64::from(tracks);
        }
        let data_off = u64::from(self.data_off.get());
        let file_sectors = file_len / SECTOR;
        let (data_start, data_off_ok) = if data_off == 0 && !v2 {
            (min_off, true)
        } else if data_off < min_off || data_off > file_sectors {
            (min_off, false)
        } else {
            (data_off, true)
        };
        Ok(Layout {
            v2,
            tracks,
            cluster_size,
            bat_entries,
            total_sectors,
            off_multiplier: if v2 { u64::from(tracks) } else { 1 },
            unclean: self.inuse.get() == INUSE_MAGIC,
            data_start,
            data_off_ok,
            ext_off,
        })
    }
}

/// Byte offset of BAT entry `index` (also: the end of a BAT of `index` entries).
pub(crate) fn bat_entry_off(index: u32) -> u64 {
    HEADER_LEN as u64 + 4 * u64::from(index)
}

impl Layout {
    /// Guest size in bytes.
    pub fn virtual_size(&self) -> u64 {
        // total_sectors <= bat_entries * tracks < 2^53, checked in `validate`.
        self.total_sectors * SECTOR
    }

    /// Host byte offset a BAT entry names (0 for an unallocated cluster).
    pub fn entry_offset(&self, entry: u32) -> u64 {
        // entry < 2^32, multiplier < 2^22, SECTOR = 2^9: below 2^63.
        u64::from(entry) * self.off_multiplier * SECTOR
    }

    /// Byte offset of the data area.
    pub fn data_start_bytes(&self) -> u64 {
        self.data_start * SECTOR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v2: bool, tracks: u32, entries: u32, sectors: u64, data_off: u32) -> RawHeader {
        RawHeader {
            magic: if v2 { *MAGIC_V2 } else { *MAGIC_V1 },
            version: HEADER_VERSION.into(),
            heads: 16.into(),
            cylinders: 0.into(),
            tracks: tracks.into(),
            bat_entries: entries.into(),
            nb_sectors: sectors.into(),
            inuse: 0.into(),
            data_off: data_off.into(),
            flags: 0.into(),
            ext_off: 0.into(),
        }
    }

    #[test]
    fn v1_size_keeps_only_the_low_32_bits() {
        let l = header(false, 8, 4, (1 << 32) | 32, 0)
            .validate(4096)
            .unwrap();
        assert_eq!((l.total_sectors, l.off_multiplier), (32, 1));
        // A zero data offset in v1 means right after the BAT.
        assert_eq!((l.data_start, l.data_off_ok), (1, true));
    }

    #[test]
    fn v2_data_offset_below_the_cluster_aligned_bat_end_is_flagged_not_fatal() {
        let l = header(true, 128, 10, 1280, 1).validate(1 << 20).unwrap();
        assert_eq!((l.data_start, l.data_off_ok), (128, false));
        let l = header(true, 128, 10, 1280, 128).validate(1 << 20).unwrap();
        assert_eq!((l.data_start, l.data_off_ok), (128, true));
    }

    #[test]
    fn entry_offsets_count_clusters_in_v2_and_sectors_in_v1() {
        let v2 = header(true, 128, 10, 1280, 128).validate(1 << 20).unwrap();
        assert_eq!(v2.entry_offset(3), 3 * 128 * 512);
        let v1 = header(false, 128, 10, 1280, 0).validate(1 << 20).unwrap();
        assert_eq!(v1.entry_offset(3), 3 * 512);
    }
}
