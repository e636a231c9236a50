//! [`Storage`] over a host file: `pread`/`pwrite`, `SEEK_DATA`/`SEEK_HOLE` to find holes and
//! `fallocate(PUNCH_HOLE)` to make them, with clean fallbacks where the filesystem lacks them.
//! Opening takes QEMU's image locks ([`super::lock`]) unless the caller asks to share.

use super::lock::{lock_image, ImageLock};
use super::Storage;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    /// Cleared the first time the filesystem refuses `SEEK_DATA`, so later calls skip the syscall.
    seek_data: AtomicBool,
    /// Cleared the first time the filesystem refuses hole punching.
    punch: AtomicBool,
    /// Set by [`Storage::ignore_sync`]: `sync` does nothing.
    no_sync: AtomicBool,
    /// QEMU-compatible image locks, held while the storage lives (`None`: shared, or the file
    /// system has no OFD locks).
    _lock: Option<ImageLock>,
}

impl FileStorage {
    /// Open an existing file, read-only or read-write, taking QEMU's image locks: an image a
    /// running QEMU writes (or, for writing, one it reads) fails with
    /// [`io::ErrorKind::WouldBlock`] and QEMU's message.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Self::locked(file, path, writable)
    }

    /// Open an existing file read-only without taking locks (qemu-img's `-U`/`force-share`:
    /// the caller accepts reading an image another process may be changing).
    pub fn open_shared(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).open(path)?;
        Ok(Self::from_file(file, path, false))
    }

    /// Create a new file (failing if it exists) opened read-write.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Self::locked(file, path, true)
    }

    /// Create or truncate a file, opened read-write.
    pub fn create_truncate(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Self::locked(file, path, true)
    }

    /// Wrap a file opened elsewhere (by the gate), read-write when `writable`, taking the same
    /// locks as [`FileStorage::open`].
    pub fn from_open_file(file: File, path: &Path, writable: bool) -> io::Result<Self> {
        Self::locked(file, path, writable)
    }

    /// Wrap a file opened elsewhere without taking locks (`force-share`).
    pub fn from_open_file_shared(file: File, path: &Path) -> Self {
        Self::from_file(file, path, false)
    }

    fn locked(file: File, path: &Path, writable: bool) -> io::Result<Self> {
        let lock = lock_image(&file, path, writable)?;
        let mut s = Self::from_file(file, path, writable);
        s._lock = lock;
        Ok(s)
    }

    /// Wrap a file the caller already opened read-write (e.g. an anonymous `O_TMPFILE` file that
    /// is linked into place later); `path` is the name errors and drivers use for it.
    pub fn adopt(file: File, path: &Path) -> Self {
        Self::from_file(file, path, true)
    }

    fn from_file(file: File, path: &Path, writable: bool) -> Self {
        FileStorage {
            file,
            path: path.to_path_buf(),
            writable,
            seek_data: AtomicBool::new(true),
            punch: AtomicBool::new(true),
            no_sync: AtomicBool::new(false),
            _lock: None,
        }
    }

    /// Whether the file was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn lseek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: lseek on a file descriptor we own; it does not touch memory.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        if self.no_sync.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.file.sync_all()
    }

    fn ignore_sync(&self) -> bool {
        self.no_sync.store(true, Ordering::Relaxed);
        true
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let everything = || -> io::Result<Option<(u64, u64)>> {
            let len = self.len()?;
            Ok((offset < len).then_some((offset, len)))
        };
        if !self.seek_data.load(Ordering::Relaxed) {
            return everything();
        }
        // No stat per call: SEEK_DATA answers ENXIO at or past the end, and SEEK_HOLE finds the
        // end of the file as its last hole (this runs once per data extent of a raw source).
        let start = match self.lseek(offset, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                self.seek_data.store(false, Ordering::Relaxed);
                return everything();
            }
            Err(e) => return Err(e),
        };
        let end = match self.lseek(start, libc::SEEK_HOLE)? {
            Some(e) => e,
            None => self.len()?,
        };
        Ok((start < end).then_some((start, end)))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.punch.load(Ordering::Relaxed) || len == 0 {
            return Ok(len == 0);
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(false);
        };
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                self.punch.store(false, Ordering::Relaxed);
                Ok(false)
            }
            _ => Err(e),
        }
    }

    fn allocated_size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn host_file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_data_skips_a_hole_in_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let s = FileStorage::create(&p).unwrap();
        s.set_len(16 << 20).unwrap();
        s.write_at(&[1u8; 4096], 8 << 20).unwrap();
        let (start, end) = s.next_data(0).unwrap().unwrap();
        // Filesystems without SEEK_DATA report everything as data; both answers are correct.
        assert!(start == 0 || start == 8 << 20);
        assert!(end > start);
        if start == 8 << 20 {
            assert!(s.next_data(end).unwrap().is_none() || end < 16 << 20);
        }
    }

    #[test]
    fn write_zeroes_reads_back_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(&dir.path().join("z")).unwrap();
        s.write_at(&[0xaa; 65536], 0).unwrap();
        s.write_zeroes(4096, 8192).unwrap();
        let mut buf = vec![0u8; 65536];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xaa));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 0xaa));
        assert_eq!(s.len().unwrap(), 65536);
    }
}
