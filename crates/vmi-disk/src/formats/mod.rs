//! The format registry: one folder per format, each exposing `probe`, `open` and `create` (and
//! `measure` where qemu-img has it). Adding a format means a new folder and a few lines here.

pub mod bochs;
pub mod cloop;
pub mod dmg;
pub mod iso;
pub mod luks;
pub mod parallels;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::image::Image;
use crate::options::CreateOptions;
use crate::storage::Storage;
use serde::{Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// An image format, named as qemu-img names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk.
    Vmdk,
    /// Microsoft Virtual PC / Hyper-V VHD (qemu's `vpc`).
    Vpc,
    /// Hyper-V VHDX.
    Vhdx,
    /// VirtualBox disk image.
    Vdi,
    /// ISO 9660 / UDF optical image, read as raw.
    Iso,
    /// QEMU copy-on-write version 1 (qemu's `qcow`).
    Qcow,
    /// QEMU Enhanced Disk.
    Qed,
    /// Parallels disk image (v1 "WithoutFreeSpace", v2 "WithouFreSpacExt").
    Parallels,
    /// Apple disk image (UDIF, the `koly` trailer).
    Dmg,
    /// Bochs growing disk image.
    Bochs,
    /// Compressed loopback image (cloop).
    Cloop,
    /// LUKS encrypted volume (v1 and v2).
    Luks,
}

/// Every format, in probing order.
pub const ALL_FORMATS: [Format; 14] = [
    Format::Qcow2,
    Format::Qcow,
    Format::Qed,
    Format::Vmdk,
    Format::Vpc,
    Format::Vhdx,
    Format::Vdi,
    Format::Parallels,
    Format::Dmg,
    Format::Bochs,
    Format::Cloop,
    Format::Luks,
    Format::Iso,
    Format::Raw,
];

impl Format {
    /// qemu-img's name for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Iso => "iso",
            Format::Qcow => "qcow",
            Format::Qed => "qed",
            Format::Parallels => "parallels",
            Format::Dmg => "dmg",
            Format::Bochs => "bochs",
            Format::Cloop => "cloop",
            Format::Luks => "luks",
        }
    }

    /// Whether vmi can create images of this format (qemu-img creates all but these).
    pub fn can_create(self) -> bool {
        !matches!(
            self,
            Format::Iso | Format::Qcow | Format::Dmg | Format::Bochs | Format::Cloop
        )
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vpc" | "vhd" => Format::Vpc,
            "vhdx" => Format::Vhdx,
            "vdi" => Format::Vdi,
            "iso" => Format::Iso,
            "qcow" => Format::Qcow,
            "qed" => Format::Qed,
            "parallels" => Format::Parallels,
            "dmg" => Format::Dmg,
            "bochs" => Format::Bochs,
            "cloop" => Format::Cloop,
            "luks" => Format::Luks,
            _ => return Err(Error::usage(format!("unknown format '{s}'"))),
        })
    }
}

impl Serialize for Format {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Bytes probes see from the start of the file: 192 KiB, so that the VHDX probe sees both headers
/// (at 64 KiB and 128 KiB).
pub const PROBE_HEAD: usize = 192 * 1024;
/// Bytes probes see from the end of the file (a VHD footer).
pub const PROBE_TAIL: usize = 512;

/// What a probe looks at.
#[derive(Debug)]
pub struct ProbeInput<'a> {
    /// The first [`PROBE_HEAD`] bytes (fewer if the file is shorter).
    pub head: &'a [u8],
    /// The last [`PROBE_TAIL`] bytes (fewer if the file is shorter).
    pub tail: &'a [u8],
    /// File length.
    pub len: u64,
}

/// How sure a probe is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    /// Nothing matched: raw is the fallback.
    Fallback,
    /// A magic number matched but the header is not fully consistent.
    Weak,
    /// Magic and a consistent header (checksums, version, sizes).
    Certain,
}

/// Everything an opening driver may use.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// The image's path (for naming in errors and resolving referenced files).
    pub path: PathBuf,
    /// Open for writing.
    pub writable: bool,
    /// The policy for referenced files.
    pub gate: Gate,
    /// The passphrase of an encrypted image, when the caller has one.
    pub secret: Option<crate::secret::Secret>,
}

/// Everything a creating driver may use besides the options.
#[derive(Debug, Clone)]
pub struct CreateContext {
    /// Path of the image being created (multi-file formats create siblings of it).
    pub path: PathBuf,
}

/// qemu-img measure's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Measurement {
    /// Bytes the new image needs for the given data.
    pub required: u64,
    /// Bytes it would need fully allocated.
    pub fully_allocated: u64,
}

/// Run every format's probe.
pub fn probe_all(input: &ProbeInput) -> Vec<(Format, Confidence)> {
    let mut found = Vec::new();
    for f in ALL_FORMATS {
        let c = match f {
            Format::Raw => Some(Confidence::Fallback),
            Format::Qcow2 => qcow2::probe(input),
            Format::Vmdk => vmdk::probe(input),
            Format::Vpc => vhd::probe(input),
            Format::Vhdx => vhdx::probe(input),
            Format::Vdi => vdi::probe(input),
            Format::Iso => iso::probe(input),
            Format::Qcow => qcow::probe(input),
            Format::Qed => qed::probe(input),
            Format::Parallels => parallels::probe(input),
            Format::Dmg => dmg::probe(input),
            Format::Bochs => bochs::probe(input),
            Format::Cloop => cloop::probe(input),
            Format::Luks => luks::probe(input),
        };
        if let Some(c) = c {
            found.push((f, c));
        }
    }
    found
}

/// Open a driver of `format` over `storage`.
pub fn open_driver(
    format: Format,
    storage: Box<dyn Storage>,
    ctx: &OpenContext,
) -> Result<Box<dyn Driver>> {
    match format {
        Format::Raw => raw::open(storage, ctx, Format::Raw),
        Format::Iso => raw::open(storage, ctx, Format::Iso),
        Format::Qcow2 => qcow2::open(storage, ctx),
        Format::Vmdk => vmdk::open(storage, ctx),
        Format::Vpc => vhd::open(storage, ctx),
        Format::Vhdx => vhdx::open(storage, ctx),
        Format::Vdi => vdi::open(storage, ctx),
        Format::Qcow => qcow::open(storage, ctx),
        Format::Qed => qed::open(storage, ctx),
        Format::Parallels => parallels::open(storage, ctx),
        Format::Dmg => dmg::open(storage, ctx),
        Format::Bochs => bochs::open(storage, ctx),
        Format::Cloop => cloop::open(storage, ctx),
        Format::Luks => luks::open(storage, ctx),
    }
}

/// Create a new image of `format` on `storage` (empty, freshly created) and return it open for
/// writing.
pub fn create_driver(
    format: Format,
    storage: Box<dyn Storage>,
    ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    match format {
        Format::Raw => raw::create(storage, ctx, opts),
        Format::Qcow2 => qcow2::create(storage, ctx, opts),
        Format::Vmdk => vmdk::create(storage, ctx, opts),
        Format::Vpc => vhd::create(storage, ctx, opts),
        Format::Vhdx => vhdx::create(storage, ctx, opts),
        Format::Vdi => vdi::create(storage, ctx, opts),
        Format::Qed => qed::create(storage, ctx, opts),
        Format::Parallels => parallels::create(storage, ctx, opts),
        Format::Luks => luks::create(storage, ctx, opts),
        f @ (Format::Iso | Format::Qcow | Format::Dmg | Format::Bochs | Format::Cloop) => {
            Err(Error::unsupported(format!("creating {f} images")))
        }
    }
}

/// qemu-img measure: the size an image of `format` with `opts` needs, for `source` or for an empty
/// image of `opts.size`.
pub fn measure(
    format: Format,
    opts: &CreateOptions,
    source: Option<&Image>,
) -> Result<Measurement> {
    match format {
        Format::Raw => raw::measure(opts, source),
        Format::Qcow2 => qcow2::measure(opts, source),
        f => Err(Error::unsupported(format!("measuring {f} images"))),
    }
}

/// Paths of the files an image consists of besides `path` itself (VMDK extents), for renaming and
/// removal. Single-file formats return nothing.
pub fn companion_files(format: Format, path: &Path) -> Vec<PathBuf> {
    match format {
        Format::Vmdk => vmdk::companion_files(path),
        _ => Vec::new(),
    }
}
