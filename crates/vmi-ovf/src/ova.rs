//! OVA archives (DSP0243 §5.3): a USTAR tar (POSIX.1-1988 `ustar` format) whose first member is
//! the descriptor, then the manifest, then the certificate, then the files in References order.
//! Members are 512-byte aligned by construction. Sizes of 8 GiB and more, which the 11-digit octal
//! field cannot hold, use the GNU base-256 size encoding (a set high bit in the first byte), which
//! GNU tar, libarchive and vSphere read. Reading also accepts PAX `size`/`path` records and GNU long
//! names, and members are read in place without extracting them.

use crate::error::{OvfError, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Tar block size (POSIX.1 ustar).
pub const BLOCK: u64 = 512;
/// Largest size the 11-digit octal field holds (8 GiB − 1).
pub const MAX_OCTAL_SIZE: u64 = 0o77777777777;
/// Most members read from one archive.
pub const MAX_MEMBERS: usize = 10_000;
/// Largest PAX extended header or GNU long name accepted.
pub const MAX_EXTENDED_HEADER: u64 = 64 * 1024;
/// Longest member name written (the ustar name field; OVA names must be plain file names).
pub const MAX_NAME: usize = 100;

/// One member of an archive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// Name.
    pub name: String,
    /// Offset of the data in the archive.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// An OVA opened for reading.
#[derive(Debug)]
pub struct Ova {
    path: PathBuf,
    file: Arc<File>,
    /// Regular-file members in archive order.
    pub members: Vec<Member>,
}

fn octal(field: &[u8]) -> Option<u64> {
    // GNU base-256: high bit of the first byte set, big-endian value in the rest.
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect::<String>()
        .trim()
        .to_string();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(&s, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl Ova {
    /// Open an archive and index its members.
    pub fn open(path: &Path) -> Result<Ova> {
        let mut file = File::open(path).map_err(|e| OvfError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| OvfError::io("stat", path, e))?
            .len();
        let mut members = Vec::new();
        let mut pos = 0u64;
        let mut next_name: Option<String> = None;
        let mut next_size: Option<u64> = None;
        let mut hdr = [0u8; 512];
        while pos + BLOCK <= len {
            file.seek(SeekFrom::Start(pos))
                .map_err(|e| OvfError::io("seek", path, e))?;
            file.read_exact(&mut hdr)
                .map_err(|e| OvfError::io("read", path, e))?;
            if hdr.iter().all(|&b| b == 0) {
                break;
            }
            let stored = octal(&hdr[148..156]);
            let sum: u64 = hdr
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    if (148..156).contains(&i) {
                        32
                    } else {
                        u64::from(b)
                    }
                })
                .sum();
            if stored != Some(sum) {
                return Err(OvfError::Invalid(format!(
                    "{}: tar header at {pos} has a bad checksum",
                    path.display()
                )));
            }
            let size = octal(&hdr[124..136]).ok_or_else(|| {
                OvfError::Invalid(format!("{}: tar header at {pos}: bad size", path.display()))
            })?;
            let typeflag = hdr[156];
            let data = pos + BLOCK;
            let size = match (typeflag, next_size.take()) {
                (b'0' | 0, Some(s)) => s,
                _ => size,
            };
            let end = data
                .checked_add(size)
                .filter(|&e| e <= len)
                .ok_or_else(|| {
                    OvfError::Invalid(format!(
                        "{}: member at {pos} of {size} bytes runs past the end ({len})",
                        path.display()
                    ))
                })?;
            match typeflag {
                b'0' | 0 => {
                    let mut name = cstr(&hdr[0..100]);
                    if &hdr[257..262] == b"ustar" {
                        let prefix = cstr(&hdr[345..500]);
                        if !prefix.is_empty() {
                            name = format!("{prefix}/{name}");
                        }
                    }
                    if let Some(n) = next_name.take() {
                        name = n;
                    }
                    if members.len() >= MAX_MEMBERS {
                        return Err(OvfError::Invalid(format!(
                            "{}: more than {MAX_MEMBERS} members",
                            path.display()
                        )));
                    }
                    members.push(Member {
                        name,
                        offset: data,
                        size,
                    });
                }
                b'x' | b'L' => {
                    if size > MAX_EXTENDED_HEADER {
                        return Err(OvfError::Invalid(format!(
                            "{}: extended header of {size} bytes",
                            path.display()
                        )));
                    }
                    let mut buf = vec![0u8; size as usize];
                    file.read_exact(&mut buf)
                        .map_err(|e| OvfError::io("read", path, e))?;
                    if typeflag == b'L' {
                        next_name = Some(cstr(&buf));
                    } else {
                        for (k, v) in pax_records(&buf) {
                            match k.as_str() {
                                "path" => next_name = Some(v),
                                "size" => next_size = v.parse().ok(),
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            }
            pos = end.div_ceil(BLOCK) * BLOCK;
        }
        Ok(Ova {
            path: path.to_path_buf(),
            file: Arc::new(file),
            members,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.name == name || m.name.trim_start_matches("./") == name)
    }

    /// Read a whole small member (descriptor, manifest, certificate), refusing over `max` bytes.
    pub fn read_small(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        let m = self.member(name).ok_or_else(|| {
            OvfError::Invalid(format!("{}: no member '{name}'", self.path.display()))
        })?;
        if m.size > max {
            return Err(OvfError::Invalid(format!(
                "{}: member '{name}' is {} bytes, more than {max}",
                self.path.display(),
                m.size
            )));
        }
        let mut buf = vec![0u8; m.size as usize];
        let mut r = self.reader(m);
        r.read_exact(&mut buf)
            .map_err(|e| OvfError::io("read", &self.path, e))?;
        Ok(buf)
    }

    /// A reader over one member.
    pub fn reader(&self, m: &Member) -> MemberReader {
        MemberReader {
            file: self.file.clone(),
            offset: m.offset,
            remaining: m.size,
        }
    }

    /// A read-only [`vmi_disk::storage::Storage`] over one member, to open a disk in place.
    pub fn storage(&self, m: &Member) -> MemberStorage {
        MemberStorage {
            file: self.file.clone(),
            offset: m.offset,
            len: m.size,
            path: self.path.clone(),
        }
    }
}

fn pax_records(buf: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|&b| b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp + 1 || len > rest.len() {
            break;
        }
        let rec = String::from_utf8_lossy(&rest[sp + 1..len - 1]).into_owned();
        if let Some((k, v)) = rec.split_once('=') {
            out.push((k.to_string(), v.to_string()));
        }
        rest = &rest[len..];
    }
    out
}

/// Sequential reader over one archive member.
#[derive(Debug)]
pub struct MemberReader {
    file: Arc<File>,
    offset: u64,
    remaining: u64,
}

impl Read for MemberReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = (buf.len() as u64).min(self.remaining) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.offset)?;
        self.offset += got as u64;
        self.remaining -= got as u64;
        Ok(got)
    }
}

/// Read-only storage over a member: disks inside an OVA are opened without extracting them.
#[derive(Debug)]
pub struct MemberStorage {
    file: Arc<File>,
    offset: u64,
    len: u64,
    path: PathBuf,
}

impl vmi_disk::storage::Storage for MemberStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the archive member",
            ));
        }
        self.file.read_exact_at(buf, self.offset + offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "archive members are read-only",
        ))
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "archive members are read-only",
        ))
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

/// A POSIX ustar header for a regular file `name` of `size` bytes (GNU base-256 size when it does
/// not fit the octal field).
pub fn ustar_header(name: &str, size: u64) -> Result<[u8; 512]> {
    if name.is_empty() || name.len() >= MAX_NAME || name.contains('/') {
        return Err(OvfError::Usage(format!(
            "OVA member name '{name}' must be a plain file name under {MAX_NAME} bytes"
        )));
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size <= MAX_OCTAL_SIZE {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        // GNU base-256: marker bit, then the size big-endian in the remaining 11 bytes.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// Writes an OVA member by member.
#[derive(Debug)]
pub struct OvaWriter {
    path: PathBuf,
    out: std::io::BufWriter<File>,
}

impl OvaWriter {
    /// Create the archive (the file must not exist).
    pub fn create(path: &Path) -> Result<OvaWriter> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| OvfError::io("create", path, e))?;
        Ok(OvaWriter {
            path: path.to_path_buf(),
            out: std::io::BufWriter::new(f),
        })
    }

    fn header(&mut self, name: &str, size: u64) -> Result<()> {
        let h = ustar_header(name, size)?;
        self.out
            .write_all(&h)
            .map_err(|e| OvfError::io("write", &self.path, e))
    }
    fn pad(&mut self, size: u64) -> Result<()> {
        let pad = (BLOCK - size % BLOCK) % BLOCK;
        self.out
            .write_all(&vec![0u8; pad as usize])
            .map_err(|e| OvfError::io("write", &self.path, e))
    }

    /// Add a member from memory.
    pub fn add_bytes(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.header(name, data.len() as u64)?;
        self.out
            .write_all(data)
            .map_err(|e| OvfError::io("write", &self.path, e))?;
        self.pad(data.len() as u64)
    }

    /// Add a member streamed from a file.
    pub fn add_file(&mut self, name: &str, src: &Path) -> Result<()> {
        let mut f = File::open(src).map_err(|e| OvfError::io("open", src, e))?;
        let size = f
            .metadata()
            .map_err(|e| OvfError::io("stat", src, e))?
            .len();
        self.header(name, size)?;
        let copied = std::io::copy(&mut (&mut f).take(size), &mut self.out)
            .map_err(|e| OvfError::io("read", src, e))?;
        if copied != size {
            return Err(OvfError::Invalid(format!(
                "{}: changed size while being archived",
                src.display()
            )));
        }
        self.pad(size)
    }

    /// Write the two zero blocks that end the archive and flush.
    pub fn finish(mut self) -> Result<()> {
        self.out
            .write_all(&[0u8; 1024])
            .map_err(|e| OvfError::io("write", &self.path, e))?;
        let f = self
            .out
            .into_inner()
            .map_err(|e| OvfError::io("write", &self.path, e.into_error()))?;
        f.sync_all()
            .map_err(|e| OvfError::io("sync", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_members_in_order_and_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.ova");
        let mut w = OvaWriter::create(&p).unwrap();
        w.add_bytes("a.ovf", b"<Envelope/>").unwrap();
        w.add_bytes("a.mf", &[7u8; 513]).unwrap();
        w.finish().unwrap();
        let ova = Ova::open(&p).unwrap();
        let names: Vec<_> = ova.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a.ovf", "a.mf"]);
        assert!(ova.members.iter().all(|m| m.offset % BLOCK == 0));
        assert_eq!(ova.read_small("a.mf", 1 << 20).unwrap(), vec![7u8; 513]);
        assert!(ova.read_small("a.mf", 10).is_err());
        assert_eq!(std::fs::metadata(&p).unwrap().len() % BLOCK, 0);
    }

    #[test]
    fn base256_sizes_round_trip_through_the_field_parser() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[4..12].copy_from_slice(&(9u64 << 30).to_be_bytes());
        assert_eq!(octal(&field), Some(9 << 30));
        assert_eq!(octal(b"00000001000\0"), Some(512));
    }

    #[test]
    fn headers_for_members_over_8_gib_use_base256_and_read_back() {
        let h = ustar_header("big.vmdk", 9 << 30).unwrap();
        assert_eq!(h[124] & 0x80, 0x80);
        assert_eq!(octal(&h[124..136]), Some(9 << 30));
        let h = ustar_header("small", MAX_OCTAL_SIZE).unwrap();
        assert_eq!(octal(&h[124..136]), Some(MAX_OCTAL_SIZE));
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(b)
                }
            })
            .sum();
        assert_eq!(octal(&h[148..156]), Some(sum));
    }

    #[test]
    fn open_rejects_bad_checksums_and_truncated_members() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.ova");
        let mut w = OvaWriter::create(&p).unwrap();
        w.add_bytes("x", &[1u8; 2000]).unwrap();
        w.finish().unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let q = dir.path().join("trunc.ova");
        std::fs::write(&q, &bytes[..1024]).unwrap();
        assert!(Ova::open(&q).is_err());
        bytes[0] ^= 1;
        let r = dir.path().join("sum.ova");
        std::fs::write(&r, &bytes).unwrap();
        assert!(Ova::open(&r).unwrap_err().to_string().contains("checksum"));
    }

    #[test]
    fn writer_refuses_paths_and_long_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = OvaWriter::create(&dir.path().join("a.ova")).unwrap();
        assert!(w.add_bytes("../x", b"").is_err());
        assert!(w.add_bytes(&"n".repeat(120), b"").is_err());
    }
}
