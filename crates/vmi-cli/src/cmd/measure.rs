//! `vmi measure`: qemu-img measure — the file size a new image of a format needs, for an empty
//! image of a given size or for the data of an existing image.

use crate::common::{self, parse_format, parse_size, OutputFormat};
use crate::outln;
use anyhow::bail;
use std::path::PathBuf;
use vmi_disk::{BackingMode, CreateOptions, Format};

/// Compute the file size an image of -O FMT needs: for an empty image of --size bytes, or to
/// hold the data of FILE.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the image to measure for.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw", value_parser = parse_format)]
    out_format: Format,
    /// Creation options of the image to measure for, `key=value,...`.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure an empty image of this virtual size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "file")]
    size: Option<u64>,
    /// Format of FILE (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Read without taking image locks (qemu-img's force-share): allows reading an image
    /// another process (a running QEMU) has open for writing, whose contents may be changing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image whose data the new image must hold.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
}

/// Run `vmi measure`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let options = common::parse_options(&a.options)?;
    let source = match (&a.file, a.size) {
        (Some(f), None) => Some(common::open_ro(
            f,
            a.format,
            gate.gate(false),
            BackingMode::Open,
            a.force_share,
        )?),
        (None, Some(_)) => None,
        _ => bail!("measure: give either --size SIZE or an image FILE"),
    };
    let create = CreateOptions {
        size: a.size.unwrap_or(0),
        backing: None,
        options,
    };
    let m = vmi_disk::formats::measure(a.out_format, &create, source.as_ref())?;
    match a.output {
        OutputFormat::Human => {
            outln!("required size: {}", m.required)?;
            outln!("fully allocated size: {}", m.fully_allocated)?;
        }
        OutputFormat::Json => common::print_json(&m)?,
    }
    Ok(0)
}
