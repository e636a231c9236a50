//! `vmi guest`: what is inside an image, read and changed without booting it — inspect, sysprep,
//! customize, sparsify, and ls/cat/cp-out/cp-in/diff for quick looks. The work is done by
//! `vmi-guest` (partitions, ext2/3/4 through libext2fs); this module parses arguments and prints.
//!
//! Commands that change an image open it for writing; on an overlay (`vmi clone --linked`) the
//! changes land in the overlay and the golden image stays untouched (its folder must be allowed
//! with --allow-backing, as for every command that reads through a backing file).

use crate::common::{self, parse_format, size_to_str, OutputFormat};
use crate::outln;
use anyhow::{bail, Context as _};
use clap::Subcommand;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use vmi_disk::{BackingMode, Format, Image};
use vmi_guest::customize::{self, Step};
use vmi_guest::ext4::{Attrs, FileKind};
use vmi_guest::guest::AnyFs;
use vmi_guest::inspect::format_time;
use vmi_guest::{guest, inspect, sparsify, sysprep};

/// Inspect, clean, customise and shrink the operating system inside an image, offline.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: GuestCommand,
}

#[derive(Debug, Subcommand)]
enum GuestCommand {
    /// Show the partitions, filesystems and operating systems in an image.
    Inspect(InspectArgs),
    /// Remove what makes the installed system one machine (machine-id, SSH host keys, logs…).
    Sysprep(SysprepArgs),
    /// Set hostname, timezone, root password, SSH keys; write, upload, delete files; first-boot
    /// commands.
    Customize(Box<CustomizeArgs>),
    /// Turn the free space of the image's filesystems into holes / zero clusters.
    Sparsify(SparsifyArgs),
    /// List a guest directory.
    Ls(LsArgs),
    /// Print a guest file.
    Cat(CatArgs),
    /// Copy a guest file out to the host.
    CpOut(CpOutArgs),
    /// Copy a host file into the guest.
    CpIn(CpInArgs),
    /// Show files and packages that differ between two images.
    Diff(DiffArgs),
}

/// The image argument every guest command takes.
#[derive(Debug, clap::Args)]
struct ImageArg {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// The image.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
}

/// Which filesystem the file commands use.
#[derive(Debug, clap::Args)]
struct PartArg {
    /// Use the ext2/3/4 filesystem on partition N (default: the OS root filesystem).
    #[arg(long, value_name = "N")]
    partition: Option<u32>,
}

#[derive(Debug, clap::Args)]
struct InspectArgs {
    #[command(flatten)]
    img: ImageArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// List every installed package (JSON output always has them).
    #[arg(long)]
    packages: bool,
}

#[derive(Debug, clap::Args)]
struct SysprepArgs {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// The image.
    #[arg(value_name = "IMAGE", required_unless_present = "list_operations")]
    image: Option<PathBuf>,
    /// List the operations and exit.
    #[arg(long)]
    list_operations: bool,
    /// Operations to run, comma-separated (default: all); `-NAME` leaves one out.
    #[arg(long, value_name = "OPS", allow_hyphen_values = true)]
    operations: Option<String>,
    /// Show what would change; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
}

#[derive(Debug, clap::Args)]
struct CustomizeArgs {
    #[command(flatten)]
    img: ImageArg,
    /// A TOML recipe of steps, applied before the options below.
    #[arg(long, value_name = "FILE")]
    recipe: Option<PathBuf>,
    /// Create a directory (and its parents).
    #[arg(long, value_name = "DIR")]
    mkdir: Vec<String>,
    /// Copy a host file into the guest.
    #[arg(long, value_name = "SRC:DST")]
    upload: Vec<String>,
    /// Write a guest file.
    #[arg(long, value_name = "PATH:CONTENT")]
    write: Vec<String>,
    /// Change permission bits.
    #[arg(long, value_name = "MODE:PATH")]
    chmod: Vec<String>,
    /// Remove a guest file or directory tree.
    #[arg(long, value_name = "PATH")]
    delete: Vec<String>,
    /// Set the hostname.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Set the timezone (e.g. Europe/Paris).
    #[arg(long, value_name = "TZ")]
    timezone: Option<String>,
    /// Root password: password:SECRET, file:FILE, hash:CRYPT or disabled (SHA-512 crypt).
    #[arg(long, value_name = "SELECTOR")]
    root_password: Option<String>,
    /// Add an SSH key: USER:file:KEYFILE or USER:string:KEY.
    #[arg(long, value_name = "USER:SELECTOR")]
    ssh_inject: Vec<String>,
    /// Run a shell command once, at the guest's first boot (a systemd oneshot unit).
    #[arg(long, value_name = "CMD")]
    firstboot_command: Vec<String>,
    /// Refused: running guest programs needs a VM.
    #[arg(long, value_name = "CMD")]
    run_command: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct SparsifyArgs {
    #[command(flatten)]
    img: ImageArg,
    /// Count the free space; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
}

#[derive(Debug, clap::Args)]
struct LsArgs {
    #[command(flatten)]
    img: ImageArg,
    #[command(flatten)]
    part: PartArg,
    /// Long listing: mode, owner, size.
    #[arg(short = 'l')]
    long: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Guest directory.
    #[arg(value_name = "DIR", default_value = "/")]
    dir: String,
}

#[derive(Debug, clap::Args)]
struct CatArgs {
    #[command(flatten)]
    img: ImageArg,
    #[command(flatten)]
    part: PartArg,
    /// Guest file.
    #[arg(value_name = "PATH")]
    path: String,
}

#[derive(Debug, clap::Args)]
struct CpOutArgs {
    #[command(flatten)]
    img: ImageArg,
    #[command(flatten)]
    part: PartArg,
    /// Guest file.
    #[arg(value_name = "GUEST_PATH")]
    src: String,
    /// Host file or directory.
    #[arg(value_name = "HOST_PATH")]
    dst: PathBuf,
}

#[derive(Debug, clap::Args)]
struct CpInArgs {
    #[command(flatten)]
    img: ImageArg,
    #[command(flatten)]
    part: PartArg,
    /// Host file.
    #[arg(value_name = "HOST_PATH")]
    src: PathBuf,
    /// Guest file or directory.
    #[arg(value_name = "GUEST_PATH")]
    dst: String,
}

#[derive(Debug, clap::Args)]
struct DiffArgs {
    /// Format of both images (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// The first (older) image.
    #[arg(value_name = "IMAGE1")]
    a: PathBuf,
    /// The second (newer) image.
    #[arg(value_name = "IMAGE2")]
    b: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
}

fn open(gate: &common::GateArgs, a: &ImageArg, writable: bool) -> anyhow::Result<Image> {
    common::open(
        &a.image,
        a.format,
        gate.gate(false),
        BackingMode::Open,
        writable,
    )
}

/// Run `vmi guest`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    match a.command {
        GuestCommand::Inspect(a) => run_inspect(gate, a),
        GuestCommand::Sysprep(a) => run_sysprep(gate, a),
        GuestCommand::Customize(a) => run_customize(gate, *a),
        GuestCommand::Sparsify(a) => run_sparsify(gate, a),
        GuestCommand::Ls(a) => run_ls(gate, a),
        GuestCommand::Cat(a) => run_cat(gate, a),
        GuestCommand::CpOut(a) => run_cp_out(gate, a),
        GuestCommand::CpIn(a) => run_cp_in(gate, a),
        GuestCommand::Diff(a) => run_diff(gate, a),
    }
}

fn run_inspect(gate: &common::GateArgs, a: InspectArgs) -> anyhow::Result<u8> {
    let img = open(gate, &a.img, false)?;
    let r = inspect::inspect(&img)?;
    if a.output == OutputFormat::Json {
        common::print_json(&r)?;
        return Ok(0);
    }
    match &r.partition_table {
        Some(t) => outln!(
            "partition table: {} ({})",
            match t.kind {
                vmi_guest::TableKind::Mbr => "mbr",
                vmi_guest::TableKind::Gpt => "gpt",
            },
            t.disk_id
        )?,
        None => outln!("partition table: none")?,
    }
    if let Some(t) = &r.partition_table {
        for w in &t.warnings {
            outln!("  warning: {w}")?;
        }
    }
    for f in &r.filesystems {
        let mut line = format!(
            "  {:<12} offset {:>12}  size {:>10}  {}",
            f.found.device,
            f.found.offset,
            size_to_str(f.found.size),
            f.found.fs_type.as_deref().unwrap_or("unknown")
        );
        if let Some(l) = f.label.as_deref().filter(|l| !l.is_empty()) {
            line.push_str(&format!("  label {l}"));
        }
        if let Some(u) = &f.uuid {
            line.push_str(&format!("  uuid {u}"));
        }
        if let Some(e) = &f.error {
            line.push_str(&format!("  ({e})"));
        }
        outln!("{line}")?;
    }
    if r.operating_systems.is_empty() {
        outln!("no operating system found")?;
    }
    for os in &r.operating_systems {
        outln!("operating system on {}: {}", os.root, os.product_name)?;
        outln!("  type:            {}", os.os_type)?;
        outln!("  distribution:    {}", os.distro)?;
        outln!("  version:         {}", os.version)?;
        outln!("  codename:        {}", os.codename)?;
        outln!("  architecture:    {}", os.architecture)?;
        outln!("  hostname:        {}", os.hostname)?;
        for m in &os.mounts {
            outln!(
                "  mount:           {} on {} ({}, {})",
                m.spec,
                m.mountpoint,
                m.fstype,
                m.options
            )?;
        }
        outln!("  kernels:         {}", join_or_none(&os.kernels))?;
        if os.package_format.is_empty() {
            outln!("  packages:        none found")?;
        } else {
            outln!(
                "  packages:        {} installed ({}, {})",
                os.packages.len(),
                os.package_manager,
                os.package_format
            )?;
        }
        outln!(
            "  users:           {}",
            join_or_none(&os.users.iter().map(|u| u.name.clone()).collect::<Vec<_>>())
        )?;
        outln!("  ssh host keys:   {}", join_or_none(&os.ssh_host_keys))?;
        outln!(
            "  machine-id:      {}",
            if os.machine_id {
                "set"
            } else {
                "empty or absent"
            }
        )?;
        outln!(
            "  cloud-init state: {}",
            if os.cloud_init_state {
                "present"
            } else {
                "none"
            }
        )?;
        outln!("  shell history:   {}", join_or_none(&os.shell_history))?;
        match (os.last_update, &os.last_update_source) {
            (Some(t), Some(src)) => {
                outln!("  last update:     {} UTC (from {src})", format_time(t))?
            }
            _ => outln!("  last update:     unknown")?,
        }
        if a.packages {
            for p in &os.packages {
                outln!("    {}\t{}\t{}", p.name, p.version, p.arch)?;
            }
        }
    }
    Ok(0)
}

fn join_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn run_sysprep(gate: &common::GateArgs, a: SysprepArgs) -> anyhow::Result<u8> {
    if a.list_operations {
        for op in sysprep::OPERATIONS {
            outln!("{:<24} {}", op.name, op.description)?;
        }
        return Ok(0);
    }
    let ops = sysprep::select(a.operations.as_deref())?;
    let image = ImageArg {
        format: a.format,
        image: a.image.clone().context("an image is needed")?,
    };
    let img = open(gate, &image, !a.dry_run)?;
    let (found, fs) = guest::open_root(&img, !a.dry_run)?;
    let changes = sysprep::plan(&fs, &ops)?;
    if !a.dry_run {
        sysprep::apply(&fs, &changes)?;
        fs.close().context("closing the guest filesystem")?;
        img.close()?;
    }
    if a.output == OutputFormat::Json {
        common::print_json(&serde_json::json!({
            "root": found.device,
            "dry_run": a.dry_run,
            "changes": changes,
        }))?;
        return Ok(0);
    }
    let verb = |act: sysprep::Action| match (act, a.dry_run) {
        (sysprep::Action::Remove, true) => "would remove",
        (sysprep::Action::Remove, false) => "removed",
        (sysprep::Action::Truncate, true) => "would truncate",
        (sysprep::Action::Truncate, false) => "truncated",
    };
    for c in &changes {
        outln!("[{}] {} {}", c.operation, verb(c.action), c.path)?;
    }
    outln!(
        "{} change{} {}",
        changes.len(),
        if changes.len() == 1 { "" } else { "s" },
        if a.dry_run {
            "planned (dry run, nothing changed)"
        } else {
            "made"
        }
    )?;
    Ok(0)
}

fn split_arg<'a>(opt: &str, arg: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    arg.split_once(':')
        .with_context(|| format!("--{opt} '{arg}': expected two values separated by ':'"))
}

/// The steps the options ask for, in a fixed order: recipe, mkdir, upload, write, chmod, delete,
/// hostname, timezone, root password, SSH keys, first-boot commands.
fn steps(a: &CustomizeArgs) -> anyhow::Result<Vec<Step>> {
    let mut s = Vec::new();
    if let Some(r) = &a.recipe {
        let text =
            std::fs::read_to_string(r).with_context(|| format!("reading {}", r.display()))?;
        s.extend(customize::parse_recipe(&text)?);
    }
    s.extend(a.mkdir.iter().map(|d| Step::Mkdir(d.clone())));
    for u in &a.upload {
        let (src, dst) = split_arg("upload", u)?;
        s.push(Step::Upload {
            src: src.into(),
            dst: dst.into(),
        });
    }
    for w in &a.write {
        let (path, content) = split_arg("write", w)?;
        s.push(Step::Write {
            path: path.into(),
            content: content.into(),
        });
    }
    for c in &a.chmod {
        let (mode, path) = split_arg("chmod", c)?;
        s.push(Step::Chmod {
            mode: mode.into(),
            path: path.into(),
        });
    }
    s.extend(a.delete.iter().map(|d| Step::Delete(d.clone())));
    s.extend(a.hostname.iter().map(|h| Step::Hostname(h.clone())));
    s.extend(a.timezone.iter().map(|t| Step::Timezone(t.clone())));
    s.extend(
        a.root_password
            .iter()
            .map(|p| Step::RootPassword(p.clone())),
    );
    for k in &a.ssh_inject {
        s.push(customize::parse_ssh_inject(k)?);
    }
    s.extend(
        a.firstboot_command
            .iter()
            .map(|c| Step::FirstbootCommand(c.clone())),
    );
    s.extend(a.run_command.iter().map(|c| Step::RunCommand(c.clone())));
    Ok(s)
}

fn run_customize(gate: &common::GateArgs, a: CustomizeArgs) -> anyhow::Result<u8> {
    let steps = steps(&a)?;
    customize::check_steps(&steps)?;
    if steps.is_empty() {
        bail!("nothing to do: give at least one customisation option or --recipe");
    }
    let img = open(gate, &a.img, true)?;
    let (_, fs) = guest::open_root(&img, true)?;
    let log = customize::apply(&fs, &steps)?;
    fs.close().context("closing the guest filesystem")?;
    img.close()?;
    for l in log {
        outln!("{l}")?;
    }
    Ok(0)
}

fn run_sparsify(gate: &common::GateArgs, a: SparsifyArgs) -> anyhow::Result<u8> {
    let before = allocated(&a.img.image);
    let img = open(gate, &a.img, !a.dry_run)?;
    let r = sparsify::sparsify(&img, a.dry_run)?;
    img.close()?;
    let after = allocated(&a.img.image);
    if a.output == OutputFormat::Json {
        common::print_json(&serde_json::json!({
            "dry_run": a.dry_run,
            "volumes": r.volumes,
            "skipped": r.skipped,
            "zeroed": r.zeroed,
            "allocated_before": before,
            "allocated_after": after,
            "reclaimed": before.saturating_sub(after),
        }))?;
        return Ok(0);
    }
    for v in &r.volumes {
        outln!(
            "{}: {} of free {} space {}",
            v.device,
            size_to_str(v.zeroed),
            v.fs_type,
            if a.dry_run { "found" } else { "zeroed" }
        )?;
    }
    for s in &r.skipped {
        outln!("skipped {s}")?;
    }
    if !a.dry_run {
        outln!(
            "reclaimed {} ({} bytes): the image file now occupies {}",
            size_to_str(before.saturating_sub(after)),
            before.saturating_sub(after),
            size_to_str(after)
        )?;
    }
    Ok(0)
}

/// Bytes the image file occupies on the host.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn kind_char(k: FileKind) -> char {
    match k {
        FileKind::File => '-',
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::Other => '?',
    }
}

fn run_ls(gate: &common::GateArgs, a: LsArgs) -> anyhow::Result<u8> {
    let img = open(gate, &a.img, false)?;
    let fs = match guest::open_any(&img, false, a.part.partition)? {
        AnyFs::Ext4(fs) => fs,
        AnyFs::Fat(fat) => {
            let mut entries = fat.read_dir(&a.dir)?;
            entries.sort_by(|x, y| x.name.cmp(&y.name));
            if a.output == OutputFormat::Json {
                common::print_json(&entries)?;
                return Ok(0);
            }
            for e in entries {
                if a.long {
                    let k = if e.is_dir { 'd' } else { '-' };
                    outln!("{k} {:>12} {}", e.size, e.name)?;
                } else {
                    outln!("{}", e.name)?;
                }
            }
            return Ok(0);
        }
    };
    let mut names: Vec<String> = fs.read_dir(&a.dir)?.into_iter().map(|e| e.name).collect();
    names.sort();
    let base = a.dir.trim_end_matches('/');
    if a.output == OutputFormat::Json {
        let mut v = Vec::new();
        for n in &names {
            let p = format!("{base}/{n}");
            let st = fs.stat(&p)?;
            v.push(serde_json::json!({ "name": n, "stat": st }));
        }
        common::print_json(&v)?;
        return Ok(0);
    }
    for n in names {
        if !a.long {
            outln!("{n}")?;
            continue;
        }
        let p = format!("{base}/{n}");
        let st = fs.stat(&p)?;
        let target = if st.kind == FileKind::Symlink {
            format!(" -> {}", fs.readlink(&p)?)
        } else {
            String::new()
        };
        outln!(
            "{}{:04o} {:>6} {:>6} {:>12} {n}{target}",
            kind_char(st.kind),
            st.perm,
            st.uid,
            st.gid,
            st.size
        )?;
    }
    Ok(0)
}

fn run_cat(gate: &common::GateArgs, a: CatArgs) -> anyhow::Result<u8> {
    let img = open(gate, &a.img, false)?;
    let fs = guest::open_any(&img, false, a.part.partition)?;
    let mut out = std::io::stdout().lock();
    match &fs {
        AnyFs::Ext4(fs) => fs.read_file(&a.path, &mut out)?,
        AnyFs::Fat(fat) => fat.read_file(&a.path, &mut out)?,
    };
    out.flush()?;
    Ok(0)
}

fn run_cp_out(gate: &common::GateArgs, a: CpOutArgs) -> anyhow::Result<u8> {
    let img = open(gate, &a.img, false)?;
    let fs = guest::open_any(&img, false, a.part.partition)?;
    if let AnyFs::Ext4(fs) = &fs {
        if fs.stat_follow(&a.src)?.kind != FileKind::File {
            bail!("{}: only regular files are copied out", a.src);
        }
    }
    let dst = if a.dst.is_dir() {
        let (_, name) = vmi_guest::ext4::split_path(&a.src)?;
        a.dst.join(name)
    } else {
        a.dst.clone()
    };
    let mut f =
        std::fs::File::create(&dst).with_context(|| format!("creating {}", dst.display()))?;
    match &fs {
        AnyFs::Ext4(fs) => fs.read_file(&a.src, &mut f)?,
        AnyFs::Fat(fat) => fat.read_file(&a.src, &mut f)?,
    };
    f.sync_all()
        .with_context(|| format!("writing {}", dst.display()))?;
    Ok(0)
}

fn run_cp_in(gate: &common::GateArgs, a: CpInArgs) -> anyhow::Result<u8> {
    let img = open(gate, &a.img, true)?;
    let name = a
        .src
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: no file name", a.src.display()))?
        .to_string();
    let mut f =
        std::fs::File::open(&a.src).with_context(|| format!("opening {}", a.src.display()))?;
    match guest::open_any(&img, true, a.part.partition)? {
        AnyFs::Ext4(fs) => {
            let target = match fs.stat_follow(&a.dst) {
                Ok(st) if st.kind == FileKind::Dir => {
                    format!("{}/{name}", a.dst.trim_end_matches('/'))
                }
                _ => a.dst.clone(),
            };
            use std::os::unix::fs::PermissionsExt;
            let perm = f
                .metadata()
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            let attrs = if fs.exists(&target)? {
                None
            } else {
                Some(Attrs::root(perm))
            };
            fs.write_file(&target, &mut f, attrs)?;
            fs.close().context("closing the guest filesystem")?;
        }
        AnyFs::Fat(fat) => {
            let target = if a.dst.ends_with('/') || fat.read_dir(&a.dst).is_ok() {
                format!("{}/{name}", a.dst.trim_end_matches('/'))
            } else {
                a.dst.clone()
            };
            fat.write_file(&target, &mut f)?;
            fat.close().context("closing the FAT filesystem")?;
        }
    }
    img.close()?;
    Ok(0)
}

fn run_diff(gate: &common::GateArgs, a: DiffArgs) -> anyhow::Result<u8> {
    let ia = common::open(&a.a, a.format, gate.gate(false), BackingMode::Open, false)?;
    let ib = common::open(&a.b, a.format, gate.gate(false), BackingMode::Open, false)?;
    let (_, fa) = guest::open_fs(&ia, false, None)?;
    let (_, fb) = guest::open_fs(&ib, false, None)?;
    let files = vmi_guest::diff::diff_files(&fa, &fb)?;
    let ra = inspect::inspect(&ia)?;
    let rb = inspect::inspect(&ib)?;
    let pa = ra
        .operating_systems
        .first()
        .map(|o| o.packages.clone())
        .unwrap_or_default();
    let pb = rb
        .operating_systems
        .first()
        .map(|o| o.packages.clone())
        .unwrap_or_default();
    let format = rb
        .operating_systems
        .first()
        .map(|o| o.package_format.clone())
        .unwrap_or_default();
    let packages = vmi_guest::diff::diff_packages(&pa, &pb, &format);
    if a.output == OutputFormat::Json {
        common::print_json(&serde_json::json!({ "files": files, "packages": packages }))?;
        return Ok(0);
    }
    for f in &files {
        let sign = match f.change {
            "added" => '+',
            "removed" => '-',
            _ => '~',
        };
        if f.what.is_empty() {
            outln!("{sign} {}", f.path)?;
        } else {
            outln!("{sign} {} ({})", f.path, f.what.join(", "))?;
        }
    }
    for p in &packages {
        outln!(
            "package {} {}: {} -> {}",
            p.change,
            p.name,
            p.from.as_deref().unwrap_or("(absent)"),
            p.to.as_deref().unwrap_or("(removed)")
        )?;
    }
    Ok(0)
}
