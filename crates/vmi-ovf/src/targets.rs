//! `convert --target T`: produce what a target accepts from any image — Azure a fixed VHD rounded
//! up to a whole MiB (`force_size`, so the footer keeps that exact size); GCP `disk.raw` in a
//! gzipped tar; ESXi, AWS and Workstation an OVA with a streamOptimized VMDK and a VMware-dialect
//! descriptor; KVM/OpenStack qcow2; Hyper-V VHDX; VirtualBox VDI.

use crate::compat::Target;
use crate::error::{OvfError, Result};
use crate::ova::{ustar_header, BLOCK};
use crate::package::{self, DiskInput, ExportOptions};
use crate::profile::{DiskProfile, HardwareProfile};
use std::io::Write;
use std::path::{Path, PathBuf};
use vmi_convert::{ConvertOptions, Target as ConvertTarget};
use vmi_disk::{CreateOptions, Format, FormatOptions, Image, OpenOptions};

/// What [`convert_for_target`] writes for a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// One image file of this format, with these creation options.
    Image {
        /// Output format.
        format: Format,
        /// `-o` options.
        options: Vec<(&'static str, &'static str)>,
        /// Round the virtual size up to a multiple of this many bytes.
        round_to: u64,
    },
    /// An OVA with streamOptimized VMDKs.
    Ova,
    /// `disk.raw` in a gzipped tar.
    GzipTarRaw,
}

/// The plan for a target.
pub fn plan(target: &Target) -> Plan {
    match target {
        Target::Azure => Plan::Image {
            format: Format::Vpc,
            options: vec![("subformat", "fixed"), ("force_size", "on")],
            round_to: 1 << 20,
        },
        Target::Gcp => Plan::GzipTarRaw,
        Target::VmwareEsxi(_) | Target::Aws => Plan::Ova,
        Target::VmwareWorkstation => Plan::Image {
            format: Format::Vmdk,
            options: vec![],
            round_to: 1,
        },
        Target::Kvm | Target::Openstack => Plan::Image {
            format: Format::Qcow2,
            options: vec![],
            round_to: 1,
        },
        Target::HypervGen1 | Target::HypervGen2 => Plan::Image {
            format: Format::Vhdx,
            options: vec![],
            round_to: 1 << 20,
        },
        Target::Virtualbox => Plan::Image {
            format: Format::Vdi,
            options: vec![],
            round_to: 1,
        },
    }
}

fn convert_one(
    img: &Image,
    dst: &Path,
    format: Format,
    opts: &[(&str, &str)],
    size: u64,
) -> Result<()> {
    let mut o = FormatOptions::new();
    for (k, v) in opts {
        o.set(k, *v);
    }
    let target = ConvertTarget {
        path: dst.to_path_buf(),
        format,
        create: CreateOptions::new(size).options(o),
    };
    vmi_convert::convert_to_path(img, &target, &ConvertOptions::default())
        .map_err(|e| OvfError::disk(dst, e))?;
    Ok(())
}

/// Convert `src` into what `target` accepts, at `out`. `profile` describes the VM for targets that
/// take a package (a one-disk default is used otherwise). Returns the path written.
pub fn convert_for_target(
    src: &Path,
    target: &Target,
    out: &Path,
    profile: Option<&HardwareProfile>,
) -> Result<PathBuf> {
    let img = Image::open(src, &OpenOptions::new()).map_err(|e| OvfError::disk(src, e))?;
    let size = img.virtual_size();
    match plan(target) {
        Plan::Image {
            format,
            options,
            round_to,
        } => {
            let rounded = size
                .div_ceil(round_to)
                .checked_mul(round_to)
                .ok_or_else(|| OvfError::Invalid(format!("size {size} overflows when rounded")))?;
            // VirtualBox with a profile: a `.vbox` next to the disk. Models VirtualBox lacks
            // are refused before converting (the compatibility check names them).
            let vbox = match (target, profile) {
                (Target::Virtualbox, Some(p)) => {
                    let mut p = p.clone();
                    let file = out
                        .file_name()
                        .and_then(|n| n.to_str())
                        .ok_or_else(|| OvfError::Usage(format!("{}: no file name", out.display())))?
                        .to_string();
                    let first = DiskProfile {
                        capacity: rounded,
                        controller: p
                            .disks
                            .first()
                            .map(|d| d.controller)
                            .unwrap_or(crate::profile::Controller::Sata),
                        format: Some(format.name().to_string()),
                        file: Some(file),
                    };
                    match p.disks.first_mut() {
                        Some(d) => *d = first,
                        None => p.disks.push(first),
                    }
                    // One disk is converted: the machine gets that one.
                    p.disks.truncate(1);
                    crate::native::vbox::generate(&p)?;
                    Some(p)
                }
                _ => None,
            };
            convert_one(&img, out, format, &options, rounded)?;
            if let Some(p) = vbox {
                let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
                crate::cli::write_vbox(&p, &dir)?;
            }
            Ok(out.to_path_buf())
        }
        Plan::GzipTarRaw => {
            let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
            let raw = dir.join(format!(
                ".{}.disk.raw",
                out.file_name().and_then(|n| n.to_str()).unwrap_or("gcp")
            ));
            convert_one(&img, &raw, Format::Raw, &[], size)?;
            let res = gzip_tar(&raw, "disk.raw", out);
            let _ = std::fs::remove_file(&raw);
            res?;
            Ok(out.to_path_buf())
        }
        Plan::Ova => {
            let mut p = match profile {
                Some(p) => p.clone(),
                None => {
                    let name = src
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or("vm")
                        .to_string();
                    let mut p = HardwareProfile::new(name);
                    p.disks.push(DiskProfile {
                        capacity: size,
                        controller: crate::profile::Controller::Lsilogic,
                        format: None,
                        file: None,
                    });
                    p
                }
            };
            if p.hardware_version.is_none() {
                p.hardware_version = Some("vmx-10".into());
            }
            drop(img);
            package::export(
                &[DiskInput::Convert(src.to_path_buf())],
                &p,
                out,
                &ExportOptions::default(),
            )?;
            Ok(out.to_path_buf())
        }
    }
}

/// Write `src` as the single member `name` of a gzipped tar at `out`.
pub fn gzip_tar(src: &Path, name: &str, out: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| OvfError::io("create", out, e))?;
    let mut gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::default());
    let mut input = std::fs::File::open(src).map_err(|e| OvfError::io("open", src, e))?;
    let size = input
        .metadata()
        .map_err(|e| OvfError::io("stat", src, e))?
        .len();
    let w = |e| OvfError::io("write", out, e);
    gz.write_all(&ustar_header(name, size)?).map_err(w)?;
    let copied = std::io::copy(&mut input, &mut gz).map_err(|e| OvfError::io("read", src, e))?;
    if copied != size {
        return Err(OvfError::Invalid(format!(
            "{}: changed size while being archived",
            src.display()
        )));
    }
    let pad = (BLOCK - size % BLOCK) % BLOCK;
    gz.write_all(&vec![0u8; pad as usize + 1024]).map_err(w)?;
    let inner = gz.finish().map_err(w)?;
    let f = inner
        .into_inner()
        .map_err(|e| OvfError::io("write", out, e.into_error()))?;
    f.sync_all().map_err(|e| OvfError::io("sync", out, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_plan_is_a_fixed_vhd_rounded_to_whole_mib() {
        match plan(&Target::Azure) {
            Plan::Image {
                format,
                options,
                round_to,
            } => {
                assert_eq!(format, Format::Vpc);
                assert!(options.contains(&("subformat", "fixed")));
                assert!(options.contains(&("force_size", "on")));
                assert_eq!(round_to, 1 << 20);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(plan(&Target::Gcp), Plan::GzipTarRaw);
        assert_eq!(plan(&Target::VmwareEsxi(None)), Plan::Ova);
    }

    #[test]
    fn gzip_tar_holds_one_member_gnu_tar_can_list() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("x");
        std::fs::write(&src, vec![5u8; 1000]).unwrap();
        let out = dir.path().join("a.tar.gz");
        gzip_tar(&src, "disk.raw", &out).unwrap();
        let mut d = flate2::read::GzDecoder::new(std::fs::File::open(&out).unwrap());
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut all).unwrap();
        assert_eq!(all.len(), 512 + 1024 + 1024);
        assert_eq!(&all[..8], b"disk.raw");
        assert_eq!(&all[512..1512], &[5u8; 1000][..]);
    }
}
