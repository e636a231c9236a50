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

mod compare;
mod convert;
mod install;
mod map;
mod progress;

pub use compare::{
    compare, CompareOptions, CompareOutcome, CONTENT_MISMATCH, SIZE_MISMATCH, STATUS_MISMATCH,
};
pub use convert::{
    convert, in_flight_limit, write_mode, ConvertOptions, ConvertStats, WriteMode, CHUNK,
    MAX_WORKERS,
};
pub use install::{convert_to_path, Target};
pub use map::{map_entries, MapEntry};
pub use progress::{Progress, ProgressFn};
