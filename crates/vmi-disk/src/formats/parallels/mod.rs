//! Parallels disk images, read and write (qemu `docs/interop/parallels.txt`; semantics of qemu's
//! `block/parallels.c` and `block/parallels-ext.c`; see `docs/formats/parallels.md`).
//!
//! An image is a 64-byte header ([`header`]), a block allocation table (BAT) of 32-bit entries
//! (one per guest cluster: 0 unallocated, else the host offset in sectors for v1 images or in
//! clusters for v2 images), and the data area. A write to an unallocated cluster takes the first
//! unused host cluster of the data area (a hole left by a discard) or appends one, writes the data,
//! then the BAT entry. While an image is open for writing its header carries the in-use mark; a
//! clean close clears it and trims unused space at the end of the file, as qemu does.
//!
//! An image found inconsistent on a writable open (in-use mark left by a crash, a bad data
//! offset, BAT entries outside the file, two entries naming one host cluster) is repaired the way
//! qemu repairs it on open — but only before the first write or at close, so that `check` run on
//! the open image still reports what was wrong. The optional format extension ([`ext`], dirty
//! bitmaps) is validated on read-only opens exactly where qemu validates it; writable opens keep
//! qemu's behaviour of ignoring it, except that vmi never hands its clusters out for new data.

mod ext;
pub(crate) mod header;

pub use ext::DirtyBitmap;

use crate::check::{CheckMode, CheckReport};
use crate::driver::{Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, CreateContext, Format, OpenContext, ProbeInput};
use crate::image::Image;
use crate::options::CreateOptions;
use crate::storage::Storage;
use ext::Extension;
use header::{
    bat_entry_off, Layout, RawHeader, DEFAULT_CLUSTER_SIZE, HEADER_LEN, HEADER_VERSION, HEADS,
    INUSE_MAGIC, MAGIC_V1, MAGIC_V2, MAX_BAT_ENTRIES, MAX_IMAGE_FACTOR, MAX_TRACKS, SECTOR,
    SEC_IN_CYL,
};
use std::any::Any;
use std::sync::{Mutex, MutexGuard};
use zerocopy::IntoBytes;

/// Most BAT entries one `map` call walks when merging clusters, so one call stays cheap.
const MAX_MAP_CLUSTERS: u64 = 1 << 16;
/// Most host clusters the allocation bitmap of a writable image tracks (one bit each: 32 MiB).
/// qemu sizes the same bitmap by the file; a larger (sparse, hostile) file is refused for writing.
const MAX_TRACKED_CLUSTERS: u64 = 1 << 28;
/// Bytes copied per step when completing a new cluster from a backing image.
const COPY_CHUNK: u64 = 1 << 20;

/// `probe`: either magic and version 2 in a whole header is certain (qemu's `parallels_probe`);
/// a magic with another version is weak, so that opening fails clearly instead of reading raw.
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    let magic = input.head.get(..16)?;
    if magic != MAGIC_V1 && magic != MAGIC_V2 {
        return None;
    }
    let version = input
        .head
        .get(16..20)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    if version == Some(HEADER_VERSION) && input.head.len() >= HEADER_LEN {
        Some(Confidence::Certain)
    } else {
        Some(Confidence::Weak)
    }
}

/// Which host clusters of the data area hold something (writable images only).
#[derive(Debug, Default)]
struct UsedMap {
    words: Vec<u64>,
    len: u64,
    /// No clear bit below this index.
    hint: u64,
}

impl UsedMap {
    fn with_len(len: u64) -> Result<Self> {
        if len > MAX_TRACKED_CLUSTERS {
            return Err(Error::limit(format!(
                "Parallels data area spans {len} clusters, more than the {MAX_TRACKED_CLUSTERS} \
                 vmi tracks for writing"
            )));
        }
        Ok(UsedMap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            hint: 0,
        })
    }
    fn get(&self, i: u64) -> bool {
        i < self.len
            && self
                .words
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: u64, on: bool) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            if on {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
                self.hint = self.hint.min(i);
            }
        }
    }
    fn push(&mut self) -> Result<u64> {
        let i = self.len;
        if i >= MAX_TRACKED_CLUSTERS {
            return Err(Error::limit(format!(
                "Parallels data area would exceed {MAX_TRACKED_CLUSTERS} clusters"
            )));
        }
        self.len += 1;
        if self.words.len() < self.len.div_ceil(64) as usize {
            self.words.push(0);
        }
        Ok(i)
    }
    /// The first clear bit, if any.
    fn first_free(&mut self) -> Option<u64> {
        let mut i = self.hint;
        while i < self.len {
            let w = self
                .words
                .get((i / 64) as usize)
                .copied()
                .unwrap_or(u64::MAX);
            if w == u64::MAX {
                i = (i / 64 + 1) * 64;
                continue;
            }
            if w & (1 << (i % 64)) == 0 {
                self.hint = i;
                return Some(i);
            }
            i += 1;
        }
        self.hint = self.len;
        None
    }
}

/// Mutable metadata, behind the driver's lock.
#[derive(Debug)]
struct State {
    layout: Layout,
    bat: Vec<u32>,
    /// The in-use mark was found set and has not been repaired.
    unclean: bool,
    /// Host file length, as far as this driver has seen or made it.
    file_len: u64,
    /// Allocation bitmap (writable opens).
    used: UsedMap,
    /// An inconsistency was found on a writable open: repair before writing or at close.
    needs_repair: bool,
    /// The format extension, when present and valid.
    ext: Option<Extension>,
}

/// An open Parallels image.
#[derive(Debug)]
pub struct ParallelsDriver {
    storage: Box<dyn Storage>,
    writable: bool,
    /// Bytes per cluster (fixed for the image's life).
    cluster_size: u64,
    state: Mutex<State>,
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    Ok(Box::new(ParallelsDriver::open(storage, ctx.writable)?))
}

/// Read the BAT (its extent was checked against the file and [`MAX_BAT_ENTRIES`]).
fn read_bat(storage: &dyn Storage, entries: u32) -> Result<Vec<u32>> {
    let at = HEADER_LEN as u64;
    crate::storage::read_le_u32_table(storage, at, entries as usize)
        .map_err(|e| Error::io(format!("reading Parallels BAT at {at:#x}"), e))
}

pub(crate) fn create(
    storage: Box<dyn Storage>,
    _ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    if opts.backing.is_some() {
        return Err(Error::usage(
            "parallels images cannot record a backing file",
        ));
    }
    let cs = opts
        .options
        .size("cluster_size")?
        .unwrap_or(DEFAULT_CLUSTER_SIZE);
    if let Some(p) = opts
        .options
        .choice("preallocation", &["off", "falloc", "full"])?
    {
        if p != "off" {
            return Err(Error::usage(format!(
                "parallels preallocation={p} is not supported"
            )));
        }
    }
    opts.options.finish("parallels")?;
    // qemu silently rounds both sizes up to whole sectors.
    let size = opts.size.div_ceil(SECTOR) * SECTOR;
    let cs = cs.div_ceil(SECTOR) * SECTOR;
    if cs == 0 || cs / SECTOR > u64::from(MAX_TRACKS) {
        return Err(Error::usage(format!(
            "parallels cluster_size {cs}: must be between 512 bytes and {} bytes",
            u64::from(MAX_TRACKS) * SECTOR
        )));
    }
    if size >= MAX_IMAGE_FACTOR * cs {
        return Err(Error::usage(format!(
            "image size {size} is too large for cluster size {cs}"
        )));
    }
    let bat_entries = u32::try_from(size.div_ceil(cs))
        .ok()
        .filter(|&n| n <= MAX_BAT_ENTRIES)
        .ok_or_else(|| {
            Error::usage(format!(
                "a {size}-byte parallels image needs too large a BAT"
            ))
        })?;
    let bat_bytes = bat_entry_off(bat_entries).div_ceil(cs) * cs;
    let tracks = (cs / SECTOR) as u32;
    let data_off = u32::try_from(bat_bytes / SECTOR)
        .map_err(|_| Error::usage("parallels BAT too large for the header's data offset"))?;
    let cylinders = (size / SECTOR / u64::from(HEADS) / SEC_IN_CYL).min(u64::from(u32::MAX));
    let h = RawHeader {
        magic: *MAGIC_V2,
        version: HEADER_VERSION.into(),
        heads: HEADS.into(),
        cylinders: (cylinders as u32).into(),
        tracks: tracks.into(),
        bat_entries: bat_entries.into(),
        nb_sectors: (size / SECTOR).into(),
        inuse: 0.into(),
        data_off: data_off.into(),
        flags: 0.into(),
        ext_off: 0.into(),
    };
    let io = |e| Error::io("writing Parallels header", e);
    storage.set_len(bat_bytes).map_err(io)?;
    storage.write_at(h.as_bytes(), 0).map_err(io)?;
    Ok(Box::new(ParallelsDriver::open(storage, true)?))
}

impl ParallelsDriver {
    fn open(storage: Box<dyn Storage>, writable: bool) -> Result<Self> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading file size", e))?;
        let mut hb = [0u8; HEADER_LEN];
        if file_len < HEADER_LEN as u64 {
            return Err(Error::invalid(format!(
                "file is {file_len} bytes, shorter than the {HEADER_LEN}-byte Parallels header"
            )));
        }
        storage
            .read_at(&mut hb, 0)
            .map_err(|e| Error::io("reading Parallels header", e))?;
        let layout = RawHeader::parse(&hb)?.validate(file_len)?;
        let bat = read_bat(storage.as_ref(), layout.bat_entries)?;
        let ext = match (layout.ext_off, writable) {
            (0, _) => None,
            // qemu validates the extension on read-only opens only, and fails them on any fault.
            (_, false) => Some(ext::read(storage.as_ref(), &layout, file_len)?),
            // ... and ignores it when writing; vmi keeps a valid one out of allocation's way.
            (_, true) => ext::read(storage.as_ref(), &layout, file_len).ok(),
        };
        let driver = ParallelsDriver {
            storage,
            writable,
            cluster_size: layout.cluster_size,
            state: Mutex::new(State {
                unclean: layout.unclean,
                layout,
                bat,
                file_len,
                used: UsedMap::default(),
                needs_repair: false,
                ext,
            }),
        };
        if writable {
            let mut st = driver.lock();
            let duplicates = driver.rebuild_used(&mut st)?;
            let outside = (0..st.bat.len()).any(|i| driver.entry_outside(&st, i));
            st.needs_repair = st.unclean || !st.layout.data_off_ok || outside || duplicates;
            // Mark the image in use, as qemu does on a writable open.
            driver.write_inuse(INUSE_MAGIC)?;
            drop(st);
        }
        Ok(driver)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dirty bitmaps the format extension declares (empty without one).
    pub fn dirty_bitmaps(&self) -> Vec<DirtyBitmap> {
        self.lock()
            .ext
            .as_ref()
            .map(|e| e.bitmaps.clone())
            .unwrap_or_default()
    }

    fn write_inuse(&self, value: u32) -> Result<()> {
        let io = |e| Error::io("writing the Parallels in-use mark", e);
        self.storage
            .write_at(&value.to_le_bytes(), 0x2c)
            .map_err(io)?;
        self.storage.sync().map_err(io)
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::usage("image is not open for writing"))
        }
    }

    /// Exclusive end of the data area as qemu sees it: the file length rounded up to a whole
    /// cluster past the data start.
    fn data_end(&self, st: &State) -> u64 {
        let ds = st.layout.data_start_bytes();
        ds + st.file_len.saturating_sub(ds).div_ceil(self.cluster_size) * self.cluster_size
    }

    /// Whether BAT entry `i` names a cluster outside the file or over the header and BAT.
    fn entry_outside(&self, st: &State, i: usize) -> bool {
        match st.bat.get(i) {
            Some(&e) if e != 0 => {
                let off = st.layout.entry_offset(e);
                off < st.layout.data_start_bytes() || off + self.cluster_size > st.file_len
            }
            _ => false,
        }
    }

    /// Host cluster index of host offset `off` in the data area, if it is in it.
    fn host_index(&self, st: &State, off: u64) -> Option<u64> {
        off.checked_sub(st.layout.data_start_bytes())
            .map(|d| d / self.cluster_size)
    }

    /// Rebuild the allocation bitmap from the BAT (and the extension); returns whether two
    /// entries name one host cluster.
    fn rebuild_used(&self, st: &mut State) -> Result<bool> {
        let ds = st.layout.data_start_bytes();
        let len = st.file_len.saturating_sub(ds).div_ceil(self.cluster_size);
        let mut used = UsedMap::with_len(len)?;
        let mut dup = false;
        for &e in st.bat.iter().filter(|&&e| e != 0) {
            if let Some(i) = self.host_index(st, st.layout.entry_offset(e)) {
                if i < len {
                    dup |= used.get(i);
                    used.set(i, true);
                }
            }
        }
        if let Some(ext) = &st.ext {
            let cs = self.cluster_size;
            let mut mark = |off: u64| {
                if let Some(i) = off.checked_sub(ds).map(|d| d / cs) {
                    used.set(i, true);
                }
            };
            mark(st.layout.ext_off * SECTOR);
            for bm in &ext.bitmaps {
                for &e in bm.l1.iter().filter(|&&e| e > 1) {
                    mark(e * SECTOR);
                }
            }
        }
        st.used = used;
        Ok(dup)
    }

    /// What guest cluster `c` maps to: its host offset, or `None` when unallocated (an entry
    /// outside the data area reads as unallocated, as in current qemu).
    fn cluster_host(&self, st: &State, c: u64) -> Option<u64> {
        let e = *st.bat.get(usize::try_from(c).ok()?)?;
        if e == 0 {
            return None;
        }
        let off = st.layout.entry_offset(e);
        (off >= st.layout.data_start_bytes() && off + self.cluster_size <= self.data_end(st))
            .then_some(off)
    }

    fn set_entry(&self, st: &mut State, c: u64, entry: u32) -> Result<()> {
        let idx = u32::try_from(c)
            .ok()
            .filter(|&i| (i as usize) < st.bat.len())
            .ok_or_else(|| Error::invalid(format!("guest cluster {c} has no BAT entry")))?;
        let at = bat_entry_off(idx);
        self.storage
            .write_at(&entry.to_le_bytes(), at)
            .map_err(|e| Error::io(format!("writing Parallels BAT entry at {at:#x}"), e))?;
        st.bat[idx as usize] = entry;
        Ok(())
    }

    /// Take a host cluster for new data: the first unused one, else a new one at the end of the
    /// data area. Returns its offset and whether it lies inside the existing file.
    fn take_host_cluster(&self, st: &mut State) -> Result<(u64, bool)> {
        let i = match st.used.first_free() {
            Some(i) => i,
            None => st.used.push()?,
        };
        let host = i
            .checked_mul(self.cluster_size)
            .and_then(|o| o.checked_add(st.layout.data_start_bytes()))
            .ok_or_else(|| Error::limit("Parallels data area offset overflows"))?;
        Ok((host, host < st.file_len))
    }

    /// The BAT entry naming host offset `host`.
    fn entry_for(&self, st: &State, host: u64) -> Result<u32> {
        let unit = st.layout.off_multiplier * SECTOR;
        u32::try_from(host / unit)
            .ok()
            .filter(|_| host % unit == 0)
            .ok_or_else(|| {
                Error::limit(format!(
                    "host offset {host:#x} cannot be named by a Parallels BAT entry"
                ))
            })
    }

    /// Allocate guest cluster `c` and store `data` at `within` in it; the rest of the cluster is
    /// completed from `backing` or zeroes. Data first, then the BAT entry.
    fn allocate(
        &self,
        st: &mut State,
        c: u64,
        within: u64,
        data: &[u8],
        backing: Option<&Image>,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let (host, inside) = self.take_host_cluster(st)?;
        let entry = self.entry_for(st, host)?;
        let io = |e| Error::io(format!("writing Parallels cluster at {host:#x}"), e);
        let end = host + cs;
        if end > st.file_len {
            self.storage.set_len(end).map_err(io)?;
            st.file_len = end;
        }
        let whole = within == 0 && data.len() as u64 == cs;
        if !whole {
            if let Some(b) = backing {
                let guest = c * cs;
                let mut done = 0;
                let mut buf = vec![0u8; COPY_CHUNK.min(cs) as usize];
                while done < cs {
                    let n = (cs - done).min(COPY_CHUNK) as usize;
                    let chunk = &mut buf[..n];
                    let at = guest + done;
                    let avail = b.virtual_size().saturating_sub(at).min(n as u64) as usize;
                    chunk.fill(0);
                    if avail > 0 {
                        b.read_at(&mut chunk[..avail], at)?;
                    }
                    self.storage.write_at(chunk, host + done).map_err(io)?;
                    done += n as u64;
                }
            } else if inside {
                self.storage.write_zeroes(host, cs).map_err(io)?;
            }
        }
        self.storage.write_at(data, host + within).map_err(io)?;
        if let Some(i) = self.host_index(st, host) {
            st.used.set(i, true);
        }
        self.set_entry(st, c, entry)
    }

    /// Split `[offset, offset + len)` into per-cluster pieces: (cluster, within, length, done).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        let cs = self.cluster_size;
        let mut done = 0u64;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = offset + done;
            let within = pos % cs;
            let n = (cs - within).min(len - done);
            let item = (pos / cs, within, n, done);
            done += n;
            Some(item)
        })
    }

    /// Repair everything a writable open found, as qemu does on open.
    fn repair_if_needed(&self, st: &mut State) -> Result<()> {
        if st.needs_repair {
            self.check_locked(st, CheckMode::RepairAll)?;
            st.needs_repair = false;
        }
        Ok(())
    }

    /// qemu's `parallels_co_check`: unclean mark, data offset, entries outside the image, space
    /// leaked at the end, duplicate host clusters, then statistics.
    fn check_locked(&self, st: &mut State, mode: CheckMode) -> Result<CheckReport> {
        let fix_errors = mode == CheckMode::RepairAll;
        let fix_leaks = mode != CheckMode::ReadOnly;
        if mode != CheckMode::ReadOnly {
            self.ensure_writable()?;
        }
        let verb = |fix: bool| if fix { "Repairing" } else { "ERROR" };
        let cs = self.cluster_size;
        let mut r = CheckReport::default();
        st.file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("reading file size", e))?;
        // The in-use mark: the image was not closed cleanly.
        if st.unclean {
            r.corruptions += 1;
            r.messages.push(format!(
                "{} image was not closed correctly",
                verb(fix_errors)
            ));
            if fix_errors {
                // Cleared on disk by close.
                st.unclean = false;
                r.corruptions_fixed += 1;
            }
        }
        // The data offset.
        if !st.layout.data_off_ok {
            r.corruptions += 1;
            if fix_errors {
                let v = u32::try_from(st.layout.data_start)
                    .map_err(|_| Error::limit("Parallels data offset does not fit the header"))?;
                self.storage
                    .write_at(&v.to_le_bytes(), 0x30)
                    .map_err(|e| Error::io("writing Parallels data offset", e))?;
                st.layout.data_off_ok = true;
                self.rebuild_used(st)?;
                r.corruptions_fixed += 1;
            }
            r.messages.push(format!(
                "{} data_off field has incorrect value",
                verb(fix_errors)
            ));
        }
        // Entries outside the image.
        let mut fixed = false;
        for i in 0..st.bat.len() {
            if self.entry_outside(st, i) {
                r.corruptions += 1;
                r.messages
                    .push(format!("{} cluster {i} is outside image", verb(fix_errors)));
                if fix_errors {
                    self.set_entry(st, i as u64, 0)?;
                    r.corruptions_fixed += 1;
                    fixed = true;
                }
            }
        }
        if fixed {
            self.rebuild_used(st)?;
        }
        // The end of the data: the last cluster an entry names (qemu 10.0's image end offset).
        let ds = st.layout.data_start_bytes();
        let high = (0..st.bat.len())
            .filter(|&i| st.bat[i] != 0 && !self.entry_outside(st, i))
            .map(|i| st.layout.entry_offset(st.bat[i]))
            .max();
        let mut image_end = high.map_or(ds, |h| h + cs);
        // Space leaked at the end: after the data and the format extension.
        let ext_end = st.ext.as_ref().map_or(0, |e| e.end);
        let end_off = image_end.max(ext_end);
        if end_off < st.file_len {
            let leak = st.file_len - end_off;
            let count = leak.div_ceil(cs);
            r.leaks += count;
            r.messages.push(format!(
                "{} space leaked at the end of the image {leak}",
                verb(fix_leaks)
            ));
            if fix_leaks {
                self.storage
                    .set_len(end_off)
                    .map_err(|e| Error::io("truncating leaked Parallels clusters", e))?;
                st.file_len = end_off;
                self.rebuild_used(st)?;
                r.leaks_fixed += count;
            }
        }
        // Duplicates: later entries naming a host cluster an earlier entry names.
        let limit = image_end.saturating_sub(ds).div_ceil(cs);
        let mut named: Vec<(u64, usize)> = st
            .bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != 0)
            .filter_map(|(i, &e)| Some((self.host_index(st, st.layout.entry_offset(e))?, i)))
            .filter(|&(h, _)| h < limit)
            .collect();
        named.sort_unstable();
        let mut dups: Vec<usize> = named
            .windows(2)
            .filter(|w| w[0].0 == w[1].0)
            .map(|w| w[1].1)
            .collect();
        dups.sort_unstable();
        for i in dups {
            r.corruptions += 1;
            r.messages.push(format!(
                "{} duplicate offset in BAT entry {i}",
                verb(fix_errors)
            ));
            if fix_errors {
                let old = st.layout.entry_offset(st.bat[i]);
                let mut buf = vec![0u8; COPY_CHUNK.min(cs) as usize];
                let (host, _) = self.take_host_cluster(st)?;
                let entry = self.entry_for(st, host)?;
                if host + cs > st.file_len {
                    self.storage
                        .set_len(host + cs)
                        .map_err(|e| Error::io("extending Parallels image", e))?;
                    st.file_len = host + cs;
                }
                let mut done = 0;
                while done < cs {
                    let n = (cs - done).min(COPY_CHUNK) as usize;
                    self.storage
                        .read_at(&mut buf[..n], old + done)
                        .and_then(|()| self.storage.write_at(&buf[..n], host + done))
                        .map_err(|e| Error::io("copying a duplicated Parallels cluster", e))?;
                    done += n as u64;
                }
                if let Some(h) = self.host_index(st, host) {
                    st.used.set(h, true);
                }
                self.set_entry(st, i as u64, entry)?;
                image_end = image_end.max(host + cs);
                r.corruptions_fixed += 1;
            }
        }
        // Statistics.
        let (mut allocated, mut fragmented, mut prev) = (0u64, 0u64, 0u64);
        for &e in &st.bat {
            let off = st.layout.entry_offset(e);
            if e == 0 || off + cs > image_end {
                prev = 0;
                continue;
            }
            if prev != 0 && prev + cs != off {
                fragmented += 1;
            }
            prev = off;
            allocated += 1;
        }
        let some = |v: u64| (v != 0).then_some(v);
        r.image_end_offset = some(image_end);
        r.total_clusters = some(st.bat.len() as u64);
        r.allocated_clusters = some(allocated);
        r.fragmented_clusters = some(fragmented);
        if mode != CheckMode::ReadOnly {
            self.storage
                .sync()
                .map_err(|e| Error::io("syncing repaired Parallels image", e))?;
        }
        Ok(r)
    }
}

impl Driver for ParallelsDriver {
    fn format(&self) -> Format {
        Format::Parallels
    }

    fn virtual_size(&self) -> u64 {
        self.lock().layout.virtual_size()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let st = self.lock();
        let len = len.min(st.layout.virtual_size().saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let cs = self.cluster_size;
        let c = offset / cs;
        let within = offset % cs;
        let first = self.cluster_host(&st, c);
        let mut covered = (cs - within).min(len);
        let mut next = c + 1;
        while covered < len && next - c <= MAX_MAP_CLUSTERS {
            let continues = match (first, self.cluster_host(&st, next)) {
                (Some(a), Some(b)) => b == a + (next - c) * cs,
                (None, None) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            covered += cs.min(len - covered);
            next += 1;
        }
        let kind = match first {
            None => MapKind::Unallocated,
            Some(host) => {
                let at = host + within;
                // The last cluster may run past the end of the file: that part reads as zeroes.
                if at >= st.file_len {
                    MapKind::Zero
                } else {
                    covered = covered.min(st.file_len - at);
                    MapKind::Data {
                        file: 0,
                        offset: at,
                    }
                }
            }
        };
        Ok(Mapping {
            start: offset,
            len: covered,
            kind,
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.storage.as_ref()),
            _ => Err(Error::invalid(format!(
                "parallels images have no file {index}"
            ))),
        }
    }

    fn info(&self) -> FormatInfo {
        // qemu prints neither a cluster size nor format-specific data for parallels.
        FormatInfo::default()
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        self.ensure_writable()?;
        // FIXME: the lock is held across the data writes, so parallel writers (a converting
        // engine's workers) take turns. The proper fix reserves the host cluster under the lock,
        // writes the data without it, and takes the lock again to set the BAT entry, with
        // in-flight clusters tracked so that two writers of one new cluster do not both allocate.
        let mut st = self.lock();
        self.repair_if_needed(&mut st)?;
        for (c, within, n, done) in self.pieces(offset, buf.len() as u64) {
            let data = &buf[done as usize..(done + n) as usize];
            match self.cluster_host(&st, c) {
                Some(host) => {
                    let at = host + within;
                    self.storage
                        .write_at(data, at)
                        .map_err(|e| Error::io(format!("writing at {at:#x}"), e))?;
                    st.file_len = st.file_len.max(at + n);
                }
                None => self.allocate(&mut st, c, within, data, backing)?,
            }
        }
        Ok(())
    }

    /// Whole clusters are discarded (their BAT entries cleared) when no backing image shows
    /// through, as qemu's `parallels_co_pwrite_zeroes` does; other ranges are zeroed in place.
    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        self.ensure_writable()?;
        let cs = self.cluster_size;
        let mut st = self.lock();
        self.repair_if_needed(&mut st)?;
        for (c, within, n, _) in self.pieces(offset, len) {
            match self.cluster_host(&st, c) {
                Some(host) if n == cs && backing.is_none() => {
                    self.set_entry(&mut st, c, 0)?;
                    if let Some(i) = self.host_index(&st, host) {
                        st.used.set(i, false);
                    }
                    self.storage
                        .punch_hole(host, cs.min(st.file_len.saturating_sub(host)))
                        .map_err(|e| Error::io(format!("discarding at {host:#x}"), e))?;
                }
                Some(host) => {
                    let at = host + within;
                    self.storage
                        .write_zeroes(at, n)
                        .map_err(|e| Error::io(format!("zeroing at {at:#x}"), e))?;
                }
                None if backing.is_some() => {
                    let zero = vec![0u8; n as usize];
                    self.allocate(&mut st, c, within, &zero, backing)?;
                }
                None => {}
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.storage.sync().map_err(|e| Error::io("syncing", e))?;
        }
        Ok(())
    }

    /// Repair what a writable open found (if nothing was written since), trim unused space at
    /// the end of the file, and clear the in-use mark, as qemu's close does.
    fn close(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock();
        self.repair_if_needed(&mut st)?;
        let ds = st.layout.data_start_bytes();
        let cs = self.cluster_size;
        st.file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("reading file size", e))?;
        let data_clusters = st.file_len.saturating_sub(ds).div_ceil(cs);
        let last = (0..data_clusters).rev().find(|&i| st.used.get(i));
        let ext_end = st.ext.as_ref().map_or(0, |e| e.end);
        let end = (ds + last.map_or(0, |i| (i + 1) * cs)).max(ext_end);
        if end < st.file_len {
            self.storage
                .set_len(end)
                .map_err(|e| Error::io("trimming Parallels image", e))?;
            st.file_len = end;
        }
        self.storage
            .sync()
            .map_err(|e| Error::io("syncing Parallels image", e))?;
        self.write_inuse(0)
    }

    /// qemu cannot resize parallels images ("does not support resize"); neither does vmi.
    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(Error::unsupported("resizing parallels images"))
    }

    /// After a repair the report describes the repaired image (what is left), with the repairs
    /// counted in the `*_fixed` fields and every finding kept in the messages.
    fn check(&self, mode: CheckMode) -> Result<CheckReport> {
        let mut st = self.lock();
        let before = self.check_locked(&mut st, mode)?;
        if mode == CheckMode::ReadOnly {
            return Ok(before);
        }
        if mode == CheckMode::RepairAll {
            st.needs_repair = false;
        }
        let mut after = self.check_locked(&mut st, CheckMode::ReadOnly)?;
        after.corruptions_fixed = before.corruptions_fixed;
        after.leaks_fixed = before.leaks_fixed;
        let mut messages = before.messages;
        messages.append(&mut after.messages);
        after.messages = messages;
        Ok(after)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
