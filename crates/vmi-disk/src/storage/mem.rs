//! An in-memory [`Storage`] for tests, with fault injection: fail a read or write that touches a
//! chosen offset, or fail every write after N of them (a crash mid-update).

use super::Storage;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// Where an injected fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// Any read overlapping this offset fails.
    ReadAt(u64),
    /// Any write overlapping this offset fails.
    WriteAt(u64),
    /// Every write after the first N succeeds fails (simulates a crash or full disk).
    WritesAfter(u64),
    /// `sync` fails.
    Sync,
}

/// A growable byte vector behind a lock.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    faults: Mutex<Vec<FailPoint>>,
    writes: AtomicU64,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(bytes),
            ..Default::default()
        }
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Arm a fault.
    pub fn fail(&self, point: FailPoint) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(point);
    }

    /// Disarm all faults.
    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn check(&self, f: impl Fn(&FailPoint) -> bool) -> io::Result<()> {
        if self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(f)
        {
            return Err(io::Error::other("injected fault"));
        }
        Ok(())
    }
}

fn overlaps(point: u64, offset: u64, len: usize) -> bool {
    point >= offset && point < offset.saturating_add(len as u64)
}

fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::other("offset overflow"))?;
    Ok((start, end))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(|f| matches!(*f, FailPoint::ReadAt(p) if overlaps(p, offset, buf.len())))?;
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        if end > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        buf.copy_from_slice(&data[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        self.check(|f| match *f {
            FailPoint::WriteAt(p) => overlaps(p, offset, buf.len()),
            FailPoint::WritesAfter(k) => n >= k,
            _ => false,
        })?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.check(|f| *f == FailPoint::Sync)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = usize::try_from(offset.saturating_add(len))
            .unwrap_or(usize::MAX)
            .min(data.len());
        data[start..end].fill(0);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_write_fault_fails_only_overlapping_writes() {
        let s = MemStorage::new();
        s.fail(FailPoint::WriteAt(100));
        assert!(s.write_at(&[1; 10], 0).is_ok());
        assert!(s.write_at(&[1; 10], 95).is_err());
    }

    #[test]
    fn read_past_end_is_an_error() {
        let s = MemStorage::from_bytes(vec![0; 10]);
        let mut b = [0u8; 4];
        assert!(s.read_at(&mut b, 8).is_err());
    }
}
