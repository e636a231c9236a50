//! A [`Storage`] view that encrypts on write and decrypts on read: the guest data of a raw LUKS
//! volume (after its payload offset) and the data clusters of a qcow2 image with
//! `encrypt.format=luks`. Offsets are those of the underlying file; the IV of the sector at file
//! offset `o` is sector number `(o - iv_base) / sector_size` (qemu: the guest offset for raw LUKS, so
//! `iv_base` is the payload offset; the host offset for qcow2, so `iv_base` is 0).
//!
//! Reads and writes need not be sector-aligned: a partial sector is read, decrypted, patched and
//! re-encrypted under a lock, so concurrent partial writes to one sector do not lose each other.

use super::crypto::SectorCipher;
use crate::storage::Storage;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Bytes encrypted per buffer when writing: bounds the copy a large write makes.
const CHUNK: usize = 1 << 20;

/// Encrypted view of a storage.
#[derive(Debug)]
pub struct CryptStorage {
    inner: Arc<dyn Storage>,
    cipher: Arc<SectorCipher>,
    iv_base: u64,
    rmw: Mutex<()>,
}

fn inval(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

impl CryptStorage {
    /// Bytes per encryption sector.
    fn ss(&self) -> u64 {
        self.cipher.sector_size()
    }

    /// Encrypt `inner`'s bytes from `iv_base` on (sector-aligned) with `cipher`.
    pub fn new(inner: Arc<dyn Storage>, cipher: Arc<SectorCipher>, iv_base: u64) -> Self {
        CryptStorage {
            inner,
            cipher,
            iv_base,
            rmw: Mutex::new(()),
        }
    }

    fn sector_of(&self, offset: u64) -> io::Result<u64> {
        offset
            .checked_sub(self.iv_base)
            .map(|o| o / self.ss())
            .ok_or_else(|| inval("encrypted access before the payload"))
    }

    /// Read and decrypt the whole sectors covering `[offset, offset + len)`.
    fn read_sectors(&self, offset: u64, len: usize) -> io::Result<(Vec<u8>, u64)> {
        let rel = offset
            .checked_sub(self.iv_base)
            .ok_or_else(|| inval("encrypted access before the payload"))?;
        let start = self.iv_base + rel / self.ss() * self.ss();
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| inval("offset overflow"))?;
        let end = self.iv_base + (end - self.iv_base).div_ceil(self.ss()) * self.ss();
        let mut buf = vec![0u8; (end - start) as usize];
        self.inner.read_at(&mut buf, start)?;
        self.cipher.decrypt(&mut buf, self.sector_of(start)?);
        Ok((buf, start))
    }
}

impl Storage for CryptStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let aligned = (offset.wrapping_sub(self.iv_base)) % self.ss() == 0
            && buf.len() as u64 % self.ss() == 0;
        if aligned {
            self.inner.read_at(buf, offset)?;
            self.cipher.decrypt(buf, self.sector_of(offset)?);
            return Ok(());
        }
        let (plain, start) = self.read_sectors(offset, buf.len())?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&plain[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let head = offset
            .checked_sub(self.iv_base)
            .ok_or_else(|| inval("encrypted access before the payload"))?
            % self.ss();
        if head != 0 || buf.len() as u64 % self.ss() != 0 {
            let _g = self.rmw.lock().unwrap_or_else(|e| e.into_inner());
            let (mut plain, start) = self.read_sectors_for_write(offset, buf.len())?;
            let at = (offset - start) as usize;
            plain[at..at + buf.len()].copy_from_slice(buf);
            self.cipher.encrypt(&mut plain, self.sector_of(start)?);
            return self.inner.write_at(&plain, start);
        }
        let mut tmp = vec![0u8; buf.len().min(CHUNK)];
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(CHUNK);
            let at = offset + done as u64;
            tmp[..n].copy_from_slice(&buf[done..done + n]);
            self.cipher.encrypt(&mut tmp[..n], self.sector_of(at)?);
            self.inner.write_at(&tmp[..n], at)?;
            done += n;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn ignore_sync(&self) -> bool {
        self.inner.ignore_sync()
    }

    /// Holes of the host file do not read as zeroes once decrypted: everything is data.
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len()?;
        Ok((offset < len).then_some((offset, len)))
    }

    /// Punching a hole would make the range decrypt to noise: write encrypted zeroes instead.
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }

    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
}

impl CryptStorage {
    /// Like [`CryptStorage::read_sectors`], but sectors past the end of the file (a write that
    /// grows it) read as zeroes.
    fn read_sectors_for_write(&self, offset: u64, len: usize) -> io::Result<(Vec<u8>, u64)> {
        let file_len = self.inner.len()?;
        let rel = offset
            .checked_sub(self.iv_base)
            .ok_or_else(|| inval("encrypted access before the payload"))?;
        let start = self.iv_base + rel / self.ss() * self.ss();
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| inval("offset overflow"))?;
        let end = self.iv_base + (end - self.iv_base).div_ceil(self.ss()) * self.ss();
        if end <= file_len {
            return self.read_sectors(offset, len);
        }
        let mut buf = vec![0u8; (end - start) as usize];
        // Whole sectors still inside the file keep their contents; the rest starts as zeroes.
        let keep = file_len.saturating_sub(start) / self.ss() * self.ss();
        if keep > 0 {
            self.inner.read_at(&mut buf[..keep as usize], start)?;
            self.cipher
                .decrypt(&mut buf[..keep as usize], self.sector_of(start)?);
        }
        Ok((buf, start))
    }
}

#[cfg(test)]
mod tests {
    use super::super::crypto::{CipherSpec, SectorCipher};
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn unaligned_writes_and_reads_round_trip_and_leave_neighbours_intact() {
        let spec = CipherSpec::parse("aes", "xts-plain64", 32).unwrap();
        let cipher = Arc::new(SectorCipher::new(spec, &[7u8; 32]).unwrap());
        let inner: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(vec![0u8; 4096]));
        let c = CryptStorage::new(Arc::clone(&inner), cipher, 1024);
        c.write_at(&[1u8; 2048], 1024).unwrap();
        c.write_at(&[9u8; 100], 1024 + 500).unwrap();
        let mut back = vec![0u8; 2048];
        c.read_at(&mut back, 1024).unwrap();
        let mut expect = vec![1u8; 2048];
        expect[500..600].fill(9);
        assert_eq!(back, expect);
        let mut raw = vec![0u8; 2048];
        inner.read_at(&mut raw, 1024).unwrap();
        assert_ne!(raw, expect, "stored encrypted");
        assert!(c.read_at(&mut [0u8; 16], 0).is_err(), "before the payload");
        // A partial write past the end grows the file with encrypted zeroes around it.
        c.write_at(&[5u8; 10], 4096 + 3).unwrap();
        let mut tail = vec![0u8; 512];
        c.read_at(&mut tail, 4096).unwrap();
        assert_eq!(&tail[3..13], &[5u8; 10]);
        assert!(tail[13..].iter().all(|&b| b == 0) && tail[..3].iter().all(|&b| b == 0));
    }
}
