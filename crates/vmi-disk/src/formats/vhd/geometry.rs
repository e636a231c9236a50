//! CHS geometry (spec "Appendix: CHS Calculation") and the size rules built on it: the spec's
//! algorithm, qemu's rounding up of a requested size to the next size the geometry can express,
//! and `force_size`, which keeps the requested size exactly.

use super::footer::{CREATOR_APP_CHS, CREATOR_APP_FORCE_SIZE, MAX_VIRTUAL_SIZE};
use crate::error::{Error, Result};

/// Largest cylinder count the footer's 16-bit field holds.
pub const CHS_MAX_CYLINDERS: u16 = 65535;
/// Largest head count the spec's algorithm produces (the ATA limit of 16).
pub const CHS_MAX_HEADS: u8 = 16;
/// Largest sectors-per-track value the spec's algorithm produces.
pub const CHS_MAX_SECTORS_PER_TRACK: u8 = 255;
/// Sectors the maximum geometry 65535/16/255 describes (about 127 GiB). A footer with exactly this
/// geometry cannot describe the disk, so readers use the current size instead.
pub const CHS_MAX_GEOMETRY_SECTORS: u64 =
    CHS_MAX_CYLINDERS as u64 * CHS_MAX_HEADS as u64 * CHS_MAX_SECTORS_PER_TRACK as u64;

/// A disk geometry: cylinders, heads, sectors per track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chs {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Chs {
    /// The maximum geometry, written when the size cannot be (or must not be) expressed in CHS.
    pub const MAX: Chs = Chs {
        cylinders: CHS_MAX_CYLINDERS,
        heads: CHS_MAX_HEADS,
        sectors_per_track: CHS_MAX_SECTORS_PER_TRACK,
    };

    /// Sectors the geometry describes.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }
}

/// The spec's CHS algorithm for `total_sectors` (it rounds down: the geometry may describe fewer
/// sectors than asked for). Sizes beyond the maximum geometry are clamped to it.
pub fn geometry_for(total_sectors: u64) -> Chs {
    let total = total_sectors.min(CHS_MAX_GEOMETRY_SECTORS);
    let (spt, heads, cyl_times_heads): (u64, u64, u64);
    if total >= u64::from(CHS_MAX_CYLINDERS) * 16 * 63 {
        spt = 255;
        heads = 16;
        cyl_times_heads = total / spt;
    } else {
        let mut s = 17;
        let mut cth = total / s;
        let mut h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            cth = total / s;
        }
        if cth >= h * 1024 {
            s = 63;
            h = 16;
            cth = total / s;
        }
        spt = s;
        heads = h;
        cyl_times_heads = cth;
    }
    // The branches bound every value: heads <= 16, spt <= 255, cylinders <= 65535.
    Chs {
        cylinders: u16::try_from(cyl_times_heads / heads).unwrap_or(CHS_MAX_CYLINDERS),
        heads: u8::try_from(heads).unwrap_or(CHS_MAX_HEADS),
        sectors_per_track: u8::try_from(spt).unwrap_or(CHS_MAX_SECTORS_PER_TRACK),
    }
}

/// The smallest geometry that holds at least `total_sectors` (qemu's rounding: try the spec's
/// algorithm on growing sector counts until the geometry is large enough). Sizes beyond the
/// maximum geometry get the maximum geometry.
pub fn rounded_geometry(total_sectors: u64) -> Chs {
    let total = total_sectors.min(CHS_MAX_GEOMETRY_SECTORS);
    let mut extra = 0;
    loop {
        let chs = geometry_for(total + extra);
        if chs.sectors() >= total {
            return chs;
        }
        extra += 1;
    }
}

/// How a new disk's size is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizePlan {
    /// The guest size in bytes (what the footer's current size holds and what readers will see).
    pub size: u64,
    /// The geometry to record.
    pub chs: Chs,
    /// The creator application, which tells readers which of the two to believe.
    pub creator_app: [u8; 4],
}

/// Plan a new disk of `requested` bytes (zero allowed, as qemu allows it), as qemu-img does: the size is rounded up to whole
/// sectors; without `force_size` it is then rounded up to the next CHS-expressible size (and the
/// creator is `qemu`, read by geometry); with `force_size` it is kept, the geometry is the maximum
/// and the creator is `qem2` (read by current size). Above the maximum geometry (about 127 GiB)
/// the current size is used either way.
pub fn plan(requested: u64, force_size: bool) -> Result<SizePlan> {
    let sectors = requested.div_ceil(512);
    let too_large = || {
        Error::usage(format!(
            "VHD size {requested} is larger than the {MAX_VIRTUAL_SIZE}-byte (2040 GiB) maximum"
        ))
    };
    if sectors > MAX_VIRTUAL_SIZE / 512 {
        return Err(too_large());
    }
    let chs = if force_size {
        Chs::MAX
    } else {
        rounded_geometry(sectors)
    };
    let size_sectors = if chs.sectors() == CHS_MAX_GEOMETRY_SECTORS {
        sectors
    } else {
        chs.sectors()
    };
    Ok(SizePlan {
        size: size_sectors * 512,
        chs,
        creator_app: if force_size {
            CREATOR_APP_FORCE_SIZE
        } else {
            CREATOR_APP_CHS
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_disks_use_17_sectors_per_track_and_at_least_4_heads() {
        let chs = geometry_for(20480); // 10 MiB
        assert_eq!(chs.sectors_per_track, 17);
        assert_eq!(chs.heads, 4);
        assert_eq!(chs.cylinders, 301);
    }

    #[test]
    fn geometry_never_exceeds_the_requested_sector_count() {
        for s in [1u64, 100, 20480, 2_097_152, 8_386_560, 266_338_304, 1 << 32] {
            assert!(geometry_for(s).sectors() <= s.max(CHS_MAX_GEOMETRY_SECTORS.min(s)));
        }
    }

    #[test]
    fn one_gib_rounds_up_to_qemus_size() {
        // qemu-img create -f vpc x 1G reports 1073995776 bytes (2080/16/63).
        let p = plan(1 << 30, false).unwrap();
        assert_eq!(p.size, 1_073_995_776);
        assert_eq!(
            p.chs,
            Chs {
                cylinders: 2081,
                heads: 16,
                sectors_per_track: 63
            }
        );
        assert_eq!(&p.creator_app, b"qemu");
    }

    #[test]
    fn force_size_keeps_the_size_and_writes_the_maximum_geometry() {
        let p = plan(1000 * 1024 * 1024 + 7, true).unwrap();
        assert_eq!(p.size, 1000 * 1024 * 1024 + 512);
        assert_eq!(p.chs, Chs::MAX);
        assert_eq!(&p.creator_app, b"qem2");
    }

    #[test]
    fn sizes_above_the_maximum_geometry_keep_their_size() {
        let p = plan(200 << 30, false).unwrap();
        assert_eq!(p.size, 200 << 30);
        assert_eq!(p.chs, Chs::MAX);
    }

    #[test]
    fn plan_accepts_zero_like_qemu_and_refuses_more_than_2040_gib() {
        assert_eq!(plan(0, false).unwrap().size, 0);
        assert!(plan(MAX_VIRTUAL_SIZE + 1, true).is_err());
        assert!(plan(MAX_VIRTUAL_SIZE, true).is_ok());
    }
}
