//! Writing guest data and flushing metadata: allocation and copy-on-write of clusters (from the
//! backing image, zero, compressed or subcluster contents), zero clusters, compressed clusters,
//! preallocation, resize, and the write-back order that keeps a crash from corrupting the image.

use super::overlap::Meta;
use super::*;

/// Clusters reserved for a write made without the lock ([`Inner::reserve_fresh`]).
#[derive(Debug)]
pub(super) struct FreshRun {
    /// First guest cluster.
    pub(super) gc: u64,
    /// Host offset of the first cluster (the run is contiguous).
    pub(super) host: u64,
    /// Bytes reserved: whole clusters.
    pub(super) bytes: u64,
}

impl Inner {
    pub(super) fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("qcow2 image is not open for writing"));
        }
        Ok(())
    }

    /// Mark the image dirty before the first change when lazy refcounts are on (spec: the dirty
    /// bit says refcounts may be stale; vmi keeps them exact but follows the protocol).
    pub(super) fn begin_write(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.corrupt && !self.repairing {
            return Err(self.corrupt_error());
        }
        if self.g.lazy_refcounts
            && !self.set_dirty
            && self.incompatible & header::INCOMPAT_DIRTY == 0
        {
            self.incompatible |= header::INCOMPAT_DIRTY;
            self.set_dirty = true;
            self.write_header()?;
            self.st.sync().map_err(io_err("syncing".into()))?;
        }
        Ok(())
    }

    /// L2 table for guest cluster `gc`, allocated or copied so it may be written.
    pub(super) fn l2_for_write(&mut self, gc: u64) -> Result<(u64, u64)> {
        let cs = self.g.cs;
        let l1i = (gc / self.g.l2_entries) as usize;
        let idx = gc % self.g.l2_entries;
        let l1e = *self.l1.get(l1i).ok_or_else(|| {
            Error::invalid(format!("qcow2 guest cluster {gc} lies beyond the L1 table"))
        })?;
        let off = l1e & L1E_OFFSET_MASK;
        if off == 0 && l1e != 0 {
            // qemu's check reads the header as this L2 table; writing through it would corrupt.
            return Err(self.signal_corruption(format!(
                "L1 entry {l1i} ({l1e:#x}) has flags but no L2 table offset"
            )));
        }
        if off == 0 {
            let new = self.alloc_one()?;
            self.insert_l2(new, vec![0; (cs / 8) as usize], true)?;
            self.l1[l1i] = new | OFLAG_COPIED;
            self.meta_l1_changed(l1e, new);
            self.l1_dirty = true;
            return Ok((new, idx));
        }
        if l1e & OFLAG_COPIED != 0 {
            return Ok((off, idx));
        }
        let rc = self.rc_get(off)?;
        if rc == 0 {
            return Err(self.signal_corruption(format!(
                "L2 table at {off:#x} is in use but its refcount is 0"
            )));
        }
        if rc == 1 {
            self.l1[l1i] = off | OFLAG_COPIED;
            self.l1_dirty = true;
            return Ok((off, idx));
        }
        // Shared with a snapshot: copy the table.
        self.load_l2(off)?;
        let data = self
            .l2
            .get(&off)
            .map(|c| c.data.clone())
            .ok_or_else(|| Error::invalid("L2 table vanished from the cache"))?;
        let new = self.alloc_one()?;
        self.pre_write(&[], new, cs)?;
        self.insert_l2(new, data, true)?;
        self.pending_free.push(off);
        self.l1[l1i] = new | OFLAG_COPIED;
        self.meta_l1_changed(l1e, new);
        self.l1_dirty = true;
        Ok((new, idx))
    }

    /// The current guest contents of cluster `gc` (for copy-on-write of a partial write).
    pub(super) fn read_cluster(
        &mut self,
        gc: u64,
        entry: u64,
        bitmap: u64,
        backing: Option<&Image>,
    ) -> Result<Vec<u8>> {
        let cs = self.g.cs;
        let mut buf = vec![0u8; cs as usize];
        if entry & OFLAG_COMPRESSED != 0 {
            self.read_compressed_unit(gc * cs, &mut buf)?;
            return Ok(buf);
        }
        let host = entry & L2E_OFFSET_MASK;
        if self.g.extended_l2 {
            // Subcluster by subcluster: zero, allocated here, or from the backing image.
            let sub = cs / SUBCLUSTERS;
            let file_len = self.file_len()?;
            for sc in 0..SUBCLUSTERS {
                let range = (sc * sub) as usize..((sc + 1) * sub) as usize;
                if bitmap & (1 << (32 + sc)) != 0 {
                    continue;
                }
                if bitmap & (1 << sc) != 0 {
                    let at = host + sc * sub;
                    let n = sub.min(file_len.saturating_sub(at)) as usize;
                    self.data
                        .read_at(&mut buf[range.start..range.start + n], at)
                        .map_err(io_err(format!("reading subcluster at {at:#x}")))?;
                } else if let Some(b) = backing {
                    let start = gc * cs + sc * sub;
                    let avail = b.virtual_size().saturating_sub(start).min(sub) as usize;
                    if avail > 0 {
                        b.read_at(&mut buf[range.start..range.start + avail], start)?;
                    }
                }
            }
            return Ok(buf);
        }
        if self.g.version >= 3 && entry & OFLAG_ZERO != 0 {
            return Ok(buf);
        }
        if host != 0 {
            let file_len = self.file_len()?;
            let n = cs.min(file_len.saturating_sub(host)) as usize;
            self.data
                .read_at(&mut buf[..n], host)
                .map_err(io_err(format!("reading cluster at {host:#x}")))?;
            return Ok(buf);
        }
        if let Some(b) = backing {
            let start = gc * cs;
            let avail = b.virtual_size().saturating_sub(start).min(cs) as usize;
            if avail > 0 {
                b.read_at(&mut buf[..avail], start)?;
            }
        }
        Ok(buf)
    }

    pub(super) fn write(&mut self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        self.begin_write()?;
        let cs = self.g.cs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = ((cs - in_off) as usize).min(buf.len() - done);
            let piece = &buf[done..done + n];
            let (l2off, idx) = self.l2_for_write(gc)?;
            let (e, bitmap) = self.l2_entry(l2off, idx)?;
            if in_off == 0 && e == 0 && bitmap == 0 && n as u64 == cs && self.free.is_empty() {
                done += self.write_fresh_run(&buf[done..], l2off, idx)?;
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            let plain = e & OFLAG_COMPRESSED == 0;
            // Whether the written bytes may go straight to the host cluster: not a zero cluster
            // and, with subclusters, every touched subcluster already allocated.
            let in_place = if self.g.extended_l2 {
                let sub = cs / SUBCLUSTERS;
                let first = in_off / sub;
                let last = (in_off + n as u64 - 1) / sub;
                let want = ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1);
                bitmap & want == want && (bitmap >> 32) & want == 0
            } else {
                !(self.g.version >= 3 && e & OFLAG_ZERO != 0)
            };
            let rc = if plain && host != 0 {
                self.rc_get(host)?
            } else {
                0
            };
            if plain && host != 0 && rc == 0 {
                return Err(self.signal_corruption(format!(
                    "data cluster at {host:#x} is in use but its refcount is 0"
                )));
            }
            let owned = plain && host != 0 && rc == 1;
            if owned {
                self.pre_write(&[], host, cs)?;
            }
            if owned && in_place {
                self.data
                    .write_at(piece, host + in_off)
                    .map_err(io_err(format!("writing data at {:#x}", host + in_off)))?;
                if e & OFLAG_COPIED == 0 {
                    self.set_l2_entry(l2off, idx, host | OFLAG_COPIED, bitmap)?;
                }
            } else {
                let mut data = if n as u64 == cs {
                    piece.to_vec()
                } else {
                    let mut d = self.read_cluster(gc, e, bitmap, backing)?;
                    d[in_off as usize..in_off as usize + n].copy_from_slice(piece);
                    d
                };
                data.resize(cs as usize, 0);
                let target = if owned { host } else { self.alloc_one()? };
                self.pre_write(&[], target, cs)?;
                self.data
                    .write_at(&data, target)
                    .map_err(io_err(format!("writing cluster at {target:#x}")))?;
                let all = self.all_alloc();
                self.set_l2_entry(l2off, idx, target | OFLAG_COPIED, all)?;
                if !owned {
                    self.release(e)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Write the whole clusters at the start of `buf` whose L2 entries, from `idx` on in the table
    /// at `l2off`, are unallocated (the first one is): one contiguous allocation at the end of the
    /// file and one write straight from `buf`, then the L2 entries (data first, metadata second,
    /// as cluster by cluster). Returns the bytes written, a non-zero multiple of the cluster size.
    fn write_fresh_run(&mut self, buf: &[u8], l2off: u64, idx: u64) -> Result<usize> {
        let cs = self.g.cs;
        let whole = (buf.len() as u64 / cs).min(self.g.l2_entries - idx);
        let mut k = 1;
        while k < whole && self.l2_entry(l2off, idx + k)? == (0, 0) {
            k += 1;
        }
        let host = self.alloc(k)?;
        let bytes = k * cs;
        self.pre_write(&[], host, bytes)?;
        let data = buf
            .get(..bytes as usize)
            .ok_or_else(|| Error::invalid("qcow2 write run exceeds its buffer"))?;
        self.data
            .write_at(data, host)
            .map_err(io_err(format!("writing {k} clusters at {host:#x}")))?;
        let all = self.all_alloc();
        for i in 0..k {
            self.set_l2_entry(l2off, idx + i, (host + i * cs) | OFLAG_COPIED, all)?;
        }
        Ok(bytes as usize)
    }

    /// Reserve the whole unallocated clusters `buf` starts with at `offset` (within one L2
    /// table): allocated and counted, their L2 entries not yet set. `None` when the write does
    /// not start with a whole fresh cluster, or freed clusters are waiting for reuse (single
    /// allocations take those). The caller writes the data, then calls [`Inner::link_fresh`].
    pub(super) fn reserve_fresh(&mut self, buf: &[u8], offset: u64) -> Result<Option<FreshRun>> {
        self.begin_write()?;
        let cs = self.g.cs;
        if offset % cs != 0 || (buf.len() as u64) < cs || !self.free.is_empty() {
            return Ok(None);
        }
        let gc = offset / cs;
        let (l2off, idx) = self.l2_for_write(gc)?;
        if self.l2_entry(l2off, idx)? != (0, 0) {
            return Ok(None);
        }
        let whole = (buf.len() as u64 / cs).min(self.g.l2_entries - idx);
        let mut k = 1;
        while k < whole && self.l2_entry(l2off, idx + k)? == (0, 0) {
            k += 1;
        }
        let host = self.alloc(k)?;
        self.pre_write(&[], host, k * cs)?;
        Ok(Some(FreshRun {
            gc,
            host,
            bytes: k * cs,
        }))
    }

    /// Point the L2 entries of a reserved run at its clusters, now that their data is written.
    pub(super) fn link_fresh(&mut self, run: &FreshRun) -> Result<()> {
        let cs = self.g.cs;
        let (l2off, idx) = self.l2_for_write(run.gc)?;
        let all = self.all_alloc();
        for i in 0..run.bytes / cs {
            self.set_l2_entry(l2off, idx + i, (run.host + i * cs) | OFLAG_COPIED, all)?;
        }
        Ok(())
    }

    /// `declared_backing`: the image names a backing file (opened or not), so unallocated
    /// clusters are not known to read as zeroes.
    pub(super) fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        backing: Option<&Image>,
        declared_backing: bool,
    ) -> Result<()> {
        self.begin_write()?;
        let shows_through = backing.is_some() || declared_backing;
        let cs = self.g.cs;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::usage("offset overflow"))?;
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            let l1i = gc / self.g.l2_entries;
            let no_table = self
                .l1
                .get(l1i as usize)
                .is_none_or(|e| e & L1E_OFFSET_MASK == 0);
            if no_table && !shows_through {
                // Nothing is allocated in this L2 range and nothing shows through: already zero.
                let range_end = (l1i + 1) * self.g.l2_entries * cs;
                pos = range_end.min(end).max(pos + n);
                continue;
            }
            // A whole cluster, or the partial last cluster of the image.
            let whole = in_off == 0 && (n == cs || pos + n >= self.size);
            if !whole {
                let z = vec![0u8; n as usize];
                self.write(&z, pos, backing)?;
                pos += n;
                continue;
            }
            if self.g.version >= 3 {
                let (l2off, idx) = self.l2_for_write(gc)?;
                let (e, _) = self.l2_entry(l2off, idx)?;
                if self.g.extended_l2 {
                    self.set_l2_entry(l2off, idx, 0, BITMAP_ALL_ZERO)?;
                } else {
                    self.set_l2_entry(l2off, idx, OFLAG_ZERO, 0)?;
                }
                self.release(e)?;
            } else if !shows_through {
                if self.lookup(gc)?.is_some() {
                    let (l2off, idx) = self.l2_for_write(gc)?;
                    let (e, _) = self.l2_entry(l2off, idx)?;
                    self.set_l2_entry(l2off, idx, 0, 0)?;
                    self.release(e)?;
                }
            } else {
                let z = vec![0u8; n as usize];
                self.write(&z, pos, backing)?;
            }
            pos += n;
        }
        Ok(())
    }

    pub(super) fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.begin_write()?;
        let cs = self.g.cs;
        if offset % cs != 0 {
            return Err(Error::usage(format!(
                "compressed write at {offset} is not cluster-aligned"
            )));
        }
        let len = data.len() as u64;
        if len == 0 || len > cs {
            return Err(Error::usage(format!(
                "compressed cluster of {len} bytes does not fit a {cs}-byte cluster"
            )));
        }
        let gc = offset / cs;
        let (l2off, idx) = self.l2_for_write(gc)?;
        let (old, _) = self.l2_entry(l2off, idx)?;
        let tail_cluster = self.ctail / cs * cs;
        let reuse = self.ctail % cs != 0
            && tail_cluster + cs == self.end
            && self.rc_get(tail_cluster)? < refcount::max(self.g.refcount_order);
        let start = if reuse { self.ctail } else { self.end };
        let stop = start + len;
        let first = start / cs * cs;
        let last = (stop - 1) / cs * cs;
        if reuse {
            if last > first {
                let got = self.alloc((last - first) / cs)?;
                if got != first + cs {
                    return Err(Error::invalid("compressed allocation lost contiguity"));
                }
            }
            self.rc_add(first, 1)?;
        } else {
            let got = self.alloc((last - first) / cs + 1)?;
            if got != first {
                return Err(Error::invalid("compressed allocation lost contiguity"));
            }
        }
        self.pre_write(&[], start, len)?;
        self.st
            .write_at(data, start)
            .map_err(io_err(format!("writing compressed cluster at {start:#x}")))?;
        let sectors = (stop - 1) / SECTOR - start / SECTOR;
        let entry = OFLAG_COMPRESSED | (sectors << self.g.csize_shift()) | start;
        // Compressed clusters carry no subcluster bitmap (spec: must be zero).
        self.set_l2_entry(l2off, idx, entry, 0)?;
        self.release(old)?;
        // Packed back to back at byte granularity, as qemu packs them (`qcow2_alloc_bytes`):
        // the descriptor counts sectors from the sector the data starts in, so the next cluster
        // may start mid-sector.
        self.ctail = if stop % cs == 0 { 0 } else { stop };
        Ok(())
    }

    pub(super) fn preallocate(&mut self, mode: &str) -> Result<()> {
        let cs = self.g.cs;
        let clusters = self.size.div_ceil(cs);
        for gc in 0..clusters {
            let (l2off, idx) = self.l2_for_write(gc)?;
            let host = self.alloc(1)?;
            let all = self.all_alloc();
            self.set_l2_entry(l2off, idx, host | OFLAG_COPIED, all)?;
        }
        let end = self.end;
        let len = self.file_len()?;
        if mode == "full" && end > len {
            crate::storage::write_zero_bytes(self.st.as_ref(), len, end - len)
                .map_err(io_err("preallocating".into()))?;
        } else if end > len {
            self.st
                .set_len(end)
                .map_err(io_err("preallocating".into()))?;
        }
        Ok(())
    }

    pub(super) fn resize(&mut self, new_size: u64) -> Result<()> {
        self.begin_write()?;
        self.require_consistent("resize it")?;
        let cs = self.g.cs;
        if new_size % SECTOR != 0 {
            return Err(Error::usage(format!(
                "qcow2 size {new_size} is not a multiple of {SECTOR} (qemu-img refuses it too)"
            )));
        }
        if self.g.version < 3 && !self.snaps.is_empty() {
            // v2 snapshot entries do not record their disk size (qemu refuses likewise).
            return Err(Error::unsupported(
                "resizing a qcow2 v2 (compat=0.10) image that has internal snapshots",
            ));
        }
        if new_size < self.size {
            self.shrink(new_size)?;
            self.size = new_size;
            self.header_dirty = true;
            return Ok(());
        }
        let per_l1 = self.g.l2_entries * cs;
        let needed = new_size.div_ceil(per_l1);
        if needed * 8 > MAX_L1_SIZE {
            return Err(Error::limit(format!(
                "size {new_size} needs an L1 table larger than {MAX_L1_SIZE} bytes"
            )));
        }
        let cur = self.l1.len() as u64;
        if needed > cur {
            let old_clusters = (cur * 8).div_ceil(cs);
            let new_clusters = (needed * 8).div_ceil(cs);
            if new_clusters > old_clusters || self.l1_offset == 0 {
                let old = self.l1_offset;
                let new = self.alloc(new_clusters)?;
                self.l1_offset = new;
                if old != 0 {
                    for k in 0..old_clusters {
                        self.pending_free.push(old + k * cs);
                    }
                }
            }
            self.l1.resize(needed as usize, 0);
            self.l1_dirty = true;
        }
        self.size = new_size;
        self.header_dirty = true;
        Ok(())
    }

    /// Discard every guest cluster that starts at or past `new_size` (qemu's
    /// `qcow2_cluster_discard` with a full discard, then `qcow2_shrink_l1_table`): their entries
    /// become unallocated and their clusters lose this image's reference; L2 tables wholly past
    /// the end are dropped from the L1 table (which keeps its size on disk, as qemu keeps it).
    /// Clusters shared with snapshots keep the snapshots' references. Afterwards the file is cut
    /// after the last cluster still in use.
    fn shrink(&mut self, new_size: u64) -> Result<()> {
        let cs = self.g.cs;
        let per = self.g.l2_entries;
        let first_gone = new_size.div_ceil(cs);
        let old_clusters = self.size.div_ceil(cs);
        let keep_l1 = new_size.div_ceil(per * cs);
        // Partly kept L2 table: clear the entries past the end (copying the table when it is
        // shared with a snapshot).
        if first_gone < old_clusters && first_gone % per != 0 {
            let l1i = first_gone / per;
            let has_table = self
                .l1
                .get(l1i as usize)
                .is_some_and(|e| e & L1E_OFFSET_MASK != 0);
            if has_table {
                let stop = ((l1i + 1) * per).min(old_clusters);
                for gc in first_gone..stop {
                    if self.lookup(gc)? == Some((0, 0)) {
                        continue;
                    }
                    let (l2off, idx) = self.l2_for_write(gc)?;
                    let (e, _) = self.l2_entry(l2off, idx)?;
                    self.set_l2_entry(l2off, idx, 0, 0)?;
                    self.release(e)?;
                }
            }
        }
        // Whole L2 tables past the end.
        for l1i in keep_l1..self.l1.len() as u64 {
            let l1e = self.l1[l1i as usize];
            let off = l1e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if self.rc_get(off)? == 1 {
                // Only this image reaches the table: its entries' references go with it.
                for idx in 0..per {
                    let (e, _) = self.l2_entry(off, idx)?;
                    self.release(e)?;
                }
            }
            self.pending_free.push(off);
            self.l1[l1i as usize] = 0;
            self.meta_l1_changed(l1e, 0);
            self.l1_dirty = true;
        }
        // References go once the new tables are on disk; then forget the dropped tables (their
        // clusters may be reused as data) and cut the file after the last cluster in use.
        self.size = new_size;
        self.header_dirty = true;
        self.flush()?;
        let kept: std::collections::HashSet<u64> =
            self.l1.iter().map(|e| e & L1E_OFFSET_MASK).collect();
        self.l2.retain(|off, _| kept.contains(off));
        self.trim_tail()
    }

    /// Cut the file after the last cluster whose refcount is not zero (qemu truncates the file
    /// after a shrink the same way).
    fn trim_tail(&mut self) -> Result<()> {
        let cs = self.g.cs;
        self.drop_empty_refblocks()?;
        let mut c = self.end / cs;
        while c > 0 && self.rc_get((c - 1) * cs)? == 0 {
            c -= 1;
        }
        let end = c * cs;
        if end < self.end {
            self.end = end;
            self.free.retain(|&f| f < end);
            if self.ctail >= end {
                self.ctail = 0;
            }
            if self.file_len()? > end {
                self.st
                    .set_len(end)
                    .map_err(io_err("truncating after shrink".into()))?;
            }
        }
        Ok(())
    }

    /// Unhook refcount blocks that count nothing but themselves (qemu's
    /// `qcow2_shrink_reftable`), so the file can be cut after a shrink. Only blocks that hold
    /// their own refcount are dropped: their cluster is then free with nothing left to update.
    fn drop_empty_refblocks(&mut self) -> Result<()> {
        let cs = self.g.cs;
        let per = self.g.rc_per_block;
        let order = self.g.refcount_order;
        let file_len = self.file_len()?;
        let mut dropped = false;
        for ti in 0..self.reftable.len() as u64 {
            let te = self.reftable[ti as usize];
            let off = te & REFT_OFFSET_MASK;
            if off == 0 || off / cs / per != ti || off.saturating_add(cs) > file_len {
                continue;
            }
            self.load_rb(off)?;
            let own = (off / cs) % per;
            let empty = self.rb.get(&off).is_some_and(|c| {
                (0..per).all(|k| k == own || refcount::get(&c.data, k, order) == 0)
            });
            if empty {
                self.reftable[ti as usize] = 0;
                self.meta_reftable_changed(te, 0);
                self.rb.remove(&off);
                self.reftable_dirty = true;
                dropped = true;
            }
        }
        if dropped {
            self.write_refcounts()?;
            self.st.sync().map_err(io_err("syncing".into()))?;
        }
        Ok(())
    }

    pub(super) fn write_refcounts(&mut self) -> Result<()> {
        let dirty: Vec<u64> = self
            .rb
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(k, _)| *k)
            .collect();
        for off in dirty {
            self.write_rb(off)?;
        }
        if self.reftable_dirty {
            let bytes = self.reftable.len() as u64 * 8;
            self.pre_write(&[Meta::RefcountTable], self.reftable_offset, bytes)?;
            self.st
                .write_at(&u64s_to_bytes(&self.reftable), self.reftable_offset)
                .map_err(io_err("writing refcount table".into()))?;
            self.reftable_dirty = false;
        }
        Ok(())
    }

    pub(super) fn write_header(&mut self) -> Result<()> {
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
        fields[4..].copy_from_slice(&self.l1_offset.to_be_bytes());
        let w = |buf: &[u8], at: u64| {
            self.st
                .write_at(buf, at)
                .map_err(io_err("writing qcow2 header".into()))
        };
        w(&self.size.to_be_bytes(), header::OFF_SIZE)?;
        w(&fields, header::OFF_L1)?;
        let mut rt = [0u8; 12];
        rt[..8].copy_from_slice(&self.reftable_offset.to_be_bytes());
        let rt_clusters = (self.reftable.len() as u64 * 8).div_ceil(self.g.cs) as u32;
        rt[8..].copy_from_slice(&rt_clusters.to_be_bytes());
        w(&rt, header::OFF_REFTABLE)?;
        let mut sn = [0u8; 12];
        sn[..4].copy_from_slice(&(self.snaps.len() as u32).to_be_bytes());
        sn[4..].copy_from_slice(&self.snap_offset.to_be_bytes());
        w(&sn, header::OFF_SNAPSHOTS)?;
        if self.g.version >= 3 {
            w(&self.incompatible.to_be_bytes(), header::OFF_INCOMPAT)?;
            w(&self.autoclear.to_be_bytes(), header::OFF_AUTOCLEAR)?;
        }
        self.header_dirty = false;
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.corrupt && !self.repairing {
            // Nothing more reaches a corrupt image (qemu makes it unusable); unwritten changes
            // are dropped and reported.
            let dirty = self.l1_dirty
                || self.reftable_dirty
                || self.header_dirty
                || self.l2.values().any(|c| c.dirty)
                || self.rb.values().any(|c| c.dirty);
            return if dirty {
                Err(self.corrupt_error())
            } else {
                Ok(())
            };
        }
        self.write_refcounts()?;
        let dirty: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(k, _)| *k)
            .collect();
        for off in dirty {
            self.write_l2(off)?;
        }
        if self.l1_dirty {
            let bytes = self.l1.len() as u64 * 8;
            self.pre_write(&[Meta::ActiveL1], self.l1_offset, bytes)?;
            self.st
                .write_at(&u64s_to_bytes(&self.l1), self.l1_offset)
                .map_err(io_err("writing L1 table".into()))?;
            self.l1_dirty = false;
        }
        if self.header_dirty {
            self.write_header()?;
        }
        if !self.pending_free.is_empty() {
            // Nothing on disk references these clusters any more.
            self.st.sync().map_err(io_err("syncing".into()))?;
            for c in std::mem::take(&mut self.pending_free) {
                if self.rc_add(c, -1)? == 0 {
                    let _ = self.st.punch_hole(c, self.g.cs);
                    if self.free.len() < MAX_FREE_LIST && c != self.ctail / self.g.cs * self.g.cs {
                        self.free.push(c);
                    }
                }
            }
            self.write_refcounts()?;
        }
        // Keep the file a whole number of sectors: a compressed cluster may end mid-sector.
        let len = self.file_len()?;
        if len % SECTOR != 0 {
            self.st
                .set_len(len.div_ceil(SECTOR) * SECTOR)
                .map_err(io_err("padding file".into()))?;
        }
        self.st.sync().map_err(io_err("syncing".into()))
    }
}

impl Inner {
    /// Drop every cluster the active L1 table reaches, so the whole image reads from its backing
    /// file (qemu's `make_empty`, used after `commit`). References shared with snapshots lose
    /// one count; the L1 table itself stays.
    pub(super) fn make_empty(&mut self) -> Result<()> {
        self.begin_write()?;
        self.flush()?;
        let l1 = std::mem::take(&mut self.l1);
        let mut cleared = Vec::with_capacity(l1.len());
        for &l1e in &l1 {
            let off = l1e & L1E_OFFSET_MASK;
            if off != 0 {
                for idx in 0..self.g.l2_entries {
                    let (e, _) = self.l2_entry(off, idx)?;
                    self.release(e)?;
                }
                self.pending_free.push(off);
            }
            cleared.push(0);
        }
        self.l1 = cleared;
        self.meta.invalidate();
        self.l1_dirty = true;
        self.flush()?;
        // Freed tables may be reused as data from now on: forget cached copies.
        self.l2.clear();
        Ok(())
    }
}
