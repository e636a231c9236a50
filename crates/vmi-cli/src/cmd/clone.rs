//! `vmi clone`: full clones (a flattened copy in any format) and linked clones (a thin qcow2
//! overlay over the source), each with a `DST.vmi.json` provenance sidecar that `vmi info` shows.

use crate::common::{self, parse_format};
use anyhow::bail;
use std::path::PathBuf;
use vmi_convert::{ConvertOptions, Target};
use vmi_disk::{BackingMode, CreateOptions, Format};

/// Clone SRC into DST.
///
/// A full clone reads SRC through its backing chain and writes a standalone image of format -O
/// (qcow2 by default). --linked creates a qcow2 overlay whose backing file is SRC: it takes the
/// same short time whatever SRC's size, and SRC must then stay where it is, unchanged. Both record
/// SRC's path and identity in DST.vmi.json.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// Output format of a full clone.
    #[arg(short = 'O', value_name = "FMT", default_value = "qcow2", value_parser = parse_format)]
    out_format: Format,
    /// Output format options of a full clone, `key=value,...`; may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Make a thin qcow2 overlay over SRC instead of a copy.
    #[arg(long)]
    linked: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Source image.
    #[arg(value_name = "SRC")]
    src: PathBuf,
    /// The clone.
    #[arg(value_name = "DST")]
    dst: PathBuf,
}

/// Run `vmi clone`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let _ = a.quiet;
    if a.linked {
        if !a.options.is_empty() {
            bail!("-o describes a full clone's output; a linked clone is always a plain qcow2 overlay");
        }
        vmi_convert::clone_linked(&a.src, a.format, &a.dst)?;
        return Ok(0);
    }
    let src = common::open(&a.src, a.format, gate.gate(true), BackingMode::Open, false)?;
    let dst = match a.dst.parent() {
        Some(d) if d.as_os_str().is_empty() => std::path::Path::new(".").join(&a.dst),
        _ => a.dst.clone(),
    };
    let target = Target {
        path: dst,
        format: a.out_format,
        create: CreateOptions {
            size: 0,
            backing: None,
            options: common::parse_options(&a.options)?,
        },
    };
    vmi_convert::clone_full(&src, &target, &ConvertOptions::default())?;
    Ok(0)
}
