//! Conversion: copy guest data between images through their mappings (qemu-img convert).
//!
//! The engine has three stages joined by bounded channels:
//!
//! 1. a **planner** (the calling thread) walks [`Image::block_status`] over the source and cuts the
//!    guest space into windows of [`CHUNK`] bytes (a whole number of compressed units when
//!    compressing). A window that holds nothing to copy is never queued, so an empty terabyte costs
//!    a handful of mapping queries and no reads;
//! 2. **workers** read the data ranges of a window, find zero blocks at `min_sparse` granularity
//!    (raised to the target's cluster size, so no cluster is half written) and, when compressing,
//!    compress whole units;
//! 3. writes happen in one of three ways ([`WriteMode`]):
//!    - **direct**: each worker writes its window as soon as it is ready (out-of-order writes, `-W`,
//!      to a random-access target);
//!    - **turns**: each worker writes its window itself, but only when every earlier window has been
//!      written (in-order plain writes and `sequential_only` targets). The data is written by the
//!      core that just read it, while it is still in cache;
//!    - **writer**: workers compress and hand their windows to one writer thread that applies them
//!      in guest order through a reorder buffer (compressed output), so workers go on compressing
//!      instead of waiting for their turn.
//!
//! Memory is bounded whatever the image size. The job queue holds descriptions, not data. In direct
//! and turns mode only the `workers` windows being processed hold buffers: at most
//! `workers × chunk` bytes (16 MiB with the defaults: 8 workers, 2 MiB windows). In writer mode the
//! planner never runs more than [`in_flight_limit`] windows ahead of the writer, so at most
//! `in_flight_limit(workers) × chunk` bytes of guest data plus their compressed form are buffered
//! (52 MiB of guest data with the defaults).
//!
//! The first error from any thread stops every stage promptly and is returned.

use crate::install::CacheMode;
use crate::progress::{Progress, ProgressFn};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use vmi_disk::storage::is_zero;
use vmi_disk::{BlockKind, BlockStatus, CompressedWrite, Error, Image, Result};

/// Guest bytes per window: the unit of reading, zero detection and ordering. 2 MiB keeps syscalls
/// large and is a multiple of every qcow2/VMDK/VHDX allocation unit up to 2 MiB.
pub const CHUNK: u64 = 2 << 20;

/// Most worker threads honoured (qemu-img caps `-m` at 16 as well).
pub const MAX_WORKERS: usize = 16;

/// Default worker count cap: beyond 8 threads a copy is bound by the disks, not the CPU.
const DEFAULT_MAX_WORKERS: usize = 8;

/// Largest compressed unit the engine buffers (qcow2 clusters and VMDK grains are at most 2 MiB).
const MAX_UNIT: u64 = 16 << 20;

/// Windows queued for workers per worker.
const QUEUE_PER_WORKER: usize = 2;

/// How many windows the planner may be ahead of the writer thread in [`WriteMode::Writer`]: every
/// worker busy plus a full queue behind them. This is what bounds the reorder buffer.
pub fn in_flight_limit(workers: usize) -> u64 {
    (workers * (1 + QUEUE_PER_WORKER) + 2) as u64
}

/// Options for [`convert`] (qemu-img convert's flags).
#[derive(Clone, Default)]
pub struct ConvertOptions {
    /// Worker threads (`-m`); 0 picks a default for the machine.
    pub workers: usize,
    /// Compress the output (`-c`), for formats that support it.
    pub compress: bool,
    /// Zero-detection granularity (`-S`, default 4096); 0 disables detection (every byte written).
    pub min_sparse: u64,
    /// Allow out-of-order writes (`-W`) where the target format permits.
    pub out_of_order: bool,
    /// The target already exists and may hold data: write zeroes explicitly (`-n`).
    pub target_has_data: bool,
    /// Copy only what the top image allocates; leave the rest to the target's backing (`-B`).
    pub shallow: bool,
    /// How the output is made durable (`-t`); see [`CacheMode`]. [`convert`] itself never syncs:
    /// [`crate::convert_to_path`] applies the mode, and callers converting into an image they
    /// opened themselves apply it with [`CacheMode::apply`].
    pub cache: CacheMode,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
    /// Set from another thread (a signal handler) to stop the conversion: every stage stops at
    /// its next window and [`convert`] fails with an "interrupted" error, so
    /// [`crate::convert_to_path`] removes its temporary files.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for ConvertOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("workers", &self.workers)
            .field("compress", &self.compress)
            .field("min_sparse", &self.min_sparse)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl ConvertOptions {
    /// The worker count actually used: `workers`, or `min(available_parallelism, 8)` when 0, never
    /// more than [`MAX_WORKERS`].
    pub fn effective_workers(&self) -> usize {
        let n = if self.workers == 0 {
            std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(DEFAULT_MAX_WORKERS)
        } else {
            self.workers
        };
        n.clamp(1, MAX_WORKERS)
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Guest bytes written as data.
    pub data_bytes: u64,
    /// Guest bytes skipped or written as zero.
    pub zero_bytes: u64,
}

/// How windows reach the target (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Workers write as soon as a window is ready, in any order.
    Direct,
    /// Workers write their own windows, one after the other in guest order.
    Turns,
    /// One writer thread applies windows in guest order; workers only read and compress.
    Writer,
}

/// What the planner decided for one guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Read it and write what is not zero.
    Data,
    /// Reads as zero and the target must be told so (`write_zeroes`).
    Zero,
    /// Nothing to do: the fresh target already reads zero there, or (shallow) its backing answers.
    Skip,
}

/// A guest range of one class inside a window.
#[derive(Debug, Clone, Copy)]
struct Seg {
    start: u64,
    end: u64,
    class: Class,
}

/// One window of work.
#[derive(Debug)]
struct Job {
    seq: u64,
    start: u64,
    end: u64,
    segs: Vec<Seg>,
}

/// One write, produced by a worker.
#[derive(Debug)]
enum Op {
    /// Write `buf[at..at + len]` at guest `offset`.
    Write { offset: u64, at: usize, len: usize },
    /// Make a guest range read as zero.
    Zero { offset: u64, len: u64 },
    /// Store a compressed unit.
    Compressed { offset: u64, data: Vec<u8> },
}

/// A processed window on its way to the ordered writer.
#[derive(Debug)]
struct Batch {
    seq: u64,
    buf: Vec<u8>,
    ops: Vec<Op>,
    guest_len: u64,
    stats: ConvertStats,
}

/// Longest a stage waits on the condition variable before it looks at the stop and cancel flags
/// again: a cancellation set from outside (a signal handler) wakes nobody by itself.
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(50);

/// State every stage shares: the stop flag, the first error, flow control and progress.
struct Shared {
    stop: AtomicBool,
    error: Mutex<Option<Error>>,
    /// Windows written so far in guest order (turns and writer mode).
    written: Mutex<u64>,
    written_cv: Condvar,
    done: AtomicU64,
    reported: Mutex<u64>,
    total: u64,
    progress: Option<ProgressFn>,
    cancel: Option<Arc<AtomicBool>>,
    data_bytes: AtomicU64,
    zero_bytes: AtomicU64,
}

impl Shared {
    /// Record an error (the first one wins) and stop every stage.
    fn fail(&self, e: Error) {
        {
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        // Take the lock so a planner between its check and its wait cannot miss the wake-up.
        let _g = self.written.lock().unwrap_or_else(|p| p.into_inner());
        self.written_cv.notify_all();
    }

    /// Whether the conversion should stop: a stage failed, or the caller cancelled.
    ///
    /// Called with the `written` lock held (the wait loops), so it must not take that lock: a
    /// cancellation is recorded under the error lock only and waiters are woken without the lock.
    /// A waiter that checked just before the wake-up notices within [`WAIT_SLICE`].
    fn stopped(&self) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return true;
        }
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            {
                let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    *slot = Some(Error::new(
                        vmi_disk::ErrorKind::Io,
                        "interrupted: the conversion was cancelled",
                    ));
                }
            }
            self.stop.store(true, Ordering::SeqCst);
            self.written_cv.notify_all();
            return true;
        }
        false
    }

    fn account(&self, guest_len: u64, stats: ConvertStats) {
        self.data_bytes
            .fetch_add(stats.data_bytes, Ordering::Relaxed);
        self.zero_bytes
            .fetch_add(stats.zero_bytes, Ordering::Relaxed);
        let done = self.done.fetch_add(guest_len, Ordering::Relaxed) + guest_len;
        if let Some(cb) = &self.progress {
            // Report under a lock so the callback sees a non-decreasing count.
            let mut last = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            let now = self.done.load(Ordering::Relaxed).max(done);
            if now > *last {
                *last = now;
                cb(Progress {
                    done: now,
                    total: self.total,
                });
            }
        }
    }
}

/// Marks the conversion failed if the thread holding it unwinds, so no stage waits forever for a
/// window that will never come.
struct StopOnPanic<'a>(&'a Shared);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(Error::new(
                vmi_disk::ErrorKind::Io,
                "a conversion thread panicked",
            ));
        }
    }
}

/// Everything a worker needs that does not change during the conversion.
struct Plan<'a> {
    src: &'a Image,
    dst: &'a Image,
    size: u64,
    min_sparse: u64,
    /// Granularity of zero detection in data: `min_sparse`, raised to the target's cluster size so
    /// that no cluster is half written and half skipped (qemu-img aligns the same way).
    zero_block: u64,
    /// Write zeroes explicitly rather than skipping zero ranges.
    need_zero: bool,
    /// Copy only what the top image holds (`-B`).
    shallow: bool,
    /// Compressed output: the target's compressed writer.
    compressed: Option<&'a dyn CompressedWrite>,
    /// Write whole allocation units (compressed output, and sequential targets that have units):
    /// windows are unit-aligned and every unit is written once, whole, or not at all.
    unit: Option<u64>,
    mode: WriteMode,
    window: u64,
}

/// Copy all guest data of `src` into `dst` (same virtual size or larger).
///
/// The caller closes `dst` afterwards (which makes it durable); `convert` itself does not flush.
pub fn convert(src: &Image, dst: &Image, opts: &ConvertOptions) -> Result<ConvertStats> {
    let size = src.virtual_size();
    if dst.virtual_size() < size {
        return Err(Error::usage(format!(
            "the target ({} bytes) is smaller than the source ({size} bytes)",
            dst.virtual_size()
        ))
        .with_path(dst.path()));
    }
    let unit_writer = dst.driver().compressed_writer();
    if opts.compress && unit_writer.is_none() {
        return Err(Error::unsupported(format!(
            "{} images cannot be written compressed",
            dst.format()
        ))
        .with_path(dst.path()));
    }
    let compressed = unit_writer.filter(|_| compresses(dst, opts));
    // A sequential target must not see a unit twice (a zero block skipped inside a grain would
    // split it), so it is written in whole units too.
    let unit = match unit_writer {
        Some(cw) if opts.compress || dst.driver().sequential_only() => {
            let unit = cw.unit_size();
            if unit == 0 || unit > MAX_UNIT {
                return Err(Error::limit(format!(
                    "compressed unit of {unit} bytes (at most {MAX_UNIT} supported)"
                ))
                .with_path(dst.path()));
            }
            Some(unit)
        }
        _ => None,
    };
    let window = match unit {
        Some(unit) => CHUNK.div_ceil(unit) * unit,
        None => CHUNK,
    };
    let workers = opts.effective_workers();
    let plan = Plan {
        src,
        dst,
        size,
        min_sparse: opts.min_sparse,
        zero_block: zero_block(dst, opts.min_sparse),
        need_zero: opts.target_has_data || opts.shallow,
        shallow: opts.shallow,
        compressed,
        unit,
        mode: write_mode(dst, opts),
        window,
    };
    let shared = Shared {
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        written: Mutex::new(0),
        written_cv: Condvar::new(),
        done: AtomicU64::new(0),
        reported: Mutex::new(0),
        total: size,
        progress: opts.progress.clone(),
        cancel: opts.cancel.clone(),
        data_bytes: AtomicU64::new(0),
        zero_bytes: AtomicU64::new(0),
    };
    let (job_tx, job_rx) = bounded::<Job>(workers * QUEUE_PER_WORKER);
    let (batch_tx, batch_rx) = bounded::<Batch>(workers * QUEUE_PER_WORKER);
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(in_flight_limit(workers) as usize);

    std::thread::scope(|s| {
        for _ in 0..workers {
            let job_rx = job_rx.clone();
            let batch_tx = (plan.mode == WriteMode::Writer).then(|| batch_tx.clone());
            let (pool_tx, pool_rx) = (pool_tx.clone(), pool_rx.clone());
            let (plan, shared) = (&plan, &shared);
            s.spawn(move || {
                let _guard = StopOnPanic(shared);
                worker(plan, shared, &job_rx, batch_tx.as_ref(), &pool_tx, &pool_rx);
            });
        }
        drop(job_rx);
        drop(batch_tx);
        if plan.mode == WriteMode::Writer {
            let (plan, shared, pool_tx) = (&plan, &shared, pool_tx.clone());
            s.spawn(move || {
                let _guard = StopOnPanic(shared);
                writer(plan, shared, &batch_rx, &pool_tx);
            });
        } else {
            drop(batch_rx);
        }
        let _guard = StopOnPanic(&shared);
        if let Err(e) = planner(&plan, &shared, job_tx, workers) {
            shared.fail(e);
        }
    });

    if let Some(e) = shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(ConvertStats {
        data_bytes: shared.data_bytes.into_inner(),
        zero_bytes: shared.zero_bytes.into_inner(),
    })
}

/// Zero-detection granularity for `dst`: `min_sparse` (0 = off), at least the target's allocation
/// unit when it has a power-of-two one no larger than a window.
fn zero_block(dst: &Image, min_sparse: u64) -> u64 {
    if min_sparse == 0 {
        return 0;
    }
    match dst.driver().info().cluster_size {
        Some(c) if c.is_power_of_two() && c <= CHUNK => min_sparse.max(c),
        _ => min_sparse,
    }
}

/// Decide what to do with one block-status answer.
fn classify(plan: &Plan, bs: &BlockStatus) -> Result<Class> {
    if plan.shallow && bs.depth > 0 {
        return Ok(Class::Skip);
    }
    let unopened_backing =
        plan.src.driver().backing().is_some() && plan.src.backing_image().is_none();
    if bs.kind == BlockKind::Unallocated && bs.depth == 0 && unopened_backing && !plan.shallow {
        // Skipping would silently drop whatever the backing file holds there.
        return Err(Error::usage(format!(
            "guest range {}+{} comes from the backing file, which was not opened",
            bs.start, bs.len
        ))
        .with_path(plan.src.path()));
    }
    Ok(match bs.kind {
        BlockKind::Data | BlockKind::Compressed => Class::Data,
        // Shallow copy of an image whose backing was not opened: the target's backing answers.
        BlockKind::Unallocated if plan.shallow && plan.src.driver().backing().is_some() => {
            Class::Skip
        }
        // Detection off: the output is fully allocated, zeroes included (qemu-img -S 0).
        BlockKind::Zero | BlockKind::Unallocated if plan.min_sparse == 0 => Class::Data,
        BlockKind::Zero | BlockKind::Unallocated if plan.need_zero => Class::Zero,
        BlockKind::Zero | BlockKind::Unallocated => Class::Skip,
    })
}

/// Walk the source's block status and queue windows; returns when everything is queued, or early
/// when another stage failed (which recorded why). Dropping `job_tx` on return tells the workers
/// there is no more work.
fn planner(plan: &Plan, shared: &Shared, job_tx: Sender<Job>, workers: usize) -> Result<()> {
    let limit = in_flight_limit(workers);
    let mut seq = 0u64;
    // The last block-status answer (start, end, class): one answer often spans many windows.
    let mut cached: Option<(u64, u64, Class)> = None;
    let mut w = 0u64;
    while w < plan.size {
        if shared.stopped() {
            return Ok(());
        }
        let wend = w.saturating_add(plan.window).min(plan.size);
        let mut segs: Vec<Seg> = Vec::new();
        let mut p = w;
        let mut jump_to = None;
        while p < wend {
            let (_, e, class) = match cached {
                Some(c) if c.0 <= p && p < c.1 => c,
                _ => {
                    let bs = plan.src.block_status(p, plan.size - p)?;
                    let end = bs.start.checked_add(bs.len).ok_or_else(|| {
                        Error::invalid("block status range overflows").with_path(plan.src.path())
                    })?;
                    let c = (bs.start, end, classify(plan, &bs)?);
                    cached = Some(c);
                    c
                }
            };
            if p == w && class == Class::Skip && e >= wend {
                // Nothing to do for this window and maybe many more: jump to the last window
                // boundary inside the range (or the end).
                jump_to = Some(if e >= plan.size {
                    plan.size
                } else {
                    w + (e - w) / plan.window * plan.window
                });
                break;
            }
            let end = e.min(wend);
            match segs.last_mut() {
                Some(last) if last.class == class && last.end == p => last.end = end,
                _ => segs.push(Seg {
                    start: p,
                    end,
                    class,
                }),
            }
            p = end;
        }
        if let Some(next) = jump_to {
            shared.account(next - w, skipped(next - w));
            w = next;
            continue;
        }
        if segs.iter().all(|s| s.class == Class::Skip) {
            shared.account(wend - w, skipped(wend - w));
            w = wend;
            continue;
        }
        if plan.mode == WriteMode::Writer {
            let mut written = shared.written.lock().unwrap_or_else(|p| p.into_inner());
            while seq >= *written + limit && !shared.stopped() {
                written = shared
                    .written_cv
                    .wait_timeout(written, WAIT_SLICE)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let job = Job {
            seq,
            start: w,
            end: wend,
            segs,
        };
        if job_tx.send(job).is_err() {
            // Every worker is gone: one of them failed and said why.
            return Ok(());
        }
        seq += 1;
        w = wend;
    }
    Ok(())
}

fn skipped(len: u64) -> ConvertStats {
    ConvertStats {
        data_bytes: 0,
        zero_bytes: len,
    }
}

/// Which [`WriteMode`] a conversion into `dst` with `opts` uses.
pub fn write_mode(dst: &Image, opts: &ConvertOptions) -> WriteMode {
    if compresses(dst, opts) {
        WriteMode::Writer
    } else if dst.driver().sequential_only() || !opts.out_of_order {
        WriteMode::Turns
    } else {
        WriteMode::Direct
    }
}

/// Whether units are compressed by the workers: with `-c`, and always for a sequential target
/// that compresses everything it stores (VMDK streamOptimized), so its grains are deflated on
/// every worker rather than one at a time inside the driver.
fn compresses(dst: &Image, opts: &ConvertOptions) -> bool {
    opts.compress
        || (dst.driver().compresses_everything() && dst.driver().compressed_writer().is_some())
}

/// Wait until every window before `seq` is written; false when the conversion stopped instead.
fn wait_turn(shared: &Shared, seq: u64) -> bool {
    let mut written = shared.written.lock().unwrap_or_else(|p| p.into_inner());
    while *written != seq && !shared.stopped() {
        written = shared
            .written_cv
            .wait_timeout(written, WAIT_SLICE)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    drop(written);
    !shared.stopped()
}

/// Record that window `seq` is written and wake whoever holds the next one.
fn end_turn(shared: &Shared, seq: u64) {
    *shared.written.lock().unwrap_or_else(|p| p.into_inner()) = seq + 1;
    shared.written_cv.notify_all();
}

/// Take windows, read and prepare them, and write them (direct and turns mode) or pass them to the
/// writer thread.
fn worker(
    plan: &Plan,
    shared: &Shared,
    job_rx: &Receiver<Job>,
    batch_tx: Option<&Sender<Batch>>,
    pool_tx: &Sender<Vec<u8>>,
    pool_rx: &Receiver<Vec<u8>>,
) {
    for job in job_rx.iter() {
        if shared.stopped() {
            break;
        }
        let mut buf = pool_rx.try_recv().unwrap_or_default();
        let (ops, stats) = match prepare(plan, &job, &mut buf) {
            Ok(r) => r,
            Err(e) => {
                shared.fail(e);
                break;
            }
        };
        let guest_len = job.end - job.start;
        match batch_tx {
            Some(tx) => {
                let batch = Batch {
                    seq: job.seq,
                    buf,
                    ops,
                    guest_len,
                    stats,
                };
                if tx.send(batch).is_err() {
                    break;
                }
            }
            None => {
                if plan.mode == WriteMode::Turns && !wait_turn(shared, job.seq) {
                    break;
                }
                if let Err(e) = apply(plan, &buf, &ops) {
                    shared.fail(e);
                    break;
                }
                shared.account(guest_len, stats);
                if plan.mode == WriteMode::Turns {
                    end_turn(shared, job.seq);
                }
                let _ = pool_tx.try_send(buf);
            }
        }
    }
}

/// Apply finished windows in guest order (the reorder buffer holds at most
/// [`in_flight_limit`] windows because the planner waits for this thread).
fn writer(plan: &Plan, shared: &Shared, batch_rx: &Receiver<Batch>, pool_tx: &Sender<Vec<u8>>) {
    let mut pending: BTreeMap<u64, Batch> = BTreeMap::new();
    let mut next = 0u64;
    for batch in batch_rx.iter() {
        if shared.stopped() {
            return;
        }
        pending.insert(batch.seq, batch);
        while let Some(b) = pending.remove(&next) {
            if let Err(e) = apply(plan, &b.buf, &b.ops) {
                shared.fail(e);
                return;
            }
            shared.account(b.guest_len, b.stats);
            let _ = pool_tx.try_send(b.buf);
            end_turn(shared, next);
            next += 1;
        }
    }
}

/// Make `buf` exactly `len` bytes long, reusing its allocation.
fn sized(buf: &mut Vec<u8>, len: usize) {
    if buf.len() != len {
        buf.resize(len, 0);
    }
}

fn internal(what: &str) -> Error {
    Error::new(
        vmi_disk::ErrorKind::Io,
        format!("internal error: {what} out of range"),
    )
}

/// Read one window and turn it into writes.
fn prepare(plan: &Plan, job: &Job, buf: &mut Vec<u8>) -> Result<(Vec<Op>, ConvertStats)> {
    let mut ops = Vec::new();
    let mut stats = ConvertStats::default();
    let rel = |off: u64| usize::try_from(off - job.start).map_err(|_| internal("window offset"));
    match plan.unit {
        None => {
            if job.segs.iter().any(|s| s.class == Class::Data) {
                sized(buf, rel(job.end)?);
            }
            for seg in &job.segs {
                let len = seg.end - seg.start;
                match seg.class {
                    Class::Skip => stats.zero_bytes += len,
                    Class::Zero => push_zero(&mut ops, &mut stats, seg.start, len),
                    Class::Data => {
                        let (a, b) = (rel(seg.start)?, rel(seg.end)?);
                        let data = buf.get_mut(a..b).ok_or_else(|| internal("segment"))?;
                        plan.src.read_at(data, seg.start)?;
                        split_zeroes(plan, &mut ops, &mut stats, data, seg.start, a);
                    }
                }
            }
        }
        Some(unit) => {
            let unit_len = usize::try_from(unit).map_err(|_| internal("unit size"))?;
            sized(
                buf,
                usize::try_from(plan.window).map_err(|_| internal("window"))?,
            );
            let mut u = job.start;
            while u < job.end {
                let uend = u.saturating_add(unit).min(job.end);
                let (mut data, mut zero, mut skip) = (false, false, false);
                for s in job.segs.iter().filter(|s| s.start < uend && s.end > u) {
                    match s.class {
                        Class::Data => data = true,
                        Class::Zero => zero = true,
                        Class::Skip => skip = true,
                    }
                }
                let len = uend - u;
                if !data && !zero {
                    stats.zero_bytes += len;
                } else if !data && !skip {
                    push_zero(&mut ops, &mut stats, u, len);
                } else {
                    let a = rel(u)?;
                    let whole = buf
                        .get_mut(a..a + unit_len)
                        .ok_or_else(|| internal("unit"))?;
                    let n = usize::try_from(len).map_err(|_| internal("unit length"))?;
                    let (head, pad) = whole.split_at_mut(n);
                    plan.src.read_at(head, u)?;
                    // A short last unit is completed with zeroes: units are compressed whole.
                    pad.fill(0);
                    if plan.min_sparse > 0 && is_zero(head) {
                        if plan.need_zero {
                            push_zero(&mut ops, &mut stats, u, len);
                        } else {
                            stats.zero_bytes += len;
                        }
                    } else {
                        let packed = match plan.compressed {
                            Some(cw) => cw
                                .compress(whole)
                                .map_err(|e| e.with_path(plan.dst.path()))?,
                            None => None,
                        };
                        match packed {
                            Some(c) => {
                                ops.push(Op::Compressed { offset: u, data: c });
                                stats.data_bytes += len;
                            }
                            None => push_write(&mut ops, &mut stats, u, a, n),
                        }
                    }
                }
                u = uend;
            }
        }
    }
    Ok((ops, stats))
}

/// Queue a zero write, merging with the previous one when contiguous.
fn push_zero(ops: &mut Vec<Op>, stats: &mut ConvertStats, offset: u64, len: u64) {
    stats.zero_bytes += len;
    if let Some(Op::Zero { offset: o, len: l }) = ops.last_mut() {
        if *o + *l == offset {
            *l += len;
            return;
        }
    }
    ops.push(Op::Zero { offset, len });
}

/// Queue a data write, merging with the previous one when contiguous.
fn push_write(ops: &mut Vec<Op>, stats: &mut ConvertStats, offset: u64, at: usize, len: usize) {
    stats.data_bytes += len as u64;
    if let Some(Op::Write {
        offset: o, len: l, ..
    }) = ops.last_mut()
    {
        if *o + *l as u64 == offset {
            *l += len;
            return;
        }
    }
    ops.push(Op::Write { offset, at, len });
}

/// Turn data read at guest `offset` (held at `buf_at` in the window buffer) into writes, leaving
/// out (or zero-writing) blocks of `min_sparse` bytes, aligned in guest space, that are all zero.
fn split_zeroes(
    plan: &Plan,
    ops: &mut Vec<Op>,
    stats: &mut ConvertStats,
    data: &[u8],
    offset: u64,
    buf_at: usize,
) {
    if plan.zero_block == 0 {
        push_write(ops, stats, offset, buf_at, data.len());
        return;
    }
    let ms = plan.zero_block;
    let mut i = 0usize;
    while i < data.len() {
        let pos = offset + i as u64;
        let block_end = (pos - pos % ms).saturating_add(ms);
        let n = usize::try_from(block_end - pos)
            .unwrap_or(usize::MAX)
            .min(data.len() - i);
        let block = &data[i..i + n];
        if is_zero(block) {
            if plan.need_zero {
                push_zero(ops, stats, pos, n as u64);
            } else {
                stats.zero_bytes += n as u64;
            }
        } else {
            push_write(ops, stats, pos, buf_at + i, n);
        }
        i += n;
    }
}

/// Perform a window's writes on the target.
fn apply(plan: &Plan, buf: &[u8], ops: &[Op]) -> Result<()> {
    for op in ops {
        match op {
            Op::Write { offset, at, len } => {
                let data = buf.get(*at..*at + *len).ok_or_else(|| internal("write"))?;
                plan.dst.write_at(data, *offset)?;
            }
            Op::Zero { offset, len } => plan.dst.write_zeroes(*offset, *len)?,
            Op::Compressed { offset, data } => {
                let cw = plan.compressed.ok_or_else(|| internal("compressed op"))?;
                cw.write_compressed(*offset, data)
                    .map_err(|e| e.with_path(plan.dst.path()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
