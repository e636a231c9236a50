//! Consistency check and repair (qemu `docs/interop/qcow2.txt`, "Cluster mapping" and
//! "Refcount table"; the procedure and its counts follow qemu's `qcow2_check_refcounts` in
//! `block/qcow2-refcount.c`, so `vmi check` and `qemu-img check` report the same numbers).
//!
//! The check counts every reference the metadata makes (header, L1 tables of the active image and
//! of snapshots, L2 tables, data and compressed clusters, refcount table and blocks, snapshot
//! table, bitmaps), compares the counts with the stored refcounts, and reports leaks (stored >
//! counted) and corruptions (stored < counted, references past the end of the file, unaligned
//! offsets, reserved bits set, "copied" flags that disagree with refcounts, refcount blocks
//! referenced more than once). Like qemu, a non-zero L1 entry whose offset bits are zero makes the
//! header cluster count as an L2 table: an image whose metadata overlaps is seen as corrupt.
//!
//! Repair (`-r all`) clears active L1 entries whose L2 table lies on other metadata, out of the file
//! or unaligned, and active L2 entries that point outside the file, at metadata, unaligned, or have
//! reserved bits set, then writes a fresh refcount table and blocks at the end of the file from the
//! counted references, so nothing the old structures said survives, and sets the "copied" flags
//! from the new refcounts. Snapshot tables are not rewritten: what is wrong in them stays reported.
//! Every write goes through the overlap checks ([`super::overlap`]).

use super::header::AUTOCLEAR_BITMAPS;
use super::overlap::Meta;
use super::snapshot::Snapshot;
use super::{
    check_table, refcount, Inner, L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_L1_SIZE, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO, REFT_OFFSET_MASK,
};
use crate::check::{CheckMode, CheckReport};
use crate::error::{Error, ErrorKind, Result};

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
/// L1 entry bits that must be zero (spec: bits 1-8 and 56-62; qemu's L1E_RESERVED_MASK).
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero (spec: bits 1-8 and 56-61; L2E_STD_RESERVED_MASK).
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry bits that must be zero (spec: bits 0-8; REFT_RESERVED_MASK).
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Extended L2 bitmap: the allocation half (bits 0-31).
const BITMAP_ALLOC_MASK: u64 = 0xffff_ffff;

/// Counted references and findings of one scan.
struct Scan {
    refs: Vec<u32>,
    /// Largest refcount the image's width can hold (capped by the counter width).
    rc_max: u64,
    file_len: u64,
    cs: u64,
    report: CheckReport,
    /// The stored refcount structure cannot be kept (qemu's `rebuild`): only `-r all` repairs.
    rebuild: bool,
    /// (file offset of an 8-byte word, value to write there) for `RepairAll`.
    fixes: Vec<(u64, u64)>,
    /// Active L1 entries to clear for `RepairAll` (their L2 table is unusable).
    bad_l1: Vec<usize>,
    /// L1/L2 entries whose copied flag is wrong: (is_l1, table offset, index, refcount is one).
    copied_fixes: Vec<(bool, u64, u64, bool)>,
}

impl Scan {
    fn note(&mut self, msg: String) {
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(msg);
        }
    }

    fn corrupt(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.note(msg);
    }

    /// Count a reference to every cluster in `[off, off+len)` (qemu's
    /// `qcow2_inc_refcounts_imrt`): a region reaching a cluster or more past the end of the file
    /// is a corruption, as is a count that would pass the refcount width.
    fn inc(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = self.cs;
        if off.saturating_add(len) >= self.file_len.saturating_add(cs) {
            self.corrupt(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            return;
        }
        let first = off / cs;
        let last = (off + len - 1) / cs;
        if last >= self.refs.len() as u64 {
            // At most one cluster past the end (the check above bounds it).
            self.refs.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            let Some(r) = self.refs.get_mut(c as usize) else {
                continue;
            };
            if u64::from(*r) >= self.rc_max {
                self.corrupt(format!("ERROR: overflow cluster offset={:#x}", c * cs));
                continue;
            }
            *r += 1;
        }
    }

    fn count(&self, off: u64) -> u64 {
        self.refs
            .get((off / self.cs) as usize)
            .map_or(0, |&r| u64::from(r))
    }
}

/// `count` big-endian words at `off`; bytes past the end of the file read as zeroes (as qemu's
/// file driver returns them).
fn read_words(i: &Inner, off: u64, count: u64, file_len: u64) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; (count * 8) as usize];
    let avail = file_len.saturating_sub(off).min(count * 8) as usize;
    if avail > 0 {
        i.st.read_at(&mut buf[..avail], off)
            .map_err(|e| Error::io(format!("reading table at {off:#x}"), e))?;
    }
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Walk all metadata and count references.
/// `with_refcounts`: count the refcount table and blocks too (false when rebuilding them, so the
/// old structures end up free).
fn scan(i: &mut Inner, snaps: &[Snapshot], snap_len: u64, with_refcounts: bool) -> Result<Scan> {
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
        rc_max: refcount::max(i.g.refcount_order).min(u64::from(u32::MAX)),
        file_len,
        cs,
        report: CheckReport::default(),
        rebuild: false,
        fixes: Vec::new(),
        bad_l1: Vec::new(),
        copied_fixes: Vec::new(),
    };
    s.report.total_clusters = Some(i.size.div_ceil(cs));
    s.inc(0, cs);
    let mut l1s: Vec<(Option<&Snapshot>, u64, u64)> = vec![(None, i.l1_offset, i.l1.len() as u64)];
    if i.g.has_data_file && !snaps.is_empty() {
        s.corrupt(format!(
            "ERROR {} snapshots in image with data file",
            snaps.len()
        ));
    }
    for sn in snaps {
        if sn.l1_offset % cs != 0 {
            s.corrupt(format!(
                "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                sn.info.id, sn.info.name, sn.l1_offset
            ));
            continue;
        }
        if u64::from(sn.l1_size) * 8 > MAX_L1_SIZE {
            s.corrupt(format!(
                "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                sn.info.id, sn.info.name, sn.l1_size
            ));
            continue;
        }
        l1s.push((Some(sn), sn.l1_offset, u64::from(sn.l1_size)));
    }
    let mut frag = Frag::default();
    for (sn, l1_off, l1_size) in l1s {
        if l1_size == 0 {
            continue;
        }
        let active = sn.is_none();
        s.inc(l1_off, l1_size * 8);
        let l1 = if active {
            i.l1.clone()
        } else {
            match read_words(i, l1_off, l1_size, file_len) {
                Ok(v) => v,
                Err(e) => {
                    s.report.check_errors += 1;
                    s.note(format!("ERROR: I/O error in check_refcounts_l1: {e}"));
                    continue;
                }
            }
        };
        for (l1i, &l1e) in l1.iter().enumerate() {
            if l1e == 0 {
                continue;
            }
            if l1e & L1E_RESERVED_MASK != 0 {
                s.corrupt(format!(
                    "ERROR found L1 entry with reserved bits set: {l1e:x}"
                ));
            }
            let l2off = l1e & L1E_OFFSET_MASK;
            s.inc(l2off, cs);
            if l2off % cs != 0 {
                s.corrupt(format!(
                    "ERROR l2_offset={l2off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            // An L2 table that cannot be one: repair drops the whole L1 entry (its entries are
            // not worth fixing one by one, and writing them would land on other metadata).
            let unusable = l2off == 0
                || l2off % cs != 0
                || l2off.saturating_add(cs) > file_len
                || l1e & L1E_RESERVED_MASK != 0
                || i.overlap(&[Meta::ActiveL2, Meta::InactiveL2], l2off, cs)
                    .is_some();
            if active && unusable {
                s.bad_l1.push(l1i);
            }
            let l2 = match read_words(i, l2off, cs / 8, file_len) {
                Ok(v) => v,
                Err(e) => {
                    s.report.check_errors += 1;
                    s.note(format!("ERROR: I/O error in check_refcounts_l2: {e}"));
                    continue;
                }
            };
            let fixable = active && !unusable;
            check_l2(i, &mut s, &l2, l2off, fixable, active.then_some(&mut frag))?;
            if active && l2off != 0 {
                // qemu's check_oflag_copied (it skips entries whose offset bits are zero).
                check_copied(i, &mut s, l1i, l1e, &l2, l2off)?;
            }
        }
    }
    if !snaps.is_empty() {
        s.inc(i.snap_offset, snap_len);
    }
    if with_refcounts {
        s.inc(i.reftable_offset, i.reftable.len() as u64 * 8);
    }
    if let Some(ext) = i.bitmaps_ext.clone() {
        // qemu ignores the extension (and its clusters) once the autoclear bit is clear.
        if i.autoclear & AUTOCLEAR_BITMAPS != 0 {
            count_bitmaps(i, &mut s, &ext, file_len);
        }
    }
    if let Some((off, len)) = i.crypto_header {
        // The LUKS header and key material (qcow2 `encrypt.format=luks`).
        s.inc(off, len);
    }
    if with_refcounts {
        check_refblocks(i, &mut s);
    }
    s.report.allocated_clusters = Some(frag.allocated);
    s.report.fragmented_clusters = Some(frag.fragmented);
    s.report.compressed_clusters = Some(frag.compressed);
    Ok(s)
}

/// qemu's `BlockFragInfo` counters (active image only).
#[derive(Default)]
struct Frag {
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

/// Count and check the entries of one L2 table (qemu's `check_refcounts_l2`). `fixable`: an
/// active table whose bad entries `RepairAll` may clear.
fn check_l2(
    i: &mut Inner,
    s: &mut Scan,
    l2: &[u64],
    l2off: u64,
    fixable: bool,
    mut frag: Option<&mut Frag>,
) -> Result<()> {
    let cs = s.cs;
    let w = i.g.words as usize;
    let ext = i.g.extended_l2;
    let mut next_contiguous = 0u64;
    for (idx, ent) in l2.chunks_exact(w).enumerate() {
        let e = ent[0];
        let bitmap = if ext { ent[1] } else { 0 };
        let at = l2off + (idx * w * 8) as u64;
        let mut bad = false;
        if e & OFLAG_COMPRESSED != 0 {
            if e & OFLAG_COPIED != 0 {
                s.corrupt(format!(
                    "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                    e & ((1u64 << i.g.csize_shift()) - 1)
                ));
                bad = true;
            }
            if i.g.has_data_file {
                s.corrupt(format!(
                    "ERROR compressed cluster {idx} with data file, entry={e:#x}"
                ));
                push_clear(s, fixable, at, w);
                continue;
            }
            if bitmap != 0 {
                s.corrupt(format!(
                    "ERROR compressed cluster {idx} with non-zero subcluster allocation bitmap, entry={e:#x}"
                ));
                push_clear(s, fixable, at, w);
                continue;
            }
            let (host, len) = i.g.compressed_span(e);
            let before = s.report.corruptions;
            s.inc(host, len);
            bad |= s.report.corruptions != before || i.overlap(&[], host, len).is_some();
            if let Some(f) = frag.as_deref_mut() {
                f.allocated += 1;
                f.compressed += 1;
                // Compressed clusters are fragmented by nature (qemu counts them so).
                f.fragmented += 1;
            }
            if bad {
                push_clear(s, fixable, at, w);
            }
            continue;
        }
        if e & L2E_STD_RESERVED_MASK != 0 {
            s.corrupt(format!(
                "ERROR found l2 entry with reserved bits set: {e:x}"
            ));
            bad = true;
        }
        let host = e & L2E_OFFSET_MASK;
        let zero_flag = !ext && e & OFLAG_ZERO != 0;
        let allocated = host != 0 || (i.g.has_data_file && e & OFLAG_COPIED != 0);
        if !allocated {
            if ext && bitmap & BITMAP_ALLOC_MASK != 0 {
                s.corrupt(
                    "ERROR: Unallocated cluster has non-zero subcluster allocation map".into(),
                );
                bad = true;
            }
            if bad {
                push_clear(s, fixable, at, w);
            }
            continue;
        }
        if ext && (bitmap >> 32) & bitmap != 0 {
            s.corrupt(format!(
                "ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ));
            bad = true;
        }
        if host % cs != 0 {
            let data = if ext {
                bitmap & BITMAP_ALLOC_MASK != 0
            } else {
                !zero_flag
            };
            let what = if data { "Data" } else { "Preallocated" };
            s.corrupt(format!(
                "ERROR offset={host:x}: {what} cluster is not properly aligned; L2 entry corrupted."
            ));
            bad = true;
        }
        if let Some(f) = frag.as_deref_mut() {
            f.allocated += 1;
            if next_contiguous != 0 && host != next_contiguous {
                f.fragmented += 1;
            }
            next_contiguous = host.wrapping_add(cs);
        }
        if !i.g.has_data_file {
            let before = s.report.corruptions;
            s.inc(host, cs);
            bad |= s.report.corruptions != before || i.overlap(&[], host, cs).is_some();
        }
        if bad {
            push_clear(s, fixable, at, w);
        }
    }
    Ok(())
}

/// Queue clearing the L2 entry at `at` (`w` words) for `RepairAll`.
fn push_clear(s: &mut Scan, fixable: bool, at: u64, w: usize) {
    if fixable {
        for k in 0..w as u64 {
            s.fixes.push((at + 8 * k, 0));
        }
    }
}

/// qemu's `check_oflag_copied` for one active L1 entry and its L2 table: the flag must be set
/// exactly when the stored refcount is one.
fn check_copied(
    i: &mut Inner,
    s: &mut Scan,
    l1i: usize,
    l1e: u64,
    l2: &[u64],
    l2off: u64,
) -> Result<()> {
    // A refcount that cannot be read is a check error, counted when the refcounts are compared;
    // the flag is then not judged (as qemu-img does).
    if let Ok(rc) = i.rc_get(l2off) {
        if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
            s.corrupt(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={l1e:x} refcount={rc}"
            ));
            s.copied_fixes.push((true, 0, l1i as u64, rc == 1));
        }
    }
    let w = i.g.words as usize;
    for (idx, ent) in l2.chunks_exact(w).enumerate() {
        let e = ent[0];
        let host = e & L2E_OFFSET_MASK;
        if e & OFLAG_COMPRESSED != 0 || host == 0 {
            continue;
        }
        let rc = if i.g.has_data_file {
            1
        } else {
            match i.rc_get(host) {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            s.corrupt(format!(
                "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
            ));
            s.copied_fixes.push((false, l2off, idx as u64, rc == 1));
        }
    }
    Ok(())
}

/// qemu's `check_refblocks`: every refcount table entry names an aligned block inside the file,
/// referenced by nothing else.
fn check_refblocks(i: &Inner, s: &mut Scan) {
    let cs = s.cs;
    let nb = s.file_len.div_ceil(cs);
    for (ti, &te) in i.reftable.iter().enumerate() {
        let off = te & REFT_OFFSET_MASK;
        if te & REFT_RESERVED_MASK != 0 {
            s.corrupt(format!(
                "ERROR refcount table entry {ti} has reserved bits set"
            ));
            s.rebuild = true;
            continue;
        }
        if off % cs != 0 {
            s.corrupt(format!(
                "ERROR refcount block {ti} is not cluster aligned; refcount table entry corrupted"
            ));
            s.rebuild = true;
            continue;
        }
        if off / cs >= nb {
            s.corrupt(format!("ERROR refcount block {ti} is outside image"));
            s.rebuild = true;
            continue;
        }
        if off != 0 {
            s.inc(off, cs);
            let n = s.count(off);
            if n != 1 {
                s.corrupt(format!("ERROR refcount block {ti} refcount={n}"));
                s.rebuild = true;
            }
        }
    }
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
    s.inc(dir_off, dir_size);
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
            s.inc(t_off, t_bytes);
            if let Ok(t) = read_words(i, t_off, u64::from(t_size), file_len) {
                for e in t {
                    let off = e & L2E_OFFSET_MASK;
                    if off != 0 {
                        s.inc(off, cs);
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
                s.note(format!("Can't get refcount for cluster {c}: {e}"));
                continue;
            }
        };
        if stored > 0 || counted > 0 {
            highest = Some(c);
        }
        if stored == counted {
            continue;
        }
        if stored == 0 {
            // qemu cannot fix a missing refcount in place: the structure is rebuilt.
            s.rebuild = true;
        }
        if stored < counted {
            corrupt += 1;
            s.note(format!(
                "ERROR cluster {c} refcount={stored} reference={counted}"
            ));
        } else {
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
    i.pre_write(&[], table_off, (table + blocks) * cs)?;
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
    i.meta.invalidate();
    i.end = total * cs;
    i.ctail = 0;
    i.write_header()?;
    i.st.sync().map_err(|e| Error::io("syncing", e))
}

/// Rebuild every refcount from the metadata (after a dirty shutdown).
pub(super) fn rebuild_refcounts(i: &mut Inner, snaps: &[Snapshot], snap_len: u64) -> Result<()> {
    let s = scan(i, snaps, snap_len, false)?;
    write_refcounts(i, s.refs)
}

impl Inner {
    /// Refuse `what` when a read-only check finds errors (leaks are harmless): operations that
    /// rewrite refcounts of everything the tables reach would otherwise spread the damage.
    pub(super) fn require_consistent(&mut self, what: &str) -> Result<()> {
        self.flush()?;
        let snaps = self.snaps.clone();
        let snap_len = self.snap_len;
        let mut s = scan(self, &snaps, snap_len, true)?;
        compare(self, &mut s);
        let r = &s.report;
        if r.corruptions > 0 || r.check_errors > 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "qcow2 image has {} errors and {} check errors (see `vmi check`); refusing to {what}",
                    r.corruptions, r.check_errors
                ),
            ));
        }
        Ok(())
    }
}

/// Run a check, repairing according to `mode`.
pub(super) fn check(
    i: &mut Inner,
    snaps: &[Snapshot],
    snap_len: u64,
    mode: CheckMode,
) -> Result<CheckReport> {
    let mut s = scan(i, snaps, snap_len, true)?;
    let (_, leaks) = compare(i, &mut s);
    let repair = match mode {
        CheckMode::ReadOnly => false,
        CheckMode::RepairLeaks => leaks > 0 || s.report.corruptions > 0,
        CheckMode::RepairAll => s.report.corruptions > 0 || leaks > 0,
    };
    if !repair {
        if mode != CheckMode::ReadOnly && s.report.corruptions == 0 && s.report.check_errors == 0 {
            i.repairing = true;
            let r = i.mark_consistent();
            i.repairing = false;
            r?;
        }
        return Ok(s.report);
    }
    if mode == CheckMode::RepairLeaks && (s.report.corruptions > 0 || s.rebuild) {
        // qemu's -r leaks changes refcounts only where that is safe: never with corruptions.
        let mut r = s.report;
        r.messages.push(
            "ERROR corruptions were found: repairing them needs `-r all` (leaks are not repaired either: the refcount structure is rebuilt as a whole)".into(),
        );
        return Ok(r);
    }
    i.repairing = true;
    let result = repair_all(i, snaps, snap_len, s, mode);
    i.repairing = false;
    let r = result?;
    if r.corruptions == 0 && r.check_errors == 0 {
        i.mark_consistent()?;
    }
    Ok(r)
}

/// Repair what `mode` allows and check again; the report holds the messages of both passes.
fn repair_all(
    i: &mut Inner,
    snaps: &[Snapshot],
    snap_len: u64,
    mut s: Scan,
    mode: CheckMode,
) -> Result<CheckReport> {
    let before = s.report.clone();
    let mut notes = Vec::new();
    if mode == CheckMode::RepairAll {
        // L1 entries whose L2 table is unusable: the data behind them is gone.
        for l1i in std::mem::take(&mut s.bad_l1) {
            if let Some(e) = i.l1.get_mut(l1i) {
                notes.push(format!(
                    "Repairing L1 entry {l1i} ({:#x}): its L2 table is unusable; entry cleared",
                    *e
                ));
                *e = 0;
                i.l1_dirty = true;
            }
        }
        i.meta.invalidate();
        for (at, v) in std::mem::take(&mut s.fixes) {
            i.pre_write(&[Meta::ActiveL2, Meta::InactiveL2], at, 8)?;
            i.st.write_at(&v.to_be_bytes(), at)
                .map_err(|e| Error::io(format!("clearing entry at {at:#x}"), e))?;
        }
        i.l2.clear();
        if i.l1_dirty {
            let bytes = i.l1.len() as u64 * 8;
            i.pre_write(&[Meta::ActiveL1], i.l1_offset, bytes)?;
            i.st.write_at(&super::u64s_to_bytes(&i.l1), i.l1_offset)
                .map_err(|e| Error::io("writing L1 table", e))?;
            i.l1_dirty = false;
        }
    }
    let fresh = scan(i, snaps, snap_len, false)?;
    write_refcounts(i, fresh.refs)?;
    if mode == CheckMode::RepairAll {
        // Copied flags follow the rebuilt refcounts.
        let s2 = scan(i, snaps, snap_len, true)?;
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
    let mut after = scan(i, snaps, snap_len, true)?;
    compare(i, &mut after);
    let mut r = after.report;
    r.leaks_fixed = before.leaks.saturating_sub(r.leaks);
    r.corruptions_fixed = before.corruptions.saturating_sub(r.corruptions);
    let mut msgs = before.messages;
    msgs.extend(notes);
    if r.corruptions > 0 {
        msgs.push(format!(
            "ERROR {} corruptions could not be repaired (snapshot tables are not rewritten)",
            r.corruptions
        ));
    }
    msgs.extend(r.messages);
    r.messages = msgs;
    Ok(r)
}
