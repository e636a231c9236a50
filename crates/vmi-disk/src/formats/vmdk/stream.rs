//! Stream-optimized compressed sparse extents (VMware "Virtual Disk Format 1.1", section
//! "Stream-Optimized Compressed Sparse Extents"): grain markers (`lba`, `size`, deflate data),
//! metadata markers (end-of-stream, grain table, grain directory, footer), inflating one grain with
//! a bounded output, and the in-order writer that appends compressed grains and finishes the
//! extent with its grain tables, directory, footer and end-of-stream marker.
//!
//! Grains are zlib streams (RFC 1950), as qemu and VMware write them.

use super::descriptor::SECTOR;
use super::sparse::{RawHeader, GD_AT_END, GTES_PER_GT};
use crate::error::{Error, Result};
use crate::storage::{is_zero, Storage};
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use std::io::{Read, Write};
use zerocopy::IntoBytes;

/// Bytes of a grain marker before the compressed data: `lba` (u64) and `size` (u32).
pub const GRAIN_MARKER_LEN: u64 = 12;
/// Metadata marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Metadata marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Metadata marker type: the grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Metadata marker type: the footer follows.
pub const MARKER_FOOTER: u32 = 3;

/// Largest compressed grain accepted for a grain of `grain` bytes: twice the grain, the buffer qemu
/// reads compressed grains into (deflate's worst case only adds about 0.03% plus a few bytes).
pub fn max_compressed(grain: u64) -> u64 {
    grain * 2
}

/// The type of the metadata marker in `sector` (a 512-byte marker with `size` 0), or `None` when
/// it is not one.
pub fn marker_type(sector: &[u8]) -> Option<u32> {
    let size = u32::from_le_bytes(sector.get(8..12)?.try_into().ok()?);
    let kind = u32::from_le_bytes(sector.get(12..16)?.try_into().ok()?);
    (size == 0).then_some(kind)
}

/// Read and inflate the grain whose marker is at `sector`; the marker must name guest sector
/// `lba`. At most `grain` bytes are produced.
pub fn read_grain(
    storage: &dyn Storage,
    sector: u64,
    lba: u64,
    grain: u64,
    file_len: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    let at = sector * SECTOR;
    let mut m = [0u8; GRAIN_MARKER_LEN as usize];
    storage
        .read_at(&mut m, at)
        .map_err(|e| Error::io(format!("reading grain marker at sector {sector}"), e))?;
    let (lba_bytes, size_bytes) = m.split_at(8);
    let got_lba = u64::from_le_bytes(lba_bytes.try_into().unwrap_or_default());
    let size = u64::from(u32::from_le_bytes(
        size_bytes.try_into().unwrap_or_default(),
    ));
    if got_lba != lba {
        return Err(Error::invalid(format!(
            "grain marker at sector {sector} is for guest sector {got_lba}, expected {lba}"
        )));
    }
    if size == 0 || size > max_compressed(grain) {
        return Err(Error::invalid(format!(
            "compressed grain at sector {sector} is {size} bytes (1 to {} allowed)",
            max_compressed(grain)
        )));
    }
    let data_at = at + GRAIN_MARKER_LEN;
    if data_at.saturating_add(size) > file_len {
        return Err(Error::invalid(format!(
            "compressed grain at sector {sector} ({size} bytes) runs past the end of the extent"
        )));
    }
    let mut comp = vec![0u8; size as usize];
    storage
        .read_at(&mut comp, data_at)
        .map_err(|e| Error::io(format!("reading compressed grain at sector {sector}"), e))?;
    // Fast path: libdeflate into one grain. Anything it does not accept (including a grain that
    // would inflate to more) goes through the streaming inflater, whose verdict stands.
    let grain_len = usize::try_from(grain)
        .map_err(|_| Error::invalid(format!("grain of {grain} bytes is too large")))?;
    if out.len() != grain_len {
        out.resize(grain_len, 0);
    }
    if let Some(n) = crate::inflate::inflate_fast(crate::inflate::Framing::Zlib, &comp, out) {
        out.truncate(n);
        return Ok(());
    }
    out.clear();
    ZlibDecoder::new(&comp[..])
        .take(grain + 1)
        .read_to_end(out)
        .map_err(|e| {
            Error::invalid(format!(
                "compressed grain at sector {sector} does not inflate"
            ))
            .with_source(e)
        })?;
    if out.len() as u64 > grain {
        return Err(Error::invalid(format!(
            "compressed grain at sector {sector} inflates to more than the {grain}-byte grain"
        )));
    }
    Ok(())
}

/// Compress one grain as a zlib stream at qemu's default level.
pub fn compress(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = ZlibEncoder::new(Vec::with_capacity(data.len() / 2), Compression::default());
    enc.write_all(data)
        .and_then(|()| enc.finish())
        .map_err(|e| Error::io("compressing a grain", e))
}

/// Table entries as little-endian bytes.
pub fn le_bytes(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn metadata_marker(sectors: u64, kind: u32) -> [u8; SECTOR as usize] {
    let mut m = [0u8; SECTOR as usize];
    m[..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// Appends compressed grains in increasing guest order, then writes the metadata at the end.
#[derive(Debug)]
pub struct StreamWriter {
    header: RawHeader,
    grain: u64,
    grains: u64,
    next_sector: u64,
    gd: Vec<u32>,
    gt: Option<(u64, Vec<u32>)>,
    last: Option<u64>,
    pending: Option<(u64, Vec<u8>)>,
    finished: bool,
}

impl StreamWriter {
    /// A writer for an extent whose header is `header` (with `gdOffset` = [`GD_AT_END`]) and whose
    /// grains start at sector `first_sector`.
    pub fn new(header: RawHeader, first_sector: u64, gd_entries: u64) -> StreamWriter {
        let grain = header.grain_size.get() * SECTOR;
        let grains = header.capacity.get().div_ceil(header.grain_size.get());
        StreamWriter {
            header,
            grain,
            grains,
            next_sector: first_sector,
            gd: vec![0; gd_entries as usize],
            gt: None,
            last: None,
            pending: None,
            finished: false,
        }
    }

    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain
    }

    fn check_order(&self, grain: u64) -> Result<()> {
        if self.finished {
            return Err(Error::usage(
                "the streamOptimized image is already finished",
            ));
        }
        if grain >= self.grains {
            return Err(Error::usage(format!("grain {grain} is beyond the image")));
        }
        if self.last.is_some_and(|l| grain <= l) {
            return Err(Error::unsupported(format!(
                "streamOptimized images are written in increasing order: grain {grain} comes after grain {}",
                self.last.unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Append grain `grain`, already compressed.
    pub fn write_compressed(
        &mut self,
        storage: &dyn Storage,
        grain: u64,
        comp: &[u8],
    ) -> Result<()> {
        if let Some((p, _)) = &self.pending {
            if *p < grain {
                self.flush_pending(storage)?;
            }
        }
        self.check_order(grain)?;
        if self.pending.is_some() {
            return Err(Error::unsupported(format!(
                "streamOptimized images are written in increasing order: grain {grain} was already started"
            )));
        }
        self.append(storage, grain, comp)
    }

    fn append(&mut self, storage: &dyn Storage, grain: u64, comp: &[u8]) -> Result<()> {
        let size = u32::try_from(comp.len())
            .ok()
            .filter(|&s| u64::from(s) <= max_compressed(self.grain))
            .ok_or_else(|| {
                Error::usage(format!(
                    "compressed grain of {} bytes is too big",
                    comp.len()
                ))
            })?;
        let per = u64::from(GTES_PER_GT);
        let gdi = grain / per;
        if self.gt.as_ref().is_some_and(|(i, _)| *i != gdi) {
            self.flush_gt(storage)?;
        }
        let sector = self.next_sector;
        let sector32 = u32::try_from(sector).map_err(|_| {
            Error::limit("streamOptimized extent grows beyond 32-bit sector numbers")
        })?;
        let lba = grain * self.header.grain_size.get();
        let total = (GRAIN_MARKER_LEN + comp.len() as u64).next_multiple_of(SECTOR);
        let mut buf = Vec::with_capacity(total as usize);
        buf.extend_from_slice(&lba.to_le_bytes());
        buf.extend_from_slice(&size.to_le_bytes());
        buf.extend_from_slice(comp);
        buf.resize(total as usize, 0);
        storage
            .write_at(&buf, sector * SECTOR)
            .map_err(|e| Error::io(format!("writing grain {grain}"), e))?;
        self.next_sector += total / SECTOR;
        let gt = &mut self
            .gt
            .get_or_insert_with(|| (gdi, vec![0; GTES_PER_GT as usize]))
            .1;
        if let Some(e) = gt.get_mut((grain % per) as usize) {
            *e = sector32;
        }
        self.last = Some(grain);
        Ok(())
    }

    fn flush_pending(&mut self, storage: &dyn Storage) -> Result<()> {
        if let Some((grain, data)) = self.pending.take() {
            self.check_order(grain)?;
            if !is_zero(&data) {
                let comp = compress(&data)?;
                self.append(storage, grain, &comp)?;
            } else {
                self.last = Some(grain);
            }
        }
        Ok(())
    }

    /// Write plain guest data at `offset`; grains are buffered until a later grain is written.
    pub fn write_plain(&mut self, storage: &dyn Storage, buf: &[u8], offset: u64) -> Result<()> {
        let g = self.grain;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let grain = pos / g;
            let within = (pos % g) as usize;
            let n = (g as usize - within).min(buf.len() - done);
            let chunk = &buf[done..done + n];
            match &self.pending {
                Some((p, _)) if *p == grain => {}
                Some((p, _)) if *p > grain => {
                    return Err(Error::unsupported(format!(
                        "streamOptimized images are written in increasing order: offset {pos} comes after grain {p}"
                    )))
                }
                _ => {
                    self.flush_pending(storage)?;
                    self.check_order(grain)?;
                    let len = (self.header.capacity.get() * SECTOR - grain * g).min(g);
                    self.pending = Some((grain, vec![0u8; len as usize]));
                }
            }
            if let Some((_, data)) = &mut self.pending {
                let dst = data.get_mut(within..within + n).ok_or_else(|| {
                    Error::usage(format!("write at {pos} runs past the end of the image"))
                })?;
                dst.copy_from_slice(chunk);
            }
            done += n;
        }
        Ok(())
    }

    fn flush_gt(&mut self, storage: &dyn Storage) -> Result<()> {
        let Some((gdi, gt)) = self.gt.take() else {
            return Ok(());
        };
        let gt_sectors = (gt.len() as u64 * 4).div_ceil(SECTOR);
        let at = self.next_sector;
        storage
            .write_at(&metadata_marker(gt_sectors, MARKER_GT), at * SECTOR)
            .map_err(|e| Error::io("writing grain table marker", e))?;
        storage
            .write_at(&le_bytes(&gt), (at + 1) * SECTOR)
            .map_err(|e| Error::io(format!("writing grain table {gdi}"), e))?;
        let sector = u32::try_from(at + 1).map_err(|_| {
            Error::limit("streamOptimized extent grows beyond 32-bit sector numbers")
        })?;
        if let Some(e) = self.gd.get_mut(gdi as usize) {
            *e = sector;
        }
        self.next_sector = at + 1 + gt_sectors;
        Ok(())
    }

    /// Write the last grain table, the grain directory, the footer and the end-of-stream marker.
    pub fn finish(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.flush_pending(storage)?;
        self.flush_gt(storage)?;
        let gd_bytes = le_bytes(&self.gd);
        let gd_sectors = (gd_bytes.len() as u64).div_ceil(SECTOR).max(1);
        let at = self.next_sector;
        let mut tail = Vec::new();
        tail.extend_from_slice(&metadata_marker(gd_sectors, MARKER_GD));
        let mut gd = gd_bytes;
        gd.resize((gd_sectors * SECTOR) as usize, 0);
        tail.extend_from_slice(&gd);
        let mut footer = self.header.clone();
        footer.gd_offset = (at + 1).into();
        tail.extend_from_slice(&metadata_marker(1, MARKER_FOOTER));
        tail.extend_from_slice(footer.as_bytes());
        tail.extend_from_slice(&metadata_marker(0, MARKER_EOS));
        storage
            .write_at(&tail, at * SECTOR)
            .map_err(|e| Error::io("writing grain directory and footer", e))?;
        self.next_sector = at + tail.len() as u64 / SECTOR;
        storage
            .set_len(self.next_sector * SECTOR)
            .map_err(|e| Error::io("sizing the streamOptimized extent", e))?;
        debug_assert_eq!(self.header.gd_offset.get(), GD_AT_END);
        self.finished = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn grains_round_trip_through_compress_and_read_grain() {
        let s = MemStorage::from_bytes(Vec::new());
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let comp = compress(&data).unwrap();
        let mut buf = Vec::new();
        buf.extend_from_slice(&128u64.to_le_bytes());
        buf.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        buf.extend_from_slice(&comp);
        s.write_at(&buf, 512).unwrap();
        let mut out = Vec::new();
        read_grain(&s, 1, 128, 65536, 512 + buf.len() as u64, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn read_grain_rejects_a_marker_for_another_sector() {
        let s = MemStorage::from_bytes(Vec::new());
        let comp = compress(&[1u8; 512]).unwrap();
        let mut buf = 0u64.to_le_bytes().to_vec();
        buf.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        buf.extend_from_slice(&comp);
        s.write_at(&buf, 0).unwrap();
        let mut out = Vec::new();
        assert!(read_grain(&s, 0, 128, 65536, buf.len() as u64, &mut out).is_err());
    }

    #[test]
    fn read_grain_bounds_the_inflated_size() {
        let s = MemStorage::from_bytes(Vec::new());
        let comp = compress(&vec![0u8; 1 << 20]).unwrap();
        let mut buf = 0u64.to_le_bytes().to_vec();
        buf.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        buf.extend_from_slice(&comp);
        s.write_at(&buf, 0).unwrap();
        let mut out = Vec::new();
        let e = read_grain(&s, 0, 0, 65536, buf.len() as u64, &mut out).unwrap_err();
        assert!(e.to_string().contains("inflates"), "{e}");
    }

    /// A grain marker for guest sector 0 followed by `comp`, as the only thing in a storage.
    fn one_grain(comp: &[u8]) -> (MemStorage, u64) {
        let s = MemStorage::from_bytes(Vec::new());
        let mut buf = 0u64.to_le_bytes().to_vec();
        buf.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        buf.extend_from_slice(comp);
        s.write_at(&buf, 0).unwrap();
        (s, buf.len() as u64)
    }

    #[test]
    fn a_short_grain_inflates_to_its_own_length_into_a_reused_buffer() {
        let data: Vec<u8> = (0..10000u32).map(|i| (i % 13) as u8).collect();
        let (s, len) = one_grain(&compress(&data).unwrap());
        let mut out = vec![0xee; 65536];
        read_grain(&s, 0, 0, 65536, len, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn truncated_or_corrupt_grains_are_errors() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 256) as u8).collect();
        let comp = compress(&data).unwrap();
        let mut out = Vec::new();
        let (s, len) = one_grain(&comp[..comp.len() / 2]);
        assert!(read_grain(&s, 0, 0, 65536, len, &mut out).is_err());
        // A wrong Adler-32 checksum.
        let mut bad = comp.clone();
        *bad.last_mut().unwrap() ^= 1;
        let (s, len) = one_grain(&bad);
        assert!(read_grain(&s, 0, 0, 65536, len, &mut out).is_err());
        // Garbage.
        let (s, len) = one_grain(&[0xff; 100]);
        assert!(read_grain(&s, 0, 0, 65536, len, &mut out).is_err());
    }
}
