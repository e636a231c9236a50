//! QEMU Enhanced Disk (QED), read and write, following qemu's `docs/interop/qed_spec.txt`: the
//! header (`header.rs`), a two-level table (L1 of L2 table offsets, L2 of cluster offsets, both
//! `table_size` clusters of little-endian u64), where an L2 entry of 0 is unallocated (read from
//! the backing file) and 1 is a zero cluster. New clusters and tables are appended at the end of
//! the file (rounded down to whole clusters, as qemu rounds it); data is written first, then the
//! L2 table, then the L1 entry. Like qemu, the first allocating write sets the header's need-check
//! bit, and a clean flush or close clears it; a writable open of an image that has it set runs the
//! consistency check with repair first, as qemu does.

pub mod header;

use crate::check::{CheckMode, CheckReport};
use crate::driver::{BackingSpec, Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, CreateContext, Format, OpenContext, ProbeInput};
use crate::image::Image;
use crate::options::CreateOptions;
use crate::storage::Storage;
use header::Header;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// An L2 entry meaning "reads as zeroes".
const ZERO_CLUSTER: u64 = 1;
/// L2 tables kept in memory.
const L2_CACHE: usize = 32;

/// Probe: the magic; certain when the header is consistent with the file.
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    if !Header::has_magic(input.head) {
        return None;
    }
    Some(match Header::parse(input.head, input.len) {
        Ok(_) => Confidence::Certain,
        Err(_) => Confidence::Weak,
    })
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

fn le64s(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect()
}

fn to_le(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    let file_len = storage.len().map_err(io("reading file size"))?;
    let mut head = vec![0u8; file_len.min(header::HEADER_LEN as u64) as usize];
    storage
        .read_at(&mut head, 0)
        .map_err(io("reading QED header"))?;
    let h = Header::parse(&head, file_len)?;
    let backing = if h.features & header::F_BACKING_FILE != 0 {
        let mut name = vec![0u8; h.backing_filename_size as usize];
        storage
            .read_at(&mut name, u64::from(h.backing_filename_offset))
            .map_err(io("reading QED backing file name"))?;
        let name = String::from_utf8(name)
            .map_err(|_| Error::invalid("QED backing file name is not UTF-8"))?;
        let format = (h.features & header::F_BACKING_FORMAT_NO_PROBE != 0).then_some(Format::Raw);
        Some(BackingSpec { name, format })
    } else {
        None
    };
    let mut raw = vec![0u8; h.table_bytes() as usize];
    storage
        .read_at(&mut raw, h.l1_table_offset)
        .map_err(io("reading QED L1 table"))?;
    let d = QedDriver {
        st: storage,
        writable: ctx.writable,
        backing,
        inner: Mutex::new(Inner {
            end: h.usable_len(file_len),
            h,
            l1: le64s(&raw),
            l2: HashMap::new(),
            dirty_header: false,
        }),
    };
    if ctx.writable && h.features & header::F_NEED_CHECK != 0 {
        let r = d.check(CheckMode::RepairAll)?;
        if r.corruptions > 0 || r.check_errors > 0 {
            return Err(Error::invalid("QED image is corrupted (its check failed)"));
        }
    }
    Ok(Box::new(d))
}

#[derive(Debug)]
struct Inner {
    h: Header,
    /// Where the next cluster goes: the file length rounded down to whole clusters.
    end: u64,
    l1: Vec<u64>,
    l2: HashMap<u64, Vec<u64>>,
    /// The need-check bit is set in the file and must be cleared on a clean flush.
    dirty_header: bool,
}

/// An open QED image.
#[derive(Debug)]
pub struct QedDriver {
    st: Box<dyn Storage>,
    writable: bool,
    backing: Option<BackingSpec>,
    inner: Mutex<Inner>,
}

impl Inner {
    fn cs(&self) -> u64 {
        u64::from(self.h.cluster_size)
    }
    fn l2_shift(&self) -> u32 {
        self.h.cluster_size.trailing_zeros()
    }
    fn l1_shift(&self) -> u32 {
        self.l2_shift() + self.h.table_entries().trailing_zeros()
    }
    fn indexes(&self, off: u64) -> (usize, usize) {
        let l1 = (off >> self.l1_shift()) as usize;
        let l2 = ((off >> self.l2_shift()) & (self.h.table_entries() - 1)) as usize;
        (l1, l2)
    }

    fn l2_table(&mut self, st: &dyn Storage, off: u64) -> Result<&mut Vec<u64>> {
        if !self.l2.contains_key(&off) {
            if !self.h.table_fits(off, self.end) {
                return Err(Error::invalid(format!(
                    "QED L2 table offset {off} is invalid (unaligned, in the header or past the end of the file)"
                )));
            }
            let mut raw = vec![0u8; self.h.table_bytes() as usize];
            st.read_at(&mut raw, off)
                .map_err(io("reading QED L2 table"))?;
            if self.l2.len() >= L2_CACHE {
                self.l2.clear();
            }
            self.l2.insert(off, le64s(&raw));
        }
        self.l2
            .get_mut(&off)
            .ok_or_else(|| Error::invalid("QED L2 cache"))
    }

    /// The L2 entry for guest offset `off` (0 when its table is not allocated).
    fn entry(&mut self, st: &dyn Storage, off: u64) -> Result<u64> {
        let (i1, i2) = self.indexes(off);
        let t = *self
            .l1
            .get(i1)
            .ok_or_else(|| Error::invalid(format!("guest offset {off} beyond the QED L1 table")))?;
        if t == 0 {
            return Ok(0);
        }
        Ok(self.l2_table(st, t)?[i2])
    }

    fn kind(&self, entry: u64, off: u64) -> Result<MapKind> {
        Ok(match entry {
            0 => MapKind::Unallocated,
            ZERO_CLUSTER => MapKind::Zero,
            c if self.h.cluster_ok(c, self.end) => MapKind::Data {
                file: 0,
                offset: c + (off & (self.cs() - 1)),
            },
            c => {
                return Err(Error::invalid(format!(
                    "QED cluster offset {c} for guest offset {off} is invalid"
                )))
            }
        })
    }

    fn alloc(&mut self, clusters: u64) -> u64 {
        let at = self.end;
        self.end += clusters * self.cs();
        at
    }

    fn write_header(&self, st: &dyn Storage) -> Result<()> {
        st.write_at(&self.h.to_bytes(), 0)
            .map_err(io("writing QED header"))
    }

    /// Set the need-check bit before the first metadata change, as qemu does.
    fn mark_dirty(&mut self, st: &dyn Storage) -> Result<()> {
        if !self.dirty_header {
            self.h.features |= header::F_NEED_CHECK;
            self.write_header(st)?;
            st.sync().map_err(io("syncing"))?;
            self.dirty_header = true;
        }
        Ok(())
    }

    /// Point guest cluster `off` at `value`, allocating its L2 table when needed.
    fn set_entry(&mut self, st: &dyn Storage, off: u64, value: u64) -> Result<()> {
        self.mark_dirty(st)?;
        let (i1, i2) = self.indexes(off);
        let mut t = self.l1[i1];
        if t == 0 {
            t = self.alloc(u64::from(self.h.table_size));
            let mut table = vec![0u64; self.h.table_entries() as usize];
            table[i2] = value;
            st.write_at(&to_le(&table), t)
                .map_err(io("writing QED L2 table"))?;
            self.l2.insert(t, table);
            self.l1[i1] = t;
            st.write_at(&t.to_le_bytes(), self.h.l1_table_offset + 8 * i1 as u64)
                .map_err(io("writing QED L1 table"))?;
            return Ok(());
        }
        self.l2_table(st, t)?[i2] = value;
        st.write_at(&value.to_le_bytes(), t + 8 * i2 as u64)
            .map_err(io("writing QED L2 entry"))
    }
}

impl QedDriver {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::usage("qed image is not open for writing"))
        }
    }

    /// The header as it is now.
    pub fn header(&self) -> Header {
        self.lock().h
    }
}

/// Fill `buf` with what guest range `off..` reads as in the parent: the backing image, or zeroes.
fn read_parent(backing: Option<&Image>, buf: &mut [u8], off: u64) -> Result<()> {
    buf.fill(0);
    if let Some(b) = backing {
        let n = b.virtual_size().saturating_sub(off).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut buf[..n], off)?;
        }
    }
    Ok(())
}

impl Driver for QedDriver {
    fn format(&self) -> Format {
        Format::Qed
    }

    fn virtual_size(&self) -> u64 {
        self.lock().h.image_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let mut i = self.lock();
        let cs = i.cs();
        let len = len.min(i.h.image_size.saturating_sub(offset)).max(1);
        let limit = offset.saturating_add(len);
        let first = i.entry(self.st.as_ref(), offset)?;
        let kind = i.kind(first, offset)?;
        let mut end = ((offset / cs) + 1) * cs;
        while end < limit {
            let e = i.entry(self.st.as_ref(), end)?;
            let next = i.kind(e, end)?;
            let same = match (kind, next) {
                (MapKind::Data { offset: a, .. }, MapKind::Data { offset: b, .. }) => {
                    b == a + (end - offset)
                }
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            end += cs;
        }
        Ok(Mapping {
            start: offset,
            len: end.min(limit) - offset,
            kind,
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.st.as_ref()),
            _ => Err(Error::invalid(format!("qed image has no file {index}"))),
        }
    }

    fn backing(&self) -> Option<&BackingSpec> {
        self.backing.as_ref()
    }

    /// As qemu's `bdrv_qed_co_change_backing_file`: the name follows the 64-byte header and must
    /// fit the header clusters; a raw backing format sets the no-probe feature.
    fn set_backing(&self, backing: Option<&BackingSpec>, _parent: Option<&Image>) -> Result<()> {
        self.check_writable()?;
        let mut i = self.lock();
        let mut h = i.h;
        h.features &= !(header::F_BACKING_FILE | header::F_BACKING_FORMAT_NO_PROBE);
        let name = backing.map(|b| b.name.as_bytes()).unwrap_or_default();
        if let Some(b) = backing {
            h.features |= header::F_BACKING_FILE;
            if b.format == Some(Format::Raw) {
                h.features |= header::F_BACKING_FORMAT_NO_PROBE;
            }
        }
        if header::HEADER_LEN as u64 + name.len() as u64 > h.header_bytes()
            || name.len() as u64 > u64::from(header::MAX_BACKING_NAME)
        {
            return Err(Error::usage(
                "QED backing file name does not fit the image's header",
            ));
        }
        h.backing_filename_offset = header::HEADER_LEN as u32;
        h.backing_filename_size = name.len() as u32;
        let mut buf = h.to_bytes().to_vec();
        buf.extend_from_slice(name);
        self.st
            .write_at(&buf, 0)
            .map_err(io("writing QED header"))?;
        self.st.sync().map_err(io("syncing"))?;
        i.h = h;
        Ok(())
    }

    fn info(&self) -> FormatInfo {
        let i = self.lock();
        FormatInfo {
            cluster_size: Some(i.cs()),
            dirty: false,
            ..FormatInfo::default()
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        self.check_writable()?;
        let st = self.st.as_ref();
        let mut i = self.lock();
        let cs = i.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let start = pos & !(cs - 1);
            let within = (pos - start) as usize;
            let n = (buf.len() - done).min(cs as usize - within);
            let piece = &buf[done..done + n];
            let e = i.entry(st, pos)?;
            match i.kind(e, pos)? {
                MapKind::Data { offset: host, .. } => {
                    st.write_at(piece, host).map_err(io("writing QED data"))?;
                }
                kind => {
                    let mut cluster = vec![0u8; cs as usize];
                    if n < cs as usize && kind == MapKind::Unallocated {
                        let avail = i.h.image_size.saturating_sub(start).min(cs) as usize;
                        read_parent(backing, &mut cluster[..avail], start)?;
                    }
                    cluster[within..within + n].copy_from_slice(piece);
                    i.mark_dirty(st)?;
                    let at = i.alloc(1);
                    st.write_at(&cluster, at).map_err(io("writing QED data"))?;
                    i.set_entry(st, pos, at)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        self.check_writable()?;
        let st = self.st.as_ref();
        let cs = self.lock().cs();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let start = pos & !(cs - 1);
            let n = (end - pos).min(start + cs - pos);
            if n < cs {
                let zero = vec![0u8; n as usize];
                self.write_at(&zero, pos, backing)?;
            } else {
                let mut i = self.lock();
                let e = i.entry(st, pos)?;
                match i.kind(e, pos)? {
                    MapKind::Data { offset: host, .. } => {
                        st.write_at(&vec![0u8; cs as usize], host)
                            .map_err(io("writing QED data"))?;
                    }
                    MapKind::Zero => {}
                    MapKind::Unallocated if backing.is_none() && self.backing.is_none() => {}
                    _ => i.set_entry(st, pos, ZERO_CLUSTER)?,
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut i = self.lock();
        // The file must reach the allocation end even where a cluster was never written.
        let len = self.st.len().map_err(io("reading file size"))?;
        if len < i.end {
            self.st.set_len(i.end).map_err(io("extending QED file"))?;
        }
        self.st.sync().map_err(io("syncing"))?;
        if i.dirty_header {
            i.h.features &= !header::F_NEED_CHECK;
            i.write_header(self.st.as_ref())?;
            self.st.sync().map_err(io("syncing"))?;
            i.dirty_header = false;
        }
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let mut i = self.lock();
        if new_size % 512 != 0
            || new_size > header::max_image_size(i.h.cluster_size, i.h.table_size)
        {
            return Err(Error::usage(format!(
                "invalid QED image size {new_size} (a multiple of 512 up to {})",
                header::max_image_size(i.h.cluster_size, i.h.table_size)
            )));
        }
        if new_size < i.h.image_size {
            return Err(Error::unsupported("shrinking QED images"));
        }
        i.h.image_size = new_size;
        i.write_header(self.st.as_ref())?;
        self.st.sync().map_err(io("syncing"))
    }

    fn check(&self, mode: CheckMode) -> Result<CheckReport> {
        let fix = mode == CheckMode::RepairAll && self.writable;
        let st = self.st.as_ref();
        let mut i = self.lock();
        let cs = i.cs();
        let nclusters = i.end / cs;
        // One bit per host cluster, as qemu's check keeps it.
        let mut used = Bitmap(vec![
            0u64;
            usize::try_from(nclusters.div_ceil(64)).unwrap_or(0)
        ]);
        let mut r = CheckReport {
            total_clusters: Some(i.h.image_size.div_ceil(cs)),
            ..CheckReport::default()
        };
        let mut allocated = 0u64;
        let mut fragmented = 0u64;
        let mark = |used: &mut Bitmap, r: &mut CheckReport, off: u64, n: u64| {
            let mut ok = true;
            for c in off / cs..off / cs + n {
                if used.set(c) {
                    r.corruptions += 1;
                    ok = false;
                }
            }
            ok
        };
        let ts = u64::from(i.h.table_size);
        mark(&mut used, &mut r, i.h.l1_table_offset, ts);
        let mut l1_fixed = false;
        for k in 0..i.l1.len() {
            let t = i.l1[k];
            if t == 0 {
                continue;
            }
            if !i.h.table_fits(t, i.end) {
                if fix {
                    i.l1[k] = 0;
                    r.corruptions_fixed += 1;
                    l1_fixed = true;
                } else {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR L1 entry {k} points at invalid table offset {t}"
                    ));
                }
                continue;
            }
            if !mark(&mut used, &mut r, t, ts) {
                continue;
            }
            let end = i.end;
            let h = i.h;
            let table = i.l2_table(st, t)?;
            let mut last = 0u64;
            let mut fixed = false;
            for e in table.iter_mut() {
                if *e == 0 || *e == ZERO_CLUSTER {
                    continue;
                }
                allocated += 1;
                if last != 0 && last.checked_add(cs) != Some(*e) {
                    fragmented += 1;
                }
                last = *e;
                if !h.cluster_ok(*e, end) {
                    if fix {
                        *e = 0;
                        r.corruptions_fixed += 1;
                        fixed = true;
                    } else {
                        r.corruptions += 1;
                    }
                    continue;
                }
                if used.set(*e / cs) {
                    r.corruptions += 1;
                }
            }
            if fixed {
                let bytes = to_le(table);
                st.write_at(&bytes, t).map_err(io("writing QED L2 table"))?;
            }
        }
        if l1_fixed {
            let bytes = to_le(&i.l1);
            st.write_at(&bytes, i.h.l1_table_offset)
                .map_err(io("writing QED L1 table"))?;
        }
        let first = u64::from(i.h.header_size);
        r.leaks = (first..nclusters).filter(|&c| !used.get(c)).count() as u64;
        if r.leaks > 0 {
            r.messages.push(format!(
                "{} leaked clusters were found on the image.",
                r.leaks
            ));
        }
        r.allocated_clusters = Some(allocated);
        r.fragmented_clusters = Some(fragmented);
        r.image_end_offset = Some(i.end);
        if fix && r.corruptions == 0 && i.h.features & header::F_NEED_CHECK != 0 {
            st.sync().map_err(io("syncing"))?;
            i.h.features &= !header::F_NEED_CHECK;
            i.write_header(st)?;
            i.dirty_header = false;
        }
        Ok(r)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A set of host cluster numbers.
struct Bitmap(Vec<u64>);

impl Bitmap {
    /// Mark cluster `c`; true when it was marked already. Clusters past the end are ignored.
    fn set(&mut self, c: u64) -> bool {
        match self.0.get_mut((c / 64) as usize) {
            Some(w) => {
                let was = *w & (1 << (c % 64)) != 0;
                *w |= 1 << (c % 64);
                was
            }
            None => false,
        }
    }

    fn get(&self, c: u64) -> bool {
        self.0
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }
}

pub(crate) fn create(
    storage: Box<dyn Storage>,
    _ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    let o = &opts.options;
    let cs = o
        .size("cluster_size")?
        .unwrap_or(u64::from(header::DEFAULT_CLUSTER_SIZE));
    let ts = o
        .u64("table_size")?
        .unwrap_or(u64::from(header::DEFAULT_TABLE_SIZE));
    let mut backing = opts.backing.clone();
    if backing.is_none() {
        if let Some(name) = o.str("backing_file") {
            let format = o.str("backing_fmt").map(|f| f.parse()).transpose()?;
            backing = Some(BackingSpec { name, format });
        } else {
            let _ = o.str("backing_fmt");
        }
    }
    o.finish("qed")?;
    let cs = u32::try_from(cs).unwrap_or(0);
    if !header::pow2_within(cs, header::MIN_CLUSTER_SIZE, header::MAX_CLUSTER_SIZE) {
        return Err(Error::usage(
            "QED cluster size must be within range [4096, 67108864] and power of 2",
        ));
    }
    let ts = u32::try_from(ts).unwrap_or(0);
    if !header::pow2_within(ts, header::MIN_TABLE_SIZE, header::MAX_TABLE_SIZE) {
        return Err(Error::usage(
            "QED table size must be within range [1, 16] and power of 2",
        ));
    }
    if ts == 1 {
        // qemu's L1 offset check rejects a one-cluster table (its end offset equals its start),
        // so qemu cannot open such an image although it creates one.
        return Err(Error::usage(
            "QED table size 1 makes an image qemu cannot open; use 2 or more",
        ));
    }
    let max = header::max_image_size(cs, ts);
    if opts.size % 512 != 0 || opts.size > max {
        return Err(Error::usage(format!(
            "QED image size must be a multiple of 512 and at most {max} bytes"
        )));
    }
    let mut h = Header {
        cluster_size: cs,
        table_size: ts,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: u64::from(cs),
        image_size: opts.size,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let mut name = Vec::new();
    if let Some(b) = &backing {
        name = b.name.as_bytes().to_vec();
        if name.len() as u64 > u64::from(cs) - header::HEADER_LEN as u64 {
            return Err(Error::usage(
                "QED backing file name does not fit the header",
            ));
        }
        h.features |= header::F_BACKING_FILE;
        h.backing_filename_offset = header::HEADER_LEN as u32;
        h.backing_filename_size = name.len() as u32;
        if b.format == Some(Format::Raw) {
            h.features |= header::F_BACKING_FORMAT_NO_PROBE;
        }
    }
    storage
        .write_at(&h.to_bytes(), 0)
        .map_err(io("writing QED header"))?;
    storage
        .write_at(&name, header::HEADER_LEN as u64)
        .map_err(io("writing QED backing file name"))?;
    let l1 = vec![0u8; h.table_bytes() as usize];
    storage
        .write_at(&l1, h.l1_table_offset)
        .map_err(io("writing QED L1 table"))?;
    let end = h.l1_table_offset + h.table_bytes();
    Ok(Box::new(QedDriver {
        st: storage,
        writable: true,
        backing,
        inner: Mutex::new(Inner {
            h,
            end,
            l1: vec![0; h.table_entries() as usize],
            l2: HashMap::new(),
            dirty_header: false,
        }),
    }))
}
