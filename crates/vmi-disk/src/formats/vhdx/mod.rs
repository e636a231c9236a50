//! VHDX ([MS-VHDX] v20160714): Hyper-V's virtual hard disk v2. Dynamic, fixed and differencing
//! disks are read and written. A log left by another implementation (§2.3) is replayed into the
//! file when the image is opened for writing, and in memory (the file untouched) when it is opened
//! read-only.
//!
//! Layout written by vmi (as qemu): header section (1 MiB: file identifier, two headers, two region
//! tables), the log, the BAT, the metadata region, then 1 MiB-aligned payload and sector bitmap
//! blocks allocated at the end of the file.
//!
//! Crash consistency: vmi writes metadata directly, without the log. New blocks are allocated past
//! the end of the file and their data written there; the BAT entries that make them visible are held
//! in memory and written at [`Driver::flush`] only after the data has been synced. A crash before a
//! flush leaves the old BAT (unreferenced space at the end of the file, no corruption). Sector
//! bitmap bits of a differencing disk are held back the same way (see `docs/formats/vhdx.md`).

mod bat;
mod header;
#[doc(hidden)]
pub mod log;
mod metadata;

use crate::check::{CheckMode, CheckReport};
use crate::driver::{BackingSpec, Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, CreateContext, Format, OpenContext, ProbeInput};
use crate::gate::{check_reference_syntax, Gate, Referral};
use crate::image::Image;
use crate::invalid;
use crate::options::CreateOptions;
use crate::storage::{FileStorage, Storage};
use bat::Geometry;
use header::{Header, Region, Regions, HEADER_OFFSETS, MIB, REGION_OFFSETS};
use metadata::Metadata;
use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use uuid::Uuid;

pub use header::FILE_SIGNATURE;

/// Default log size (qemu's `log_size` default).
pub const DEFAULT_LOG_SIZE: u64 = MIB;
/// Largest log vmi creates or replays.
pub const MAX_LOG_SIZE: u64 = log::MAX_LOG_SIZE;
/// Sector bitmap bytes held in memory before they are written early (bounded memory between
/// flushes: 64 Ki bytes describe 256 MiB of 512-byte sectors).
const MAX_PENDING_BITMAP_BYTES: usize = 64 * 1024;
/// Creator string written in the file type identifier.
const CREATOR: &str = "vmi";

/// Probe: the "vhdxfile" signature, and a valid header when the probe sees one.
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    if input.head.get(..8)? != FILE_SIGNATURE {
        return None;
    }
    for off in HEADER_OFFSETS {
        let start = off as usize;
        if let Some(b) = input.head.get(start..start + header::HEADER_SIZE) {
            if Header::parse(b, input.len).is_ok() {
                return Some(Confidence::Certain);
            }
        }
    }
    Some(Confidence::Weak)
}

/// Mutable driver state.
#[derive(Debug)]
struct State {
    header: Header,
    header_slot: usize,
    bat: Vec<u64>,
    dirty: BTreeSet<usize>,
    /// Sector bitmap bytes changed but not yet written (host offset → byte): they are written at
    /// flush, after the data they describe has been synced.
    bitmap_pending: BTreeMap<u64, u8>,
    /// Next allocation offset (1 MiB aligned, past everything).
    file_end: u64,
    /// The write GUIDs have been renewed for this session (§2.2.2).
    guids_renewed: bool,
    geo: Geometry,
}

/// An open VHDX image.
#[derive(Debug)]
pub struct VhdxDriver {
    storage: Box<dyn Storage>,
    writable: bool,
    meta: Metadata,
    regions: Regions,
    size: AtomicU64,
    backing: Option<BackingSpec>,
    state: RwLock<State>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    let d = VhdxDriver::open(storage, ctx.writable)?;
    if let Some(spec) = &d.backing {
        // §2.6.2.6.3: the parent's DataWriteGuid must match the linkage recorded in the child.
        // Only when the gate lets the parent be opened; otherwise the access layer refuses it.
        if ctx.gate.backing_allowed() {
            if let Ok(path) = ctx.gate.resolve(Referral::Backing, &ctx.path, &spec.name) {
                let (guid, sector) = parent_facts(&path)?;
                if sector != d.meta.logical_sector {
                    return Err(Error::invalid(format!(
                        "vhdx parent {} has {sector}-byte sectors, the child {}-byte ones",
                        path.display(),
                        d.meta.logical_sector
                    )));
                }
                if !d.linkages()?.contains(&guid) {
                    return Err(Error::invalid(format!(
                        "vhdx parent {} has DataWriteGuid {guid}, not the parent_linkage the child recorded: the parent changed after the child was created",
                        path.display()
                    )));
                }
            }
        }
    }
    Ok(Box::new(d))
}

/// What a child needs from its parent: the current header's `DataWriteGuid` and the logical
/// sector size, which parent and child share (§2.6.2.4).
fn parent_facts(path: &std::path::Path) -> Result<(Uuid, u32)> {
    let parent = FileStorage::open(path, false)
        .map_err(|e| Error::io(format!("opening parent {}", path.display()), e))?;
    let len = parent.len().map_err(io("reading parent size"))?;
    let mut sig = [0u8; 8];
    if len >= header::HEADER_SECTION_END {
        parent
            .read_at(&mut sig, 0)
            .map_err(io("reading parent file identifier"))?;
    }
    if &sig != FILE_SIGNATURE {
        return Err(Error::usage(format!(
            "the parent of a vhdx differencing disk must be a vhdx image; {} is not",
            path.display()
        )));
    }
    let ctx = |e: Error| e.context(format!("parent {}", path.display()));
    let (h, _) = header::read_current_header(&parent, len).map_err(ctx)?;
    let regions = header::read_regions(&parent, len).map_err(ctx)?;
    let meta = metadata::read_metadata(&parent, regions.metadata.offset, regions.metadata.length)
        .map_err(ctx)?;
    Ok((h.data_write_guid, meta.logical_sector))
}

/// Check that the log, regions and allocated blocks lie after the header section without
/// overlapping (§2.5.1: "must not overlap any other structure", offsets unique).
fn check_layout(
    hdr: &Header,
    regions: &Regions,
    geo: &Geometry,
    mut blocks: Vec<u64>,
) -> Result<()> {
    blocks.sort_unstable();
    let mut spans: Vec<(u64, u64, &str)> = vec![
        (regions.bat.offset, regions.bat.length, "BAT"),
        (
            regions.metadata.offset,
            regions.metadata.length,
            "metadata region",
        ),
    ];
    if hdr.log_length > 0 {
        spans.push((hdr.log_offset, hdr.log_length, "log"));
    }
    spans.sort_unstable();
    let mut fixed = spans.into_iter().peekable();
    let mut prev: Option<(u64, u64, &str)> = None;
    let mut it = blocks.into_iter().map(|b| {
        let size = if b & 1 == 1 {
            bat::BITMAP_BLOCK_SIZE
        } else {
            geo.block_size
        };
        (
            b & !1,
            size,
            if b & 1 == 1 {
                "sector bitmap block"
            } else {
                "payload block"
            },
        )
    });
    let mut next_block = it.next();
    loop {
        // Merge the two sorted lists.
        let cur = match (fixed.peek().copied(), next_block) {
            (Some(f), Some(b)) if f.0 <= b.0 => fixed.next(),
            (_, Some(b)) => {
                next_block = it.next();
                Some(b)
            }
            (Some(_), None) => fixed.next(),
            (None, None) => None,
        };
        let Some(cur) = cur else { break };
        if let Some(p) = prev {
            if p.0.saturating_add(p.1) > cur.0 {
                invalid!(
                    "vhdx {} at {}+{} overlaps the {} at {}",
                    cur.2,
                    cur.0,
                    cur.1,
                    p.2,
                    p.0
                );
            }
        }
        prev = Some(cur);
    }
    Ok(())
}

impl VhdxDriver {
    /// The parent identities a differencing disk accepts (`parent_linkage`, `parent_linkage2`).
    pub fn linkages(&self) -> Result<Vec<Uuid>> {
        let mut out = Vec::new();
        for key in ["parent_linkage", "parent_linkage2"] {
            if let Some(v) = self.meta.locator(key) {
                out.push(Uuid::parse_str(v).map_err(|_| {
                    Error::invalid(format!(
                        "vhdx parent locator {key} '{}' is not a GUID",
                        v.escape_debug()
                    ))
                })?);
            }
        }
        Ok(out)
    }

    /// The current header's `DataWriteGuid` (what a child records as its `parent_linkage`).
    pub fn data_write_guid(&self) -> Uuid {
        self.read_state().header.data_write_guid
    }

    fn open(storage: Box<dyn Storage>, writable: bool) -> Result<VhdxDriver> {
        let file_len = storage.len().map_err(io("reading size"))?;
        let mut sig = [0u8; 8];
        if file_len < header::HEADER_SECTION_END {
            return Err(Error::invalid(format!(
                "vhdx file is {file_len} bytes, shorter than its 1 MiB header section"
            )));
        }
        storage
            .read_at(&mut sig, 0)
            .map_err(io("reading vhdx file identifier"))?;
        if &sig != FILE_SIGNATURE {
            return Err(Error::invalid(format!(
                "vhdx file identifier is {sig:02x?}, not \"vhdxfile\""
            )));
        }
        let (mut hdr, mut slot) = header::read_current_header(storage.as_ref(), file_len)?;
        let mut storage = storage;
        if let Some(replay) = log::plan_replay(storage.as_ref(), &hdr)? {
            if file_len < replay.flushed_file_len {
                invalid!(
                    "vhdx file is {file_len} bytes but its log was written when it had {}: the file is truncated",
                    replay.flushed_file_len
                );
            }
            if writable {
                // §2.2.2: a new FileWriteGuid before the first modification, log playback
                // included; the LogGuid stays until the replay is durable.
                let new = Header {
                    file_write_guid: Uuid::new_v4(),
                    ..hdr
                };
                slot = write_header_pair(storage.as_ref(), new, slot)?;
                hdr = Header {
                    sequence: hdr.sequence + 2,
                    ..new
                };
                apply_replay(storage.as_ref(), &replay)?;
            } else if replay.writes.len() <= log::MAX_OVERLAY_WRITES {
                // Read-only: replay in memory, leave the file untouched.
                storage = Box::new(
                    log::ReplayedStorage::new(storage, replay).map_err(io("reading size"))?,
                );
            } else {
                return Err(Error::limit(format!(
                    "vhdx log holds {} writes to replay (at most {} in memory); open the image read-write (or run `vmi check -r all`) to replay it into the file",
                    replay.writes.len(),
                    log::MAX_OVERLAY_WRITES
                )));
            }
        }
        let file_len = storage.len().map_err(io("reading size"))?;
        if writable && !hdr.log_guid.is_nil() {
            // The log is replayed (or held nothing valid): clear it (§2.3.3).
            let new = Header {
                log_guid: Uuid::nil(),
                ..hdr
            };
            slot = write_header_pair(storage.as_ref(), new, slot)?;
            hdr = Header {
                sequence: hdr.sequence + 2,
                ..new
            };
        }
        let regions = header::read_regions(storage.as_ref(), file_len)?;
        let log_end = hdr.log_offset + hdr.log_length;
        for (name, r) in [("BAT", regions.bat), ("metadata", regions.metadata)] {
            if hdr.log_length > 0 && r.offset < log_end && hdr.log_offset < r.offset + r.length {
                return Err(Error::invalid(format!(
                    "vhdx {name} region {}+{} overlaps the log {}+{}",
                    r.offset, r.length, hdr.log_offset, hdr.log_length
                )));
            }
        }
        let meta = metadata::read_metadata(
            storage.as_ref(),
            regions.metadata.offset,
            regions.metadata.length,
        )?;
        let geo = Geometry::new(&meta, meta.virtual_size)?;
        if geo.entries * 8 > regions.bat.length {
            return Err(Error::invalid(format!(
                "vhdx BAT needs {} entries but its region holds {} bytes",
                geo.entries, regions.bat.length
            )));
        }
        let mut raw = vec![0u8; (geo.entries * 8) as usize];
        storage
            .read_at(&mut raw, regions.bat.offset)
            .map_err(io(format!("reading vhdx BAT at {}", regions.bat.offset)))?;
        let bat: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut file_end = file_len.div_ceil(MIB) * MIB;
        // Allocated blocks, as (offset | 1 for a sector bitmap): at most one per MiB of file once
        // they are known not to overlap, so this stays bounded by the file size.
        let mut allocated: Vec<u64> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            let st = bat::state(e);
            let present = if geo.is_bitmap_index(i as u64) {
                match st {
                    bat::BITMAP_NOT_PRESENT => false,
                    bat::BITMAP_PRESENT if meta.has_parent => true,
                    _ => invalid!("vhdx BAT entry {i} has sector bitmap state {st}"),
                }
            } else {
                match st {
                    bat::PAYLOAD_NOT_PRESENT
                    | bat::PAYLOAD_UNDEFINED
                    | bat::PAYLOAD_ZERO
                    | bat::PAYLOAD_UNMAPPED => false,
                    bat::PAYLOAD_FULLY_PRESENT => true,
                    bat::PAYLOAD_PARTIALLY_PRESENT if meta.has_parent => true,
                    _ => invalid!("vhdx BAT entry {i} has payload state {st}"),
                }
            };
            if present {
                let size = if geo.is_bitmap_index(i as u64) {
                    bat::BITMAP_BLOCK_SIZE
                } else {
                    geo.block_size
                };
                let off = bat::offset(e);
                let end = off.saturating_add(size);
                if off < header::HEADER_SECTION_END || end > file_len {
                    invalid!(
                        "vhdx BAT entry {i} points at {off}+{size}, outside the file ({file_len} bytes)"
                    );
                }
                file_end = file_end.max(end.div_ceil(MIB) * MIB);
                if allocated.len() as u64 >= file_len / MIB {
                    invalid!(
                        "vhdx BAT allocates more blocks than a {file_len}-byte file holds: blocks overlap"
                    );
                }
                allocated.push(off | u64::from(geo.is_bitmap_index(i as u64)));
            }
        }
        check_layout(&hdr, &regions, &geo, allocated)?;
        if meta.has_parent && meta.locator("parent_linkage").is_none() {
            invalid!("vhdx parent locator lacks parent_linkage");
        }
        let backing = if meta.has_parent {
            // §2.6.2.6.3: relative_path first, then volume_path, then absolute_win32_path.
            let name = meta
                .locator("relative_path")
                .map(|p| {
                    let p = p.replace('\\', "/");
                    p.strip_prefix("./").map(str::to_string).unwrap_or(p)
                })
                .or_else(|| meta.locator("volume_path").map(str::to_string))
                .or_else(|| meta.locator("absolute_win32_path").map(str::to_string))
                .ok_or_else(|| Error::invalid("vhdx parent locator names no parent path"))?;
            Some(BackingSpec {
                name,
                format: Some(Format::Vhdx),
            })
        } else {
            None
        };
        Ok(VhdxDriver {
            storage,
            writable,
            size: AtomicU64::new(meta.virtual_size),
            regions,
            backing,
            meta,
            state: RwLock::new(State {
                header: hdr,
                header_slot: slot,
                bat,
                dirty: BTreeSet::new(),
                bitmap_pending: BTreeMap::new(),
                file_end,
                guids_renewed: false,
                geo,
            }),
        })
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(st: &State, index: u64) -> Result<u64> {
        usize::try_from(index)
            .ok()
            .and_then(|i| st.bat.get(i).copied())
            .ok_or_else(|| Error::invalid(format!("vhdx BAT index {index} out of range")))
    }

    /// Read the bitmap bits for `count` sectors starting at bit `first` of the bitmap block at
    /// `host`; return the value of the first bit and how many consecutive bits share it.
    fn bitmap_run(&self, st: &State, host: u64, first: u64, count: u64) -> Result<(bool, u64)> {
        let b0 = first / 8;
        let b1 = (first + count).div_ceil(8);
        let mut buf = vec![0u8; (b1 - b0) as usize];
        self.read_bitmap(st, host + b0, &mut buf)?;
        let bit = |i: u64| {
            let rel = i - b0 * 8;
            buf.get((rel / 8) as usize)
                .is_some_and(|b| b >> (rel % 8) & 1 == 1)
        };
        let v = bit(first);
        let mut n = 1;
        while n < count && bit(first + n) == v {
            n += 1;
        }
        Ok((v, n))
    }

    /// Read sector bitmap bytes at host offset `at`, with the changes not yet written.
    fn read_bitmap(&self, st: &State, at: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_at(buf, at)
            .map_err(io(format!("reading vhdx sector bitmap at {at}")))?;
        for (&a, &v) in st.bitmap_pending.range(at..at + buf.len() as u64) {
            if let Some(b) = buf.get_mut((a - at) as usize) {
                *b = v;
            }
        }
        Ok(())
    }

    /// Set `n` bits from bit `first` of the bitmap block at `host`, in memory until the next flush
    /// (which happens early when [`MAX_PENDING_BITMAP_BYTES`] is reached).
    fn set_bits(&self, st: &mut State, host: u64, first: u64, n: u64) -> Result<()> {
        let b0 = first / 8;
        let b1 = (first + n).div_ceil(8);
        let mut buf = vec![0u8; (b1 - b0) as usize];
        self.read_bitmap(st, host + b0, &mut buf)?;
        for i in first..first + n {
            let rel = i - b0 * 8;
            if let Some(b) = buf.get_mut((rel / 8) as usize) {
                *b |= 1 << (rel % 8);
            }
        }
        for (k, v) in buf.into_iter().enumerate() {
            st.bitmap_pending.insert(host + b0 + k as u64, v);
        }
        if st.bitmap_pending.len() > MAX_PENDING_BITMAP_BYTES {
            self.flush_bat(st)?;
        }
        Ok(())
    }

    /// Renew `FileWriteGuid` and `DataWriteGuid` before the first change of this session (§2.2.2).
    fn renew_guids(&self, st: &mut State) -> Result<()> {
        if st.guids_renewed {
            return Ok(());
        }
        let new = Header {
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            ..st.header
        };
        st.header_slot = write_header_pair(self.storage.as_ref(), new, st.header_slot)?;
        st.header = Header {
            sequence: new.sequence + 2,
            ..new
        };
        st.guids_renewed = true;
        Ok(())
    }

    /// Allocate `size` bytes (a multiple of 1 MiB) at the end of the file, reading as zeroes.
    fn allocate(&self, st: &mut State, size: u64) -> Result<u64> {
        let at = st.file_end;
        let end = at
            .checked_add(size)
            .ok_or_else(|| Error::limit("vhdx file offset overflow"))?;
        self.storage
            .set_len(end)
            .map_err(io(format!("extending vhdx file to {end}")))?;
        st.file_end = end;
        Ok(at)
    }

    fn set_entry(st: &mut State, index: u64, value: u64) -> Result<()> {
        let i = usize::try_from(index).map_err(|_| Error::limit("BAT index"))?;
        let slot = st
            .bat
            .get_mut(i)
            .ok_or_else(|| Error::invalid(format!("vhdx BAT index {index} out of range")))?;
        *slot = value;
        st.dirty.insert(i);
        Ok(())
    }

    /// Write within one payload block.
    fn write_block(
        &self,
        st: &mut State,
        buf: &[u8],
        offset: u64,
        backing: Option<&Image>,
    ) -> Result<()> {
        let geo = st.geo;
        let block = offset / geo.block_size;
        let in_block = offset % geo.block_size;
        let idx = geo.payload_index(block);
        let e = Self::entry(st, idx)?;
        let len = buf.len() as u64;
        match bat::state(e) {
            bat::PAYLOAD_FULLY_PRESENT => {
                let host = bat::offset(e) + in_block;
                return self
                    .storage
                    .write_at(buf, host)
                    .map_err(io(format!("writing vhdx data at {host}")));
            }
            bat::PAYLOAD_PARTIALLY_PRESENT => {}
            s => {
                let whole = in_block == 0 && len == geo.block_size;
                // Blocks whose old content is zero (or that are fully overwritten) become fully
                // present; others in a differencing disk keep the parent's sectors visible.
                if !self.meta.has_parent || s == bat::PAYLOAD_ZERO || whole {
                    let host = self.allocate(st, geo.block_size)?;
                    self.storage
                        .write_at(buf, host + in_block)
                        .map_err(io(format!("writing vhdx data at {}", host + in_block)))?;
                    return Self::set_entry(st, idx, bat::entry(host, bat::PAYLOAD_FULLY_PRESENT));
                }
                let bidx = geo.bitmap_index(block);
                let be = Self::entry(st, bidx)?;
                let bhost = if bat::state(be) == bat::BITMAP_PRESENT {
                    bat::offset(be)
                } else {
                    let h = self.allocate(st, bat::BITMAP_BLOCK_SIZE)?;
                    Self::set_entry(st, bidx, bat::entry(h, bat::BITMAP_PRESENT))?;
                    h
                };
                // Clear this block's bits: nothing of it is present yet.
                let first = geo.bitmap_bit(block) / 8;
                let n = geo.sectors_per_block() / 8;
                crate::storage::write_zero_bytes(self.storage.as_ref(), bhost + first, n)
                    .map_err(io("clearing vhdx sector bitmap"))?;
                let stale: Vec<u64> = st
                    .bitmap_pending
                    .range(bhost + first..bhost + first + n)
                    .map(|(&a, _)| a)
                    .collect();
                for a in stale {
                    st.bitmap_pending.remove(&a);
                }
                let host = self.allocate(st, geo.block_size)?;
                Self::set_entry(st, idx, bat::entry(host, bat::PAYLOAD_PARTIALLY_PRESENT))?;
            }
        }
        // Partially present: write whole sectors (completing edge sectors from the current view),
        // then mark them present.
        let sector = geo.sector;
        let a = offset / sector * sector;
        let b = (offset + len).div_ceil(sector) * sector;
        let mut tmp;
        let data: &[u8] = if a == offset && b == offset + len {
            buf
        } else {
            tmp = vec![0u8; (b - a) as usize];
            let read_head = a < offset;
            if read_head {
                read_current(self, st, &mut tmp[..sector as usize], a, backing)?;
            }
            if b > offset + len && !(read_head && b - sector == a) {
                let at = (b - sector - a) as usize;
                read_current(self, st, &mut tmp[at..], b - sector, backing)?;
            }
            let s = (offset - a) as usize;
            tmp[s..s + buf.len()].copy_from_slice(buf);
            &tmp
        };
        let e = Self::entry(st, idx)?;
        let host = bat::offset(e) + (a % geo.block_size);
        self.storage
            .write_at(data, host)
            .map_err(io(format!("writing vhdx data at {host}")))?;
        let be = Self::entry(st, geo.bitmap_index(block))?;
        if bat::state(be) != bat::BITMAP_PRESENT {
            invalid!("vhdx partially present block {block} has no sector bitmap");
        }
        let first_bit = geo.bitmap_bit(block) + (a % geo.block_size) / sector;
        let nbits = (b - a) / sector;
        self.set_bits(st, bat::offset(be), first_bit, nbits)
    }

    /// Write pending sector bitmap bytes and BAT entries, after syncing the data they describe.
    fn flush_bat(&self, st: &mut State) -> Result<()> {
        if st.dirty.is_empty() && st.bitmap_pending.is_empty() {
            return Ok(());
        }
        // Data first: the bitmap bits and BAT entries below make newly written data visible.
        self.storage.sync().map_err(io("syncing vhdx data"))?;
        // Cleared only once written, so that a failed flush can be retried.
        let pending = st.bitmap_pending.clone();
        let mut run: Vec<u8> = Vec::new();
        let mut run_at = 0;
        for (a, v) in pending {
            if !run.is_empty() && run_at + run.len() as u64 != a {
                self.storage
                    .write_at(&run, run_at)
                    .map_err(io(format!("writing vhdx sector bitmap at {run_at}")))?;
                run.clear();
            }
            if run.is_empty() {
                run_at = a;
            }
            run.push(v);
        }
        if !run.is_empty() {
            self.storage
                .write_at(&run, run_at)
                .map_err(io(format!("writing vhdx sector bitmap at {run_at}")))?;
        }
        st.bitmap_pending.clear();
        let dirty: Vec<usize> = st.dirty.iter().copied().collect();
        let mut i = 0;
        while i < dirty.len() {
            let start = dirty[i];
            let mut end = start + 1;
            while i + 1 < dirty.len() && dirty[i + 1] == end {
                end += 1;
                i += 1;
            }
            i += 1;
            let bytes: Vec<u8> = st.bat[start..end]
                .iter()
                .flat_map(|e| e.to_le_bytes())
                .collect();
            let at = self.regions.bat.offset + start as u64 * 8;
            self.storage
                .write_at(&bytes, at)
                .map_err(io(format!("writing vhdx BAT at {at}")))?;
        }
        st.dirty.clear();
        self.storage.sync().map_err(io("syncing vhdx BAT"))
    }
}

/// Read what a guest range shows now (this image, else the parent, else zeroes) while the state
/// lock is held.
fn read_current(
    d: &VhdxDriver,
    st: &State,
    out: &mut [u8],
    offset: u64,
    backing: Option<&Image>,
) -> Result<()> {
    let mut done = 0usize;
    while done < out.len() {
        let pos = offset + done as u64;
        let m = d.map_in(st, pos, (out.len() - done) as u64)?;
        let dst = &mut out[done..done + m.len as usize];
        match m.kind {
            MapKind::Data { offset: host, .. } => d
                .storage
                .read_at(dst, host)
                .map_err(io(format!("reading vhdx data at {host}")))?,
            MapKind::Unallocated => match backing {
                Some(b) => {
                    let avail = b.virtual_size().saturating_sub(pos).min(m.len) as usize;
                    b.read_at(&mut dst[..avail], pos)?;
                    dst[avail..].fill(0);
                }
                None => return Err(Error::usage(
                    "writing part of a sector of a differencing vhdx needs its parent image opened",
                )),
            },
            _ => dst.fill(0),
        }
        done += m.len as usize;
    }
    Ok(())
}

/// Apply a planned log replay to the file and make it durable (§2.3.3).
fn apply_replay(storage: &dyn Storage, r: &log::Replay) -> Result<()> {
    // Extend first: the structures the log describes fit within `LastFileOffset`.
    if storage.len().map_err(io("reading size"))? < r.min_file_len {
        storage
            .set_len(r.min_file_len)
            .map_err(io("extending vhdx file for log replay"))?;
    }
    for w in &r.writes {
        match w {
            log::LogWrite::Zero { offset, len } => {
                // Past the end of the file there is nothing to zero; punch holes where possible.
                let file_len = storage.len().map_err(io("reading size"))?;
                let len = (*len).min(file_len.saturating_sub(*offset));
                storage
                    .write_zeroes(*offset, len)
                    .map_err(io(format!("replaying vhdx log: zeroing {offset}+{len}")))?
            }
            log::LogWrite::Data { offset, sector } => storage
                .write_at(sector, *offset)
                .map_err(io(format!("replaying vhdx log: writing at {offset}")))?,
        }
    }
    storage.sync().map_err(io("syncing vhdx log replay"))
}

/// Write `new` twice, first into the slot that is not current, then into the other, with
/// increasing sequence numbers, so both headers end up valid and equal but for the sequence
/// (§2.2.2.1). Returns the slot holding the newest header.
fn write_header_pair(storage: &dyn Storage, new: Header, current_slot: usize) -> Result<usize> {
    let mut slot = current_slot;
    for step in 1..=2u64 {
        slot = 1 - slot;
        let h = Header {
            sequence: new.sequence + step,
            ..new
        };
        let off = HEADER_OFFSETS[slot];
        storage
            .write_at(&h.encode(), off)
            .map_err(io(format!("writing vhdx header at {off}")))?;
        storage.sync().map_err(io("syncing vhdx header"))?;
    }
    Ok(slot)
}

impl VhdxDriver {
    fn map_in(&self, st: &State, offset: u64, len: u64) -> Result<Mapping> {
        let size = self.virtual_size();
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let geo = st.geo;
        let block = offset / geo.block_size;
        let in_block = offset % geo.block_size;
        let len = len.min(geo.block_size - in_block);
        let e = Self::entry(st, geo.payload_index(block))?;
        let kind = |k| Mapping {
            start: offset,
            len,
            kind: k,
        };
        Ok(match bat::state(e) {
            bat::PAYLOAD_FULLY_PRESENT => kind(MapKind::Data {
                file: 0,
                offset: bat::offset(e) + in_block,
            }),
            bat::PAYLOAD_ZERO => kind(MapKind::Zero),
            bat::PAYLOAD_PARTIALLY_PRESENT => {
                let be = Self::entry(st, geo.bitmap_index(block))?;
                if bat::state(be) != bat::BITMAP_PRESENT {
                    invalid!("vhdx partially present block {block} has no sector bitmap");
                }
                let sector = geo.sector;
                let first_sector = in_block / sector;
                let end_sector = (in_block + len).div_ceil(sector);
                let (present, n) = self.bitmap_run(
                    st,
                    bat::offset(be),
                    geo.bitmap_bit(block) + first_sector,
                    end_sector - first_sector,
                )?;
                let run_end = (first_sector + n) * sector;
                let len = len.min(run_end - in_block);
                Mapping {
                    start: offset,
                    len,
                    kind: if present {
                        MapKind::Data {
                            file: 0,
                            offset: bat::offset(e) + in_block,
                        }
                    } else {
                        MapKind::Unallocated
                    },
                }
            }
            _ => kind(MapKind::Unallocated),
        })
    }
}

impl Driver for VhdxDriver {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let st = self.read_state();
        self.map_in(&st, offset, len)
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.storage.as_ref()),
            _ => Err(Error::invalid(format!("vhdx images have no file {index}"))),
        }
    }

    fn backing(&self) -> Option<&BackingSpec> {
        self.backing.as_ref()
    }

    fn info(&self) -> FormatInfo {
        FormatInfo {
            cluster_size: Some(u64::from(self.meta.block_size)),
            ..FormatInfo::default()
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("image is not open for writing"));
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.virtual_size())
            .ok_or_else(|| Error::usage(format!("write at {offset} is beyond the image")))?;
        let mut st = self.write_state();
        self.renew_guids(&mut st)?;
        let bs = st.geo.block_size;
        let mut pos = offset;
        while pos < end {
            let n = (bs - pos % bs).min(end - pos);
            let s = (pos - offset) as usize;
            self.write_block(&mut st, &buf[s..s + n as usize], pos, backing)?;
            pos += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("image is not open for writing"));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.virtual_size())
            .ok_or_else(|| Error::usage(format!("zeroing at {offset} is beyond the image")))?;
        let bs = self.read_state().geo.block_size;
        let mut pos = offset;
        while pos < end {
            let n = (bs - pos % bs).min(end - pos);
            let whole = pos % bs == 0 && (n == bs || pos + n == self.virtual_size());
            let mut st = self.write_state();
            let idx = st.geo.payload_index(pos / bs);
            let s = bat::state(Self::entry(&st, idx)?);
            let reads_zero = !self.meta.has_parent
                && !matches!(
                    s,
                    bat::PAYLOAD_FULLY_PRESENT | bat::PAYLOAD_PARTIALLY_PRESENT
                );
            if whole {
                if s != bat::PAYLOAD_ZERO {
                    self.renew_guids(&mut st)?;
                    // The old block's space is left unreferenced (as qemu does).
                    Self::set_entry(&mut st, idx, bat::entry(0, bat::PAYLOAD_ZERO))?;
                }
            } else if !reads_zero && s != bat::PAYLOAD_ZERO {
                drop(st);
                let zero = vec![0u8; n as usize];
                self.write_at(&zero, pos, backing)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.write_state();
        self.flush_bat(&mut st)
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("image is not open for writing"));
        }
        let old = self.virtual_size();
        if new_size < old {
            return Err(Error::unsupported("shrinking vhdx images"));
        }
        if new_size % u64::from(self.meta.logical_sector) != 0
            || new_size > metadata::MAX_VIRTUAL_SIZE
        {
            return Err(Error::usage(format!(
                "vhdx size {new_size} must be a multiple of {} up to 64 TiB",
                self.meta.logical_sector
            )));
        }
        let mut st = self.write_state();
        let geo = Geometry::new(&self.meta, new_size)?;
        if geo.entries * 8 > self.regions.bat.length {
            return Err(Error::unsupported(format!(
                "growing to {new_size} needs a BAT of {} bytes; its region holds {}",
                geo.entries * 8,
                self.regions.bat.length
            )));
        }
        self.renew_guids(&mut st)?;
        // New entries are not present; the old last block's tail past the old size reads as zero
        // because vmi never writes past the virtual size.
        let fixed = self.meta.leave_allocated;
        let old_entries = st.bat.len();
        st.bat.resize(geo.entries as usize, 0);
        st.dirty.extend(old_entries..geo.entries as usize);
        st.geo = geo;
        if fixed {
            for b in 0..geo.payload_blocks {
                let i = geo.payload_index(b);
                if bat::state(Self::entry(&st, i)?) != bat::PAYLOAD_FULLY_PRESENT {
                    let h = self.allocate(&mut st, geo.block_size)?;
                    Self::set_entry(&mut st, i, bat::entry(h, bat::PAYLOAD_FULLY_PRESENT))?;
                }
            }
        }
        self.flush_bat(&mut st)?;
        let meta = Metadata {
            virtual_size: new_size,
            ..self.meta.clone()
        };
        let m = metadata::encode_metadata(&meta);
        self.storage
            .write_at(&m, self.regions.metadata.offset)
            .map_err(io("writing vhdx metadata"))?;
        self.storage.sync().map_err(io("syncing vhdx metadata"))?;
        self.size.store(new_size, Ordering::Relaxed);
        Ok(())
    }

    fn check(&self, _mode: CheckMode) -> Result<CheckReport> {
        let st = self.read_state();
        let file_len = self.storage.len().map_err(io("reading size"))?;
        let mut r = CheckReport {
            total_clusters: Some(st.geo.payload_blocks),
            ..CheckReport::default()
        };
        let mut allocated = 0;
        let mut used: Vec<(u64, u64)> = vec![
            (0, header::HEADER_SECTION_END),
            (st.header.log_offset, st.header.log_length),
            (self.regions.bat.offset, self.regions.bat.length),
            (self.regions.metadata.offset, self.regions.metadata.length),
        ];
        for (i, &e) in st.bat.iter().enumerate() {
            let bitmap = st.geo.is_bitmap_index(i as u64);
            let s = bat::state(e);
            let present = if bitmap {
                s == bat::BITMAP_PRESENT
            } else {
                matches!(
                    s,
                    bat::PAYLOAD_FULLY_PRESENT | bat::PAYLOAD_PARTIALLY_PRESENT
                )
            };
            if !present {
                continue;
            }
            let size = if bitmap {
                bat::BITMAP_BLOCK_SIZE
            } else {
                allocated += 1;
                st.geo.block_size
            };
            let off = bat::offset(e);
            if off.saturating_add(size) > file_len {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR BAT entry {i} points beyond the end of the file"
                ));
            }
            used.push((off, size));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR structures at {} and {} overlap",
                    w[0].0, w[1].0
                ));
            }
        }
        r.allocated_clusters = Some(allocated);
        r.image_end_offset = Some(file_len);
        Ok(r)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// qemu's automatic block size for a disk of `size` bytes (block/vhdx.c `vhdx_create`).
fn auto_block_size(size: u64) -> u64 {
    if size > 32 << 40 {
        64 * MIB
    } else if size > 100 << 30 {
        32 * MIB
    } else if size > 1 << 30 {
        16 * MIB
    } else {
        8 * MIB
    }
}

/// The parent locator of a new differencing disk: the parent's `DataWriteGuid` and its path
/// relative to the child's folder (§2.6.2.6.3).
fn parent_locator(ctx: &CreateContext, name: &str) -> Result<(Vec<(String, String)>, u32)> {
    check_reference_syntax(Referral::Backing, name)?;
    // The name comes from the user creating the image, not from an image: it is resolved through
    // the gate (relative to the new file's folder) without confinement.
    let path = Gate::new().allow_backing(true).confine_to("/").resolve(
        Referral::Backing,
        &ctx.path,
        name,
    )?;
    let (guid, sector) = parent_facts(&path)?;
    let relative = if std::path::Path::new(name).is_absolute() {
        let dir = match ctx.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let dir = dir
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
        relative_path(&dir, &path)
    } else {
        name.to_string()
    };
    let locator = vec![
        ("parent_linkage".to_string(), format!("{{{guid}}}")),
        ("relative_path".to_string(), relative.replace('/', "\\")),
    ];
    Ok((locator, sector))
}

/// `target` relative to directory `dir` (both absolute and canonical), with `..` where needed.
fn relative_path(dir: &std::path::Path, target: &std::path::Path) -> String {
    let d: Vec<_> = dir.components().collect();
    let t: Vec<_> = target.components().collect();
    let common = d.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_string(); d.len() - common];
    parts.extend(
        t[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

pub(crate) fn create(
    storage: Box<dyn Storage>,
    ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    let o = &opts.options;
    let fixed = o
        .choice("subformat", &["dynamic", "fixed"])?
        .is_some_and(|s| s == "fixed");
    let block_size = match o.size("block_size")? {
        None | Some(0) => auto_block_size(opts.size),
        Some(b) => b,
    };
    let log_size = o.size("log_size")?.unwrap_or(DEFAULT_LOG_SIZE);
    let zero_blocks = o.bool("block_state_zero")?.unwrap_or(true);
    o.finish("vhdx")?;
    if !block_size.is_power_of_two()
        || !(u64::from(metadata::MIN_BLOCK_SIZE)..=u64::from(metadata::MAX_BLOCK_SIZE))
            .contains(&block_size)
    {
        return Err(Error::usage(format!(
            "vhdx block_size {block_size} must be a power of two from 1 MiB to 256 MiB"
        )));
    }
    if log_size % MIB != 0 || log_size == 0 || log_size > MAX_LOG_SIZE {
        return Err(Error::usage(format!(
            "vhdx log_size {log_size} must be a multiple of 1 MiB from 1 MiB to {MAX_LOG_SIZE}"
        )));
    }
    if opts.size % 512 != 0 || opts.size > metadata::MAX_VIRTUAL_SIZE {
        return Err(Error::usage(format!(
            "vhdx size {} must be a multiple of 512 up to 64 TiB",
            opts.size
        )));
    }
    let parent = match &opts.backing {
        Some(spec) => {
            if fixed {
                return Err(Error::usage("a fixed vhdx cannot have a parent"));
            }
            if spec.format.is_some_and(|f| f != Format::Vhdx) {
                return Err(Error::usage(
                    "the parent of a vhdx differencing disk must be a vhdx image",
                ));
            }
            Some(parent_locator(ctx, &spec.name)?)
        }
        None => None,
    };
    let logical_sector = parent.as_ref().map_or(512, |p| p.1);
    if opts.size % u64::from(logical_sector) != 0 {
        return Err(Error::usage(format!(
            "vhdx size {} must be a multiple of the parent's {logical_sector}-byte sectors",
            opts.size
        )));
    }
    let meta = Metadata {
        block_size: block_size as u32,
        leave_allocated: fixed,
        has_parent: parent.is_some(),
        virtual_size: opts.size,
        logical_sector,
        physical_sector: 4096,
        page83: Uuid::new_v4(),
        parent_locator: parent.map(|p| p.0).unwrap_or_default(),
    };
    let geo = Geometry::new(&meta, opts.size)?;
    let log_offset = header::HEADER_SECTION_END;
    let bat_offset = log_offset + log_size;
    let bat_len = (geo.entries * 8).div_ceil(MIB).max(1) * MIB;
    let meta_offset = bat_offset + bat_len;
    let regions = Regions {
        bat: Region {
            offset: bat_offset,
            length: bat_len,
        },
        metadata: Region {
            offset: meta_offset,
            length: MIB,
        },
    };
    let mut end = meta_offset + MIB;
    let mut bat = vec![0u64; geo.entries as usize];
    for b in 0..geo.payload_blocks {
        let i = geo.payload_index(b) as usize;
        bat[i] = if fixed {
            let e = bat::entry(end, bat::PAYLOAD_FULLY_PRESENT);
            end += block_size;
            e
        } else if zero_blocks && !meta.has_parent {
            bat::entry(0, bat::PAYLOAD_ZERO)
        } else {
            bat::entry(0, bat::PAYLOAD_NOT_PRESENT)
        };
    }
    let w = |buf: &[u8], at: u64| {
        storage
            .write_at(buf, at)
            .map_err(io(format!("writing vhdx structure at {at}")))
    };
    w(&header::encode_file_identifier(CREATOR), 0)?;
    let table = header::encode_region_table(&regions);
    for off in REGION_OFFSETS {
        w(&table, off)?;
    }
    w(&metadata::encode_metadata(&meta), meta_offset)?;
    let raw: Vec<u8> = bat.iter().flat_map(|e| e.to_le_bytes()).collect();
    w(&raw, bat_offset)?;
    storage
        .set_len(end)
        .map_err(io(format!("setting vhdx file size to {end}")))?;
    let hdr = Header {
        sequence: 0,
        file_write_guid: Uuid::new_v4(),
        data_write_guid: Uuid::new_v4(),
        log_guid: Uuid::nil(),
        log_length: log_size,
        log_offset,
    };
    // Headers last: the file is not a vhdx until they are in place.
    write_header_pair(storage.as_ref(), hdr, 1)?;
    Ok(Box::new(VhdxDriver::open(storage, true)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;
    use std::path::PathBuf;

    fn new_image(size: u64, o: &str) -> VhdxDriver {
        let mut fo = crate::options::FormatOptions::new();
        fo.parse(o).unwrap();
        let opts = CreateOptions::new(size).options(fo);
        let ctx = CreateContext {
            path: PathBuf::from("/nonexistent/t.vhdx"),
        };
        let d = create(Box::new(MemStorage::new()), &ctx, &opts).unwrap();
        let d = d.as_any().downcast_ref::<VhdxDriver>().unwrap();
        // Re-open the same bytes to exercise the parser.
        let len = d.storage.len().unwrap() as usize;
        let mut all = vec![0u8; len];
        d.storage.read_at(&mut all, 0).unwrap();
        VhdxDriver::open(Box::new(MemStorage::from_bytes(all)), true).unwrap()
    }

    #[test]
    fn created_dynamic_image_reopens_with_its_geometry() {
        let d = new_image(64 << 20, "block_size=1M");
        assert_eq!(d.virtual_size(), 64 << 20);
        assert_eq!(d.info().cluster_size, Some(MIB));
        assert_eq!(d.map(0, 1 << 30).unwrap().kind, MapKind::Zero);
    }

    #[test]
    fn written_block_maps_as_data_and_reads_back() {
        let d = new_image(16 << 20, "block_size=1M");
        d.write_at(b"hello", (3 << 20) + 7, None).unwrap();
        let m = d.map((3 << 20) + 7, 100).unwrap();
        let MapKind::Data { offset, .. } = m.kind else {
            panic!("{m:?}")
        };
        let mut b = [0u8; 5];
        d.storage.read_at(&mut b, offset).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(offset % MIB, 7);
    }

    #[test]
    fn first_write_renews_the_data_write_guid() {
        let d = new_image(16 << 20, "");
        let before = d.read_state().header.data_write_guid;
        d.write_at(b"x", 0, None).unwrap();
        assert_ne!(d.read_state().header.data_write_guid, before);
    }

    #[test]
    fn block_size_option_outside_the_spec_range_is_refused() {
        let mut fo = crate::options::FormatOptions::new();
        fo.parse("block_size=512M").unwrap();
        let opts = CreateOptions::new(1 << 30).options(fo);
        let ctx = CreateContext {
            path: PathBuf::from("t.vhdx"),
        };
        assert!(create(Box::new(MemStorage::new()), &ctx, &opts).is_err());
    }

    #[test]
    fn crash_before_the_data_is_synced_leaves_the_old_bat() {
        let mem = std::sync::Arc::new(MemStorage::new());
        let mut fo = crate::options::FormatOptions::new();
        fo.parse("block_size=1M").unwrap();
        let ctx = CreateContext {
            path: PathBuf::from("t.vhdx"),
        };
        let d = create(
            Box::new(mem.clone()),
            &ctx,
            &CreateOptions::new(16 << 20).options(fo),
        )
        .unwrap();
        d.write_at(&[0xab; 4096], 3 << 20, None).unwrap();
        mem.fail(crate::storage::FailPoint::Sync);
        assert!(d.flush().is_err());
        let crashed =
            VhdxDriver::open(Box::new(MemStorage::from_bytes(mem.to_vec())), false).unwrap();
        assert_eq!(crashed.map(3 << 20, 4096).unwrap().kind, MapKind::Zero);
        // The flush can be retried once the storage recovers.
        mem.clear_faults();
        d.flush().unwrap();
        let after =
            VhdxDriver::open(Box::new(MemStorage::from_bytes(mem.to_vec())), false).unwrap();
        assert!(matches!(
            after.map(3 << 20, 4096).unwrap().kind,
            MapKind::Data { .. }
        ));
    }

    /// A differencing disk with 4 KiB logical sectors, made by rewriting the metadata of a new
    /// dynamic disk (vmi creates 512-byte sectors, as qemu does).
    fn diff_4k_image() -> Vec<u8> {
        let d = new_image(16 << 20, "block_size=1M,block_state_zero=off");
        let meta = Metadata {
            has_parent: true,
            logical_sector: 4096,
            parent_locator: vec![
                (
                    "parent_linkage".into(),
                    format!("{{{}}}", Uuid::from_u128(1)),
                ),
                ("relative_path".into(), ".\\base.vhdx".into()),
            ],
            ..d.meta.clone()
        };
        d.storage
            .write_at(&metadata::encode_metadata(&meta), d.regions.metadata.offset)
            .unwrap();
        let mut all = vec![0u8; d.storage.len().unwrap() as usize];
        d.storage.read_at(&mut all, 0).unwrap();
        all
    }

    #[test]
    fn sector_bitmap_of_a_4k_sector_differencing_disk_tracks_written_sectors() {
        let d = VhdxDriver::open(Box::new(MemStorage::from_bytes(diff_4k_image())), true).unwrap();
        assert_eq!(d.backing().unwrap().name, "base.vhdx");
        assert_eq!(d.read_state().geo.chunk_ratio, 32768);
        d.write_at(&[7u8; 4096], (2 << 20) + 8192, None).unwrap();
        let check = |d: &VhdxDriver| {
            let m = d.map(2 << 20, 1 << 20).unwrap();
            assert_eq!((m.kind, m.len), (MapKind::Unallocated, 8192));
            let m = d.map((2 << 20) + 8192, 1 << 20).unwrap();
            assert!(
                matches!(m.kind, MapKind::Data { .. }) && m.len == 4096,
                "{m:?}"
            );
            let m = d.map((2 << 20) + 12288, 1 << 20).unwrap();
            assert_eq!(m.kind, MapKind::Unallocated);
        };
        check(&d);
        // A partial sector needs the parent to complete it.
        assert!(d.write_at(&[1], 5 << 20, None).is_err());
        d.flush().unwrap();
        let mut all = vec![0u8; d.storage.len().unwrap() as usize];
        d.storage.read_at(&mut all, 0).unwrap();
        check(&VhdxDriver::open(Box::new(MemStorage::from_bytes(all)), false).unwrap());
    }

    #[test]
    fn relative_path_climbs_out_of_the_child_folder() {
        let p = relative_path(
            std::path::Path::new("/a/b/c"),
            std::path::Path::new("/a/d/p.vhdx"),
        );
        assert_eq!(p, "../../d/p.vhdx");
        let p = relative_path(
            std::path::Path::new("/a"),
            std::path::Path::new("/a/p.vhdx"),
        );
        assert_eq!(p, "p.vhdx");
    }

    #[test]
    fn probe_is_certain_with_a_valid_header() {
        let d = new_image(16 << 20, "");
        let mut head = vec![0u8; 192 * 1024];
        d.storage.read_at(&mut head, 0).unwrap();
        let len = d.storage.len().unwrap();
        let input = ProbeInput {
            head: &head,
            tail: &[],
            len,
        };
        assert_eq!(probe(&input), Some(Confidence::Certain));
        let input = ProbeInput {
            head: &head[..1024],
            tail: &[],
            len,
        };
        assert_eq!(probe(&input), Some(Confidence::Weak));
    }
}
