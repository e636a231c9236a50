//! FAT12/16/32 (EFI system partitions, Microsoft's FAT specification) read and write through the
//! `fatfs` crate (rust-fatfs: the maintained pure-Rust FAT implementation, used by bootloader
//! and firmware tooling), over a [`Volume`] as its `Read + Write + Seek` device.
//!
//! Hostile input: a directory's cluster chain can loop, and `fatfs` follows chains while it
//! looks names up. So paths are resolved here, one component at a time, reading at most
//! [`MAX_DIR_ENTRIES`] entries per directory (the FAT specification's limit), and a directory is
//! scanned within that bound before `fatfs` is asked to create or remove anything in it; file
//! reads stop at the size the directory entry gives. A panic inside `fatfs` is caught and
//! returned as an error.

use crate::error::{Error, Result};
use crate::volume::Volume;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Most entries one directory may hold (FAT specification: 65 536 32-byte entries).
pub const MAX_DIR_ENTRIES: usize = 65_536;
/// Deepest path resolved.
const MAX_PATH_DEPTH: usize = 64;

/// Bytes of the volume kept from the last read (fatfs reads 32-byte directory entries and
/// 4-byte FAT entries one at a time).
const CACHE: u64 = 64 << 10;

/// A volume as a seekable stream, with a one-block read cache (writes go through and update it).
struct VolumeIo<'v> {
    vol: Volume<'v>,
    pos: u64,
    cache: Option<(u64, Vec<u8>)>,
}

fn to_io(e: Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl Read for VolumeIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.vol.len().saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        if n as u64 >= CACHE {
            self.vol.read_at(&mut buf[..n], self.pos).map_err(to_io)?;
            self.pos += n as u64;
            return Ok(n);
        }
        let block = self.pos / CACHE * CACHE;
        let hit = matches!(&self.cache, Some((b, _)) if *b == block);
        if !hit {
            let len = CACHE.min(self.vol.len() - block) as usize;
            let mut data = vec![0u8; len];
            self.vol.read_at(&mut data, block).map_err(to_io)?;
            self.cache = Some((block, data));
        }
        let Some((_, data)) = &self.cache else {
            return Err(io::Error::other("read cache lost"));
        };
        let at = (self.pos - block) as usize;
        let n = n.min(data.len() - at);
        buf[..n].copy_from_slice(&data[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for VolumeIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.vol.len().saturating_sub(self.pos)) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the volume's end",
            ));
        }
        self.vol.write_at(&buf[..n], self.pos).map_err(to_io)?;
        if let Some((block, data)) = &mut self.cache {
            // Keep the cached block in step with what was written over it.
            let (start, end) = (self.pos, self.pos + n as u64);
            let (cs, ce) = (*block, *block + data.len() as u64);
            if start < ce && end > cs {
                let from = start.max(cs);
                let to = end.min(ce);
                data[(from - cs) as usize..(to - cs) as usize]
                    .copy_from_slice(&buf[(from - start) as usize..(to - start) as usize]);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for VolumeIo<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.vol.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad seek"))?;
        Ok(self.pos)
    }
}

type FatFs<'v> = fatfs::FileSystem<VolumeIo<'v>>;
type FatDir<'a, 'v> = fatfs::Dir<'a, VolumeIo<'v>>;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FatEntry {
    /// Long name (or the short one).
    pub name: String,
    /// A directory.
    pub is_dir: bool,
    /// Size in bytes (0 for directories).
    pub size: u64,
}

/// An open FAT filesystem.
pub struct Fat<'v> {
    fs: FatFs<'v>,
}

impl std::fmt::Debug for Fat<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fat").finish_non_exhaustive()
    }
}

/// Run a `fatfs` call, turning its errors and panics into ours.
fn guarded<T>(what: impl Fn() -> String, f: impl FnOnce() -> io::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound(what())),
        Ok(Err(e)) => Err(Error::io(what(), e)),
        Err(_) => Err(Error::Unsupported(format!(
            "{}: the FAT filesystem is malformed (the FAT library failed)",
            what()
        ))),
    }
}

fn components(path: &str) -> Result<Vec<&str>> {
    if !path.starts_with('/') {
        return Err(Error::Usage(format!(
            "{path}: guest paths must be absolute"
        )));
    }
    let c: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if c.len() > MAX_PATH_DEPTH || c.contains(&"..") {
        return Err(Error::Usage(format!(
            "{path}: '..' and deep paths are not resolved on FAT"
        )));
    }
    Ok(c)
}

impl<'v> Fat<'v> {
    /// Open the FAT filesystem on `volume`.
    pub fn open(volume: Volume<'v>) -> Result<Self> {
        let io = VolumeIo {
            vol: volume,
            pos: 0,
            cache: None,
        };
        let fs = guarded(
            || "opening the FAT filesystem".into(),
            || fatfs::FileSystem::new(io, fatfs::FsOptions::new()),
        )?;
        Ok(Fat { fs })
    }

    /// The volume label from the boot sector.
    pub fn label(&self) -> String {
        self.fs.volume_label().trim_end().to_string()
    }

    /// "FAT12", "FAT16" or "FAT32".
    pub fn fat_type(&self) -> &'static str {
        match self.fs.fat_type() {
            fatfs::FatType::Fat12 => "FAT12",
            fatfs::FatType::Fat16 => "FAT16",
            fatfs::FatType::Fat32 => "FAT32",
        }
    }

    /// Entries of `dir` (bounded), as `fatfs` entries.
    fn scan<'a>(
        &'a self,
        dir: &FatDir<'a, 'v>,
        path: &str,
    ) -> Result<Vec<fatfs::DirEntry<'a, VolumeIo<'v>>>> {
        let mut out = Vec::new();
        guarded(
            || format!("reading directory {path}"),
            || {
                for e in dir.iter() {
                    let e = e?;
                    let n = e.file_name();
                    if n == "." || n == ".." {
                        continue;
                    }
                    if out.len() >= MAX_DIR_ENTRIES {
                        return Err(io::Error::other(format!(
                            "more than {MAX_DIR_ENTRIES} entries (a looping cluster chain?)"
                        )));
                    }
                    out.push(e);
                }
                Ok(())
            },
        )?;
        Ok(out)
    }

    fn find<'a>(
        &'a self,
        dir: &FatDir<'a, 'v>,
        parent: &str,
        name: &str,
    ) -> Result<Option<fatfs::DirEntry<'a, VolumeIo<'v>>>> {
        Ok(self
            .scan(dir, parent)?
            .into_iter()
            .find(|e| e.file_name().eq_ignore_ascii_case(name)))
    }

    /// The directory at `path`.
    fn dir<'a>(&'a self, path: &str) -> Result<FatDir<'a, 'v>> {
        let mut d = self.fs.root_dir();
        let mut cur = String::new();
        for c in components(path)? {
            let e = self
                .find(&d, if cur.is_empty() { "/" } else { &cur }, c)?
                .ok_or_else(|| Error::NotFound(path.to_string()))?;
            cur.push('/');
            cur.push_str(c);
            if !e.is_dir() {
                return Err(Error::Usage(format!("{cur}: not a directory")));
            }
            d = e.to_dir();
        }
        Ok(d)
    }

    fn parent_and_name<'p>(&self, path: &'p str) -> Result<(String, &'p str)> {
        let c = components(path)?;
        let (name, parents) = c
            .split_last()
            .ok_or_else(|| Error::Usage(format!("{path}: not a file name")))?;
        Ok((format!("/{}", parents.join("/")), name))
    }

    /// The entries of the directory at `path`.
    pub fn read_dir(&self, path: &str) -> Result<Vec<FatEntry>> {
        let d = self.dir(path)?;
        Ok(self
            .scan(&d, path)?
            .into_iter()
            .map(|e| FatEntry {
                name: e.file_name(),
                is_dir: e.is_dir(),
                size: if e.is_dir() { 0 } else { e.len() },
            })
            .collect())
    }

    /// Stream the file at `path` into `out`; returns the bytes copied.
    pub fn read_file(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let (parent, name) = self.parent_and_name(path)?;
        let d = self.dir(&parent)?;
        let e = self
            .find(&d, &parent, name)?
            .ok_or_else(|| Error::NotFound(path.to_string()))?;
        if !e.is_file() {
            return Err(Error::Usage(format!("{path}: not a regular file")));
        }
        let len = e.len();
        let mut f = e.to_file();
        guarded(
            || format!("reading {path}"),
            || io::copy(&mut (&mut f).take(len), out),
        )
    }

    /// Write `data` to the file at `path` (created, or replaced).
    pub fn write_file(&self, path: &str, data: &mut dyn Read) -> Result<()> {
        let (parent, name) = self.parent_and_name(path)?;
        let d = self.dir(&parent)?;
        // Bounded scan first, so fatfs's own lookup in create_file terminates.
        if let Some(e) = self.find(&d, &parent, name)? {
            if e.is_dir() {
                return Err(Error::Usage(format!("{path}: is a directory")));
            }
        }
        guarded(
            || format!("writing {path}"),
            || {
                let mut f = d.create_file(name)?;
                f.truncate()?;
                io::copy(data, &mut f)?;
                f.flush()
            },
        )
    }

    /// Creating directories is refused: fatfs 0.3.6 (the released version) writes long-name
    /// entries for `.` and `..`, which `fsck.fat` rejects (rust-fatfs issue 117, fixed after the
    /// release). Directories made by the guest or by `mkfs`/`mmd` are used as they are.
    pub fn mkdir(&self, path: &str) -> Result<()> {
        Err(Error::Unsupported(format!(
            "{path}: creating directories on FAT is not supported yet (the FAT library's \
             directory records fail fsck.fat)"
        )))
    }

    /// Remove the file or empty directory `path`.
    pub fn remove(&self, path: &str) -> Result<()> {
        let (parent, name) = self.parent_and_name(path)?;
        let d = self.dir(&parent)?;
        let e = self
            .find(&d, &parent, name)?
            .ok_or_else(|| Error::NotFound(path.to_string()))?;
        if e.is_dir() {
            self.scan(&e.to_dir(), path)?;
        }
        guarded(|| format!("removing {path}"), || d.remove(name))
    }

    /// Bytes in free clusters.
    pub fn free_bytes(&self) -> Result<u64> {
        let st = guarded(|| "reading the FAT".into(), || self.fs.stats())?;
        Ok(u64::from(st.free_clusters()) * u64::from(st.cluster_size()))
    }

    /// Write back the FSInfo sector and the dirty flag, and close.
    pub fn close(self) -> Result<()> {
        guarded(|| "closing the FAT filesystem".into(), || self.fs.unmount())
    }
}

/// Largest FAT read for sparsify (FAT32's 2^28 clusters × 4 bytes is 1 GiB; a real ESP's is a
/// few MiB).
pub const MAX_FAT_BYTES: u64 = 256 << 20;

fn le16(b: &[u8], o: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[o], b[o + 1]]))
}

fn le32(b: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]))
}

/// The free clusters of the FAT filesystem on `vol` as byte ranges of the volume, read from the
/// boot sector's BIOS parameter block and the first FAT (Microsoft FAT specification §3, §4).
/// Every field is checked against the volume before use.
pub fn free_ranges(vol: &Volume<'_>) -> Result<Vec<(u64, u64)>> {
    let bad = |m: &str| Error::Unsupported(format!("FAT boot sector: {m}"));
    let mut bs = [0u8; 512];
    vol.read_at(&mut bs, 0)?;
    let bps = le16(&bs, 11);
    let spc = u64::from(bs[13]);
    let reserved = le16(&bs, 14);
    let fats = u64::from(bs[16]);
    let root_entries = le16(&bs, 17);
    let total = match le16(&bs, 19) {
        0 => le32(&bs, 32),
        n => n,
    };
    let fat_sectors = match le16(&bs, 22) {
        0 => le32(&bs, 36),
        n => n,
    };
    if !matches!(bps, 512 | 1024 | 2048 | 4096) || !spc.is_power_of_two() || spc > 128 {
        return Err(bad("sector or cluster size out of range"));
    }
    if reserved == 0 || fats == 0 || fat_sectors == 0 || total == 0 {
        return Err(bad("zero reserved sectors, FATs, FAT size or sector count"));
    }
    if total * bps > vol.len() {
        return Err(bad("more sectors than the volume holds"));
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let first_data = reserved + fats * fat_sectors + root_sectors;
    if first_data >= total {
        return Err(bad("no data region"));
    }
    let clusters = (total - first_data) / spc;
    let fat_bytes = fat_sectors * bps;
    if fat_bytes > MAX_FAT_BYTES {
        return Err(bad("FAT larger than vmi reads"));
    }
    let (bits, mask): (u64, u64) = if clusters < 4085 {
        (12, 0xfff)
    } else if clusters < 65525 {
        (16, 0xffff)
    } else {
        (32, 0x0fff_ffff)
    };
    if (clusters + 2) * bits > fat_bytes * 8 {
        return Err(bad("FAT too small for the cluster count"));
    }
    let mut fat = vec![0u8; fat_bytes as usize];
    vol.read_at(&mut fat, reserved * bps)?;
    let entry = |c: u64| -> u64 {
        match bits {
            12 => {
                let o = (c * 3 / 2) as usize;
                let v = le16(&fat, o);
                if c % 2 == 0 {
                    v & 0xfff
                } else {
                    v >> 4
                }
            }
            16 => le16(&fat, (c * 2) as usize),
            _ => le32(&fat, (c * 4) as usize) & mask,
        }
    };
    let csize = spc * bps;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in 2..clusters + 2 {
        if entry(c) != 0 {
            continue;
        }
        let off = (first_data + (c - 2) * spc) * bps;
        match out.last_mut() {
            Some((s, l)) if *s + *l == off => *l += csize,
            _ => out.push((off, csize)),
        }
    }
    Ok(out)
}

/// Entry point for the fuzz target: `data` as a FAT volume; list the root, read the free
/// clusters. Anything but a panic or a hang is a pass.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let storage = Box::new(vmi_disk::storage::MemStorage::from_bytes(data.to_vec()));
    let Ok(img) = vmi_disk::Image::from_storage(
        storage,
        std::path::Path::new("fuzz.img"),
        Some(vmi_disk::Format::Raw),
        false,
        &vmi_disk::Gate::deny_all(),
    ) else {
        return;
    };
    let vol = Volume::whole(&img);
    let _ = free_ranges(&vol);
    let opened = Fat::open(vol);
    if let Ok(fat) = &opened {
        if let Ok(entries) = fat.read_dir("/") {
            for e in entries.iter().take(16) {
                let p = format!("/{}", e.name);
                if e.is_dir {
                    let _ = fat.read_dir(&p);
                } else {
                    let _ = fat.read_file(&p, &mut io::sink());
                }
            }
        }
    }
    drop(opened);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FAT16 volume formatted by fatfs, with a file and a directory.
    fn sample() -> Vec<u8> {
        let mut disk = io::Cursor::new(vec![0u8; 8 << 20]);
        fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new()).unwrap();
        {
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
            let mut f = fs.root_dir().create_file("HELLO.TXT").unwrap();
            f.write_all(&[7u8; 5000]).unwrap();
            drop(f);
            fs.unmount().unwrap();
        }
        disk.into_inner()
    }

    #[test]
    fn mutated_fat_volumes_give_errors_or_data_never_a_hang() {
        let base = sample();
        fuzz(&base);
        // Deterministic mutations of the boot sector, FAT and root directory region.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let mut v = base.clone();
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed % (256 << 10)) as usize;
                v[at] = (seed >> 32) as u8;
            }
            fuzz(&v);
        }
        fuzz(&[]);
        fuzz(&base[..511]);
    }
}
