//! `vmi check`: qemu-img check — metadata consistency, with qemu-img's wording, JSON keys and exit
//! codes (0 clean, 1 check error, 2 corruptions, 3 leaks, 63 format has no checks).

use crate::common::{self, parse_format, OutputFormat};
use crate::outln;
use crate::progress::{ProgressArgs, Reporter};
use clap::ValueEnum;
use serde_json::{json, Value};
use std::path::PathBuf;
use vmi_disk::{BackingMode, CheckMode, CheckReport, ErrorKind, Format};

/// Exit code when the format has no consistency checks (qemu-img's value).
pub const EXIT_NO_CHECKS: u8 = 63;

/// What `-r` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Repair {
    /// Leaked clusters only (safe).
    Leaks,
    /// Leaks and corruptions.
    All,
}

/// Check an image's metadata; with -r, repair what was found.
///
/// Exit codes: 0 no problems, 1 the check could not complete (or the image could not be
/// opened), 2 corruptions, 3 only leaks, 63 the format does not support checks.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// Repair: `leaks` or `all` (opens the image for writing).
    #[arg(short = 'r', value_enum, value_name = "leaks|all")]
    repair: Option<Repair>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Quiet: print nothing, report through the exit code.
    #[arg(short = 'q')]
    quiet: bool,
    /// Read without taking image locks (qemu-img's force-share): allows reading an image
    /// another process (a running QEMU) has open for writing, whose contents may be changing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Run `vmi check`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let mode = match a.repair {
        None => CheckMode::ReadOnly,
        Some(Repair::Leaks) => CheckMode::RepairLeaks,
        Some(Repair::All) => CheckMode::RepairAll,
    };
    if a.force_share && a.repair.is_some() {
        anyhow::bail!("-U (force-share) can only be used with read-only images: not with -r");
    }
    let img = if a.repair.is_some() {
        common::open(&a.file, a.format, gate.gate(false), BackingMode::Skip, true)?
    } else {
        common::open_ro(
            &a.file,
            a.format,
            gate.gate(false),
            BackingMode::Skip,
            a.force_share,
        )?
    };
    let format = img.format();
    let reporter = Reporter::new(a.progress.mode());
    if let Some(r) = &reporter {
        r.update(vmi_convert::Progress { done: 0, total: 1 });
    }
    let report = match img.driver().check(mode) {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            if !a.quiet {
                eprintln!("vmi: This image format does not support checks");
            }
            return Ok(EXIT_NO_CHECKS);
        }
        Err(e) => return Err(e.with_path(img.path()).into()),
    };
    if let Some(r) = &reporter {
        r.finish(1);
    }
    if a.repair.is_some() {
        img.close()?;
    }
    if !a.quiet {
        for m in &report.messages {
            eprintln!("{m}");
        }
        match a.output {
            OutputFormat::Human => print_human(&report)?,
            OutputFormat::Json => {
                let mut v = serde_json::to_value(&report)?;
                if let Value::Object(o) = &mut v {
                    o.insert("filename".into(), json!(a.file.display().to_string()));
                    o.insert("format".into(), json!(format));
                }
                common::print_json(&v)?;
            }
        }
    }
    Ok(report.exit_code())
}

/// qemu-img check's human report.
fn print_human(c: &CheckReport) -> anyhow::Result<()> {
    if c.corruptions_fixed > 0 || c.leaks_fixed > 0 {
        outln!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            c.leaks_fixed,
            c.corruptions_fixed
        )?;
    }
    if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
        outln!("No errors were found on the image.")?;
    } else {
        if c.corruptions > 0 {
            outln!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                c.corruptions
            )?;
        }
        if c.leaks > 0 {
            outln!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                c.leaks
            )?;
        }
        if c.check_errors > 0 {
            outln!(
                "\n{} internal errors have occurred during the check.",
                c.check_errors
            )?;
        }
    }
    if let (Some(total), Some(alloc)) = (c.total_clusters, c.allocated_clusters) {
        if total > 0 && alloc > 0 {
            let pct = |n: u64| n as f64 * 100.0 / alloc as f64;
            outln!(
                "{alloc}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                alloc as f64 * 100.0 / total as f64,
                pct(c.fragmented_clusters.unwrap_or(0)),
                pct(c.compressed_clusters.unwrap_or(0))
            )?;
        }
    }
    if let Some(end) = c.image_end_offset.filter(|&e| e > 0) {
        outln!("Image end offset: {end}")?;
    }
    Ok(())
}
