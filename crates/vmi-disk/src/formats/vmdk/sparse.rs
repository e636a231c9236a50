//! Hosted sparse extents (VMware "Virtual Disk Format 1.1", section "Hosted Sparse Extents"): the
//! `KDMV` header, the grain directory (GD) and its redundant copy, grain tables (GT) of 512 entries,
//! and grains. Also the stream-optimized variant's footer (section "Stream-Optimized Compressed
//! Sparse Extents") when the header says the directory is at the end.
//!
//! Every table location read from the file is checked against the file size and the caps below
//! before it is read; grain table entries are checked against the file size when they are used.

use super::descriptor::SECTOR;
use super::stream;
use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::storage::Storage;
use std::collections::HashMap;
use std::sync::Mutex;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `KDMV`: the magic every hosted sparse extent header starts with (VMDK 1.1, `SPARSE_MAGICNUMBER`
/// 0x564d444b stored little-endian).
pub const SPARSE_MAGIC: [u8; 4] = *b"KDMV";
/// `COWD`: the magic of ESX-hosted sparse extents (VMDK 1.1, "ESX Server Sparse Extents"); not
/// supported.
pub const COWD_MAGIC: [u8; 4] = *b"COWD";
/// Highest header version (3 is stream-optimized with markers; qemu accepts 1 to 3).
pub const MAX_VERSION: u32 = 3;
/// Flag bit 0: the newline-detection characters are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag bit 1: the redundant grain directory is used.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag bit 2: grain table entries may hold 1, "zeroed grain" (version 2 and later).
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag bit 16: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag bit 17: the extent contains markers (stream-optimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `compressAlgorithm` value for deflate (zlib streams).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// `gdOffset` meaning "the grain directory is at the end; read the footer" (VMDK 1.1,
/// `GD_AT_END`).
pub const GD_AT_END: u64 = 0xffff_ffff_ffff_ffff;
/// Grain table entry meaning "this grain reads as zeroes" when [`FLAG_ZERO_GRAIN`] is set.
pub const GTE_ZEROED: u32 = 1;
/// Grain table entries per table: the spec fixes 512, qemu rejects more.
pub const GTES_PER_GT: u32 = 512;
/// Default grain: 128 sectors (64 KiB), the only size qemu writes.
pub const DEFAULT_GRAIN_SECTORS: u64 = 128;
/// Largest grain accepted: 16 MiB. qemu accepts up to 1 GiB, but a compressed grain is inflated
/// into memory whole, so a hostile header must not be able to ask for more than this.
pub const MAX_GRAIN_SECTORS: u64 = (16 << 20) / SECTOR;
/// Most grain directory entries: 4 Mi entries (16 MiB of directory, 128 TiB of 64 KiB grains).
pub const MAX_GD_ENTRIES: u64 = 1 << 22;
/// Largest capacity accepted: 64 TiB in sectors (VMware's own limit for a hosted disk is 8 TiB;
/// qemu's VMDK driver tops out well below 2^64 too).
pub const MAX_CAPACITY_SECTORS: u64 = (64u64 << 40) / SECTOR;
/// Grain tables kept in memory per extent (each 2 KiB): bounded cache.
const GT_CACHE_ENTRIES: usize = 512;

/// The hosted sparse extent header: sector 0 of the extent (VMDK 1.1, `SparseExtentHeader`).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// `magicNumber`: [`SPARSE_MAGIC`].
    pub magic: [u8; 4],
    /// `version`: 1, 2 (zeroed-grain GTEs) or 3 (stream-optimized).
    pub version: U32,
    /// `flags`: `FLAG_*`.
    pub flags: U32,
    /// `capacity`: sectors of guest data in this extent.
    pub capacity: U64,
    /// `grainSize`: sectors per grain.
    pub grain_size: U64,
    /// `descriptorOffset`: sector of the embedded descriptor, 0 if none.
    pub descriptor_offset: U64,
    /// `descriptorSize`: sectors of the embedded descriptor.
    pub descriptor_size: U64,
    /// `numGTEsPerGT`: entries per grain table (512).
    pub num_gtes_per_gt: U32,
    /// `rgdOffset`: sector of the redundant grain directory.
    pub rgd_offset: U64,
    /// `gdOffset`: sector of the grain directory, or [`GD_AT_END`].
    pub gd_offset: U64,
    /// `overHead`: sectors occupied by metadata at the start of the extent.
    pub overhead: U64,
    /// `uncleanShutdown`: set while open for writing.
    pub unclean_shutdown: u8,
    /// `singleEndLineChar`: `'\n'`.
    pub single_end_line_char: u8,
    /// `nonEndLineChar`: `' '`.
    pub non_end_line_char: u8,
    /// `doubleEndLineChar1`: `'\r'`.
    pub double_end_line_char1: u8,
    /// `doubleEndLineChar2`: `'\n'`.
    pub double_end_line_char2: u8,
    /// `compressAlgorithm`: 0 none, 1 deflate.
    pub compress_algorithm: U16,
    /// `pad`: zeroes up to 512 bytes.
    pub pad: [u8; 433],
}

impl RawHeader {
    /// A header with the fixed fields (magic, newline characters) filled in.
    pub fn new(version: u32, flags: u32, capacity: u64, grain: u64) -> RawHeader {
        let mut h = RawHeader::new_zeroed();
        h.magic = SPARSE_MAGIC;
        h.version = version.into();
        h.flags = flags.into();
        h.capacity = capacity.into();
        h.grain_size = grain.into();
        h.num_gtes_per_gt = GTES_PER_GT.into();
        h.single_end_line_char = b'\n';
        h.non_end_line_char = b' ';
        h.double_end_line_char1 = b'\r';
        h.double_end_line_char2 = b'\n';
        h
    }
}

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Header version.
    pub version: u32,
    /// Flags.
    pub flags: u32,
    /// Guest sectors.
    pub capacity: u64,
    /// Sectors per grain (power of two, at most [`MAX_GRAIN_SECTORS`]).
    pub grain_sectors: u64,
    /// Embedded descriptor: (offset, size) in sectors, if any.
    pub descriptor: Option<(u64, u64)>,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Redundant grain directory sector (if the flag says it is used).
    pub rgd_offset: Option<u64>,
    /// Grain directory sector (possibly [`GD_AT_END`]).
    pub gd_offset: u64,
    /// Metadata sectors at the start.
    pub overhead: u64,
    /// Compression algorithm.
    pub compression: u16,
}

impl Header {
    /// Validate a raw header (without reference to the file size; see [`SparseExtent::open`]).
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let (raw, _) = RawHeader::read_from_prefix(bytes).map_err(|_| {
            Error::invalid(format!(
                "sparse extent header is {} bytes, shorter than 512",
                bytes.len()
            ))
        })?;
        if raw.magic != SPARSE_MAGIC {
            return Err(Error::invalid(format!(
                "sparse extent magic is {:02x?}, not KDMV",
                raw.magic
            )));
        }
        let version = raw.version.get();
        if version == 0 || version > MAX_VERSION {
            return Err(Error::unsupported(format!(
                "VMDK sparse extent version {version} (1 to {MAX_VERSION} are known)"
            )));
        }
        let flags = raw.flags.get();
        let grain = raw.grain_size.get();
        if grain == 0 || !grain.is_power_of_two() || grain > MAX_GRAIN_SECTORS {
            return Err(Error::invalid(format!(
                "grain size {grain} sectors is not a power of two up to {MAX_GRAIN_SECTORS}"
            )));
        }
        let capacity = raw.capacity.get();
        if capacity > MAX_CAPACITY_SECTORS {
            return Err(Error::limit(format!(
                "capacity {capacity} sectors is more than the {MAX_CAPACITY_SECTORS} supported"
            )));
        }
        let gtes = raw.num_gtes_per_gt.get();
        if gtes == 0 || gtes > GTES_PER_GT {
            return Err(Error::invalid(format!(
                "{gtes} entries per grain table (1 to {GTES_PER_GT} allowed)"
            )));
        }
        let compression = raw.compress_algorithm.get();
        if flags & FLAG_COMPRESSED != 0 && compression != COMPRESSION_DEFLATE {
            return Err(Error::unsupported(format!(
                "VMDK compression algorithm {compression}"
            )));
        }
        let descriptor = match (raw.descriptor_offset.get(), raw.descriptor_size.get()) {
            (0, _) | (_, 0) => None,
            (o, s) => Some((o, s)),
        };
        let rgd = raw.rgd_offset.get();
        Ok(Header {
            version,
            flags,
            capacity,
            grain_sectors: grain,
            descriptor,
            gtes_per_gt: gtes,
            rgd_offset: (flags & FLAG_RGD != 0 && rgd != 0).then_some(rgd),
            gd_offset: raw.gd_offset.get(),
            overhead: raw.overhead.get(),
            compression,
        })
    }

    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// Grain directory entries needed to cover the capacity.
    pub fn gd_entries(&self) -> u64 {
        let grains = self.capacity.div_ceil(self.grain_sectors);
        grains.div_ceil(u64::from(self.gtes_per_gt))
    }

    /// Whether grain table entries may be [`GTE_ZEROED`].
    pub fn zeroed_grains(&self) -> bool {
        self.version >= 2 && self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// Whether grains are compressed and preceded by markers.
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
}

/// Where a range of a sparse extent lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrainMap {
    /// Grain data at this host byte offset.
    Data(u64),
    /// Zeroed grain.
    Zero,
    /// Not allocated.
    Unallocated,
    /// Compressed grain whose marker is at this host sector.
    Compressed(u64),
}

#[derive(Debug, Default)]
struct State {
    /// Grain tables read so far, by directory index.
    cache: HashMap<u64, Vec<u32>>,
    /// Next free sector for appended grains and tables.
    next_sector: u64,
    /// File length in bytes as far as this driver knows.
    file_len: u64,
    /// The grain directory.
    gd: Vec<u32>,
    /// The redundant grain directory, when used.
    rgd: Option<Vec<u32>>,
}

/// An opened hosted sparse extent.
#[derive(Debug)]
pub struct SparseExtent {
    /// Index of the extent's file in the driver's file list.
    pub file: usize,
    /// The validated header (from the footer when the directory is at the end).
    pub header: Header,
    state: Mutex<State>,
}

impl SparseExtent {
    /// Read and validate the header, footer and grain directory of the extent in `storage`.
    pub fn open(storage: &dyn Storage, file: usize) -> Result<SparseExtent> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading extent size", e))?;
        if file_len < SECTOR {
            return Err(Error::invalid(format!(
                "sparse extent is {file_len} bytes, shorter than its header"
            )));
        }
        let mut buf = [0u8; SECTOR as usize];
        storage
            .read_at(&mut buf, 0)
            .map_err(|e| Error::io("reading sparse extent header", e))?;
        let mut header = Header::parse(&buf)?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(storage, file_len, &header)?;
        }
        if header.compressed() && header.flags & FLAG_MARKERS == 0 {
            return Err(Error::unsupported("compressed VMDK grains without markers"));
        }
        let entries = header.gd_entries();
        if entries > MAX_GD_ENTRIES {
            return Err(Error::limit(format!(
                "grain directory of {entries} entries is more than the {MAX_GD_ENTRIES} supported"
            )));
        }
        let gd = read_directory(
            storage,
            "grain directory",
            header.gd_offset,
            entries,
            file_len,
        )?;
        let rgd = match header.rgd_offset {
            Some(o) => Some(read_directory(
                storage,
                "redundant grain directory",
                o,
                entries,
                file_len,
            )?),
            None => None,
        };
        Ok(SparseExtent {
            file,
            header,
            state: Mutex::new(State {
                cache: HashMap::new(),
                next_sector: file_len.div_ceil(SECTOR),
                file_len,
                gd,
                rgd,
            }),
        })
    }

    /// Guest bytes in this extent.
    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    fn gt_bytes(&self) -> u64 {
        u64::from(self.header.gtes_per_gt) * 4
    }

    /// The grain table entry for grain `grain`, or `None` when its table is not allocated.
    fn gte(&self, storage: &dyn Storage, st: &mut State, grain: u64) -> Result<Option<u32>> {
        let per = u64::from(self.header.gtes_per_gt);
        let gdi = grain / per;
        let gti = (grain % per) as usize;
        let Some(&gt_sector) = st.gd.get(gdi as usize) else {
            return Err(Error::invalid(format!(
                "grain {grain} is beyond the grain directory ({} entries)",
                st.gd.len()
            )));
        };
        if gt_sector == 0 {
            return Ok(None);
        }
        if !st.cache.contains_key(&gdi) {
            let gt = self.load_gt(storage, st.file_len, gdi, gt_sector)?;
            if st.cache.len() >= GT_CACHE_ENTRIES {
                st.cache.clear();
            }
            st.cache.insert(gdi, gt);
        }
        Ok(st.cache.get(&gdi).and_then(|gt| gt.get(gti)).copied())
    }

    fn load_gt(
        &self,
        storage: &dyn Storage,
        file_len: u64,
        gdi: u64,
        sector: u32,
    ) -> Result<Vec<u32>> {
        let off = u64::from(sector) * SECTOR;
        let end = off.checked_add(self.gt_bytes());
        if end.is_none_or(|e| e > file_len) {
            return Err(Error::invalid(format!(
                "grain table {gdi} at sector {sector} lies beyond the end of the extent ({file_len} bytes)"
            )));
        }
        let mut raw = vec![0u8; self.gt_bytes() as usize];
        storage
            .read_at(&mut raw, off)
            .map_err(|e| Error::io(format!("reading grain table {gdi}"), e))?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn classify(&self, st: &State, grain: u64, gte: Option<u32>) -> Result<GrainMap> {
        let Some(gte) = gte else {
            return Ok(GrainMap::Unallocated);
        };
        match gte {
            0 => Ok(GrainMap::Unallocated),
            GTE_ZEROED if self.header.zeroed_grains() => Ok(GrainMap::Zero),
            s => {
                let sector = u64::from(s);
                if sector < self.header.overhead.max(1) {
                    return Err(Error::invalid(format!(
                        "grain {grain} points at sector {sector}, inside the metadata area ({} sectors)",
                        self.header.overhead
                    )));
                }
                let off = sector * SECTOR;
                if self.header.compressed() {
                    if off.saturating_add(stream::GRAIN_MARKER_LEN) > st.file_len {
                        return Err(Error::invalid(format!(
                            "compressed grain {grain} at sector {sector} lies beyond the end of the extent ({} bytes)",
                            st.file_len
                        )));
                    }
                    return Ok(GrainMap::Compressed(sector));
                }
                if off.saturating_add(self.header.grain_bytes()) > st.file_len {
                    return Err(Error::invalid(format!(
                        "grain {grain} at sector {sector} lies beyond the end of the extent ({} bytes)",
                        st.file_len
                    )));
                }
                Ok(GrainMap::Data(off))
            }
        }
    }

    /// Describe extent-relative `offset` (< capacity) for at most `len` bytes: the kind and the
    /// length it holds for (whole grains of the same kind, contiguous on the host, are merged).
    pub fn map(&self, storage: &dyn Storage, offset: u64, len: u64) -> Result<(GrainMap, u64)> {
        let g = self.header.grain_bytes();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let grain = offset / g;
        let gte = self.gte(storage, &mut st, grain)?;
        let first = self.classify(&st, grain, gte)?;
        let within = offset % g;
        let mut covered = (g - within).min(len);
        if matches!(first, GrainMap::Compressed(_)) {
            return Ok((first, covered));
        }
        // Merge following grains of the same kind within the same grain table.
        let per = u64::from(self.header.gtes_per_gt);
        let mut next = grain + 1;
        let last_in_gt = (grain / per + 1) * per;
        while covered < len && next < last_in_gt && next * g < self.capacity_bytes() {
            let gte = self.gte(storage, &mut st, next)?;
            let kind = self.classify(&st, next, gte)?;
            let same = match (first, kind) {
                (GrainMap::Data(a), GrainMap::Data(b)) => b == a + (next - grain) * g,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            covered = (covered + g).min(len);
            next += 1;
        }
        let first = match first {
            GrainMap::Data(o) => GrainMap::Data(o + within),
            k => k,
        };
        Ok((first, covered))
    }

    /// Inflate the compressed grain at extent-relative `grain_offset` into `out`, `guest_len` bytes.
    pub fn read_compressed(
        &self,
        storage: &dyn Storage,
        grain_offset: u64,
        guest_len: u64,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let g = self.header.grain_bytes();
        let grain = grain_offset / g;
        let (kind, file_len) = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let gte = self.gte(storage, &mut st, grain)?;
            (self.classify(&st, grain, gte)?, st.file_len)
        };
        let GrainMap::Compressed(sector) = kind else {
            return Err(Error::invalid(format!("grain {grain} is not compressed")));
        };
        stream::read_grain(
            storage,
            sector,
            grain * self.header.grain_sectors,
            g,
            file_len,
            out,
        )?;
        out.resize(guest_len as usize, 0);
        Ok(())
    }

    /// Write `buf` at extent-relative `offset`, allocating grains at the end of the file. Partial
    /// grains are completed from `backing` at `guest_base + grain start` (or zeroes).
    pub fn write(
        &self,
        storage: &dyn Storage,
        buf: &[u8],
        offset: u64,
        guest_base: u64,
        backing: Option<&Image>,
    ) -> Result<()> {
        if self.header.compressed() {
            return Err(Error::unsupported(
                "writing to an existing compressed (streamOptimized) VMDK extent",
            ));
        }
        let g = self.header.grain_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let grain = pos / g;
            let within = pos % g;
            let n = ((g - within) as usize).min(buf.len() - done);
            let chunk = &buf[done..done + n];
            self.write_grain(storage, grain, within, chunk, guest_base, backing)?;
            done += n;
        }
        Ok(())
    }

    fn write_grain(
        &self,
        storage: &dyn Storage,
        grain: u64,
        within: u64,
        chunk: &[u8],
        guest_base: u64,
        backing: Option<&Image>,
    ) -> Result<()> {
        let g = self.header.grain_bytes();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gte = self.gte(storage, &mut st, grain)?;
        match self.classify(&st, grain, gte)? {
            GrainMap::Data(host) => {
                return storage
                    .write_at(chunk, host + within)
                    .map_err(|e| Error::io(format!("writing grain {grain}"), e));
            }
            GrainMap::Compressed(_) => {
                return Err(Error::unsupported("overwriting a compressed grain"));
            }
            GrainMap::Zero | GrainMap::Unallocated => {}
        }
        let zeroed = gte == Some(GTE_ZEROED) && self.header.zeroed_grains();
        let mut data = vec![0u8; g as usize];
        if chunk.len() as u64 != g && !zeroed {
            if let Some(b) = backing {
                let start = guest_base + grain * g;
                let avail = b.virtual_size().saturating_sub(start).min(g) as usize;
                if avail > 0 {
                    b.read_at(&mut data[..avail], start)?;
                }
            }
        }
        data[within as usize..within as usize + chunk.len()].copy_from_slice(chunk);
        let sector = st.next_sector;
        let sector32 = u32::try_from(sector).map_err(|_| {
            Error::limit(format!(
                "sparse extent would grow past sector {sector}, beyond 32-bit grain table entries"
            ))
        })?;
        storage
            .write_at(&data, sector * SECTOR)
            .map_err(|e| Error::io(format!("writing grain {grain}"), e))?;
        st.next_sector = sector + self.header.grain_sectors;
        st.file_len = st.file_len.max(st.next_sector * SECTOR);
        self.set_gte(storage, &mut st, grain, sector32)
    }

    /// Allocate grain table `gdi` at the end of the file, zeroed, in every directory that lacks
    /// it (the table first, then the directory entry that makes it reachable).
    fn ensure_gt(&self, storage: &dyn Storage, st: &mut State, gdi: u64) -> Result<()> {
        let gt_sectors = self.gt_bytes().div_ceil(SECTOR);
        let dirs = [Some(self.header.gd_offset), self.header.rgd_offset];
        for (which, dir) in dirs.into_iter().enumerate() {
            let Some(dir) = dir else { continue };
            let table = if which == 0 {
                Some(&mut st.gd)
            } else {
                st.rgd.as_mut()
            };
            let Some(entry) = table.and_then(|t| t.get_mut(gdi as usize)) else {
                continue;
            };
            if *entry != 0 {
                continue;
            }
            let sector = st.next_sector;
            let sector32 = u32::try_from(sector).map_err(|_| {
                Error::limit(format!(
                    "sparse extent would grow past sector {sector}, beyond 32-bit directory entries"
                ))
            })?;
            crate::storage::write_zero_bytes(storage, sector * SECTOR, gt_sectors * SECTOR)
                .map_err(|e| Error::io(format!("allocating grain table {gdi}"), e))?;
            storage
                .write_at(&sector32.to_le_bytes(), dir * SECTOR + gdi * 4)
                .map_err(|e| Error::io(format!("recording grain table {gdi}"), e))?;
            *entry = sector32;
            st.next_sector = sector + gt_sectors;
            st.file_len = st.file_len.max(st.next_sector * SECTOR);
        }
        st.cache.remove(&gdi);
        Ok(())
    }

    /// Record `value` as grain `grain`'s entry in the grain table and its redundant copy.
    fn set_gte(&self, storage: &dyn Storage, st: &mut State, grain: u64, value: u32) -> Result<()> {
        let per = u64::from(self.header.gtes_per_gt);
        let gdi = grain / per;
        let gti = grain % per;
        let missing = |t: Option<&Vec<u32>>| t.and_then(|t| t.get(gdi as usize)) == Some(&0);
        if missing(Some(&st.gd)) || missing(st.rgd.as_ref()) {
            self.ensure_gt(storage, st, gdi)?;
        }
        let tables = [
            st.gd.get(gdi as usize).copied(),
            st.rgd.as_ref().and_then(|r| r.get(gdi as usize)).copied(),
        ];
        for gt in tables.into_iter().flatten() {
            let at = u64::from(gt) * SECTOR + gti * 4;
            storage
                .write_at(&value.to_le_bytes(), at)
                .map_err(|e| Error::io(format!("updating grain table {gdi}"), e))?;
        }
        if let Some(gt) = st.cache.get_mut(&gdi) {
            if let Some(e) = gt.get_mut(gti as usize) {
                *e = value;
            }
        }
        Ok(())
    }

    /// Make whole grains from `offset` (grain-aligned) for `len` bytes (whole grains) read as zero
    /// without a backing image: mark them zeroed where the header allows, otherwise leave
    /// unallocated grains alone and zero allocated ones in place. Returns false when a grain could
    /// not be handled here (the caller writes zeroes).
    pub fn zero_grain(&self, storage: &dyn Storage, grain: u64, has_backing: bool) -> Result<bool> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gte = self.gte(storage, &mut st, grain)?;
        let kind = self.classify(&st, grain, gte)?;
        match kind {
            GrainMap::Zero => Ok(true),
            GrainMap::Unallocated if !has_backing => Ok(true),
            _ if self.header.zeroed_grains() => {
                self.set_gte(storage, &mut st, grain, GTE_ZEROED)?;
                Ok(true)
            }
            GrainMap::Data(host) => {
                crate::storage::write_zero_bytes(storage, host, self.header.grain_bytes())
                    .map_err(|e| Error::io(format!("zeroing grain {grain}"), e))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Check the extent's tables: grain tables beyond the file or shared by two directory
    /// entries, grains beyond the file, inside the metadata, or starting within another grain's
    /// window. Work and memory are bounded by the file size: each grain table is visited once,
    /// and overlaps are found with one bit per grain-sized window of the file (so overlaps of
    /// grains at unaligned host offsets that straddle windows are not all found).
    pub fn check(&self, storage: &dyn Storage, name: &str, r: &mut CheckReport) -> Result<()> {
        let (gd, file_len) = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            (st.gd.clone(), st.file_len)
        };
        let g = self.header.grain_bytes();
        let per = u64::from(self.header.gtes_per_gt);
        let grains = self.header.capacity.div_ceil(self.header.grain_sectors);
        let mut tables: Vec<(u32, u64)> = Vec::new();
        for (gdi, &sector) in gd.iter().enumerate() {
            if sector == 0 {
                continue;
            }
            let end = u64::from(sector) * SECTOR + self.gt_bytes();
            if end > file_len {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR: extent '{name}': grain table {gdi} at sector {sector} is beyond the end of the file"
                ));
                continue;
            }
            tables.push((sector, gdi as u64));
        }
        tables.sort_unstable();
        let mut windows = vec![0u64; file_len.div_ceil(g).div_ceil(64) as usize];
        let mut prev = None;
        for (sector, gdi) in tables {
            if prev == Some(sector) {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR: extent '{name}': grain table {gdi} at sector {sector} is shared with another directory entry"
                ));
                continue;
            }
            prev = Some(sector);
            let gt = self.load_gt(storage, file_len, gdi, sector)?;
            for (i, &e) in gt.iter().enumerate() {
                let grain = gdi * per + i as u64;
                if grain >= grains || e == 0 || (e == GTE_ZEROED && self.header.zeroed_grains()) {
                    continue;
                }
                r.allocated_clusters = Some(r.allocated_clusters.unwrap_or(0) + 1);
                let sector = u64::from(e);
                let off = sector * SECTOR;
                let span = if self.header.compressed() {
                    super::stream::GRAIN_MARKER_LEN
                } else {
                    g
                };
                let problem = if off + span > file_len {
                    Some("is beyond the end of the file")
                } else if sector < self.header.overhead.max(1) {
                    Some("overlaps the metadata")
                } else if !self.header.compressed() {
                    // Two grains starting in the same grain-sized window overlap.
                    let w = (off / g) as usize;
                    let bit = 1u64 << (w % 64);
                    let used = windows.get(w / 64).is_some_and(|b| b & bit != 0);
                    if let Some(b) = windows.get_mut(w / 64) {
                        *b |= bit;
                    }
                    used.then_some("overlaps another grain")
                } else {
                    None
                };
                if let Some(p) = problem {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR: extent '{name}': grain {grain} at sector {sector} {p}"
                    ));
                }
            }
        }
        r.total_clusters = Some(r.total_clusters.unwrap_or(0) + grains);
        Ok(())
    }

    /// File length as far as this extent knows.
    pub fn file_len(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .file_len
    }
}

/// Read a grain directory of `entries` entries at `sector`, checked against the file size.
fn read_directory(
    storage: &dyn Storage,
    what: &str,
    sector: u64,
    entries: u64,
    file_len: u64,
) -> Result<Vec<u32>> {
    let off = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::invalid(format!("{what} sector {sector} overflows")))?;
    let bytes = entries * 4;
    if off.checked_add(bytes).is_none_or(|e| e > file_len) {
        return Err(Error::invalid(format!(
            "{what} at sector {sector} ({entries} entries) lies beyond the end of the extent ({file_len} bytes)"
        )));
    }
    let mut raw = vec![0u8; bytes as usize];
    storage
        .read_at(&mut raw, off)
        .map_err(|e| Error::io(format!("reading {what}"), e))?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Read the footer of a stream-optimized extent (VMDK 1.1, "The Footer"): the last three sectors
/// are a footer marker, a copy of the header with the real `gdOffset`, and the end-of-stream marker.
/// As OpenStack's format_inspector requires, both markers are zero-padded and the footer agrees
/// with the header on everything but `gdOffset`'s place (version, descriptor location and size):
/// a footer that moves the descriptor would show readers that trust it another disk.
fn read_footer(storage: &dyn Storage, file_len: u64, head: &Header) -> Result<Header> {
    if file_len < 4 * SECTOR {
        return Err(Error::invalid(format!(
            "header says the grain directory is at the end, but the extent ({file_len} bytes) has no room for a footer"
        )));
    }
    let mut buf = vec![0u8; 3 * SECTOR as usize];
    storage
        .read_at(&mut buf, file_len - 3 * SECTOR)
        .map_err(|e| Error::io("reading stream footer", e))?;
    let (marker, rest) = buf.split_at(SECTOR as usize);
    let (footer, eos) = rest.split_at(SECTOR as usize);
    if stream::marker_type(marker) != Some(stream::MARKER_FOOTER) {
        return Err(Error::invalid(
            "stream-optimized extent has no footer marker",
        ));
    }
    if stream::marker_type(eos) != Some(stream::MARKER_EOS) {
        return Err(Error::invalid(
            "stream-optimized extent does not end with an end-of-stream marker",
        ));
    }
    if marker[16..].iter().chain(&eos[16..]).any(|&b| b != 0) {
        return Err(Error::invalid(
            "stream-optimized footer or end-of-stream marker is not zero-padded",
        ));
    }
    let h = Header::parse(footer).map_err(|e| e.context("footer"))?;
    if h.version != head.version {
        return Err(Error::invalid(format!(
            "footer version {} differs from the header's {}",
            h.version, head.version
        )));
    }
    if h.descriptor != head.descriptor {
        return Err(Error::invalid(
            "footer places the embedded descriptor elsewhere than the header",
        ));
    }
    if h.gd_offset == GD_AT_END {
        return Err(Error::invalid(
            "footer's grain directory offset is also GD_AT_END",
        ));
    }
    Ok(h)
}

/// Layout of a freshly created sparse extent, as qemu lays it out: header, embedded descriptor
/// area, redundant directory and its tables, directory and its tables, then grains.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Redundant grain directory sector.
    pub rgd: u64,
    /// Grain directory sector.
    pub gd: u64,
    /// Sectors per directory.
    pub gd_sectors: u64,
    /// Sectors per grain table.
    pub gt_sectors: u64,
    /// Number of grain tables.
    pub gt_count: u64,
    /// First grain sector (the overhead).
    pub grains: u64,
}

/// Sectors the embedded descriptor area takes in extents vmi creates (qemu's `DESC_SIZE`).
pub const EMBEDDED_DESCRIPTOR_SECTORS: u64 = 20;

/// Compute the layout for `capacity` sectors.
pub fn layout(capacity: u64) -> Layout {
    let grains = capacity.div_ceil(DEFAULT_GRAIN_SECTORS);
    let gt_sectors = (u64::from(GTES_PER_GT) * 4).div_ceil(SECTOR);
    let gt_count = grains.div_ceil(u64::from(GTES_PER_GT));
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let rgd = 1 + EMBEDDED_DESCRIPTOR_SECTORS;
    let gd = rgd + gd_sectors + gt_sectors * gt_count;
    let first = (gd + gd_sectors + gt_sectors * gt_count).next_multiple_of(DEFAULT_GRAIN_SECTORS);
    Layout {
        rgd,
        gd,
        gd_sectors,
        gt_sectors,
        gt_count,
        grains: first,
    }
}

/// Write a new, empty hosted sparse extent of `capacity` sectors with `descriptor` embedded.
pub fn create(
    storage: &dyn Storage,
    capacity: u64,
    zeroed_grain: bool,
    descriptor: &[u8],
) -> Result<()> {
    if capacity > MAX_CAPACITY_SECTORS {
        return Err(Error::limit(format!(
            "{capacity} sectors is more than the {MAX_CAPACITY_SECTORS} a VMDK extent supports"
        )));
    }
    if descriptor.len() as u64 > EMBEDDED_DESCRIPTOR_SECTORS * SECTOR {
        return Err(Error::limit(
            "descriptor does not fit the embedded descriptor area",
        ));
    }
    let l = layout(capacity);
    let (version, flags) = if zeroed_grain {
        (2, FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN)
    } else {
        (1, FLAG_NL_DETECT | FLAG_RGD)
    };
    let mut h = RawHeader::new(version, flags, capacity, DEFAULT_GRAIN_SECTORS);
    h.descriptor_offset = 1.into();
    h.descriptor_size = EMBEDDED_DESCRIPTOR_SECTORS.into();
    h.rgd_offset = l.rgd.into();
    h.gd_offset = l.gd.into();
    h.overhead = l.grains.into();
    let io = |e| Error::io("writing sparse extent metadata", e);
    storage.set_len(l.grains * SECTOR).map_err(io)?;
    storage.write_at(h.as_bytes(), 0).map_err(io)?;
    if !descriptor.is_empty() {
        storage.write_at(descriptor, SECTOR).map_err(io)?;
    }
    for dir in [l.rgd, l.gd] {
        let entries: Vec<u8> = (0..l.gt_count)
            .flat_map(|i| {
                // Sector numbers fit: the layout is bounded by MAX_CAPACITY_SECTORS.
                ((dir + l.gd_sectors + i * l.gt_sectors) as u32).to_le_bytes()
            })
            .collect();
        storage.write_at(&entries, dir * SECTOR).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn header_bytes(f: impl FnOnce(&mut RawHeader)) -> Vec<u8> {
        let mut h = RawHeader::new(1, FLAG_NL_DETECT | FLAG_RGD, 2048, 128);
        h.gd_offset = 21.into();
        f(&mut h);
        h.as_bytes().to_vec()
    }

    #[test]
    fn header_is_512_bytes() {
        assert_eq!(std::mem::size_of::<RawHeader>(), 512);
    }

    #[test]
    fn layout_matches_qemu_for_100_mib() {
        let l = layout(204800);
        assert_eq!((l.rgd, l.gd, l.grains), (21, 38, 128));
    }

    #[test]
    fn parse_rejects_grain_size_not_power_of_two() {
        let b = header_bytes(|h| h.grain_size = 100.into());
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn parse_rejects_huge_grains_and_capacities() {
        let b = header_bytes(|h| h.grain_size = (MAX_GRAIN_SECTORS * 2).into());
        assert!(Header::parse(&b).is_err());
        let b = header_bytes(|h| h.capacity = u64::MAX.into());
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn parse_rejects_version_4_and_more_than_512_gtes() {
        let b = header_bytes(|h| h.version = 4.into());
        assert!(Header::parse(&b).is_err());
        let b = header_bytes(|h| h.num_gtes_per_gt = 513.into());
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn open_rejects_a_directory_beyond_the_file() {
        let s = MemStorage::from_bytes(header_bytes(|h| h.gd_offset = 1000.into()));
        let e = SparseExtent::open(&s, 0).unwrap_err();
        assert!(e.to_string().contains("grain directory"), "{e}");
    }

    #[test]
    fn writing_under_a_missing_grain_table_allocates_it_in_both_directories() {
        let s = MemStorage::from_bytes(Vec::new());
        create(&s, 4096, false, b"").unwrap();
        let l = layout(4096);
        s.write_at(&[0u8; 4], l.gd * SECTOR).unwrap();
        s.write_at(&[0u8; 4], l.rgd * SECTOR).unwrap();
        let x = SparseExtent::open(&s, 0).unwrap();
        x.write(&s, &[9u8; 512], 0, 0, None).unwrap();
        let x = SparseExtent::open(&s, 0).unwrap();
        let (k, _) = x.map(&s, 0, 512).unwrap();
        let GrainMap::Data(off) = k else {
            panic!("{k:?}")
        };
        let mut b = [0u8; 1];
        s.read_at(&mut b, off).unwrap();
        assert_eq!(b[0], 9);
        let st = x.state.lock().unwrap();
        assert!(
            st.gd[0] != 0
                && st.rgd.as_ref().unwrap()[0] != 0
                && st.gd[0] != st.rgd.as_ref().unwrap()[0]
        );
    }

    #[test]
    fn created_extent_reads_unallocated_then_data_after_a_write() {
        let s = MemStorage::from_bytes(Vec::new());
        create(&s, 4096, false, b"").unwrap();
        let x = SparseExtent::open(&s, 0).unwrap();
        assert_eq!(
            x.map(&s, 0, 1 << 20).unwrap(),
            (GrainMap::Unallocated, 1 << 20)
        );
        x.write(&s, &[7u8; 100], 65536 + 10, 0, None).unwrap();
        let (k, n) = x.map(&s, 65536, 1 << 20).unwrap();
        assert!(matches!(k, GrainMap::Data(_)));
        assert_eq!(n, 65536);
        let x = SparseExtent::open(&s, 0).unwrap();
        let (k, _) = x.map(&s, 65536 + 10, 1).unwrap();
        let GrainMap::Data(off) = k else {
            panic!("{k:?}")
        };
        let mut b = [0u8; 1];
        s.read_at(&mut b, off).unwrap();
        assert_eq!(b[0], 7);
    }
}
