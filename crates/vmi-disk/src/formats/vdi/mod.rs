//! vdi: VirtualBox Disk Images, dynamic and static, read and write (VirtualBox `VDIHEADER1`
//! layout, qemu `block/vdi.c` semantics; see `docs/formats/vdi.md`).
//!
//! An image is a header sector ([`header`]), a block map of 32-bit little-endian entries (one per
//! guest block: a data block index, [`VDI_UNALLOCATED`] or [`VDI_DISCARDED`]), and the data blocks,
//! stored in allocation order from the data offset. A write to an unallocated block appends a new
//! data block (`offset_data + blocks_allocated * block_size`), writes the data first, then the
//! block map entry, then the blocks-allocated count. Static images have every block allocated at
//! creation, in order.
//!
//! The block map is held in memory (bounded by [`MAX_BLOCKS`] and by the file size). An image
//! whose map is inconsistent (entries beyond the allocated blocks or the file, shared data blocks,
//! a wrong allocated count) opens read-only, reports the faults in `check`, and refuses writes.

mod header;

use crate::check::{CheckMode, CheckReport};
use crate::driver::{Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{Confidence, CreateContext, Format, OpenContext, ProbeInput};
use crate::image::Image;
use crate::options::CreateOptions;
use crate::storage::Storage;
use header::{
    Layout, RawHeader, BLOCKS_ALLOCATED_OFFSET, DEFAULT_BLOCK_SIZE, HEADER_LEN, MAX_BLOCKS,
    SECTOR_SIZE, SIGNATURE_OFFSET, VDI_DISCARDED, VDI_DISK_SIZE_MAX, VDI_SIGNATURE,
    VDI_TYPE_DYNAMIC, VDI_TYPE_STATIC, VDI_UNALLOCATED, VDI_VERSION_1_1,
};
use std::any::Any;
use std::sync::{Mutex, MutexGuard};
use zerocopy::IntoBytes;

/// Bytes of block map read or written per I/O.
const BMAP_CHUNK: usize = 1 << 20;
/// Most block map entries one `map` call walks when merging adjacent blocks, so one call stays
/// cheap on a huge, empty image.
const MAX_MAP_BLOCKS: u64 = 1 << 16;

/// Whether a block map entry names a data block (anything below the two special values).
fn is_allocated(entry: u32) -> bool {
    entry < VDI_DISCARDED
}

/// `probe`: the signature at byte 0x40 and version 1.1 in a whole header sector is certain; the
/// signature alone is weak (a VDI that vmi cannot open is still not raw).
pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    let word = |at: usize| {
        input
            .head
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    if word(SIGNATURE_OFFSET)? != VDI_SIGNATURE {
        return None;
    }
    if word(SIGNATURE_OFFSET + 4) == Some(VDI_VERSION_1_1) && input.head.len() >= HEADER_LEN {
        Some(Confidence::Certain)
    } else {
        Some(Confidence::Weak)
    }
}

/// Mutable metadata, behind the driver's lock.
#[derive(Debug)]
struct State {
    /// The header's facts (the disk size, data offset and block count change on resize).
    layout: Layout,
    /// The block map, one entry per guest block.
    bmap: Vec<u32>,
    /// Data blocks stored (the next allocation's index).
    blocks_allocated: u32,
    /// Host file length, as far as this driver has seen or made it.
    file_len: u64,
}

/// An open VDI image.
#[derive(Debug)]
pub struct VdiDriver {
    storage: Box<dyn Storage>,
    /// Bytes per block (fixed for the image's life).
    block_size: u64,
    writable: bool,
    state: Mutex<State>,
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    if file_len < HEADER_LEN as u64 {
        return Err(Error::invalid(format!(
            "file is {file_len} bytes, shorter than the {HEADER_LEN}-byte VDI header"
        )));
    }
    let mut sector = [0u8; HEADER_LEN];
    storage
        .read_at(&mut sector, 0)
        .map_err(|e| Error::io("reading VDI header", e))?;
    let layout = RawHeader::parse(&sector)?.validate(file_len)?;
    let bmap = read_bmap(storage.as_ref(), &layout)?;
    let driver = VdiDriver {
        storage,
        block_size: layout.block_size,
        writable: ctx.writable,
        state: Mutex::new(State {
            layout,
            bmap,
            blocks_allocated: layout.blocks_allocated,
            file_len,
        }),
    };
    if ctx.writable {
        let report = driver.scan(&driver.lock());
        if report.corruptions > 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "VDI block map has {} corruption(s) ({}); open read-only and check it",
                    report.corruptions,
                    report.messages.first().map_or("", String::as_str)
                ),
            ));
        }
    }
    Ok(Box::new(driver))
}

/// Read the block map (its extent was validated against the file and [`MAX_BLOCKS`]).
fn read_bmap(storage: &dyn Storage, layout: &Layout) -> Result<Vec<u32>> {
    let at = layout.offset_bmap;
    crate::storage::read_le_u32_table(storage, at, layout.blocks_in_image as usize)
        .map_err(|e| Error::io(format!("reading VDI block map at {at:#x}"), e))
}

pub(crate) fn create(
    storage: Box<dyn Storage>,
    _ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    if opts.backing.is_some() {
        return Err(Error::usage("vdi images cannot have a backing file"));
    }
    let is_static = opts.options.bool("static")?.unwrap_or(false);
    // qemu accepts this key for the host file only; vmi takes `off` and points elsewhere.
    if let Some(p) = opts
        .options
        .choice("preallocation", &["off", "metadata", "falloc", "full"])?
    {
        if p != "off" {
            return Err(Error::usage(format!(
                "vdi preallocation={p} is not supported: use static=on for a fully allocated image"
            )));
        }
    }
    opts.options.finish("vdi")?;
    if opts.size > VDI_DISK_SIZE_MAX {
        return Err(Error::usage(format!(
            "vdi images are at most {VDI_DISK_SIZE_MAX} bytes, {} requested",
            opts.size
        )));
    }
    // qemu rounds the size up to a whole sector.
    let disk_size = opts.size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let block_size = u64::from(DEFAULT_BLOCK_SIZE);
    let blocks = u32::try_from(disk_size.div_ceil(block_size))
        .ok()
        .filter(|&b| b <= MAX_BLOCKS)
        .ok_or_else(|| {
            Error::limit(format!(
                "a {disk_size}-byte vdi image needs more than {MAX_BLOCKS} blocks"
            ))
        })?;
    let offset_bmap = HEADER_LEN as u64;
    let bmap_len = (u64::from(blocks) * 4).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let layout = Layout {
        image_type: if is_static {
            VDI_TYPE_STATIC
        } else {
            VDI_TYPE_DYNAMIC
        },
        offset_bmap,
        offset_data: offset_bmap + bmap_len,
        disk_size,
        block_size,
        blocks_in_image: blocks,
        blocks_allocated: if is_static { blocks } else { 0 },
    };
    let header = RawHeader::new(&layout)?;
    storage
        .write_at(header.as_bytes(), 0)
        .map_err(|e| Error::io("writing VDI header", e))?;
    // The block map, padded with unallocated entries to its sector.
    let entries = (bmap_len / 4) as usize;
    let mut chunk = Vec::with_capacity(BMAP_CHUNK.min(entries * 4));
    let mut written = 0usize;
    for i in 0..entries {
        let entry = match u32::try_from(i) {
            Ok(i) if is_static && i < blocks => i,
            _ => VDI_UNALLOCATED,
        };
        chunk.extend_from_slice(&entry.to_le_bytes());
        if chunk.len() == BMAP_CHUNK || i + 1 == entries {
            let at = offset_bmap + written as u64;
            storage
                .write_at(&chunk, at)
                .map_err(|e| Error::io(format!("writing VDI block map at {at:#x}"), e))?;
            written += chunk.len();
            chunk.clear();
        }
    }
    let file_len = if is_static {
        layout.offset_data + u64::from(blocks) * block_size
    } else {
        layout.offset_data
    };
    storage
        .set_len(file_len)
        .map_err(|e| Error::io("sizing VDI image", e))?;
    let bmap = (0..blocks)
        .map(|i| if is_static { i } else { VDI_UNALLOCATED })
        .collect();
    Ok(Box::new(VdiDriver {
        storage,
        block_size,
        writable: true,
        state: Mutex::new(State {
            layout,
            bmap,
            blocks_allocated: layout.blocks_allocated,
            file_len,
        }),
    }))
}

impl VdiDriver {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Host offset of data block `index`, validated against the block count and the file.
    fn data_block(&self, st: &State, guest_block: u64, index: u32) -> Result<u64> {
        let bs = self.block_size;
        let host = u64::from(index)
            .checked_mul(bs)
            .and_then(|o| o.checked_add(st.layout.offset_data))
            .filter(|_| index < st.layout.blocks_in_image);
        match host {
            Some(host) if host.checked_add(bs).is_some_and(|end| end <= st.file_len) => Ok(host),
            _ => Err(Error::invalid(format!(
                "VDI block map entry for guest block {guest_block} names data block {index}, \
                 beyond the {} blocks or the end of the file ({} bytes)",
                st.layout.blocks_in_image, st.file_len
            ))),
        }
    }

    /// What guest block `block` starts with.
    fn block_kind(&self, st: &State, block: u64) -> Result<MapKind> {
        let entry = usize::try_from(block)
            .ok()
            .and_then(|b| st.bmap.get(b))
            .copied()
            .ok_or_else(|| Error::invalid(format!("guest block {block} has no block map entry")))?;
        Ok(match entry {
            VDI_UNALLOCATED => MapKind::Unallocated,
            VDI_DISCARDED => MapKind::Zero,
            index => MapKind::Data {
                file: 0,
                offset: self.data_block(st, block, index)?,
            },
        })
    }

    /// The check of qemu's `vdi_check` (entries beyond the image, data blocks used twice, the
    /// allocated count) plus entries beyond the allocated blocks or the file, and leaked blocks.
    fn scan(&self, st: &State) -> CheckReport {
        let mut r = CheckReport::default();
        let n = st.layout.blocks_in_image;
        let mut used = vec![0u64; (n as usize).div_ceil(64)];
        let mut allocated = 0u64;
        for (block, &entry) in st.bmap.iter().enumerate() {
            if !is_allocated(entry) {
                continue;
            }
            if entry >= n {
                r.corruptions += 1;
                r.messages
                    .push(format!("ERROR: block index {block} too large, is {entry}"));
                continue;
            }
            allocated += 1;
            let (word, bit) = ((entry / 64) as usize, entry % 64);
            if let Some(w) = used.get_mut(word) {
                if *w & (1 << bit) != 0 {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR: data block {entry} is used by guest block {block} and another"
                    ));
                } else {
                    *w |= 1 << bit;
                }
            }
            if entry >= st.blocks_allocated {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR: guest block {block} names data block {entry}, beyond the {} allocated",
                    st.blocks_allocated
                ));
            } else if self.data_block(st, block as u64, entry).is_err() {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR: data block {entry} of guest block {block} lies beyond the end of the file ({} bytes)",
                    st.file_len
                ));
            }
        }
        if allocated != u64::from(st.blocks_allocated) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
                st.blocks_allocated
            ));
        } else {
            // Stored data blocks no entry names.
            let leaked = (0..st.blocks_allocated)
                .filter(|&i| {
                    used.get((i / 64) as usize)
                        .is_some_and(|w| w & (1 << (i % 64)) == 0)
                })
                .count() as u64;
            if leaked > 0 {
                r.leaks = leaked;
                r.messages.push(format!(
                    "Leaked data blocks: {leaked} (referenced by no guest block)"
                ));
            }
        }
        r
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::usage("image is not open for writing"))
        }
    }

    /// Write one block map entry and record it.
    fn set_entry(&self, st: &mut State, block: u64, entry: u32) -> Result<()> {
        let at = st.layout.offset_bmap + block * 4;
        self.storage
            .write_at(&entry.to_le_bytes(), at)
            .map_err(|e| Error::io(format!("writing VDI block map entry at {at:#x}"), e))?;
        if let Some(slot) = usize::try_from(block).ok().and_then(|b| st.bmap.get_mut(b)) {
            *slot = entry;
        }
        Ok(())
    }

    /// Allocate a data block for guest block `block` and store `data` at `within` in it. The rest
    /// of the block is completed from `backing` (when the block was never allocated) or zeroes.
    /// Data first, then the block map entry, then the allocated count.
    fn allocate(
        &self,
        st: &mut State,
        block: u64,
        within: u64,
        data: &[u8],
        backing: Option<&Image>,
    ) -> Result<()> {
        let bs = self.block_size;
        let index = st.blocks_allocated;
        if index >= st.layout.blocks_in_image {
            return Err(Error::invalid(format!(
                "VDI image has no free data block: {index} of {} allocated",
                st.layout.blocks_in_image
            )));
        }
        let host = st.layout.offset_data + u64::from(index) * bs;
        let whole = within == 0 && data.len() as u64 == bs;
        let entry = usize::try_from(block)
            .ok()
            .and_then(|b| st.bmap.get(b))
            .copied()
            .unwrap_or(VDI_UNALLOCATED);
        let from_backing = match backing {
            Some(b) if !whole && entry == VDI_UNALLOCATED => Some(b),
            _ => None,
        };
        let io = |e| Error::io(format!("writing VDI data block {index} at {host:#x}"), e);
        if let Some(b) = from_backing {
            // Bounded by MAX_BLOCK_SIZE.
            let mut buf = vec![0u8; bs as usize];
            let guest = block * bs;
            let avail = b.virtual_size().saturating_sub(guest).min(bs) as usize;
            b.read_at(&mut buf[..avail], guest)?;
            buf[within as usize..within as usize + data.len()].copy_from_slice(data);
            self.storage.write_at(&buf, host).map_err(io)?;
        } else {
            if !whole {
                if host >= st.file_len {
                    self.storage.set_len(host + bs).map_err(io)?;
                } else {
                    self.storage.write_zeroes(host, bs).map_err(io)?;
                }
            }
            self.storage.write_at(data, host + within).map_err(io)?;
        }
        st.file_len = st.file_len.max(host + bs);
        self.set_entry(st, block, index)?;
        st.blocks_allocated = index + 1;
        self.storage
            .write_at(&st.blocks_allocated.to_le_bytes(), BLOCKS_ALLOCATED_OFFSET)
            .map_err(|e| Error::io("writing VDI blocks-allocated count", e))
    }

    /// Rewrite the header fields resizing changes, keeping everything else as stored.
    fn write_layout(&self, st: &State) -> Result<()> {
        let mut sector = [0u8; HEADER_LEN];
        self.storage
            .read_at(&mut sector, 0)
            .map_err(|e| Error::io("reading VDI header", e))?;
        let mut h = RawHeader::parse(&sector)?;
        let offset_data = u32::try_from(st.layout.offset_data).map_err(|_| {
            Error::limit(format!(
                "VDI data offset {} does not fit in 32 bits",
                st.layout.offset_data
            ))
        })?;
        h.offset_data.set(offset_data);
        h.disk_size.set(st.layout.disk_size);
        h.blocks_in_image.set(st.layout.blocks_in_image);
        h.blocks_allocated.set(st.blocks_allocated);
        self.storage
            .write_at(h.as_bytes(), 0)
            .map_err(|e| Error::io("writing VDI header", e))
    }

    /// Write the whole block map.
    fn write_bmap(&self, st: &State) -> Result<()> {
        for (i, entries) in st.bmap.chunks(BMAP_CHUNK / 4).enumerate() {
            let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            let at = st.layout.offset_bmap + (i * BMAP_CHUNK) as u64;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| Error::io(format!("writing VDI block map at {at:#x}"), e))?;
        }
        Ok(())
    }

    /// Make room for a longer block map: move the first `k` data blocks to the end of the data
    /// area and start the data area `k` blocks later. Data is copied (holes stay holes) and synced
    /// before the block map is rewritten; the caller writes the map and header.
    fn relocate(&self, st: &mut State, k: u64) -> Result<()> {
        let bs = self.block_size;
        let old_data = st.layout.offset_data;
        let new_data = old_data + k * bs;
        if u32::try_from(new_data).is_err() {
            return Err(Error::limit(format!(
                "growing needs the VDI data offset at {new_data}, beyond 32 bits"
            )));
        }
        let allocated = u64::from(st.blocks_allocated);
        let base = allocated.max(k);
        let moved = allocated.min(k);
        let tail = old_data + base * bs;
        // Nothing valid lies at or after `tail` (every entry is below the allocated count).
        self.storage
            .set_len(tail)
            .and_then(|()| self.storage.set_len(tail + moved * bs))
            .map_err(|e| Error::io("extending VDI image for relocated blocks", e))?;
        let mut buf = vec![0u8; BMAP_CHUNK.min(bs as usize)];
        for i in 0..moved {
            let mut done = 0;
            while done < bs {
                let n = (bs - done).min(buf.len() as u64);
                let chunk = &mut buf[..n as usize];
                let src = old_data + i * bs + done;
                self.storage
                    .read_at(chunk, src)
                    .map_err(|e| Error::io(format!("reading VDI data at {src:#x}"), e))?;
                if !crate::storage::is_zero(chunk) {
                    let dst = tail + i * bs + done;
                    self.storage
                        .write_at(chunk, dst)
                        .map_err(|e| Error::io(format!("writing VDI data at {dst:#x}"), e))?;
                }
                done += n;
            }
        }
        self.storage
            .sync()
            .map_err(|e| Error::io("syncing relocated VDI blocks", e))?;
        for e in st.bmap.iter_mut().filter(|e| is_allocated(**e)) {
            // Entries are below the allocated count (writable images passed the check), so the
            // new indices are below it too.
            let i = u64::from(*e);
            let new = if i < k { base - k + i } else { i - k };
            *e = new as u32;
        }
        st.layout.offset_data = new_data;
        st.file_len = tail + moved * bs;
        Ok(())
    }

    /// Split `[offset, offset + len)` into per-block pieces: (block, offset within, length, done).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        let bs = self.block_size;
        let mut done = 0u64;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = offset + done;
            let within = pos % bs;
            let n = (bs - within).min(len - done);
            let item = (pos / bs, within, n, done);
            done += n;
            Some(item)
        })
    }
}

impl Driver for VdiDriver {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn virtual_size(&self) -> u64 {
        self.lock().layout.disk_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let st = self.lock();
        let len = len.min(st.layout.disk_size.saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let bs = self.block_size;
        let block = offset / bs;
        let within = offset % bs;
        let first = self.block_kind(&st, block)?;
        let kind = match first {
            MapKind::Data { file, offset } => MapKind::Data {
                file,
                offset: offset + within,
            },
            // A VDI has no backing file: an unallocated block is part of the image and reads as
            // zeroes, which is how qemu reports it (`map`: present, zero).
            MapKind::Unallocated => MapKind::Zero,
            k => k,
        };
        // Extend over following blocks that continue the same kind (contiguous data).
        let mut covered = (bs - within).min(len);
        let mut next = block + 1;
        while covered < len && next - block <= MAX_MAP_BLOCKS {
            let continues = match (first, self.block_kind(&st, next)) {
                (MapKind::Data { offset: a, .. }, Ok(MapKind::Data { offset: b, .. })) => {
                    b == a + (next - block) * bs
                }
                (a, Ok(b)) => a == b,
                (_, Err(_)) => false,
            };
            if !continues {
                break;
            }
            covered += bs.min(len - covered);
            next += 1;
        }
        Ok(Mapping {
            start: offset,
            len: covered,
            kind,
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.storage.as_ref()),
            _ => Err(Error::invalid(format!("vdi images have no file {index}"))),
        }
    }

    fn info(&self) -> FormatInfo {
        // qemu prints no format-specific data for vdi.
        FormatInfo {
            cluster_size: Some(self.block_size),
            ..FormatInfo::default()
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        self.ensure_writable()?;
        let mut st = self.lock();
        for (block, within, n, done) in self.pieces(offset, buf.len() as u64) {
            let data = &buf[done as usize..(done + n) as usize];
            match self.block_kind(&st, block)? {
                MapKind::Data { offset: host, .. } => self
                    .storage
                    .write_at(data, host + within)
                    .map_err(|e| Error::io(format!("writing at {:#x}", host + within), e))?,
                _ => self.allocate(&mut st, block, within, data, backing)?,
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        self.ensure_writable()?;
        let bs = self.block_size;
        let mut st = self.lock();
        for (block, within, n, _) in self.pieces(offset, len) {
            match self.block_kind(&st, block)? {
                MapKind::Data { offset: host, .. } => {
                    self.storage
                        .write_zeroes(host + within, n)
                        .map_err(|e| Error::io(format!("zeroing at {:#x}", host + within), e))?
                }
                // Unallocated blocks read as zeroes unless a backing image shows through.
                MapKind::Unallocated if backing.is_some() => {
                    if n == bs {
                        self.set_entry(&mut st, block, VDI_DISCARDED)?;
                    } else {
                        let zero = vec![0u8; n as usize];
                        self.allocate(&mut st, block, within, &zero, backing)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Grow the image (qemu cannot resize vdi images; vmi grows them). The block map grows in
    /// place when its sector padding has room, otherwise the first data blocks move to the end.
    /// Static images get their new blocks allocated. Shrinking is not supported.
    fn resize(&self, new_size: u64) -> Result<()> {
        self.ensure_writable()?;
        if new_size > VDI_DISK_SIZE_MAX {
            return Err(Error::usage(format!(
                "vdi images are at most {VDI_DISK_SIZE_MAX} bytes, {new_size} requested"
            )));
        }
        let new_size = new_size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let mut st = self.lock();
        if new_size < st.layout.disk_size {
            return Err(Error::unsupported("shrinking vdi images"));
        }
        let bs = self.block_size;
        let new_blocks = u32::try_from(new_size.div_ceil(bs))
            .ok()
            .filter(|&b| b <= MAX_BLOCKS)
            .ok_or_else(|| {
                Error::limit(format!(
                    "a {new_size}-byte vdi image needs more than {MAX_BLOCKS} blocks"
                ))
            })?;
        let old_blocks = st.layout.blocks_in_image;
        if new_blocks > old_blocks {
            let bmap_end = st.layout.offset_bmap + u64::from(new_blocks) * 4;
            if bmap_end > st.layout.offset_data {
                let k = (bmap_end - st.layout.offset_data).div_ceil(bs);
                self.relocate(&mut st, k)?;
                // Clear what is left of the moved blocks between the map and the data.
                let start = bmap_end.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
                if start < st.layout.offset_data {
                    self.storage
                        .write_zeroes(start, st.layout.offset_data - start)
                        .map_err(|e| Error::io("clearing VDI block map padding", e))?;
                }
            }
            st.bmap.resize(new_blocks as usize, VDI_UNALLOCATED);
            st.layout.blocks_in_image = new_blocks;
            if st.layout.image_type == VDI_TYPE_STATIC {
                for b in old_blocks..new_blocks {
                    let index = st.blocks_allocated;
                    if let Some(e) = st.bmap.get_mut(b as usize) {
                        *e = index;
                    }
                    st.blocks_allocated = index + 1;
                }
                let end = st.layout.offset_data + u64::from(st.blocks_allocated) * bs;
                if end > st.file_len {
                    self.storage
                        .set_len(end)
                        .map_err(|e| Error::io("allocating VDI blocks", e))?;
                    st.file_len = end;
                }
            }
            self.write_bmap(&st)?;
        }
        st.layout.disk_size = new_size;
        self.write_layout(&st)?;
        self.storage
            .sync()
            .map_err(|e| Error::io("syncing resized VDI image", e))
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.storage.sync().map_err(|e| Error::io("syncing", e))?;
        }
        Ok(())
    }

    fn check(&self, mode: CheckMode) -> Result<CheckReport> {
        if mode != CheckMode::ReadOnly {
            return Err(Error::unsupported("repairing vdi images"));
        }
        Ok(self.scan(&self.lock()))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Gate;
    use crate::storage::MemStorage;
    use crate::FormatOptions;
    use std::path::PathBuf;

    fn new_image(size: u64, opts: &str) -> Box<dyn Driver> {
        let mut fo = FormatOptions::new();
        fo.parse(opts).unwrap();
        let ctx = CreateContext {
            path: PathBuf::from("t.vdi"),
        };
        create(
            Box::new(MemStorage::new()),
            &ctx,
            &CreateOptions::new(size).options(fo),
        )
        .unwrap()
    }

    fn bytes_of(d: &dyn Driver) -> Vec<u8> {
        let s = d.file(0).unwrap();
        let mut v = vec![0u8; s.len().unwrap() as usize];
        s.read_at(&mut v, 0).unwrap();
        v
    }

    fn reopen(bytes: Vec<u8>, writable: bool) -> Result<Box<dyn Driver>> {
        let ctx = OpenContext {
            path: PathBuf::from("t.vdi"),
            writable,
            gate: Gate::deny_all(),
            secret: None,
        };
        open(Box::new(MemStorage::from_bytes(bytes)), &ctx)
    }

    #[test]
    fn create_writes_a_header_qemu_would_read() {
        let d = new_image(10 << 20, "");
        let b = bytes_of(d.as_ref());
        assert_eq!(b.len(), 1024);
        assert_eq!(&b[0x40..0x48], &[0x7f, 0x10, 0xda, 0xbe, 1, 0, 1, 0]);
        assert_eq!(&b[0x200..0x204], &[0xff; 4]);
        assert_eq!(
            probe(&ProbeInput {
                head: &b,
                tail: &[],
                len: 1024
            }),
            Some(Confidence::Certain)
        );
    }

    #[test]
    fn first_write_allocates_block_zero_and_counts_it() {
        let d = new_image(4 << 20, "");
        d.write_at(b"hello", (2 << 20) + 7, None).unwrap();
        let b = bytes_of(d.as_ref());
        assert_eq!(&b[0x208..0x20c], &0u32.to_le_bytes());
        assert_eq!(&b[0x184..0x188], &1u32.to_le_bytes());
        let d = reopen(b, false).unwrap();
        let m = d.map((2 << 20) + 7, 5).unwrap();
        assert_eq!(
            m.kind,
            MapKind::Data {
                file: 0,
                offset: 1024 + 7
            }
        );
        assert_eq!(d.map(0, 4 << 20).unwrap().len, 2 << 20);
    }

    #[test]
    fn static_images_map_every_block_in_order() {
        let d = new_image(3 << 20, "static=on");
        let m = d.map(0, 3 << 20).unwrap();
        assert_eq!(m.len, 3 << 20);
        assert_eq!(
            m.kind,
            MapKind::Data {
                file: 0,
                offset: 512 * 2
            }
        );
        assert_eq!(bytes_of(d.as_ref()).len(), 1024 + (3 << 20));
    }

    #[test]
    fn unknown_create_option_is_refused() {
        let mut fo = FormatOptions::new();
        fo.parse("cluster_size=64k").unwrap();
        let ctx = CreateContext {
            path: PathBuf::from("t.vdi"),
        };
        let e = create(
            Box::new(MemStorage::new()),
            &ctx,
            &CreateOptions::new(1 << 20).options(fo),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cluster_size"), "{e}");
    }

    #[test]
    fn duplicate_data_block_is_a_corruption_and_refuses_writes() {
        let d = new_image(2 << 20, "");
        d.write_at(&[1; 512], 0, None).unwrap();
        let mut b = bytes_of(d.as_ref());
        b[0x204..0x208].copy_from_slice(&0u32.to_le_bytes());
        let r = reopen(b.clone(), false)
            .unwrap()
            .check(CheckMode::ReadOnly)
            .unwrap();
        assert!(r.corruptions >= 1, "{r:?}");
        let e = reopen(b, true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn entry_beyond_file_fails_the_read_not_the_open() {
        let d = new_image(2 << 20, "");
        let mut b = bytes_of(d.as_ref());
        b[0x204..0x208].copy_from_slice(&1u32.to_le_bytes());
        b[0x184..0x188].copy_from_slice(&1u32.to_le_bytes());
        let d = reopen(b, false).unwrap();
        assert!(d.map(0, 1 << 20).is_ok());
        let e = d.map(1 << 20, 1).unwrap_err();
        assert!(e.to_string().contains("guest block 1"), "{e}");
        assert!(d.check(CheckMode::ReadOnly).unwrap().corruptions >= 1);
    }

    #[test]
    fn growing_past_the_map_padding_moves_data_blocks_to_the_end() {
        let d = new_image(4 << 20, "");
        d.write_at(&[7; 4096], 3 << 20, None).unwrap();
        // 300 GiB needs a 1.2 MB block map: two data blocks' worth, more than are allocated.
        d.resize(300 << 30).unwrap();
        let d = reopen(bytes_of(d.as_ref()), true).unwrap();
        assert_eq!(d.virtual_size(), 300 << 30);
        assert_eq!(
            d.check(CheckMode::ReadOnly).unwrap(),
            CheckReport::default()
        );
        let Ok(MapKind::Data { offset, .. }) = d.map(3 << 20, 4096).map(|m| m.kind) else {
            panic!("block 3 stays allocated");
        };
        let mut buf = [0u8; 4096];
        d.file(0).unwrap().read_at(&mut buf, offset).unwrap();
        assert_eq!(buf, [7; 4096]);
        assert_eq!(d.map(299 << 30, 1).unwrap().kind, MapKind::Zero);
    }

    #[test]
    fn shrinking_is_refused() {
        let d = new_image(4 << 20, "");
        assert_eq!(
            d.resize(1 << 20).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn preallocation_other_than_off_points_to_static() {
        let mut fo = FormatOptions::new();
        fo.parse("preallocation=full").unwrap();
        let ctx = CreateContext {
            path: PathBuf::from("t.vdi"),
        };
        let e = create(
            Box::new(MemStorage::new()),
            &ctx,
            &CreateOptions::new(1 << 20).options(fo),
        )
        .unwrap_err();
        assert!(e.to_string().contains("static=on"), "{e}");
    }

    #[test]
    fn probe_reports_weak_for_other_versions() {
        let mut b = vec![0u8; 512];
        b[0x40..0x44].copy_from_slice(&VDI_SIGNATURE.to_le_bytes());
        b[0x44..0x48].copy_from_slice(&0x0000_0001u32.to_le_bytes());
        let input = ProbeInput {
            head: &b,
            tail: &[],
            len: 512,
        };
        assert_eq!(probe(&input), Some(Confidence::Weak));
    }

    #[test]
    fn open_rejects_a_file_shorter_than_the_header() {
        let e = reopen(vec![0u8; 100], false).unwrap_err();
        assert!(e.to_string().contains("shorter"), "{e}");
    }
}
