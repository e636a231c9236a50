//! The hardware profile: one model of a virtual machine's virtual hardware, shared by the OVF
//! reader/writer, the native config generators (VMX, libvirt, VirtualBox) and the compatibility
//! checker. Stored as TOML or JSON.

use crate::error::{OvfError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A virtual machine's hardware, independent of any hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    /// VM name.
    pub name: String,
    /// Guest operating system.
    #[serde(default)]
    pub guest_os: GuestOs,
    /// Virtual CPUs.
    #[serde(default = "one")]
    pub cpus: u32,
    /// Cores per socket, when the topology matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores_per_socket: Option<u32>,
    /// Memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// Hardware version / virtual system type as the source named it (`vmx-13`, `virtualbox-2.2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_version: Option<String>,
    /// Disks, in controller order.
    #[serde(default)]
    pub disks: Vec<DiskProfile>,
    /// CD/DVD drives.
    #[serde(default)]
    pub cdroms: Vec<CdromProfile>,
    /// Network adapters.
    #[serde(default)]
    pub nics: Vec<NicProfile>,
    /// Product information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<Product>,
    /// Free-form annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation: Option<String>,
    /// End-user licence agreement text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eula: Option<String>,
}

fn one() -> u32 {
    1
}

fn default_memory() -> u64 {
    1024
}

/// Guest operating system.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestOs {
    /// DMTF CIM_OperatingSystem.OsType number (OVF `OperatingSystemSection/@id`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cim_id: Option<u32>,
    /// VMware guest id (`otherLinux64Guest`, `windows9_64Guest`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmware_id: Option<String>,
    /// Human description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Firmware kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirmwareKind {
    /// Legacy BIOS.
    #[default]
    Bios,
    /// UEFI.
    Uefi,
}

/// Firmware settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Firmware {
    /// BIOS or UEFI.
    #[serde(default)]
    pub kind: FirmwareKind,
    /// UEFI secure boot.
    #[serde(default)]
    pub secure_boot: bool,
    /// A virtual TPM 2.0.
    #[serde(default)]
    pub tpm: bool,
}

/// Storage controller models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Controller {
    /// IDE (PIIX).
    #[default]
    Ide,
    /// SATA / AHCI.
    Sata,
    /// SCSI LSI Logic parallel.
    Lsilogic,
    /// SCSI LSI Logic SAS.
    Lsilogicsas,
    /// SCSI BusLogic.
    Buslogic,
    /// VMware paravirtual SCSI.
    Pvscsi,
    /// virtio-blk (one PCI device per disk).
    VirtioBlk,
    /// virtio-scsi.
    VirtioScsi,
    /// NVMe.
    Nvme,
}

impl Controller {
    /// Every model.
    pub const ALL: [Controller; 9] = [
        Controller::Ide,
        Controller::Sata,
        Controller::Lsilogic,
        Controller::Lsilogicsas,
        Controller::Buslogic,
        Controller::Pvscsi,
        Controller::VirtioBlk,
        Controller::VirtioScsi,
        Controller::Nvme,
    ];

    /// Profile name of the model.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Ide => "ide",
            Controller::Sata => "sata",
            Controller::Lsilogic => "lsilogic",
            Controller::Lsilogicsas => "lsilogicsas",
            Controller::Buslogic => "buslogic",
            Controller::Pvscsi => "pvscsi",
            Controller::VirtioBlk => "virtio-blk",
            Controller::VirtioScsi => "virtio-scsi",
            Controller::Nvme => "nvme",
        }
    }

    /// Whether it is a SCSI host adapter.
    pub fn is_scsi(self) -> bool {
        matches!(
            self,
            Controller::Lsilogic
                | Controller::Lsilogicsas
                | Controller::Buslogic
                | Controller::Pvscsi
                | Controller::VirtioScsi
        )
    }
}

/// Network adapter models.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    /// Intel 82545EM.
    #[default]
    E1000,
    /// Intel 82574L.
    E1000e,
    /// VMware paravirtual.
    Vmxnet3,
    /// virtio-net.
    VirtioNet,
    /// Realtek 8139.
    Rtl8139,
    /// AMD PCnet32 (VirtualBox and old VMware).
    Pcnet32,
    /// Hyper-V synthetic adapter (netvsc).
    HypervSynthetic,
    /// A model this profile does not know, by the name the source used.
    #[serde(untagged)]
    Other(String),
}

impl NicModel {
    /// Profile name of the model.
    pub fn name(&self) -> &str {
        match self {
            NicModel::E1000 => "e1000",
            NicModel::E1000e => "e1000e",
            NicModel::Vmxnet3 => "vmxnet3",
            NicModel::VirtioNet => "virtio-net",
            NicModel::Rtl8139 => "rtl8139",
            NicModel::Pcnet32 => "pcnet32",
            NicModel::HypervSynthetic => "hyperv-synthetic",
            NicModel::Other(s) => s,
        }
    }
}

/// One virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskProfile {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Controller the disk hangs off.
    #[serde(default)]
    pub controller: Controller,
    /// Image format of the disk file (`vmdk`, `qcow2`, …), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// File name of the disk inside a package or next to the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// One CD/DVD drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdromProfile {
    /// Controller.
    #[serde(default)]
    pub controller: Controller,
    /// ISO image inserted, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// MAC address policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MacPolicy {
    /// The hypervisor assigns one.
    #[default]
    Generated,
    /// A fixed address.
    Static(String),
}

/// One network adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicProfile {
    /// Adapter model.
    #[serde(default)]
    pub model: NicModel,
    /// Logical network name.
    #[serde(default)]
    pub network: String,
    /// MAC address policy.
    #[serde(default)]
    pub mac: MacPolicy,
}

/// Product information (OVF ProductSection).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    /// Product name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Vendor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// Short version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Full version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_version: Option<String>,
    /// Product URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_url: Option<String>,
    /// Vendor URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_url: Option<String>,
}

impl HardwareProfile {
    /// A minimal profile: one CPU, 1 GiB, BIOS, no devices.
    pub fn new(name: impl Into<String>) -> Self {
        HardwareProfile {
            name: name.into(),
            guest_os: GuestOs::default(),
            cpus: 1,
            cores_per_socket: None,
            memory_mib: default_memory(),
            firmware: Firmware::default(),
            hardware_version: None,
            disks: Vec::new(),
            cdroms: Vec::new(),
            nics: Vec::new(),
            product: None,
            annotation: None,
            eula: None,
        }
    }

    /// Check values a descriptor or config cannot express.
    pub fn validate(&self) -> Result<()> {
        if self.cpus == 0 {
            return Err(OvfError::Usage("profile: cpus must be at least 1".into()));
        }
        if self.memory_mib == 0 {
            return Err(OvfError::Usage(
                "profile: memory_mib must be at least 1".into(),
            ));
        }
        if self.firmware.secure_boot && self.firmware.kind != FirmwareKind::Uefi {
            return Err(OvfError::Usage(
                "profile: secure_boot needs firmware kind uefi".into(),
            ));
        }
        for n in &self.nics {
            if let MacPolicy::Static(mac) = &n.mac {
                if !is_mac(mac) {
                    return Err(OvfError::Usage(format!(
                        "profile: '{mac}' is not a MAC address"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Serialize as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| OvfError::Invalid(format!("profile TOML: {e}")))
    }

    /// Parse TOML.
    pub fn from_toml(s: &str) -> Result<Self> {
        let p: Self =
            toml::from_str(s).map_err(|e| OvfError::Invalid(format!("profile TOML: {e}")))?;
        p.validate()?;
        Ok(p)
    }

    /// Serialize as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| OvfError::Invalid(format!("profile JSON: {e}")))
    }

    /// Parse JSON.
    pub fn from_json(s: &str) -> Result<Self> {
        let p: Self =
            serde_json::from_str(s).map_err(|e| OvfError::Invalid(format!("profile JSON: {e}")))?;
        p.validate()?;
        Ok(p)
    }

    /// Read a profile file; `.json` is JSON, anything else TOML.
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_text(path, MAX_PROFILE_BYTES)?;
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        }
    }

    /// Write a profile file; `.json` is JSON, anything else TOML.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            self.to_json()?
        } else {
            self.to_toml()?
        };
        std::fs::write(path, text).map_err(|e| OvfError::io("write", path, e))
    }
}

/// Largest profile file read.
pub const MAX_PROFILE_BYTES: u64 = 1024 * 1024;

/// Read a small text file, refusing anything over `max` bytes.
pub(crate) fn read_text(path: &Path, max: u64) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| OvfError::io("stat", path, e))?;
    if meta.len() > max {
        return Err(OvfError::Invalid(format!(
            "{}: {} bytes, more than the {max}-byte limit",
            path.display(),
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| OvfError::io("read", path, e))?;
    String::from_utf8(bytes)
        .map_err(|_| OvfError::Invalid(format!("{}: not UTF-8 text", path.display())))
}

/// Whether `s` is six colon-separated hex octets.
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
pub(crate) fn sample() -> HardwareProfile {
    HardwareProfile {
        name: "web01".into(),
        guest_os: GuestOs {
            cim_id: Some(101),
            vmware_id: Some("ubuntu64Guest".into()),
            description: Some("Ubuntu Linux (64-bit)".into()),
        },
        cpus: 2,
        cores_per_socket: None,
        memory_mib: 2048,
        firmware: Firmware {
            kind: FirmwareKind::Uefi,
            secure_boot: true,
            tpm: false,
        },
        hardware_version: Some("vmx-14".into()),
        disks: vec![
            DiskProfile {
                capacity: 8 << 30,
                controller: Controller::Pvscsi,
                format: Some("vmdk".into()),
                file: Some("web01-disk1.vmdk".into()),
            },
            DiskProfile {
                capacity: 1 << 30,
                controller: Controller::Sata,
                format: Some("vmdk".into()),
                file: Some("web01-disk2.vmdk".into()),
            },
        ],
        cdroms: vec![CdromProfile {
            controller: Controller::Ide,
            file: None,
        }],
        nics: vec![
            NicProfile {
                model: NicModel::Vmxnet3,
                network: "VM Network".into(),
                mac: MacPolicy::Generated,
            },
            NicProfile {
                model: NicModel::E1000,
                network: "backend".into(),
                mac: MacPolicy::Static("00:50:56:01:02:03".into()),
            },
        ],
        product: Some(Product {
            name: Some("Web".into()),
            vendor: Some("Example & Co".into()),
            version: Some("1.0".into()),
            ..Product::default()
        }),
        annotation: Some("built <nightly>".into()),
        eula: Some("Use at will.".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_preserves_the_profile() {
        let p = sample();
        let t = p.to_toml().unwrap();
        assert_eq!(HardwareProfile::from_toml(&t).unwrap(), p, "{t}");
    }

    #[test]
    fn json_round_trip_preserves_the_profile() {
        let p = sample();
        let j = p.to_json().unwrap();
        assert_eq!(HardwareProfile::from_json(&j).unwrap(), p);
    }

    #[test]
    fn unknown_nic_models_survive_as_other() {
        let mut p = HardwareProfile::new("x");
        p.nics.push(NicProfile {
            model: NicModel::Other("sriov".into()),
            network: "n".into(),
            mac: MacPolicy::Generated,
        });
        let j = p.to_json().unwrap();
        assert_eq!(HardwareProfile::from_json(&j).unwrap(), p);
    }

    #[test]
    fn minimal_toml_takes_defaults() {
        let p =
            HardwareProfile::from_toml("name = \"a\"\n[[disks]]\ncapacity = 1048576\n").unwrap();
        assert_eq!(p.cpus, 1);
        assert_eq!(p.memory_mib, 1024);
        assert_eq!(p.disks[0].controller, Controller::Ide);
    }

    #[test]
    fn validate_rejects_secure_boot_without_uefi_and_bad_macs() {
        let mut p = HardwareProfile::new("x");
        p.firmware.secure_boot = true;
        assert!(p.validate().is_err());
        let mut p = HardwareProfile::new("x");
        p.nics.push(NicProfile {
            model: NicModel::E1000,
            network: String::new(),
            mac: MacPolicy::Static("00:11".into()),
        });
        assert!(p.validate().is_err());
        assert!(HardwareProfile::from_toml("name='a'\ncpus=0\n").is_err());
        assert!(HardwareProfile::from_toml("name='a'\nbogus=1\n").is_err());
    }
}
