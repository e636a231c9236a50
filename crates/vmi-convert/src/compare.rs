//! qemu-img compare: are two images' guest contents the same?

use crate::progress::ProgressFn;
use vmi_disk::{Error, Image, Result};

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

/// Compare two images.
pub fn compare(_a: &Image, _b: &Image, _opts: &CompareOptions) -> Result<CompareOutcome> {
    Err(Error::unsupported("compare: not yet implemented"))
}
