//! The qcow2 image header and its extensions (qemu `docs/interop/qcow2.txt`, sections "Header" and
//! "Header extensions"): parsing with every declared size bounded, and serialising for create.
//!
//! The header is parsed field by field from big-endian bytes at the offsets the spec gives; the
//! validated result is [`Header`]. Fields later rewritten in place (sizes, table offsets, feature
//! bits) have their byte offsets as named constants.

use crate::error::{Error, Result};
use crate::formats::Format;
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The header as stored (spec: "Header"), all fields big-endian. Version 2 headers end after
/// `snapshots_offset` (72 bytes); they are read into a zero-filled copy of this struct.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// Bytes 0-3: "QFI\xfb".
    pub magic: U32,
    /// Bytes 4-7: version number (2 or 3).
    pub version: U32,
    /// Bytes 8-15: offset of the backing file name in the image file (0: none).
    pub backing_file_offset: U64,
    /// Bytes 16-19: length of the backing file name in bytes (no terminating NUL).
    pub backing_file_size: U32,
    /// Bytes 20-23: log2 of the cluster size.
    pub cluster_bits: U32,
    /// Bytes 24-31: virtual disk size in bytes.
    pub size: U64,
    /// Bytes 32-35: 0 no encryption, 1 AES, 2 LUKS.
    pub crypt_method: U32,
    /// Bytes 36-39: number of entries in the active L1 table.
    pub l1_size: U32,
    /// Bytes 40-47: offset of the active L1 table (cluster-aligned).
    pub l1_table_offset: U64,
    /// Bytes 48-55: offset of the refcount table (cluster-aligned).
    pub refcount_table_offset: U64,
    /// Bytes 56-59: number of clusters the refcount table occupies.
    pub refcount_table_clusters: U32,
    /// Bytes 60-63: number of internal snapshots.
    pub nb_snapshots: U32,
    /// Bytes 64-71: offset of the snapshot table (cluster-aligned).
    pub snapshots_offset: U64,
    /// Bytes 72-79 (v3): incompatible feature bits.
    pub incompatible_features: U64,
    /// Bytes 80-87 (v3): compatible feature bits.
    pub compatible_features: U64,
    /// Bytes 88-95 (v3): autoclear feature bits.
    pub autoclear_features: U64,
    /// Bytes 96-99 (v3): log2 of the refcount width in bits.
    pub refcount_order: U32,
    /// Bytes 100-103 (v3): length of the header structure in bytes.
    pub header_length: U32,
    /// Byte 104 (v3, header_length > 104): compression type, 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// Bytes 105-111: padding to a multiple of 8.
    pub padding: [u8; 7],
}

/// A header extension's type and length (spec: "Header extensions"), followed by its data padded
/// to 8 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtension {
    /// Header extension type.
    pub kind: U32,
    /// Length of the header extension data.
    pub len: U32,
}

/// "QFI\xfb": the magic every qcow2 image begins with (spec: "magic").
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster_bits the spec allows (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits qemu accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Length of a version 2 header, which has no length field (spec: bytes 0-71).
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header without the compression type (spec: bytes 0-103).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Length of the version 3 header vmi writes: with compression type, padded to 8 bytes.
pub const V3_HEADER_LEN: u32 = 112;
/// Largest header_length accepted: the header and its extensions must fit in the first cluster,
/// and the smallest cluster a header may declare is 2 MiB at most.
pub const MAX_HEADER_LEN: u32 = 1 << MAX_CLUSTER_BITS;
/// Longest backing file name (spec: "Must not be longer than 1023 bytes").
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most header extensions parsed: far above the handful qemu writes, low enough to bound work.
pub const MAX_EXTENSIONS: usize = 1024;
/// Longest external data file name accepted (qemu stores it in one header cluster; the gate caps
/// names again).
pub const MAX_DATA_FILE_NAME: usize = 4096;

/// Header extension: end of the extension area (spec: 0x00000000).
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name (spec: 0xe2792aca).
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table (spec: 0x6803f857).
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps (spec: 0x23852875).
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer (spec: 0x0537be77).
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// `crypt_method`: no encryption.
pub const CRYPT_NONE: u32 = 0;
/// `crypt_method`: legacy AES-CBC with the guest sector as IV (insecure; refused).
pub const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS, the header at [`EXT_CRYPTO`]'s pointer.
pub const CRYPT_LUKS: u32 = 2;
/// Header extension: external data file name (spec: 0x44415441).
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: dirty (refcounts may be inconsistent).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: corrupt (must not be written).
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: compression type field is valid (non-zlib).
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this driver understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Byte offset of `size` (virtual disk size).
pub const OFF_SIZE: u64 = 24;
/// Byte offset of `l1_size` (u32) followed by `l1_table_offset` (u64).
pub const OFF_L1: u64 = 36;
/// Byte offset of `refcount_table_offset` (u64) followed by `refcount_table_clusters` (u32).
pub const OFF_REFTABLE: u64 = 48;
/// Byte offset of `incompatible_features` (v3).
pub const OFF_INCOMPAT: u64 = 72;
/// Byte offset of `nb_snapshots` (u32) followed by `snapshots_offset` (u64) (spec: bytes 60-71).
pub const OFF_SNAPSHOTS: u64 = 60;
/// Byte offset of `autoclear_features` (v3).
pub const OFF_AUTOCLEAR: u64 = 88;

/// Compression type (spec: byte 104, valid with incompatible bit 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// 0: raw deflate (zlib without its header).
    Zlib,
    /// 1: zstd frames.
    Zstd,
}

impl Compression {
    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for v2).
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Compression type.
    pub compression: Compression,
    /// Backing file name, if any.
    pub backing_name: Option<String>,
    /// Backing format from the extension, if any.
    pub backing_format: Option<String>,
    /// External data file name from the extension, if any.
    pub data_file: Option<String>,
    /// Feature name table entries: (type 0/1/2, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// The bitmaps extension's data, when present (kept for `check`; vmi does not write bitmaps).
    pub bitmaps: Option<Vec<u8>>,
    /// Full disk encryption header pointer (spec: 0x0537be77): offset and length of the LUKS
    /// header inside the file.
    pub crypto_header: Option<(u64, u64)>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether extended L2 entries (128-bit, with subcluster bitmaps) are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Name an incompatible feature bit from the image's feature table, when it has one.
    pub fn feature_name(&self, kind: u8, bit: u32) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|(k, b, _)| *k == kind && u32::from(*b) == bit)
            .map(|(_, _, n)| n.as_str())
    }
}

fn be32(b: &[u8], at: usize) -> Result<u32> {
    let s = b
        .get(at..at + 4)
        .ok_or_else(|| Error::invalid(format!("qcow2 header truncated at byte {at}")))?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Quick check for probing: the magic and any version but 1 (qcow). A version or header qcow2
/// cannot open still claims the file, weakly (see [`parse_fixed`]).
pub fn looks_like_qcow2(head: &[u8]) -> bool {
    // Version 1 is the older qcow format (its own driver); any other version is qcow2's, known
    // or not, so that an unknown version is refused as qcow2 rather than read as raw.
    matches!(be32(head, 0), Ok(MAGIC)) && !matches!(be32(head, 4), Ok(1))
}

/// Parse the fixed header from `buf` (the first bytes of the file, at least `V2_HEADER_LEN`).
/// `file_len` bounds every offset. Extensions are parsed by [`parse_extensions`].
pub fn parse_fixed(buf: &[u8], file_len: u64) -> Result<Header> {
    let mut fixed = [0u8; V3_HEADER_LEN as usize];
    let avail = buf.len().min(fixed.len());
    if avail < V2_HEADER_LEN as usize {
        return Err(Error::invalid(format!(
            "qcow2 header truncated: {} bytes, at least {V2_HEADER_LEN} needed",
            buf.len()
        )));
    }
    fixed[..avail].copy_from_slice(&buf[..avail]);
    let raw = RawHeader::read_from_bytes(&fixed[..])
        .map_err(|_| Error::invalid("qcow2 header has the wrong size"))?;
    let magic = raw.magic.get();
    if magic != MAGIC {
        return Err(Error::invalid(format!(
            "not a qcow2 image (magic {magic:#010x})"
        )));
    }
    let version = raw.version.get();
    if version != 2 && version != 3 {
        return Err(Error::unsupported(format!("qcow2 version {version}")));
    }
    let backing_file_offset = raw.backing_file_offset.get();
    let backing_file_size = raw.backing_file_size.get();
    let cluster_bits = raw.cluster_bits.get();
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Error::invalid(format!(
            "qcow2 cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
        )));
    }
    let size = raw.size.get();
    let crypt = raw.crypt_method.get();
    match crypt {
        CRYPT_NONE | CRYPT_LUKS => {}
        CRYPT_AES => return Err(Error::unsupported(
            "qcow2 legacy AES encryption (encrypt.format=aes, crypt_method 1) is not supported: \
                 it is insecure and qemu no longer writes it; re-encrypt with encrypt.format=luks",
        )),
        _ => {
            return Err(Error::invalid(format!(
                "qcow2 crypt_method {crypt} is unknown"
            )))
        }
    }
    let l1_size = raw.l1_size.get();
    let l1_table_offset = raw.l1_table_offset.get();
    let refcount_table_offset = raw.refcount_table_offset.get();
    let refcount_table_clusters = raw.refcount_table_clusters.get();
    let nb_snapshots = raw.nb_snapshots.get();
    let snapshots_offset = raw.snapshots_offset.get();
    if version == 3 && avail < V3_MIN_HEADER_LEN as usize {
        return Err(Error::invalid(format!(
            "qcow2 version 3 header truncated: {avail} bytes, at least {V3_MIN_HEADER_LEN} needed"
        )));
    }
    let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
        (
            raw.incompatible_features.get(),
            raw.compatible_features.get(),
            raw.autoclear_features.get(),
            raw.refcount_order.get(),
            raw.header_length.get(),
        )
    } else {
        (0, 0, 0, 4, V2_HEADER_LEN)
    };
    if version == 3 && !(V3_MIN_HEADER_LEN..=MAX_HEADER_LEN).contains(&header_length) {
        return Err(Error::invalid(format!(
            "qcow2 header_length {header_length} outside {V3_MIN_HEADER_LEN}..={MAX_HEADER_LEN}"
        )));
    }
    if u64::from(header_length) > 1u64 << cluster_bits {
        return Err(Error::invalid(format!(
            "qcow2 header_length {header_length} exceeds the cluster size {}",
            1u64 << cluster_bits
        )));
    }
    if refcount_order > 6 {
        return Err(Error::unsupported(format!(
            "qcow2 refcount_order {refcount_order} (refcounts wider than 64 bits)"
        )));
    }
    let compression = if header_length > V3_MIN_HEADER_LEN {
        match raw.compression_type {
            0 => Compression::Zlib,
            1 => Compression::Zstd,
            t => {
                return Err(Error::unsupported(format!("qcow2 compression type {t}")));
            }
        }
    } else {
        Compression::Zlib
    };
    if (compression != Compression::Zlib) != (incompatible & INCOMPAT_COMPRESSION != 0) {
        return Err(Error::invalid(format!(
            "qcow2 compression type {} does not agree with incompatible bit 3",
            compression.name()
        )));
    }
    let unknown = incompatible & !INCOMPAT_KNOWN;
    let mut h = Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible,
        compatible,
        autoclear,
        refcount_order,
        header_length,
        compression,
        backing_name: None,
        backing_format: None,
        data_file: None,
        feature_names: Vec::new(),
        bitmaps: None,
        crypto_header: None,
    };
    parse_extensions(buf, &mut h)?;
    match (crypt, h.crypto_header) {
        (CRYPT_LUKS, None) => {
            return Err(Error::invalid(
                "qcow2 image is LUKS-encrypted (crypt_method 2) but has no crypto header extension",
            ))
        }
        (CRYPT_NONE, Some(_)) => {
            return Err(Error::invalid(
                "qcow2 crypto header extension in an image that is not LUKS-encrypted",
            ))
        }
        _ => {}
    }
    if unknown != 0 {
        let bits: Vec<String> = (0..64)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| match h.feature_name(0, b) {
                Some(n) => format!("{b} ({n})"),
                None => b.to_string(),
            })
            .collect();
        return Err(Error::unsupported(format!(
            "qcow2 incompatible feature bit(s) {}",
            bits.join(", ")
        )));
    }
    if backing_file_offset != 0 {
        if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
            return Err(Error::invalid(format!(
                "qcow2 backing file name length {backing_file_size} outside 1..={MAX_BACKING_NAME}"
            )));
        }
        let start = usize::try_from(backing_file_offset).ok();
        let end = start.and_then(|s| s.checked_add(backing_file_size as usize));
        let bytes = match (start, end) {
            (Some(s), Some(e)) if e as u64 <= 1u64 << cluster_bits => buf.get(s..e),
            _ => None,
        }
        .ok_or_else(|| {
            Error::invalid(format!(
                "qcow2 backing file name at {backing_file_offset}+{backing_file_size} lies outside the header cluster"
            ))
        })?;
        let name = String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::invalid("qcow2 backing file name is not UTF-8"))?;
        h.backing_name = Some(name);
    }
    if size > i64::MAX as u64 {
        return Err(Error::invalid(format!(
            "qcow2 virtual size {size} is too large"
        )));
    }
    if u64::from(h.header_length) > file_len {
        return Err(Error::invalid(format!(
            "qcow2 file is {file_len} bytes, shorter than its {}-byte header",
            h.header_length
        )));
    }
    Ok(h)
}

/// Parse header extensions from the header cluster bytes in `buf` into `h`.
fn parse_extensions(buf: &[u8], h: &mut Header) -> Result<()> {
    let cluster = 1usize << h.cluster_bits;
    let limit = buf.len().min(cluster);
    let mut pos = h.header_length as usize;
    for _ in 0..MAX_EXTENSIONS {
        if pos + 8 > limit {
            // qemu treats running off the header cluster as the end of the extensions.
            return Ok(());
        }
        let (ext, _) = RawExtension::read_from_prefix(&buf[pos..limit]).map_err(|_| {
            Error::invalid(format!("qcow2 header extension at byte {pos} is truncated"))
        })?;
        let kind = ext.kind.get();
        let len = ext.len.get() as usize;
        let data_start = pos + 8;
        let data = data_start
            .checked_add(len)
            .filter(|&e| e <= limit)
            .and_then(|e| buf.get(data_start..e))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "qcow2 header extension {kind:#010x} at byte {pos} of length {len} overruns the header cluster"
                ))
            })?;
        match kind {
            EXT_END => return Ok(()),
            EXT_BACKING_FORMAT => {
                let s = String::from_utf8(data.to_vec())
                    .map_err(|_| Error::invalid("qcow2 backing format name is not UTF-8"))?;
                h.backing_format = Some(s.trim_end_matches('\0').to_string());
            }
            EXT_DATA_FILE => {
                if len > MAX_DATA_FILE_NAME {
                    return Err(Error::limit(format!(
                        "qcow2 external data file name is {len} bytes long"
                    )));
                }
                let s = String::from_utf8(data.to_vec())
                    .map_err(|_| Error::invalid("qcow2 external data file name is not UTF-8"))?;
                h.data_file = Some(s.trim_end_matches('\0').to_string());
            }
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    let name_bytes = e.get(2..).unwrap_or(&[]);
                    let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                    let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
                    h.feature_names.push((e[0], e[1], name));
                }
            }
            EXT_BITMAPS => h.bitmaps = Some(data.to_vec()),
            EXT_CRYPTO => {
                let words = (len == 16).then_some(data).and_then(|d| {
                    let off = u64::from_be_bytes(d.get(..8)?.try_into().ok()?);
                    let n = u64::from_be_bytes(d.get(8..16)?.try_into().ok()?);
                    Some((off, n))
                });
                let Some(ptr) = words else {
                    return Err(Error::invalid(format!(
                        "qcow2 crypto header extension is {len} bytes, not 16"
                    )));
                };
                h.crypto_header = Some(ptr);
            }
            _ => {} // Unknown extensions are ignored (spec: "may be ignored").
        }
        pos = data_start + len.div_ceil(8) * 8;
    }
    Err(Error::limit(format!(
        "qcow2 header has more than {MAX_EXTENSIONS} extensions"
    )))
}

/// What [`serialize`] writes for a new image.
#[derive(Debug, Clone)]
pub struct NewHeader<'a> {
    /// 2 or 3.
    pub version: u32,
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Virtual size.
    pub size: u64,
    /// Refcount order (4 for v2).
    pub refcount_order: u32,
    /// Compatible features.
    pub compatible: u64,
    /// Compression type.
    pub compression: Compression,
    /// Extended L2.
    pub extended_l2: bool,
    /// Refcount table location.
    pub refcount_table_offset: u64,
    /// Refcount table clusters.
    pub refcount_table_clusters: u32,
    /// Backing file name and format.
    pub backing: Option<(&'a str, Option<Format>)>,
    /// LUKS header (offset, length) for `encrypt.format=luks`.
    pub crypto: Option<(u64, u64)>,
}

/// The feature name table vmi writes (spec: "Feature name table").
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

fn put_ext(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    let ext = RawExtension {
        kind: U32::new(kind),
        len: U32::new(data.len() as u32),
    };
    out.extend_from_slice(ext.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(8) * 8, 0);
}

/// Serialise a new header with extensions and backing name; must fit in one cluster.
pub fn serialize(n: &NewHeader) -> Result<Vec<u8>> {
    let cs = 1usize << n.cluster_bits;
    let hlen = if n.version == 3 {
        V3_HEADER_LEN
    } else {
        V2_HEADER_LEN
    };
    let mut raw = RawHeader::new_zeroed();
    raw.magic.set(MAGIC);
    raw.version.set(n.version);
    raw.cluster_bits.set(n.cluster_bits);
    raw.size.set(n.size);
    raw.refcount_table_offset.set(n.refcount_table_offset);
    raw.refcount_table_clusters.set(n.refcount_table_clusters);
    if n.version == 3 {
        let mut incompat = 0u64;
        if n.compression != Compression::Zlib {
            incompat |= INCOMPAT_COMPRESSION;
        }
        if n.extended_l2 {
            incompat |= INCOMPAT_EXTL2;
        }
        raw.incompatible_features.set(incompat);
        raw.compatible_features.set(n.compatible);
        raw.refcount_order.set(n.refcount_order);
        raw.header_length.set(hlen);
        raw.compression_type = match n.compression {
            Compression::Zlib => 0,
            Compression::Zstd => 1,
        };
    }
    if n.crypto.is_some() {
        raw.crypt_method.set(CRYPT_LUKS);
    }
    let mut out = raw.as_bytes()[..hlen as usize].to_vec();
    if let Some((off, len)) = n.crypto {
        let mut d = off.to_be_bytes().to_vec();
        d.extend_from_slice(&len.to_be_bytes());
        put_ext(&mut out, EXT_CRYPTO, &d);
    }
    if let Some((_, Some(fmt))) = n.backing {
        put_ext(&mut out, EXT_BACKING_FORMAT, fmt.name().as_bytes());
    }
    // The feature table helps other tools name bits; it is optional, so only written when it
    // leaves room for the backing name.
    let table_len = 8 + FEATURE_NAMES.len() * 48;
    let name_len = n.backing.map_or(0, |(b, _)| b.len());
    if n.version == 3 && out.len() + table_len + 8 + name_len <= cs {
        let mut t = Vec::new();
        for (k, b, name) in FEATURE_NAMES {
            let mut e = [0u8; 48];
            e[0] = *k;
            e[1] = *b;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            t.extend_from_slice(&e);
        }
        put_ext(&mut out, EXT_FEATURE_TABLE, &t);
    }
    put_ext(&mut out, EXT_END, &[]);
    if let Some((name, _)) = n.backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(Error::usage(format!(
                "backing file name must be 1..={MAX_BACKING_NAME} bytes"
            )));
        }
        let off = out.len() as u64;
        out[8..16].copy_from_slice(&off.to_be_bytes());
        out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    if out.len() > cs {
        return Err(Error::usage(format!(
            "qcow2 header with backing file name needs {} bytes, more than the {cs}-byte cluster",
            out.len()
        )));
    }
    Ok(out)
}

/// Rewrite the header cluster `buf` (the file's first cluster) to record `backing` (name and
/// optional format) instead of what it records now, keeping every other extension (spec:
/// "Header extensions"; the backing name follows the extensions inside the first cluster).
/// Returns the new header bytes to write at offset 0.
pub fn rewrite_backing(buf: &[u8], backing: Option<(&str, Option<Format>)>) -> Result<Vec<u8>> {
    let h = parse_fixed(buf, buf.len() as u64)?;
    let cs = h.cluster_size() as usize;
    if let Some((name, _)) = backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(Error::usage(format!(
                "backing file name of {} bytes: must be 1..={MAX_BACKING_NAME}",
                name.len()
            )));
        }
    }
    let hlen = h.header_length as usize;
    let mut out = buf
        .get(..hlen)
        .ok_or_else(|| Error::invalid("qcow2 header truncated"))?
        .to_vec();
    // Keep every extension but the backing format and the end marker.
    let limit = buf.len().min(cs);
    let mut pos = hlen;
    for _ in 0..MAX_EXTENSIONS {
        let Some(head) = buf.get(pos..pos + 8).filter(|_| pos + 8 <= limit) else {
            break;
        };
        let kind = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if kind == EXT_END {
            break;
        }
        let data = buf
            .get(pos + 8..pos + 8 + len)
            .filter(|_| pos + 8 + len <= limit)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "qcow2 header extension {kind:#010x} at byte {pos} overruns the header cluster"
                ))
            })?;
        if kind != EXT_BACKING_FORMAT {
            put_ext(&mut out, kind, data);
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
    if let Some((_, Some(fmt))) = backing {
        put_ext(&mut out, EXT_BACKING_FORMAT, fmt.name().as_bytes());
    }
    put_ext(&mut out, EXT_END, &[]);
    let (off, size) = match backing {
        Some((name, _)) => {
            let off = out.len();
            out.extend_from_slice(name.as_bytes());
            (off as u64, name.len() as u32)
        }
        None => (0, 0),
    };
    if out.len() > cs {
        return Err(Error::limit(format!(
            "qcow2 header with a {}-byte backing name needs {} bytes, more than the {cs}-byte first cluster",
            size,
            out.len()
        )));
    }
    // Fixed fields: backing_file_offset (bytes 8-15) and backing_file_size (16-19).
    out[8..16].copy_from_slice(&off.to_be_bytes());
    out[16..20].copy_from_slice(&size.to_be_bytes());
    // Clear the rest of the old header area so no stale name or extension remains.
    let old_end = buf.len().min(cs);
    if out.len() < old_end {
        out.resize(old_end, 0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(version: u32) -> Vec<u8> {
        serialize(&NewHeader {
            version,
            cluster_bits: 16,
            size: 1 << 30,
            refcount_order: 4,
            compatible: 0,
            compression: Compression::Zlib,
            extended_l2: false,
            refcount_table_offset: 65536,
            refcount_table_clusters: 1,
            backing: Some(("base.qcow2", Some(Format::Qcow2))),
            crypto: None,
        })
        .unwrap()
    }

    #[test]
    fn serialized_header_parses_back() {
        for v in [2, 3] {
            let b = new(v);
            let h = parse_fixed(&b, 1 << 20).unwrap();
            assert_eq!(h.version, v);
            assert_eq!(h.size, 1 << 30);
            assert_eq!(h.backing_name.as_deref(), Some("base.qcow2"));
            assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        }
    }

    #[test]
    fn open_rejects_cluster_bits_below_9() {
        let mut b = new(3);
        b[20..24].copy_from_slice(&8u32.to_be_bytes());
        assert!(parse_fixed(&b, 1 << 20).is_err());
    }

    #[test]
    fn refcount_order_7_is_unsupported() {
        let mut b = new(3);
        b[96..100].copy_from_slice(&7u32.to_be_bytes());
        let e = parse_fixed(&b, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("refcount_order 7"), "{e}");
    }

    #[test]
    fn unknown_incompatible_bits_are_named() {
        let mut b = new(3);
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        let e = parse_fixed(&b, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("bit(s) 9"), "{e}");
    }

    #[test]
    fn unknown_incompatible_bits_take_their_name_from_the_feature_table() {
        let mut b = new(3);
        b.truncate(V3_HEADER_LEN as usize);
        let mut entry = [0u8; 48];
        entry[1] = 9;
        entry[2..16].copy_from_slice(b"future feature");
        put_ext(&mut b, EXT_FEATURE_TABLE, &entry);
        put_ext(&mut b, EXT_END, &[]);
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        let e = parse_fixed(&b, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("9 (future feature)"), "{e}");
    }

    #[test]
    fn overrunning_extension_is_rejected() {
        let mut b = new(3);
        b.resize(65536, 0);
        let at = V3_HEADER_LEN as usize;
        b[at..at + 4].copy_from_slice(&0x1234u32.to_be_bytes());
        b[at + 4..at + 8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_fixed(&b, 1 << 20).is_err());
    }

    #[test]
    fn rewriting_the_backing_keeps_other_extensions_and_refuses_names_past_the_cluster() {
        let n = NewHeader {
            version: 3,
            cluster_bits: 9,
            size: 1 << 20,
            refcount_order: 4,
            compatible: 0,
            compression: Compression::Zlib,
            extended_l2: false,
            refcount_table_offset: 512,
            refcount_table_clusters: 1,
            backing: Some(("old.img", Some(Format::Raw))),
            crypto: None,
        };
        let mut buf = serialize(&n).unwrap();
        buf.resize(512, 0);
        let new = rewrite_backing(&buf, Some(("new.qcow2", Some(Format::Qcow2)))).unwrap();
        let h = parse_fixed(&new, 4096).unwrap();
        assert_eq!(h.backing_name.as_deref(), Some("new.qcow2"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        let none = rewrite_backing(&new, None).unwrap();
        let h = parse_fixed(&none, 4096).unwrap();
        assert_eq!((h.backing_name, h.backing_format), (None, None));
        let long = "x".repeat(500);
        assert!(rewrite_backing(&buf, Some((&long, None))).is_err());
    }
}
