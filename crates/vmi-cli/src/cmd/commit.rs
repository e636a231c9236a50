//! `vmi commit`: qemu-img commit — merge an overlay into its backing file, or into an image
//! further down its chain (-b), and empty it unless -d.

use crate::common::{self, parse_format};
use crate::outln;
use std::path::PathBuf;
use vmi_convert::CommitOptions;
use vmi_disk::Format;

/// Write an overlay's changes into its backing file.
///
/// The overlay is emptied afterwards (qcow2) unless -d. With -b BASE, every image between FILE
/// and BASE is committed too and -d is implied, as with qemu-img. The chain is opened in FILE's
/// folder by default (widen with --allow-backing=DIR).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// Commit into this image of the chain instead of the direct backing file.
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<PathBuf>,
    /// Keep the overlay's contents (do not empty it).
    #[arg(short = 'd')]
    keep: bool,
    /// Quiet: do not print "Image committed.".
    #[arg(short = 'q')]
    quiet: bool,
    /// The overlay.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Run `vmi commit`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    vmi_convert::commit(
        &a.file,
        &CommitOptions {
            format: a.format,
            base: a.base,
            keep: a.keep,
            gate: gate.gate(true),
        },
    )?;
    if !a.quiet {
        outln!("Image committed.")?;
    }
    Ok(0)
}
