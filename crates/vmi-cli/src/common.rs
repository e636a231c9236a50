//! Pieces every command shares: the gate flags, opening images, output formats, qemu-img's
//! human-readable sizes, and writing to stdout so that a closed pipe ends the command quietly.

use anyhow::Context as _;
use clap::ValueEnum;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use vmi_disk::{BackingMode, Format, FormatOptions, Gate, Image, OpenOptions, Secret, Secrets};

/// Flags that decide which files named inside an image may be opened.
#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    /// Follow backing files named inside images, confined to DIR (default: the folder of the
    /// image given on the command line). Without it backing files are never opened.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        num_args = 0..=1,
        require_equals = true
    )]
    pub allow_backing: Option<Option<PathBuf>>,

    /// Open external data files named inside images (qcow2 data_file), confined like backing files.
    #[arg(long, global = true)]
    pub allow_data_file: bool,
}

impl GateArgs {
    /// The gate these flags describe. `backing_by_default` allows backing files in the image's
    /// folder even without `--allow-backing` (for `--backing-chain`, where the user asked for the
    /// chain).
    pub fn gate(&self, backing_by_default: bool) -> Gate {
        let mut gate = Gate::new()
            .allow_backing(self.allow_backing.is_some() || backing_by_default)
            .allow_data_file(self.allow_data_file);
        if let Some(Some(dir)) = &self.allow_backing {
            gate = gate.confine_to(dir.clone());
        }
        gate
    }
}

/// Flags that give the keys of encrypted images, as qemu-img takes them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// Define a secret, as qemu-img does: `secret,id=ID,data=STRING`, `secret,id=ID,file=PATH`
    /// (the file's bytes, verbatim), with `format=base64` when the value is base64. Images name
    /// it with `key-secret=ID` (`-f luks`) or `encrypt.key-secret=ID` (qcow2). May be repeated.
    #[arg(long, global = true, value_name = "OBJECT")]
    pub object: Vec<String>,

    /// The passphrase of encrypted images, read verbatim from PATH: used when no
    /// `key-secret` names another secret (reading, creating and converting).
    #[arg(long, global = true, value_name = "PATH")]
    pub key_file: Option<PathBuf>,

    /// Image arguments are option strings, as qemu-img's --image-opts:
    /// `driver=luks,key-secret=sec0,file.filename=disk.luks`.
    #[arg(long, global = true)]
    pub image_opts: bool,
}

/// The id `--key-file`'s secret is known by to `-o key-secret=`.
const KEY_FILE_ID: &str = "key-file";

/// The keys given on the command line, set once by `main` before any command runs.
#[derive(Debug, Default)]
struct Keys {
    secrets: Secrets,
    key_file: Option<Secret>,
    image_opts: bool,
}

static KEYS: OnceLock<Keys> = OnceLock::new();

fn keys() -> &'static Keys {
    KEYS.get_or_init(Keys::default)
}

/// Parse `--object` and read `--key-file`, once, before the command runs.
pub fn init_keys(a: &KeyArgs) -> anyhow::Result<()> {
    let mut secrets = Secrets::new();
    for o in &a.object {
        let (id, secret) = parse_secret_object(o)?;
        secrets.insert(&id, secret)?;
    }
    let key_file = match &a.key_file {
        Some(p) => {
            let bytes =
                std::fs::read(p).with_context(|| format!("reading key file {}", p.display()))?;
            let s = Secret::new(bytes);
            secrets.insert(KEY_FILE_ID, s.clone())?;
            Some(s)
        }
        None => None,
    };
    let _ = KEYS.set(Keys {
        secrets,
        key_file,
        image_opts: a.image_opts,
    });
    Ok(())
}

/// Parse one `--object secret,id=...,data=...|file=...[,format=raw|base64]`.
pub fn parse_secret_object(spec: &str) -> anyhow::Result<(String, Secret)> {
    use base64::Engine as _;
    let mut o = FormatOptions::new();
    let (kind, rest) = spec.split_once(',').unwrap_or((spec, ""));
    let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
    if kind != "secret" {
        anyhow::bail!("--object {kind}: only secret objects are supported");
    }
    o.parse(rest).with_context(|| "invalid --object secret")?;
    let id = o
        .str("id")
        .ok_or_else(|| anyhow::anyhow!("--object secret needs id=ID"))?;
    let raw = match (o.str("data"), o.str("file")) {
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => {
            std::fs::read(&f).with_context(|| format!("reading secret {id} from {f}"))?
        }
        _ => anyhow::bail!("--object secret {id}: give exactly one of data= and file="),
    };
    let bytes = match o.str("format").as_deref() {
        None | Some("raw") => raw,
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(raw.trim_ascii())
            .map_err(|_| anyhow::anyhow!("--object secret {id}: data is not valid base64"))?,
        Some(f) => anyhow::bail!("--object secret {id}: unknown format '{f}' (raw, base64)"),
    };
    if o.str("keyid").is_some() || o.str("iv").is_some() {
        anyhow::bail!("--object secret {id}: encrypted secrets (keyid=, iv=) are not supported");
    }
    o.finish("secret")
        .map_err(|e| anyhow::anyhow!("--object secret {id}: {}", e.message()))?;
    Ok((id, Secret::new(bytes)))
}

/// With `--key-file`, make an encrypted image being created use it when its options name no
/// other secret (`-f luks`, or qcow2 with `encrypt.format=luks`).
pub fn apply_key_file(opts: &mut FormatOptions, format: Format) {
    if keys().key_file.is_none() {
        return;
    }
    let key = match format {
        Format::Luks => "key_secret",
        Format::Qcow2 if opts.contains("encrypt.format") => "encrypt.key_secret",
        _ => return,
    };
    if !opts.contains(key) {
        opts.set(key, KEY_FILE_ID);
    }
}

/// Resolve an image argument: with `--image-opts` an option string naming the file, driver and
/// key secret; otherwise a path, keyed by `--key-file` if given.
fn resolve_image_arg(
    path: &Path,
    format: Option<Format>,
) -> anyhow::Result<(PathBuf, Option<Format>, Option<Secret>)> {
    let k = keys();
    // A plain path (no `=`) stays a path even with --image-opts: backing files, -n targets.
    if !k.image_opts || !path.to_string_lossy().contains('=') {
        return Ok((path.to_path_buf(), format, k.key_file.clone()));
    }
    let spec = path
        .to_str()
        .context("--image-opts argument is not UTF-8")?;
    let mut o = FormatOptions::new();
    o.parse(spec)
        .with_context(|| format!("invalid --image-opts '{spec}'"))?;
    let file = o
        .str("file.filename")
        .or_else(|| o.str("filename"))
        .ok_or_else(|| anyhow::anyhow!("--image-opts '{spec}' names no file.filename"))?;
    if let Some(d) = o.str("file.driver") {
        if d != "file" {
            anyhow::bail!("--image-opts: file.driver={d} is not supported (only file)");
        }
    }
    let fmt = match o.str("driver") {
        Some(d) => Some(d.parse::<Format>()?),
        None => format,
    };
    let id = o.str("key_secret").or_else(|| o.str("encrypt.key_secret"));
    let secret = match id {
        Some(id) => Some(k.secrets.get(&id)?),
        None => k.key_file.clone(),
    };
    o.finish("--image-opts")
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    Ok((PathBuf::from(file), fmt, secret))
}

/// `--output` of the commands that have a machine-readable form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Text for people, as qemu-img prints it.
    #[default]
    Human,
    /// JSON with qemu-img's keys.
    Json,
}

/// Parse a format name as qemu-img spells it (`raw`, `qcow2`, `vmdk`, `vpc`, `vhdx`, `vdi`, `iso`).
pub fn parse_format(s: &str) -> Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.message().to_string())
}

/// Parse a size with qemu-img's suffixes (`512`, `64k`, `10G`, `1.5T`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    vmi_disk::parse_size(s).map_err(|e| e.message().to_string())
}

/// Parse every `-o` argument into one set of options.
pub fn parse_options(args: &[String]) -> anyhow::Result<FormatOptions> {
    let mut opts = FormatOptions::new();
    opts.set_secrets(keys().secrets.clone());
    for a in args {
        opts.parse(a)
            .with_context(|| format!("invalid -o argument '{a}'"))?;
    }
    Ok(opts)
}

/// Whether `-o help` / `-o ?` was asked for.
pub fn wants_option_help(args: &[String]) -> bool {
    args.iter()
        .flat_map(|a| a.split(','))
        .any(|o| o == "help" || o == "?")
}

/// Open an image read-only (or writable) with the given gate and backing policy, taking QEMU's
/// image locks.
pub fn open(
    path: &Path,
    format: Option<Format>,
    gate: Gate,
    backing: BackingMode,
    writable: bool,
) -> anyhow::Result<Image> {
    let (path, format, secret) = resolve_image_arg(path, format)?;
    let opts = OpenOptions::new()
        .format(format)
        .gate(gate)
        .backing(backing)
        .write(writable)
        .secret(secret);
    Image::open(&path, &opts).map_err(with_gate_hint)
}

/// Open an image read-only; with `force_share` (`-U`) without taking image locks.
pub fn open_ro(
    path: &Path,
    format: Option<Format>,
    gate: Gate,
    backing: BackingMode,
    force_share: bool,
) -> anyhow::Result<Image> {
    let (path, format, secret) = resolve_image_arg(path, format)?;
    let opts = OpenOptions::new()
        .format(format)
        .gate(gate)
        .backing(backing)
        .force_share(force_share)
        .secret(secret);
    Image::open(&path, &opts).map_err(with_gate_hint)
}

/// Add the flag that widens the gate to a refusal for a file outside the allowed folder (the
/// gate's own message already names `--allow-backing` / `--allow-data-file` for files that are
/// not allowed at all).
fn with_gate_hint(e: vmi_disk::Error) -> anyhow::Error {
    if e.kind() == vmi_disk::ErrorKind::Refused && e.message().contains("outside the allowed") {
        anyhow::anyhow!("{e} (--allow-backing=DIR allows files under DIR)")
    } else {
        e.into()
    }
}

/// Write to stdout, returning the error (a closed pipe included) rather than panicking.
pub fn out(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_fmt(args)?;
    Ok(())
}

/// `println!` that returns errors: a closed stdout ends the command (as success, see `main`).
#[macro_export]
macro_rules! outln {
    () => { $crate::common::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::common::out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Print a JSON value the way qemu-img does (pretty, four-space indents), with a final newline.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    v.serialize(&mut ser)?;
    buf.push(b'\n');
    let mut stdout = io::stdout().lock();
    stdout.write_all(&buf)?;
    stdout.flush()?;
    Ok(())
}

/// True when the error is stdout having been closed (`vmi map ... | head`).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// qemu's `size_to_str`: three significant digits and a binary unit (`1 GiB`, `196 KiB`,
/// `1.5 MiB`, `0 B`).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // qemu picks the unit from frexp(val / (1000/1024)): the largest unit in which the value is
    // at least 1000/1024 of one unit.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i64 + 1
    };
    let i = usize::try_from((exp - 1).max(0) / 10)
        .unwrap_or(0)
        .min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g` for values below 1000: three significant digits, trailing zeros removed.
fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let mag = v.abs().log10().floor() as i32;
    let decimals = usize::try_from((2 - mag).max(0)).unwrap_or(0);
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Bytes the file occupies on disk (qemu's `actual-size`: allocated blocks, not length).
pub fn allocated_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// The flag [`cancel_on_signal`] sets.
static CANCEL: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe. The flag is set before the handler is installed.
    if let Some(flag) = CANCEL.get() {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether [`cancel_on_signal`]'s flag was set: the command stopped because it was asked to.
pub fn cancelled() -> bool {
    CANCEL
        .get()
        .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
}

/// A flag that the first SIGINT or SIGTERM sets, for long operations that clean up after
/// themselves when asked to stop (a conversion removes its temporary output). The handler is
/// installed once with `SA_RESETHAND`, so a second signal terminates the process as usual.
pub fn cancel_on_signal() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let mut installed = false;
    let flag = CANCEL.get_or_init(|| {
        installed = true;
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
    });
    if installed {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `sa` is fully initialised (zeroed, then the handler, flags and an empty
            // mask); `on_signal` only performs an atomic store, which is async-signal-safe.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    }
    flag.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1023), "0.999 KiB");
    }

    #[test]
    fn option_help_is_recognised_in_any_position() {
        assert!(wants_option_help(&["cluster_size=64k,help".into()]));
        assert!(wants_option_help(&["?".into()]));
        assert!(!wants_option_help(&["compat=1.1".into()]));
    }
}
