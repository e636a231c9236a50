//! `sparsify`: give the space of free filesystem blocks back to the image file, in place, as
//! virt-sparsify `--in-place` does. For each ext2/3/4 filesystem the block bitmaps (read through
//! libext2fs) name the free blocks, for each FAT filesystem the free entries of its first FAT;
//! each free range becomes zeroes through
//! [`vmi_disk::Image::write_zeroes`], which deallocates where the format can (qcow2: zero or
//! unallocated clusters, their host clusters freed and punched; raw: holes punched). Swap
//! partitions are zeroed after their header page. Data in used blocks is never touched.

use crate::error::Result;
use crate::ext4::Ext4;
use crate::guest::filesystems;
use serde::Serialize;
use vmi_disk::Image;

/// The swap header page, kept when a swap area is zeroed.
const SWAP_HEADER: u64 = 4096;

/// What sparsify did to one volume.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeReport {
    /// "partition N" or "whole disk".
    pub device: String,
    /// "ext4", "vfat" or "swap".
    pub fs_type: String,
    /// Bytes of free space turned into zeroes.
    pub zeroed: u64,
}

/// What sparsify did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per volume.
    pub volumes: Vec<VolumeReport>,
    /// Total bytes zeroed.
    pub zeroed: u64,
    /// Volumes skipped, with the reason.
    pub skipped: Vec<String>,
}

/// Zero the free space of every filesystem vmi understands. `img` must be open for writing;
/// `dry_run` only counts.
pub fn sparsify(img: &Image, dry_run: bool) -> Result<Report> {
    let (_, found) = filesystems(img)?;
    let mut report = Report {
        volumes: Vec::new(),
        zeroed: 0,
        skipped: Vec::new(),
    };
    for f in found {
        let vol = f.volume(img)?;
        let ranges = match f.fs_type.as_deref() {
            Some("ext4") => {
                // Read-only: libext2fs writes nothing; the zeroes go through the volume.
                let fs = match Ext4::open(vol, false) {
                    Ok(fs) => fs,
                    Err(e) => {
                        report.skipped.push(format!("{}: {e}", f.device));
                        continue;
                    }
                };
                let r = fs.free_ranges()?;
                drop(fs);
                r
            }
            Some("swap") if vol.len() > SWAP_HEADER => vec![(SWAP_HEADER, vol.len() - SWAP_HEADER)],
            Some("vfat") => match crate::fat::free_ranges(&vol) {
                Ok(r) => r,
                Err(e) => {
                    report.skipped.push(format!("{}: {e}", f.device));
                    continue;
                }
            },
            other => {
                report.skipped.push(format!(
                    "{}: {}",
                    f.device,
                    other.map_or("no filesystem recognised".to_string(), |t| format!(
                        "{t} is not sparsified"
                    ))
                ));
                continue;
            }
        };
        let mut zeroed = 0u64;
        for (off, len) in ranges {
            if !dry_run {
                vol.write_zeroes(off, len)?;
            }
            zeroed += len;
        }
        report.zeroed += zeroed;
        report.volumes.push(VolumeReport {
            device: f.device.clone(),
            fs_type: f.fs_type.clone().unwrap_or_default(),
            zeroed,
        });
    }
    if !dry_run {
        img.flush()?;
    }
    Ok(report)
}
