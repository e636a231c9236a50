//! qemu-img compare: are two images' guest contents the same?
//!
//! Semantics follow qemu-img compare: ranges that both images report as reading zero are skipped
//! without being read; everything else is read chunk by chunk and compared. The first difference is
//! reported at 512-byte sector granularity. Images of different sizes are equal when the extra part
//! of the larger one reads as zeroes, unless in strict mode, where a size difference or a
//! difference in allocation status is itself a mismatch.

use crate::progress::{Progress, ProgressFn};
use crossbeam_channel::{bounded, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use vmi_disk::{BlockKind, BlockStatus, Error, Image, Result};

/// Bytes compared per step: bounded buffers whatever the image size.
const COMPARE_CHUNK: u64 = 2 << 20;

/// Granularity of the reported offset (qemu-img reports sectors).
const SECTOR: u64 = 512;

/// Options for [`compare`].
#[derive(Clone, Default)]
pub struct CompareOptions {
    /// Strict mode (`-s`): images of different size differ, and allocated-zero vs unallocated differ.
    pub strict: bool,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareOutcome {
    /// Same content.
    Identical,
    /// First difference at this guest offset, with qemu-img's wording of why.
    Differ {
        /// Guest offset of the first differing sector.
        offset: u64,
        /// e.g. "Content mismatch", "Image size mismatch".
        reason: String,
    },
}

/// Reason for different content (qemu: "Content mismatch at offset N!").
pub const CONTENT_MISMATCH: &str = "Content mismatch";
/// Reason for different sizes in strict mode (qemu: "Strict mode: Image size mismatch!").
pub const SIZE_MISMATCH: &str = "Image size mismatch";
/// Reason for different allocation status in strict mode (qemu: "Strict mode: Offset N block
/// status mismatch!").
pub const STATUS_MISMATCH: &str = "Block status mismatch";

/// The block status at `pos`, refusing ranges only an unopened backing file could answer.
fn status(img: &Image, pos: u64, len: u64) -> Result<BlockStatus> {
    let bs = img.block_status(pos, len)?;
    let unopened = img.driver().backing().is_some() && img.backing_image().is_none();
    if bs.kind == BlockKind::Unallocated && bs.depth == 0 && unopened {
        return Err(Error::usage(format!(
            "guest range {}+{} comes from the backing file, which was not opened",
            bs.start, bs.len
        ))
        .with_path(img.path()));
    }
    Ok(bs)
}

fn reads_zero(bs: &BlockStatus) -> bool {
    matches!(bs.kind, BlockKind::Zero | BlockKind::Unallocated)
}

/// The status strict mode compares: (allocated, zero, data).
fn strict_status(bs: &BlockStatus) -> (bool, bool, bool) {
    match bs.kind {
        BlockKind::Data | BlockKind::Compressed => (true, false, true),
        BlockKind::Zero => (true, true, false),
        BlockKind::Unallocated => (false, true, false),
    }
}

fn differ(offset: u64, reason: &str) -> CompareOutcome {
    CompareOutcome::Differ {
        offset: offset / SECTOR * SECTOR,
        reason: reason.to_string(),
    }
}

fn report(opts: &CompareOptions, done: u64, total: u64) {
    if let Some(cb) = &opts.progress {
        cb(Progress { done, total });
    }
}

/// Most threads comparing at once (two images are read, so this is up to twice as many reads in
/// flight).
const MAX_COMPARE_THREADS: usize = 4;

/// Windows queued per comparing thread.
const COMPARE_QUEUE: usize = 2;

/// One range to read and check.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// Both images hold data here: compare them.
    Both { pos: u64, len: u64 },
    /// Only this image (0 = `a`, 1 = `b`) may hold non-zero bytes here: it must read as zeroes.
    Zero { side: usize, pos: u64, len: u64 },
}

/// What the comparing threads share.
struct CompareState {
    /// The lowest mismatch found so far.
    first: Mutex<Option<(u64, &'static str)>>,
    /// Offset of the lowest mismatch, for a cheap check (u64::MAX while none).
    bound: AtomicU64,
    error: Mutex<Option<Error>>,
    stop: AtomicBool,
    /// Bytes checked or skipped; behind a lock so progress reports never go backwards.
    done: Mutex<u64>,
}

impl CompareState {
    fn found(&self, offset: u64, reason: &'static str) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none_or(|(o, _)| offset < o) {
            *first = Some((offset, reason));
            self.bound.fetch_min(offset, Ordering::SeqCst);
        }
    }

    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn progress(&self, opts: &CompareOptions, len: u64, total: u64) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *done += len;
        report(opts, *done, total);
    }
}

/// Compare two images.
///
/// The calling thread walks both images' block status (skipping ranges both read as zero, and in
/// strict mode stopping at the first allocation difference); up to 4 threads read and compare the
/// rest in 2 MiB pieces. The lowest difference found wins, so the answer is the same as a
/// sequential scan's. Memory: two 2 MiB buffers per thread.
pub fn compare(a: &Image, b: &Image, opts: &CompareOptions) -> Result<CompareOutcome> {
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if opts.strict && size_a != size_b {
        return Ok(differ(size_a.min(size_b), SIZE_MISMATCH));
    }
    let total = size_a.max(size_b);
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_COMPARE_THREADS);
    let state = CompareState {
        first: Mutex::new(None),
        bound: AtomicU64::new(u64::MAX),
        error: Mutex::new(None),
        stop: AtomicBool::new(false),
        done: Mutex::new(0),
    };
    let (tx, rx) = bounded::<Check>(threads * COMPARE_QUEUE);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (rx, state) = (rx.clone(), &state);
            s.spawn(move || {
                let chunk = usize::try_from(COMPARE_CHUNK).unwrap_or(usize::MAX);
                let mut bufs = [vec![0u8; chunk], vec![0u8; chunk]];
                for check in rx.iter() {
                    if state.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = run_check(a, b, check, &mut bufs, state) {
                        state.fail(e);
                        break;
                    }
                    let len = match check {
                        Check::Both { len, .. } | Check::Zero { len, .. } => len,
                    };
                    state.progress(opts, len, total);
                }
            });
        }
        drop(rx);
        if let Err(e) = plan_checks(a, b, opts, &state, tx, total) {
            state.fail(e);
        }
    });
    if let Some(e) = state.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(
        match state.first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some((offset, reason)) => differ(offset, reason),
            None => CompareOutcome::Identical,
        },
    )
}

/// Walk both images' status and queue what must be read. Stops early once a mismatch is known
/// below the current position.
fn plan_checks(
    a: &Image,
    b: &Image,
    opts: &CompareOptions,
    state: &CompareState,
    tx: Sender<Check>,
    total: u64,
) -> Result<()> {
    let common = a.virtual_size().min(b.virtual_size());
    let mut pos = 0u64;
    let send = |c: Check| tx.send(c).is_ok();
    while pos < common {
        if state.stop.load(Ordering::Relaxed) || state.bound.load(Ordering::SeqCst) <= pos {
            return Ok(());
        }
        let sa = status(a, pos, common - pos)?;
        let sb = status(b, pos, common - pos)?;
        let n = sa.len.min(sb.len);
        if opts.strict && strict_status(&sa) != strict_status(&sb) {
            state.found(pos, STATUS_MISMATCH);
            return Ok(());
        }
        let (za, zb) = (reads_zero(&sa), reads_zero(&sb));
        if za && zb {
            state.progress(opts, n, total);
        } else {
            for (p, len) in pieces(pos, n) {
                let c = match (za, zb) {
                    (false, false) => Check::Both { pos: p, len },
                    (true, _) => Check::Zero {
                        side: 1,
                        pos: p,
                        len,
                    },
                    (false, true) => Check::Zero {
                        side: 0,
                        pos: p,
                        len,
                    },
                };
                if state.bound.load(Ordering::SeqCst) <= p || !send(c) {
                    return Ok(());
                }
            }
        }
        pos += n;
    }
    // Not strict (sizes differ only then): the larger image's extra part must read as zeroes.
    let (larger, side) = if a.virtual_size() > b.virtual_size() {
        (a, 0)
    } else {
        (b, 1)
    };
    while pos < total {
        if state.stop.load(Ordering::Relaxed) || state.bound.load(Ordering::SeqCst) <= pos {
            return Ok(());
        }
        let st = status(larger, pos, total - pos)?;
        if reads_zero(&st) {
            state.progress(opts, st.len, total);
        } else {
            for (p, len) in pieces(pos, st.len) {
                if state.bound.load(Ordering::SeqCst) <= p
                    || !send(Check::Zero { side, pos: p, len })
                {
                    return Ok(());
                }
            }
        }
        pos += st.len;
    }
    Ok(())
}

/// Split `pos..pos + len` into pieces of at most [`COMPARE_CHUNK`] bytes.
fn pieces(pos: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = pos.saturating_add(len);
    (0..len.div_ceil(COMPARE_CHUNK)).map(move |i| {
        let p = pos + i * COMPARE_CHUNK;
        (p, COMPARE_CHUNK.min(end - p))
    })
}

/// Read and check one piece, recording a mismatch in `state`.
fn run_check(
    a: &Image,
    b: &Image,
    check: Check,
    bufs: &mut [Vec<u8>; 2],
    state: &CompareState,
) -> Result<()> {
    let (pos, len) = match check {
        Check::Both { pos, len } | Check::Zero { pos, len, .. } => (pos, len),
    };
    if state.bound.load(Ordering::SeqCst) <= pos {
        return Ok(());
    }
    let n = usize::try_from(len).map_err(|_| Error::limit("compare piece too large"))?;
    let [buf_a, buf_b] = bufs;
    let (buf_a, buf_b) = (&mut buf_a[..n], &mut buf_b[..n]);
    let at = match check {
        Check::Both { .. } => {
            a.read_at(buf_a, pos)?;
            b.read_at(buf_b, pos)?;
            buf_a.iter().zip(buf_b.iter()).position(|(x, y)| x != y)
        }
        Check::Zero { side, .. } => {
            let (img, buf) = if side == 0 { (a, buf_a) } else { (b, buf_b) };
            img.read_at(buf, pos)?;
            buf.iter().position(|&x| x != 0)
        }
    };
    if let Some(i) = at {
        state.found(pos + i as u64, CONTENT_MISMATCH);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vmi_disk::storage::MemStorage;
    use vmi_disk::{Format, Gate};

    fn mem_raw(bytes: Vec<u8>, name: &str) -> Image {
        Image::from_storage(
            Box::new(MemStorage::from_bytes(bytes)),
            Path::new(name),
            Some(Format::Raw),
            false,
            &Gate::new(),
        )
        .unwrap()
    }

    #[test]
    fn the_lowest_of_several_differences_is_reported() {
        let base: Vec<u8> = (0..9 * COMPARE_CHUNK as usize)
            .map(|i| (i % 241) as u8)
            .collect();
        for flips in [
            vec![7 * COMPARE_CHUNK + 3],
            vec![8 * COMPARE_CHUNK, 2 * COMPARE_CHUNK + 1000, 5],
        ] {
            let mut other = base.clone();
            for &f in &flips {
                other[f as usize] ^= 1;
            }
            let want = flips.iter().min().unwrap() / SECTOR * SECTOR;
            let got = compare(
                &mem_raw(base.clone(), "a"),
                &mem_raw(other, "b"),
                &CompareOptions::default(),
            )
            .unwrap();
            assert_eq!(got, differ(want, CONTENT_MISMATCH));
        }
    }

    #[test]
    fn a_read_error_is_returned() {
        let s = MemStorage::from_bytes(vec![1; 4 * COMPARE_CHUNK as usize]);
        s.fail(vmi_disk::storage::FailPoint::ReadAt(3 * COMPARE_CHUNK));
        let a = Image::from_storage(
            Box::new(s),
            Path::new("a"),
            Some(Format::Raw),
            false,
            &Gate::new(),
        )
        .unwrap();
        let b = mem_raw(vec![1; 4 * COMPARE_CHUNK as usize], "b");
        let e = compare(&a, &b, &CompareOptions::default()).unwrap_err();
        assert_eq!(e.path(), Some(Path::new("a")));
    }

    #[test]
    fn progress_reaches_the_larger_size() {
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s2 = std::sync::Arc::clone(&seen);
        let opts = CompareOptions {
            strict: false,
            progress: Some(std::sync::Arc::new(move |p: Progress| {
                s2.lock().unwrap().push(p)
            })),
        };
        let a = mem_raw(vec![3; 3 * COMPARE_CHUNK as usize], "a");
        let mut longer = vec![3; 3 * COMPARE_CHUNK as usize];
        longer.extend(vec![0; 1000]);
        let b = mem_raw(longer, "b");
        assert_eq!(compare(&a, &b, &opts).unwrap(), CompareOutcome::Identical);
        let seen = seen.lock().unwrap();
        assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
        assert_eq!(
            seen.last().map(|p| (p.done, p.total)),
            Some((b.virtual_size(), b.virtual_size()))
        );
    }
}
