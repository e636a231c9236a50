//! vmi-convert: the copy engine over image mappings — convert, compare, map, measure.
//!
//! Everything here walks [`vmi_disk::Image::block_status`] / mappings, so unallocated and zero
//! ranges are skipped without being read, for every format at once.
//!
//! API sketch (implemented in the modules below):
//! - [`convert`]: copy guest data from one open image to another, parallel, bounded memory.
//! - [`convert_to_path`]: create the destination under a temporary name, convert, rename.
//! - [`compare`]: qemu-img compare semantics.
//! - [`map_entries`]: qemu-img map's merged ranges.
//! - [`rebase`], [`commit`]: move data between the images of a backing chain.
//! - [`clone_full`], [`clone_linked`]: copies and thin overlays with a provenance sidecar.

mod clone;
mod commit;
mod compare;
mod convert;
mod install;
mod map;
mod outfile;
mod progress;
mod rebase;

pub use clone::{
    clone_full, clone_linked, read_provenance, sidecar_path, verify_source, Provenance,
    IDENTITY_SPAN,
};
pub use commit::{commit, CommitOptions, CommitOutcome};
pub use compare::{
    compare, CompareOptions, CompareOutcome, CONTENT_MISMATCH, SIZE_MISMATCH, STATUS_MISMATCH,
};
pub use convert::{
    convert, in_flight_limit, write_mode, ConvertOptions, ConvertStats, WriteMode, CHUNK,
    MAX_WORKERS,
};
pub use install::{convert_to_path, CacheMode, Target};
pub use map::{map_entries, MapEntry};
pub use progress::{Progress, ProgressFn};
pub use rebase::{rebase, RebaseOptions, RebaseStats};
