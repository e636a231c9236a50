//! The QED header (qemu `docs/interop/qed_spec.txt`, "Header"): 64 little-endian bytes at offset
//! 0, followed within the header clusters by the backing file name. Every field is bounded as qemu
//! bounds it (`block/qed.c`, `bdrv_qed_do_open`) and by the file size.

use crate::error::{Error, Result};

/// `QED\0`, little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"QED\0");
/// Bytes of the header structure.
pub const HEADER_LEN: usize = 64;
/// The image has a backing file.
pub const F_BACKING_FILE: u64 = 0x01;
/// The image was not closed cleanly: check it before writing.
pub const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw: do not probe it.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Feature bits this implementation understands.
pub const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// Smallest cluster (4 KiB).
pub const MIN_CLUSTER_SIZE: u32 = 4 * 1024;
/// Largest cluster (64 MiB).
pub const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// qemu's default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
/// Smallest table (in clusters).
pub const MIN_TABLE_SIZE: u32 = 1;
/// Largest table (in clusters).
pub const MAX_TABLE_SIZE: u32 = 16;
/// qemu's default table size.
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// Longest backing file name accepted (qemu's `PATH_MAX`-sized buffer).
pub const MAX_BACKING_NAME: u32 = 4096;

/// The header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters per L1 or L2 table.
    pub table_size: u32,
    /// Clusters of header at the start of the file.
    pub header_size: u32,
    /// Feature bits.
    pub features: u64,
    /// Compatible feature bits.
    pub compat_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Guest size in bytes.
    pub image_size: u64,
    /// Offset of the backing file name (from the start of the file).
    pub backing_filename_offset: u32,
    /// Length of the backing file name.
    pub backing_filename_size: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// True when `v` is a power of two within `lo..=hi`.
pub fn pow2_within(v: u32, lo: u32, hi: u32) -> bool {
    (lo..=hi).contains(&v) && v.is_power_of_two()
}

/// The largest guest size a cluster and table size can address.
pub fn max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = u64::from(table_size) * u64::from(cluster_size) / 8;
    entries
        .saturating_mul(u64::from(cluster_size))
        .saturating_mul(entries)
}

impl Header {
    /// True when `head` starts with the QED magic.
    pub fn has_magic(head: &[u8]) -> bool {
        head.len() >= 4 && le32(head, 0) == MAGIC
    }

    /// Parse and validate against the file length.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        let b = buf.get(..HEADER_LEN).ok_or_else(|| {
            Error::invalid(format!(
                "QED header truncated: {} bytes, {HEADER_LEN} needed",
                buf.len()
            ))
        })?;
        if le32(b, 0) != MAGIC {
            return Err(Error::invalid("image not in QED format"));
        }
        let h = Header {
            cluster_size: le32(b, 4),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_table_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_filename_offset: le32(b, 56),
            backing_filename_size: le32(b, 60),
        };
        if h.features & !FEATURE_MASK != 0 {
            return Err(Error::unsupported(format!(
                "unsupported QED features: {:x}",
                h.features & !FEATURE_MASK
            )));
        }
        if !pow2_within(h.cluster_size, MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE) {
            return Err(Error::invalid(format!(
                "QED cluster size {} is invalid (a power of two from 4 KiB to 64 MiB)",
                h.cluster_size
            )));
        }
        if !pow2_within(h.table_size, MIN_TABLE_SIZE, MAX_TABLE_SIZE) {
            return Err(Error::invalid(format!(
                "QED table size {} is invalid (a power of two from 1 to 16 clusters)",
                h.table_size
            )));
        }
        if h.image_size % 512 != 0 || h.image_size > max_image_size(h.cluster_size, h.table_size) {
            return Err(Error::invalid(format!(
                "QED image size {} is invalid (a multiple of 512 up to {})",
                h.image_size,
                max_image_size(h.cluster_size, h.table_size)
            )));
        }
        let header_bytes = u64::from(h.header_size) * u64::from(h.cluster_size);
        if h.header_size == 0 || header_bytes > u64::from(u32::MAX) {
            return Err(Error::invalid(format!(
                "QED header size of {} clusters is invalid",
                h.header_size
            )));
        }
        if !h.table_fits(h.l1_table_offset, file_len) {
            return Err(Error::invalid(format!(
                "QED L1 table offset {} is invalid (unaligned, inside the header or past the end of the file)",
                h.l1_table_offset
            )));
        }
        if h.features & F_BACKING_FILE != 0 {
            let end = u64::from(h.backing_filename_offset) + u64::from(h.backing_filename_size);
            if end > header_bytes || h.backing_filename_size > MAX_BACKING_NAME {
                return Err(Error::invalid(
                    "QED backing file name lies outside the header",
                ));
            }
        }
        Ok(h)
    }

    /// Bytes of one L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * u64::from(self.cluster_size)
    }

    /// Entries of one table.
    pub fn table_entries(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// Bytes of the header area.
    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * u64::from(self.cluster_size)
    }

    /// The file length qemu works with: rounded down to whole clusters.
    pub fn usable_len(&self, file_len: u64) -> u64 {
        file_len & !(u64::from(self.cluster_size) - 1)
    }

    /// A cluster offset qemu accepts: aligned, after the header, inside the file.
    pub fn cluster_ok(&self, off: u64, file_len: u64) -> bool {
        off % u64::from(self.cluster_size) == 0
            && off >= self.header_bytes()
            && off < self.usable_len(file_len)
    }

    /// A table offset whose whole table lies inside the file.
    pub fn table_fits(&self, off: u64, file_len: u64) -> bool {
        self.cluster_ok(off, file_len)
            && off
                .checked_add(self.table_bytes())
                .is_some_and(|e| e <= self.usable_len(file_len))
    }

    /// Serialise (the 64 header bytes).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }
}
