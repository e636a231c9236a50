//! Conversion: copy guest data between images through their mappings.

use crate::progress::ProgressFn;
use std::path::{Path, PathBuf};
use vmi_disk::{CreateOptions, Error, Format, Image, Result};

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

/// Copy all guest data of `src` into `dst` (same virtual size or larger).
pub fn convert(_src: &Image, _dst: &Image, _opts: &ConvertOptions) -> Result<ConvertStats> {
    Err(Error::unsupported("convert: not yet implemented"))
}

/// Create `target` under a temporary name beside it, convert `src` into it, and rename it into
/// place only when everything succeeded.
pub fn convert_to_path(
    _src: &Image,
    _target: &Target,
    _opts: &ConvertOptions,
) -> Result<ConvertStats> {
    let _ = Path::new("");
    Err(Error::unsupported("convert: not yet implemented"))
}
