//! `vmi snapshot`: qemu-img snapshot — list, create, apply and delete qcow2 internal snapshots
//! (disk state only).

use crate::common::{self, parse_format};
use crate::outln;
use anyhow::bail;
use std::path::PathBuf;
use vmi_disk::formats::qcow2::snapshot;
use vmi_disk::{BackingMode, Format};

/// List, create, apply or delete internal snapshots of a qcow2 image.
///
/// Exactly one of -l, -c, -a, -d. Snapshots hold the disk state only (no VM state), like
/// qemu-img's. -a and -d take a snapshot's id or name.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when not given; only qcow2 has internal snapshots).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// List the snapshots.
    #[arg(short = 'l', group = "op")]
    list: bool,
    /// Create a snapshot named NAME.
    #[arg(short = 'c', value_name = "NAME", group = "op")]
    create: Option<String>,
    /// Revert the disk to snapshot NAME (id or name); the snapshot stays.
    #[arg(short = 'a', value_name = "NAME", group = "op")]
    apply: Option<String>,
    /// Delete snapshot NAME (id or name).
    #[arg(short = 'd', value_name = "NAME", group = "op")]
    delete: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility (vmi takes no image locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Run `vmi snapshot`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let _ = (a.force_share, a.quiet);
    let writable = !a.list;
    if !a.list && a.create.is_none() && a.apply.is_none() && a.delete.is_none() {
        bail!("one of -l, -c NAME, -a NAME, -d NAME is needed");
    }
    let img = common::open(
        &a.file,
        a.format,
        gate.gate(false),
        BackingMode::Skip,
        writable,
    )?;
    if a.list {
        let snaps = snapshot::list(&img);
        if !snaps.is_empty() {
            outln!("Snapshot list:")?;
            crate::cmd::info::print_snapshot_rows(&snaps)?;
        }
        return Ok(0);
    }
    if let Some(name) = &a.create {
        snapshot::create(&img, name)?;
    } else if let Some(name) = &a.apply {
        snapshot::apply(&img, name)?;
    } else if let Some(name) = &a.delete {
        snapshot::delete(&img, name)?;
    }
    img.close()?;
    Ok(0)
}
