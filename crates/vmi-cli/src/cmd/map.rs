//! `vmi map`: qemu-img map — how each guest range is stored: qemu-img's JSON list of merged
//! ranges, or its human table of the ranges that hold data.

use crate::common::{self, parse_format, OutputFormat};
use std::io::Write as _;
use std::path::PathBuf;
use vmi_disk::{BackingMode, Format};

/// Show how the image's guest ranges are stored.
///
/// JSON lists every range with `start`, `length`, `depth` (0 = this image, 1 its backing file…),
/// `present`, `zero`, `data`, `compressed` and the host `offset` where there is one. The human
/// table lists the ranges that hold data and where they are stored. Backing files are only
/// consulted with --allow-backing; otherwise ranges the image leaves to its backing file show as
/// not present at depth 0.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Read without taking image locks (qemu-img's force-share): allows reading an image
    /// another process (a running QEMU) has open for writing, whose contents may be changing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Run `vmi map`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let backing = if gate.allow_backing.is_some() {
        BackingMode::Open
    } else {
        BackingMode::Skip
    };
    let img = common::open_ro(&a.file, a.format, gate.gate(false), backing, a.force_share)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut io_result: std::io::Result<()> = Ok(());
    let mut first = true;
    let json = a.output == OutputFormat::Json;
    if !json {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )?;
    }
    let names = chain_names(&img);
    let result = vmi_convert::map_entries(&img, &mut |e| {
        let r = if json {
            let sep = if first { "[" } else { ",\n" };
            first = false;
            let line = format!(
                "{sep}{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}{}}}",
                e.start,
                e.length,
                e.depth,
                e.present,
                e.zero,
                e.data,
                e.compressed,
                e.offset.map(|o| format!(", \"offset\": {o}")).unwrap_or_default()
            );
            out.write_all(line.as_bytes())
        } else if let (true, Some(off)) = (e.data, e.offset) {
            let file = names.get(e.depth).map_or("", String::as_str);
            writeln!(
                out,
                "{:<16}{:<16}{:<16}{file}",
                hex(e.start),
                hex(e.length),
                hex(off)
            )
        } else {
            Ok(())
        };
        if let Err(err) = r {
            // Stop the walk: the reader went away or the disk is full.
            io_result = Err(err);
            return Err(vmi_disk::Error::usage("output closed"));
        }
        Ok(())
    });
    io_result?;
    result?;
    if json {
        if first {
            out.write_all(b"[")?;
        }
        out.write_all(b"]\n")?;
    }
    out.flush()?;
    Ok(0)
}

/// The file names of the opened chain, by depth.
fn chain_names(img: &vmi_disk::Image) -> Vec<String> {
    let mut names = vec![img.path().display().to_string()];
    let mut cur = img;
    while let Some(b) = cur.backing_image() {
        names.push(b.path().display().to_string());
        cur = b;
    }
    names
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
