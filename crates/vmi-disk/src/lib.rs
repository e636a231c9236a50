//! vmi-disk: virtual disk images.
//!
//! - [`storage`]: positional I/O over host files (and memory, for tests), sparse-aware.
//! - [`driver`]: the format driver model — drivers answer "what is at this guest offset?".
//! - [`Image`]: the access layer that turns mappings into reads and writes through backing chains.
//! - [`formats`]: one folder per format (raw, qcow2, vmdk, vhd, vhdx, vdi, iso).
//! - [`gate`]: the only way to open a file an image names (backing, data file, extent).
//!
//! Every image is untrusted input: see `docs/threat-model.md`.

pub mod check;
pub mod driver;
pub mod error;
pub mod formats;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod image;
mod inflate;
pub mod inspect;
pub mod options;
pub mod secret;
pub mod storage;

pub use check::{CheckMode, CheckReport};
pub use driver::{
    BackingSpec, CompressedWrite, Driver, FormatInfo, MapKind, Mapping, SnapshotInfo,
};
pub use error::{Error, ErrorKind, Result};
pub use formats::{Confidence, Format, Measurement};
pub use gate::{Gate, Referral};
pub use image::{
    probe, probe_matches, BackingMode, BlockKind, BlockStatus, Image, OpenOptions, Probe,
};
pub use options::{parse_size, CreateOptions, FormatOptions};
pub use secret::{Secret, Secrets};
