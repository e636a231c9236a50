//! `vmi create`: qemu-img create — a new image, optionally an overlay over a backing file.

use crate::common::{self, parse_format, parse_size, wants_option_help};
use crate::outln;
use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use vmi_disk::{BackingMode, BackingSpec, CreateOptions, Format, Gate, Image};

/// Create a new image FILE of SIZE bytes (suffixes k, M, G, T, P, E are powers of 1024). An
/// existing file FILE is replaced, as qemu-img does.
///
/// With -b, the new image is an overlay whose unallocated ranges read from BACKING; the backing
/// file is opened (it was named by you, not by an image) to learn its format and, without SIZE,
/// its size; -u skips opening it. A relative BACKING is relative to FILE's folder, as qemu-img
/// records it.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the new image.
    #[arg(short = 'f', value_name = "FMT", default_value = "raw", value_parser = parse_format)]
    format: Format,
    /// Format options, `key=value,...` (`-o help` lists them); may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file of the new image.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (probed when not given, unless -u).
    #[arg(short = 'F', value_name = "FMT", value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Do not open the backing file ("unsafe"): SIZE must then be given.
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: do not print the "Formatting ..." line.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to create.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// Virtual size; defaults to the backing file's size.
    #[arg(value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
}

/// Run `vmi create`.
pub fn run(_gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    if wants_option_help(&a.options) {
        print_option_help(a.format)?;
        return Ok(0);
    }
    let Some(file) = a.file.as_deref() else {
        bail!("create: FILE is required (vmi create [-f FMT] FILE [SIZE])");
    };
    let mut opts = common::parse_options(&a.options)?;
    common::apply_key_file(&mut opts, a.format);
    let backing_name = a.backing.clone().or_else(|| opts.str("backing_file"));
    let mut backing_format = match (a.backing_format, opts.str("backing_fmt")) {
        (Some(f), _) => Some(f),
        (None, Some(s)) => Some(s.parse::<Format>()?),
        (None, None) => None,
    };
    let opt_size = opts.size("size")?;
    let mut size = a.size.or(opt_size);

    if let Some(name) = &backing_name {
        if a.unsafe_backing {
            if size.is_none() {
                bail!("with -u the backing file is not opened, so SIZE must be given");
            }
        } else {
            let bpath = backing_path(file, name);
            let img = common::open(
                &bpath,
                backing_format,
                Gate::new(),
                BackingMode::Skip,
                false,
            )
            .with_context(|| {
                format!(
                    "could not open backing file '{}' (-u creates the image without opening it)",
                    bpath.display()
                )
            })?;
            backing_format = Some(img.format());
            size.get_or_insert(img.virtual_size());
        }
    }
    let Some(size) = size else {
        bail!("create: SIZE is required when there is no backing file to take it from");
    };

    let create = CreateOptions {
        size,
        backing: backing_name.map(|name| BackingSpec {
            name,
            format: backing_format,
        }),
        options: opts,
    };
    let line = formatting_line(file, a.format, &create);
    if let Some(b) = &create.backing {
        let same = backing_path(file, &b.name)
            .canonicalize()
            .ok()
            .zip(file.canonicalize().ok())
            .is_some_and(|(x, y)| x == y);
        if same {
            bail!(
                "{}: an image cannot be its own backing file",
                file.display()
            );
        }
    }
    replace_existing(file)?;
    let img = Image::create(file, a.format, &create)?;
    img.close()?;
    if !a.quiet {
        outln!("{line}")?;
    }
    Ok(0)
}

/// qemu-img create overwrites an existing image: remove a regular file (or a symbolic link,
/// never what it points to) at FILE first. Anything else (a folder, a device) is left for the
/// create to refuse.
fn replace_existing(file: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(file) {
        Ok(m) if m.is_file() || m.file_type().is_symlink() => std::fs::remove_file(file)
            .with_context(|| format!("{}: removing the existing file", file.display())),
        _ => Ok(()),
    }
}

/// qemu-img's `Formatting 'FILE', fmt=... size=...` line, printed once the image exists.
fn formatting_line(file: &Path, format: Format, c: &CreateOptions) -> String {
    let mut line = format!("Formatting '{}', fmt={format}", file.display());
    for (k, v) in c.options.iter() {
        if !matches!(k, "size" | "backing_file" | "backing_fmt") {
            line.push_str(&format!(" {k}={v}"));
        }
    }
    line.push_str(&format!(" size={}", c.size));
    if let Some(b) = &c.backing {
        line.push_str(&format!(" backing_file={}", b.name));
        if let Some(f) = b.format {
            line.push_str(&format!(" backing_fmt={f}"));
        }
    }
    line
}

/// Where a backing name given to `create` points: relative names are relative to the new
/// image's folder, as the image will record them.
fn backing_path(file: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// One `-o` option for the help table: key, value type, description.
type OptionHelp = (&'static str, &'static str, &'static str);

/// The creation options of each format, with qemu-img's names. The driver decides what it
/// accepts: an option it does not support is reported when the image is created.
fn option_table(format: Format) -> &'static [OptionHelp] {
    const SIZE: OptionHelp = ("size", "size", "Virtual disk size");
    const BACKING_FILE: OptionHelp = ("backing_file", "str", "File name of a base image");
    const BACKING_FMT: OptionHelp = ("backing_fmt", "str", "Image format of the base image");
    match format {
        Format::Raw => &[
            SIZE,
            (
                "preallocation",
                "str",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
        ],
        Format::Qcow2 => &[
            SIZE,
            (
                "compat",
                "str",
                "qcow2 compatibility level (v2 [0.10] or v3 [1.1])",
            ),
            BACKING_FILE,
            BACKING_FMT,
            ("cluster_size", "size", "qcow2 cluster size"),
            (
                "preallocation",
                "str",
                "Preallocation mode (allowed values: off, metadata, falloc, full)",
            ),
            (
                "encrypt.format",
                "str",
                "Encrypt the image, format choices: 'luks'",
            ),
            (
                "encrypt.key-secret",
                "str",
                "ID of secret providing qcow2 LUKS passphrase",
            ),
            (
                "encrypt.cipher-alg",
                "str",
                "Name of encryption cipher algorithm",
            ),
            (
                "encrypt.cipher-mode",
                "str",
                "Name of encryption cipher mode",
            ),
            ("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
            (
                "encrypt.ivgen-hash-alg",
                "str",
                "Name of IV generator hash algorithm",
            ),
            (
                "encrypt.hash-alg",
                "str",
                "Name of encryption hash algorithm",
            ),
            (
                "encrypt.iter-time",
                "num",
                "Time to spend in PBKDF in milliseconds",
            ),
            (
                "lazy_refcounts",
                "bool (on/off)",
                "Postpone refcount updates",
            ),
            (
                "refcount_bits",
                "num",
                "Width of a reference count entry in bits",
            ),
            (
                "compression_type",
                "str",
                "Compression method used for image cluster compression (zlib, zstd)",
            ),
            ("extended_l2", "bool (on/off)", "Extended L2 tables"),
        ],
        Format::Vmdk => &[
            SIZE,
            BACKING_FILE,
            BACKING_FMT,
            (
                "adapter_type",
                "str",
                "Virtual adapter type (ide, buslogic, lsilogic, legacyESX)",
            ),
            ("hwversion", "str", "VMDK hardware version"),
            ("toolsversion", "str", "VMware guest tools version"),
            (
                "subformat",
                "str",
                "VMDK flat extent format (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, \
                 twoGbMaxExtentFlat, streamOptimized)",
            ),
            (
                "zeroed_grain",
                "bool (on/off)",
                "Enable efficient zero writes",
            ),
        ],
        Format::Vpc => &[
            SIZE,
            (
                "subformat",
                "str",
                "Type of virtual hard disk file (dynamic, fixed)",
            ),
            (
                "force_size",
                "bool (on/off)",
                "Force disk size calculation to use the actual size",
            ),
        ],
        Format::Vhdx => &[
            SIZE,
            ("log_size", "size", "Log size; min 1MB"),
            ("block_size", "size", "Block Size; min 1MB, max 256MB"),
            (
                "block_state_zero",
                "bool (on/off)",
                "Zero blocks on block state allocation",
            ),
            (
                "subformat",
                "str",
                "Type of virtual hard disk file (dynamic, fixed)",
            ),
        ],
        Format::Vdi => &[
            SIZE,
            (
                "static",
                "bool (on/off)",
                "VDI static (pre-allocated) image",
            ),
            (
                "preallocation",
                "str",
                "Preallocation mode (allowed values: off, metadata, falloc, full)",
            ),
        ],
        Format::Qed => &[
            SIZE,
            BACKING_FILE,
            BACKING_FMT,
            ("cluster_size", "size", "Cluster size (in bytes)"),
            ("table_size", "size", "L1/L2 table size (in clusters)"),
        ],
        Format::Parallels => &[
            SIZE,
            ("cluster_size", "size", "Parallels image cluster size"),
        ],
        Format::Luks => &[
            SIZE,
            (
                "key-secret",
                "str",
                "ID of secret providing LUKS passphrase",
            ),
            ("cipher-alg", "str", "Name of encryption cipher algorithm"),
            ("cipher-mode", "str", "Name of encryption cipher mode"),
            ("ivgen-alg", "str", "Name of IV generator algorithm"),
            (
                "ivgen-hash-alg",
                "str",
                "Name of IV generator hash algorithm",
            ),
            ("hash-alg", "str", "Name of encryption hash algorithm"),
            ("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
        ],
        Format::Iso | Format::Qcow | Format::Dmg | Format::Bochs | Format::Cloop => &[],
    }
}

fn print_option_help(format: Format) -> anyhow::Result<()> {
    if !format.can_create() {
        outln!("Format {format} does not support image creation.")?;
        return Ok(());
    }
    outln!("Supported {format} options:")?;
    for (key, kind, help) in option_table(format) {
        let key = format!("{key}=<{kind}>");
        outln!("  {key:<22} - {help}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names_resolve_beside_the_new_image() {
        assert_eq!(
            backing_path(Path::new("/d/top.qcow2"), "base.raw"),
            Path::new("/d/base.raw")
        );
        assert_eq!(
            backing_path(Path::new("top.qcow2"), "base.raw"),
            Path::new("base.raw")
        );
        assert_eq!(
            backing_path(Path::new("/d/top.qcow2"), "/e/base.raw"),
            Path::new("/e/base.raw")
        );
    }

    #[test]
    fn every_creatable_format_lists_size() {
        for f in vmi_disk::formats::ALL_FORMATS {
            if f.can_create() {
                assert!(option_table(f).iter().any(|o| o.0 == "size"), "{f}");
            }
        }
    }
}
