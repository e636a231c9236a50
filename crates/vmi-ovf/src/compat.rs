//! Target compatibility: which disk formats, controllers, NICs, firmware and hardware versions a
//! hypervisor or cloud accepts, checked against an image and a hardware profile. Every rule has an
//! id and names its source; `docs/compat.md` lists them.

use crate::error::{OvfError, Result};
use crate::profile::*;
use std::fmt;
use std::str::FromStr;

/// A hypervisor or cloud to check against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// VMware ESXi, optionally a release (`7.0`, `8.0u2`) that caps the hardware version.
    VmwareEsxi(Option<String>),
    /// VMware Workstation / Fusion.
    VmwareWorkstation,
    /// Oracle VirtualBox.
    Virtualbox,
    /// KVM through libvirt.
    Kvm,
    /// Hyper-V generation 1 (BIOS, IDE boot).
    HypervGen1,
    /// Hyper-V generation 2 (UEFI, SCSI boot).
    HypervGen2,
    /// AWS VM Import/Export.
    Aws,
    /// Azure (managed disks from uploaded VHDs).
    Azure,
    /// Google Compute Engine image import.
    Gcp,
    /// OpenStack Glance/Nova (KVM).
    Openstack,
}

impl Target {
    /// Every target name `FromStr` accepts (without release suffixes).
    pub const NAMES: [&'static str; 10] = [
        "vmware-esxi",
        "vmware-workstation",
        "virtualbox",
        "kvm",
        "hyperv-gen1",
        "hyperv-gen2",
        "aws",
        "azure",
        "gcp",
        "openstack",
    ];
}

impl FromStr for Target {
    type Err = OvfError;
    fn from_str(s: &str) -> Result<Self> {
        let l = s.to_ascii_lowercase();
        Ok(match l.as_str() {
            "vmware-esxi" | "esxi" => Target::VmwareEsxi(None),
            "vmware-workstation" | "workstation" | "fusion" => Target::VmwareWorkstation,
            "virtualbox" | "vbox" => Target::Virtualbox,
            "kvm" | "libvirt" | "kvm/libvirt" | "qemu" => Target::Kvm,
            "hyperv-gen1" => Target::HypervGen1,
            "hyperv-gen2" => Target::HypervGen2,
            "aws" => Target::Aws,
            "azure" => Target::Azure,
            "gcp" => Target::Gcp,
            "openstack" => Target::Openstack,
            _ => {
                if let Some(rel) = l
                    .strip_prefix("vmware-esxi-")
                    .or_else(|| l.strip_prefix("esxi-"))
                {
                    if esxi_max_hw(rel).is_some() {
                        return Ok(Target::VmwareEsxi(Some(rel.to_string())));
                    }
                    return Err(OvfError::Usage(format!("unknown ESXi release '{rel}'")));
                }
                return Err(OvfError::Usage(format!(
                    "unknown target '{s}' (one of {}, or vmware-esxi-RELEASE)",
                    Target::NAMES.join(", ")
                )));
            }
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Target::VmwareEsxi(Some(r)) => return write!(f, "vmware-esxi-{r}"),
            Target::VmwareEsxi(None) => "vmware-esxi",
            Target::VmwareWorkstation => "vmware-workstation",
            Target::Virtualbox => "virtualbox",
            Target::Kvm => "kvm",
            Target::HypervGen1 => "hyperv-gen1",
            Target::HypervGen2 => "hyperv-gen2",
            Target::Aws => "aws",
            Target::Azure => "azure",
            Target::Gcp => "gcp",
            Target::Openstack => "openstack",
        };
        f.write_str(s)
    }
}

/// Highest virtual hardware version an ESXi release runs (VMware KB 1003746, "Virtual machine
/// hardware versions").
pub fn esxi_max_hw(release: &str) -> Option<u32> {
    Some(match release {
        "5.0" => 8,
        "5.1" => 9,
        "5.5" => 10,
        "6.0" => 11,
        "6.5" => 13,
        "6.7" => 14,
        "6.7u2" => 15,
        "7.0" => 17,
        "7.0u1" => 18,
        "7.0u2" | "7.0u3" => 19,
        "8.0" => 20,
        "8.0u2" | "8.0u3" => 21,
        _ => return None,
    })
}

/// What the checker needs to know about a disk image.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ImageFacts {
    /// qemu format name (`vmdk`, `vpc`, `qcow2`, …).
    pub format: String,
    /// Subformat: VMDK create type (`streamOptimized`, `monolithicSparse`…), VHD `fixed`/`dynamic`.
    pub subformat: Option<String>,
    /// VMDK sparse-extent version (3 for streamOptimized as ESXi writes it), when known.
    pub version: Option<u32>,
    /// Virtual size in bytes.
    pub virtual_size: u64,
}

impl ImageFacts {
    /// Facts from an opened image: its format-specific information (qemu-img style) plus, where
    /// that is silent, the on-disk headers — the VHD footer's disk type (VHD spec "Hard Disk
    /// Footer Format": 2 fixed, 3 dynamic, 4 differencing) and the VMDK sparse header's version
    /// (VMDK 5.0 spec "Hosted Sparse Extent Header").
    pub fn from_image(img: &vmi_disk::Image) -> ImageFacts {
        let info = img.driver().info();
        let data = &info.format_specific["data"];
        let mut subformat = ["create-type", "subformat", "type"]
            .iter()
            .find_map(|k| data[*k].as_str().map(str::to_string));
        let mut version = data["version"].as_u64().and_then(|v| u32::try_from(v).ok());
        let file = img.driver().file(0).ok();
        match (img.format(), file) {
            (vmi_disk::Format::Vpc, Some(f)) if subformat.is_none() => {
                let mut footer = [0u8; 512];
                let len = f.len().unwrap_or(0);
                if len >= 512
                    && f.read_at(&mut footer, len - 512).is_ok()
                    && &footer[..8] == b"conectix"
                {
                    subformat = match u32::from_be_bytes([
                        footer[60], footer[61], footer[62], footer[63],
                    ]) {
                        2 => Some("fixed".into()),
                        3 => Some("dynamic".into()),
                        4 => Some("differencing".into()),
                        _ => None,
                    };
                }
            }
            (vmi_disk::Format::Vmdk, Some(f)) if version.is_none() => {
                let mut head = [0u8; 8];
                if f.read_at(&mut head, 0).is_ok() && &head[..4] == b"KDMV" {
                    version = Some(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
                }
            }
            _ => {}
        }
        ImageFacts {
            format: img.format().name().to_string(),
            subformat,
            version,
            virtual_size: img.virtual_size(),
        }
    }
}

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The target refuses it.
    Error,
    /// It works only with extra care (drivers, conversion on import).
    Warning,
}

/// One compatibility problem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Rule id, as listed in `docs/compat.md`.
    pub rule: &'static str,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong, with the values.
    pub message: String,
    /// Where the rule comes from.
    pub source: &'static str,
}

const SRC_ESXI_VMDK: &str =
    "VMware OVF Tool User's Guide: OVA disks are streamOptimized VMDK (sparse extent version 3)";
const SRC_ESXI_HW: &str = "VMware KB 1003746: virtual machine hardware versions per ESXi release";
const SRC_VMWARE_DEV: &str =
    "VMware vSphere Virtual Machine Administration: supported controllers and adapters";
const SRC_VBOX: &str = "VirtualBox User Manual ch. 5 (storage) and ch. 6 (networking)";
const SRC_QEMU: &str =
    "QEMU/libvirt domain XML documentation: disk buses, controller and NIC models";
const SRC_HYPERV: &str =
    "Microsoft Learn: Should I create a generation 1 or 2 virtual machine in Hyper-V?";
const SRC_AWS: &str =
    "AWS VM Import/Export User Guide: image formats (VMDK streamOptimized, VHD/VHDX, raw, OVA)";
const SRC_AZURE: &str =
    "Microsoft Learn: Prepare a Windows/Linux VHD to upload to Azure (fixed VHD, size a whole MiB)";
const SRC_GCP: &str =
    "Google Cloud: Import virtual disks / manually import boot disks (disk.raw in a gzipped tar)";
const SRC_OPENSTACK: &str =
    "OpenStack Glance: disk formats; Nova libvirt driver: hw_disk_bus / hw_vif_model";

fn problem(
    out: &mut Vec<Problem>,
    rule: &'static str,
    sev: Severity,
    source: &'static str,
    msg: String,
) {
    out.push(Problem {
        rule,
        severity: sev,
        message: msg,
        source,
    });
}

/// Check an image and/or a profile against a target.
pub fn check(
    image: Option<&ImageFacts>,
    profile: Option<&HardwareProfile>,
    target: &Target,
) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(img) = image {
        check_image(img, target, &mut out);
    }
    if let Some(p) = profile {
        check_profile(p, target, &mut out);
    }
    out
}

fn check_image(img: &ImageFacts, t: &Target, out: &mut Vec<Problem>) {
    use Severity::*;
    let f = img.format.as_str();
    let sub = img.subformat.as_deref();
    let (accepted, src): (&[&str], &'static str) = match t {
        Target::VmwareEsxi(_) | Target::VmwareWorkstation => (&["vmdk"], SRC_VMWARE_DEV),
        Target::Virtualbox => (&["vdi", "vmdk", "vpc", "vhdx"], SRC_VBOX),
        Target::Kvm => (&["raw", "qcow2"], SRC_QEMU),
        Target::HypervGen1 => (&["vpc", "vhdx"], SRC_HYPERV),
        Target::HypervGen2 => (&["vhdx"], SRC_HYPERV),
        Target::Aws => (&["vmdk", "vpc", "vhdx", "raw"], SRC_AWS),
        Target::Azure => (&["vpc"], SRC_AZURE),
        Target::Gcp => (&["raw"], SRC_GCP),
        Target::Openstack => (
            &["qcow2", "raw", "vmdk", "vpc", "vhdx", "vdi", "iso"],
            SRC_OPENSTACK,
        ),
    };
    if !accepted.contains(&f) {
        let sev = if matches!(t, Target::Kvm | Target::Gcp) {
            Warning
        } else {
            Error
        };
        problem(
            out,
            "disk-format",
            sev,
            src,
            format!("{t} takes {} disks, not {f}", accepted.join("/")),
        );
    }
    match t {
        Target::VmwareEsxi(_) | Target::Aws if f == "vmdk" => {
            if sub.is_some_and(|s| s != "streamOptimized") {
                problem(
                    out,
                    "vmdk-stream-optimized",
                    Error,
                    if *t == Target::Aws {
                        SRC_AWS
                    } else {
                        SRC_ESXI_VMDK
                    },
                    format!(
                        "{t} imports VMDK streamOptimized, this one is {}",
                        sub.unwrap_or("?")
                    ),
                );
            }
            if let Some(v) = img.version.filter(|&v| v != 3) {
                if sub == Some("streamOptimized") {
                    problem(out, "vmdk-version-3", Error, SRC_ESXI_VMDK,
                        format!("{t} needs streamOptimized sparse extent version 3, this one is version {v}"));
                }
            }
        }
        Target::Azure => {
            if f == "vpc" && sub.is_some_and(|s| s != "fixed") {
                problem(
                    out,
                    "azure-fixed-vhd",
                    Error,
                    SRC_AZURE,
                    format!(
                        "Azure takes fixed VHDs only, this one is {}",
                        sub.unwrap_or("?")
                    ),
                );
            }
            if img.virtual_size % (1 << 20) != 0 {
                problem(out, "azure-whole-mib", Error, SRC_AZURE, format!(
                    "Azure needs a virtual size that is a whole MiB; {} bytes is {} bytes over {} MiB",
                    img.virtual_size, img.virtual_size % (1 << 20), img.virtual_size >> 20));
            }
        }
        _ => {}
    }
}

fn controllers_for(t: &Target) -> (&'static [Controller], &'static str) {
    use Controller::*;
    match t {
        Target::VmwareEsxi(_) | Target::VmwareWorkstation => (
            &[Ide, Sata, Lsilogic, Lsilogicsas, Buslogic, Pvscsi, Nvme],
            SRC_VMWARE_DEV,
        ),
        Target::Virtualbox => (
            &[Ide, Sata, Lsilogic, Lsilogicsas, Buslogic, Nvme, VirtioScsi],
            SRC_VBOX,
        ),
        // libvirt's domain schema has no emulated NVMe disk bus.
        Target::Kvm | Target::Openstack => (
            &[
                Ide,
                Sata,
                Lsilogic,
                Lsilogicsas,
                Pvscsi,
                VirtioBlk,
                VirtioScsi,
            ],
            SRC_QEMU,
        ),
        Target::HypervGen1 => (
            &[Ide, Lsilogic, Lsilogicsas, Buslogic, Pvscsi, VirtioScsi],
            SRC_HYPERV,
        ),
        Target::HypervGen2 => (
            &[Lsilogic, Lsilogicsas, Buslogic, Pvscsi, VirtioScsi],
            SRC_HYPERV,
        ),
        // Clouds attach disks their own way; the guest needs the drivers (checked below).
        Target::Aws | Target::Azure | Target::Gcp => (&Controller::ALL, SRC_AWS),
    }
}

fn nic_ok(t: &Target, m: &NicModel) -> Option<(bool, &'static str)> {
    use NicModel::*;
    Some(match t {
        Target::VmwareEsxi(_) | Target::VmwareWorkstation => (
            matches!(m, E1000 | E1000e | Vmxnet3 | Pcnet32),
            SRC_VMWARE_DEV,
        ),
        Target::Virtualbox => (matches!(m, E1000 | Pcnet32 | VirtioNet), SRC_VBOX),
        Target::Kvm | Target::Openstack => (
            matches!(m, E1000 | E1000e | Vmxnet3 | VirtioNet | Rtl8139 | Pcnet32),
            SRC_QEMU,
        ),
        Target::HypervGen1 | Target::HypervGen2 => (matches!(m, HypervSynthetic), SRC_HYPERV),
        Target::Aws | Target::Azure | Target::Gcp => return None,
    })
}

fn check_profile(p: &HardwareProfile, t: &Target, out: &mut Vec<Problem>) {
    use Severity::*;
    let (ctls, src) = controllers_for(t);
    let used: Vec<Controller> = p
        .disks
        .iter()
        .map(|d| d.controller)
        .chain(p.cdroms.iter().map(|c| c.controller))
        .collect();
    let mut reported = Vec::new();
    for c in used {
        if !ctls.contains(&c) && !reported.contains(&c) {
            reported.push(c);
            let hyperv = matches!(t, Target::HypervGen1 | Target::HypervGen2);
            let msg = if hyperv && c == Controller::Ide {
                "Hyper-V generation 2 has no IDE controller; attach disks to SCSI".to_string()
            } else {
                format!("{t} has no {} controller", c.name())
            };
            problem(out, "controller-model", Error, src, msg);
        }
    }
    if matches!(t, Target::HypervGen1 | Target::HypervGen2) {
        if let Some(d) = p.disks.first() {
            if *t == Target::HypervGen1 && d.controller != Controller::Ide {
                problem(
                    out,
                    "hyperv-gen1-ide-boot",
                    Error,
                    SRC_HYPERV,
                    format!(
                        "Hyper-V generation 1 boots only from IDE; the boot disk is on {}",
                        d.controller.name()
                    ),
                );
            }
        }
    }
    for n in &p.nics {
        if let Some((false, src)) = nic_ok(t, &n.model) {
            problem(
                out,
                "nic-model",
                Error,
                src,
                format!("{t} has no {} network adapter", n.model.name()),
            );
        }
    }
    let uefi = p.firmware.kind == FirmwareKind::Uefi;
    match t {
        Target::HypervGen1 if uefi => problem(
            out,
            "firmware",
            Error,
            SRC_HYPERV,
            "Hyper-V generation 1 boots with BIOS only; use hyperv-gen2 for UEFI".into(),
        ),
        Target::HypervGen2 if !uefi => problem(
            out,
            "firmware",
            Error,
            SRC_HYPERV,
            "Hyper-V generation 2 boots with UEFI only; use hyperv-gen1 for BIOS".into(),
        ),
        _ => {}
    }
    if p.firmware.secure_boot && matches!(t, Target::Virtualbox) {
        problem(
            out,
            "secure-boot",
            Warning,
            SRC_VBOX,
            "VirtualBox supports secure boot from 7.0 only".into(),
        );
    }
    if let Target::VmwareEsxi(release) = t {
        let hw = p.hardware_version.as_deref().and_then(|h| {
            h.split(',')
                .filter_map(|v| v.trim().strip_prefix("vmx-"))
                .filter_map(|v| v.parse::<u32>().ok())
                .min()
        });
        if let (Some(hw), Some(max)) = (hw, release.as_deref().and_then(esxi_max_hw)) {
            if hw > max {
                problem(
                    out,
                    "hardware-version",
                    Error,
                    SRC_ESXI_HW,
                    format!(
                        "hardware version vmx-{hw} is newer than ESXi {} runs (vmx-{max})",
                        release.as_deref().unwrap_or("")
                    ),
                );
            }
        }
        if p.firmware.secure_boot && hw.is_some_and(|h| h < 13) {
            problem(
                out,
                "secure-boot",
                Error,
                SRC_ESXI_HW,
                "UEFI secure boot needs hardware version vmx-13 or later".into(),
            );
        }
        if p.firmware.tpm && hw.is_some_and(|h| h < 14) {
            problem(
                out,
                "tpm",
                Error,
                SRC_ESXI_HW,
                "a virtual TPM needs hardware version vmx-14 or later".into(),
            );
        }
        if p.firmware.tpm && p.firmware.kind != FirmwareKind::Uefi {
            problem(
                out,
                "tpm",
                Error,
                SRC_ESXI_HW,
                "a virtual TPM needs UEFI firmware".into(),
            );
        }
    }
    if matches!(t, Target::Aws) && !p.disks.iter().all(|d| d.controller == Controller::Nvme) {
        problem(out, "aws-nitro-drivers", Warning, SRC_AWS,
            "AWS Nitro instances present disks as NVMe and NICs as ENA: the guest needs those drivers".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(format: &str, sub: Option<&str>, version: Option<u32>, size: u64) -> ImageFacts {
        ImageFacts {
            format: format.into(),
            subformat: sub.map(str::to_string),
            version,
            virtual_size: size,
        }
    }

    fn rules(ps: &[Problem]) -> Vec<&'static str> {
        ps.iter().map(|p| p.rule).collect()
    }

    #[test]
    fn target_names_parse_and_print_back() {
        for n in Target::NAMES {
            assert_eq!(n.parse::<Target>().unwrap().to_string(), n);
        }
        assert_eq!(
            "vmware-esxi-6.7".parse::<Target>().unwrap(),
            Target::VmwareEsxi(Some("6.7".into()))
        );
        assert!("vmware-esxi-9.9".parse::<Target>().is_err());
        assert!("xen".parse::<Target>().is_err());
    }

    /// (target, image, expected rules) for every target's disk rules.
    #[test]
    fn image_rules_table() {
        let mib = 1u64 << 20;
        let cases: Vec<(&str, ImageFacts, Vec<&str>)> = vec![
            (
                "vmware-esxi",
                img("vmdk", Some("streamOptimized"), Some(3), mib),
                vec![],
            ),
            (
                "vmware-esxi",
                img("vmdk", Some("monolithicSparse"), Some(1), mib),
                vec!["vmdk-stream-optimized"],
            ),
            (
                "vmware-esxi",
                img("vmdk", Some("streamOptimized"), Some(1), mib),
                vec!["vmdk-version-3"],
            ),
            (
                "vmware-esxi",
                img("qcow2", None, None, mib),
                vec!["disk-format"],
            ),
            (
                "vmware-workstation",
                img("vmdk", Some("monolithicSparse"), None, mib),
                vec![],
            ),
            ("virtualbox", img("vdi", None, None, mib), vec![]),
            (
                "virtualbox",
                img("qcow2", None, None, mib),
                vec!["disk-format"],
            ),
            ("kvm", img("qcow2", None, None, mib), vec![]),
            ("kvm", img("vmdk", None, None, mib), vec!["disk-format"]),
            (
                "hyperv-gen1",
                img("vpc", Some("dynamic"), None, mib),
                vec![],
            ),
            (
                "hyperv-gen2",
                img("vpc", Some("fixed"), None, mib),
                vec!["disk-format"],
            ),
            ("hyperv-gen2", img("vhdx", None, None, mib), vec![]),
            (
                "aws",
                img("vmdk", Some("streamOptimized"), Some(3), mib),
                vec![],
            ),
            (
                "aws",
                img("vmdk", Some("monolithicFlat"), None, mib),
                vec!["vmdk-stream-optimized"],
            ),
            ("aws", img("qcow2", None, None, mib), vec!["disk-format"]),
            ("azure", img("vpc", Some("fixed"), None, 10 * mib), vec![]),
            (
                "azure",
                img("vpc", Some("dynamic"), None, 10 * mib),
                vec!["azure-fixed-vhd"],
            ),
            (
                "azure",
                img("vpc", Some("fixed"), None, 10 * mib + 512),
                vec!["azure-whole-mib"],
            ),
            ("azure", img("vhdx", None, None, mib), vec!["disk-format"]),
            ("gcp", img("raw", None, None, mib), vec![]),
            ("gcp", img("vmdk", None, None, mib), vec!["disk-format"]),
            ("openstack", img("qcow2", None, None, mib), vec![]),
            ("openstack", img("vmdk", None, None, mib), vec![]),
        ];
        for (t, i, want) in cases {
            let got = check(Some(&i), None, &t.parse().unwrap());
            assert_eq!(rules(&got), want, "{t} {i:?}: {got:?}");
        }
    }

    fn prof(ctl: Controller, nic: NicModel, fw: FirmwareKind) -> HardwareProfile {
        let mut p = HardwareProfile::new("t");
        p.disks.push(DiskProfile {
            capacity: 1 << 30,
            controller: ctl,
            format: None,
            file: None,
        });
        p.nics.push(NicProfile {
            model: nic,
            network: "n".into(),
            mac: MacPolicy::Generated,
        });
        p.firmware.kind = fw;
        p
    }

    /// (target, profile, expected rules) for controllers, NICs and firmware.
    #[test]
    fn profile_rules_table() {
        use Controller::*;
        use FirmwareKind::*;
        use NicModel::*;
        let cases: Vec<(&str, HardwareProfile, Vec<&str>)> = vec![
            ("vmware-esxi", prof(Pvscsi, Vmxnet3, Uefi), vec![]),
            (
                "vmware-esxi",
                prof(VirtioBlk, VirtioNet, Bios),
                vec!["controller-model", "nic-model"],
            ),
            ("vmware-workstation", prof(Nvme, E1000e, Bios), vec![]),
            ("virtualbox", prof(Sata, E1000, Bios), vec![]),
            (
                "virtualbox",
                prof(VirtioScsi, E1000e, Bios),
                vec!["nic-model"],
            ),
            (
                "virtualbox",
                prof(Pvscsi, Vmxnet3, Bios),
                vec!["controller-model", "nic-model"],
            ),
            ("kvm", prof(VirtioBlk, VirtioNet, Uefi), vec![]),
            (
                "kvm",
                prof(Buslogic, HypervSynthetic, Bios),
                vec!["controller-model", "nic-model"],
            ),
            ("hyperv-gen1", prof(Ide, HypervSynthetic, Bios), vec![]),
            (
                "hyperv-gen1",
                prof(Lsilogic, HypervSynthetic, Uefi),
                vec!["hyperv-gen1-ide-boot", "firmware"],
            ),
            ("hyperv-gen2", prof(Lsilogic, HypervSynthetic, Uefi), vec![]),
            (
                "hyperv-gen2",
                prof(Ide, E1000, Bios),
                vec!["controller-model", "nic-model", "firmware"],
            ),
            ("aws", prof(Nvme, E1000, Uefi), vec![]),
            ("aws", prof(Sata, E1000, Bios), vec!["aws-nitro-drivers"]),
            ("azure", prof(Ide, E1000, Bios), vec![]),
            ("gcp", prof(VirtioScsi, VirtioNet, Uefi), vec![]),
            ("openstack", prof(VirtioBlk, VirtioNet, Bios), vec![]),
            (
                "openstack",
                prof(Buslogic, VirtioNet, Bios),
                vec!["controller-model"],
            ),
        ];
        for (t, p, want) in cases {
            let got = check(None, Some(&p), &t.parse().unwrap());
            assert_eq!(rules(&got), want, "{t}: {got:?}");
        }
    }

    #[test]
    fn esxi_release_caps_the_hardware_version_and_gates_tpm() {
        let mut p = prof(Controller::Pvscsi, NicModel::Vmxnet3, FirmwareKind::Uefi);
        p.hardware_version = Some("vmx-19".into());
        let t: Target = "vmware-esxi-6.7".parse().unwrap();
        assert_eq!(rules(&check(None, Some(&p), &t)), ["hardware-version"]);
        p.hardware_version = Some("vmx-13".into());
        p.firmware.tpm = true;
        assert_eq!(rules(&check(None, Some(&p), &t)), ["tpm"]);
        p.hardware_version = Some("vmx-14".into());
        assert!(check(None, Some(&p), &t).is_empty());
        p.firmware.kind = FirmwareKind::Bios;
        assert_eq!(rules(&check(None, Some(&p), &t)), ["tpm"]);
    }

    #[test]
    fn every_problem_names_a_source() {
        let p = prof(
            Controller::VirtioBlk,
            NicModel::VirtioNet,
            FirmwareKind::Uefi,
        );
        for t in Target::NAMES {
            for pr in check(
                Some(&img("qcow2", None, None, 1)),
                Some(&p),
                &t.parse().unwrap(),
            ) {
                assert!(!pr.source.is_empty() && !pr.message.is_empty());
            }
        }
    }
}
