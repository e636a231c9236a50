//! `vmi rebase`: qemu-img rebase — point an overlay at another backing file, copying exactly the
//! clusters that differ between the old and the new backing (or, with -u, rewriting the header
//! only). `-b ""` flattens the overlay into a standalone image.

use crate::common::{self, parse_format};
use std::path::PathBuf;
use vmi_convert::RebaseOptions;
use vmi_disk::Format;

/// Change the backing file of an overlay.
///
/// Safe mode (default) keeps the guest contents: it reads the old chain and the new backing
/// wherever the overlay allocates nothing and copies the differing clusters into it first, so the
/// old chain must be readable (the image's folder is allowed by default; widen with
/// --allow-backing=DIR). -u rewrites the recorded name and format only. BACKING is recorded as
/// given and resolves relative to FILE's folder; an empty BACKING flattens.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// New backing file ("" for none).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: String,
    /// New backing file's format (probed when not given).
    #[arg(short = 'F', value_name = "FMT", value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Unsafe: rewrite the header only.
    #[arg(short = 'u')]
    header_only: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility (vmi takes no image locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The overlay.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Run `vmi rebase`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let _ = (a.force_share, a.quiet);
    vmi_convert::rebase(
        &a.file,
        &RebaseOptions {
            format: a.format,
            backing: Some(a.backing),
            backing_format: a.backing_format,
            header_only: a.header_only,
            gate: gate.gate(true),
        },
    )?;
    Ok(0)
}
