//! The driver model: a format driver answers "what is at this guest offset?" and the generic access
//! layer ([`crate::Image`]) turns the answers into reads, writes, maps and conversions.
//!
//! A driver describes its metadata; it never copies guest data it does not have to. Reads of
//! [`MapKind::Data`] ranges go straight to host storage; [`MapKind::Unallocated`] ranges fall
//! through to the backing image; [`MapKind::Compressed`] units are inflated by the driver.

use crate::check::{CheckMode, CheckReport};
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::image::Image;
use crate::storage::Storage;
use serde::Serialize;
use std::any::Any;
use std::fmt;

/// What one guest range is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Guest bytes stored verbatim in host file `file` (0 is the image file itself; drivers with
    /// extents or data files number the others) starting at host offset `offset`.
    Data {
        /// Index of the host file, as understood by [`Driver::file`].
        file: usize,
        /// Host offset of the first byte of the range.
        offset: u64,
    },
    /// Allocated in this image and reads as zeroes (a qcow2 zero cluster, a hole in a raw file).
    Zero,
    /// Not allocated in this image: read from the backing image, or zeroes when there is none.
    Unallocated,
    /// Part of a compressed unit (cluster or grain) that starts at guest offset `unit`; the driver
    /// inflates the unit with [`Driver::read_compressed`].
    Compressed {
        /// Guest offset where the compressed unit begins.
        unit: u64,
    },
}

/// One contiguous guest range with a single [`MapKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Guest offset of the range.
    pub start: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// What backs it.
    pub kind: MapKind,
}

/// Backing file as declared inside an image (not yet opened, not yet trusted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackingSpec {
    /// The name exactly as stored in the image.
    pub name: String,
    /// The declared backing format, if the image records one.
    pub format: Option<Format>,
}

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Numeric id, as a string (qemu's `id`).
    pub id: String,
    /// Snapshot name (qemu's `name`).
    pub name: String,
    /// Size of the saved VM state in bytes.
    #[serde(rename = "vm-state-size")]
    pub vm_state_size: u64,
    /// Seconds of the creation date.
    #[serde(rename = "date-sec")]
    pub date_sec: u64,
    /// Nanoseconds of the creation date.
    #[serde(rename = "date-nsec")]
    pub date_nsec: u32,
    /// Seconds of guest run time.
    #[serde(rename = "vm-clock-sec")]
    pub vm_clock_sec: u64,
    /// Nanoseconds of guest run time.
    #[serde(rename = "vm-clock-nsec")]
    pub vm_clock_nsec: u32,
    /// Guest disk size when the snapshot was taken, when recorded.
    #[serde(rename = "icount", skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

/// Format facts for `info`.
#[derive(Debug, Clone, Default)]
pub struct FormatInfo {
    /// Allocation unit (qcow2 cluster, VMDK grain, VHD block), if the format has one.
    pub cluster_size: Option<u64>,
    /// The image's dirty flag, where the format has one.
    pub dirty: bool,
    /// qemu-img's `format-specific` object: `{"type": "...", "data": {...}}`, or `Null`.
    pub format_specific: serde_json::Value,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

/// Writing compressed units: split so a parallel engine can compress on many threads and write in
/// order on one.
pub trait CompressedWrite: Send + Sync {
    /// Bytes of guest data per compressed unit (qcow2 cluster, VMDK grain).
    fn unit_size(&self) -> u64;
    /// Compress one whole unit. `None` when compression would not save space (write it plain).
    /// Pure: may run on any thread.
    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Store a unit produced by [`CompressedWrite::compress`] at guest offset `offset` (unit-aligned).
    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()>;
}

/// A format driver over one opened image.
///
/// All methods take `&self`: drivers keep their caches behind locks so that several threads can read
/// (and, where the format allows, write) at once.
pub trait Driver: Send + Sync + fmt::Debug {
    /// The format.
    fn format(&self) -> Format;

    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// Describe the guest range starting at `offset` (< virtual size): the returned mapping starts at
    /// `offset` and is at most `len` bytes long (and at least one byte).
    fn map(&self, offset: u64, len: u64) -> Result<Mapping>;

    /// Host file `index` (0 = the image file).
    fn file(&self, index: usize) -> Result<&dyn Storage>;

    /// Inflate the compressed unit that starts at guest offset `unit` into `out` (cleared first). The
    /// output is exactly the unit's guest size.
    fn read_compressed(&self, _unit: u64, _out: &mut Vec<u8>) -> Result<()> {
        Err(Error::unsupported(format!(
            "{} has no compressed units",
            self.format()
        )))
    }

    /// The backing file the image declares, if any.
    fn backing(&self) -> Option<&BackingSpec> {
        None
    }

    /// Check that `backing`, opened from [`Driver::backing`]'s name, is the parent this image was
    /// made from, for formats that record the parent's identity (VHD's "Parent Unique ID"). A
    /// mismatch means the name now points at another image and reading through it would return
    /// another disk's data. The default accepts any parent.
    fn verify_backing(&self, _backing: &Image) -> Result<()> {
        Ok(())
    }

    /// Record a different backing file (name and format), or none, in the image's metadata
    /// without touching guest data (`rebase -u`). `parent` is the new backing file, opened, when
    /// the caller could open it (formats that record a parent's identity, like VMDK's
    /// `parentCID`, need it). Readers that open the image afterwards see the new chain. Formats
    /// that cannot record one refuse with [`crate::ErrorKind::Unsupported`].
    fn set_backing(&self, _backing: Option<&BackingSpec>, _parent: Option<&Image>) -> Result<()> {
        Err(Error::unsupported(format!(
            "changing the backing file recorded in {} images",
            self.format()
        )))
    }

    /// Format facts for `info`.
    fn info(&self) -> FormatInfo {
        FormatInfo::default()
    }

    /// Whether the image was opened for writing.
    fn is_writable(&self) -> bool {
        false
    }

    /// Write guest data. Partial allocation units are completed from `backing` (or zeroes).
    fn write_at(&self, _buf: &[u8], _offset: u64, _backing: Option<&Image>) -> Result<()> {
        Err(Error::usage(format!(
            "{} image is not open for writing",
            self.format()
        )))
    }

    /// Make a range read as zeroes, deallocating where the format can. The default writes zero
    /// buffers through [`Driver::write_at`].
    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zero = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(&zero[..n as usize], offset + done, backing)?;
            done += n;
        }
        Ok(())
    }

    /// True when writes must arrive in increasing guest order (streamOptimized VMDK).
    fn sequential_only(&self) -> bool {
        false
    }

    /// True when the format stores every unit compressed, whether or not the caller asked for
    /// compression (streamOptimized VMDK): a copy engine then compresses units on its own
    /// threads through [`Driver::compressed_writer`] instead of leaving it to `write_at`.
    fn compresses_everything(&self) -> bool {
        false
    }

    /// Compressed writing, for formats that support it.
    fn compressed_writer(&self) -> Option<&dyn CompressedWrite> {
        None
    }

    /// Write cached metadata and make everything durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Finish the image (write footers, clear dirty flags). Called once, last.
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// Change the virtual size.
    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(Error::unsupported(format!(
            "resizing {} images",
            self.format()
        )))
    }

    /// Check metadata consistency, repairing according to `mode`.
    fn check(&self, _mode: CheckMode) -> Result<CheckReport> {
        Err(Error::unsupported(format!(
            "checking {} images",
            self.format()
        )))
    }

    /// Downcast to the concrete driver for format-specific operations (snapshots, rebase -u).
    fn as_any(&self) -> &dyn Any;
}
