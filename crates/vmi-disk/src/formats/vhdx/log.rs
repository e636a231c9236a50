//! The VHDX metadata log ([MS-VHDX] §2.3): log entries (§2.3.1) made of a header, zero and data
//! descriptors (§2.3.1.2, §2.3.1.3) and data sectors (§2.3.1.4), and the search for the active
//! sequence and its replay (§2.3.2, §2.3.3).
//!
//! vmi never writes the log; it only replays a log another implementation left behind. The replay
//! is computed here as a bounded list of writes; the driver applies them when the image is opened
//! for writing.

use super::header::{crc_with_zero_field, guid_from, Header, HEADER_SECTION_END};
use crate::error::{Error, Result};
use crate::storage::Storage;
use std::collections::BTreeMap;
use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "loge", the entry header signature (§2.3.1.1).
pub const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// "zero", a zero descriptor (§2.3.1.2).
pub const ZERO_SIGNATURE: &[u8; 4] = b"zero";
/// "desc", a data descriptor (§2.3.1.3).
pub const DESC_SIGNATURE: &[u8; 4] = b"desc";
/// "data", a data sector (§2.3.1.4).
pub const DATA_SIGNATURE: &[u8; 4] = b"data";
/// Log sectors are 4 KiB (§2.3).
pub const LOG_SECTOR: u64 = 4096;
/// Largest log vmi replays: the whole replay is held in memory, so it is bounded (a default log is
/// 1 MiB; qemu and Hyper-V create logs of a few MiB).
pub const MAX_LOG_SIZE: u64 = 64 << 20;
/// Largest file offset a log entry may write or require (twice the largest virtual disk, for
/// metadata and bitmaps).
pub const MAX_FILE_OFFSET: u64 = 128 << 40;

/// Log entry header (§2.3.1.1), 64 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawEntryHeader {
    /// `Signature`: "loge".
    pub signature: [u8; 4],
    /// `Checksum`: CRC-32C over the whole entry with this field zero.
    pub checksum: U32,
    /// `EntryLength`: bytes of the entry, a multiple of 4 KiB.
    pub entry_length: U32,
    /// `Tail`: log offset of the first entry of the sequence this entry ends.
    pub tail: U32,
    /// `SequenceNumber`: consecutive within a sequence.
    pub sequence_number: U64,
    /// `DescriptorCount`: zero and data descriptors that follow the header.
    pub descriptor_count: U32,
    /// `Reserved`: zero.
    pub reserved: U32,
    /// `LogGuid`: must equal the header's `LogGuid`.
    pub log_guid: [u8; 16],
    /// `FlushedFileOffset`: file size when the entry was written.
    pub flushed_file_offset: U64,
    /// `LastFileOffset`: the file must be at least this long after replay.
    pub last_file_offset: U64,
}

/// Zero or data descriptor (§2.3.1.2 and §2.3.1.3), 32 bytes. For a zero descriptor `a` is reserved
/// and `b` is `ZeroLength`; for a data descriptor `a` is `TrailingBytes` and `b` is `LeadingBytes`.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawDescriptor {
    /// "zero" or "desc".
    pub signature: [u8; 4],
    /// Reserved (zero) / `TrailingBytes`: the last 4 bytes of the sector.
    pub a: [u8; 4],
    /// `ZeroLength` / `LeadingBytes`: the first 8 bytes of the sector.
    pub b: [u8; 8],
    /// `FileOffset`: 4 KiB aligned.
    pub file_offset: U64,
    /// `SequenceNumber`: the entry's.
    pub sequence_number: U64,
}

/// One write the replay performs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    /// Zero `len` bytes at `offset`.
    Zero {
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Write one 4 KiB sector at `offset`.
    Data {
        /// File offset.
        offset: u64,
        /// The reassembled sector.
        sector: Vec<u8>,
    },
}

/// What replaying the log does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Writes in order.
    pub writes: Vec<LogWrite>,
    /// The file must be at least this long afterwards (`LastFileOffset`).
    pub min_file_len: u64,
    /// The file must already be this long, or it was truncated (`FlushedFileOffset`).
    pub flushed_file_len: u64,
    /// Entries in the active sequence.
    pub entries: usize,
}

/// A validated entry found in the log.
#[derive(Debug, Clone)]
struct Entry {
    at: u64,
    len: u64,
    tail: u64,
    seq: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: Vec<LogWrite>,
}

/// The log as read from the file.
struct LogBuf<'a> {
    storage: &'a dyn Storage,
    offset: u64,
    len: u64,
}

impl LogBuf<'_> {
    /// Read `n` bytes at log offset `at`, wrapping around the end of the log (§2.3: circular).
    fn read(&self, at: u64, n: u64) -> Result<Vec<u8>> {
        let mut out = vec![0u8; usize::try_from(n).map_err(|_| Error::limit("log entry size"))?];
        let first = n.min(self.len - at);
        self.storage
            .read_at(&mut out[..first as usize], self.offset + at)
            .map_err(|e| Error::io(format!("reading vhdx log at {}", self.offset + at), e))?;
        if first < n {
            self.storage
                .read_at(&mut out[first as usize..], self.offset)
                .map_err(|e| Error::io(format!("reading vhdx log at {}", self.offset), e))?;
        }
        Ok(out)
    }
}

fn parse_entry(log: &LogBuf, at: u64, guid: Uuid, budget: &mut u64) -> Result<Option<Entry>> {
    let first = log.read(at, LOG_SECTOR)?;
    let Ok((h, _)) = RawEntryHeader::read_from_prefix(&first[..]) else {
        return Ok(None);
    };
    if &h.signature != ENTRY_SIGNATURE || guid_from(&h.log_guid) != guid {
        return Ok(None);
    }
    let len = u64::from(h.entry_length.get());
    let count = u64::from(h.descriptor_count.get());
    let desc_sectors = (64 + 32 * count).div_ceil(LOG_SECTOR);
    if len == 0 || len % LOG_SECTOR != 0 || len > log.len || desc_sectors * LOG_SECTOR > len {
        return Ok(None);
    }
    *budget = budget.checked_sub(len).ok_or_else(|| {
        Error::limit(
            "vhdx log entries overlap beyond twice the log's size; refusing to scan further",
        )
    })?;
    let buf = log.read(at, len)?;
    if crc_with_zero_field(&buf, 4) != h.checksum.get() {
        return Ok(None);
    }
    let seq = h.sequence_number.get();
    if seq == 0 {
        // §2.3.1.1: sequence numbers are larger than zero.
        return Ok(None);
    }
    let tail = u64::from(h.tail.get());
    if tail % LOG_SECTOR != 0 || tail >= log.len {
        return Ok(None);
    }
    let mut writes = Vec::new();
    let mut data_sector = desc_sectors;
    for i in 0..count {
        let start = usize::try_from(64 + 32 * i).map_err(|_| Error::limit("log descriptor"))?;
        let Some(Ok((d, _))) = buf.get(start..).map(RawDescriptor::read_from_prefix) else {
            return Ok(None);
        };
        let offset = d.file_offset.get();
        if d.sequence_number.get() != seq || offset % LOG_SECTOR != 0 || offset < HEADER_SECTION_END
        {
            return Ok(None);
        }
        if &d.signature == ZERO_SIGNATURE {
            let zlen = u64::from_le_bytes(d.b);
            if zlen % LOG_SECTOR != 0
                || offset.checked_add(zlen).is_none_or(|e| e > MAX_FILE_OFFSET)
            {
                return Ok(None);
            }
            writes.push(LogWrite::Zero { offset, len: zlen });
        } else if &d.signature == DESC_SIGNATURE {
            if offset >= MAX_FILE_OFFSET {
                return Ok(None);
            }
            let s = usize::try_from(data_sector * LOG_SECTOR).map_err(|_| Error::limit("log"))?;
            let Some(sector) = buf.get(s..s + LOG_SECTOR as usize) else {
                return Ok(None);
            };
            data_sector += 1;
            let sig = &sector[..4];
            let high = u32::from_le_bytes([sector[4], sector[5], sector[6], sector[7]]);
            let low = u32::from_le_bytes([sector[4092], sector[4093], sector[4094], sector[4095]]);
            if sig != DATA_SIGNATURE || (u64::from(high) << 32 | u64::from(low)) != seq {
                return Ok(None);
            }
            let mut out = sector.to_vec();
            out[..8].copy_from_slice(&d.b);
            out[4092..].copy_from_slice(&d.a);
            writes.push(LogWrite::Data {
                offset,
                sector: out,
            });
        } else {
            return Ok(None);
        }
    }
    if data_sector * LOG_SECTOR > len {
        return Ok(None);
    }
    let last_file_offset = h.last_file_offset.get();
    if last_file_offset > MAX_FILE_OFFSET {
        return Ok(None);
    }
    Ok(Some(Entry {
        at,
        len,
        tail,
        seq,
        flushed_file_offset: h.flushed_file_offset.get(),
        last_file_offset,
        writes,
    }))
}

/// Find the active sequence in the log named by `header` and return what replaying it does
/// (§2.3.2: the valid sequence with the highest sequence number, from its head's tail to the head).
/// `None` when the log holds no valid sequence.
pub fn plan_replay(storage: &dyn Storage, header: &Header) -> Result<Option<Replay>> {
    if header.log_guid.is_nil() {
        return Ok(None);
    }
    if header.log_length > MAX_LOG_SIZE {
        return Err(Error::limit(format!(
            "vhdx log is {} bytes (vmi replays at most {MAX_LOG_SIZE})",
            header.log_length
        )));
    }
    let log = LogBuf {
        storage,
        offset: header.log_offset,
        len: header.log_length,
    };
    // Every candidate entry is read whole to check its CRC. Valid entries of one log do not
    // overlap, so twice the log's size is plenty; a hostile log of nested entries hits the limit.
    let mut budget = log.len.saturating_mul(2);
    let mut found: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut at = 0;
    while at < log.len {
        if let Some(e) = parse_entry(&log, at, header.log_guid, &mut budget)? {
            found.insert(at, e);
        }
        at += LOG_SECTOR;
    }
    // §2.3.3: scan for runs of consecutive sequence numbers; a run is a valid sequence when its
    // head's tail lies within it; the valid sequence with the highest head wins.
    let mut best: Option<(u64, Vec<u64>)> = None;
    let (mut tail, mut old_tail) = (0u64, 0u64);
    loop {
        let mut run: Vec<&Entry> = Vec::new();
        let mut pos = tail;
        while let Some(e) = found.get(&pos) {
            if run.len() >= found.len()
                || run
                    .last()
                    .is_some_and(|p| p.seq.checked_add(1) != Some(e.seq))
            {
                break;
            }
            run.push(e);
            pos = (e.at + e.len) % log.len;
        }
        let valid = run.last().and_then(|head| {
            run.iter()
                .position(|e| e.at == head.tail)
                .map(|t| (head.seq, run[t..].iter().map(|e| e.at).collect::<Vec<_>>()))
        });
        tail = match valid {
            Some((seq, chain)) => {
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, chain));
                }
                pos
            }
            None => (tail + LOG_SECTOR) % log.len,
        };
        if tail <= old_tail {
            break;
        }
        old_tail = tail;
    }
    let Some((_, chain)) = best else {
        return Ok(None);
    };
    let entries: Vec<&Entry> = chain.iter().filter_map(|at| found.get(at)).collect();
    let Some(head) = entries.last() else {
        return Ok(None);
    };
    // §2.3.3: file sizes come from the head entry.
    let mut r = Replay {
        entries: entries.len(),
        min_file_len: head.last_file_offset,
        flushed_file_len: head.flushed_file_offset,
        ..Replay::default()
    };
    for e in &entries {
        r.writes.extend(e.writes.iter().cloned());
    }
    Ok(Some(r))
}

/// Most log writes replayed in memory for a read-only open: every read scans them, so a hostile
/// log of millions of descriptors is refused instead.
pub const MAX_OVERLAY_WRITES: usize = 4096;

/// A read-only view of the file with a replay applied in memory (§2.3.3 without modifying the file).
#[derive(Debug)]
pub struct ReplayedStorage {
    inner: Box<dyn Storage>,
    writes: Vec<LogWrite>,
    len: u64,
}

impl ReplayedStorage {
    /// Overlay `replay` on `inner`.
    pub fn new(inner: Box<dyn Storage>, replay: Replay) -> std::io::Result<ReplayedStorage> {
        let len = inner.len()?.max(replay.min_file_len);
        Ok(ReplayedStorage {
            inner,
            writes: replay.writes,
            len,
        })
    }
}

fn read_only() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "image with a replayed log is open read-only",
    )
}

impl Storage for ReplayedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        let inner_len = self.inner.len()?;
        let n = inner_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.inner.read_at(&mut buf[..n], offset)?;
        buf[n..].fill(0);
        for w in &self.writes {
            let (woff, wlen, data) = match w {
                LogWrite::Zero { offset, len } => (*offset, *len, None),
                LogWrite::Data { offset, sector } => (*offset, sector.len() as u64, Some(sector)),
            };
            let s = woff.max(offset);
            let e = woff.saturating_add(wlen).min(end);
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - woff) as usize..(e - woff) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(read_only())
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> std::io::Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn allocated_size(&self) -> std::io::Result<u64> {
        self.inner.allocated_size()
    }

    fn path(&self) -> Option<&std::path::Path> {
        self.inner.path()
    }
}

/// Build one log entry holding `writes` (data sectors of exactly 4 KiB, zero ranges), as another
/// implementation would leave it. Used by tests to exercise replay.
pub fn encode_entry(
    guid: Uuid,
    seq: u64,
    tail: u32,
    file_len: u64,
    writes: &[LogWrite],
) -> Vec<u8> {
    let count = writes.len() as u64;
    let desc_sectors = (64 + 32 * count).div_ceil(LOG_SECTOR);
    let data: Vec<&Vec<u8>> = writes
        .iter()
        .filter_map(|w| match w {
            LogWrite::Data { sector, .. } => Some(sector),
            LogWrite::Zero { .. } => None,
        })
        .collect();
    let len = (desc_sectors + data.len() as u64) * LOG_SECTOR;
    let mut buf = vec![0u8; len as usize];
    let h = RawEntryHeader {
        signature: *ENTRY_SIGNATURE,
        checksum: U32::new(0),
        entry_length: U32::new(len as u32),
        tail: U32::new(tail),
        sequence_number: U64::new(seq),
        descriptor_count: U32::new(count as u32),
        reserved: U32::new(0),
        log_guid: super::header::guid_to(guid),
        flushed_file_offset: U64::new(file_len),
        last_file_offset: U64::new(file_len),
    };
    buf[..64].copy_from_slice(h.as_bytes());
    let mut ds = desc_sectors as usize;
    for (i, w) in writes.iter().enumerate() {
        let d = match w {
            LogWrite::Zero { offset, len } => RawDescriptor {
                signature: *ZERO_SIGNATURE,
                a: [0; 4],
                b: len.to_le_bytes(),
                file_offset: U64::new(*offset),
                sequence_number: U64::new(seq),
            },
            LogWrite::Data { offset, sector } => {
                let s = &mut buf[ds * 4096..(ds + 1) * 4096];
                s.copy_from_slice(&sector[..4096]);
                s[..4].copy_from_slice(DATA_SIGNATURE);
                s[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                s[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
                ds += 1;
                let mut a = [0u8; 4];
                a.copy_from_slice(&sector[4092..4096]);
                let mut b = [0u8; 8];
                b.copy_from_slice(&sector[..8]);
                RawDescriptor {
                    signature: *DESC_SIGNATURE,
                    a,
                    b,
                    file_offset: U64::new(*offset),
                    sequence_number: U64::new(seq),
                }
            }
        };
        buf[64 + 32 * i..96 + 32 * i].copy_from_slice(d.as_bytes());
    }
    let c = crc32c::crc32c(&buf);
    buf[4..8].copy_from_slice(&c.to_le_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const MIB: u64 = 1 << 20;

    fn setup(entries: &[(u64, Vec<u8>)], guid: Uuid) -> (MemStorage, Header) {
        let mut file = vec![0u8; 2 * MIB as usize];
        for (at, e) in entries {
            let at = (MIB + at) as usize;
            file[at..at + e.len()].copy_from_slice(e);
        }
        let h = Header {
            sequence: 1,
            file_write_guid: Uuid::nil(),
            data_write_guid: Uuid::nil(),
            log_guid: guid,
            log_length: MIB,
            log_offset: MIB,
        };
        (MemStorage::from_bytes(file), h)
    }

    fn sector(b: u8) -> Vec<u8> {
        vec![b; 4096]
    }

    #[test]
    fn single_entry_replays_its_data_and_zero_descriptors() {
        let g = Uuid::from_u128(7);
        let w = vec![
            LogWrite::Data {
                offset: 5 * MIB,
                sector: sector(0xab),
            },
            LogWrite::Zero {
                offset: 6 * MIB,
                len: 8192,
            },
        ];
        let e = encode_entry(g, 10, 0, 8 * MIB, &w);
        let (s, h) = setup(&[(0, e)], g);
        let r = plan_replay(&s, &h).unwrap().unwrap();
        assert_eq!(r.writes, w);
        assert_eq!(r.min_file_len, 8 * MIB);
    }

    #[test]
    fn replayed_storage_overlays_writes_in_order() {
        let inner = MemStorage::from_bytes(vec![7u8; 3 * 4096]);
        let replay = Replay {
            writes: vec![
                LogWrite::Zero {
                    offset: 0,
                    len: 8192,
                },
                LogWrite::Data {
                    offset: 4096,
                    sector: sector(9),
                },
            ],
            min_file_len: 4 * 4096,
            flushed_file_len: 0,
            entries: 1,
        };
        let s = ReplayedStorage::new(Box::new(inner), replay).unwrap();
        assert_eq!(s.len().unwrap(), 4 * 4096);
        let mut b = vec![1u8; 4 * 4096];
        s.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..8192].iter().all(|&x| x == 9));
        assert!(b[8192..12288].iter().all(|&x| x == 7));
        assert!(b[12288..].iter().all(|&x| x == 0));
        assert!(s.write_at(&[1], 0).is_err());
    }

    #[test]
    fn entry_with_a_bad_checksum_is_ignored() {
        let g = Uuid::from_u128(7);
        let w = [LogWrite::Zero {
            offset: 6 * MIB,
            len: 4096,
        }];
        let mut e = encode_entry(g, 10, 0, 8 * MIB, &w);
        e[100] ^= 1;
        let (s, h) = setup(&[(0, e)], g);
        assert_eq!(plan_replay(&s, &h).unwrap(), None);
    }

    #[test]
    fn entry_of_another_log_guid_is_ignored() {
        let w = [LogWrite::Zero {
            offset: 6 * MIB,
            len: 4096,
        }];
        let e = encode_entry(Uuid::from_u128(8), 10, 0, 8 * MIB, &w);
        let (s, h) = setup(&[(0, e)], Uuid::from_u128(7));
        assert_eq!(plan_replay(&s, &h).unwrap(), None);
    }

    #[test]
    fn sequence_from_tail_to_head_replays_in_order() {
        let g = Uuid::from_u128(7);
        let a = [LogWrite::Data {
            offset: 5 * MIB,
            sector: sector(1),
        }];
        let b = [LogWrite::Data {
            offset: 5 * MIB,
            sector: sector(2),
        }];
        let e1 = encode_entry(g, 20, 0, 8 * MIB, &a);
        let l1 = e1.len() as u64;
        let e2 = encode_entry(g, 21, 0, 8 * MIB, &b);
        let (s, h) = setup(&[(0, e1), (l1, e2)], g);
        let r = plan_replay(&s, &h).unwrap().unwrap();
        assert_eq!(r.entries, 2);
        assert_eq!(r.writes.last(), Some(&b[0]));
    }

    #[test]
    fn entry_wrapping_around_the_end_of_the_log_is_read_whole() {
        let g = Uuid::from_u128(7);
        let w = [LogWrite::Data {
            offset: 5 * MIB,
            sector: sector(3),
        }];
        let e = encode_entry(g, 10, (MIB - 4096) as u32, 8 * MIB, &w);
        assert_eq!(e.len(), 8192);
        let (s, h) = setup(
            &[(MIB - 4096, e[..4096].to_vec()), (0, e[4096..].to_vec())],
            g,
        );
        let r = plan_replay(&s, &h).unwrap().unwrap();
        assert_eq!(r.writes, w);
    }

    #[test]
    fn newest_valid_sequence_wins_over_a_stale_one() {
        let g = Uuid::from_u128(7);
        let old = [LogWrite::Data {
            offset: 5 * MIB,
            sector: sector(1),
        }];
        let new = [LogWrite::Data {
            offset: 5 * MIB,
            sector: sector(2),
        }];
        let e_old = encode_entry(g, 3, 0, 8 * MIB, &old);
        let e_new = encode_entry(g, 9, 64 * 1024, 8 * MIB, &new);
        let (s, h) = setup(&[(0, e_old), (64 * 1024, e_new)], g);
        let r = plan_replay(&s, &h).unwrap().unwrap();
        assert_eq!((r.entries, r.writes), (1, new.to_vec()));
    }

    #[test]
    fn log_of_nested_oversized_entries_hits_the_scan_limit() {
        let g = Uuid::from_u128(7);
        let mut e = encode_entry(g, 10, 0, 8 * MIB, &[]);
        e[8..12].copy_from_slice(&(MIB as u32).to_le_bytes());
        let (s, h) = setup(&[(0, e.clone()), (4096, e.clone()), (8192, e)], g);
        let err = plan_replay(&s, &h).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Limit, "{err}");
    }

    #[test]
    fn descriptor_aimed_at_the_header_section_is_ignored() {
        let g = Uuid::from_u128(7);
        let w = [LogWrite::Data {
            offset: 64 * 1024,
            sector: sector(1),
        }];
        let e = encode_entry(g, 10, 0, 8 * MIB, &w);
        let (s, h) = setup(&[(0, e)], g);
        assert_eq!(plan_replay(&s, &h).unwrap(), None);
    }
}
