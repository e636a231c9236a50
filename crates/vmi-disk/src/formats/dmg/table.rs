//! UDIF metadata (Apple's Universal Disk Image Format, as qemu's `block/dmg.c` reads it): the
//! 512-byte `koly` trailer, the block tables (`mish`) found either in the XML property list's
//! `blkx` `<data>` elements (base64) or in the binary resource fork, and the chunk entries they hold.
//!
//! `koly` trailer (big-endian): 0x00 magic `koly`, 0x04 version (4), 0x08 header size (512),
//! 0x18 data fork offset, 0x28/0x30 resource fork offset/length, 0xd8/0xe0 XML plist
//! offset/length, 0x1ec sector count.
//!
//! `mish` block table (big-endian): 0x00 magic `mish`, 0x08 first sector, 0x18 data offset (added
//! to the data fork offset), chunk entries of 40 bytes from byte 204: type (u32), comment (u32),
//! sector (u64, relative to the table's first sector), sector count (u64), compressed offset (u64,
//! relative to the data fork plus the table's data offset), compressed length (u64).

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Magic of the UDIF trailer.
pub(crate) const KOLY_MAGIC: &[u8; 4] = b"koly";
/// Bytes of the trailer.
pub(crate) const KOLY_LEN: u64 = 512;
/// Magic of a block table.
pub(crate) const MISH_MAGIC: &[u8; 4] = b"mish";
/// Bytes of a block table before its chunk entries; qemu skips smaller tables (244 = one entry).
pub(crate) const MISH_HEADER_LEN: usize = 204;
/// Smallest block table qemu reads: the header and one chunk entry.
pub(crate) const MISH_MIN_LEN: usize = 244;
/// Bytes of one chunk entry.
pub(crate) const CHUNK_ENTRY_LEN: usize = 40;
/// Largest compressed or raw chunk (qemu's `DMG_LENGTHS_MAX`, 64 MiB).
pub(crate) const MAX_CHUNK_BYTES: u64 = 64 << 20;
/// Most sectors a chunk that must be inflated or copied may cover (qemu's
/// `DMG_SECTORCOUNTS_MAX`: 64 MiB). Zero chunks are unbounded, as in qemu.
pub(crate) const MAX_CHUNK_SECTORS: u64 = MAX_CHUNK_BYTES / 512;
/// Largest XML property list read (qemu's cap: 16 MiB).
pub(crate) const MAX_PLIST_BYTES: u64 = 16 << 20;
/// Largest resource fork read. qemu bounds it by the file only; vmi also by this.
pub(crate) const MAX_RSRC_BYTES: u64 = 64 << 20;
/// Most chunks an image may declare (40 bytes each on disk; this bounds the table vmi holds).
pub(crate) const MAX_CHUNKS: usize = 1 << 22;

/// Chunk types (UDIF block types) vmi reads; the others are skipped, as qemu skips them.
pub(crate) const UDZE: u32 = 0;
/// Raw (uncompressed) data.
pub(crate) const UDRW: u32 = 1;
/// Ignored: reads as zeroes.
pub(crate) const UDIG: u32 = 2;
/// zlib.
pub(crate) const UDZO: u32 = 0x8000_0005;
/// bzip2.
pub(crate) const UDBZ: u32 = 0x8000_0006;
/// LZFSE.
pub(crate) const ULFO: u32 = 0x8000_0007;

/// How a chunk's data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Reads as zeroes (UDZE and UDIG).
    Zero,
    /// Stored verbatim.
    Raw,
    /// zlib stream.
    Zlib,
    /// bzip2 stream.
    Bzip2,
    /// LZFSE stream.
    Lzfse,
}

/// One chunk: a run of guest sectors and where its data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub kind: Kind,
    /// First guest sector.
    pub sector: u64,
    /// Guest sectors.
    pub count: u64,
    /// Host offset of the (compressed) data.
    pub offset: u64,
    /// Bytes of (compressed) data.
    pub length: u64,
}

/// What the trailer and the block tables say.
#[derive(Debug)]
pub(crate) struct Tables {
    /// Guest sectors.
    pub sectors: u64,
    /// Chunks sorted by sector, non-overlapping, none empty.
    pub chunks: Vec<Chunk>,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_be_bytes(w)
}

fn read(storage: &dyn Storage, at: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    storage
        .read_at(&mut v, at)
        .map_err(|e| Error::io(format!("reading DMG {what} at {at:#x}"), e))?;
    Ok(v)
}

/// Where the `koly` trailer starts: in the last 515 bytes (files need not end on a sector).
fn find_koly(storage: &dyn Storage, file_len: u64) -> Result<u64> {
    if file_len < KOLY_LEN {
        return Err(Error::invalid(format!(
            "DMG file is {file_len} bytes, shorter than its 512-byte trailer"
        )));
    }
    let start = file_len.saturating_sub(511 + 512);
    let buf = read(storage, start, (file_len - start).min(515), "trailer")?;
    buf.windows(4)
        .position(|w| w == KOLY_MAGIC)
        .map(|i| start + i as u64)
        .ok_or_else(|| Error::invalid("could not locate the UDIF trailer (koly) in the DMG file"))
}

/// Read the trailer and every block table.
pub(crate) fn read_tables(storage: &dyn Storage, file_len: u64) -> Result<Tables> {
    let koly = find_koly(storage, file_len)?;
    let t = read(storage, koly, KOLY_LEN.min(file_len - koly), "trailer")?;
    let data_fork = be64(&t, 0x18);
    if data_fork > koly {
        return Err(Error::invalid(format!(
            "DMG data fork offset {data_fork} lies after the trailer"
        )));
    }
    let (rsrc_off, rsrc_len) = (be64(&t, 0x28), be64(&t, 0x30));
    if rsrc_off >= koly || rsrc_len > koly - rsrc_off {
        return Err(Error::invalid(format!(
            "DMG resource fork {rsrc_off}+{rsrc_len} does not lie before the trailer"
        )));
    }
    let (xml_off, xml_len) = (be64(&t, 0xd8), be64(&t, 0xe0));
    if xml_off >= koly || xml_len > koly - xml_off {
        return Err(Error::invalid(format!(
            "DMG property list {xml_off}+{xml_len} does not lie before the trailer"
        )));
    }
    let sectors = be64(&t, 0x1ec);
    if sectors.checked_mul(512).is_none_or(|b| b > i64::MAX as u64) {
        return Err(Error::invalid(format!(
            "DMG sector count {sectors} is too large"
        )));
    }
    let mut chunks = Vec::new();
    if rsrc_len != 0 {
        read_resource_fork(storage, data_fork, rsrc_off, rsrc_len, &mut chunks)?;
    } else if xml_len != 0 {
        if xml_len > MAX_PLIST_BYTES {
            return Err(Error::limit(format!(
                "DMG property list of {xml_len} bytes, more than {MAX_PLIST_BYTES}"
            )));
        }
        let xml = read(storage, xml_off, xml_len, "property list")?;
        read_plist(&xml, data_fork, &mut chunks)?;
    } else {
        return Err(Error::invalid(
            "DMG trailer names neither a resource fork nor a property list",
        ));
    }
    chunks.retain(|c| c.count > 0);
    chunks.sort_by_key(|c| c.sector);
    for w in chunks.windows(2) {
        if w[0].sector + w[0].count > w[1].sector {
            return Err(Error::invalid(format!(
                "DMG chunks at sectors {} and {} overlap",
                w[0].sector, w[1].sector
            )));
        }
    }
    for c in chunks.iter().filter(|c| c.kind != Kind::Zero) {
        if c.offset.checked_add(c.length).is_none_or(|e| e > file_len) {
            return Err(Error::invalid(format!(
                "DMG chunk at sector {} names data {}+{} beyond the end of the file ({file_len} \
                 bytes)",
                c.sector, c.offset, c.length
            )));
        }
    }
    Ok(Tables { sectors, chunks })
}

/// The binary resource fork: a data offset and length, then resources of (u32 length, bytes).
fn read_resource_fork(
    storage: &dyn Storage,
    data_fork: u64,
    begin: u64,
    len: u64,
    chunks: &mut Vec<Chunk>,
) -> Result<()> {
    if len > MAX_RSRC_BYTES {
        return Err(Error::limit(format!(
            "DMG resource fork of {len} bytes, more than {MAX_RSRC_BYTES}"
        )));
    }
    let fork = read(storage, begin, len, "resource fork")?;
    let data_off = u64::from(be32(&fork, 0));
    let count = u64::from(be32(&fork, 8));
    if fork.len() < 12 || data_off > len || count == 0 || data_off + count > len {
        return Err(Error::invalid(format!(
            "DMG resource fork: resource data {data_off}+{count} does not fit its {len} bytes"
        )));
    }
    let mut pos = data_off as usize;
    let end = (data_off + count) as usize;
    while pos < end {
        let n = be32(&fork, pos) as usize;
        if n == 0 || n > end - pos {
            return Err(Error::invalid(format!(
                "DMG resource of {n} bytes at {pos} overruns the resource data"
            )));
        }
        pos += 4;
        let body = fork.get(pos..pos + n).ok_or_else(|| {
            Error::invalid(format!("DMG resource at {pos} overruns the resource fork"))
        })?;
        read_mish(body, data_fork, chunks)?;
        pos += n;
    }
    Ok(())
}

/// The XML property list: every `<data>` element is base64; those that decode to a block table
/// are read (qemu reads them the same way, without parsing the XML).
fn read_plist(xml: &[u8], data_fork: u64, chunks: &mut Vec<Chunk>) -> Result<()> {
    let mut pos = 0;
    while let Some(i) = find(&xml[pos..], b"<data>") {
        let begin = pos + i + 6;
        let len = find(&xml[begin..], b"</data>")
            .ok_or_else(|| Error::invalid("DMG property list: <data> without </data>"))?;
        let mish = base64_lenient(&xml[begin..begin + len]);
        read_mish(&mish, data_fork, chunks)?;
        pos = begin + len + 7;
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decode base64 as GLib's `g_base64_decode` does: characters outside the alphabet (whitespace,
/// line breaks) are skipped, `=` ends the data.
fn base64_lenient(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// One block table. Tables without the `mish` magic or shorter than one entry are skipped, as
/// qemu skips them; unknown chunk types (ADC, comments, the terminator) are skipped too.
fn read_mish(b: &[u8], data_fork: u64, chunks: &mut Vec<Chunk>) -> Result<()> {
    if b.len() < MISH_MIN_LEN || &b[..4] != MISH_MAGIC {
        return Ok(());
    }
    let first_sector = be64(b, 8);
    let data_base = data_fork.checked_add(be64(b, 0x18));
    let entries = (b.len() - MISH_HEADER_LEN) / CHUNK_ENTRY_LEN;
    for i in 0..entries {
        let e = &b[MISH_HEADER_LEN + i * CHUNK_ENTRY_LEN..][..CHUNK_ENTRY_LEN];
        let kind = match be32(e, 0) {
            UDZE | UDIG => Kind::Zero,
            UDRW => Kind::Raw,
            UDZO => Kind::Zlib,
            UDBZ => Kind::Bzip2,
            ULFO => Kind::Lzfse,
            _ => continue,
        };
        if chunks.len() >= MAX_CHUNKS {
            return Err(Error::limit(format!(
                "DMG image declares more than {MAX_CHUNKS} chunks"
            )));
        }
        let sector = be64(e, 8).checked_add(first_sector);
        let count = be64(e, 0x10);
        let offset = data_base.and_then(|d| d.checked_add(be64(e, 0x18)));
        let length = be64(e, 0x20);
        let (Some(sector), Some(offset)) = (sector, offset) else {
            return Err(Error::invalid(format!(
                "DMG chunk {} of a block table has an offset that overflows",
                chunks.len()
            )));
        };
        if kind != Kind::Zero && count > MAX_CHUNK_SECTORS {
            return Err(Error::limit(format!(
                "DMG chunk at sector {sector}: sector count {count} is larger than the maximum \
                 {MAX_CHUNK_SECTORS}"
            )));
        }
        if length > MAX_CHUNK_BYTES {
            return Err(Error::limit(format!(
                "DMG chunk at sector {sector}: length {length} is larger than the maximum \
                 {MAX_CHUNK_BYTES}"
            )));
        }
        // Byte offsets of the chunk's guest range must fit in 64 bits.
        if sector
            .checked_add(count)
            .is_none_or(|end| end > u64::MAX / 512)
        {
            return Err(Error::invalid(format!(
                "DMG chunk at sector {sector} of {count} sectors overflows"
            )));
        }
        chunks.push(Chunk {
            kind,
            sector,
            count,
            offset,
            length,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_base64_skips_whitespace_like_glib() {
        assert_eq!(base64_lenient(b"\n\taGVs\n  bG8=\n"), b"hello");
        assert_eq!(base64_lenient(b"bWlzaA"), b"mish");
    }
}
