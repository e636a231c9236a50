//! Command-line glue for `vmi ovf export|import|verify|info` and `vmi compat check|targets`: clap
//! argument types and `run_*` functions that print to a writer and return the exit code
//! (0 success; 1 verification or compatibility problems found). Errors are returned for the
//! binary to report.

use crate::compat::{self, ImageFacts, Severity, Target};
use crate::error::{OvfError, Result};
use crate::package::{self, DiskInput, ExportOptions, Package, Source};
use crate::profile::{DiskProfile, HardwareProfile};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use vmi_disk::{Format, Image, OpenOptions};

/// `vmi ovf …`
#[derive(Debug, Args)]
pub struct OvfArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: OvfCommand,
}

/// `vmi ovf` subcommands.
#[derive(Debug, Subcommand)]
pub enum OvfCommand {
    /// Package disks and a hardware profile as an OVA (or an .ovf directory package).
    Export(ExportArgs),
    /// Convert a package's disks out and write its hardware profile.
    Import(ImportArgs),
    /// Check references, manifest digests, the certificate's signature and (optionally) the schema.
    Verify(VerifyArgs),
    /// Show what a package holds.
    Info(InfoArgs),
    /// Extract an OVA into a directory package.
    Unpack(UnpackArgs),
    /// Write a native hypervisor config (VMX, libvirt domain XML, VBoxManage script) from a profile.
    Config(ConfigArgs),
    /// Read a profile from a package, a `.vmx` or a libvirt domain XML and write it as TOML/JSON.
    Profile(ProfileArgs),
}

/// `vmi ovf unpack X.ova DIR`
#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// The OVA.
    pub ova: PathBuf,
    /// Directory to extract into.
    pub dir: PathBuf,
}

/// Native config kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigKind {
    /// VMware `.vmx`.
    Vmx,
    /// libvirt domain XML (KVM).
    Libvirt,
    /// VirtualBox `.vbox` machine settings.
    Vbox,
    /// VirtualBox `VBoxManage` commands.
    VboxScript,
}

/// `vmi ovf config SOURCE --to vmx|libvirt|vbox|vbox-script`
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Profile (TOML/JSON), `.ovf` or `.ova`.
    pub source: PathBuf,
    /// Config kind to write.
    #[arg(long = "to", value_enum)]
    pub kind: ConfigKind,
}

/// `vmi ovf profile SOURCE [-o P]`
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// `.ovf`, `.ova`, `.vmx`, libvirt domain `.xml`, or a profile.
    pub source: PathBuf,
    /// Output file (`.json` for JSON, TOML otherwise); standard output as TOML when absent.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
}

/// `vmi ovf export DISK... --profile P -o X.ova`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Disk images, in the order of the profile's disks.
    #[arg(required = true)]
    pub disks: Vec<PathBuf>,
    /// Hardware profile (TOML, or JSON by extension); a minimal one is derived when absent.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Output: `X.ova`, or `X.ovf` for a directory package.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Write OVF 2.x instead of 1.x.
    #[arg(long)]
    pub ovf2: bool,
    /// Leave out VMware extensions (vmw:osType, firmware keys).
    #[arg(long)]
    pub no_vmware_extensions: bool,
    /// Package the disk files as they are (already streamOptimized VMDK) instead of converting.
    #[arg(long)]
    pub as_is: bool,
    /// PEM private key to sign the manifest with (needs --sign-cert).
    #[arg(long, requires = "sign_cert")]
    pub sign_key: Option<PathBuf>,
    /// PEM X.509 certificate matching --sign-key.
    #[arg(long, requires = "sign_key")]
    pub sign_cert: Option<PathBuf>,
}

/// `vmi ovf import X.ova|X.ovf -O qcow2 DIR`
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The package.
    pub package: PathBuf,
    /// Output disk format (qcow2; vdi with --vbox).
    #[arg(short = 'O', long = "format")]
    pub format: Option<String>,
    /// Also write a VirtualBox `.vbox` settings file next to the disks.
    #[arg(long)]
    pub vbox: bool,
    /// Output directory (disks and profile.toml).
    pub dir: PathBuf,
}

/// `vmi ovf verify X.ova`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The package.
    pub package: PathBuf,
    /// Also validate the descriptor with xmllint against this DSP8023 schema file.
    #[arg(long)]
    pub schema: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `vmi ovf info X.ova`
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The package (or a bare .ovf descriptor).
    pub package: PathBuf,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `vmi compat …`
#[derive(Debug, Args)]
pub struct CompatArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CompatCommand,
}

/// `vmi compat` subcommands.
#[derive(Debug, Subcommand)]
pub enum CompatCommand {
    /// List the problems an image and/or profile would meet on a target.
    Check(CheckArgs),
    /// List the target names.
    Targets,
}

/// `vmi compat check [IMAGE] [--profile P] --target T`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Disk image to check.
    pub image: Option<PathBuf>,
    /// Hardware profile to check (TOML/JSON), or an .ovf/.ova whose profile is checked.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Target: vmware-esxi[-RELEASE], vmware-workstation, virtualbox, kvm, hyperv-gen1,
    /// hyperv-gen2, aws, azure, gcp, openstack.
    #[arg(long)]
    pub target: String,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

fn w(out: &mut dyn Write, s: std::fmt::Arguments<'_>) -> Result<()> {
    out.write_fmt(s)
        .map_err(|e| OvfError::io("write", "<stdout>", e))
}

/// Run `vmi ovf …`.
pub fn run_ovf(args: &OvfArgs, out: &mut dyn Write) -> Result<i32> {
    match &args.command {
        OvfCommand::Export(a) => export(a, out),
        OvfCommand::Import(a) => import(a, out),
        OvfCommand::Verify(a) => verify(a, out),
        OvfCommand::Info(a) => info(a, out),
        OvfCommand::Unpack(a) => {
            let ovf = package::unpack(&a.ova, &a.dir)?;
            w(out, format_args!("{}\n", ovf.display()))?;
            Ok(0)
        }
        OvfCommand::Config(a) => {
            let p = load_profile(&a.source)?;
            let text = match a.kind {
                ConfigKind::Vmx => crate::native::vmx::generate(&p)?,
                ConfigKind::Libvirt => crate::native::libvirt::generate(&p)?,
                ConfigKind::Vbox => crate::native::vbox::generate(&p)?,
                ConfigKind::VboxScript => crate::native::vbox::script(&p)?,
            };
            w(out, format_args!("{text}"))?;
            Ok(0)
        }
        OvfCommand::Profile(a) => {
            let p = load_profile(&a.source)?;
            match &a.output {
                Some(o) => p.save(o)?,
                None => w(out, format_args!("{}", p.to_toml()?))?,
            }
            Ok(0)
        }
    }
}

/// Largest native config read.
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// A profile from a profile file, an `.ovf`/`.ova`, a `.vmx` or a libvirt domain `.xml`.
pub fn load_profile(p: &Path) -> Result<HardwareProfile> {
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "ovf" | "ova" => Ok(Package::open(p)?.descriptor.profile),
        "vmx" => crate::native::vmx::parse(&crate::profile::read_text(p, MAX_CONFIG_BYTES)?),
        "xml" => crate::native::libvirt::parse(&crate::profile::read_text(p, MAX_CONFIG_BYTES)?),
        "vbox" => crate::native::vbox::parse(&crate::profile::read_text(p, MAX_CONFIG_BYTES)?),
        _ => HardwareProfile::load(p),
    }
}

fn export(a: &ExportArgs, out: &mut dyn Write) -> Result<i32> {
    let mut profile = match &a.profile {
        Some(p) => load_profile(p)?,
        None => {
            let name = a
                .output
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("vm")
                .to_string();
            let mut p = HardwareProfile::new(name);
            p.hardware_version = Some("vmx-10".into());
            p
        }
    };
    let mut inputs = Vec::new();
    for (i, d) in a.disks.iter().enumerate() {
        let img = Image::open(d, &OpenOptions::new()).map_err(|e| OvfError::disk(d, e))?;
        let capacity = img.virtual_size();
        if a.as_is && img.format() != Format::Vmdk {
            return Err(OvfError::Usage(format!(
                "{}: --as-is packages VMDK files only, this is {}",
                d.display(),
                img.format()
            )));
        }
        drop(img);
        if profile.disks.len() <= i {
            profile.disks.push(DiskProfile {
                capacity,
                controller: profile
                    .disks
                    .last()
                    .map(|x| x.controller)
                    .unwrap_or(crate::profile::Controller::Lsilogic),
                format: None,
                file: None,
            });
        }
        inputs.push(if a.as_is {
            DiskInput::AsIs {
                path: d.clone(),
                capacity,
                format_uri: crate::envelope::VMDK_STREAM_URI.to_string(),
            }
        } else {
            DiskInput::Convert(d.clone())
        });
    }
    if profile.disks.len() > inputs.len() {
        return Err(OvfError::Usage(format!(
            "the profile has {} disks but {} disk files were given",
            profile.disks.len(),
            inputs.len()
        )));
    }
    let sign = match (&a.sign_key, &a.sign_cert) {
        (Some(k), Some(c)) => Some((
            crate::profile::read_text(k, crate::sign::MAX_CERT_BYTES)?,
            crate::profile::read_text(c, crate::sign::MAX_CERT_BYTES)?,
        )),
        _ => None,
    };
    let opts = ExportOptions {
        ovf2: a.ovf2,
        no_vmware: a.no_vmware_extensions,
        sign,
    };
    let d = package::export(&inputs, &profile, &a.output, &opts)?;
    w(
        out,
        format_args!("wrote {} ({} disk(s))\n", a.output.display(), d.disks.len()),
    )?;
    Ok(0)
}

fn import(a: &ImportArgs, out: &mut dyn Write) -> Result<i32> {
    let default = if a.vbox { "vdi" } else { "qcow2" };
    let format: Format = a
        .format
        .as_deref()
        .unwrap_or(default)
        .parse()
        .map_err(|e: vmi_disk::Error| OvfError::Usage(e.to_string()))?;
    let pkg = Package::open(&a.package)?;
    if a.vbox {
        // Refuse what VirtualBox cannot run before converting anything.
        let mut p = pkg.descriptor.profile.clone();
        for d in &mut p.disks {
            d.format = Some(format.name().to_string());
        }
        crate::native::vbox::generate(&p)?;
    }
    // The importer reads sloppy descriptors; what `vmi ovf verify` would refuse is a warning.
    for problem in crate::strict::problems(&pkg.descriptor_text)? {
        eprintln!("warning: descriptor: {problem}");
    }
    let p = package::import(&pkg, &a.dir, format)?;
    if a.vbox {
        let path = write_vbox(&p, &a.dir)?;
        w(out, format_args!("{}\n", path.display()))?;
    }
    for d in &p.disks {
        w(
            out,
            format_args!(
                "{}\n",
                a.dir.join(d.file.as_deref().unwrap_or("")).display()
            ),
        )?;
    }
    w(
        out,
        format_args!("{}\n", a.dir.join("profile.toml").display()),
    )?;
    Ok(0)
}

/// Write `DIR/<name>.vbox` for a profile whose disk files are in `dir`, with each disk's UUID
/// read from the file so the media registry matches it.
pub fn write_vbox(p: &HardwareProfile, dir: &Path) -> Result<PathBuf> {
    let mut o = crate::native::vbox::VboxOptions::default();
    for d in &p.disks {
        o.disk_uuids.push(match &d.file {
            Some(f) => crate::native::vbox::medium_uuid(&dir.join(f))?,
            None => None,
        });
    }
    let text = crate::native::vbox::generate_with(p, &o)?;
    let stem: String = p
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!(
        "{}.vbox",
        if stem.is_empty() { "vm" } else { &stem }
    ));
    if path.exists() {
        return Err(OvfError::Usage(format!("{} exists", path.display())));
    }
    std::fs::write(&path, text).map_err(|e| OvfError::io("write", &path, e))?;
    Ok(path)
}

/// Validate descriptor text with `xmllint --schema`.
pub fn schema_check(text: &str, schema: &Path) -> Result<Vec<String>> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vmi-ovf-schema-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| OvfError::io("create", &dir, e))?;
    let f = dir.join("descriptor.ovf");
    std::fs::write(&f, text).map_err(|e| OvfError::io("write", &f, e))?;
    let res = std::process::Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(schema)
        .arg(&f)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let o = res.map_err(|e| OvfError::io("run xmllint", "xmllint", e))?;
    if o.status.success() {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.contains("fails to validate") && !l.trim().is_empty())
        .map(|l| format!("schema: {l}"))
        .collect())
}

fn verify(a: &VerifyArgs, out: &mut dyn Write) -> Result<i32> {
    let pkg = Package::open(&a.package)?;
    let mut r = pkg.verify()?;
    r.problems.extend(
        crate::strict::problems(&pkg.descriptor_text)?
            .into_iter()
            .map(|p| format!("descriptor: {p}")),
    );
    if let Some(s) = &a.schema {
        r.problems.extend(schema_check(&pkg.descriptor_text, s)?);
    }
    if pkg.manifest.is_none() {
        r.problems.push("the package has no manifest".into());
    }
    if a.json {
        let v = serde_json::json!({ "ok": r.ok(), "digests_ok": r.digests_ok, "signature": r.signature, "problems": r.problems });
        w(
            out,
            format_args!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()),
        )?;
    } else {
        for n in &r.digests_ok {
            w(out, format_args!("ok       {n}\n"))?;
        }
        if let Some(s) = &r.signature {
            w(
                out,
                format_args!(
                    "signed   by {} (issuer {}{})\n",
                    s.subject,
                    s.issuer,
                    if s.self_signed { ", self-signed" } else { "" }
                ),
            )?;
        }
        for p in &r.problems {
            w(out, format_args!("PROBLEM  {p}\n"))?;
        }
        w(
            out,
            format_args!(
                "{}\n",
                if r.ok() {
                    "verified"
                } else {
                    "verification failed"
                }
            ),
        )?;
    }
    Ok(if r.ok() { 0 } else { 1 })
}

fn info(a: &InfoArgs, out: &mut dyn Write) -> Result<i32> {
    let pkg = Package::open(&a.package)?;
    let d = &pkg.descriptor;
    let kept: Vec<String> = d
        .extra_sections
        .iter()
        .chain(&d.extra_system_sections)
        .map(|e| e.name.local.clone())
        .collect();
    if a.json {
        let members = match &pkg.source {
            Source::Ova(o) => serde_json::to_value(&o.members).unwrap_or_default(),
            Source::Dir(_) => serde_json::Value::Null,
        };
        let v = serde_json::json!({
            "descriptor": pkg.descriptor_name,
            "ovf-version": d.version,
            "profile": d.profile,
            "files": d.files,
            "disks": d.disks,
            "networks": d.networks,
            "virtual-systems": d.virtual_systems,
            "manifest": pkg.manifest.is_some(),
            "signed": pkg.cert.is_some(),
            "kept-sections": kept,
            "members": members,
        });
        w(
            out,
            format_args!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()),
        )?;
        return Ok(0);
    }
    let p = &d.profile;
    w(
        out,
        format_args!(
            "descriptor:  {} (OVF {:?})\n",
            pkg.descriptor_name, d.version
        ),
    )?;
    w(out, format_args!("name:        {}\n", p.name))?;
    if let Some(g) = p
        .guest_os
        .vmware_id
        .as_deref()
        .or(p.guest_os.description.as_deref())
    {
        w(out, format_args!("guest OS:    {g}\n"))?;
    }
    w(
        out,
        format_args!(
            "cpus:        {}\nmemory:      {} MiB\n",
            p.cpus, p.memory_mib
        ),
    )?;
    w(
        out,
        format_args!(
            "firmware:    {:?}{}{}\n",
            p.firmware.kind,
            if p.firmware.secure_boot {
                ", secure boot"
            } else {
                ""
            },
            if p.firmware.tpm { ", TPM" } else { "" }
        ),
    )?;
    if let Some(h) = &p.hardware_version {
        w(out, format_args!("hardware:    {h}\n"))?;
    }
    for (i, k) in p.disks.iter().enumerate() {
        w(
            out,
            format_args!(
                "disk {i}:      {} bytes on {}{}\n",
                k.capacity,
                k.controller.name(),
                k.file
                    .as_deref()
                    .map(|f| format!(", file {f}"))
                    .unwrap_or_default()
            ),
        )?;
    }
    for (i, c) in p.cdroms.iter().enumerate() {
        w(
            out,
            format_args!("cdrom {i}:     on {}\n", c.controller.name()),
        )?;
    }
    for (i, n) in p.nics.iter().enumerate() {
        w(
            out,
            format_args!("nic {i}:       {} on \"{}\"\n", n.model.name(), n.network),
        )?;
    }
    for f in &d.files {
        w(
            out,
            format_args!(
                "file:        {} ({} bytes{})\n",
                f.href,
                f.size.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                f.compression
                    .as_deref()
                    .map(|c| format!(", {c}"))
                    .unwrap_or_default()
            ),
        )?;
    }
    w(
        out,
        format_args!(
            "manifest:    {}\nsigned:      {}\n",
            if pkg.manifest.is_some() { "yes" } else { "no" },
            if pkg.cert.is_some() { "yes" } else { "no" }
        ),
    )?;
    if !kept.is_empty() {
        w(out, format_args!("kept:        {}\n", kept.join(", ")))?;
    }
    Ok(0)
}

/// `vmi convert SRC OUT --target T [--profile P]`: what the convert command calls when `--target`
/// is given. Checks the result against the target's rules and prints any remaining problem (exit 1
/// when one is an error).
pub fn run_convert_target(
    src: &Path,
    target: &str,
    out_path: &Path,
    profile: Option<&Path>,
    out: &mut dyn Write,
) -> Result<i32> {
    let target: Target = target.parse()?;
    let profile = profile.map(load_profile).transpose()?;
    let written = crate::targets::convert_for_target(src, &target, out_path, profile.as_ref())?;
    w(
        out,
        format_args!("wrote {} for {target}\n", written.display()),
    )?;
    Ok(0)
}

/// Run `vmi compat …`. Exit code 1 when any error-severity problem is found.
pub fn run_compat(args: &CompatArgs, out: &mut dyn Write) -> Result<i32> {
    let a = match &args.command {
        CompatCommand::Targets => {
            for t in Target::NAMES {
                w(out, format_args!("{t}\n"))?;
            }
            return Ok(0);
        }
        CompatCommand::Check(a) => a,
    };
    let target: Target = a.target.parse()?;
    if a.image.is_none() && a.profile.is_none() {
        return Err(OvfError::Usage(
            "give an IMAGE, a --profile, or both".into(),
        ));
    }
    let facts = match &a.image {
        Some(p) => {
            let img = Image::open(p, &OpenOptions::new()).map_err(|e| OvfError::disk(p, e))?;
            Some(ImageFacts::from_image(&img))
        }
        None => None,
    };
    let profile = a.profile.as_deref().map(load_profile).transpose()?;
    let problems = compat::check(facts.as_ref(), profile.as_ref(), &target);
    let errors = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .count();
    if a.json {
        let v = serde_json::json!({ "target": target.to_string(), "compatible": errors == 0, "problems": problems });
        w(
            out,
            format_args!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()),
        )?;
    } else {
        for p in &problems {
            let sev = if p.severity == Severity::Error {
                "error"
            } else {
                "warning"
            };
            w(
                out,
                format_args!(
                    "{sev}: [{}] {}\n    rule source: {}\n",
                    p.rule, p.message, p.source
                ),
            )?;
        }
        if problems.is_empty() {
            w(out, format_args!("compatible with {target}\n"))?;
        } else {
            w(
                out,
                format_args!(
                    "{errors} error(s), {} warning(s) for {target}\n",
                    problems.len() - errors
                ),
            )?;
        }
    }
    Ok(if errors == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Debug, Subcommand)]
    enum Cmd {
        Ovf(OvfArgs),
        Compat(CompatArgs),
    }

    #[test]
    fn argument_types_are_consistent_and_parse_the_documented_forms() {
        Top::command().debug_assert();
        let t = Top::try_parse_from([
            "vmi",
            "ovf",
            "export",
            "a.img",
            "b.img",
            "--profile",
            "p.toml",
            "-o",
            "x.ova",
        ])
        .unwrap();
        let Cmd::Ovf(OvfArgs {
            command: OvfCommand::Export(e),
        }) = t.cmd
        else {
            panic!()
        };
        assert_eq!(e.disks.len(), 2);
        assert!(
            Top::try_parse_from(["vmi", "ovf", "import", "x.ova", "-O", "qcow2", "out"]).is_ok()
        );
        assert!(
            Top::try_parse_from(["vmi", "compat", "check", "d.vhd", "--target", "azure"]).is_ok()
        );
        assert!(Top::try_parse_from([
            "vmi",
            "ovf",
            "export",
            "a",
            "-o",
            "x.ova",
            "--sign-key",
            "k"
        ])
        .is_err());
    }

    #[test]
    fn config_and_profile_commands_convert_between_vmx_and_libvirt() {
        let dir = tempfile::tempdir().unwrap();
        let vmx = dir.path().join("a.vmx");
        std::fs::write(
            &vmx,
            "displayName = \"a\"\nmemsize = \"512\"\nnumvcpus = \"2\"\n",
        )
        .unwrap();
        let mut out = Vec::new();
        let args = OvfArgs {
            command: OvfCommand::Config(ConfigArgs {
                source: vmx.clone(),
                kind: ConfigKind::Libvirt,
            }),
        };
        assert_eq!(run_ovf(&args, &mut out).unwrap(), 0);
        let xml = dir.path().join("a.xml");
        std::fs::write(&xml, &out).unwrap();
        let args = OvfArgs {
            command: OvfCommand::Profile(ProfileArgs {
                source: xml,
                output: None,
            }),
        };
        let mut out = Vec::new();
        assert_eq!(run_ovf(&args, &mut out).unwrap(), 0);
        let p = HardwareProfile::from_toml(&String::from_utf8(out).unwrap()).unwrap();
        assert_eq!((p.name.as_str(), p.memory_mib, p.cpus), ("a", 512, 2));
    }

    #[test]
    fn compat_check_reports_problems_with_exit_code_1() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = HardwareProfile::new("x");
        p.firmware.kind = crate::profile::FirmwareKind::Uefi;
        let pp = dir.path().join("p.toml");
        p.save(&pp).unwrap();
        let args = CompatArgs {
            command: CompatCommand::Check(CheckArgs {
                image: None,
                profile: Some(pp.clone()),
                target: "hyperv-gen1".into(),
                json: false,
            }),
        };
        let mut out = Vec::new();
        assert_eq!(run_compat(&args, &mut out).unwrap(), 1);
        assert!(String::from_utf8(out).unwrap().contains("[firmware]"));
        let args = CompatArgs {
            command: CompatCommand::Check(CheckArgs {
                image: None,
                profile: Some(pp),
                target: "hyperv-gen2".into(),
                json: true,
            }),
        };
        let mut out = Vec::new();
        assert_eq!(run_compat(&args, &mut out).unwrap(), 0);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["compatible"], true);
    }
}
