//! A minimal `convert` front end over the engine, with qemu-img's option names, so the engine can
//! be benchmarked (bench/convert.sh) before or without the full `vmi` command line:
//!
//! `convert -f FMT -O FMT [-c] [-o OPTS] [-m N] [-W] [-S SIZE] [-t CACHE] SRC DST`

use std::path::PathBuf;
use std::process::ExitCode;
use vmi_convert::{convert_to_path, ConvertOptions, Target};
use vmi_disk::{parse_size, CreateOptions, Format, FormatOptions, Image, OpenOptions};

fn run() -> vmi_disk::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut src_fmt = None;
    let mut dst_fmt = Format::Raw;
    let mut fopts = FormatOptions::new();
    let mut opts = ConvertOptions {
        min_sparse: 4096,
        ..Default::default()
    };
    let mut paths = Vec::new();
    let usage = |m: &str| vmi_disk::Error::usage(m.to_string());
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "-f" => src_fmt = Some(value()?.parse::<Format>()?),
            "-O" => dst_fmt = value()?.parse()?,
            "-o" => fopts.parse(&value()?)?,
            "-m" => opts.workers = value()?.parse().map_err(|_| usage("-m needs a number"))?,
            "-S" => opts.min_sparse = parse_size(&value()?)?,
            "-t" => opts.cache = value()?.parse()?,
            "-c" => opts.compress = true,
            "-W" => opts.out_of_order = true,
            "-p" | "-q" => {}
            s if s.starts_with('-') => return Err(usage(&format!("unknown option {s}"))),
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let [src, dst] = <[PathBuf; 2]>::try_from(paths).map_err(|_| usage("need SRC and DST"))?;
    let src = Image::open(&src, &OpenOptions::new().format(src_fmt))?;
    let target = Target {
        path: dst,
        format: dst_fmt,
        create: CreateOptions {
            size: 0,
            backing: None,
            options: fopts,
        },
    };
    convert_to_path(&src, &target, &opts)?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("convert: {e}");
            ExitCode::FAILURE
        }
    }
}
