//! The VHD hard disk footer (Microsoft "Virtual Hard Disk Image Format Specification" 1.0,
//! "Hard Disk Footer Format"): the 512-byte structure every VHD ends with (and that dynamic and
//! differencing disks also copy to offset 0), its checksum, and the rule that decides whether the
//! guest size comes from the footer's current size or from its CHS geometry.

use super::geometry::{Chs, CHS_MAX_GEOMETRY_SECTORS};
use crate::error::{Error, Result};
use zerocopy::byteorder::{BigEndian, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the footer (and of its copy at offset 0 of dynamic disks), spec "Hard Disk Footer Format".
pub const FOOTER_SIZE: u64 = 512;

/// `"conectix"`, the cookie every footer begins with (spec: "Cookie").
pub const FOOTER_COOKIE: [u8; 8] = *b"conectix";

/// Features bit that the spec says must always be set ("Reserved. This bit must always be set").
pub const FEATURE_RESERVED: u32 = 0x0000_0002;

/// File format version 1.0 (spec: "File Format Version").
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;

/// Data offset of a fixed disk: all ones (spec says 0xFFFFFFFF; tools write all 64 bits).
pub const NO_DATA_OFFSET: u64 = u64::MAX;

/// Seconds between the Unix epoch and the VHD epoch (January 1, 2000 00:00:00 UTC), spec "Time Stamp".
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

/// Largest guest size accepted: 2040 GiB (0xff000000 sectors), the limit qemu enforces and the
/// largest size Hyper-V creates for VHD (the spec's format tops out near 2 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 0xff00_0000 * 512;

/// Creator application written by vmi for CHS-sized images: qemu's value, so every reader applies
/// the same size rule (qemu reads `qemu` images by geometry).
pub const CREATOR_APP_CHS: [u8; 4] = *b"qemu";
/// Creator application written when `force_size=on`: qemu's value telling readers to trust the
/// footer's current size.
pub const CREATOR_APP_FORCE_SIZE: [u8; 4] = *b"qem2";
/// Creator host OS written by vmi (spec: "Wi2k" for Windows; qemu writes the same).
pub const CREATOR_HOST_OS: [u8; 4] = *b"Wi2k";
/// Creator version written by vmi: 5.3, Virtual PC 2007, as qemu writes.
pub const CREATOR_VERSION: u32 = 0x0005_0003;

/// Creator applications whose images take their size from the footer's current size rather than
/// from the CHS geometry (qemu `vpc_ignore_current_size`): Hyper-V, qemu with force_size,
/// Disk2vhd, XenServer, XenConverter, and Azure.
pub const CURRENT_SIZE_CREATORS: [[u8; 4]; 6] = [
    *b"win ", *b"qem2", *b"d2v ", *b"tap\0", *b"CTXS", *b"wa\0\0",
];

/// The disk types of the spec's "Disk Type" field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// 2: data first, footer at the end.
    Fixed,
    /// 3: sparse, with a dynamic disk header and a block allocation table.
    Dynamic,
    /// 4: sparse, sectors not present come from a parent disk.
    Differencing,
}

impl DiskType {
    /// The on-disk value.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// Decode the on-disk value.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

/// The hard disk footer exactly as stored (spec "Hard Disk Footer Format"), all fields big-endian.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawFooter {
    /// Cookie: "conectix".
    pub cookie: [u8; 8],
    /// Features: 0 none, 1 temporary, 2 reserved (always set).
    pub features: U32<BigEndian>,
    /// File format version: 0x00010000.
    pub version: U32<BigEndian>,
    /// Data offset: absolute offset of the dynamic disk header; all ones for fixed disks.
    pub data_offset: U64<BigEndian>,
    /// Time stamp: seconds since January 1, 2000 UTC.
    pub timestamp: U32<BigEndian>,
    /// Creator application ("vpc ", "vs  ", "win ", "qemu", "qem2", ...).
    pub creator_app: [u8; 4],
    /// Creator version (major in the high 16 bits).
    pub creator_version: U32<BigEndian>,
    /// Creator host OS ("Wi2k", "Mac ").
    pub creator_os: [u8; 4],
    /// Original size: the size of the disk at creation, in bytes.
    pub original_size: U64<BigEndian>,
    /// Current size: the current size of the disk, in bytes.
    pub current_size: U64<BigEndian>,
    /// Disk geometry: cylinders.
    pub cylinders: U16<BigEndian>,
    /// Disk geometry: heads.
    pub heads: u8,
    /// Disk geometry: sectors per track.
    pub sectors_per_track: u8,
    /// Disk type: 2 fixed, 3 dynamic, 4 differencing.
    pub disk_type: U32<BigEndian>,
    /// Checksum: ones' complement of the sum of all footer bytes with this field taken as zero.
    pub checksum: U32<BigEndian>,
    /// Unique id, identifying the disk (a differencing child records its parent's).
    pub unique_id: [u8; 16],
    /// Saved state: 1 when the disk is in a saved state.
    pub saved_state: u8,
    /// Reserved: zeroes.
    pub reserved: [u8; 427],
}

const _: () = assert!(std::mem::size_of::<RawFooter>() == FOOTER_SIZE as usize);

/// Ones' complement of the byte sum of `bytes`, with the four bytes at `checksum_at` taken as
/// zero (spec "Checksum", used by the footer and the dynamic disk header).
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes.iter().enumerate().fold(0u32, |acc, (i, &b)| {
        if (checksum_at..checksum_at + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(u32::from(b))
        }
    });
    !sum
}

/// Byte offset of the checksum field inside the footer.
pub const FOOTER_CHECKSUM_AT: usize = 64;

/// A footer that passed its checks.
#[derive(Debug, Clone)]
pub struct Footer {
    /// The raw structure (kept to rewrite it unchanged apart from the fields vmi updates).
    pub raw: RawFooter,
    /// The disk type.
    pub disk_type: DiskType,
}

impl Footer {
    /// Parse and validate 512 bytes: cookie, checksum, disk type. `what` names the copy ("footer
    /// at offset N") in errors.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Footer> {
        let raw = RawFooter::read_from_bytes(bytes).map_err(|_| {
            Error::invalid(format!(
                "{what}: {} bytes, expected {FOOTER_SIZE}",
                bytes.len()
            ))
        })?;
        if raw.cookie != FOOTER_COOKIE {
            return Err(Error::invalid(format!(
                "{what}: cookie is {:?}, expected \"conectix\"",
                String::from_utf8_lossy(&raw.cookie)
            )));
        }
        let stored = raw.checksum.get();
        let computed = checksum(bytes, FOOTER_CHECKSUM_AT);
        if stored != computed {
            return Err(Error::invalid(format!(
                "{what}: checksum is {stored:#010x}, the footer sums to {computed:#010x}"
            )));
        }
        let code = raw.disk_type.get();
        let disk_type = DiskType::from_code(code).ok_or_else(|| {
            Error::invalid(format!(
                "{what}: disk type {code} is not fixed (2), dynamic (3) or differencing (4)"
            ))
        })?;
        Ok(Footer { raw, disk_type })
    }

    /// The geometry recorded in the footer.
    pub fn chs(&self) -> Chs {
        Chs {
            cylinders: self.raw.cylinders.get(),
            heads: self.raw.heads,
            sectors_per_track: self.raw.sectors_per_track,
        }
    }

    /// Whether the guest size comes from the current size field (true) or from the geometry:
    /// current size for the creators in [`CURRENT_SIZE_CREATORS`] and whenever the geometry is the
    /// maximum 65535/16/255 (which cannot describe the disk), as qemu decides.
    pub fn uses_current_size(&self) -> bool {
        CURRENT_SIZE_CREATORS.contains(&self.raw.creator_app)
            || self.chs().sectors() == CHS_MAX_GEOMETRY_SECTORS
    }

    /// The guest size in bytes, by [`Footer::uses_current_size`], bounded by [`MAX_VIRTUAL_SIZE`].
    pub fn virtual_size(&self) -> Result<u64> {
        let size = if self.uses_current_size() {
            // Whole sectors, as qemu counts them.
            self.raw.current_size.get() / 512 * 512
        } else {
            self.chs().sectors() * 512
        };
        if size > MAX_VIRTUAL_SIZE {
            return Err(Error::limit(format!(
                "VHD footer declares {size} bytes, more than the {MAX_VIRTUAL_SIZE}-byte maximum"
            )));
        }
        Ok(size)
    }

    /// Serialise with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE as usize] {
        let mut raw = self.raw.clone();
        raw.checksum.set(0);
        let mut out = [0u8; FOOTER_SIZE as usize];
        out.copy_from_slice(raw.as_bytes());
        let sum = checksum(&out, FOOTER_CHECKSUM_AT);
        out[FOOTER_CHECKSUM_AT..FOOTER_CHECKSUM_AT + 4].copy_from_slice(&sum.to_be_bytes());
        out
    }

    /// A new footer for a disk of `disk_type`, `size` bytes, geometry `chs`.
    pub fn new(
        disk_type: DiskType,
        size: u64,
        chs: Chs,
        creator_app: [u8; 4],
        unique_id: [u8; 16],
    ) -> Footer {
        let mut raw = RawFooter::new_zeroed();
        raw.cookie = FOOTER_COOKIE;
        raw.features.set(FEATURE_RESERVED);
        raw.version.set(FILE_FORMAT_VERSION);
        raw.data_offset.set(match disk_type {
            DiskType::Fixed => NO_DATA_OFFSET,
            _ => FOOTER_SIZE,
        });
        raw.timestamp.set(vhd_now());
        raw.creator_app = creator_app;
        raw.creator_version.set(CREATOR_VERSION);
        raw.creator_os = CREATOR_HOST_OS;
        raw.original_size.set(size);
        raw.current_size.set(size);
        raw.cylinders.set(chs.cylinders);
        raw.heads = chs.heads;
        raw.sectors_per_track = chs.sectors_per_track;
        raw.disk_type.set(disk_type.code());
        raw.unique_id = unique_id;
        Footer { raw, disk_type }
    }
}

/// Seconds since the VHD epoch, now (saturating: clocks before 2000 give 0).
pub fn vhd_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    vhd_time(unix)
}

/// Convert Unix seconds to VHD seconds (saturating at both ends).
pub fn vhd_time(unix_secs: u64) -> u32 {
    u32::try_from(unix_secs.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer::new(
            DiskType::Dynamic,
            1 << 30,
            super::super::geometry::geometry_for(1 << 21),
            CREATOR_APP_CHS,
            [7; 16],
        )
    }

    #[test]
    fn a_serialised_footer_parses_back() {
        let bytes = sample().to_bytes();
        let f = Footer::parse(&bytes, "footer").unwrap();
        assert_eq!(f.disk_type, DiskType::Dynamic);
        assert_eq!(f.raw.current_size.get(), 1 << 30);
    }

    #[test]
    fn parse_rejects_a_footer_with_one_flipped_byte() {
        let mut bytes = sample().to_bytes();
        bytes[100] ^= 1;
        let e = Footer::parse(&bytes, "footer").unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn parse_rejects_an_unknown_disk_type() {
        let mut f = sample();
        f.raw.disk_type.set(5);
        let e = Footer::parse(&f.to_bytes(), "footer").unwrap_err();
        assert!(e.to_string().contains("disk type 5"), "{e}");
    }

    #[test]
    fn checksum_is_the_ones_complement_of_the_byte_sum() {
        let mut b = [0u8; 512];
        b[0] = 1;
        b[1] = 2;
        b[64] = 0xff; // inside the checksum field: ignored
        assert_eq!(checksum(&b, 64), !3u32);
    }

    #[test]
    fn hyper_v_images_take_the_current_size_and_qemu_images_the_geometry() {
        let mut f = sample();
        f.raw.current_size.set(1 << 30);
        let chs_size = f.chs().sectors() * 512;
        assert_eq!(f.virtual_size().unwrap(), chs_size);
        for app in [
            *b"win ", *b"qem2", *b"d2v ", *b"tap\0", *b"CTXS", *b"wa\0\0",
        ] {
            f.raw.creator_app = app;
            assert_eq!(f.virtual_size().unwrap(), 1 << 30, "{app:?}");
        }
        f.raw.creator_app = *b"vpc ";
        assert_eq!(f.virtual_size().unwrap(), chs_size);
    }

    #[test]
    fn maximum_geometry_means_current_size_whatever_the_creator() {
        let mut f = sample();
        f.raw.cylinders.set(65535);
        f.raw.heads = 16;
        f.raw.sectors_per_track = 255;
        f.raw.current_size.set(200 << 30);
        assert_eq!(f.virtual_size().unwrap(), 200 << 30);
    }

    #[test]
    fn sizes_beyond_2040_gib_are_refused() {
        let mut f = sample();
        f.raw.creator_app = *b"win ";
        f.raw.current_size.set(MAX_VIRTUAL_SIZE + 512);
        assert!(f.virtual_size().is_err());
    }
}
