//! `vmi convert`: qemu-img convert — copy an image's guest data into a new image of any format,
//! skipping unallocated and zero ranges, through the copy engine.

use crate::common::{self, parse_format, parse_size};
use crate::progress::{ProgressArgs, Reporter};
use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use vmi_convert::{CacheMode, ConvertOptions, Target};
use vmi_disk::{BackingMode, BackingSpec, CreateOptions, Format, Gate};

/// Convert SRC into a new image DST of format -O (raw by default).
///
/// DST is written under a temporary name and renamed into place only when the copy succeeded.
/// Zero ranges of at least -S bytes are left unallocated. A source with a backing file is read
/// through its whole chain, which needs --allow-backing.
///
/// With -B, DST becomes an overlay over BACKING (relative to DST's folder). When BACKING is the
/// source's own backing file, only what the source's top image holds is copied (a shallow copy,
/// which does not read the backing file, so needs no --allow-backing); otherwise every guest range
/// is written, zeroes included, so DST reads the same as SRC whatever BACKING holds.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// Output format.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw", value_parser = parse_format)]
    out_format: Format,
    /// Output format options, `key=value,...`; may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output (qcow2, vmdk streamOptimized).
    #[arg(short = 'c')]
    compress: bool,
    /// Zero-detection granularity (default 4k, as qemu-img): zero runs at least this long are
    /// not written; 0 writes every byte.
    #[arg(short = 'S', value_name = "SIZE", value_parser = parse_size, default_value = "4k")]
    min_sparse: u64,
    /// DST already exists: write into it (with -O its format) instead of creating it.
    #[arg(short = 'n')]
    no_create: bool,
    /// Make DST an overlay over this backing file.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the -B backing file (probed when not given).
    #[arg(short = 'F', value_name = "FMT", value_parser = parse_format, requires = "backing")]
    backing_format: Option<Format>,
    /// Worker threads (default: chosen for the machine).
    #[arg(short = 'm', value_name = "N", default_value_t = 0)]
    workers: usize,
    /// Allow out-of-order writes where the output format permits.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Cache mode of the output: `writeback` (default: DST is fsynced before it is renamed into
    /// place, so a host crash leaves the old DST or the complete new one) or `unsafe` (no fsync,
    /// qemu-img convert's default: faster, but a host crash soon after may leave DST empty or
    /// partly written). `none`, `writethrough` and `directsync` are accepted and mean `writeback`.
    #[arg(short = 't', value_name = "CACHE", default_value = "writeback",
          value_parser = parse_cache)]
    cache: CacheMode,
    /// Quiet (accepted for qemu-img compatibility: convert prints nothing without -p anyway).
    #[arg(short = 'q')]
    quiet: bool,
    /// Read without taking image locks (qemu-img's force-share): allows reading an image
    /// another process (a running QEMU) has open for writing, whose contents may be changing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Convert this internal snapshot of SRC (qcow2) instead of its current state:
    /// `NAME`, `snapshot.name=NAME` or `snapshot.id=ID`.
    #[arg(short = 'l', long = "source-snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    #[command(flatten)]
    progress: ProgressArgs,
    /// Source image.
    #[arg(value_name = "SRC")]
    src: PathBuf,
    /// Destination image.
    #[arg(value_name = "DST")]
    dst: PathBuf,
}

/// Run `vmi convert`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let _ = a.quiet;
    // Open the top image alone first: a shallow copy (-B naming the source's own backing file)
    // never reads the backing chain, so it needs no --allow-backing.
    let top = common::open_ro(
        &a.src,
        a.format,
        gate.gate(false),
        BackingMode::Skip,
        a.force_share,
    )?;
    let shallow = match (&a.backing, top.driver().backing()) {
        (Some(b), Some(spec)) => same_file(&beside(&a.src, &spec.name), &beside(&a.dst, b)),
        _ => false,
    };
    let src = if shallow || top.driver().backing().is_none() {
        top
    } else {
        drop(top);
        common::open_ro(
            &a.src,
            a.format,
            gate.gate(false),
            BackingMode::Open,
            a.force_share,
        )?
    };
    if let Some(l) = &a.snapshot {
        let key = l
            .strip_prefix("snapshot.name=")
            .or_else(|| l.strip_prefix("snapshot.id="))
            .unwrap_or(l);
        vmi_disk::formats::qcow2::snapshot::view(&src, key)?;
    }
    let reporter = Reporter::new(a.progress.mode());
    let mut opts = ConvertOptions {
        workers: a.workers,
        compress: a.compress,
        min_sparse: a.min_sparse,
        out_of_order: a.out_of_order,
        cache: a.cache,
        target_has_data: false,
        shallow: false,
        progress: reporter.as_ref().map(|r| r.callback()),
        // Ctrl-C (or SIGTERM) stops the workers and removes the temporary output; a second one
        // kills the process at once.
        cancel: Some(common::cancel_on_signal()),
    };
    let what = || format!("converting {} to {}", a.src.display(), a.dst.display());

    if a.no_create {
        if !a.options.is_empty() || a.backing.is_some() {
            bail!("-o and -B describe a new image; they cannot be used with -n");
        }
        if same_file(&a.src, &a.dst) {
            bail!(
                "{}: -n would write into the image being read; convert into another file",
                a.dst.display()
            );
        }
        let dst = common::open(
            &a.dst,
            Some(a.out_format),
            Gate::new(),
            BackingMode::Skip,
            true,
        )?;
        opts.target_has_data = true;
        a.cache.apply(&dst);
        vmi_convert::convert(&src, &dst, &opts).with_context(what)?;
        dst.close()?;
    } else {
        // qemu-img refuses to create the output over an image it reads (the target's write
        // lock conflicts with the source's); the output would replace the source here.
        let mut layer = Some(&src);
        while let Some(l) = layer {
            if same_file(l.path(), &a.dst) {
                bail!(
                    "{}: Failed to get \"write\" lock: Is another process using the image [{}]? \
                     (it is read by this conversion)",
                    a.dst.display(),
                    a.dst.display()
                );
            }
            layer = l.backing_image();
        }
        let mut options = common::parse_options(&a.options)?;
        common::apply_key_file(&mut options, a.out_format);
        let backing = match &a.backing {
            None => None,
            Some(name) => {
                let bpath = beside(&a.dst, name);
                let bimg = common::open(
                    &bpath,
                    a.backing_format,
                    Gate::new(),
                    BackingMode::Skip,
                    false,
                )
                .with_context(|| format!("could not open -B backing file '{}'", bpath.display()))?;
                opts.shallow = shallow;
                // Not shallow: write every range, zeroes included, so nothing shows through.
                opts.target_has_data = !opts.shallow;
                Some(BackingSpec {
                    name: name.clone(),
                    format: Some(bimg.format()),
                })
            }
        };
        let target = Target {
            path: with_folder(&a.dst),
            format: a.out_format,
            create: CreateOptions {
                size: 0,
                backing,
                options,
            },
        };
        vmi_convert::convert_to_path(&src, &target, &opts).with_context(what)?;
    }
    if let Some(r) = &reporter {
        r.finish(src.virtual_size());
    }
    Ok(0)
}

/// `-t`: one of [`CacheMode::NAMES`].
fn parse_cache(s: &str) -> Result<CacheMode, String> {
    s.parse().map_err(|e: vmi_disk::Error| e.to_string())
}

/// A name recorded in `image` resolves relative to the image's folder.
fn beside(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    match image.parent() {
        Some(d) if !p.is_absolute() && !d.as_os_str().is_empty() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// `name` as `./name` when it has no folder part, so that code resolving names beside it gets a
/// folder to resolve in.
fn with_folder(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new(".").join(p),
        _ => p.to_path_buf(),
    }
}

/// Whether two paths name the same existing file (only resolves names; opens nothing).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize().ok(), b.canonicalize().ok()) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}
