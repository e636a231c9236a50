//! OVF packages on disk — a directory (`.ovf` with its files beside it) or an `.ova` archive:
//! export (convert disks, write descriptor, manifest, certificate, pack), open, verify, and import
//! (convert the disks out, write the profile).
//!
//! Package files are named only by the descriptor's `References` and are resolved strictly inside
//! the package: plain relative names, no `..`, no absolute paths, no URLs.

use crate::envelope::{self, Descriptor, FileRef, OvfVersion, WriteOptions, VMDK_STREAM_URI};
use crate::error::{OvfError, Result};
use crate::manifest::{self, Algorithm, Entry, Manifest};
use crate::ova::{Ova, OvaWriter};
use crate::profile::{read_text, DiskProfile, HardwareProfile};
use crate::sign::{self, SignatureInfo};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use vmi_convert::{ConvertOptions, Target};
use vmi_disk::{CreateOptions, Format, FormatOptions, Gate, Image, OpenOptions};

/// Largest descriptor read (the XML parser has its own, larger, cap).
pub const MAX_DESCRIPTOR_BYTES: u64 = 16 * 1024 * 1024;

/// Guest OS id written for a VMware-dialect export when the profile names none ("Other, 64-bit").
pub const DEFAULT_VMWARE_GUEST: &str = "otherGuest64";
/// Virtual hardware family written for a VMware-dialect export when the profile names none: vmx-10
/// runs on ESXi 5.5 and later (VMware KB 1003746).
pub const DEFAULT_HARDWARE_VERSION: &str = "vmx-10";

/// Where a package's files live.
#[derive(Debug)]
pub enum Source {
    /// `dir/name.ovf` with files beside it.
    Dir(PathBuf),
    /// An OVA archive.
    Ova(Ova),
}

/// An opened package.
#[derive(Debug)]
pub struct Package {
    /// Where its files are.
    pub source: Source,
    /// Descriptor file name.
    pub descriptor_name: String,
    /// Descriptor text.
    pub descriptor_text: String,
    /// Parsed descriptor.
    pub descriptor: Descriptor,
    /// Manifest, if present (`name.mf`).
    pub manifest: Option<(String, Vec<u8>)>,
    /// Certificate file, if present (`name.cert`).
    pub cert: Option<(String, String)>,
}

/// Check that a name from a descriptor is a plain relative path inside the package.
pub fn safe_name(href: &str) -> Result<&str> {
    let bad = href.is_empty()
        || href.contains("://")
        || href.contains('\\')
        || Path::new(href)
            .components()
            .any(|c| !matches!(c, Component::Normal(_)));
    if bad {
        return Err(OvfError::Invalid(format!(
            "file reference '{href}' is not a plain relative name inside the package"
        )));
    }
    Ok(href)
}

fn with_ext(name: &str, ext: &str) -> String {
    match name.rsplit_once('.') {
        Some((stem, _)) => format!("{stem}.{ext}"),
        None => format!("{name}.{ext}"),
    }
}

impl Package {
    /// Open a `.ova` or `.ovf`.
    pub fn open(path: &Path) -> Result<Package> {
        let is_ova = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ova"));
        if is_ova {
            let ova = Ova::open(path)?;
            let first = ova
                .members
                .first()
                .ok_or_else(|| OvfError::Invalid(format!("{}: empty archive", path.display())))?;
            if !first.name.to_ascii_lowercase().ends_with(".ovf") {
                return Err(OvfError::Invalid(format!(
                    "{}: first member '{}' is not the .ovf descriptor (DSP0243 §5.3)",
                    path.display(),
                    first.name
                )));
            }
            let name = first.name.clone();
            let bytes = ova.read_small(&name, MAX_DESCRIPTOR_BYTES)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| OvfError::Invalid(format!("{name}: descriptor is not UTF-8")))?;
            let descriptor = envelope::parse(&text)?;
            let mf = with_ext(&name, "mf");
            let manifest = match ova.member(&mf) {
                Some(_) => Some((
                    mf.clone(),
                    ova.read_small(&mf, manifest::MAX_MANIFEST_BYTES as u64)?,
                )),
                None => None,
            };
            let cert_name = with_ext(&name, "cert");
            let cert = match ova.member(&cert_name) {
                Some(_) => {
                    let b = ova.read_small(&cert_name, sign::MAX_CERT_BYTES)?;
                    Some((cert_name, String::from_utf8_lossy(&b).into_owned()))
                }
                None => None,
            };
            Ok(Package {
                source: Source::Ova(ova),
                descriptor_name: name,
                descriptor_text: text,
                descriptor,
                manifest,
                cert,
            })
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| OvfError::Usage(format!("{}: not a file name", path.display())))?
                .to_string();
            let text = read_text(path, MAX_DESCRIPTOR_BYTES)?;
            let descriptor = envelope::parse(&text)?;
            let mf = with_ext(&name, "mf");
            let manifest = if dir.join(&mf).exists() {
                let b = read_text(&dir.join(&mf), manifest::MAX_MANIFEST_BYTES as u64)?;
                Some((mf, b.into_bytes()))
            } else {
                None
            };
            let cert_name = with_ext(&name, "cert");
            let cert = if dir.join(&cert_name).exists() {
                Some((
                    cert_name.clone(),
                    read_text(&dir.join(&cert_name), sign::MAX_CERT_BYTES)?,
                ))
            } else {
                None
            };
            Ok(Package {
                source: Source::Dir(dir),
                descriptor_name: name,
                descriptor_text: text,
                descriptor,
                manifest,
                cert,
            })
        }
    }

    /// Size of a package file, `None` when absent.
    pub fn file_size(&self, name: &str) -> Result<Option<u64>> {
        let name = safe_name(name)?;
        match &self.source {
            Source::Ova(o) => Ok(o.member(name).map(|m| m.size)),
            Source::Dir(d) => Ok(std::fs::metadata(d.join(name)).ok().map(|m| m.len())),
        }
    }

    /// Stream one package file as stored.
    pub fn open_file(&self, name: &str) -> Result<Box<dyn Read>> {
        let name = safe_name(name)?;
        match &self.source {
            Source::Ova(o) => {
                let m = o
                    .member(name)
                    .ok_or_else(|| OvfError::Invalid(format!("package has no file '{name}'")))?;
                Ok(Box::new(o.reader(m)))
            }
            Source::Dir(d) => {
                let p = d.join(name);
                Ok(Box::new(
                    std::fs::File::open(&p).map_err(|e| OvfError::io("open", &p, e))?,
                ))
            }
        }
    }

    /// The stored names making up a File reference (one, or the chunks `href.000000000`, …).
    pub fn file_parts(&self, f: &FileRef) -> Result<Vec<String>> {
        if f.chunk_size.is_none() {
            return Ok(vec![f.href.clone()]);
        }
        let mut parts = Vec::new();
        for i in 0..envelope::MAX_ENTRIES {
            let n = format!("{}.{i:09}", f.href);
            if self.file_size(&n)?.is_none() {
                break;
            }
            parts.push(n);
        }
        if parts.is_empty() {
            return Err(OvfError::Invalid(format!(
                "no chunks of '{}' in the package",
                f.href
            )));
        }
        Ok(parts)
    }

    /// The content of a File reference: chunks joined and gzip undone.
    pub fn open_content(&self, f: &FileRef) -> Result<Box<dyn Read>> {
        let mut readers = Vec::new();
        for p in self.file_parts(f)? {
            readers.push(self.open_file(&p)?);
        }
        let joined: Box<dyn Read> = Box::new(Chain {
            parts: readers,
            current: 0,
        });
        if f.compression.as_deref() == Some("gzip") {
            Ok(Box::new(flate2::read::MultiGzDecoder::new(joined)))
        } else {
            Ok(joined)
        }
    }

    /// Verify the package: references present with their declared sizes, every manifest digest,
    /// and the certificate's signature over the manifest.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut r = VerifyReport::default();
        for f in &self.descriptor.files {
            let parts = match self.file_parts(f) {
                Ok(p) => p,
                Err(e) => {
                    r.problems.push(e.to_string());
                    continue;
                }
            };
            let mut total = 0u64;
            for p in &parts {
                match self.file_size(p) {
                    Ok(Some(s)) => total += s,
                    Ok(None) => r.problems.push(format!("referenced file '{p}' is missing")),
                    Err(e) => r.problems.push(e.to_string()),
                }
            }
            if let (Some(want), None) = (f.size, f.chunk_size) {
                if want != total {
                    r.problems.push(format!(
                        "file '{}' is {total} bytes, the descriptor says {want}",
                        f.href
                    ));
                }
            }
        }
        if let Some((mf_name, mf)) = &self.manifest {
            let text = std::str::from_utf8(mf)
                .map_err(|_| OvfError::Invalid(format!("{mf_name}: not UTF-8")))?;
            let m = Manifest::parse(text)?;
            if m.get(&self.descriptor_name).is_none() {
                r.problems.push(format!(
                    "manifest has no entry for '{}'",
                    self.descriptor_name
                ));
            }
            for e in &m.entries {
                let actual = if e.name == self.descriptor_name {
                    manifest::digest_bytes(e.algorithm, self.descriptor_text.as_bytes())
                } else {
                    let mut rd = match self.open_file(&e.name) {
                        Ok(rd) => rd,
                        Err(err) => {
                            r.problems
                                .push(format!("manifest entry '{}': {err}", e.name));
                            continue;
                        }
                    };
                    manifest::digest_reader(e.algorithm, &mut rd)
                        .map_err(|err| OvfError::io("read", &e.name, err))?
                };
                if actual == e.digest {
                    r.digests_ok.push(e.name.clone());
                } else {
                    r.problems.push(format!(
                        "{}({}) is {actual}, the manifest says {}",
                        e.algorithm.name(),
                        e.name,
                        e.digest
                    ));
                }
            }
            if let Some((_, cert)) = &self.cert {
                match sign::verify(cert, mf_name, mf) {
                    Ok(info) => r.signature = Some(info),
                    Err(e) => r.problems.push(e.to_string()),
                }
            }
        } else if self.cert.is_some() {
            r.problems
                .push("a certificate without a manifest signs nothing".into());
        }
        Ok(r)
    }
}

struct Chain {
    parts: Vec<Box<dyn Read>>,
    current: usize,
}

impl Read for Chain {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(r) = self.parts.get_mut(self.current) {
            let n = r.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.current += 1;
        }
        Ok(0)
    }
}

/// What [`Package::verify`] found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Files whose manifest digest matched.
    pub digests_ok: Vec<String>,
    /// The signature, when a certificate verified.
    pub signature: Option<SignatureInfo>,
    /// Every problem found; empty means the package verified.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Whether nothing was wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Extract an OVA into `dir` (created if needed) as a directory package; returns the path of the
/// `.ovf`. Member names must be plain relative names; nothing outside `dir` is written and existing
/// files are not overwritten.
pub fn unpack(ova_path: &Path, dir: &Path) -> Result<PathBuf> {
    let pkg = Package::open(ova_path)?;
    let Source::Ova(ova) = &pkg.source else {
        return Err(OvfError::Usage(format!(
            "{} is not an OVA",
            ova_path.display()
        )));
    };
    std::fs::create_dir_all(dir).map_err(|e| OvfError::io("create", dir, e))?;
    for m in &ova.members {
        let name = safe_name(m.name.trim_start_matches("./"))?;
        if Path::new(name).components().count() != 1 {
            return Err(OvfError::Invalid(format!(
                "OVA member '{name}' is not a plain file name"
            )));
        }
        let dst = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)
            .map_err(|e| OvfError::io("create", &dst, e))?;
        std::io::copy(&mut ova.reader(m), &mut f).map_err(|e| OvfError::io("write", &dst, e))?;
    }
    Ok(dir.join(&pkg.descriptor_name))
}

/// A disk to put in a package.
#[derive(Debug, Clone)]
pub enum DiskInput {
    /// Any image vmi reads; converted to VMDK streamOptimized on the way.
    Convert(PathBuf),
    /// A file packaged byte for byte (already in the format the descriptor will name).
    AsIs {
        /// The file.
        path: PathBuf,
        /// Its guest capacity in bytes.
        capacity: u64,
        /// Format URI for the descriptor.
        format_uri: String,
    },
}

/// How to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// OVF 2.x instead of 1.x.
    pub ovf2: bool,
    /// Leave out VMware extensions.
    pub no_vmware: bool,
    /// Sign with this PEM private key and certificate.
    pub sign: Option<(String, String)>,
}

/// Convert `src` to a VMDK streamOptimized file at `dst` (the one call export needs per disk).
pub fn convert_to_stream_vmdk(src: &Path, dst: &Path) -> Result<u64> {
    let img = Image::open(src, &OpenOptions::new()).map_err(|e| OvfError::disk(src, e))?;
    let size = img.virtual_size();
    let mut o = FormatOptions::new();
    o.set("subformat", "streamOptimized");
    let target = Target {
        path: dst.to_path_buf(),
        format: Format::Vmdk,
        create: CreateOptions::new(size).options(o),
    };
    vmi_convert::convert_to_path(&img, &target, &ConvertOptions::default())
        .map_err(|e| OvfError::disk(src, e))?;
    Ok(size)
}

/// Export `disks` with `profile` to `out`: an `.ova` archive, or otherwise a directory package
/// written as `out` (the `.ovf`) with its files beside it. Returns the descriptor written.
pub fn export(
    disks: &[DiskInput],
    profile: &HardwareProfile,
    out: &Path,
    opts: &ExportOptions,
) -> Result<Descriptor> {
    profile.validate()?;
    let is_ova = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("ova"));
    let stem = out
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| OvfError::Usage(format!("{}: no file name", out.display())))?
        .to_string();
    let out_dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
    if out.exists() {
        return Err(OvfError::Usage(format!("{} already exists", out.display())));
    }
    // Disks go to a work directory beside the output (the package directory itself for .ovf).
    let work = if is_ova {
        let w = out_dir.join(format!(".{stem}.vmi-export"));
        std::fs::create_dir(&w).map_err(|e| OvfError::io("create", &w, e))?;
        Some(w)
    } else {
        None
    };
    let result = export_into(
        disks,
        profile,
        out,
        &stem,
        work.as_deref().unwrap_or(&out_dir),
        opts,
    );
    if let Some(w) = &work {
        let _ = std::fs::remove_dir_all(w);
    }
    if result.is_err() && is_ova {
        let _ = std::fs::remove_file(out);
    }
    result
}

fn export_into(
    disks: &[DiskInput],
    profile: &HardwareProfile,
    out: &Path,
    stem: &str,
    work: &Path,
    opts: &ExportOptions,
) -> Result<Descriptor> {
    let is_ova = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("ova"));
    let mut profile = profile.clone();
    if !opts.no_vmware {
        // vSphere deploys need a guest OS and a virtual hardware family: default to "Other
        // (64-bit)" (CIM OsType 1, VMware `otherGuest64`) and vmx-10 (ESXi 5.5 and later).
        let g = &mut profile.guest_os;
        if g.cim_id.is_none() && g.vmware_id.is_none() && g.description.is_none() {
            g.cim_id = Some(1);
            g.vmware_id = Some(DEFAULT_VMWARE_GUEST.into());
        }
        if profile.hardware_version.is_none() {
            profile.hardware_version = Some(DEFAULT_HARDWARE_VERSION.into());
        }
    }
    let mut files: Vec<(String, u64, String)> = Vec::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let name = format!("{stem}-disk{}.vmdk", i + 1);
        let (path, capacity, uri) = match d {
            DiskInput::Convert(src) => {
                let dst = work.join(&name);
                refuse_existing(&dst)?;
                let cap = convert_to_stream_vmdk(src, &dst)?;
                (dst, cap, VMDK_STREAM_URI.to_string())
            }
            DiskInput::AsIs {
                path,
                capacity,
                format_uri,
            } => {
                let n = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| OvfError::Usage(format!("{}: no file name", path.display())))?;
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("img");
                let name = if is_ova {
                    n.to_string()
                } else {
                    format!("{stem}-disk{}.{ext}", i + 1)
                };
                let dst = if is_ova {
                    path.clone()
                } else {
                    work.join(&name)
                };
                if !is_ova {
                    refuse_existing(&dst)?;
                    std::fs::copy(path, &dst).map_err(|e| OvfError::io("copy", path, e))?;
                }
                files.push((name, 0, format_uri.clone()));
                paths.push(dst.clone());
                let size = std::fs::metadata(&dst)
                    .map_err(|e| OvfError::io("stat", &dst, e))?
                    .len();
                if let Some(last) = files.last_mut() {
                    last.1 = size;
                }
                set_capacity(&mut profile, i, *capacity);
                continue;
            }
        };
        let size = std::fs::metadata(&path)
            .map_err(|e| OvfError::io("stat", &path, e))?
            .len();
        files.push((name, size, uri));
        paths.push(path);
        set_capacity(&mut profile, i, capacity);
    }
    let mut d = envelope::descriptor_for(&profile, &files);
    let wopts = WriteOptions {
        version: if opts.ovf2 {
            OvfVersion::V2
        } else {
            OvfVersion::V1
        },
        vmware: !opts.no_vmware,
    };
    let text = envelope::write(&d, &wopts)?;
    d = envelope::parse(&text)?;
    let ovf_name = format!("{stem}.ovf");
    let mf_name = format!("{stem}.mf");
    let cert_name = format!("{stem}.cert");
    let mut m = Manifest::default();
    m.entries.push(Entry {
        algorithm: Algorithm::Sha256,
        name: ovf_name.clone(),
        digest: manifest::digest_bytes(Algorithm::Sha256, text.as_bytes()),
    });
    for ((name, _, _), path) in files.iter().zip(&paths) {
        let mut f = std::fs::File::open(path).map_err(|e| OvfError::io("open", path, e))?;
        let digest = manifest::digest_reader(Algorithm::Sha256, &mut f)
            .map_err(|e| OvfError::io("read", path, e))?;
        m.entries.push(Entry {
            algorithm: Algorithm::Sha256,
            name: name.clone(),
            digest,
        });
    }
    let mf_text = m.to_text();
    let cert = match &opts.sign {
        Some((key, cert)) => Some(sign::sign(&mf_name, mf_text.as_bytes(), key, cert)?),
        None => None,
    };
    if is_ova {
        let mut w = OvaWriter::create(out)?;
        w.add_bytes(&ovf_name, text.as_bytes())?;
        w.add_bytes(&mf_name, mf_text.as_bytes())?;
        if let Some(c) = &cert {
            w.add_bytes(&cert_name, c.as_bytes())?;
        }
        for ((name, _, _), path) in files.iter().zip(&paths) {
            w.add_file(name, path)?;
        }
        w.finish()?;
    } else {
        let write = |name: &str, data: &[u8]| {
            let p = work.join(name);
            refuse_existing(&p)?;
            std::fs::write(&p, data).map_err(|e| OvfError::io("write", &p, e))
        };
        write(&mf_name, mf_text.as_bytes())?;
        if let Some(c) = &cert {
            write(&cert_name, c.as_bytes())?;
        }
        std::fs::write(out, &text).map_err(|e| OvfError::io("write", out, e))?;
    }
    Ok(d)
}

/// Directory packages never overwrite: a file already at `p` is an error.
fn refuse_existing(p: &Path) -> Result<()> {
    if p.exists() {
        return Err(OvfError::Usage(format!("{} already exists", p.display())));
    }
    Ok(())
}

fn set_capacity(p: &mut HardwareProfile, i: usize, capacity: u64) {
    match p.disks.get_mut(i) {
        Some(d) => d.capacity = capacity,
        None => p.disks.push(DiskProfile {
            capacity,
            controller: p.disks.last().map(|d| d.controller).unwrap_or_default(),
            format: None,
            file: None,
        }),
    }
}

/// Open the disk behind profile disk `i` for reading, in place when the package stores it plainly
/// (an OVA member or a file beside the descriptor); gzip-compressed or chunked files are first
/// unpacked into `scratch`.
pub fn open_disk(pkg: &Package, i: usize, scratch: &Path) -> Result<Image> {
    let d = &pkg.descriptor;
    let disk_id = d
        .disk_ids
        .get(i)
        .ok_or_else(|| OvfError::Usage(format!("the package has no disk {i}")))?;
    let file = d
        .disks
        .iter()
        .find(|k| &k.disk_id == disk_id)
        .and_then(|k| k.file_ref.as_ref())
        .and_then(|r| d.files.iter().find(|f| &f.id == r))
        .ok_or_else(|| OvfError::Invalid(format!("disk '{disk_id}' has no file")))?;
    let gate = Gate::deny_all();
    let plain =
        file.compression.as_deref().is_none_or(|c| c == "identity") && file.chunk_size.is_none();
    if plain {
        let name = safe_name(&file.href)?;
        match &pkg.source {
            Source::Ova(o) => {
                let m = o
                    .member(name)
                    .ok_or_else(|| OvfError::Invalid(format!("package has no file '{name}'")))?;
                let shown = o.path().join(name);
                return Image::from_storage(Box::new(o.storage(m)), &shown, None, false, &gate)
                    .map_err(|e| OvfError::disk(shown, e));
            }
            Source::Dir(dir) => {
                let p = dir.join(name);
                return Image::open(&p, &OpenOptions::new().gate(gate))
                    .map_err(|e| OvfError::disk(p, e));
            }
        }
    }
    let tmp = scratch.join(format!(".unpacked-{i}"));
    let mut out = std::fs::File::create(&tmp).map_err(|e| OvfError::io("create", &tmp, e))?;
    let mut r = pkg.open_content(file)?;
    std::io::copy(&mut r, &mut out).map_err(|e| OvfError::io("unpack", &tmp, e))?;
    Image::open(&tmp, &OpenOptions::new().gate(gate)).map_err(|e| OvfError::disk(tmp, e))
}

/// Import a package: convert every disk to `format` in `out_dir` and write `profile.toml`.
/// Returns the profile written.
pub fn import(pkg: &Package, out_dir: &Path, format: Format) -> Result<HardwareProfile> {
    std::fs::create_dir_all(out_dir).map_err(|e| OvfError::io("create", out_dir, e))?;
    let mut profile = pkg.descriptor.profile.clone();
    let base = if profile.name.is_empty() {
        "disk".to_string()
    } else {
        sanitize(&profile.name)
    };
    for i in 0..profile.disks.len() {
        let img = open_disk(pkg, i, out_dir)?;
        let name = format!("{base}-disk{}.{}", i + 1, ext(format));
        let dst = out_dir.join(&name);
        let target = Target {
            path: dst.clone(),
            format,
            create: CreateOptions::new(img.virtual_size()),
        };
        vmi_convert::convert_to_path(&img, &target, &ConvertOptions::default())
            .map_err(|e| OvfError::disk(&dst, e))?;
        let _ = std::fs::remove_file(out_dir.join(format!(".unpacked-{i}")));
        profile.disks[i].file = Some(name);
        profile.disks[i].format = Some(format.name().to_string());
    }
    profile.save(&out_dir.join("profile.toml"))?;
    Ok(profile)
}

fn ext(f: Format) -> &'static str {
    match f {
        Format::Vpc => "vhd",
        Format::Raw => "img",
        other => other.name(),
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_name_refuses_escapes_urls_and_absolute_paths() {
        assert!(safe_name("disk1.vmdk").is_ok());
        assert!(safe_name("sub/disk1.vmdk").is_ok());
        for bad in [
            "../x",
            "/etc/passwd",
            "http://h/x",
            "a/../../b",
            "",
            "a\\b",
            "./x",
        ] {
            assert!(safe_name(bad).is_err(), "{bad}");
        }
    }
}
