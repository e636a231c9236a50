//! qcow2, QEMU's copy-on-write format, versions 2 (`compat=0.10`) and 3 (`compat=1.1`), following
//! qemu's `docs/interop/qcow2.txt`: the header and extensions ([`header`]), the two-level cluster
//! mapping (L1/L2 tables, "Cluster mapping"), refcounts of every width ([`refcount`]), compressed
//! clusters ([`compress`]), internal snapshots (read, [`snapshot`]) and consistency checks
//! ([`check`]).
//!
//! All metadata lives behind one lock ([`Inner`]): the L1 table and refcount table in memory
//! (bounded by qemu's caps), L2 tables and refcount blocks in small write-back caches. Writes go
//! data first; L2 tables, refcounts, L1 and header reach the file on [`Driver::flush`] in an order
//! that can leak clusters after a crash but never points at unwritten data.

mod check;
mod compress;
mod header;
mod refcount;
mod snapshot;

use crate::check::{CheckMode, CheckReport};
use crate::driver::{BackingSpec, CompressedWrite, Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, ErrorKind, Result};
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
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Driver {
    st: Arc<dyn Storage>,
    data_file: Option<Box<dyn Storage>>,
    inner: Mutex<Inner>,
    hdr: Header,
    backing: Option<BackingSpec>,
    snapshots: Vec<snapshot::Snapshot>,
    snapshot_table_len: u64,
    writable: bool,
    dirty_at_open: bool,
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
        let p = ctx.gate.resolve(Referral::DataFile, &ctx.path, &name)?;
        let f = FileStorage::open(&p, false)
            .map_err(|e| Error::io(format!("opening external data file {}", p.display()), e))?;
        Some(Box::new(f))
    } else {
        None
    };
    let backing = h.backing_name.clone().map(|name| BackingSpec {
        name,
        format: h.backing_format.as_deref().and_then(|f| f.parse().ok()),
    });
    let g = Geo::new(&h, data_file.is_some());
    let dirty_at_open = h.incompatible & header::INCOMPAT_DIRTY != 0;
    if ctx.writable && h.incompatible & header::INCOMPAT_CORRUPT != 0 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            "qcow2 image is marked corrupt (incompatible bit 1); it can only be opened read-only",
        ));
    }
    let end = file_len.div_ceil(cs) * cs;
    let inner = Inner {
        st: Arc::clone(&st),
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
    };
    let drv = Qcow2Driver {
        st,
        data_file,
        inner: Mutex::new(inner),
        hdr: h,
        backing,
        snapshots,
        snapshot_table_len,
        writable: ctx.writable,
        dirty_at_open,
    };
    if ctx.writable {
        let mut i = drv.lock();
        if dirty_at_open {
            // Refcounts may be stale (lazy refcounts, crash): rebuild them before any allocation.
            check::rebuild_refcounts(&mut i, &drv.snapshots, drv.snapshot_table_len, &drv.hdr)?;
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
    opts.options.finish("qcow2")?;
    let cs = 1u64 << n.cluster_bits;
    let bytes = header::serialize(&header::NewHeader {
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
    })?;
    let st: Arc<dyn Storage> = Arc::from(storage);
    st.set_len(0).map_err(io_err("truncating".into()))?;
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
    };
    inner.rc_add(0, 1)?;
    inner.rc_add(cs, 1)?;
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    inner.l1_offset = inner.alloc(l1_clusters)?;
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
        hdr,
        backing,
        snapshots: Vec::new(),
        snapshot_table_len: 0,
        writable: true,
        dirty_at_open: false,
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
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn file_len(&self) -> Result<u64> {
        self.st.len().map_err(io_err("reading file size".into()))
    }

    /// Refuse to treat `[off, off+len)` as an L2 table, refcount block or data cluster when it
    /// overlaps the header, the active L1 table or the refcount table: a hostile image could
    /// otherwise make a write overwrite metadata.
    fn check_no_overlap(&self, what: &str, off: u64, len: u64) -> Result<()> {
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

    // ----- L2 tables -----

    fn load_l2(&mut self, off: u64) -> Result<()> {
        let t = self.next_tick();
        if let Some(c) = self.l2.get_mut(&off) {
            c.stamp = t;
            return Ok(());
        }
        let cs = self.g.cs;
        let file_len = self.file_len()?;
        check_table("L2 table", off, cs, cs, file_len)?;
        self.check_no_overlap("L2 table", off, cs)?;
        let data = read_u64s(self.st.as_ref(), off, cs / 8, "L2 table")?;
        self.insert_l2(off, data, false)
    }

    fn insert_l2(&mut self, off: u64, data: Vec<u64>, dirty: bool) -> Result<()> {
        while self.l2.len() >= self.g.cache_tables() {
            let victim = self.l2.iter().min_by_key(|(_, c)| c.stamp).map(|(k, _)| *k);
            let Some(v) = victim else { break };
            if self.l2.get(&v).is_some_and(|c| c.dirty) {
                // Refcounts before the table that points at the clusters they count.
                self.write_refcounts()?;
                self.write_l2(v)?;
            }
            self.l2.remove(&v);
        }
        let stamp = self.next_tick();
        self.l2.insert(off, Cached { data, dirty, stamp });
        Ok(())
    }

    fn write_l2(&mut self, off: u64) -> Result<()> {
        if let Some(c) = self.l2.get_mut(&off) {
            if c.dirty {
                self.st
                    .write_at(&u64s_to_bytes(&c.data), off)
                    .map_err(io_err(format!("writing L2 table at {off:#x}")))?;
                c.dirty = false;
            }
        }
        Ok(())
    }

    /// Entry words (descriptor, bitmap) for guest cluster `idx` of the L2 table at `off`.
    fn l2_entry(&mut self, off: u64, idx: u64) -> Result<(u64, u64)> {
        self.load_l2(off)?;
        let w = self.g.words;
        let c = self
            .l2
            .get(&off)
            .ok_or_else(|| Error::invalid("L2 table vanished from the cache"))?;
        let i = (idx * w) as usize;
        let e = c.data.get(i).copied().unwrap_or(0);
        let b = if w == 2 {
            c.data.get(i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        Ok((e, b))
    }

    /// Set the entry of guest cluster `idx`: its descriptor and, with extended L2 entries, its
    /// subcluster bitmap (ignored otherwise).
    fn set_l2_entry(&mut self, off: u64, idx: u64, desc: u64, bitmap: u64) -> Result<()> {
        self.load_l2(off)?;
        let w = self.g.words;
        let c = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| Error::invalid("L2 table vanished from the cache"))?;
        let i = (idx * w) as usize;
        if let Some(e) = c.data.get_mut(i) {
            *e = desc;
            c.dirty = true;
        }
        if w == 2 {
            if let Some(b) = c.data.get_mut(i + 1) {
                *b = bitmap;
            }
        }
        Ok(())
    }

    /// Bitmap of a cluster whose every subcluster is allocated (0 without extended L2).
    fn all_alloc(&self) -> u64 {
        if self.g.extended_l2 {
            BITMAP_ALL_ALLOC
        } else {
            0
        }
    }

    /// Entry for guest cluster `gc` in the active tables: None when its L2 table is unallocated.
    fn lookup(&mut self, gc: u64) -> Result<Option<(u64, u64)>> {
        let l1i = gc / self.g.l2_entries;
        let Some(&l1e) = self.l1.get(l1i as usize) else {
            return Ok(None);
        };
        let off = l1e & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        self.l2_entry(off, gc % self.g.l2_entries).map(Some)
    }

    /// What the byte at `in_off` of guest cluster `gc` is, and how many bytes from there share it.
    fn piece(&mut self, gc: u64, in_off: u64) -> Result<(Piece, u64)> {
        let cs = self.g.cs;
        let Some((e, bitmap)) = self.lookup(gc)? else {
            return Ok((Piece::Unallocated, cs - in_off));
        };
        if e & OFLAG_COMPRESSED != 0 {
            if self.g.has_data_file {
                return Err(Error::invalid(format!(
                    "qcow2 guest cluster {gc} is compressed, which an external data file forbids"
                )));
            }
            return Ok((Piece::Compressed(gc * cs), cs - in_off));
        }
        let host = e & L2E_OFFSET_MASK;
        if host % cs != 0 {
            return Err(Error::invalid(format!(
                "qcow2 L2 entry for guest cluster {gc} points at unaligned host offset {host:#x}"
            )));
        }
        if self.g.extended_l2 {
            let sub = cs / 32;
            let s = in_off / sub;
            let run = sub - in_off % sub;
            let alloc = bitmap & (1 << s) != 0;
            let zero = bitmap & (1 << (32 + s)) != 0;
            if alloc && zero {
                return Err(Error::invalid(format!(
                    "qcow2 subcluster {s} of guest cluster {gc} is both allocated and zero"
                )));
            }
            return Ok(if zero {
                (Piece::Zero, run)
            } else if alloc {
                if host == 0 && !self.g.has_data_file {
                    return Err(Error::invalid(format!(
                        "qcow2 guest cluster {gc} has allocated subclusters but no host offset"
                    )));
                }
                (Piece::Data(host + in_off), run)
            } else {
                (Piece::Unallocated, run)
            });
        }
        if self.g.version >= 3 && e & OFLAG_ZERO != 0 {
            return Ok((Piece::Zero, cs - in_off));
        }
        if host != 0 || (self.g.has_data_file && e & OFLAG_COPIED != 0) {
            return Ok((Piece::Data(host + in_off), cs - in_off));
        }
        Ok((Piece::Unallocated, cs - in_off))
    }

    fn map(&mut self, offset: u64, len: u64) -> Result<(Piece, u64)> {
        let cs = self.g.cs;
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let gc = offset / cs;
        let l1i = gc / self.g.l2_entries;
        let unmapped = match self.l1.get(l1i as usize) {
            None => true,
            Some(e) => e & L1E_OFFSET_MASK == 0,
        };
        if unmapped {
            // The whole L2 range is unallocated, and so are the ranges of the empty L1 entries
            // that follow.
            let per_l1 = self.g.l2_entries.saturating_mul(cs);
            let mut next = l1i + 1;
            while next.saturating_mul(per_l1) < offset + len
                && self
                    .l1
                    .get(next as usize)
                    .is_some_and(|e| e & L1E_OFFSET_MASK == 0)
            {
                next += 1;
            }
            let range_end = next.saturating_mul(per_l1);
            return Ok((Piece::Unallocated, len.min(range_end - offset)));
        }
        let table_end = (l1i + 1) * self.g.l2_entries * cs;
        let limit = offset + len.min(table_end - offset);
        let (first, n) = self.piece(gc, offset % cs)?;
        let mut done = n.min(limit - offset);
        if matches!(first, Piece::Compressed(_)) {
            return Ok((first, done));
        }
        while offset + done < limit {
            let pos = offset + done;
            let (p, n) = self.piece(pos / cs, pos % cs)?;
            let same = match (first, p) {
                (Piece::Data(a), Piece::Data(b)) => a + done == b,
                (Piece::Zero, Piece::Zero) | (Piece::Unallocated, Piece::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            done += n.min(limit - pos);
        }
        Ok((first, done))
    }

    fn read_compressed_unit(&mut self, unit: u64, out: &mut Vec<u8>) -> Result<()> {
        let cs = self.g.cs;
        let gc = unit / cs;
        let e = match self.lookup(gc)? {
            Some((e, _)) if e & OFLAG_COMPRESSED != 0 => e,
            _ => {
                return Err(Error::invalid(format!(
                    "qcow2 guest cluster {gc} is not compressed"
                )))
            }
        };
        let (host, clen) = self.g.compressed_span(e);
        let file_len = self.file_len()?;
        if host >= file_len {
            return Err(Error::invalid(format!(
                "qcow2 compressed cluster for guest offset {unit} starts at {host:#x}, past the end of the file ({file_len} bytes)"
            )));
        }
        let clen = clen.min(file_len - host);
        let mut buf = vec![0u8; clen as usize];
        self.st
            .read_at(&mut buf, host)
            .map_err(io_err(format!("reading compressed cluster at {host:#x}")))?;
        compress::inflate(self.g.compression, &buf, cs as usize, out)
            .map_err(|e| e.context(format!("guest offset {unit}, host offset {host:#x}")))
    }

    // ----- refcounts -----

    fn load_rb(&mut self, off: u64) -> Result<()> {
        let t = self.next_tick();
        if let Some(c) = self.rb.get_mut(&off) {
            c.stamp = t;
            return Ok(());
        }
        let cs = self.g.cs;
        let file_len = self.file_len()?;
        check_table("refcount block", off, cs, cs, file_len)?;
        self.check_no_overlap("refcount block", off, cs)?;
        let mut data = vec![0u8; cs as usize];
        self.st
            .read_at(&mut data, off)
            .map_err(io_err(format!("reading refcount block at {off:#x}")))?;
        self.insert_rb(off, data, false)
    }

    fn insert_rb(&mut self, off: u64, data: Vec<u8>, dirty: bool) -> Result<()> {
        while self.rb.len() >= self.g.cache_tables() {
            let victim = self.rb.iter().min_by_key(|(_, c)| c.stamp).map(|(k, _)| *k);
            let Some(v) = victim else { break };
            self.write_rb(v)?;
            self.rb.remove(&v);
        }
        let stamp = self.next_tick();
        self.rb.insert(off, Cached { data, dirty, stamp });
        Ok(())
    }

    fn write_rb(&mut self, off: u64) -> Result<()> {
        if let Some(c) = self.rb.get_mut(&off) {
            if c.dirty {
                self.st
                    .write_at(&c.data, off)
                    .map_err(io_err(format!("writing refcount block at {off:#x}")))?;
                c.dirty = false;
            }
        }
        Ok(())
    }

    fn rc_get(&mut self, host: u64) -> Result<u64> {
        let cluster = host >> self.g.cluster_bits;
        let ti = cluster / self.g.rc_per_block;
        let Some(&te) = self.reftable.get(ti as usize) else {
            return Ok(0);
        };
        let off = te & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        self.load_rb(off)?;
        let order = self.g.refcount_order;
        Ok(self.rb.get(&off).map_or(0, |c| {
            refcount::get(&c.data, cluster % self.g.rc_per_block, order)
        }))
    }

    fn rc_add(&mut self, host: u64, delta: i64) -> Result<u64> {
        let cur = self.rc_get(host)?;
        let max = refcount::max(self.g.refcount_order);
        let new = if delta >= 0 {
            cur.checked_add(delta as u64).filter(|&v| v <= max)
        } else {
            cur.checked_sub(delta.unsigned_abs())
        }
        .ok_or_else(|| {
            Error::invalid(format!(
                "qcow2 refcount of cluster at {host:#x} would leave 0..={max} (is {cur}, change {delta})"
            ))
        })?;
        self.rc_set(host, new)?;
        Ok(new)
    }

    fn rc_set(&mut self, host: u64, value: u64) -> Result<()> {
        let cluster = host >> self.g.cluster_bits;
        let ti = cluster / self.g.rc_per_block;
        let off = self.ensure_rb(ti)?;
        self.load_rb(off)?;
        let order = self.g.refcount_order;
        let per = self.g.rc_per_block;
        if let Some(c) = self.rb.get_mut(&off) {
            refcount::set(&mut c.data, cluster % per, order, value);
            c.dirty = true;
        }
        Ok(())
    }

    /// Host offset of refcount block `ti`, allocating it (and growing the table) when needed.
    fn ensure_rb(&mut self, ti: u64) -> Result<u64> {
        if ti >= self.reftable.len() as u64 {
            self.grow_reftable(ti)?;
        }
        let te = self.reftable.get(ti as usize).copied().unwrap_or(0);
        let off = te & REFT_OFFSET_MASK;
        if off != 0 {
            return Ok(off);
        }
        let cs = self.g.cs;
        let new = self.end;
        self.end += cs;
        self.insert_rb(new, vec![0u8; cs as usize], true)?;
        if let Some(e) = self.reftable.get_mut(ti as usize) {
            *e = new;
        }
        self.reftable_dirty = true;
        self.rc_add(new, 1)?;
        Ok(new)
    }

    fn grow_reftable(&mut self, ti: u64) -> Result<()> {
        let cs = self.g.cs;
        let cover = (self.end / cs) / self.g.rc_per_block + 4;
        let want = (ti + 1).max(self.reftable.len() as u64 * 2).max(cover);
        let clusters = (want * 8).div_ceil(cs);
        if clusters * cs > refcount::MAX_REFTABLE_SIZE {
            return Err(Error::limit(format!(
                "qcow2 refcount table would need {} bytes, more than {}",
                clusters * cs,
                refcount::MAX_REFTABLE_SIZE
            )));
        }
        let old = self.reftable_offset;
        let old_clusters = (self.reftable.len() as u64 * 8).div_ceil(cs);
        let new = self.end;
        self.end += clusters * cs;
        self.reftable.resize((clusters * cs / 8) as usize, 0);
        self.reftable_offset = new;
        self.reftable_dirty = true;
        self.header_dirty = true;
        for k in 0..clusters {
            self.rc_add(new + k * cs, 1)?;
        }
        for k in 0..old_clusters {
            self.pending_free.push(old + k * cs);
        }
        Ok(())
    }

    /// Reserve `n` contiguous clusters at the end of the file, each with refcount 1.
    fn alloc(&mut self, n: u64) -> Result<u64> {
        let cs = self.g.cs;
        let off = self.end;
        self.end = off
            .checked_add(n * cs)
            .ok_or_else(|| Error::limit("qcow2 image file would exceed 2^64 bytes"))?;
        if self.end > L2E_OFFSET_MASK {
            return Err(Error::limit(
                "qcow2 image file would exceed the 2^56-byte host offset range",
            ));
        }
        for k in 0..n {
            self.rc_add(off + k * cs, 1)?;
        }
        Ok(off)
    }

    /// One cluster with refcount 1: a freed one when there is one, else appended.
    fn alloc_one(&mut self) -> Result<u64> {
        while let Some(c) = self.free.pop() {
            // Defensive: only a cluster nobody counts may be handed out again.
            if self.rc_get(c)? == 0 {
                self.rc_add(c, 1)?;
                return Ok(c);
            }
        }
        self.alloc(1)
    }

    /// Drop the references an L2 entry holds (data cluster or compressed span).
    fn release(&mut self, entry: u64) -> Result<()> {
        let cs = self.g.cs;
        if entry & OFLAG_COMPRESSED != 0 {
            let (host, len) = self.g.compressed_span(entry);
            let first = host / cs * cs;
            let last = (host + len - 1) / cs * cs;
            let mut c = first;
            while c <= last {
                self.pending_free.push(c);
                c += cs;
            }
        } else {
            let host = entry & L2E_OFFSET_MASK;
            if host != 0 {
                self.pending_free.push(host);
            }
        }
        Ok(())
    }

    // ----- writing -----

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("qcow2 image is not open for writing"));
        }
        Ok(())
    }

    /// Mark the image dirty before the first change when lazy refcounts are on (spec: the dirty
    /// bit says refcounts may be stale; vmi keeps them exact but follows the protocol).
    fn begin_write(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.autoclear != 0 {
            // Autoclear bits vouch for structures vmi does not maintain (bitmaps): clear them
            // before the first change so readers know those structures may be stale (spec:
            // "autoclear_features"). qemu then reports the bitmap clusters as leaks.
            self.autoclear = 0;
            self.write_header()?;
            self.st.sync().map_err(io_err("syncing".into()))?;
        }
        if self.g.lazy_refcounts
            && !self.set_dirty
            && self.incompatible & header::INCOMPAT_DIRTY == 0
        {
            self.incompatible |= header::INCOMPAT_DIRTY;
            self.set_dirty = true;
            self.write_header()?;
            self.st.sync().map_err(io_err("syncing".into()))?;
        }
        Ok(())
    }

    /// L2 table for guest cluster `gc`, allocated or copied so it may be written.
    fn l2_for_write(&mut self, gc: u64) -> Result<(u64, u64)> {
        let cs = self.g.cs;
        let l1i = (gc / self.g.l2_entries) as usize;
        let idx = gc % self.g.l2_entries;
        let l1e = *self.l1.get(l1i).ok_or_else(|| {
            Error::invalid(format!("qcow2 guest cluster {gc} lies beyond the L1 table"))
        })?;
        let off = l1e & L1E_OFFSET_MASK;
        if off == 0 {
            let new = self.alloc_one()?;
            self.insert_l2(new, vec![0; (cs / 8) as usize], true)?;
            self.l1[l1i] = new | OFLAG_COPIED;
            self.l1_dirty = true;
            return Ok((new, idx));
        }
        if l1e & OFLAG_COPIED != 0 {
            return Ok((off, idx));
        }
        if self.rc_get(off)? == 1 {
            self.l1[l1i] = off | OFLAG_COPIED;
            self.l1_dirty = true;
            return Ok((off, idx));
        }
        // Shared with a snapshot: copy the table.
        self.load_l2(off)?;
        let data = self
            .l2
            .get(&off)
            .map(|c| c.data.clone())
            .ok_or_else(|| Error::invalid("L2 table vanished from the cache"))?;
        let new = self.alloc_one()?;
        self.insert_l2(new, data, true)?;
        self.pending_free.push(off);
        self.l1[l1i] = new | OFLAG_COPIED;
        self.l1_dirty = true;
        Ok((new, idx))
    }

    /// The current guest contents of cluster `gc` (for copy-on-write of a partial write).
    fn read_cluster(
        &mut self,
        gc: u64,
        entry: u64,
        bitmap: u64,
        backing: Option<&Image>,
    ) -> Result<Vec<u8>> {
        let cs = self.g.cs;
        let mut buf = vec![0u8; cs as usize];
        if entry & OFLAG_COMPRESSED != 0 {
            self.read_compressed_unit(gc * cs, &mut buf)?;
            return Ok(buf);
        }
        let host = entry & L2E_OFFSET_MASK;
        if self.g.extended_l2 {
            // Subcluster by subcluster: zero, allocated here, or from the backing image.
            let sub = cs / SUBCLUSTERS;
            let file_len = self.file_len()?;
            for sc in 0..SUBCLUSTERS {
                let range = (sc * sub) as usize..((sc + 1) * sub) as usize;
                if bitmap & (1 << (32 + sc)) != 0 {
                    continue;
                }
                if bitmap & (1 << sc) != 0 {
                    let at = host + sc * sub;
                    let n = sub.min(file_len.saturating_sub(at)) as usize;
                    self.st
                        .read_at(&mut buf[range.start..range.start + n], at)
                        .map_err(io_err(format!("reading subcluster at {at:#x}")))?;
                } else if let Some(b) = backing {
                    let start = gc * cs + sc * sub;
                    let avail = b.virtual_size().saturating_sub(start).min(sub) as usize;
                    if avail > 0 {
                        b.read_at(&mut buf[range.start..range.start + avail], start)?;
                    }
                }
            }
            return Ok(buf);
        }
        if self.g.version >= 3 && entry & OFLAG_ZERO != 0 {
            return Ok(buf);
        }
        if host != 0 {
            let file_len = self.file_len()?;
            let n = cs.min(file_len.saturating_sub(host)) as usize;
            self.st
                .read_at(&mut buf[..n], host)
                .map_err(io_err(format!("reading cluster at {host:#x}")))?;
            return Ok(buf);
        }
        if let Some(b) = backing {
            let start = gc * cs;
            let avail = b.virtual_size().saturating_sub(start).min(cs) as usize;
            if avail > 0 {
                b.read_at(&mut buf[..avail], start)?;
            }
        }
        Ok(buf)
    }

    fn write(&mut self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        self.begin_write()?;
        let cs = self.g.cs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = ((cs - in_off) as usize).min(buf.len() - done);
            let piece = &buf[done..done + n];
            let (l2off, idx) = self.l2_for_write(gc)?;
            let (e, bitmap) = self.l2_entry(l2off, idx)?;
            let host = e & L2E_OFFSET_MASK;
            let plain = e & OFLAG_COMPRESSED == 0;
            // Whether the written bytes may go straight to the host cluster: not a zero cluster
            // and, with subclusters, every touched subcluster already allocated.
            let in_place = if self.g.extended_l2 {
                let sub = cs / SUBCLUSTERS;
                let first = in_off / sub;
                let last = (in_off + n as u64 - 1) / sub;
                let want = ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1);
                bitmap & want == want && (bitmap >> 32) & want == 0
            } else {
                !(self.g.version >= 3 && e & OFLAG_ZERO != 0)
            };
            let owned = plain && host != 0 && self.rc_get(host)? == 1;
            if owned {
                self.check_no_overlap("data cluster", host, cs)?;
            }
            if owned && in_place {
                self.st
                    .write_at(piece, host + in_off)
                    .map_err(io_err(format!("writing data at {:#x}", host + in_off)))?;
                if e & OFLAG_COPIED == 0 {
                    self.set_l2_entry(l2off, idx, host | OFLAG_COPIED, bitmap)?;
                }
            } else {
                let mut data = if n as u64 == cs {
                    piece.to_vec()
                } else {
                    let mut d = self.read_cluster(gc, e, bitmap, backing)?;
                    d[in_off as usize..in_off as usize + n].copy_from_slice(piece);
                    d
                };
                data.resize(cs as usize, 0);
                let target = if owned { host } else { self.alloc_one()? };
                self.st
                    .write_at(&data, target)
                    .map_err(io_err(format!("writing cluster at {target:#x}")))?;
                let all = self.all_alloc();
                self.set_l2_entry(l2off, idx, target | OFLAG_COPIED, all)?;
                if !owned {
                    self.release(e)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// `declared_backing`: the image names a backing file (opened or not), so unallocated
    /// clusters are not known to read as zeroes.
    fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        backing: Option<&Image>,
        declared_backing: bool,
    ) -> Result<()> {
        self.begin_write()?;
        let shows_through = backing.is_some() || declared_backing;
        let cs = self.g.cs;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::usage("offset overflow"))?;
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            let l1i = gc / self.g.l2_entries;
            let no_table = self
                .l1
                .get(l1i as usize)
                .is_none_or(|e| e & L1E_OFFSET_MASK == 0);
            if no_table && !shows_through {
                // Nothing is allocated in this L2 range and nothing shows through: already zero.
                let range_end = (l1i + 1) * self.g.l2_entries * cs;
                pos = range_end.min(end).max(pos + n);
                continue;
            }
            // A whole cluster, or the partial last cluster of the image.
            let whole = in_off == 0 && (n == cs || pos + n >= self.size);
            if !whole {
                let z = vec![0u8; n as usize];
                self.write(&z, pos, backing)?;
                pos += n;
                continue;
            }
            if self.g.version >= 3 {
                let (l2off, idx) = self.l2_for_write(gc)?;
                let (e, _) = self.l2_entry(l2off, idx)?;
                if self.g.extended_l2 {
                    self.set_l2_entry(l2off, idx, 0, BITMAP_ALL_ZERO)?;
                } else {
                    self.set_l2_entry(l2off, idx, OFLAG_ZERO, 0)?;
                }
                self.release(e)?;
            } else if !shows_through {
                if self.lookup(gc)?.is_some() {
                    let (l2off, idx) = self.l2_for_write(gc)?;
                    let (e, _) = self.l2_entry(l2off, idx)?;
                    self.set_l2_entry(l2off, idx, 0, 0)?;
                    self.release(e)?;
                }
            } else {
                let z = vec![0u8; n as usize];
                self.write(&z, pos, backing)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.begin_write()?;
        let cs = self.g.cs;
        if offset % cs != 0 {
            return Err(Error::usage(format!(
                "compressed write at {offset} is not cluster-aligned"
            )));
        }
        let len = data.len() as u64;
        if len == 0 || len > cs {
            return Err(Error::usage(format!(
                "compressed cluster of {len} bytes does not fit a {cs}-byte cluster"
            )));
        }
        let gc = offset / cs;
        let (l2off, idx) = self.l2_for_write(gc)?;
        let (old, _) = self.l2_entry(l2off, idx)?;
        let tail_cluster = self.ctail / cs * cs;
        let reuse = self.ctail % cs != 0
            && tail_cluster + cs == self.end
            && self.rc_get(tail_cluster)? < refcount::max(self.g.refcount_order);
        let start = if reuse { self.ctail } else { self.end };
        let stop = start + len;
        let first = start / cs * cs;
        let last = (stop - 1) / cs * cs;
        if reuse {
            if last > first {
                let got = self.alloc((last - first) / cs)?;
                if got != first + cs {
                    return Err(Error::invalid("compressed allocation lost contiguity"));
                }
            }
            self.rc_add(first, 1)?;
        } else {
            let got = self.alloc((last - first) / cs + 1)?;
            if got != first {
                return Err(Error::invalid("compressed allocation lost contiguity"));
            }
        }
        self.st
            .write_at(data, start)
            .map_err(io_err(format!("writing compressed cluster at {start:#x}")))?;
        let sectors = (stop - 1) / SECTOR - start / SECTOR;
        let entry = OFLAG_COMPRESSED | (sectors << self.g.csize_shift()) | start;
        // Compressed clusters carry no subcluster bitmap (spec: must be zero).
        self.set_l2_entry(l2off, idx, entry, 0)?;
        self.release(old)?;
        let next = stop.div_ceil(SECTOR) * SECTOR;
        self.ctail = if next % cs == 0 { 0 } else { next };
        Ok(())
    }

    fn preallocate(&mut self, mode: &str) -> Result<()> {
        let cs = self.g.cs;
        let clusters = self.size.div_ceil(cs);
        for gc in 0..clusters {
            let (l2off, idx) = self.l2_for_write(gc)?;
            let host = self.alloc(1)?;
            let all = self.all_alloc();
            self.set_l2_entry(l2off, idx, host | OFLAG_COPIED, all)?;
        }
        let end = self.end;
        let len = self.file_len()?;
        if mode == "full" && end > len {
            crate::storage::write_zero_bytes(self.st.as_ref(), len, end - len)
                .map_err(io_err("preallocating".into()))?;
        } else if end > len {
            self.st
                .set_len(end)
                .map_err(io_err("preallocating".into()))?;
        }
        Ok(())
    }

    fn resize(&mut self, new_size: u64) -> Result<()> {
        self.begin_write()?;
        let cs = self.g.cs;
        if new_size < self.size {
            let mut off = new_size;
            while off < self.size {
                let (p, n) = self.map(off, self.size - off)?;
                // Zero clusters hold nothing to lose.
                if !matches!(p, Piece::Unallocated | Piece::Zero) {
                    return Err(Error::usage(format!(
                        "cannot shrink to {new_size}: guest offset {off} is allocated"
                    )));
                }
                off += n;
            }
            self.size = new_size;
            self.header_dirty = true;
            return Ok(());
        }
        let per_l1 = self.g.l2_entries * cs;
        let needed = new_size.div_ceil(per_l1);
        if needed * 8 > MAX_L1_SIZE {
            return Err(Error::limit(format!(
                "size {new_size} needs an L1 table larger than {MAX_L1_SIZE} bytes"
            )));
        }
        let cur = self.l1.len() as u64;
        if needed > cur {
            let old_clusters = (cur * 8).div_ceil(cs);
            let new_clusters = (needed * 8).div_ceil(cs);
            if new_clusters > old_clusters || self.l1_offset == 0 {
                let old = self.l1_offset;
                let new = self.alloc(new_clusters)?;
                self.l1_offset = new;
                if old != 0 {
                    for k in 0..old_clusters {
                        self.pending_free.push(old + k * cs);
                    }
                }
            }
            self.l1.resize(needed as usize, 0);
            self.l1_dirty = true;
        }
        self.size = new_size;
        self.header_dirty = true;
        Ok(())
    }

    // ----- flushing -----

    fn write_refcounts(&mut self) -> Result<()> {
        let dirty: Vec<u64> = self
            .rb
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(k, _)| *k)
            .collect();
        for off in dirty {
            self.write_rb(off)?;
        }
        if self.reftable_dirty {
            self.st
                .write_at(&u64s_to_bytes(&self.reftable), self.reftable_offset)
                .map_err(io_err("writing refcount table".into()))?;
            self.reftable_dirty = false;
        }
        Ok(())
    }

    fn write_header(&mut self) -> Result<()> {
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
        fields[4..].copy_from_slice(&self.l1_offset.to_be_bytes());
        let w = |buf: &[u8], at: u64| {
            self.st
                .write_at(buf, at)
                .map_err(io_err("writing qcow2 header".into()))
        };
        w(&self.size.to_be_bytes(), header::OFF_SIZE)?;
        w(&fields, header::OFF_L1)?;
        let mut rt = [0u8; 12];
        rt[..8].copy_from_slice(&self.reftable_offset.to_be_bytes());
        let rt_clusters = (self.reftable.len() as u64 * 8).div_ceil(self.g.cs) as u32;
        rt[8..].copy_from_slice(&rt_clusters.to_be_bytes());
        w(&rt, header::OFF_REFTABLE)?;
        if self.g.version >= 3 {
            w(&self.incompatible.to_be_bytes(), header::OFF_INCOMPAT)?;
            w(&self.autoclear.to_be_bytes(), header::OFF_AUTOCLEAR)?;
        }
        self.header_dirty = false;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.write_refcounts()?;
        let dirty: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(k, _)| *k)
            .collect();
        for off in dirty {
            self.write_l2(off)?;
        }
        if self.l1_dirty {
            self.st
                .write_at(&u64s_to_bytes(&self.l1), self.l1_offset)
                .map_err(io_err("writing L1 table".into()))?;
            self.l1_dirty = false;
        }
        if self.header_dirty {
            self.write_header()?;
        }
        if !self.pending_free.is_empty() {
            // Nothing on disk references these clusters any more.
            self.st.sync().map_err(io_err("syncing".into()))?;
            for c in std::mem::take(&mut self.pending_free) {
                if self.rc_add(c, -1)? == 0 {
                    let _ = self.st.punch_hole(c, self.g.cs);
                    if self.free.len() < MAX_FREE_LIST && c != self.ctail / self.g.cs * self.g.cs {
                        self.free.push(c);
                    }
                }
            }
            self.write_refcounts()?;
        }
        // Keep the file a whole number of sectors: a compressed cluster may end mid-sector.
        let len = self.file_len()?;
        if len % SECTOR != 0 {
            self.st
                .set_len(len.div_ceil(SECTOR) * SECTOR)
                .map_err(io_err("padding file".into()))?;
        }
        self.st.sync().map_err(io_err("syncing".into()))
    }
}

impl Qcow2Driver {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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
        let (p, n) = self.lock().map(offset, len)?;
        let file = usize::from(self.data_file.is_some());
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
            (1, Some(d)) => Ok(d.as_ref()),
            _ => Err(Error::invalid(format!("qcow2 image has no file {index}"))),
        }
    }

    fn read_compressed(&self, unit: u64, out: &mut Vec<u8>) -> Result<()> {
        self.lock().read_compressed_unit(unit, out)
    }

    fn backing(&self) -> Option<&BackingSpec> {
        self.backing.as_ref()
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
        FormatInfo {
            cluster_size: Some(i.g.cs),
            dirty: self.dirty_at_open || i.incompatible & header::INCOMPAT_DIRTY != 0,
            format_specific: serde_json::json!({"type": "qcow2", "data": data}),
            snapshots: self.snapshots.iter().map(|s| s.info.clone()).collect(),
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        self.lock().write(buf, offset, backing)
    }

    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        self.lock()
            .write_zeroes(offset, len, backing, self.backing.is_some())
    }

    fn compressed_writer(&self) -> Option<&dyn CompressedWrite> {
        self.writable.then_some(self as &dyn CompressedWrite)
    }

    fn flush(&self) -> Result<()> {
        self.lock().flush()
    }

    fn close(&self) -> Result<()> {
        let mut i = self.lock();
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
        let mut i = self.lock();
        i.resize(new_size)?;
        i.flush()
    }

    fn check(&self, mode: CheckMode) -> Result<CheckReport> {
        let mut i = self.lock();
        if mode != CheckMode::ReadOnly {
            i.check_writable()?;
        }
        // The check reads tables from the file: cached changes go there first.
        i.flush()?;
        check::check(
            &mut i,
            &self.snapshots,
            self.snapshot_table_len,
            &self.hdr,
            mode,
        )
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
        self.lock().write_compressed(offset, compressed)
    }
}
