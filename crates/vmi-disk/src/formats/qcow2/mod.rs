//! qcow2, QEMU's copy-on-write format, versions 2 (`compat=0.10`) and 3 (`compat=1.1`), following
//! qemu's `docs/interop/qcow2.txt`: the header and extensions (`header.rs`), the two-level cluster
//! mapping with standard and extended L2 entries (`l2.rs`, "Cluster mapping"), host cluster
//! allocation and refcounts of every width (`alloc.rs`, `refcount.rs`), writes and write-back
//! (`write.rs`), compressed clusters (`compress.rs`), internal snapshots (read, `snapshot.rs`) and
//! consistency checks (`check.rs`). This file holds open, create, measure and the [`Driver`] impl.
//!
//! All metadata lives behind one lock (`Inner`): the L1 table and refcount table in memory
//! (bounded by qemu's caps), L2 tables and refcount blocks in small write-back caches. Writes go
//! data first; refcounts, L2 tables, L1 and header reach the file on [`Driver::flush`] in an order
//! that can leak clusters after a crash but never points at unwritten data or at a free cluster.

mod alloc;
mod check;
mod compress;
mod header;
mod l2;
mod overlap;
mod refcount;
pub mod snapshot;
mod write;

use crate::check::{CheckMode, CheckReport};
use crate::driver::{BackingSpec, CompressedWrite, Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::luks;
use crate::formats::{Confidence, CreateContext, Format, Measurement, OpenContext, ProbeInput};
use crate::gate::Referral;
use crate::image::Image;
use crate::options::CreateOptions;
use crate::storage::{FileStorage, Storage};
use header::{Compression, Header};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Host offset bits of an L1 entry (spec: bits 9-55).
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of a standard L2 entry (spec: bits 9-55).
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of a refcount table entry (spec: bits 9-63).
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// L1/L2 entry bit 63: refcount is exactly one (spec: "copied").
const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit 62: compressed cluster.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry bit 0: reads as zeroes (v3).
const OFLAG_ZERO: u64 = 1;
/// Largest active L1 table (qemu's QCOW_MAX_L1_SIZE, 32 MiB).
const MAX_L1_SIZE: u64 = 32 << 20;
/// Memory the L2 and refcount block caches may hold each; at least [`MIN_CACHED_TABLES`] tables.
const CACHE_BYTES: u64 = 16 << 20;
/// Fewest tables a cache holds, whatever the cluster size.
const MIN_CACHED_TABLES: usize = 4;
/// Extended L2 bitmap: every subcluster allocated (spec: "Extended L2 Entries", bits 0-31).
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Extended L2 bitmap: every subcluster reads as zeroes (bits 32-63).
const BITMAP_ALL_ZERO: u64 = 0xffff_ffff << 32;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;
/// Smallest cluster qemu allows extended L2 entries with (smaller subclusters than 512 bytes
/// would be pointless).
const MIN_EXTL2_CLUSTER: u64 = 16 * 1024;
/// Most freed clusters remembered for reuse (8 bytes each).
const MAX_FREE_LIST: usize = 1 << 16;
/// Sector size compressed cluster lengths are counted in (spec: "512-byte sectors").
const SECTOR: u64 = 512;

/// Geometry and features fixed at open.
#[derive(Debug, Clone)]
struct Geo {
    version: u32,
    cluster_bits: u32,
    cs: u64,
    /// Guest clusters per L2 table.
    l2_entries: u64,
    /// u64 words per L2 entry (2 with extended L2).
    words: u64,
    refcount_order: u32,
    /// Refcounts per refcount block.
    rc_per_block: u64,
    compression: Compression,
    extended_l2: bool,
    has_data_file: bool,
    lazy_refcounts: bool,
}

impl Geo {
    fn new(h: &Header, has_data_file: bool) -> Geo {
        let cs = h.cluster_size();
        let words = if h.extended_l2() { 2 } else { 1 };
        Geo {
            version: h.version,
            cluster_bits: h.cluster_bits,
            cs,
            l2_entries: cs / 8 / words,
            words,
            refcount_order: h.refcount_order,
            rc_per_block: (cs * 8) >> h.refcount_order,
            compression: h.compression,
            extended_l2: h.extended_l2(),
            has_data_file,
            lazy_refcounts: h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
        }
    }

    /// Bit where a compressed descriptor's sector count starts (spec: x = 62 - (cluster_bits - 8)).
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// (host offset, length in bytes) of a compressed cluster descriptor.
    fn compressed_span(&self, entry: u64) -> (u64, u64) {
        let shift = self.csize_shift();
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (host, sectors * SECTOR - (host % SECTOR))
    }

    fn cache_tables(&self) -> usize {
        ((CACHE_BYTES / self.cs) as usize).max(MIN_CACHED_TABLES)
    }
}

/// One cached table.
#[derive(Debug)]
struct Cached<T> {
    data: T,
    dirty: bool,
    stamp: u64,
}

/// What one piece of a guest cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Data(u64),
    Zero,
    Unallocated,
    Compressed(u64),
}

/// All mutable metadata, behind the driver's lock.
#[derive(Debug)]
struct Inner {
    st: Arc<dyn Storage>,
    /// Where guest data clusters are read and written: `st`, or its decrypting view for
    /// `encrypt.format=luks`.
    data: Arc<dyn Storage>,
    g: Geo,
    size: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: bool,
    l2: HashMap<u64, Cached<Vec<u64>>>,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_dirty: bool,
    rb: HashMap<u64, Cached<Vec<u8>>>,
    /// Next free host offset for appended clusters (cluster-aligned).
    end: u64,
    /// Where the next compressed cluster may be packed (0: start a new cluster).
    ctail: u64,
    incompatible: u64,
    autoclear: u64,
    header_dirty: bool,
    tick: u64,
    writable: bool,
    /// The dirty bit was set by this session (lazy refcounts) and is cleared on close.
    set_dirty: bool,
    /// Clusters whose references were dropped in cached metadata: their refcounts are lowered
    /// only after that metadata is on disk, so a crash can leak them but never leave a reference
    /// to a cluster with refcount 0.
    pending_free: Vec<u64>,
    /// Clusters freed (refcount 0, nothing on disk pointing at them) that single-cluster
    /// allocations reuse before growing the file; at most [`MAX_FREE_LIST`].
    free: Vec<u64>,
    /// Internal snapshots (spec: "Snapshots"), as the table on disk lists them.
    snaps: Vec<snapshot::Snapshot>,
    /// Host offset of the snapshot table (0 when there are no snapshots).
    snap_offset: u64,
    /// Bytes the snapshot table occupies.
    snap_len: u64,
    /// Guest byte ranges `[start, end)` whose fresh clusters are reserved and being written
    /// without the lock ([`Qcow2Driver::write_at`]); their L2 entries are set when the data is
    /// written. Writers of an overlapping range, and everything that needs all metadata
    /// settled (flush, resize, snapshots, check), wait until they are gone.
    inflight: Vec<(u64, u64)>,
    /// Where the active L2 tables and refcount blocks are, for the overlap checks.
    meta: overlap::MetaIndex,
    /// The image is corrupt (bit set on disk, or found so this session): writes are refused.
    corrupt: bool,
    /// `check -r` is rebuilding a corrupt image: its own writes may proceed.
    repairing: bool,
    /// The bitmaps extension as the header holds it (spec: "Bitmaps extension").
    bitmaps_ext: Option<Vec<u8>>,
    /// Offset and length of the LUKS header clusters (`encrypt.format=luks`), counted by check.
    crypto_header: Option<(u64, u64)>,
    /// (offset, bytes) of the bitmap directory, for the overlap checks.
    bitmap_dir: Option<(u64, u64)>,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Driver {
    st: Arc<dyn Storage>,
    data_file: Option<Box<dyn Storage>>,
    inner: Mutex<Inner>,
    /// Signalled when a write made without the lock is linked (`Inner::inflight` shrinks).
    settled: std::sync::Condvar,
    hdr: Header,
    backing: Option<BackingSpec>,
    /// Whether the image declares a backing file now (changes with [`Driver::set_backing`];
    /// `backing` keeps what was declared at open).
    has_backing: std::sync::atomic::AtomicBool,
    writable: bool,
    dirty_at_open: bool,
    /// The LUKS header of an encrypted image (`encrypt.format=luks`).
    crypto: Option<luks::Embedded>,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

fn read_u64s(st: &dyn Storage, offset: u64, count: u64, what: &str) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; (count * 8) as usize];
    st.read_at(&mut buf, offset)
        .map_err(io_err(format!("reading {what} at {offset:#x}")))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

fn u64s_to_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// Check that a table of `bytes` at `offset` is cluster-aligned and inside a file of `file_len`.
fn check_table(what: &str, offset: u64, bytes: u64, cs: u64, file_len: u64) -> Result<()> {
    if offset % cs != 0 || offset == 0 {
        return Err(Error::invalid(format!(
            "qcow2 {what} offset {offset:#x} is not a non-zero multiple of the cluster size {cs}"
        )));
    }
    match offset.checked_add(bytes) {
        Some(e) if e <= file_len => Ok(()),
        _ => Err(Error::invalid(format!(
            "qcow2 {what} at {offset:#x} ({bytes} bytes) lies past the end of the file ({file_len} bytes)"
        ))),
    }
}

pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    if !header::looks_like_qcow2(input.head) {
        return None;
    }
    match header::parse_fixed(input.head, input.len) {
        Ok(_) => Some(Confidence::Certain),
        Err(_) => Some(Confidence::Weak),
    }
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    let st: Arc<dyn Storage> = Arc::from(storage);
    let file_len = st.len().map_err(io_err("reading file size".into()))?;
    let mut head = vec![0u8; file_len.min(u64::from(header::MAX_HEADER_LEN)) as usize];
    st.read_at(&mut head, 0)
        .map_err(io_err("reading qcow2 header".into()))?;
    if head.len() < header::V2_HEADER_LEN as usize {
        return Err(Error::invalid(format!(
            "qcow2 file is {file_len} bytes, shorter than its header"
        )));
    }
    // Extensions live in the first cluster only.
    if let Some(b) = head.get(20..24) {
        let bits = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
            head.truncate(1usize << bits);
        }
    }
    let h = header::parse_fixed(&head, file_len)?;
    let cs = h.cluster_size();
    // Active L1 table.
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_SIZE {
        return Err(Error::limit(format!(
            "qcow2 L1 table has {} entries ({l1_bytes} bytes), more than {MAX_L1_SIZE} bytes",
            h.l1_size
        )));
    }
    let words = if h.extended_l2() { 2 } else { 1 };
    let per_l1 = (cs / 8 / words) * cs;
    let needed = h.size.div_ceil(per_l1);
    if needed > u64::from(h.l1_size) {
        return Err(Error::invalid(format!(
            "qcow2 L1 table has {} entries but the virtual size {} needs {needed}",
            h.l1_size, h.size
        )));
    }
    let l1 = if h.l1_size > 0 {
        check_table("L1 table", h.l1_table_offset, l1_bytes, cs, file_len)?;
        read_u64s(
            st.as_ref(),
            h.l1_table_offset,
            u64::from(h.l1_size),
            "L1 table",
        )?
    } else {
        Vec::new()
    };
    // Refcount table.
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    if rt_bytes > refcount::MAX_REFTABLE_SIZE || rt_bytes == 0 {
        return Err(Error::limit(format!(
            "qcow2 refcount table of {} clusters ({rt_bytes} bytes) is empty or larger than {} bytes",
            h.refcount_table_clusters,
            refcount::MAX_REFTABLE_SIZE
        )));
    }
    check_table(
        "refcount table",
        h.refcount_table_offset,
        rt_bytes,
        cs,
        file_len,
    )?;
    let reftable = read_u64s(
        st.as_ref(),
        h.refcount_table_offset,
        rt_bytes / 8,
        "refcount table",
    )?;
    let (snapshots, snapshot_table_len) = snapshot::read_table(
        st.as_ref(),
        h.snapshots_offset,
        h.nb_snapshots,
        cs,
        file_len,
    )?;
    for (i, s) in snapshots.iter().enumerate() {
        if u64::from(s.l1_size) * 8 > MAX_L1_SIZE {
            return Err(Error::limit(format!(
                "qcow2 snapshot {i} L1 table has {} entries, more than {MAX_L1_SIZE} bytes",
                s.l1_size
            )));
        }
    }
    // External data file: only through the gate.
    let data_file: Option<Box<dyn Storage>> = if h.incompatible & header::INCOMPAT_DATA_FILE != 0 {
        let name = h.data_file.clone().ok_or_else(|| {
            Error::invalid("qcow2 external data file bit is set but no data file name is recorded")
        })?;
        if ctx.writable {
            return Err(Error::unsupported(
                "writing qcow2 images with an external data file",
            ));
        }
        let o = ctx.gate.open(Referral::DataFile, &ctx.path, &name, false)?;
        let f = FileStorage::from_open_file(o.file, &o.path, false).map_err(|e| {
            Error::io(
                format!("opening external data file {}", o.path.display()),
                e,
            )
        })?;
        Some(Box::new(f))
    } else {
        None
    };
    let crypto = match h.crypto_header {
        Some(_) if data_file.is_some() => {
            return Err(Error::unsupported(
                "encrypted qcow2 images with an external data file",
            ))
        }
        Some((off, len)) => Some(luks::open_embedded(&st, ctx, off, len, cs, file_len)?),
        None => None,
    };
    let backing = h.backing_name.clone().map(|name| BackingSpec {
        name,
        format: h.backing_format.as_deref().and_then(|f| f.parse().ok()),
    });
    let g = Geo::new(&h, data_file.is_some());
    let dirty_at_open = h.incompatible & header::INCOMPAT_DIRTY != 0;
    let end = file_len.div_ceil(cs) * cs;
    let data = match crypto.as_ref().map(luks::Embedded::data) {
        Some(Ok(d)) => Arc::clone(d),
        _ => Arc::clone(&st),
    };
    let inner = Inner {
        st: Arc::clone(&st),
        data,
        g,
        size: h.size,
        l1,
        l1_offset: h.l1_table_offset,
        l1_dirty: false,
        l2: HashMap::new(),
        reftable,
        reftable_offset: h.refcount_table_offset,
        reftable_dirty: false,
        rb: HashMap::new(),
        end,
        ctail: 0,
        incompatible: h.incompatible,
        autoclear: h.autoclear,
        header_dirty: false,
        tick: 0,
        writable: ctx.writable,
        set_dirty: false,
        pending_free: Vec::new(),
        free: Vec::new(),
        inflight: Vec::new(),
        snaps: snapshots,
        snap_offset: h.snapshots_offset,
        snap_len: snapshot_table_len,
        meta: overlap::MetaIndex::default(),
        corrupt: h.incompatible & header::INCOMPAT_CORRUPT != 0,
        repairing: false,
        bitmap_dir: h.bitmaps.as_deref().and_then(overlap::bitmap_directory),
        bitmaps_ext: h.bitmaps.clone(),
        crypto_header: h.crypto_header,
    };
    let drv = Qcow2Driver {
        st,
        data_file,
        inner: Mutex::new(inner),
        settled: std::sync::Condvar::new(),
        hdr: h,
        has_backing: backing.is_some().into(),
        backing,
        writable: ctx.writable,
        dirty_at_open,
        crypto,
    };
    // A corrupt image opens for writing only so that `check -r` can repair it: every other
    // write is refused with `ErrorKind::Corrupt` (qemu allows it for `qemu-img check` only).
    if ctx.writable && !drv.lock().corrupt {
        let mut i = drv.lock();
        if i.autoclear != 0 {
            // Autoclear bits vouch for structures vmi does not maintain (bitmaps): a writable
            // open clears them so readers know those structures may be stale (spec:
            // "autoclear_features"). qemu then counts the bitmap clusters as leaks.
            i.autoclear = 0;
            i.write_header()?;
            i.st.sync().map_err(io_err("syncing".into()))?;
        }
        if dirty_at_open {
            // Refcounts may be stale (lazy refcounts, crash): rebuild them before any allocation.
            let snaps = i.snaps.clone();
            let snap_len = i.snap_len;
            check::rebuild_refcounts(&mut i, &snaps, snap_len)?;
            i.incompatible &= !header::INCOMPAT_DIRTY;
            i.header_dirty = true;
        }
        i.flush()?;
    }
    Ok(Box::new(drv))
}

/// Parsed creation options.
struct NewImage {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    lazy: bool,
    compression: Compression,
    prealloc: String,
    extended_l2: bool,
    backing: Option<BackingSpec>,
}

fn parse_create_options(opts: &CreateOptions) -> Result<NewImage> {
    let o = &opts.options;
    let version = match o.choice("compat", &["0.10", "v2", "1.1", "v3"])?.as_deref() {
        Some("0.10" | "v2") => 2,
        _ => 3,
    };
    let cs = o.size("cluster_size")?.unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::usage(format!(
            "cluster_size {cs}: must be a power of two between 512 and 2M"
        )));
    }
    let rbits = o.u64("refcount_bits")?.unwrap_or(16);
    if !rbits.is_power_of_two() || rbits > 64 {
        return Err(Error::usage(format!(
            "refcount_bits {rbits}: must be a power of two up to 64"
        )));
    }
    if version == 2 && rbits != 16 {
        return Err(Error::usage("refcount_bits other than 16 need compat=1.1"));
    }
    let lazy = o.bool("lazy_refcounts")?.unwrap_or(false);
    if lazy && version == 2 {
        return Err(Error::usage("lazy_refcounts needs compat=1.1"));
    }
    let compression = match o.choice("compression_type", &["zlib", "zstd"])?.as_deref() {
        Some("zstd") => Compression::Zstd,
        _ => Compression::Zlib,
    };
    if compression == Compression::Zstd && version == 2 {
        return Err(Error::usage("compression_type=zstd needs compat=1.1"));
    }
    let prealloc = o
        .choice("preallocation", &["off", "metadata", "falloc", "full"])?
        .unwrap_or_else(|| "off".into());
    let extended_l2 = o.bool("extended_l2")?.unwrap_or(false);
    if extended_l2 && version == 2 {
        return Err(Error::usage("extended_l2=on needs compat=1.1"));
    }
    if extended_l2 && cs < MIN_EXTL2_CLUSTER {
        return Err(Error::usage(format!(
            "extended_l2=on needs a cluster size of at least {MIN_EXTL2_CLUSTER} bytes"
        )));
    }
    let mut backing = opts.backing.clone();
    let bf = o.str("backing_file");
    let bfmt = o.str("backing_fmt");
    if backing.is_none() {
        if let Some(name) = bf {
            let format = bfmt.map(|f| f.parse()).transpose()?;
            backing = Some(BackingSpec { name, format });
        }
    }
    if backing.is_some() && prealloc != "off" {
        return Err(Error::usage(
            "preallocation is not allowed together with a backing file",
        ));
    }
    Ok(NewImage {
        version,
        cluster_bits: cs.trailing_zeros(),
        refcount_order: rbits.trailing_zeros(),
        lazy,
        compression,
        prealloc,
        extended_l2,
        backing,
    })
}

pub(crate) fn create(
    storage: Box<dyn Storage>,
    _ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    let n = parse_create_options(opts)?;
    let encrypt = luks::create_embedded(&opts.options)?;
    opts.options.finish("qcow2")?;
    if encrypt.is_some() && n.prealloc != "off" {
        return Err(Error::unsupported(
            "preallocation with encrypt.format=luks (preallocated clusters would decrypt to noise)",
        ));
    }
    let cs = 1u64 << n.cluster_bits;
    // The header, without and (once its clusters are placed) with the LUKS header pointer.
    let header_with = |crypto: Option<(u64, u64)>| {
        header::serialize(&header::NewHeader {
            version: n.version,
            cluster_bits: n.cluster_bits,
            size: opts.size,
            refcount_order: n.refcount_order,
            compatible: if n.lazy {
                header::COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            compression: n.compression,
            extended_l2: n.extended_l2,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            backing: n.backing.as_ref().map(|b| (b.name.as_str(), b.format)),
            crypto,
        })
    };
    let bytes = header_with(None)?;
    let st: Arc<dyn Storage> = Arc::from(storage);
    // Only a file with old contents is truncated: on ext4 a truncate to size 0, even of a new
    // empty file, makes the last close start writeback of every dirty page and wait for block
    // allocation ("replace via truncate"), a hidden sync of the whole image (0.5 s per GiB).
    if st.len().map_err(io_err("reading the file size".into()))? != 0 {
        st.set_len(0).map_err(io_err("truncating".into()))?;
    }
    st.write_at(&bytes, 0)
        .map_err(io_err("writing qcow2 header".into()))?;
    st.set_len(2 * cs)
        .map_err(io_err("sizing new image".into()))?;
    let h = header::parse_fixed(&bytes, 2 * cs)?;
    let g = Geo::new(&h, false);
    let per_l1 = g.l2_entries * cs;
    let l1_size = opts.size.div_ceil(per_l1);
    if l1_size * 8 > MAX_L1_SIZE {
        return Err(Error::limit(format!(
            "virtual size {} needs an L1 table of {} bytes, more than {MAX_L1_SIZE}",
            opts.size,
            l1_size * 8
        )));
    }
    let mut inner = Inner {
        st: Arc::clone(&st),
        data: Arc::clone(&st),
        g,
        size: opts.size,
        l1: vec![0; l1_size as usize],
        l1_offset: 0,
        l1_dirty: true,
        l2: HashMap::new(),
        reftable: vec![0; (cs / 8) as usize],
        reftable_offset: cs,
        reftable_dirty: true,
        rb: HashMap::new(),
        end: 2 * cs,
        ctail: 0,
        incompatible: h.incompatible,
        autoclear: 0,
        header_dirty: true,
        tick: 0,
        writable: true,
        set_dirty: false,
        pending_free: Vec::new(),
        free: Vec::new(),
        inflight: Vec::new(),
        snaps: Vec::new(),
        snap_offset: 0,
        snap_len: 0,
        meta: overlap::MetaIndex::default(),
        corrupt: false,
        repairing: false,
        bitmaps_ext: None,
        crypto_header: None,
        bitmap_dir: None,
    };
    inner.rc_add(0, 1)?;
    inner.rc_add(cs, 1)?;
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    inner.l1_offset = inner.alloc(l1_clusters)?;
    let mut crypto = None;
    if let Some((area, cipher)) = encrypt {
        // The LUKS header clusters follow the L1 table, as qemu places them; the header then
        // points at them (extension 0x0537be77) and says crypt_method 2.
        let len = area.len() as u64;
        let off = inner.alloc(len.div_ceil(cs))?;
        st.write_at(&area, off)
            .map_err(io_err("writing the LUKS header".into()))?;
        let hdr = header_with(Some((off, len)))?;
        st.write_at(&hdr, 0)
            .map_err(io_err("writing qcow2 header".into()))?;
        inner.crypto_header = Some((off, len));
        let data = luks::embedded_data(&st, cipher);
        inner.data = Arc::clone(&data);
        crypto = Some(luks::embedded_new(&st, off, len, data, &_ctx.path)?);
    }
    if n.prealloc != "off" {
        inner.preallocate(&n.prealloc)?;
    }
    inner.flush()?;
    let backing = n.backing.clone();
    let mut hdr = h;
    hdr.backing_name = backing.as_ref().map(|b| b.name.clone());
    Ok(Box::new(Qcow2Driver {
        st,
        data_file: None,
        inner: Mutex::new(inner),
        settled: std::sync::Condvar::new(),
        hdr,
        has_backing: backing.is_some().into(),
        backing,
        writable: true,
        dirty_at_open: false,
        crypto,
    }))
}

/// qemu-img measure for qcow2 (qemu's `qcow2_measure` and `qcow2_calc_prealloc_size`).
pub(crate) fn measure(opts: &CreateOptions, source: Option<&Image>) -> Result<Measurement> {
    let n = parse_create_options(opts)?;
    opts.options.finish("qcow2")?;
    let cs = 1u64 << n.cluster_bits;
    let vsize = source.map_or(opts.size, Image::virtual_size);
    let aligned = vsize.div_ceil(cs) * cs;
    let mut required = match source {
        None => 0,
        Some(_) if n.backing.is_some() => aligned,
        Some(img) => {
            let mut req = 0u64;
            let mut off = 0u64;
            while off < vsize {
                let st = img.block_status(off, vsize - off)?;
                let mut len = st.len;
                if matches!(
                    st.kind,
                    crate::image::BlockKind::Data | crate::image::BlockKind::Compressed
                ) {
                    let end = (off + len).div_ceil(cs) * cs;
                    len = end - off;
                    req += off % cs + len;
                }
                off += len;
            }
            req
        }
    };
    if n.prealloc == "full" || n.prealloc == "falloc" {
        required = aligned;
    }
    let l2e = if n.extended_l2 { 16 } else { 8 };
    let mut meta = cs; // header
    let l2_tables = (aligned / cs).div_ceil(cs / l2e);
    if l2_tables * 8 > MAX_L1_SIZE {
        return Err(Error::usage(format!(
            "virtual size {vsize} needs an L1 table larger than {MAX_L1_SIZE} bytes (try a larger cluster size)"
        )));
    }
    meta += l2_tables * cs;
    meta += (l2_tables * 8).div_ceil(cs) * cs;
    meta += refcount::metadata_size((meta + aligned) / cs, cs, n.refcount_order);
    let fully = meta + aligned;
    Ok(Measurement {
        required: fully - aligned + required,
        fully_allocated: fully,
    })
}

impl Inner {
    pub(super) fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    pub(super) fn file_len(&self) -> Result<u64> {
        self.st.len().map_err(io_err("reading file size".into()))
    }

    /// Refuse to treat `[off, off+len)` as an L2 table, refcount block or data cluster when it
    /// overlaps the header, the active L1 table or the refcount table: a hostile image could
    /// otherwise make a write overwrite metadata.
    pub(super) fn check_no_overlap(&self, what: &str, off: u64, len: u64) -> Result<()> {
        let cs = self.g.cs;
        let l1 = (self.l1_offset, self.l1.len() as u64 * 8);
        let rt = (self.reftable_offset, self.reftable.len() as u64 * 8);
        for (name, start, n) in [
            ("header", 0, cs),
            ("L1 table", l1.0, l1.1),
            ("refcount table", rt.0, rt.1),
        ] {
            if n > 0 && off < start.saturating_add(n) && start < off.saturating_add(len) {
                return Err(Error::invalid(format!(
                    "qcow2 {what} at {off:#x} overlaps the {name} at {start:#x}"
                )));
            }
        }
        Ok(())
    }
}

impl Qcow2Driver {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock, once no write made without it overlaps `range` (guest bytes), or once none is
    /// in flight at all (`None`: flush, resize, snapshots, check need settled metadata).
    fn lock_settled(&self, range: Option<(u64, u64)>) -> MutexGuard<'_, Inner> {
        let mut g = self.lock();
        while g
            .inflight
            .iter()
            .any(|&(s, e)| range.is_none_or(|(a, b)| s < b && a < e))
        {
            g = self.settled.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g
    }
}

impl Driver for Qcow2Driver {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.lock().size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        if let Some(c) = &self.crypto {
            c.data()?;
        }
        let (p, n) = self.lock().map(offset, len)?;
        // Encrypted data clusters are read through file 1, the decrypting view.
        let file = usize::from(self.data_file.is_some() || self.crypto.is_some());
        if let (Piece::Compressed(_), Some(_)) = (p, &self.crypto) {
            return Err(Error::unsupported(
                "compressed clusters in an encrypted qcow2 image",
            ));
        }
        let kind = match p {
            Piece::Data(host) => MapKind::Data { file, offset: host },
            Piece::Zero => MapKind::Zero,
            Piece::Unallocated => MapKind::Unallocated,
            Piece::Compressed(unit) => MapKind::Compressed { unit },
        };
        Ok(Mapping {
            start: offset,
            len: n,
            kind,
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match (index, &self.data_file) {
            (0, _) => Ok(self.st.as_ref()),
            (1, None) if self.crypto.is_some() => match &self.crypto {
                Some(c) => Ok(c.data()?.as_ref()),
                None => Err(Error::invalid("qcow2 image has no file 1")),
            },
            (1, Some(d)) => Ok(d.as_ref()),
            _ => Err(Error::invalid(format!("qcow2 image has no file {index}"))),
        }
    }

    fn read_compressed(&self, unit: u64, out: &mut Vec<u8>) -> Result<()> {
        if self.writable {
            // A concurrent write may free and reuse the cluster: stay under the lock.
            return self.lock().read_compressed_unit(unit, out);
        }
        // Read-only: the location cannot change, so the read and the inflate (the expensive part)
        // run outside the lock and several threads decompress at once.
        let loc = self.lock().compressed_location(unit)?;
        loc.read(self.st.as_ref(), out)
    }

    fn backing(&self) -> Option<&BackingSpec> {
        self.backing.as_ref()
    }

    fn set_backing(&self, backing: Option<&BackingSpec>, _parent: Option<&Image>) -> Result<()> {
        let mut i = self.lock_settled(None);
        i.check_writable()?;
        if i.corrupt {
            return Err(i.corrupt_error());
        }
        if self.data_file.is_some() {
            return Err(Error::unsupported(
                "changing the backing file of a qcow2 image with an external data file",
            ));
        }
        i.flush()?;
        let cs = i.g.cs;
        let mut head = vec![0u8; cs.min(i.file_len()?) as usize];
        i.st.read_at(&mut head, 0)
            .map_err(io_err("reading qcow2 header".into()))?;
        let new = header::rewrite_backing(&head, backing.map(|b| (b.name.as_str(), b.format)))?;
        i.st.write_at(&new, 0)
            .map_err(io_err("writing qcow2 header".into()))?;
        i.st.sync().map_err(io_err("syncing".into()))?;
        self.has_backing
            .store(backing.is_some(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn info(&self) -> FormatInfo {
        let i = self.lock();
        let compat = if i.g.version >= 3 { "1.1" } else { "0.10" };
        let data = if i.g.version >= 3 {
            serde_json::json!({
                "compat": compat,
                "compression-type": i.g.compression.name(),
                "lazy-refcounts": i.g.lazy_refcounts,
                "refcount-bits": 1u64 << i.g.refcount_order,
                "corrupt": i.incompatible & header::INCOMPAT_CORRUPT != 0,
                "extended-l2": i.g.extended_l2,
            })
        } else {
            serde_json::json!({
                "compat": compat,
                "compression-type": i.g.compression.name(),
                "refcount-bits": 1u64 << i.g.refcount_order,
            })
        };
        let mut data = data;
        if let (Some(c), Some(m)) = (&self.crypto, data.as_object_mut()) {
            m.insert("encrypt".into(), c.info.clone());
        }
        FormatInfo {
            cluster_size: Some(i.g.cs),
            dirty: self.dirty_at_open || i.incompatible & header::INCOMPAT_DIRTY != 0,
            format_specific: serde_json::json!({"type": "qcow2", "data": data}),
            snapshots: i.snaps.iter().map(|s| s.info.clone()).collect(),
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    /// A write that starts with whole unallocated clusters reserves them under the lock, writes
    /// the data without it (so several writers copy data at once, as qemu's coroutines do), then
    /// sets their L2 entries under the lock again: data first, metadata second, as always. The
    /// range stays in `inflight` meanwhile, so overlapping writers wait and no cluster is
    /// allocated twice; readers see the old (unallocated) contents until the entries are set.
    fn write_at(&self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::usage("offset overflow"))?;
        let mut g = self.lock_settled(Some((offset, end)));
        let run = match self.data_file {
            None => g.reserve_fresh(buf, offset)?,
            Some(_) => None,
        };
        let Some(run) = run else {
            return g.write(buf, offset, backing);
        };
        g.inflight.push((offset, end));
        let data_st = Arc::clone(&g.data);
        drop(g);
        let written = buf
            .get(..run.bytes as usize)
            .ok_or_else(|| Error::invalid("qcow2 write run exceeds its buffer"))
            .and_then(|data| {
                data_st.write_at(data, run.host).map_err(io_err(format!(
                    "writing {} clusters at {:#x}",
                    run.bytes / self.hdr.cluster_size(),
                    run.host
                )))
            });
        let mut g = self.lock();
        let result = written.and_then(|()| g.link_fresh(&run)).and_then(|()| {
            match buf.get(run.bytes as usize..) {
                Some(rest) if !rest.is_empty() => g.write(rest, offset + run.bytes, backing),
                _ => Ok(()),
            }
        });
        if let Some(i) = g.inflight.iter().position(|&r| r == (offset, end)) {
            g.inflight.swap_remove(i);
        }
        self.settled.notify_all();
        // On error the reserved clusters stay allocated and unreferenced: a leak `check -r
        // leaks` repairs, never a reference to unwritten data.
        result
    }

    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        let declared = self.has_backing.load(std::sync::atomic::Ordering::Relaxed);
        let end = offset.saturating_add(len);
        self.lock_settled(Some((offset, end)))
            .write_zeroes(offset, len, backing, declared)
    }

    fn compressed_writer(&self) -> Option<&dyn CompressedWrite> {
        (self.writable && self.crypto.is_none()).then_some(self as &dyn CompressedWrite)
    }

    fn flush(&self) -> Result<()> {
        self.lock_settled(None).flush()
    }

    fn close(&self) -> Result<()> {
        let mut i = self.lock_settled(None);
        i.flush()?;
        if i.set_dirty {
            i.incompatible &= !header::INCOMPAT_DIRTY;
            i.set_dirty = false;
            i.write_header()?;
            i.st.sync().map_err(io_err("syncing".into()))?;
        }
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        let mut i = self.lock_settled(None);
        i.resize(new_size)?;
        i.flush()
    }

    fn check(&self, mode: CheckMode) -> Result<CheckReport> {
        let mut i = self.lock_settled(None);
        if mode != CheckMode::ReadOnly {
            i.check_writable()?;
        }
        // The check reads tables from the file: cached changes go there first.
        i.flush()?;
        let snaps = i.snaps.clone();
        let snap_len = i.snap_len;
        check::check(&mut i, &snaps, snap_len, mode)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CompressedWrite for Qcow2Driver {
    fn unit_size(&self) -> u64 {
        self.hdr.cluster_size()
    }

    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let cs = self.hdr.cluster_size() as usize;
        if data.len() > cs {
            return Err(Error::usage(format!(
                "compressing {} bytes: more than one {cs}-byte cluster",
                data.len()
            )));
        }
        if data.len() < cs {
            // The last cluster of an image whose size is not a cluster multiple: a compressed
            // cluster always inflates to a whole cluster, so pad it with zeroes as qemu does.
            let mut padded = data.to_vec();
            padded.resize(cs, 0);
            return compress::deflate(self.hdr.compression, &padded);
        }
        compress::deflate(self.hdr.compression, data)
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        let end = offset.saturating_add(self.hdr.cluster_size());
        self.lock_settled(Some((offset, end)))
            .write_compressed(offset, compressed)
    }
}

/// Make a writable qcow2 image empty: every guest cluster becomes unallocated (reads from the
/// backing file) and the clusters only it referenced are freed — what `commit` does to the
/// overlay it merged. Refuses images of other formats with `Unsupported`.
pub fn make_empty(img: &Image) -> Result<()> {
    let drv = img
        .driver()
        .as_any()
        .downcast_ref::<Qcow2Driver>()
        .ok_or_else(|| {
            Error::unsupported(format!(
                "emptying {} images after commit (only qcow2 can discard its clusters)",
                img.format()
            ))
        })?;
    drv.lock_settled(None)
        .make_empty()
        .map_err(|e| e.with_path(img.path()))
}
