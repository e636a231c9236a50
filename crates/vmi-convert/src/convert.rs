//! Conversion: copy guest data between images through their mappings (qemu-img convert).
//!
//! The engine has three stages joined by bounded channels:
//!
//! 1. a **planner** (the calling thread) walks [`Image::block_status`] over the source and cuts the
//!    guest space into windows of [`CHUNK`] bytes (a whole number of compressed units when
//!    compressing). A window that holds nothing to copy is never queued, so an empty terabyte costs
//!    a handful of mapping queries and no reads;
//! 2. **workers** read the data ranges of a window, find zero blocks at `min_sparse` granularity and,
//!    when compressing, compress whole units;
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

use crate::progress::{Progress, ProgressFn};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use vmi_disk::gate::Gate;
use vmi_disk::storage::is_zero;
use vmi_disk::{
    BlockKind, BlockStatus, CompressedWrite, CreateOptions, Error, Format, Image, OpenOptions,
    Result,
};

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
    /// Progress callback.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for ConvertOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("workers", &self.workers)
            .field("compress", &self.compress)
            .field("min_sparse", &self.min_sparse)
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

/// Where [`convert_to_path`] writes.
#[derive(Debug, Clone)]
pub struct Target {
    /// Final path.
    pub path: PathBuf,
    /// Output format.
    pub format: Format,
    /// Creation options (size is filled from the source when 0).
    pub create: CreateOptions,
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

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
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
    /// Write zeroes explicitly rather than skipping zero ranges.
    need_zero: bool,
    /// Copy only what the top image holds (`-B`).
    shallow: bool,
    /// Compressed output: the writer and its unit size.
    compressed: Option<(&'a dyn CompressedWrite, u64)>,
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
    let compressed = if opts.compress {
        let cw = dst.driver().compressed_writer().ok_or_else(|| {
            Error::unsupported(format!(
                "{} images cannot be written compressed",
                dst.format()
            ))
            .with_path(dst.path())
        })?;
        let unit = cw.unit_size();
        if unit == 0 || unit > MAX_UNIT {
            return Err(Error::limit(format!(
                "compressed unit of {unit} bytes (at most {MAX_UNIT} supported)"
            ))
            .with_path(dst.path()));
        }
        Some((cw, unit))
    } else {
        None
    };
    let window = match compressed {
        Some((_, unit)) => CHUNK.div_ceil(unit) * unit,
        None => CHUNK,
    };
    let workers = opts.effective_workers();
    let plan = Plan {
        src,
        dst,
        size,
        min_sparse: opts.min_sparse,
        need_zero: opts.target_has_data || opts.shallow,
        shallow: opts.shallow,
        compressed,
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

/// Decide what to do with one block-status answer.
fn classify(plan: &Plan, bs: &BlockStatus) -> Class {
    if plan.shallow && bs.depth > 0 {
        return Class::Skip;
    }
    match bs.kind {
        BlockKind::Data | BlockKind::Compressed => Class::Data,
        // Shallow copy of an image whose backing was not opened: the target's backing answers.
        BlockKind::Unallocated if plan.shallow && plan.src.driver().backing().is_some() => {
            Class::Skip
        }
        // Detection off: the output is fully allocated, zeroes included (qemu-img -S 0).
        BlockKind::Zero | BlockKind::Unallocated if plan.min_sparse == 0 => Class::Data,
        BlockKind::Zero | BlockKind::Unallocated if plan.need_zero => Class::Zero,
        BlockKind::Zero | BlockKind::Unallocated => Class::Skip,
    }
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
                    let c = (bs.start, end, classify(plan, &bs));
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
                    .wait(written)
                    .unwrap_or_else(|p| p.into_inner());
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
    if opts.compress {
        WriteMode::Writer
    } else if dst.driver().sequential_only() || !opts.out_of_order {
        WriteMode::Turns
    } else {
        WriteMode::Direct
    }
}

/// Wait until every window before `seq` is written; false when the conversion stopped instead.
fn wait_turn(shared: &Shared, seq: u64) -> bool {
    let mut written = shared.written.lock().unwrap_or_else(|p| p.into_inner());
    while *written != seq && !shared.stopped() {
        written = shared
            .written_cv
            .wait(written)
            .unwrap_or_else(|p| p.into_inner());
    }
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
    match plan.compressed {
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
        Some((cw, unit)) => {
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
                        match cw
                            .compress(whole)
                            .map_err(|e| e.with_path(plan.dst.path()))?
                        {
                            Some(c) => ops.push(Op::Compressed { offset: u, data: c }),
                            None => ops.push(Op::Write {
                                offset: u,
                                at: a,
                                len: n,
                            }),
                        }
                        stats.data_bytes += len;
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
    if plan.min_sparse == 0 {
        push_write(ops, stats, offset, buf_at, data.len());
        return;
    }
    let ms = plan.min_sparse;
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
                let (cw, _) = plan.compressed.ok_or_else(|| internal("compressed op"))?;
                cw.write_compressed(*offset, data)
                    .map_err(|e| e.with_path(plan.dst.path()))?;
            }
        }
    }
    Ok(())
}

/// Temporary files and folders of an unfinished [`convert_to_path`], removed on drop unless the
/// conversion completed (also when a panic unwinds through it).
#[derive(Default)]
struct TempGuard {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    done: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Counter that makes temporary names unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name `.NAME.vmi-tmp-<pid>-<n>` beside the destination that does not exist yet.
fn temp_name(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut s = std::ffi::OsString::from(".");
        s.push(name);
        s.push(format!(".vmi-tmp-{}-{n}", std::process::id()));
        let p = dir.join(s);
        if std::fs::symlink_metadata(&p).is_err() {
            return p;
        }
    }
}

/// Whether images of `format` may consist of several files that name each other by file name, so
/// they must be created under their final names (in a temporary folder).
fn multi_file(format: Format, path: &Path) -> bool {
    format == Format::Vmdk || !vmi_disk::formats::companion_files(format, path).is_empty()
}

fn fsync_path(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("syncing", e).with_path(p))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .map_err(|e| Error::io(format!("renaming {} into place", from.display()), e).with_path(to))
}

/// Open the backing file a new target records, so partial allocation units are completed from it.
/// The user named this file, so it may live anywhere; its own chain stays confined to its folder.
fn open_target_backing(target: &Path, name: &str, format: Option<Format>) -> Result<Image> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let guess = dir.join(name);
    let root = guess.parent().unwrap_or(dir).to_path_buf();
    let gate = Gate::new().allow_backing(true).confine_to(root);
    let path = gate.resolve(vmi_disk::Referral::Backing, target, name)?;
    Image::open(&path, &OpenOptions::new().format(format).gate(gate))
        .map_err(|e| e.context("opening the target's backing file"))
}

/// Create `target` under a temporary name beside it, convert `src` into it, and rename it into
/// place only when everything succeeded.
///
/// Single-file formats are created as `.NAME.vmi-tmp-<pid>-<n>` in the destination's folder.
/// Formats whose image is several files (VMDK extents named inside the descriptor) are created
/// under their final names in a temporary folder there; the companions are renamed into place
/// first and the main file last. Every file is fsynced before its rename and the folder after, so
/// a crash leaves either the old destination or the complete new one. On any error (or panic) the
/// temporary files are removed and the destination is untouched.
pub fn convert_to_path(
    src: &Image,
    target: &Target,
    opts: &ConvertOptions,
) -> Result<ConvertStats> {
    let path = &target.path;
    let name = path
        .file_name()
        .ok_or_else(|| Error::usage("the target path has no file name").with_path(path))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut create = target.create.clone();
    if create.size == 0 {
        create.size = src.virtual_size();
    }
    let mut guard = TempGuard::default();
    let multi = multi_file(target.format, path);
    let tmp_main = if multi {
        let d = temp_name(&dir, name);
        std::fs::create_dir(&d)
            .map_err(|e| Error::io("creating a temporary folder", e).with_path(&d))?;
        guard.dir = Some(d.clone());
        d.join(name)
    } else {
        let t = temp_name(&dir, name);
        guard.files.push(t.clone());
        t
    };

    let mut dst = Image::create(&tmp_main, target.format, &create)?;
    if let Some(spec) = &create.backing {
        let b = open_target_backing(path, &spec.name, spec.format)?;
        dst.set_backing(Some(b));
    }
    let stats = convert(src, &dst, opts)?;
    dst.close()?;

    if multi {
        let tmp_dir = guard
            .dir
            .clone()
            .ok_or_else(|| internal("temporary folder"))?;
        let mut companions = Vec::new();
        let entries = std::fs::read_dir(&tmp_dir)
            .map_err(|e| Error::io("listing the temporary folder", e).with_path(&tmp_dir))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| Error::io("listing the temporary folder", e).with_path(&tmp_dir))?;
            if entry.file_name() != name {
                companions.push(entry.path());
            }
        }
        companions.sort();
        for c in companions.iter().chain(std::iter::once(&tmp_main)) {
            fsync_path(c)?;
        }
        for c in &companions {
            let fname = c.file_name().ok_or_else(|| internal("companion name"))?;
            let final_path = dir.join(fname);
            rename(c, &final_path)?;
            // Until the main file is in place, a failure removes the companions as well.
            guard.files.push(final_path);
        }
        rename(&tmp_main, path)?;
    } else {
        fsync_path(&tmp_main)?;
        rename(&tmp_main, path)?;
    }
    guard.done = true;
    if let Some(d) = &guard.dir {
        let _ = std::fs::remove_dir(d);
    }
    fsync_path(&dir)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::any::Any;
    use std::sync::Arc;
    use vmi_disk::storage::{FailPoint, MemStorage, Storage};
    use vmi_disk::{Driver, MapKind, Mapping};

    const UNIT: u64 = 64 * 1024;

    /// How a test source lays out one 64 KiB unit.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum U {
        Data,
        Zero,
        Unalloc,
    }

    /// A source whose mapping is given unit by unit; data lives at its guest offset in `storage`.
    #[derive(Debug)]
    struct Layout {
        storage: MemStorage,
        units: Vec<U>,
        backing: Option<vmi_disk::BackingSpec>,
    }

    impl Driver for Layout {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.units.len() as u64 * UNIT
        }
        fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
            let i = (offset / UNIT) as usize;
            let kind = self.units[i];
            let mut end = (offset / UNIT + 1) * UNIT;
            while (end / UNIT) < self.units.len() as u64
                && self.units[(end / UNIT) as usize] == kind
            {
                end += UNIT;
            }
            Ok(Mapping {
                start: offset,
                len: (end - offset).min(len),
                kind: match kind {
                    U::Data => MapKind::Data { file: 0, offset },
                    U::Zero => MapKind::Zero,
                    U::Unalloc => MapKind::Unallocated,
                },
            })
        }
        fn file(&self, _index: usize) -> Result<&dyn Storage> {
            Ok(&self.storage)
        }
        fn backing(&self) -> Option<&vmi_disk::BackingSpec> {
            self.backing.as_ref()
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    /// A target that records every write, can insist on increasing order, and can take
    /// "compressed" units (stored verbatim, so the result is checkable).
    #[derive(Debug)]
    struct Recorder {
        storage: MemStorage,
        size: u64,
        sequential: bool,
        unit: Option<u64>,
        log: Mutex<Vec<(u64, u64, &'static str)>>,
    }

    impl Recorder {
        fn new(size: u64) -> Self {
            Recorder {
                storage: MemStorage::from_bytes(vec![0; size as usize]),
                size,
                sequential: false,
                unit: None,
                log: Mutex::new(Vec::new()),
            }
        }
        fn record(&self, offset: u64, len: u64, what: &'static str) -> Result<()> {
            let mut log = self.log.lock().unwrap();
            if self.sequential {
                if let Some(&(o, l, _)) = log.last() {
                    if offset < o + l {
                        return Err(Error::usage(format!(
                            "write at {offset} after write ending at {}",
                            o + l
                        )));
                    }
                }
            }
            log.push((offset, len, what));
            Ok(())
        }
    }

    impl Driver for Recorder {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
            Ok(Mapping {
                start: offset,
                len: len.min(self.size - offset),
                kind: MapKind::Data { file: 0, offset },
            })
        }
        fn file(&self, _index: usize) -> Result<&dyn Storage> {
            Ok(&self.storage)
        }
        fn is_writable(&self) -> bool {
            true
        }
        fn write_at(&self, buf: &[u8], offset: u64, _b: Option<&Image>) -> Result<()> {
            self.record(offset, buf.len() as u64, "data")?;
            self.storage
                .write_at(buf, offset)
                .map_err(|e| Error::io("w", e))
        }
        fn write_zeroes(&self, offset: u64, len: u64, _b: Option<&Image>) -> Result<()> {
            self.record(offset, len, "zero")?;
            self.storage
                .write_zeroes(offset, len)
                .map_err(|e| Error::io("z", e))
        }
        fn sequential_only(&self) -> bool {
            self.sequential
        }
        fn compressed_writer(&self) -> Option<&dyn CompressedWrite> {
            self.unit.map(|_| self as &dyn CompressedWrite)
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    impl CompressedWrite for Recorder {
        fn unit_size(&self) -> u64 {
            self.unit.unwrap_or(0)
        }
        fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
            assert_eq!(
                data.len() as u64,
                self.unit_size(),
                "units are compressed whole"
            );
            // Units starting with 0xff "do not compress" and are written plain.
            Ok((data[0] != 0xff).then(|| data.to_vec()))
        }
        fn write_compressed(&self, offset: u64, c: &[u8]) -> Result<()> {
            assert_eq!(offset % self.unit_size(), 0);
            self.record(offset, c.len() as u64, "compressed")?;
            let n = (c.len() as u64).min(self.size - offset) as usize;
            self.storage
                .write_at(&c[..n], offset)
                .map_err(|e| Error::io("c", e))
        }
    }

    /// Guest content for a layout: unit `i` of kind Data holds bytes derived from `i`.
    fn content(units: &[U]) -> Vec<u8> {
        let mut v = vec![0u8; units.len() * UNIT as usize];
        for (i, u) in units.iter().enumerate() {
            if *u == U::Data {
                for (j, b) in v[i * UNIT as usize..(i + 1) * UNIT as usize]
                    .iter_mut()
                    .enumerate()
                {
                    *b = (i * 7 + j / 4096 + 1) as u8;
                }
            }
        }
        v
    }

    fn source(units: &[U]) -> Image {
        let storage = MemStorage::from_bytes(content(units));
        source_over(storage, units)
    }

    fn source_over(storage: MemStorage, units: &[U]) -> Image {
        let d = Layout {
            storage,
            units: units.to_vec(),
            backing: None,
        };
        Image::from_driver(Box::new(d), Path::new("src.img"))
    }

    fn recorder(rec: Recorder) -> Image {
        Image::from_driver(Box::new(rec), Path::new("dst.img"))
    }

    fn rec(img: &Image) -> &Recorder {
        img.driver().as_any().downcast_ref::<Recorder>().unwrap()
    }

    fn opts(workers: usize, out_of_order: bool) -> ConvertOptions {
        ConvertOptions {
            workers,
            min_sparse: 4096,
            out_of_order,
            ..Default::default()
        }
    }

    fn mixed_units(n: usize) -> Vec<U> {
        (0..n)
            .map(|i| match i % 5 {
                0 | 3 => U::Data,
                1 => U::Zero,
                _ => U::Unalloc,
            })
            .collect()
    }

    #[test]
    fn every_worker_count_and_ordering_produces_the_source_content() {
        let units = mixed_units(97);
        for workers in [1, 2, 8] {
            for ooo in [false, true] {
                let src = source(&units);
                let dst = recorder(Recorder::new(src.virtual_size()));
                convert(&src, &dst, &opts(workers, ooo)).unwrap();
                assert_eq!(
                    rec(&dst).storage.to_vec(),
                    content(&units),
                    "{workers} {ooo}"
                );
            }
        }
    }

    #[test]
    fn zero_and_unallocated_ranges_are_neither_read_nor_written() {
        let units = [U::Zero, U::Unalloc, U::Data, U::Zero];
        let storage = MemStorage::from_bytes(content(&units));
        // Reading anything but unit 2 would fail.
        storage.fail(FailPoint::ReadAt(10));
        storage.fail(FailPoint::ReadAt(UNIT + 10));
        storage.fail(FailPoint::ReadAt(3 * UNIT + 10));
        let src = source_over(storage, &units);
        let dst = recorder(Recorder::new(src.virtual_size()));
        let stats = convert(&src, &dst, &opts(2, false)).unwrap();
        assert_eq!(
            *rec(&dst).log.lock().unwrap(),
            vec![(2 * UNIT, UNIT, "data")]
        );
        assert_eq!(
            stats,
            ConvertStats {
                data_bytes: UNIT,
                zero_bytes: 3 * UNIT
            }
        );
    }

    #[test]
    fn a_target_with_data_gets_explicit_zeroes() {
        let units = [U::Data, U::Zero, U::Unalloc, U::Data];
        let src = source(&units);
        let dst = recorder(Recorder::new(src.virtual_size()));
        rec(&dst)
            .storage
            .write_at(&[0xee; 4 * UNIT as usize], 0)
            .unwrap();
        let o = ConvertOptions {
            target_has_data: true,
            ..opts(2, false)
        };
        convert(&src, &dst, &o).unwrap();
        assert_eq!(rec(&dst).storage.to_vec(), content(&units));
        assert!(rec(&dst)
            .log
            .lock()
            .unwrap()
            .contains(&(UNIT, 2 * UNIT, "zero")));
    }

    #[test]
    fn zero_blocks_inside_data_are_skipped_at_min_sparse_granularity() {
        let units = [U::Data; 2];
        let mut bytes = content(&units);
        bytes[4096..3 * 4096].fill(0);
        let src = source_over(MemStorage::from_bytes(bytes.clone()), &units);
        let dst = recorder(Recorder::new(src.virtual_size()));
        let stats = convert(&src, &dst, &opts(1, false)).unwrap();
        assert_eq!(stats.zero_bytes, 2 * 4096);
        assert_eq!(
            *rec(&dst).log.lock().unwrap(),
            vec![(0, 4096, "data"), (3 * 4096, 2 * UNIT - 3 * 4096, "data")]
        );
        assert_eq!(rec(&dst).storage.to_vec(), bytes);
    }

    #[test]
    fn min_sparse_zero_writes_every_byte() {
        let units = [U::Data, U::Zero, U::Unalloc];
        let src = source(&units);
        let dst = recorder(Recorder::new(src.virtual_size()));
        let o = ConvertOptions {
            min_sparse: 0,
            ..opts(1, false)
        };
        let stats = convert(&src, &dst, &o).unwrap();
        assert_eq!(stats.data_bytes, 3 * UNIT);
        assert_eq!(*rec(&dst).log.lock().unwrap(), vec![(0, 3 * UNIT, "data")]);
    }

    #[test]
    fn a_sequential_target_sees_increasing_offsets_with_many_workers() {
        let units = mixed_units(300);
        let src = source(&units);
        let mut r = Recorder::new(src.virtual_size());
        r.sequential = true;
        let dst = recorder(r);
        // out_of_order is ignored for a sequential-only target.
        convert(&src, &dst, &opts(8, true)).unwrap();
        assert_eq!(rec(&dst).storage.to_vec(), content(&units));
    }

    #[test]
    fn compressed_output_is_written_whole_units_in_order() {
        let mut units = mixed_units(70);
        units[40] = U::Data;
        let mut bytes = content(&units);
        bytes[40 * UNIT as usize] = 0xff; // this unit "does not compress"
        let src = source_over(MemStorage::from_bytes(bytes.clone()), &units);
        let mut r = Recorder::new(src.virtual_size());
        r.sequential = true;
        r.unit = Some(UNIT);
        let dst = recorder(r);
        let o = ConvertOptions {
            compress: true,
            ..opts(4, true)
        };
        convert(&src, &dst, &o).unwrap();
        assert_eq!(rec(&dst).storage.to_vec(), bytes);
        let log = rec(&dst).log.lock().unwrap();
        assert!(log.contains(&(40 * UNIT, UNIT, "data")));
        assert!(log
            .iter()
            .filter(|l| l.2 == "compressed")
            .all(|l| l.0 % UNIT == 0 && l.1 == UNIT));
    }

    #[test]
    fn a_partial_last_unit_is_padded_with_zeroes_for_compression() {
        // A 100 KiB image with 64 KiB units: the second unit has 36 KiB of guest data.
        let size = 100 * 1024;
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251 + 1) as u8).collect();
        let s = MemStorage::from_bytes(bytes.clone());
        let src = Image::from_storage(
            Box::new(s),
            Path::new("src.raw"),
            Some(Format::Raw),
            false,
            &Gate::new(),
        )
        .unwrap();
        let mut r = Recorder::new(size as u64);
        r.unit = Some(UNIT);
        let dst = recorder(r);
        let o = ConvertOptions {
            compress: true,
            ..opts(2, false)
        };
        convert(&src, &dst, &o).unwrap();
        assert_eq!(rec(&dst).storage.to_vec(), bytes);
    }

    #[test]
    fn compressing_into_a_format_without_compression_is_refused() {
        let src = source(&[U::Data]);
        let dst = recorder(Recorder::new(UNIT));
        let o = ConvertOptions {
            compress: true,
            ..opts(1, false)
        };
        let e = convert(&src, &dst, &o).unwrap_err();
        assert_eq!(e.kind(), vmi_disk::ErrorKind::Unsupported);
    }

    #[test]
    fn shallow_copies_the_top_layer_only_and_zeroes_what_it_zeroes() {
        let top_units = [U::Unalloc, U::Data, U::Zero, U::Unalloc];
        let mut src = source(&top_units);
        let base = source(&[U::Data; 4]);
        src.set_backing(Some(base));
        let dst = recorder(Recorder::new(src.virtual_size()));
        let o = ConvertOptions {
            shallow: true,
            ..opts(2, false)
        };
        convert(&src, &dst, &o).unwrap();
        assert_eq!(
            *rec(&dst).log.lock().unwrap(),
            vec![(UNIT, UNIT, "data"), (2 * UNIT, UNIT, "zero")]
        );
    }

    #[test]
    fn a_read_error_mid_way_stops_the_conversion_and_names_the_source() {
        let units = vec![U::Data; 200];
        let storage = MemStorage::from_bytes(content(&units));
        storage.fail(FailPoint::ReadAt(100 * UNIT + 5));
        let src = source_over(storage, &units);
        for workers in [1, 4] {
            for ooo in [false, true] {
                let dst = recorder(Recorder::new(src.virtual_size()));
                let e = convert(&src, &dst, &opts(workers, ooo)).unwrap_err();
                assert_eq!(e.path(), Some(Path::new("src.img")), "{e}");
                // Nothing far beyond the failure point was planned and written.
                let log = rec(&dst).log.lock().unwrap();
                let limit = 100 * UNIT + in_flight_limit(workers) * CHUNK;
                assert!(log.iter().all(|l| l.0 < limit), "{workers} {ooo}");
            }
        }
    }

    #[test]
    fn a_write_error_is_returned_with_the_target_name() {
        let units = vec![U::Data; 100];
        let src = source(&units);
        let storage = MemStorage::new();
        storage.fail(FailPoint::WriteAt(50 * UNIT));
        let dst = Image::create_on(
            Box::new(storage),
            Path::new("out.raw"),
            Format::Raw,
            &CreateOptions::new(src.virtual_size()),
        )
        .unwrap();
        for ooo in [false, true] {
            let e = convert(&src, &dst, &opts(3, ooo)).unwrap_err();
            assert_eq!(e.path(), Some(Path::new("out.raw")), "{e}");
        }
    }

    #[test]
    fn a_smaller_target_is_refused() {
        let src = source(&[U::Data, U::Data]);
        let dst = recorder(Recorder::new(UNIT));
        let e = convert(&src, &dst, &opts(1, false)).unwrap_err();
        assert_eq!(e.kind(), vmi_disk::ErrorKind::Usage);
    }

    #[test]
    fn progress_is_monotonic_and_reaches_the_total() {
        let units = mixed_units(200);
        let src = source(&units);
        let dst = recorder(Recorder::new(src.virtual_size()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        let o = ConvertOptions {
            progress: Some(Arc::new(move |p: Progress| s2.lock().unwrap().push(p))),
            ..opts(4, true)
        };
        convert(&src, &dst, &o).unwrap();
        let seen = seen.lock().unwrap();
        assert!(seen.windows(2).all(|w| w[0].done < w[1].done));
        assert_eq!(seen.last().map(|p| p.done), Some(src.virtual_size()));
    }

    #[test]
    fn an_empty_terabyte_needs_no_windows() {
        let storage = MemStorage::new();
        let src = Image::from_driver(
            Box::new(Layout {
                storage,
                units: vec![U::Unalloc; 1 << 24],
                backing: None,
            }),
            Path::new("big"),
        );
        // The recorder's storage stays empty: nothing is written.
        let dst = recorder(Recorder {
            storage: MemStorage::new(),
            size: src.virtual_size(),
            sequential: false,
            unit: None,
            log: Mutex::new(Vec::new()),
        });
        let stats = convert(&src, &dst, &opts(2, false)).unwrap();
        assert_eq!(stats.zero_bytes, 1 << 40);
        assert!(rec(&dst).log.lock().unwrap().is_empty());
    }
}
