//! QEMU copy-on-write version 1 (qemu's `qcow`), read-only, as qemu's `block/qcow.c` lays it out
//! (the format has no separate specification): a 48-byte big-endian header (magic `QFI\xfb`,
//! version 1, backing file offset and length, mtime, size, cluster bits, L2 bits, encryption
//! method, L1 table offset), a one-level L1 table of L2 table offsets and L2 tables of cluster
//! offsets. An L2 entry of 0 is unallocated (read from the backing file); bit 63 marks a compressed
//! cluster whose compressed size sits in the bits below it (`63 - cluster_bits` upward) and whose
//! host offset is in the rest; its data is raw deflate (RFC 1951) of exactly one cluster.
//!
//! Images encrypted with the header's AES-CBC method (method 1) are refused as unsupported: qemu
//! itself no longer lets system emulators use them. Every header size is bounded by the limits qemu
//! applies and by the file size; the backing file is only declared here and opened by the access
//! layer through the gate.

use crate::driver::{BackingSpec, Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, Format, OpenContext, ProbeInput};
use crate::inflate::{inflate_fast, Framing};
use crate::storage::Storage;
use flate2::{Decompress, FlushDecompress, Status};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// `QFI\xfb`, shared with qcow2; the version tells them apart.
pub const MAGIC: u32 = 0x5146_49fb;
/// The only version of this format.
pub const VERSION: u32 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 48;
/// Smallest and largest cluster sizes qemu accepts (512 B to 64 KiB).
pub const MIN_CLUSTER_BITS: u8 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u8 = 16;
/// L2 tables of 512 B to 64 KiB (8-byte entries).
pub const MIN_L2_BITS: u8 = 6;
/// See [`MIN_L2_BITS`].
pub const MAX_L2_BITS: u8 = 13;
/// Longest backing file name qemu reads.
pub const MAX_BACKING_NAME: u32 = 1023;
/// The L1 table may not exceed qemu's bound (`INT_MAX` bytes); vmi also bounds it by the file.
pub const MAX_L1_BYTES: u64 = i32::MAX as u64;
/// L2 tables kept in memory.
const L2_CACHE: usize = 64;
/// Bit 63 of an L2 entry: the cluster is compressed.
const COMPRESSED: u64 = 1 << 63;
/// `crypt_method` values.
const CRYPT_NONE: u32 = 0;
const CRYPT_AES: u32 = 1;

/// The fixed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Must be [`VERSION`].
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// Modification time of the backing file, as recorded.
    pub mtime: u32,
    /// Guest size in bytes.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u8,
    /// log2 of the number of L2 entries.
    pub l2_bits: u8,
    /// 0 none, 1 AES-CBC.
    pub crypt_method: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

impl Header {
    /// Parse and validate the header against the limits qemu applies and the file length.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        let b = buf.get(..HEADER_LEN).ok_or_else(|| {
            Error::invalid(format!(
                "qcow header truncated: {} bytes, {HEADER_LEN} needed",
                buf.len()
            ))
        })?;
        if be32(b, 0) != MAGIC {
            return Err(Error::invalid("image not in qcow format"));
        }
        let h = Header {
            version: be32(b, 4),
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            mtime: be32(b, 20),
            size: be64(b, 24),
            cluster_bits: b[32],
            l2_bits: b[33],
            crypt_method: be32(b, 36),
            l1_table_offset: be64(b, 40),
        };
        if h.version != VERSION {
            return Err(Error::unsupported(format!(
                "qcow (v1) does not support qcow version {}",
                h.version
            )));
        }
        if h.size <= 1 {
            return Err(Error::invalid(
                "qcow image size is too small (must be at least 2 bytes)",
            ));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(Error::invalid(format!(
                "qcow cluster bits {} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B to 64 KiB)",
                h.cluster_bits
            )));
        }
        if !(MIN_L2_BITS..=MAX_L2_BITS).contains(&h.l2_bits) {
            return Err(Error::invalid(format!(
                "qcow L2 bits {} outside {MIN_L2_BITS}..={MAX_L2_BITS} (tables of 512 B to 64 KiB)",
                h.l2_bits
            )));
        }
        match h.crypt_method {
            CRYPT_NONE => {}
            CRYPT_AES => return Err(Error::unsupported(
                "encrypted qcow images (AES-CBC) are not supported; decrypt with qemu-img first",
            )),
            m => {
                return Err(Error::invalid(format!(
                    "invalid encryption method {m} in qcow header"
                )))
            }
        }
        let l1_bytes = h.l1_entries()?.saturating_mul(8);
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::limit(format!(
                "qcow image of {} bytes is too large (L1 table of {l1_bytes} bytes)",
                h.size
            )));
        }
        let l1_end = h.l1_table_offset.checked_add(l1_bytes);
        if l1_end.is_none_or(|e| e > file_len) {
            return Err(Error::invalid(format!(
                "qcow L1 table ({l1_bytes} bytes at {}) extends past the end of the {file_len}-byte file",
                h.l1_table_offset
            )));
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(Error::invalid(format!(
                    "qcow backing file name of {} bytes is too long (at most {MAX_BACKING_NAME})",
                    h.backing_file_size
                )));
            }
            let end = h
                .backing_file_offset
                .checked_add(u64::from(h.backing_file_size));
            if end.is_none_or(|e| e > file_len) {
                return Err(Error::invalid(
                    "qcow backing file name extends past the end of the file",
                ));
            }
        }
        Ok(h)
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries of the L1 table: enough to cover `size`.
    pub fn l1_entries(&self) -> Result<u64> {
        let shift = u32::from(self.cluster_bits) + u32::from(self.l2_bits);
        let span = 1u64 << shift;
        let rounded = self
            .size
            .checked_add(span - 1)
            .ok_or_else(|| Error::limit("qcow image too large"))?;
        Ok(rounded >> shift)
    }
}

/// Probe: the magic with version 1 (any other version is qcow2's).
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    let h = input.head;
    if h.len() < 8 || be32(h, 0) != MAGIC || be32(h, 4) != VERSION {
        return None;
    }
    Some(match Header::parse(h, input.len) {
        Ok(_) => Confidence::Certain,
        Err(_) => Confidence::Weak,
    })
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    if ctx.writable {
        return Err(Error::unsupported(
            "writing qcow (version 1) images; convert them to qcow2",
        ));
    }
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    let mut head = [0u8; HEADER_LEN];
    let n = file_len.min(HEADER_LEN as u64) as usize;
    storage
        .read_at(&mut head[..n], 0)
        .map_err(|e| Error::io("reading qcow header", e))?;
    let h = Header::parse(&head[..n], file_len)?;
    let entries = h.l1_entries()?;
    let mut raw = vec![0u8; (entries * 8) as usize];
    storage
        .read_at(&mut raw, h.l1_table_offset)
        .map_err(|e| Error::io("reading qcow L1 table", e))?;
    let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
    let backing = if h.backing_file_offset != 0 {
        let mut name = vec![0u8; h.backing_file_size as usize];
        storage
            .read_at(&mut name, h.backing_file_offset)
            .map_err(|e| Error::io("reading qcow backing file name", e))?;
        // qemu stops at a NUL, as a C string does.
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        let name = String::from_utf8(name[..end].to_vec())
            .map_err(|_| Error::invalid("qcow backing file name is not UTF-8"))?;
        (!name.is_empty()).then_some(BackingSpec { name, format: None })
    } else {
        None
    };
    Ok(Box::new(QcowDriver {
        st: storage,
        virtual_size: h.size / 512 * 512,
        file_len,
        header: h,
        l1,
        l2: Mutex::new(HashMap::new()),
        backing,
    }))
}

/// A read-only qcow (v1) image.
#[derive(Debug)]
pub struct QcowDriver {
    st: Box<dyn Storage>,
    header: Header,
    /// qemu counts whole sectors: the size rounded down to 512.
    virtual_size: u64,
    file_len: u64,
    l1: Vec<u64>,
    l2: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    backing: Option<BackingSpec>,
}

impl QcowDriver {
    /// The header as read.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn l2_table(&self, off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2.lock().unwrap_or_else(|e| e.into_inner()).get(&off) {
            return Ok(Arc::clone(t));
        }
        let bytes = 8u64 << self.header.l2_bits;
        if off.checked_add(bytes).is_none_or(|e| e > self.file_len) {
            return Err(Error::invalid(format!(
                "qcow L2 table at {off} extends past the end of the file"
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.st
            .read_at(&mut raw, off)
            .map_err(|e| Error::io("reading qcow L2 table", e))?;
        let t = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect::<Vec<_>>());
        let mut cache = self.l2.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= L2_CACHE {
            cache.clear();
        }
        cache.insert(off, Arc::clone(&t));
        Ok(t)
    }

    /// (host offset, compressed length) of a compressed L2 entry.
    fn compressed_parts(&self, entry: u64) -> (u64, u64) {
        let shift = 63 - u32::from(self.header.cluster_bits);
        let size = (entry >> shift) & (self.header.cluster_size() - 1);
        let offset = entry & ((1u64 << shift) - 1);
        (offset, size)
    }

    fn entry_kind(&self, entry: u64, in_cluster: u64, cluster_start: u64) -> Result<MapKind> {
        if entry == 0 {
            return Ok(MapKind::Unallocated);
        }
        if entry & COMPRESSED != 0 {
            return Ok(MapKind::Compressed {
                unit: cluster_start,
            });
        }
        let cs = self.header.cluster_size();
        if entry.checked_add(cs).is_none_or(|e| e > self.file_len) {
            return Err(Error::invalid(format!(
                "qcow cluster at host offset {entry} (guest offset {cluster_start}) extends past the end of the file"
            )));
        }
        Ok(MapKind::Data {
            file: 0,
            offset: entry + in_cluster,
        })
    }
}

impl Driver for QcowDriver {
    fn format(&self) -> Format {
        Format::Qcow
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let cb = u32::from(self.header.cluster_bits);
        let cs = self.header.cluster_size();
        let l2_span_bits = cb + u32::from(self.header.l2_bits);
        let len = len.min(self.virtual_size.saturating_sub(offset));
        let l1_index = (offset >> l2_span_bits) as usize;
        let l2_off = *self
            .l1
            .get(l1_index)
            .ok_or_else(|| Error::invalid(format!("guest offset {offset} beyond the L1 table")))?;
        let span_end = ((offset >> l2_span_bits) + 1) << l2_span_bits;
        let limit = offset + len.min(span_end - offset);
        if l2_off == 0 {
            return Ok(Mapping {
                start: offset,
                len: limit - offset,
                kind: MapKind::Unallocated,
            });
        }
        let table = self.l2_table(l2_off)?;
        let mask = (1u64 << self.header.l2_bits) - 1;
        let idx = |g: u64| ((g >> cb) & mask) as usize;
        let cluster_start = offset & !(cs - 1);
        let first = self.entry_kind(table[idx(offset)], offset - cluster_start, cluster_start)?;
        let mut end = (cluster_start + cs).min(limit);
        // Extend over following clusters of the same kind (contiguous on the host for data).
        if !matches!(first, MapKind::Compressed { .. }) {
            while end < limit {
                let next = self.entry_kind(table[idx(end)], 0, end)?;
                let same = match (first, next) {
                    (MapKind::Unallocated, MapKind::Unallocated) => true,
                    (MapKind::Data { offset: a, .. }, MapKind::Data { offset: b, .. }) => {
                        b == a + (end - offset)
                    }
                    _ => false,
                };
                if !same {
                    break;
                }
                end = (end + cs).min(limit);
            }
        }
        Ok(Mapping {
            start: offset,
            len: end - offset,
            kind: first,
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.st.as_ref()),
            _ => Err(Error::invalid(format!("qcow image has no file {index}"))),
        }
    }

    fn read_compressed(&self, unit: u64, out: &mut Vec<u8>) -> Result<()> {
        let cb = u32::from(self.header.cluster_bits);
        let l2_span_bits = cb + u32::from(self.header.l2_bits);
        let l2_off = self
            .l1
            .get((unit >> l2_span_bits) as usize)
            .copied()
            .unwrap_or(0);
        let table = self.l2_table(l2_off)?;
        let entry = table[((unit >> cb) & ((1u64 << self.header.l2_bits) - 1)) as usize];
        if entry & COMPRESSED == 0 {
            return Err(Error::invalid(format!(
                "qcow cluster at guest offset {unit} is not compressed"
            )));
        }
        let (host, csize) = self.compressed_parts(entry);
        let avail = self.file_len.saturating_sub(host).min(csize);
        if avail == 0 {
            return Err(Error::invalid(format!(
                "qcow compressed cluster at guest offset {unit} lies past the end of the file"
            )));
        }
        let mut input = vec![0u8; avail as usize];
        self.st
            .read_at(&mut input, host)
            .map_err(|e| Error::io("reading qcow compressed cluster", e))?;
        inflate_cluster(&input, self.header.cluster_size() as usize, out)
            .map_err(|e| e.context(format!("qcow compressed cluster at guest offset {unit}")))
    }

    fn backing(&self) -> Option<&BackingSpec> {
        self.backing.as_ref()
    }

    fn info(&self) -> FormatInfo {
        FormatInfo {
            cluster_size: Some(self.header.cluster_size()),
            ..FormatInfo::default()
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Inflate raw deflate into exactly one cluster, as qemu does (a stream that fills the cluster
/// without its end marker is accepted; one that inflates to less or more is not).
fn inflate_cluster(input: &[u8], cluster: usize, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    out.resize(cluster, 0);
    if inflate_fast(Framing::Raw, input, out) == Some(cluster) {
        return Ok(());
    }
    out.clear();
    out.resize(cluster + 1, 0);
    let mut d = Decompress::new_with_window_bits(false, 15);
    let produced = match d.decompress(input, out, FlushDecompress::Finish) {
        Ok(Status::Ok | Status::StreamEnd | Status::BufError) => d.total_out() as usize,
        Err(e) => return Err(Error::invalid(format!("does not inflate: {e}"))),
    };
    if produced != cluster {
        return Err(Error::invalid(format!(
            "inflates to {produced} bytes, not one {cluster}-byte cluster"
        )));
    }
    out.truncate(cluster);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&1u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[32] = 12;
        b[33] = 9;
        b[40..48].copy_from_slice(&48u64.to_be_bytes());
        b
    }

    #[test]
    fn a_consistent_header_parses() {
        let b = header();
        let h = Header::parse(&b, b.len() as u64).unwrap();
        assert_eq!(
            (h.size, h.cluster_size(), h.l1_entries().unwrap()),
            (1 << 20, 4096, 1)
        );
    }

    #[test]
    fn every_corrupt_header_field_is_an_error() {
        let cases: [(usize, &[u8]); 6] = [
            (32, &[8]),                                              // cluster bits too small
            (32, &[17]),                                             // cluster bits too large
            (33, &[14]),                                             // L2 too large
            (36, &[0, 0, 0, 2]),                                     // unknown encryption
            (40, &[0x7f, 0, 0, 0, 0, 0, 0, 0]),                      // L1 past EOF
            (24, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), // size overflows
        ];
        for (at, bytes) in cases {
            let mut b = header();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            assert!(Header::parse(&b, b.len() as u64).is_err(), "field at {at}");
        }
    }
}
