//! `vmi resize`: qemu-img resize — change the virtual size to SIZE, or by +SIZE / -SIZE.
//! Shrinking deletes data past the new end, so it needs --shrink.

use crate::common::{self, parse_format};
use crate::outln;
use anyhow::{anyhow, bail};
use std::path::PathBuf;
use vmi_disk::{BackingMode, Format};

/// Change an image's virtual size: SIZE sets it, +SIZE grows by, -SIZE shrinks by.
///
/// Shrinking discards everything past the new end and is refused without --shrink.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// Quiet: do not print "Image resized.".
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(value_name = "[+-]SIZE", allow_hyphen_values = true)]
    size: String,
}

/// A requested size: absolute or relative to the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeChange {
    To(u64),
    Grow(u64),
    Shrink(u64),
}

fn parse_change(s: &str) -> anyhow::Result<SizeChange> {
    let parse = |v: &str| vmi_disk::parse_size(v).map_err(anyhow::Error::from);
    Ok(if let Some(rest) = s.strip_prefix('+') {
        SizeChange::Grow(parse(rest)?)
    } else if let Some(rest) = s.strip_prefix('-') {
        SizeChange::Shrink(parse(rest)?)
    } else {
        SizeChange::To(parse(s)?)
    })
}

fn new_size(current: u64, change: SizeChange) -> anyhow::Result<u64> {
    match change {
        SizeChange::To(n) => Ok(n),
        SizeChange::Grow(d) => current
            .checked_add(d)
            .ok_or_else(|| anyhow!("new size {current} + {d} is too large")),
        SizeChange::Shrink(d) => current
            .checked_sub(d)
            .ok_or_else(|| anyhow!("cannot shrink a {current}-byte image by {d} bytes")),
    }
}

/// Run `vmi resize`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let change = parse_change(&a.size)?;
    let img = common::open(&a.file, a.format, gate.gate(false), BackingMode::Skip, true)?;
    let current = img.virtual_size();
    let target = new_size(current, change)?;
    if target < current && !a.shrink {
        bail!(
            "{}: shrinking from {current} to {target} bytes deletes the data past the new end; \
             use the --shrink option to perform a shrink operation",
            a.file.display()
        );
    }
    if target != current {
        img.resize(target)?;
    }
    img.close()?;
    if !a.quiet {
        outln!("Image resized.")?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_sizes_apply_to_the_current_size() {
        assert_eq!(new_size(100, parse_change("+28").unwrap()).unwrap(), 128);
        assert_eq!(
            new_size(1 << 20, parse_change("-512k").unwrap()).unwrap(),
            1 << 19
        );
        assert_eq!(new_size(7, parse_change("1k").unwrap()).unwrap(), 1024);
    }

    #[test]
    fn shrinking_below_zero_is_an_error() {
        assert!(new_size(10, parse_change("-1k").unwrap()).is_err());
    }
}
