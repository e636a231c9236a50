//! rpm's package database in its SQLite form (`rpmdb.sqlite`, rpm ≥ 4.16: table `Packages` of
//! `(hnum, blob)`), each blob an rpm header as rpm's `lib/header.c` stores it: big-endian entry
//! count and data length, 16-byte index entries `(tag, type, offset, count)`, then the data.
//! Only NAME, VERSION, RELEASE, EPOCH and ARCH are read; every offset is checked.

use crate::error::{Error, Result};
use crate::ext4::Ext4;
use crate::inspect::{Package, MAX_LIST, MAX_RPMDB};
use std::path::Path;

/// rpm's HEADER_TAGS_MAX: most index entries in one header.
const MAX_TAGS: u32 = 0xffff;
/// rpm's HEADER_DATA_MAX: largest data store.
const MAX_DATA: u32 = 0x0fff_ffff;

const TAG_NAME: u32 = 1000;
const TAG_VERSION: u32 = 1001;
const TAG_RELEASE: u32 = 1002;
const TAG_EPOCH: u32 = 1003;
const TAG_ARCH: u32 = 1022;
const TYPE_INT32: u32 = 4;
const TYPE_STRING: u32 = 6;

fn be32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

/// Parse a header blob into a package; `None` for a malformed blob.
pub fn parse_header(blob: &[u8]) -> Option<Package> {
    let il = be32(blob, 0)?;
    let dl = be32(blob, 4)?;
    if il > MAX_TAGS || dl > MAX_DATA {
        return None;
    }
    let index_end = 8usize.checked_add((il as usize).checked_mul(16)?)?;
    let data = blob.get(index_end..index_end.checked_add(dl as usize)?)?;
    let mut name = None;
    let mut version = String::new();
    let mut release = String::new();
    let mut epoch = None;
    let mut arch = String::new();
    for i in 0..il as usize {
        let e = 8 + i * 16;
        let (tag, ty, off) = (
            be32(blob, e)?,
            be32(blob, e + 4)?,
            be32(blob, e + 8)? as usize,
        );
        let string = || -> Option<String> {
            let rest = data.get(off..)?;
            let end = rest.iter().position(|&c| c == 0)?;
            Some(String::from_utf8_lossy(&rest[..end]).into_owned())
        };
        match (tag, ty) {
            (TAG_NAME, TYPE_STRING) => name = string(),
            (TAG_VERSION, TYPE_STRING) => version = string()?,
            (TAG_RELEASE, TYPE_STRING) => release = string()?,
            (TAG_ARCH, TYPE_STRING) => arch = string()?,
            (TAG_EPOCH, TYPE_INT32) => epoch = be32(data, off),
            _ => {}
        }
    }
    let mut v = match epoch {
        Some(e) => format!("{e}:{version}"),
        None => version,
    };
    if !release.is_empty() {
        v = format!("{v}-{release}");
    }
    Some(Package {
        name: name?,
        version: v,
        arch,
    })
}

/// The packages of an `rpmdb.sqlite` on the host.
pub fn read_rpmdb_file(path: &Path) -> Result<Vec<Package>> {
    let db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::Unsupported(format!("rpm database: {e}")))?;
    let sql_err = |e: rusqlite::Error| Error::Unsupported(format!("rpm database: {e}"));
    let mut st = db
        .prepare("SELECT blob FROM Packages ORDER BY hnum")
        .map_err(sql_err)?;
    let rows = st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        let blob = row.map_err(sql_err)?;
        if let Some(p) = parse_header(&blob) {
            out.push(p);
        }
        if out.len() >= MAX_LIST {
            break;
        }
    }
    Ok(out)
}

/// The packages of the guest's `rpmdb.sqlite` at `path` (copied to a host temporary file for
/// SQLite to read).
pub fn read_guest_rpmdb(fs: &Ext4<'_>, path: &str) -> Result<Vec<Package>> {
    let st = fs.stat_follow(path)?;
    if st.size > MAX_RPMDB {
        return Err(Error::Unsupported(format!(
            "{path}: {} bytes, larger than the {MAX_RPMDB} read",
            st.size
        )));
    }
    let mut tmp =
        tempfile::NamedTempFile::new().map_err(|e| Error::io("creating a temporary file", e))?;
    fs.read_file(path, tmp.as_file_mut())?;
    read_rpmdb_file(tmp.path())
}

/// Build a header blob (for tests and fixtures): string tags and an optional epoch.
pub fn build_header(
    name: &str,
    version: &str,
    release: &str,
    arch: &str,
    epoch: Option<u32>,
) -> Vec<u8> {
    let mut index = Vec::new();
    let mut data = Vec::new();
    let mut add = |tag: u32, ty: u32, bytes: &[u8]| {
        while ty == TYPE_INT32 && data.len() % 4 != 0 {
            data.push(0);
        }
        index.extend_from_slice(&tag.to_be_bytes());
        index.extend_from_slice(&ty.to_be_bytes());
        index.extend_from_slice(&(data.len() as u32).to_be_bytes());
        index.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(bytes);
    };
    let z = |s: &str| [s.as_bytes(), &[0]].concat();
    add(TAG_NAME, TYPE_STRING, &z(name));
    add(TAG_VERSION, TYPE_STRING, &z(version));
    add(TAG_RELEASE, TYPE_STRING, &z(release));
    if let Some(e) = epoch {
        add(TAG_EPOCH, TYPE_INT32, &e.to_be_bytes());
    }
    add(TAG_ARCH, TYPE_STRING, &z(arch));
    let mut out = Vec::new();
    out.extend_from_slice(&((index.len() / 16) as u32).to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&index);
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_blob_gives_name_epoch_version_release_and_arch() {
        let b = build_header("bash", "5.2.26", "3.fc40", "x86_64", Some(1));
        let p = parse_header(&b).unwrap();
        assert_eq!(
            (p.name.as_str(), p.version.as_str(), p.arch.as_str()),
            ("bash", "1:5.2.26-3.fc40", "x86_64")
        );
    }

    #[test]
    fn truncated_or_hostile_header_blobs_are_skipped() {
        let b = build_header("bash", "5", "1", "x86_64", None);
        for n in 0..b.len() {
            let _ = parse_header(&b[..n]);
        }
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_header(&huge), None);
        let mut bad_off = b.clone();
        bad_off[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_header(&bad_off), None);
    }
}
