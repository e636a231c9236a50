//! Host cluster allocation (qemu `docs/interop/qcow2.txt`, "Host cluster management"): the
//! refcount block cache, reading and changing refcounts, growing the refcount table, and handing
//! out clusters (freed ones first, else appended at the end of the file).

use super::*;

impl Inner {
    pub(super) fn load_rb(&mut self, off: u64) -> Result<()> {
        let t = self.next_tick();
        if let Some(c) = self.rb.get_mut(&off) {
            c.stamp = t;
            return Ok(());
        }
        let cs = self.g.cs;
        let file_len = self.file_len()?;
        check_table("refcount block", off, cs, cs, file_len)?;
        self.check_no_overlap("refcount block", off, cs)?;
        let mut data = vec![0u8; cs as usize];
        self.st
            .read_at(&mut data, off)
            .map_err(io_err(format!("reading refcount block at {off:#x}")))?;
        self.insert_rb(off, data, false)
    }

    pub(super) fn insert_rb(&mut self, off: u64, data: Vec<u8>, dirty: bool) -> Result<()> {
        while self.rb.len() >= self.g.cache_tables() {
            let victim = self.rb.iter().min_by_key(|(_, c)| c.stamp).map(|(k, _)| *k);
            let Some(v) = victim else { break };
            self.write_rb(v)?;
            self.rb.remove(&v);
        }
        let stamp = self.next_tick();
        self.rb.insert(off, Cached { data, dirty, stamp });
        Ok(())
    }

    pub(super) fn write_rb(&mut self, off: u64) -> Result<()> {
        if self.rb.get(&off).is_some_and(|c| c.dirty) {
            self.pre_write(&[overlap::Meta::RefcountBlock], off, self.g.cs)?;
        }
        if let Some(c) = self.rb.get_mut(&off) {
            if c.dirty {
                self.st
                    .write_at(&c.data, off)
                    .map_err(io_err(format!("writing refcount block at {off:#x}")))?;
                c.dirty = false;
            }
        }
        Ok(())
    }

    pub(super) fn rc_get(&mut self, host: u64) -> Result<u64> {
        let cluster = host >> self.g.cluster_bits;
        let ti = cluster / self.g.rc_per_block;
        let Some(&te) = self.reftable.get(ti as usize) else {
            return Ok(0);
        };
        let off = te & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if !self.rb.contains_key(&off)
            && off % self.g.cs == 0
            && off.saturating_add(self.g.cs) > self.file_len()?
        {
            // A refcount block past the end of the file reads as zeroes, as file bytes past
            // the end do (qemu-img check agrees); writing one is refused by `load_rb`.
            return Ok(0);
        }
        self.load_rb(off)?;
        let order = self.g.refcount_order;
        Ok(self.rb.get(&off).map_or(0, |c| {
            refcount::get(&c.data, cluster % self.g.rc_per_block, order)
        }))
    }

    pub(super) fn rc_add(&mut self, host: u64, delta: i64) -> Result<u64> {
        let cur = self.rc_get(host)?;
        let max = refcount::max(self.g.refcount_order);
        let new = if delta >= 0 {
            cur.checked_add(delta as u64).filter(|&v| v <= max)
        } else {
            cur.checked_sub(delta.unsigned_abs())
        }
        .ok_or_else(|| {
            Error::invalid(format!(
                "qcow2 refcount of cluster at {host:#x} would leave 0..={max} (is {cur}, change {delta})"
            ))
        })?;
        self.rc_set(host, new)?;
        Ok(new)
    }

    pub(super) fn rc_set(&mut self, host: u64, value: u64) -> Result<()> {
        let cluster = host >> self.g.cluster_bits;
        let ti = cluster / self.g.rc_per_block;
        let off = self.ensure_rb(ti)?;
        self.load_rb(off)?;
        let order = self.g.refcount_order;
        let per = self.g.rc_per_block;
        if let Some(c) = self.rb.get_mut(&off) {
            refcount::set(&mut c.data, cluster % per, order, value);
            c.dirty = true;
        }
        Ok(())
    }

    /// Host offset of refcount block `ti`, allocating it (and growing the table) when needed.
    pub(super) fn ensure_rb(&mut self, ti: u64) -> Result<u64> {
        if ti >= self.reftable.len() as u64 {
            self.grow_reftable(ti)?;
        }
        let te = self.reftable.get(ti as usize).copied().unwrap_or(0);
        let off = te & REFT_OFFSET_MASK;
        if off != 0 {
            return Ok(off);
        }
        let cs = self.g.cs;
        let new = self.end;
        self.end += cs;
        self.insert_rb(new, vec![0u8; cs as usize], true)?;
        if let Some(e) = self.reftable.get_mut(ti as usize) {
            *e = new;
        }
        self.meta_reftable_changed(0, new);
        self.reftable_dirty = true;
        self.rc_add(new, 1)?;
        Ok(new)
    }

    pub(super) fn grow_reftable(&mut self, ti: u64) -> Result<()> {
        let cs = self.g.cs;
        let cover = (self.end / cs) / self.g.rc_per_block + 4;
        let want = (ti + 1).max(self.reftable.len() as u64 * 2).max(cover);
        let clusters = (want * 8).div_ceil(cs);
        if clusters * cs > refcount::MAX_REFTABLE_SIZE {
            return Err(Error::limit(format!(
                "qcow2 refcount table would need {} bytes, more than {}",
                clusters * cs,
                refcount::MAX_REFTABLE_SIZE
            )));
        }
        let old = self.reftable_offset;
        let old_clusters = (self.reftable.len() as u64 * 8).div_ceil(cs);
        let new = self.end;
        self.end += clusters * cs;
        self.reftable.resize((clusters * cs / 8) as usize, 0);
        self.reftable_offset = new;
        self.reftable_dirty = true;
        self.header_dirty = true;
        for k in 0..clusters {
            self.rc_add(new + k * cs, 1)?;
        }
        for k in 0..old_clusters {
            self.pending_free.push(old + k * cs);
        }
        Ok(())
    }

    /// Reserve `n` contiguous clusters at the end of the file, each with refcount 1.
    pub(super) fn alloc(&mut self, n: u64) -> Result<u64> {
        let cs = self.g.cs;
        let off = self.end;
        self.end = off
            .checked_add(n * cs)
            .ok_or_else(|| Error::limit("qcow2 image file would exceed 2^64 bytes"))?;
        if self.end > L2E_OFFSET_MASK {
            return Err(Error::limit(
                "qcow2 image file would exceed the 2^56-byte host offset range",
            ));
        }
        for k in 0..n {
            self.rc_add(off + k * cs, 1)?;
        }
        Ok(off)
    }

    /// One cluster with refcount 1: a freed one when there is one, else appended.
    pub(super) fn alloc_one(&mut self) -> Result<u64> {
        while let Some(c) = self.free.pop() {
            // Defensive: only a cluster nobody counts may be handed out again.
            if self.rc_get(c)? == 0 {
                self.rc_add(c, 1)?;
                return Ok(c);
            }
        }
        self.alloc(1)
    }

    /// Drop the references an L2 entry holds (data cluster or compressed span).
    pub(super) fn release(&mut self, entry: u64) -> Result<()> {
        let cs = self.g.cs;
        if entry & OFLAG_COMPRESSED != 0 {
            let (host, len) = self.g.compressed_span(entry);
            let first = host / cs * cs;
            let last = (host + len - 1) / cs * cs;
            let mut c = first;
            while c <= last {
                self.pending_free.push(c);
                c += cs;
            }
        } else {
            let host = entry & L2E_OFFSET_MASK;
            if host != 0 {
                self.pending_free.push(host);
            }
        }
        Ok(())
    }
}
