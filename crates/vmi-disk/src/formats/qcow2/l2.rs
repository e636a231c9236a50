//! L2 tables and the cluster mapping (qemu `docs/interop/qcow2.txt`, "Cluster mapping",
//! "Standard Cluster Descriptor", "Extended L2 Entries", "Compressed Clusters Descriptor"): the L2
//! table cache, and what one guest offset maps to.

use super::*;

impl Inner {
    pub(super) fn load_l2(&mut self, off: u64) -> Result<()> {
        let t = self.next_tick();
        if let Some(c) = self.l2.get_mut(&off) {
            c.stamp = t;
            return Ok(());
        }
        let cs = self.g.cs;
        let file_len = self.file_len()?;
        check_table("L2 table", off, cs, cs, file_len)?;
        self.check_no_overlap("L2 table", off, cs)?;
        let data = read_u64s(self.st.as_ref(), off, cs / 8, "L2 table")?;
        self.insert_l2(off, data, false)
    }

    pub(super) fn insert_l2(&mut self, off: u64, data: Vec<u64>, dirty: bool) -> Result<()> {
        while self.l2.len() >= self.g.cache_tables() {
            let victim = self.l2.iter().min_by_key(|(_, c)| c.stamp).map(|(k, _)| *k);
            let Some(v) = victim else { break };
            if self.l2.get(&v).is_some_and(|c| c.dirty) {
                // Refcounts before the table that points at the clusters they count.
                self.write_refcounts()?;
                self.write_l2(v)?;
            }
            self.l2.remove(&v);
        }
        let stamp = self.next_tick();
        self.l2.insert(off, Cached { data, dirty, stamp });
        Ok(())
    }

    pub(super) fn write_l2(&mut self, off: u64) -> Result<()> {
        if self.l2.get(&off).is_some_and(|c| c.dirty) {
            // Active L2 tables may be shared with snapshots (their "copied" flags change).
            self.pre_write(
                &[overlap::Meta::ActiveL2, overlap::Meta::InactiveL2],
                off,
                self.g.cs,
            )?;
        }
        if let Some(c) = self.l2.get_mut(&off) {
            if c.dirty {
                self.st
                    .write_at(&u64s_to_bytes(&c.data), off)
                    .map_err(io_err(format!("writing L2 table at {off:#x}")))?;
                c.dirty = false;
            }
        }
        Ok(())
    }

    /// Entry words (descriptor, bitmap) for guest cluster `idx` of the L2 table at `off`.
    pub(super) fn l2_entry(&mut self, off: u64, idx: u64) -> Result<(u64, u64)> {
        self.load_l2(off)?;
        let w = self.g.words;
        let c = self
            .l2
            .get(&off)
            .ok_or_else(|| Error::invalid("L2 table vanished from the cache"))?;
        let i = (idx * w) as usize;
        let e = c.data.get(i).copied().unwrap_or(0);
        let b = if w == 2 {
            c.data.get(i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        Ok((e, b))
    }

    /// Set the entry of guest cluster `idx`: its descriptor and, with extended L2 entries, its
    /// subcluster bitmap (ignored otherwise).
    pub(super) fn set_l2_entry(
        &mut self,
        off: u64,
        idx: u64,
        desc: u64,
        bitmap: u64,
    ) -> Result<()> {
        self.load_l2(off)?;
        let w = self.g.words;
        let c = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| Error::invalid("L2 table vanished from the cache"))?;
        let i = (idx * w) as usize;
        if let Some(e) = c.data.get_mut(i) {
            *e = desc;
            c.dirty = true;
        }
        if w == 2 {
            if let Some(b) = c.data.get_mut(i + 1) {
                *b = bitmap;
            }
        }
        Ok(())
    }

    /// Bitmap of a cluster whose every subcluster is allocated (0 without extended L2).
    pub(super) fn all_alloc(&self) -> u64 {
        if self.g.extended_l2 {
            BITMAP_ALL_ALLOC
        } else {
            0
        }
    }

    /// Entry for guest cluster `gc` in the active tables: None when its L2 table is unallocated.
    pub(super) fn lookup(&mut self, gc: u64) -> Result<Option<(u64, u64)>> {
        let l1i = gc / self.g.l2_entries;
        let Some(&l1e) = self.l1.get(l1i as usize) else {
            return Ok(None);
        };
        let off = l1e & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        self.l2_entry(off, gc % self.g.l2_entries).map(Some)
    }

    /// What the byte at `in_off` of guest cluster `gc` is, and how many bytes from there share it.
    pub(super) fn piece(&mut self, gc: u64, in_off: u64) -> Result<(Piece, u64)> {
        let cs = self.g.cs;
        let Some((e, bitmap)) = self.lookup(gc)? else {
            return Ok((Piece::Unallocated, cs - in_off));
        };
        if e & OFLAG_COMPRESSED != 0 {
            if self.g.has_data_file {
                return Err(Error::invalid(format!(
                    "qcow2 guest cluster {gc} is compressed, which an external data file forbids"
                )));
            }
            return Ok((Piece::Compressed(gc * cs), cs - in_off));
        }
        let host = e & L2E_OFFSET_MASK;
        if host % cs != 0 {
            return Err(Error::invalid(format!(
                "qcow2 L2 entry for guest cluster {gc} points at unaligned host offset {host:#x}"
            )));
        }
        if self.g.extended_l2 {
            let sub = cs / 32;
            let s = in_off / sub;
            let run = sub - in_off % sub;
            let alloc = bitmap & (1 << s) != 0;
            let zero = bitmap & (1 << (32 + s)) != 0;
            if alloc && zero {
                return Err(Error::invalid(format!(
                    "qcow2 subcluster {s} of guest cluster {gc} is both allocated and zero"
                )));
            }
            return Ok(if zero {
                (Piece::Zero, run)
            } else if alloc {
                if host == 0 && !self.g.has_data_file {
                    return Err(Error::invalid(format!(
                        "qcow2 guest cluster {gc} has allocated subclusters but no host offset"
                    )));
                }
                (Piece::Data(host + in_off), run)
            } else {
                (Piece::Unallocated, run)
            });
        }
        if self.g.version >= 3 && e & OFLAG_ZERO != 0 {
            return Ok((Piece::Zero, cs - in_off));
        }
        if host != 0 || (self.g.has_data_file && e & OFLAG_COPIED != 0) {
            return Ok((Piece::Data(host + in_off), cs - in_off));
        }
        Ok((Piece::Unallocated, cs - in_off))
    }

    pub(super) fn map(&mut self, offset: u64, len: u64) -> Result<(Piece, u64)> {
        let cs = self.g.cs;
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let gc = offset / cs;
        let l1i = gc / self.g.l2_entries;
        let unmapped = match self.l1.get(l1i as usize) {
            None => true,
            Some(e) => e & L1E_OFFSET_MASK == 0,
        };
        if unmapped {
            // The whole L2 range is unallocated, and so are the ranges of the empty L1 entries
            // that follow.
            let per_l1 = self.g.l2_entries.saturating_mul(cs);
            let mut next = l1i + 1;
            while next.saturating_mul(per_l1) < offset + len
                && self
                    .l1
                    .get(next as usize)
                    .is_some_and(|e| e & L1E_OFFSET_MASK == 0)
            {
                next += 1;
            }
            let range_end = next.saturating_mul(per_l1);
            return Ok((Piece::Unallocated, len.min(range_end - offset)));
        }
        let table_end = (l1i + 1) * self.g.l2_entries * cs;
        let limit = offset + len.min(table_end - offset);
        let (first, n) = self.piece(gc, offset % cs)?;
        let mut done = n.min(limit - offset);
        if matches!(first, Piece::Compressed(_)) {
            return Ok((first, done));
        }
        while offset + done < limit {
            let pos = offset + done;
            let (p, n) = self.piece(pos / cs, pos % cs)?;
            let same = match (first, p) {
                (Piece::Data(a), Piece::Data(b)) => a + done == b,
                (Piece::Zero, Piece::Zero) | (Piece::Unallocated, Piece::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            done += n.min(limit - pos);
        }
        Ok((first, done))
    }

    pub(super) fn read_compressed_unit(&mut self, unit: u64, out: &mut Vec<u8>) -> Result<()> {
        let loc = self.compressed_location(unit)?;
        loc.read(self.st.as_ref(), out)
    }

    /// Where the compressed cluster holding guest offset `unit` is stored, checked against the
    /// file. Reading and inflating it needs no metadata, so callers may do that without the lock.
    pub(super) fn compressed_location(&mut self, unit: u64) -> Result<CompressedLocation> {
        let cs = self.g.cs;
        let gc = unit / cs;
        let e = match self.lookup(gc)? {
            Some((e, _)) if e & OFLAG_COMPRESSED != 0 => e,
            _ => {
                return Err(Error::invalid(format!(
                    "qcow2 guest cluster {gc} is not compressed"
                )))
            }
        };
        let (host, clen) = self.g.compressed_span(e);
        let file_len = self.file_len()?;
        if host >= file_len {
            return Err(Error::invalid(format!(
                "qcow2 compressed cluster for guest offset {unit} starts at {host:#x}, past the end of the file ({file_len} bytes)"
            )));
        }
        Ok(CompressedLocation {
            unit,
            host,
            len: clen.min(file_len - host),
            cluster_size: cs,
            compression: self.g.compression,
        })
    }
}

/// A compressed cluster's place in the file (Spec: "Compressed Clusters Descriptor").
#[derive(Debug, Clone, Copy)]
pub(super) struct CompressedLocation {
    unit: u64,
    host: u64,
    len: u64,
    cluster_size: u64,
    compression: Compression,
}

impl CompressedLocation {
    /// Read the compressed bytes and inflate exactly one cluster into `out`.
    pub(super) fn read(&self, st: &dyn Storage, out: &mut Vec<u8>) -> Result<()> {
        let (unit, host) = (self.unit, self.host);
        let mut buf = vec![0u8; self.len as usize];
        st.read_at(&mut buf, host)
            .map_err(io_err(format!("reading compressed cluster at {host:#x}")))?;
        compress::inflate(self.compression, &buf, self.cluster_size as usize, out)
            .map_err(|e| e.context(format!("guest offset {unit}, host offset {host:#x}")))
    }
}
