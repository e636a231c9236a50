//! `vmi compare`: qemu-img compare — are two images' guest contents the same? Exit 0 identical,
//! 1 different, 2 error.

use crate::common::{self, parse_format};
use crate::outln;
use crate::progress::{ProgressArgs, Reporter};
use std::path::PathBuf;
use vmi_convert::{CompareOptions, CompareOutcome};
use vmi_disk::{BackingMode, Format};

/// Exit code when the images differ.
const EXIT_DIFFER: u8 = 1;

/// Compare the guest contents of two images, whatever their formats.
///
/// Without -s, images of different sizes are equal when the larger one's extra part reads as
/// zeroes. Exit codes: 0 identical, 1 different, 2 error. Images with backing files need
/// --allow-backing, since their contents include the backing chain.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the first image (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format_a: Option<Format>,
    /// Format of the second image (probed when not given).
    #[arg(short = 'F', value_name = "FMT", value_parser = parse_format)]
    format_b: Option<Format>,
    /// Strict: different sizes, or allocated versus unallocated, make images differ.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet: print nothing, report through the exit code.
    #[arg(short = 'q')]
    quiet: bool,
    /// Read without taking image locks (qemu-img's force-share): allows reading an image
    /// another process (a running QEMU) has open for writing, whose contents may be changing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// First image.
    #[arg(value_name = "FILE1")]
    a: PathBuf,
    /// Second image.
    #[arg(value_name = "FILE2")]
    b: PathBuf,
}

/// Run `vmi compare`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let open =
        |p: &PathBuf, f| common::open_ro(p, f, gate.gate(false), BackingMode::Open, a.force_share);
    let img_a = open(&a.a, a.format_a)?;
    let img_b = open(&a.b, a.format_b)?;
    let reporter = Reporter::new(a.progress.mode());
    let opts = CompareOptions {
        strict: a.strict,
        progress: reporter.as_ref().map(|r| r.callback()),
    };
    let outcome = vmi_convert::compare(&img_a, &img_b, &opts)?;
    let sizes_differ = img_a.virtual_size() != img_b.virtual_size();
    if let Some(r) = &reporter {
        r.finish(img_a.virtual_size().max(img_b.virtual_size()));
    }
    match outcome {
        CompareOutcome::Identical => {
            if !a.quiet {
                if sizes_differ {
                    outln!("Warning: Image size mismatch!")?;
                }
                outln!("Images are identical.")?;
            }
            Ok(0)
        }
        CompareOutcome::Differ { offset, reason } => {
            if !a.quiet {
                if reason.contains("size mismatch") {
                    let strict = if a.strict { "Strict mode: " } else { "" };
                    outln!("{strict}{reason}!")?;
                } else {
                    outln!("{reason} at offset {offset}!")?;
                }
            }
            Ok(EXIT_DIFFER)
        }
    }
}
