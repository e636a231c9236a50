//! Host storage: synchronous positional I/O under every format driver.
//!
//! A [`Storage`] is one host file (or an in-memory buffer in tests). Drivers never seek; every call
//! names its offset, so one storage can serve several threads at once.

mod file;
mod lock;
mod mem;

pub use file::FileStorage;
pub use mem::{FailPoint, MemStorage};

use std::fmt::Debug;
use std::io;
use std::path::Path;

/// Size of the zero buffer used when a storage cannot punch holes.
const ZERO_CHUNK: usize = 1 << 20;

/// Positional I/O over one host file.
pub trait Storage: Send + Sync + Debug {
    /// Fill `buf` from `offset`. Reading past the end of the storage is an
    /// [`io::ErrorKind::UnexpectedEof`] error: drivers must bound offsets first.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Write all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncate or extend (with zeroes) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Make written data durable.
    fn sync(&self) -> io::Result<()>;

    /// Turn [`Storage::sync`] into a no-op from now on: the caller accepts that a host crash may
    /// lose or tear what was written (cache mode `unsafe`, qemu-img convert's default). Returns
    /// whether the storage honours it; storages without durable state need not.
    fn ignore_sync(&self) -> bool {
        false
    }

    /// The first data region at or after `offset`, as `(start, end)`; `None` when only holes remain.
    /// Storages that cannot tell report everything as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len()?;
        Ok((offset < len).then_some((offset, len)))
    }

    /// Deallocate a range so it reads as zeroes. Returns `false` when the storage cannot.
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Make a range read as zeroes: punch a hole where possible, otherwise write zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.punch_hole(offset, len)? {
            return Ok(());
        }
        write_zero_bytes(self, offset, len)
    }

    /// Bytes the storage occupies on the host (allocated blocks), for `actual-size`.
    fn allocated_size(&self) -> io::Result<u64> {
        self.len()
    }

    /// The host path, when the storage is a file.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// The open host file, when the storage is one (for whole-file operations such as reflink
    /// clones, which must act on the file that was opened, not on whatever its name names now).
    fn host_file(&self) -> Option<&std::fs::File> {
        None
    }
}

/// A shared storage is a storage: lets tests keep a handle on a [`MemStorage`] (to inject faults or
/// look at the bytes) while a driver owns a `Box` of the same storage.
impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn ignore_sync(&self) -> bool {
        (**self).ignore_sync()
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        (**self).next_data(offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        (**self).allocated_size()
    }
    fn path(&self) -> Option<&Path> {
        (**self).path()
    }
    fn host_file(&self) -> Option<&std::fs::File> {
        (**self).host_file()
    }
}

/// Write literal zero bytes over a range, in bounded chunks.
pub fn write_zero_bytes<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        let at = offset
            .checked_add(done)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        s.write_at(&zeroes[..n], at)?;
        done += n as u64;
    }
    Ok(())
}

/// Read `count` little-endian 32-bit entries at `offset` (a VDI block map, a Parallels BAT), in
/// reads of at most 1 MiB. The caller has bounded `count` and checked the extent against the file.
pub fn read_le_u32_table<S: Storage + ?Sized>(
    s: &S,
    offset: u64,
    count: usize,
) -> io::Result<Vec<u32>> {
    const CHUNK: usize = 1 << 20;
    let mut table = Vec::with_capacity(count);
    let mut buf = vec![0u8; CHUNK.min(count.saturating_mul(4))];
    while table.len() < count {
        let n = (count - table.len()).min(CHUNK / 4);
        let chunk = &mut buf[..n * 4];
        s.read_at(chunk, offset + table.len() as u64 * 4)?;
        table.extend(
            chunk
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok(table)
}

/// True when every byte of `buf` is zero. Written to vectorise well; this is on the copy hot path.
pub fn is_zero(buf: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: any bit pattern is a valid u128, and align_to only yields aligned, in-bounds words.
        unsafe { buf.align_to::<u128>() }
    };
    prefix.iter().all(|&b| b == 0)
        && suffix.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0u128, |acc, &w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for i in [0, 1, 15, 16, 2048, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
    }
}
