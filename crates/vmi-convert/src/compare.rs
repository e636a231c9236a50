//! qemu-img compare: are two images' guest contents the same?
//!
//! Semantics follow qemu-img compare: ranges that both images report as reading zero are skipped
//! without being read; everything else is read chunk by chunk and compared. The first difference is
//! reported at 512-byte sector granularity. Images of different sizes are equal when the extra part
//! of the larger one reads as zeroes, unless in strict mode, where a size difference or a
//! difference in allocation status is itself a mismatch.

use crate::progress::{Progress, ProgressFn};
use vmi_disk::{BlockKind, BlockStatus, Image, Result};

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

/// Compare two images.
pub fn compare(a: &Image, b: &Image, opts: &CompareOptions) -> Result<CompareOutcome> {
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if opts.strict && size_a != size_b {
        return Ok(differ(size_a.min(size_b), SIZE_MISMATCH));
    }
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let chunk = usize::try_from(COMPARE_CHUNK).unwrap_or(usize::MAX);
    let mut buf_a = vec![0u8; chunk];
    let mut buf_b = vec![0u8; chunk];
    let mut pos = 0u64;
    while pos < common {
        let sa = a.block_status(pos, common - pos)?;
        let sb = b.block_status(pos, common - pos)?;
        let n = sa.len.min(sb.len).min(COMPARE_CHUNK);
        if opts.strict && strict_status(&sa) != strict_status(&sb) {
            return Ok(differ(pos, STATUS_MISMATCH));
        }
        let len = usize::try_from(n).unwrap_or(chunk).min(chunk);
        match (reads_zero(&sa), reads_zero(&sb)) {
            (true, true) => {}
            (false, true) | (true, false) => {
                let (img, buf) = if reads_zero(&sa) {
                    (b, &mut buf_b)
                } else {
                    (a, &mut buf_a)
                };
                let data = &mut buf[..len];
                img.read_at(data, pos)?;
                if let Some(i) = data.iter().position(|&x| x != 0) {
                    return Ok(differ(pos + i as u64, CONTENT_MISMATCH));
                }
            }
            (false, false) => {
                a.read_at(&mut buf_a[..len], pos)?;
                b.read_at(&mut buf_b[..len], pos)?;
                if let Some(i) = buf_a[..len]
                    .iter()
                    .zip(&buf_b[..len])
                    .position(|(x, y)| x != y)
                {
                    return Ok(differ(pos + i as u64, CONTENT_MISMATCH));
                }
            }
        }
        pos += n;
        report(opts, pos, total);
    }
    // Not strict: the larger image's extra part must read as zeroes.
    let larger = if size_a > size_b { a } else { b };
    while pos < total {
        let s = larger.block_status(pos, total - pos)?;
        let n = s.len.min(COMPARE_CHUNK);
        if !reads_zero(&s) {
            let data = &mut buf_a[..usize::try_from(n).unwrap_or(chunk).min(chunk)];
            larger.read_at(data, pos)?;
            if let Some(i) = data.iter().position(|&x| x != 0) {
                return Ok(differ(pos + i as u64, CONTENT_MISMATCH));
            }
        }
        pos += n;
        report(opts, pos, total);
    }
    Ok(CompareOutcome::Identical)
}
