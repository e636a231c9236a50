//! Consistency check and refcount repair (qemu `docs/interop/qcow2.txt`, "Cluster mapping" and
//! "Refcount table"; the procedure follows what `qemu-img check` reports).
//!
//! The check counts every reference the metadata makes (header, L1 tables of the active image and
//! of snapshots, L2 tables, data and compressed clusters, refcount table and blocks, snapshot
//! table), compares the counts with the stored refcounts, and reports leaks (stored > counted) and
//! corruptions (stored < counted, entries past the end of the file or unaligned, "copied" flags
//! that disagree with refcounts). Repair writes a fresh refcount table and blocks at the end of the
//! file from the counted references, so nothing the old structures said survives.

use super::header::{Header, AUTOCLEAR_BITMAPS};
use super::snapshot::Snapshot;
use super::{
    check_table, refcount, Inner, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    REFT_OFFSET_MASK,
};
use crate::check::{CheckMode, CheckReport};
use crate::error::{Error, Result};

/// Most host clusters a check counts references for: the counters take 4 bytes each, so this
/// bounds the check's memory to 256 MiB.
const MAX_CHECK_CLUSTERS: u64 = 1 << 26;
/// Most bitmaps an image may hold (qemu's QCOW2_MAX_BITMAPS).
const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (qemu's QCOW2_MAX_BITMAP_DIRECTORY_SIZE: 1 KiB per bitmap).
const MAX_BITMAP_DIRECTORY: u64 = 1024 * 65535;
/// Most entries of one bitmap table: a 64 TiB disk at 512-byte granularity with 512-byte
/// clusters needs 2^25; anything larger is hostile.
const MAX_BITMAP_TABLE: u32 = 1 << 25;
/// Most messages kept in a report; the counts stay exact.
const MAX_MESSAGES: usize = 1000;

/// Counted references and findings of one scan.
struct Scan {
    refs: Vec<u32>,
    report: CheckReport,
    /// (host offset of an entry to clear, its width in bytes) for `RepairAll`.
    bad_entries: Vec<(u64, usize)>,
    /// L1/L2 entries whose copied flag is wrong: (is_l1, table offset or l1 index, index).
    copied_fixes: Vec<(bool, u64, u64, bool)>,
}

impl Scan {
    fn note(&mut self, msg: String) {
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(msg);
        }
    }

    /// Count a reference to every cluster in `[off, off+len)`.
    fn inc(&mut self, cs: u64, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / cs;
        let last = (off.saturating_add(len) - 1) / cs;
        if last >= self.refs.len() as u64 {
            self.report.corruptions += 1;
            self.note(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            return;
        }
        for c in first..=last {
            if let Some(r) = self.refs.get_mut(c as usize) {
                *r = r.saturating_add(1);
            }
        }
    }
}

fn read_words(i: &Inner, off: u64, count: u64) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; (count * 8) as usize];
    i.st.read_at(&mut buf, off)
        .map_err(|e| Error::io(format!("reading table at {off:#x}"), e))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Walk all metadata and count references.
/// `with_refcounts`: count the refcount table and blocks too (false when rebuilding them, so the
/// old structures end up free).
fn scan(
    i: &mut Inner,
    snaps: &[Snapshot],
    snap_len: u64,
    hdr: &Header,
    with_refcounts: bool,
) -> Result<Scan> {
    let cs = i.g.cs;
    let file_len = i.file_len()?;
    let nb = file_len.div_ceil(cs);
    if nb > MAX_CHECK_CLUSTERS {
        return Err(Error::limit(format!(
            "checking an image of {nb} clusters (more than {MAX_CHECK_CLUSTERS})"
        )));
    }
    let mut s = Scan {
        refs: vec![0; nb as usize],
        report: CheckReport::default(),
        bad_entries: Vec::new(),
        copied_fixes: Vec::new(),
    };
    s.report.total_clusters = Some(i.size.div_ceil(cs));
    s.inc(cs, 0, cs);
    let mut l1s: Vec<(bool, u64, u64)> = vec![(true, i.l1_offset, i.l1.len() as u64)];
    for sn in snaps {
        l1s.push((false, sn.l1_offset, u64::from(sn.l1_size)));
    }
    let (mut allocated, mut fragmented, mut compressed) = (0u64, 0u64, 0u64);
    for (active, l1_off, l1_size) in l1s {
        if l1_size == 0 {
            continue;
        }
        if let Err(e) = check_table("L1 table", l1_off, l1_size * 8, cs, file_len) {
            s.report.corruptions += 1;
            s.note(format!("ERROR {e}"));
            continue;
        }
        s.inc(cs, l1_off, l1_size * 8);
        let l1 = if active {
            i.l1.clone()
        } else {
            match read_words(i, l1_off, l1_size) {
                Ok(v) => v,
                Err(e) => {
                    s.report.check_errors += 1;
                    s.note(format!("ERROR {e}"));
                    continue;
                }
            }
        };
        for (l1i, &l1e) in l1.iter().enumerate() {
            let l2off = l1e & L1E_OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            if l2off % cs != 0 {
                s.report.corruptions += 1;
                s.note(format!(
                    "ERROR l2_offset={l2off:#x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                if active {
                    s.bad_entries.push((i.l1_offset + l1i as u64 * 8, 8));
                }
                continue;
            }
            s.inc(cs, l2off, cs);
            if active {
                // A refcount that cannot be read is a check error, already counted when the
                // refcounts are compared; the copied flag is then not judged (as qemu-img does).
                if let Ok(rc) = i.rc_get(l2off) {
                    if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                        s.report.corruptions += 1;
                        s.note(format!(
                            "ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={l1e:x} refcount={rc}"
                        ));
                        s.copied_fixes.push((true, 0, l1i as u64, rc == 1));
                    }
                }
            }
            if l2off + cs > file_len {
                if active {
                    s.bad_entries.push((i.l1_offset + l1i as u64 * 8, 8));
                }
                continue;
            }
            let l2 = match read_words(i, l2off, cs / 8) {
                Ok(v) => v,
                Err(e) => {
                    s.report.check_errors += 1;
                    s.note(format!("ERROR {e}"));
                    continue;
                }
            };
            let w = i.g.words as usize;
            // Contiguity is judged within one L2 table, as qemu-img does.
            let mut next_contiguous = 0u64;
            for (idx, ent) in l2.chunks_exact(w).enumerate() {
                let e = ent[0];
                let entry_at = l2off + (idx * w * 8) as u64;
                if e & OFLAG_COMPRESSED != 0 {
                    let (host, len) = i.g.compressed_span(e);
                    let before = s.report.corruptions;
                    s.inc(cs, host, len);
                    if s.report.corruptions != before && active {
                        s.bad_entries.push((entry_at, w * 8));
                    }
                    if active {
                        // qemu counts compressed clusters as fragmented by nature.
                        allocated += 1;
                        compressed += 1;
                        fragmented += 1;
                    }
                    continue;
                }
                let host = e & L2E_OFFSET_MASK;
                if host == 0 {
                    continue;
                }
                if host % cs != 0 {
                    // Still counted below, over the cluster-sized range it names (as qemu-img
                    // does): the clusters it straddles show up as refcount mismatches.
                    s.report.corruptions += 1;
                    s.note(format!(
                        "ERROR offset={host:#x}: Cluster is not properly aligned; L2 entry corrupted"
                    ));
                    if active {
                        s.bad_entries.push((entry_at, w * 8));
                    }
                }
                if i.g.has_data_file {
                    // Data clusters live in the external data file, not counted here.
                    if active {
                        allocated += 1;
                    }
                    continue;
                }
                let before = s.report.corruptions;
                s.inc(cs, host, cs);
                if s.report.corruptions != before && active {
                    s.bad_entries.push((entry_at, w * 8));
                }
                if active {
                    allocated += 1;
                    if next_contiguous != 0 && host != next_contiguous {
                        fragmented += 1;
                    }
                    next_contiguous = host + cs;
                    if let Ok(rc) = i.rc_get(host) {
                        if (rc == 1) != (e & OFLAG_COPIED != 0) {
                            s.report.corruptions += 1;
                            s.note(format!(
                                "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                            ));
                            s.copied_fixes.push((false, l2off, idx as u64, rc == 1));
                        }
                    }
                }
            }
        }
    }
    // Refcount structures.
    let rt_bytes = i.reftable.len() as u64 * 8;
    let reftable = if with_refcounts {
        s.inc(cs, i.reftable_offset, rt_bytes);
        i.reftable.clone()
    } else {
        Vec::new()
    };
    for (ti, &te) in reftable.iter().enumerate() {
        let off = te & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 || off.checked_add(cs).is_none_or(|end| end > file_len) {
            s.report.corruptions += 1;
            s.note(format!(
                "ERROR refcount block {ti} at {off:#x} is not cluster aligned or lies outside the image"
            ));
            continue;
        }
        s.inc(cs, off, cs);
    }
    if !snaps.is_empty() {
        s.inc(cs, i.snap_offset, snap_len);
    }
    if let Some(ext) = &hdr.bitmaps {
        // qemu ignores the extension (and its clusters) once the autoclear bit is clear.
        if i.autoclear & AUTOCLEAR_BITMAPS != 0 {
            count_bitmaps(i, &mut s, ext, file_len);
        }
    }
    s.report.allocated_clusters = Some(allocated);
    s.report.fragmented_clusters = Some(fragmented);
    s.report.compressed_clusters = Some(compressed);
    Ok(s)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Count the clusters of the bitmaps extension (spec: "Bitmaps extension", "Bitmap directory",
/// "Bitmap table"): the directory, each bitmap table, and each bitmap data cluster.
fn count_bitmaps(i: &Inner, s: &mut Scan, ext: &[u8], file_len: u64) {
    let cs = i.g.cs;
    let (Some(nb), Some(dir_size), Some(dir_off)) = (be32(ext, 0), be64(ext, 8), be64(ext, 16))
    else {
        s.report.corruptions += 1;
        s.note("ERROR bitmaps extension is too short".into());
        return;
    };
    if nb > MAX_BITMAPS || dir_size > MAX_BITMAP_DIRECTORY {
        s.report.corruptions += 1;
        s.note(format!(
            "ERROR bitmaps extension declares {nb} bitmaps in {dir_size} bytes"
        ));
        return;
    }
    if check_table("bitmap directory", dir_off, dir_size, cs, file_len).is_err() {
        s.report.corruptions += 1;
        s.note(format!(
            "ERROR bitmap directory at {dir_off:#x} is outside the file"
        ));
        return;
    }
    s.inc(cs, dir_off, dir_size);
    let mut dir = vec![0u8; dir_size as usize];
    if i.st.read_at(&mut dir, dir_off).is_err() {
        s.report.check_errors += 1;
        return;
    }
    let mut pos = 0usize;
    for _ in 0..nb {
        let (Some(t_off), Some(t_size), Some(name_size), Some(extra)) = (
            be64(&dir, pos),
            be32(&dir, pos + 8),
            dir.get(pos + 18..pos + 20)
                .map(|b| u64::from(u16::from_be_bytes([b[0], b[1]]))),
            be32(&dir, pos + 20),
        ) else {
            s.report.corruptions += 1;
            s.note("ERROR bitmap directory entry overruns the directory".into());
            return;
        };
        let t_bytes = u64::from(t_size) * 8;
        if t_size <= MAX_BITMAP_TABLE
            && check_table("bitmap table", t_off, t_bytes, cs, file_len).is_ok()
        {
            s.inc(cs, t_off, t_bytes);
            if let Ok(t) = read_words(i, t_off, u64::from(t_size)) {
                for e in t {
                    let off = e & L2E_OFFSET_MASK;
                    if off != 0 {
                        s.inc(cs, off, cs);
                    }
                }
            }
        } else {
            s.report.corruptions += 1;
            s.note(format!(
                "ERROR bitmap table at {t_off:#x} is outside the file"
            ));
        }
        let len = 24 + u64::from(extra) + name_size;
        pos = match usize::try_from(len.div_ceil(8) * 8)
            .ok()
            .and_then(|l| pos.checked_add(l))
        {
            Some(p) => p,
            None => return,
        };
    }
}

/// Compare counted references with stored refcounts; returns (refcount corruptions, leaks).
fn compare(i: &mut Inner, s: &mut Scan) -> (u64, u64) {
    let cs = i.g.cs;
    let mut highest = None;
    let (mut corrupt, mut leaks) = (0, 0);
    for c in 0..s.refs.len() as u64 {
        let counted = u64::from(s.refs[c as usize]);
        let stored = match i.rc_get(c * cs) {
            Ok(v) => v,
            Err(e) => {
                s.report.check_errors += 1;
                s.note(format!("ERROR reading refcount of cluster {c}: {e}"));
                continue;
            }
        };
        if stored > 0 || counted > 0 {
            highest = Some(c);
        }
        if stored < counted {
            corrupt += 1;
            s.note(format!(
                "ERROR cluster {c} refcount={stored} reference={counted}"
            ));
        } else if stored > counted {
            leaks += 1;
            s.note(format!(
                "Leaked cluster {c} refcount={stored} reference={counted}"
            ));
        }
    }
    s.report.corruptions += corrupt;
    s.report.leaks += leaks;
    s.report.image_end_offset = Some(highest.map_or(0, |h| (h + 1) * cs));
    (corrupt, leaks)
}

/// Write a new refcount table and blocks holding `refs` (plus themselves) at the end of the file.
fn write_refcounts(i: &mut Inner, mut refs: Vec<u32>) -> Result<()> {
    let cs = i.g.cs;
    let base = i.end.max(refs.len() as u64 * cs).div_ceil(cs);
    let per_block = i.g.rc_per_block;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = base + blocks + table;
        let nb = total.div_ceil(per_block);
        let nt = (nb * 8).div_ceil(cs).max(1);
        if nb == blocks && nt == table {
            break;
        }
        blocks = nb;
        table = nt;
    }
    if table * cs > refcount::MAX_REFTABLE_SIZE {
        return Err(Error::limit(format!(
            "rebuilt refcount table would need {} bytes",
            table * cs
        )));
    }
    let total = base + table + blocks;
    refs.resize(total as usize, 0);
    for c in base..total {
        refs[c as usize] = 1;
    }
    let max = refcount::max(i.g.refcount_order);
    let table_off = base * cs;
    let mut reftable = vec![0u64; (table * cs / 8) as usize];
    for b in 0..blocks {
        let off = (base + table + b) * cs;
        let mut block = vec![0u8; cs as usize];
        for k in 0..per_block {
            let c = b * per_block + k;
            if let Some(&r) = refs.get(c as usize) {
                refcount::set(&mut block, k, i.g.refcount_order, u64::from(r).min(max));
            }
        }
        i.st.write_at(&block, off)
            .map_err(|e| Error::io(format!("writing refcount block at {off:#x}"), e))?;
        reftable[b as usize] = off;
    }
    i.st.write_at(&super::u64s_to_bytes(&reftable), table_off)
        .map_err(|e| Error::io("writing refcount table", e))?;
    i.st.sync().map_err(|e| Error::io("syncing", e))?;
    i.rb.clear();
    i.free.clear();
    i.reftable = reftable;
    i.reftable_offset = table_off;
    i.reftable_dirty = false;
    i.end = total * cs;
    i.ctail = 0;
    i.write_header()?;
    i.st.sync().map_err(|e| Error::io("syncing", e))
}

/// Rebuild every refcount from the metadata (after a dirty shutdown).
pub(super) fn rebuild_refcounts(
    i: &mut Inner,
    snaps: &[Snapshot],
    snap_len: u64,
    hdr: &Header,
) -> Result<()> {
    let s = scan(i, snaps, snap_len, hdr, false)?;
    write_refcounts(i, s.refs)
}

/// Run a check, repairing according to `mode`.
pub(super) fn check(
    i: &mut Inner,
    snaps: &[Snapshot],
    snap_len: u64,
    hdr: &Header,
    mode: CheckMode,
) -> Result<CheckReport> {
    let mut s = scan(i, snaps, snap_len, hdr, true)?;
    let (corrupt, leaks) = compare(i, &mut s);
    let repair = match mode {
        CheckMode::ReadOnly => false,
        CheckMode::RepairLeaks => leaks > 0 && corrupt == 0,
        CheckMode::RepairAll => s.report.corruptions > 0 || leaks > 0,
    };
    if !repair {
        return Ok(s.report);
    }
    let before = s.report.clone();
    if mode == CheckMode::RepairAll {
        // Entries pointing outside the file or unaligned: the data is gone; clear the entries.
        for (at, width) in std::mem::take(&mut s.bad_entries) {
            i.st.write_at(&vec![0u8; width], at)
                .map_err(|e| Error::io(format!("clearing entry at {at:#x}"), e))?;
            if let Some(l1i) = at
                .checked_sub(i.l1_offset)
                .map(|d| d / 8)
                .filter(|&x| x < i.l1.len() as u64)
            {
                i.l1[l1i as usize] = 0;
            }
        }
        i.l2.clear();
    }
    let fresh = scan(i, snaps, snap_len, hdr, false)?;
    write_refcounts(i, fresh.refs)?;
    if mode == CheckMode::RepairAll {
        // Copied flags follow the rebuilt refcounts.
        let s2 = scan(i, snaps, snap_len, hdr, true)?;
        for (is_l1, table, idx, one) in s2.copied_fixes {
            if is_l1 {
                if let Some(e) = i.l1.get_mut(idx as usize) {
                    *e = if one {
                        *e | OFLAG_COPIED
                    } else {
                        *e & !OFLAG_COPIED
                    };
                    i.l1_dirty = true;
                }
            } else {
                let (e, bitmap) = i.l2_entry(table, idx)?;
                let v = if one {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                i.set_l2_entry(table, idx, v, bitmap)?;
            }
        }
        i.flush()?;
    }
    let mut after = scan(i, snaps, snap_len, hdr, true)?;
    compare(i, &mut after);
    let mut r = after.report;
    r.leaks_fixed = before.leaks.saturating_sub(r.leaks);
    r.corruptions_fixed = before.corruptions.saturating_sub(r.corruptions);
    let mut msgs = before.messages;
    msgs.extend(r.messages);
    r.messages = msgs;
    Ok(r)
}
