//! vhd (qemu's `vpc`): Microsoft's Virtual Hard Disk, spec "Virtual Hard Disk Image Format
//! Specification" 1.0. Three disk types share one driver:
//!
//! - fixed: the guest bytes, then a 512-byte footer ([`footer`]);
//! - dynamic: a footer copy at offset 0, a dynamic disk header, a block allocation table and
//!   blocks of guest data each preceded by a sector bitmap ([`dynamic`]), the footer at the end;
//! - differencing: a dynamic disk whose cleared bitmap bits mean "read the parent", named by the
//!   header's parent locators.
//!
//! The guest size comes from the footer's current size or from its CHS geometry depending on the
//! creator application ([`geometry`], [`footer::Footer::uses_current_size`]). `docs/formats/vhd.md`
//! explains the choices (footer copies, probing fixed disks, limits).

pub mod dynamic;
pub mod footer;
pub mod geometry;

use crate::check::{CheckMode, CheckReport};
use crate::driver::{BackingSpec, Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, CreateContext, Format, OpenContext, ProbeInput};
use crate::gate::{check_reference_syntax, Referral};
use crate::image::Image;
use crate::options::CreateOptions;
use crate::storage::{FileStorage, Storage};
use dynamic::{
    bit, encode_utf16, locator_to_name, Header, RawLocator, BAT_UNALLOCATED, DEFAULT_BLOCK_SIZE,
    HEADER_SIZE, LOCATOR_COUNT, MAX_LOCATOR_LEN, MAX_TABLE_ENTRIES, PLATFORM_MACX, PLATFORM_W2KU,
    PLATFORM_W2RU, SECTOR,
};
use footer::{DiskType, Footer, FOOTER_SIZE};
use geometry::{geometry_for, plan, Chs};
use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Largest buffer used for bulk writes (copying a block up from the parent, zeroing, the BAT),
/// so a hostile 256 MiB block size never means a 256 MiB allocation.
const COPY_CHUNK: u64 = 4 << 20;

/// Probe: a dynamic or differencing disk starts with a footer copy and has a `cxsparse` header;
/// a fixed disk is only a footer at the end, so it is recognised only when that footer's checksum
/// is valid, its type is fixed and the file is exactly the current size plus the footer.
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    let head = input.head.get(..FOOTER_SIZE as usize);
    if let Some(head) = head.filter(|h| h.starts_with(&footer::FOOTER_COOKIE)) {
        let Ok(f) = Footer::parse(head, "footer copy") else {
            return Some(Confidence::Weak);
        };
        let at = usize::try_from(f.raw.data_offset.get()).ok();
        let hdr = at.and_then(|a| input.head.get(a..a.checked_add(HEADER_SIZE as usize)?));
        return Some(match hdr {
            Some(h) if f.disk_type != DiskType::Fixed && h.starts_with(&dynamic::HEADER_COOKIE) => {
                Confidence::Certain
            }
            _ => Confidence::Weak,
        });
    }
    let f = Footer::parse(input.tail, "footer").ok()?;
    let consistent = f.disk_type == DiskType::Fixed
        && f.raw.current_size.get().checked_add(FOOTER_SIZE) == Some(input.len);
    consistent.then_some(Confidence::Certain)
}

/// An open VHD.
#[derive(Debug)]
pub struct VhdDriver {
    storage: Box<dyn Storage>,
    writable: bool,
    disk_type: DiskType,
    size: AtomicU64,
    backing: Option<BackingSpec>,
    notes: Vec<String>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    footer: Footer,
    sparse: Option<Sparse>,
}

/// The metadata of a dynamic or differencing disk.
#[derive(Debug)]
struct Sparse {
    header: Header,
    header_offset: u64,
    bat: Vec<u32>,
    bitmap_size: u64,
    /// Where the footer lives and the next block goes.
    next_free: u64,
    /// The last sector bitmap read: (block index, bitmap).
    bitmap_cache: Option<(u64, Vec<u8>)>,
}

impl Sparse {
    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    /// Host offset of block `index`'s bitmap, or `None` when unallocated.
    fn block_offset(&self, index: u64) -> Option<u64> {
        let e = *self.bat.get(usize::try_from(index).ok()?)?;
        (e != BAT_UNALLOCATED).then(|| u64::from(e) * SECTOR)
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

fn read_exact(s: &dyn Storage, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| Error::limit(format!("{what}: {len} bytes")))?;
    let mut buf = vec![0u8; n];
    s.read_at(&mut buf, offset)
        .map_err(io(format!("reading {what} at offset {offset}")))?;
    Ok(buf)
}

/// Read the footer(s) of a file: the copy at offset 0 (sparse disks) and the one at the end.
/// Returns the footer to use, whether the end copy is the one in use, and notes about damage.
fn read_footers(s: &dyn Storage, len: u64) -> Result<(Footer, bool, Vec<String>)> {
    if len < FOOTER_SIZE {
        return Err(Error::invalid(format!(
            "file of {len} bytes is too small for a VHD footer"
        )));
    }
    let tail_at = len - FOOTER_SIZE;
    let tail = read_exact(s, tail_at, FOOTER_SIZE, "footer")?;
    let head = read_exact(s, 0, FOOTER_SIZE, "footer copy")?;
    let tail_footer = Footer::parse(&tail, &format!("footer at offset {tail_at}"));
    if !head.starts_with(&footer::FOOTER_COOKIE) {
        let f = tail_footer?;
        if f.disk_type != DiskType::Fixed {
            return Err(Error::invalid(format!(
                "footer at offset {tail_at} says the disk is {:?} but offset 0 holds no footer copy",
                f.disk_type
            )));
        }
        return Ok((f, true, Vec::new()));
    }
    let head_footer = Footer::parse(&head, "footer copy at offset 0");
    match (tail_footer, head_footer) {
        (Ok(t), Ok(_)) if head == tail => Ok((t, true, Vec::new())),
        (Ok(t), Ok(_)) => Ok((
            t,
            true,
            vec!["the footer copy at offset 0 differs from the footer at the end; using the end copy"
                .into()],
        )),
        (Ok(t), Err(e)) => Ok((
            t,
            true,
            vec![format!("{}; using the footer at the end", e.message())],
        )),
        (Err(e), Ok(h)) => Ok((
            h,
            false,
            vec![format!(
                "{}; using the copy at offset 0 (the end of the file may be truncated)",
                e.message()
            )],
        )),
        (Err(e), Err(_)) => Err(e.context("both VHD footers are damaged")),
    }
}

/// Open a VHD of any type: footers (spec "Hard Disk Footer Format"), then for sparse disks the
/// dynamic disk header, the BAT and, for differencing disks, the parent's name.
pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    let len = storage.len().map_err(io("reading size"))?;
    let (footer, tail_ok, mut notes) = read_footers(storage.as_ref(), len)?;
    let size = footer.virtual_size()?;
    let disk_type = footer.disk_type;
    let mut backing = None;
    let sparse = if disk_type == DiskType::Fixed {
        let data_end = if tail_ok { len - FOOTER_SIZE } else { len };
        if size > data_end {
            return Err(Error::invalid(format!(
                "fixed VHD declares {size} bytes but the file holds only {data_end} bytes of data"
            )));
        }
        None
    } else {
        let sp = open_sparse(storage.as_ref(), &footer, len, tail_ok, size, &mut notes)?;
        if disk_type == DiskType::Differencing {
            backing = Some(parent_spec(storage.as_ref(), &sp.header, len, &mut notes)?);
        }
        Some(sp)
    };
    Ok(Box::new(VhdDriver {
        storage,
        writable: ctx.writable,
        disk_type,
        size: AtomicU64::new(size),
        backing,
        notes,
        state: Mutex::new(State { footer, sparse }),
    }))
}

fn open_sparse(
    s: &dyn Storage,
    footer: &Footer,
    len: u64,
    tail_ok: bool,
    size: u64,
    notes: &mut Vec<String>,
) -> Result<Sparse> {
    let header_offset = footer.raw.data_offset.get();
    let header_end = header_offset
        .checked_add(HEADER_SIZE)
        .filter(|&e| e <= len && header_offset >= FOOTER_SIZE)
        .ok_or_else(|| {
            Error::invalid(format!(
                "footer places the dynamic disk header at offset {header_offset}, outside the \
                 {len}-byte file"
            ))
        })?;
    let hbytes = read_exact(s, header_offset, HEADER_SIZE, "dynamic disk header")?;
    let header = Header::parse(&hbytes, header_offset, len, size)?;
    let bat_bytes = u64::from(header.entries) * 4;
    let raw_bat = read_exact(s, header.bat_offset, bat_bytes, "block allocation table")?;
    let bat: Vec<u32> = raw_bat
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let bitmap_size = header.bitmap_size();
    let block_size = u64::from(header.block_size);
    let bat_end = header.bat_offset + bat_bytes;
    // Metadata the blocks must not overlap: footer copy, header, BAT.
    let reserved = [
        (0, FOOTER_SIZE),
        (header_offset, header_end),
        (header.bat_offset, bat_end),
    ];
    let mut next_free = header_end.max(bat_end).next_multiple_of(SECTOR);
    for (i, &e) in bat.iter().enumerate() {
        if e == BAT_UNALLOCATED {
            continue;
        }
        let start = u64::from(e) * SECTOR;
        let end = start + bitmap_size + block_size;
        if end > len {
            return Err(Error::invalid(format!(
                "BAT entry {i} places block {i} at offset {start}, its {} bytes end beyond the \
                 {len}-byte file",
                bitmap_size + block_size
            )));
        }
        if let Some((a, b)) = reserved.iter().find(|(a, b)| start < *b && *a < end) {
            return Err(Error::invalid(format!(
                "BAT entry {i} places block {i} at offset {start}, overlapping metadata at \
                 {a}..{b}"
            )));
        }
        next_free = next_free.max(end);
    }
    for l in &header.raw.locators {
        if l.platform_code != [0; 4] {
            // Data space is in bytes (Hyper-V) or, per the spec, in sectors when small.
            let space = u64::from(l.data_space.get());
            let space = if space < SECTOR {
                space * SECTOR
            } else {
                space
            };
            let end = l
                .data_offset
                .get()
                .saturating_add(space.max(u64::from(l.data_length.get())));
            if end <= len {
                next_free = next_free.max(end.next_multiple_of(SECTOR));
            }
        }
    }
    // New blocks go where the footer is (or after the end when the footer there is damaged).
    let footer_at = if tail_ok {
        len - FOOTER_SIZE
    } else {
        len.next_multiple_of(SECTOR)
    };
    if next_free > footer_at {
        notes.push(format!(
            "data ends at offset {next_free}, after the footer at offset {footer_at}"
        ));
    }
    Ok(Sparse {
        header,
        header_offset,
        bat,
        bitmap_size,
        next_free: next_free.max(footer_at),
        bitmap_cache: None,
    })
}

/// The parent a differencing disk names: the relative Windows locator first, then a Mac OS X URL,
/// then an absolute locator that is a host path, then the parent's file name beside the child.
fn parent_spec(
    s: &dyn Storage,
    header: &Header,
    len: u64,
    notes: &mut Vec<String>,
) -> Result<BackingSpec> {
    let mut found: Vec<([u8; 4], String)> = Vec::new();
    for (i, l) in header.raw.locators.iter().enumerate() {
        let code = l.platform_code;
        if ![PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX].contains(&code) {
            continue;
        }
        let (off, n) = (l.data_offset.get(), l.data_length.get());
        if n == 0 || n > MAX_LOCATOR_LEN || off.checked_add(u64::from(n)).is_none_or(|e| e > len) {
            notes.push(format!(
                "parent locator {i} ({}) of {n} bytes at offset {off} is out of bounds; ignored",
                String::from_utf8_lossy(&code)
            ));
            continue;
        }
        let data = read_exact(s, off, u64::from(n), "parent locator")?;
        match locator_to_name(code, &data) {
            Some(name) => found.push((code, name)),
            None => notes.push(format!(
                "parent locator {i} is not a readable path; ignored"
            )),
        }
    }
    let pick = |code: [u8; 4]| {
        found
            .iter()
            .find(|(c, n)| *c == code && !looks_like_drive_path(n))
            .map(|(_, n)| n.clone())
    };
    let name = pick(PLATFORM_W2RU)
        .or_else(|| pick(PLATFORM_MACX))
        .or_else(|| pick(PLATFORM_W2KU))
        .or_else(|| header.parent_unicode_name())
        .ok_or_else(|| Error::invalid("differencing VHD names no parent (no usable locator)"))?;
    Ok(BackingSpec {
        name,
        format: Some(Format::Vpc),
    })
}

/// `C:/...`: an absolute Windows path, meaningless on this host.
fn looks_like_drive_path(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

/// Create a VHD: `subformat=dynamic` (default) or `fixed`, `force_size=on|off`; a backing file
/// makes a differencing disk over it.
pub(crate) fn create(
    storage: Box<dyn Storage>,
    ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    let subformat = opts
        .options
        .choice("subformat", &["dynamic", "fixed"])?
        .unwrap_or_else(|| "dynamic".into());
    let force_size = opts.options.bool("force_size")?.unwrap_or(false);
    opts.options.finish("vpc")?;
    let mut uuid = *uuid::Uuid::new_v4().as_bytes();
    if uuid == [0; 16] {
        uuid[0] = 1;
    }
    let disk_type = match (subformat.as_str(), &opts.backing) {
        ("fixed", Some(_)) => {
            return Err(Error::usage(
                "a fixed VHD cannot have a backing file (use subformat=dynamic)",
            ))
        }
        ("fixed", None) => DiskType::Fixed,
        (_, Some(_)) => DiskType::Differencing,
        _ => DiskType::Dynamic,
    };
    let parent = match &opts.backing {
        Some(spec) => Some(ParentFacts::read(ctx, spec)?),
        None => None,
    };
    let mut footer = match &parent {
        // A child the parent's size copies the parent's size fields, so both read the same way.
        Some(p) if p.virtual_size == opts.size => {
            let mut f = Footer::new(disk_type, 0, p.chs, p.creator_app, uuid);
            f.raw.original_size.set(p.current_size);
            f.raw.current_size.set(p.current_size);
            f
        }
        _ => {
            let p = plan(opts.size, force_size)?;
            Footer::new(disk_type, p.size, p.chs, p.creator_app, uuid)
        }
    };
    let size = footer.virtual_size()?;
    let s = storage.as_ref();
    let sparse = if disk_type == DiskType::Fixed {
        s.set_len(size + FOOTER_SIZE).map_err(io("sizing"))?;
        s.write_at(&footer.to_bytes(), size)
            .map_err(io("writing footer"))?;
        None
    } else {
        Some(create_sparse(s, &mut footer, size, parent.as_ref())?)
    };
    Ok(Box::new(VhdDriver {
        storage,
        writable: true,
        disk_type,
        size: AtomicU64::new(size),
        backing: opts.backing.as_ref().map(|b| BackingSpec {
            name: b.name.clone(),
            format: Some(Format::Vpc),
        }),
        notes: Vec::new(),
        state: Mutex::new(State { footer, sparse }),
    }))
}

/// What a differencing child records about its parent.
#[derive(Debug)]
struct ParentFacts {
    unique_id: [u8; 16],
    timestamp: u32,
    virtual_size: u64,
    current_size: u64,
    chs: Chs,
    creator_app: [u8; 4],
    /// The name as given (relative to the child's folder, or absolute).
    name: String,
    /// The parent's absolute path.
    absolute: PathBuf,
}

impl ParentFacts {
    /// Open the parent named in `spec` (relative to the new image's folder) and read its footer.
    fn read(ctx: &CreateContext, spec: &BackingSpec) -> Result<ParentFacts> {
        check_reference_syntax(Referral::Backing, &spec.name)?;
        if spec.format.is_some_and(|f| f != Format::Vpc) {
            return Err(Error::usage(format!(
                "a differencing VHD needs a VHD parent, not {}",
                spec.format.map_or("?", Format::name)
            )));
        }
        let dir = match ctx.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let joined = if Path::new(&spec.name).is_absolute() {
            PathBuf::from(&spec.name)
        } else {
            dir.join(&spec.name)
        };
        let absolute = joined
            .canonicalize()
            .map_err(io(format!("opening parent {}", joined.display())))?;
        let st = FileStorage::open(&absolute, false)
            .map_err(io(format!("opening parent {}", absolute.display())))?;
        let len = st.len().map_err(io("reading parent size"))?;
        let (f, _, _) = read_footers(&st, len)
            .map_err(|e| e.context(format!("parent {}", absolute.display())))?;
        let mtime = std::fs::metadata(&absolute)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Ok(ParentFacts {
            unique_id: f.raw.unique_id,
            timestamp: footer::vhd_time(mtime),
            virtual_size: f.virtual_size()?,
            current_size: f.raw.current_size.get(),
            chs: f.chs(),
            creator_app: f.raw.creator_app,
            name: spec.name.clone(),
            absolute,
        })
    }
}

/// Lay out a new dynamic or differencing disk: footer copy, header, BAT, parent locators, footer.
fn create_sparse(
    s: &dyn Storage,
    footer: &mut Footer,
    size: u64,
    parent: Option<&ParentFacts>,
) -> Result<Sparse> {
    let block_size = DEFAULT_BLOCK_SIZE;
    let entries = u32::try_from(size.div_ceil(u64::from(block_size)))
        .ok()
        .filter(|&e| e <= MAX_TABLE_ENTRIES)
        .ok_or_else(|| Error::limit(format!("{size} bytes need too many VHD blocks")))?;
    let header_offset = FOOTER_SIZE;
    let bat_offset = header_offset + HEADER_SIZE;
    let bat_space = (u64::from(entries) * 4).next_multiple_of(SECTOR);
    let mut header = Header::new(bat_offset, entries, block_size);
    let mut next = bat_offset + bat_space;
    if let Some(p) = parent {
        header.raw.parent_unique_id = p.unique_id;
        header.raw.parent_timestamp.set(p.timestamp);
        let file_name = p
            .absolute
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.name.clone());
        let mut uname = encode_utf16(&file_name, false);
        uname.truncate(header.raw.parent_unicode_name.len());
        header.raw.parent_unicode_name[..uname.len()].copy_from_slice(&uname);
        let relative = if Path::new(&p.name).is_absolute() {
            None
        } else {
            Some(format!(".\\{}", p.name.replace('/', "\\")))
        };
        let absolute = p.absolute.to_string_lossy().into_owned();
        let mut slot = 0;
        for (code, text) in [(PLATFORM_W2RU, relative), (PLATFORM_W2KU, Some(absolute))] {
            let Some(text) = text else { continue };
            let data = encode_utf16(&text, true);
            let n = u32::try_from(data.len())
                .ok()
                .filter(|&n| n <= MAX_LOCATOR_LEN)
                .ok_or_else(|| Error::usage("parent path is too long for a VHD locator"))?;
            let space = u64::from(n).next_multiple_of(SECTOR);
            let l: &mut RawLocator = &mut header.raw.locators[slot];
            l.platform_code = code;
            l.data_space.set(u32::try_from(space).unwrap_or(u32::MAX));
            l.data_length.set(n);
            l.data_offset.set(next);
            let mut padded = data;
            padded.resize(usize::try_from(space).unwrap_or(0), 0);
            s.write_at(&padded, next)
                .map_err(io("writing parent locator"))?;
            next += space;
            slot += 1;
            if slot == LOCATOR_COUNT {
                break;
            }
        }
    }
    let bat = vec![BAT_UNALLOCATED; entries as usize];
    let ff = vec![0xffu8; usize::try_from(bat_space.min(COPY_CHUNK)).unwrap_or(0)];
    let mut done = 0;
    while done < bat_space {
        let n = (bat_space - done).min(ff.len() as u64) as usize;
        s.write_at(&ff[..n], bat_offset + done)
            .map_err(io("writing BAT"))?;
        done += n as u64;
    }
    s.write_at(&header.to_bytes(), header_offset)
        .map_err(io("writing dynamic disk header"))?;
    footer.raw.data_offset.set(header_offset);
    let fb = footer.to_bytes();
    s.write_at(&fb, 0).map_err(io("writing footer copy"))?;
    s.write_at(&fb, next).map_err(io("writing footer"))?;
    Ok(Sparse {
        bitmap_size: header.bitmap_size(),
        header,
        header_offset,
        bat,
        next_free: next,
        bitmap_cache: None,
    })
}

impl VhdDriver {
    /// The disk type.
    pub fn disk_type(&self) -> DiskType {
        self.disk_type
    }

    /// The footer's unique id (spec "Unique Id").
    pub fn unique_id(&self) -> [u8; 16] {
        self.lock().footer.raw.unique_id
    }

    /// The unique id a differencing disk records for its parent (spec "Parent Unique ID"); a
    /// caller that opened the parent compares it with the parent's [`VhdDriver::unique_id`].
    pub fn parent_unique_id(&self) -> Option<[u8; 16]> {
        if self.disk_type != DiskType::Differencing {
            return None;
        }
        let st = self.lock();
        st.sparse.as_ref().map(|sp| sp.header.raw.parent_unique_id)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::usage("image is not open for writing"))
        }
    }

    /// The sector bitmap of allocated block `index` at host offset `at`, cached.
    fn bitmap<'a>(&self, sp: &'a mut Sparse, index: u64, at: u64) -> Result<&'a [u8]> {
        let hit = matches!(&sp.bitmap_cache, Some((i, _)) if *i == index);
        if !hit {
            let bm = read_exact(self.storage.as_ref(), at, sp.bitmap_size, "sector bitmap")?;
            sp.bitmap_cache = Some((index, bm));
        }
        Ok(sp
            .bitmap_cache
            .as_ref()
            .map_or(&[][..], |(_, b)| b.as_slice()))
    }

    /// The host offset of `len` guest bytes at `offset` (inside one block) when the block is
    /// allocated and all their sectors are present.
    fn present_range(&self, offset: u64, len: u64) -> Result<Option<u64>> {
        let mut st = self.lock();
        let Some(sp) = st.sparse.as_mut() else {
            return Ok(None);
        };
        let m = self.map_sparse(sp, offset, len)?;
        Ok(match m.kind {
            MapKind::Data { offset: at, .. } if m.len == len => Some(at),
            _ => None,
        })
    }

    /// Map within a sparse disk.
    fn map_sparse(&self, sp: &mut Sparse, offset: u64, len: u64) -> Result<Mapping> {
        let bs = sp.block_size();
        let index = offset / bs;
        let in_block = offset % bs;
        let Some(at) = sp.block_offset(index) else {
            // Extend over following unallocated blocks.
            let mut end = (index + 1) * bs;
            while end < offset + len && sp.block_offset(end / bs).is_none() {
                end += bs;
            }
            return Ok(Mapping {
                start: offset,
                len: len.min(end - offset),
                kind: MapKind::Unallocated,
            });
        };
        let max = len.min(bs - in_block);
        let data_at = at + sp.bitmap_size + in_block;
        let bm = self.bitmap(sp, index, at)?;
        let first = in_block / SECTOR;
        let present = bit(bm, first);
        let last = (in_block + max - 1) / SECTOR;
        let mut sector = first + 1;
        while sector <= last && bit(bm, sector) == present {
            sector += 1;
        }
        let run = (sector * SECTOR - in_block).min(max);
        Ok(Mapping {
            start: offset,
            len: run,
            kind: if present {
                MapKind::Data {
                    file: 0,
                    offset: data_at,
                }
            } else {
                MapKind::Unallocated
            },
        })
    }

    /// Guest bytes of `buf.len()` at `offset` as this disk shows them below a write: data sectors
    /// from the file, the rest from `backing` (or zeroes). `offset..+len` lies inside one block.
    fn read_below(
        &self,
        sp: &mut Sparse,
        buf: &mut [u8],
        offset: u64,
        backing: Option<&Image>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let m = self.map_sparse(sp, pos, (buf.len() - done) as u64)?;
            let n = m.len as usize;
            let out = &mut buf[done..done + n];
            match m.kind {
                MapKind::Data { offset: at, .. } => self
                    .storage
                    .read_at(out, at)
                    .map_err(io(format!("reading at {at}")))?,
                _ => read_parent(out, pos, backing, self.disk_type)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Write `buf` at `offset`, inside one block.
    fn write_in_block(
        &self,
        st: &mut State,
        buf: &[u8],
        offset: u64,
        backing: Option<&Image>,
    ) -> Result<()> {
        let size = self.virtual_size();
        let Some(sp) = st.sparse.as_mut() else {
            return Err(Error::invalid("internal: block write on a fixed disk"));
        };
        let bs = sp.block_size();
        let index = offset / bs;
        let in_block = offset % bs;
        match sp.block_offset(index) {
            Some(at) => {
                let first = in_block / SECTOR;
                let last = (in_block + buf.len() as u64 - 1) / SECTOR;
                let bm = self.bitmap(sp, index, at)?;
                if (first..=last).all(|s| bit(bm, s)) {
                    let data_at = at + sp.bitmap_size + in_block;
                    return self
                        .storage
                        .write_at(buf, data_at)
                        .map_err(io(format!("writing at {data_at}")));
                }
                // Some touched sectors are not present yet: write whole sectors, completed from
                // what lies below, then mark them present.
                let partial_sectors =
                    in_block % SECTOR != 0 || (in_block + buf.len() as u64) % SECTOR != 0;
                if self.disk_type == DiskType::Differencing && backing.is_none() && partial_sectors
                {
                    return Err(Error::usage(
                        "writing sectors a differencing VHD leaves to its parent needs the parent \
                         opened",
                    ));
                }
                let start = first * SECTOR;
                let end = ((last + 1) * SECTOR).min(bs);
                let mut merged = vec![0u8; (end - start) as usize];
                let base = index * bs;
                let readable = (size.saturating_sub(base + start)).min(end - start) as usize;
                self.read_below(sp, &mut merged[..readable], base + start, backing)?;
                let skip = (in_block - start) as usize;
                merged[skip..skip + buf.len()].copy_from_slice(buf);
                let data_at = at + sp.bitmap_size + start;
                self.storage
                    .write_at(&merged, data_at)
                    .map_err(io(format!("writing at {data_at}")))?;
                let mut bm = self.bitmap(sp, index, at)?.to_vec();
                for s in first..=last {
                    if let Some(b) = bm.get_mut((s / 8) as usize) {
                        *b |= 0x80 >> (s % 8);
                    }
                }
                self.storage
                    .write_at(&bm, at)
                    .map_err(io(format!("writing sector bitmap at {at}")))?;
                sp.bitmap_cache = Some((index, bm));
                Ok(())
            }
            None => self.allocate(st, buf, offset, backing),
        }
    }

    /// Allocate the block holding `offset` at the end of the file and write `buf` into it: data
    /// and bitmap first, then the footer at the new end, then the BAT entry.
    fn allocate(
        &self,
        st: &mut State,
        buf: &[u8],
        offset: u64,
        backing: Option<&Image>,
    ) -> Result<()> {
        let size = self.virtual_size();
        let fb = st.footer.to_bytes();
        let Some(sp) = st.sparse.as_mut() else {
            return Err(Error::invalid("internal: allocation on a fixed disk"));
        };
        let bs = sp.block_size();
        let index = offset / bs;
        let in_block = offset % bs;
        let slot = usize::try_from(index)
            .ok()
            .filter(|&i| i < sp.bat.len())
            .ok_or_else(|| Error::invalid(format!("block {index} is beyond the BAT")))?;
        let at = sp.next_free;
        let sector = u32::try_from(at / SECTOR).map_err(|_| {
            Error::limit(format!(
                "VHD file would exceed {} bytes",
                u64::from(u32::MAX) * SECTOR
            ))
        })?;
        let data_at = at + sp.bitmap_size;
        let block_end = data_at + bs;
        let old_len = self.storage.len().map_err(io("reading size"))?;
        let s = self.storage.as_ref();
        if self.disk_type == DiskType::Differencing && buf.len() as u64 != bs {
            // Copy the parent's view of the block, overlaid with the write, in bounded pieces.
            if backing.is_none() {
                return Err(Error::usage(
                    "writing part of a block of a differencing VHD needs its parent opened",
                ));
            }
            let base = index * bs;
            let guest = size.saturating_sub(base).min(bs);
            let (wstart, wend) = (in_block, in_block + buf.len() as u64);
            let mut piece = vec![0u8; bs.min(COPY_CHUNK) as usize];
            let mut pos = 0;
            while pos < bs {
                let n = (bs - pos).min(COPY_CHUNK);
                let chunk = &mut piece[..n as usize];
                let readable = guest.saturating_sub(pos).min(n) as usize;
                read_parent(&mut chunk[..readable], base + pos, backing, self.disk_type)?;
                chunk[readable..].fill(0);
                let (a, b) = (wstart.max(pos), wend.min(pos + n));
                if a < b {
                    chunk[(a - pos) as usize..(b - pos) as usize]
                        .copy_from_slice(&buf[(a - wstart) as usize..(b - wstart) as usize]);
                }
                s.write_at(chunk, data_at + pos)
                    .map_err(io(format!("writing block at {}", data_at + pos)))?;
                pos += n;
            }
        } else {
            // Bytes of the block not written must read as zero: only the part of the block below
            // the old end of file can hold anything else.
            let zero_to = old_len.min(block_end);
            let wstart = data_at + in_block;
            let wend = wstart + buf.len() as u64;
            for (a, b) in [(data_at, wstart.min(zero_to)), (wend, zero_to)] {
                if b > a {
                    crate::storage::write_zero_bytes(s, a, b - a)
                        .map_err(io(format!("zeroing at {a}")))?;
                }
            }
            s.write_at(buf, wstart)
                .map_err(io(format!("writing at {wstart}")))?;
        }
        let bm = vec![0xffu8; sp.bitmap_size as usize];
        s.write_at(&bm, at)
            .map_err(io(format!("writing sector bitmap at {at}")))?;
        s.write_at(&fb, block_end)
            .map_err(io(format!("writing footer at {block_end}")))?;
        let entry_at = sp.header.bat_offset + index * 4;
        s.write_at(&sector.to_be_bytes(), entry_at)
            .map_err(io(format!("writing BAT entry at {entry_at}")))?;
        sp.bat[slot] = sector;
        sp.next_free = block_end;
        sp.bitmap_cache = Some((index, bm));
        Ok(())
    }

    /// Rewrite the footer at the end (and its copy at offset 0 for sparse disks).
    fn write_footers(&self, st: &State) -> Result<()> {
        let fb = st.footer.to_bytes();
        let s = self.storage.as_ref();
        match &st.sparse {
            Some(sp) => {
                s.write_at(&fb, sp.next_free)
                    .map_err(io("writing footer"))?;
                s.write_at(&fb, 0).map_err(io("writing footer copy"))?;
            }
            None => {
                let len = s.len().map_err(io("reading size"))?;
                s.write_at(&fb, len.saturating_sub(FOOTER_SIZE))
                    .map_err(io("writing footer"))?;
            }
        }
        Ok(())
    }

    /// The size fields for a new size, following the image's own size rule.
    fn resized_footer(&self, footer: &Footer, new_size: u64) -> Result<Footer> {
        if new_size % SECTOR != 0 {
            return Err(Error::usage(format!(
                "VHD sizes are whole sectors; {new_size} is not a multiple of 512"
            )));
        }
        let mut f = footer.clone();
        if footer.uses_current_size() {
            if footer.chs() != Chs::MAX {
                let chs = geometry_for(new_size / SECTOR);
                f.raw.cylinders.set(chs.cylinders);
                f.raw.heads = chs.heads;
                f.raw.sectors_per_track = chs.sectors_per_track;
            }
        } else {
            let p = plan(new_size, false)?;
            if p.size != new_size {
                return Err(Error::usage(format!(
                    "this VHD's size comes from its CHS geometry, which cannot express {new_size} \
                     bytes; try {} bytes",
                    p.size
                )));
            }
            f.raw.cylinders.set(p.chs.cylinders);
            f.raw.heads = p.chs.heads;
            f.raw.sectors_per_track = p.chs.sectors_per_track;
        }
        f.raw.current_size.set(new_size);
        if f.virtual_size()? != new_size {
            return Err(Error::usage(format!(
                "cannot record {new_size} bytes in this VHD's footer"
            )));
        }
        Ok(f)
    }
}

/// Fill `out` with the parent's bytes at `offset` (zeroes past its end or without a parent).
fn read_parent(
    out: &mut [u8],
    offset: u64,
    backing: Option<&Image>,
    disk_type: DiskType,
) -> Result<()> {
    match backing {
        Some(b) if disk_type == DiskType::Differencing => {
            let avail = b
                .virtual_size()
                .saturating_sub(offset)
                .min(out.len() as u64) as usize;
            if avail > 0 {
                b.read_at(&mut out[..avail], offset)?;
            }
            out[avail..].fill(0);
        }
        _ => out.fill(0),
    }
    Ok(())
}

impl Driver for VhdDriver {
    fn format(&self) -> Format {
        Format::Vpc
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let size = self.virtual_size();
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let mut st = self.lock();
        match st.sparse.as_mut() {
            None => Ok(Mapping {
                start: offset,
                len,
                kind: MapKind::Data { file: 0, offset },
            }),
            Some(sp) => self.map_sparse(sp, offset, len),
        }
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.storage.as_ref()),
            _ => Err(Error::invalid(format!("VHD images have no file {index}"))),
        }
    }

    fn backing(&self) -> Option<&BackingSpec> {
        self.backing.as_ref()
    }

    /// Spec "Dynamic Disk Header Format", Parent Unique ID: a differencing disk names its parent
    /// and records the parent footer's Unique Id; a parent whose id differs is another disk.
    fn verify_backing(&self, backing: &Image) -> Result<()> {
        let Some(recorded) = self.parent_unique_id() else {
            return Ok(());
        };
        // All zeroes: the creator did not record the parent's identity.
        if recorded == [0u8; 16] {
            return Ok(());
        }
        let Some(parent) = backing.driver().as_any().downcast_ref::<VhdDriver>() else {
            return Ok(());
        };
        let actual = parent.unique_id();
        if actual != recorded {
            return Err(Error::invalid(format!(
                "parent {} is not the disk this differencing VHD was made from: its Unique Id is \
                 {} but the child records Parent Unique ID {}",
                backing.path().display(),
                uuid::Uuid::from_bytes(actual),
                uuid::Uuid::from_bytes(recorded)
            )));
        }
        Ok(())
    }

    fn info(&self) -> FormatInfo {
        let st = self.lock();
        FormatInfo {
            cluster_size: st.sparse.as_ref().map(Sparse::block_size),
            ..FormatInfo::default()
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        self.check_writable()?;
        let mut st = self.lock();
        let Some(bs) = st.sparse.as_ref().map(Sparse::block_size) else {
            return self
                .storage
                .write_at(buf, offset)
                .map_err(io(format!("writing at {offset}")));
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((bs - pos % bs) as usize).min(buf.len() - done);
            self.write_in_block(&mut st, &buf[done..done + n], pos, backing)?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        self.check_writable()?;
        let bs = {
            let st = self.lock();
            match st.sparse.as_ref() {
                None => {
                    return self
                        .storage
                        .write_zeroes(offset, len)
                        .map_err(io(format!("zeroing at {offset}")))
                }
                Some(sp) => sp.block_size(),
            }
        };
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let n = (bs - pos % bs).min(len - done);
            let allocated = {
                let st = self.lock();
                st.sparse
                    .as_ref()
                    .and_then(|sp| sp.block_offset(pos / bs))
                    .is_some()
            };
            // An unallocated block of a dynamic disk already reads as zeroes; allocated ranges
            // whose sectors are all present are zeroed (or punched) in place.
            if allocated {
                if let Some(at) = self.present_range(pos, n)? {
                    self.storage
                        .write_zeroes(at, n)
                        .map_err(io(format!("zeroing at {at}")))?;
                    done += n;
                    continue;
                }
            }
            if allocated || self.disk_type == DiskType::Differencing {
                let zero = vec![0u8; n.min(COPY_CHUNK) as usize];
                let mut z = 0;
                while z < n {
                    let m = (n - z).min(COPY_CHUNK);
                    self.write_at(&zero[..m as usize], pos + z, backing)?;
                    z += m;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.storage.sync().map_err(io("syncing"))?;
        }
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let old = self.virtual_size();
        if new_size < old {
            return Err(Error::unsupported("shrinking VHD images"));
        }
        let mut st = self.lock();
        let footer = self.resized_footer(&st.footer, new_size)?;
        let s = self.storage.as_ref();
        match st.sparse.as_mut() {
            None => {
                let len = s.len().map_err(io("reading size"))?;
                let old_footer_at = len.saturating_sub(FOOTER_SIZE);
                // New footer first, then the file cut to end with it, then the old footer (now
                // guest data) cleared.
                s.write_at(&footer.to_bytes(), new_size)
                    .map_err(io("writing footer"))?;
                s.set_len(new_size + FOOTER_SIZE).map_err(io("sizing"))?;
                let clear_to = len.min(new_size);
                if old_footer_at < clear_to {
                    crate::storage::write_zero_bytes(s, old_footer_at, clear_to - old_footer_at)
                        .map_err(io("clearing the old footer"))?;
                }
                st.footer = footer;
                self.size.store(new_size, Ordering::Relaxed);
            }
            Some(sp) => {
                let bs = sp.block_size();
                let needed = u32::try_from(new_size.div_ceil(bs))
                    .ok()
                    .filter(|&e| e <= MAX_TABLE_ENTRIES)
                    .ok_or_else(|| Error::limit("too many VHD blocks for the new size"))?;
                if needed > sp.header.entries {
                    grow_bat(s, sp, needed)?;
                }
                st.footer = footer;
                self.size.store(new_size, Ordering::Relaxed);
                self.write_footers(&st)?;
            }
        }
        Ok(())
    }

    fn check(&self, mode: CheckMode) -> Result<CheckReport> {
        let st = self.lock();
        let mut report = CheckReport {
            messages: self.notes.clone(),
            ..CheckReport::default()
        };
        if let Some(sp) = &st.sparse {
            let span = sp.bitmap_size + sp.block_size();
            let mut blocks: Vec<(u64, usize)> = sp
                .bat
                .iter()
                .enumerate()
                .filter(|(_, &e)| e != BAT_UNALLOCATED)
                .map(|(i, &e)| (u64::from(e) * SECTOR, i))
                .collect();
            blocks.sort_unstable();
            for w in blocks.windows(2) {
                if w[0].0 + span > w[1].0 {
                    report.corruptions += 1;
                    report.messages.push(format!(
                        "ERROR blocks {} and {} overlap at offset {}",
                        w[0].1, w[1].1, w[1].0
                    ));
                }
            }
            report.total_clusters = Some(u64::from(sp.header.entries));
            report.allocated_clusters = Some(blocks.len() as u64);
            report.image_end_offset = Some(sp.next_free + FOOTER_SIZE);
        }
        if mode == CheckMode::RepairAll && !self.notes.is_empty() && self.writable {
            // The footer in use passed its checks: write it back to both places.
            self.write_footers(&st)?;
            report.corruptions_fixed = self.notes.len() as u64;
        } else {
            report.corruptions += self.notes.len() as u64;
        }
        Ok(report)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Give a sparse disk a BAT of `entries`: in place when the sectors after it are free, otherwise
/// moved to the end of the file. New entries are unallocated. The caller rewrites the footers.
fn grow_bat(s: &dyn Storage, sp: &mut Sparse, entries: u32) -> Result<()> {
    let old_bytes = u64::from(sp.header.entries) * 4;
    let new_bytes = u64::from(entries) * 4;
    let bat_offset = sp.header.bat_offset;
    // The first structure after the BAT bounds in-place growth.
    let mut room_end = sp.next_free;
    for &e in sp.bat.iter().filter(|&&e| e != BAT_UNALLOCATED) {
        let at = u64::from(e) * SECTOR;
        if at > bat_offset {
            room_end = room_end.min(at);
        }
    }
    for l in &sp.header.raw.locators {
        let at = l.data_offset.get();
        if l.platform_code != [0; 4] && at > bat_offset {
            room_end = room_end.min(at);
        }
    }
    if sp.header_offset > bat_offset {
        room_end = room_end.min(sp.header_offset);
    }
    let mut new_offset = bat_offset;
    let ff = vec![0xffu8; usize::try_from(new_bytes - old_bytes).unwrap_or(0)];
    if bat_offset + new_bytes <= room_end {
        s.write_at(&ff, bat_offset + old_bytes)
            .map_err(io("extending BAT"))?;
    } else {
        new_offset = sp.next_free;
        let mut table: Vec<u8> = sp.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
        table.extend_from_slice(&ff);
        table.resize(new_bytes.next_multiple_of(SECTOR) as usize, 0xff);
        s.write_at(&table, new_offset)
            .map_err(io("writing moved BAT"))?;
        sp.next_free = new_offset + table.len() as u64;
    }
    sp.bat.resize(entries as usize, BAT_UNALLOCATED);
    sp.header.entries = entries;
    sp.header.bat_offset = new_offset;
    sp.header.raw.max_table_entries.set(entries);
    sp.header.raw.table_offset.set(new_offset);
    s.write_at(&sp.header.to_bytes(), sp.header_offset)
        .map_err(io("writing dynamic disk header"))?;
    Ok(())
}

#[cfg(test)]
mod tests;
