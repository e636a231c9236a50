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
