//! vmi-guest: what is inside an image, read and changed without booting it.
//!
//! - [`partition`]: MBR and GPT tables over any [`vmi_disk::Image`]; [`Volume`]: a byte range of
//!   an image.
//! - [`ext4`]: ext2/3/4 read and write through libext2fs (e2fsprogs), with the volume as its
//!   block device — in process, no loop device, no root. [`fat`]: FAT12/16/32 through fatfs.
//! - [`guest`]: which filesystem is where, and the operating system's root.
//! - [`inspect`] (with [`rpmdb`]), [`sysprep`], [`customize`], [`sparsify`], [`diff`]: the jobs of
//!   virt-inspector, virt-sysprep, virt-customize and virt-sparsify, offline.
//!
//! Everything read from a guest is hostile input: tables and filesystems are bounded and checked,
//! guest paths are resolved inside the guest filesystem only. See `docs/guest.md`.

pub mod customize;
pub mod diff;
pub mod error;
pub mod ext4;
pub mod fat;
pub mod guest;
pub mod inspect;
pub mod partition;
pub mod rpmdb;
pub mod sparsify;
pub mod sysprep;
pub mod volume;

pub use error::{Error, Result};
pub use partition::{read_table, Partition, PartitionTable, TableKind};
pub use volume::Volume;
