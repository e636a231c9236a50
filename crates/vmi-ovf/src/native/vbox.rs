//! VirtualBox machine settings: the `.vbox` XML file VirtualBox 6.1/7.x keeps per machine
//! (namespace `http://www.virtualbox.org/`, schema `VirtualBox-settings.xsd` of the VirtualBox
//! sources: `VirtualBox/Machine` with `MediaRegistry`, `Description`, `Hardware` (`CPU`, `Memory`,
//! `Firmware`, `TrustedPlatformModule`, `Network/Adapter`) and `StorageControllers`), generated
//! from a profile and parsed back; plus the equivalent `VBoxManage` command script.
//!
//! VirtualBox has no PVSCSI or virtio-blk controller and no vmxnet3, e1000e (82574L), RTL8139 or
//! Hyper-V network adapter: those are errors here (and `controller-model` / `nic-model` problems
//! in the compatibility check), never silently replaced. Secure boot lives in VirtualBox's NVRAM
//! store, not in the settings file: the script enables it, the `.vbox` cannot say it. Disk
//! capacities are not in the settings file either: parsed disks have capacity 0.

use crate::error::{OvfError, Result};
use crate::profile::*;
use crate::xml::{self, Element};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::Path;

/// The settings namespace (`targetNamespace` of `VirtualBox-settings.xsd`).
pub const VBOX_NS: &str = "http://www.virtualbox.org/";
/// Settings version written for plain machines: what VirtualBox 5.1 … 6.1 write.
const VERSION_BASE: &str = "1.16";
/// Settings version for a virtio-SCSI controller (added in VirtualBox 6.1).
const VERSION_VIRTIO_SCSI: &str = "1.18";
/// Settings version for a TPM (added in VirtualBox 7.0).
const VERSION_TPM: &str = "1.19";
/// Network adapters of the default PIIX3 chipset (VirtualBox manual, ch. 6 "Virtual Networking").
pub const MAX_ADAPTERS: usize = 8;
/// Largest `Memory/@RAMSize` in MiB the schema allows (`TMemory`).
pub const MAX_RAM_MIB: u64 = 2_097_152;
/// Smallest `Memory/@RAMSize` in MiB the schema allows (`TMemory`).
pub const MIN_RAM_MIB: u64 = 4;
/// Most CPUs (`TCPUCount`).
pub const MAX_CPUS: u32 = 64;
/// Most storage devices read from one settings file (far above what VirtualBox attaches).
pub const MAX_DEVICES: usize = 1024;

/// A VirtualBox guest OS type id with the CIM OsType number and VMware guest id it matches
/// (VirtualBox's OVF import/export uses the same correspondence for the CIM ids).
struct OsRow {
    vbox: &'static str,
    cim: Option<u32>,
    vmware: &'static str,
    description: &'static str,
}

const fn os(
    vbox: &'static str,
    cim: Option<u32>,
    vmware: &'static str,
    description: &'static str,
) -> OsRow {
    OsRow {
        vbox,
        cim,
        vmware,
        description,
    }
}

/// OS type ids of VirtualBox 6.1/7.x (`VBoxManage list ostypes`). The first row for a CIM id is
/// the one chosen when only the CIM id is known.
const OS_TYPES: &[OsRow] = &[
    os("Other", Some(1), "otherGuest", "Other/Unknown"),
    os(
        "Other_64",
        Some(102),
        "otherGuest64",
        "Other/Unknown (64-bit)",
    ),
    os(
        "Linux26",
        Some(99),
        "other26xLinuxGuest",
        "Linux 2.6 / 3.x / 4.x (32-bit)",
    ),
    os(
        "Linux26_64",
        Some(100),
        "other26xLinux64Guest",
        "Linux 2.6 / 3.x / 4.x (64-bit)",
    ),
    os(
        "Linux_64",
        Some(101),
        "otherLinux64Guest",
        "Other Linux (64-bit)",
    ),
    os("Linux", Some(36), "otherLinuxGuest", "Other Linux (32-bit)"),
    os("Ubuntu", Some(93), "ubuntuGuest", "Ubuntu (32-bit)"),
    os("Ubuntu_64", Some(94), "ubuntu64Guest", "Ubuntu (64-bit)"),
    os("Debian", Some(95), "debian10Guest", "Debian (32-bit)"),
    os("Debian_64", Some(96), "debian10_64Guest", "Debian (64-bit)"),
    os("RedHat", Some(79), "rhel7Guest", "Red Hat (32-bit)"),
    os("RedHat_64", Some(80), "rhel8_64Guest", "Red Hat (64-bit)"),
    os(
        "OpenSUSE_64",
        Some(84),
        "opensuse64Guest",
        "openSUSE (64-bit)",
    ),
    os(
        "Oracle_64",
        Some(109),
        "oracleLinux64Guest",
        "Oracle Linux (64-bit)",
    ),
    os("Fedora_64", None, "fedora64Guest", "Fedora (64-bit)"),
    os("FreeBSD", Some(42), "freebsdGuest", "FreeBSD (32-bit)"),
    os("FreeBSD_64", Some(78), "freebsd64Guest", "FreeBSD (64-bit)"),
    os(
        "Solaris11_64",
        Some(82),
        "solaris11_64Guest",
        "Oracle Solaris 11",
    ),
    os(
        "WindowsXP",
        Some(67),
        "winXPProGuest",
        "Windows XP (32-bit)",
    ),
    os(
        "WindowsXP_64",
        Some(71),
        "winXPPro64Guest",
        "Windows XP (64-bit)",
    ),
    os(
        "Windows2003_64",
        Some(70),
        "winNetEnterprise64Guest",
        "Windows 2003 (64-bit)",
    ),
    os(
        "Windows2008_64",
        Some(77),
        "winLonghorn64Guest",
        "Windows 2008 (64-bit)",
    ),
    os(
        "Windows7_64",
        Some(105),
        "windows7_64Guest",
        "Windows 7 (64-bit)",
    ),
    os(
        "Windows8_64",
        None,
        "windows8_64Guest",
        "Windows 8 (64-bit)",
    ),
    os(
        "Windows2012_64",
        None,
        "windows8Server64Guest",
        "Windows 2012 (64-bit)",
    ),
    os(
        "Windows10_64",
        None,
        "windows9_64Guest",
        "Windows 10 (64-bit)",
    ),
    os(
        "Windows2016_64",
        None,
        "windows9Server64Guest",
        "Windows 2016 (64-bit)",
    ),
    os(
        "Windows2019_64",
        None,
        "windows2019srv_64Guest",
        "Windows 2019 (64-bit)",
    ),
    os(
        "Windows2022_64",
        None,
        "windows2019srvNext_64Guest",
        "Windows 2022 (64-bit)",
    ),
    os(
        "Windows11_64",
        None,
        "windows11_64Guest",
        "Windows 11 (64-bit)",
    ),
];

/// The VirtualBox OS type id for a guest: by VMware guest id, then CIM id, then a description
/// that is itself a VirtualBox id (what [`parse`] leaves for ids it has no row for).
fn os_type(g: &GuestOs) -> &str {
    if let Some(v) = &g.vmware_id {
        if let Some(r) = OS_TYPES.iter().find(|r| r.vmware.eq_ignore_ascii_case(v)) {
            return r.vbox;
        }
    }
    if let Some(c) = g.cim_id {
        if let Some(r) = OS_TYPES.iter().find(|r| r.cim == Some(c)) {
            return r.vbox;
        }
    }
    if let Some(d) = &g.description {
        if let Some(r) = OS_TYPES.iter().find(|r| r.vbox == d) {
            return r.vbox;
        }
        if g.vmware_id.is_none() && g.cim_id.is_none() && is_os_id(d) {
            return d;
        }
    }
    "Other"
}

/// Whether `s` looks like a VirtualBox OS type id (`Ubuntu_64`, `Windows2019_64`).
fn is_os_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The guest a VirtualBox OS type id stands for.
fn guest_of(id: &str) -> GuestOs {
    match OS_TYPES.iter().find(|r| r.vbox.eq_ignore_ascii_case(id)) {
        Some(r) => GuestOs {
            cim_id: r.cim,
            vmware_id: Some(r.vmware.to_string()),
            description: Some(r.description.to_string()),
        },
        None => GuestOs {
            cim_id: None,
            vmware_id: None,
            description: Some(id.to_string()),
        },
    }
}

/// VirtualBox network adapter type (`TNetworkAdapterType`) for a model.
fn adapter_type(m: &NicModel) -> Result<&'static str> {
    Ok(match m {
        // QEMU's and VMware's e1000 is the 82540EM, "Intel PRO/1000 MT Desktop".
        NicModel::E1000 => "82540EM",
        // PCnet-FAST III, VirtualBox's PCnet default.
        NicModel::Pcnet32 => "Am79C973",
        NicModel::VirtioNet => "virtio",
        other => {
            return Err(OvfError::Unsupported(format!(
                "VirtualBox has no {} network adapter (it has e1000, pcnet32 and virtio-net)",
                other.name()
            )))
        }
    })
}

fn model_of_adapter(t: &str) -> NicModel {
    match t {
        "82540EM" | "82543GC" | "82545EM" => NicModel::E1000,
        "Am79C970A" | "Am79C973" | "Am79C960" => NicModel::Pcnet32,
        "virtio" => NicModel::VirtioNet,
        other => NicModel::Other(other.to_string()),
    }
}

/// How a profile controller appears in VirtualBox.
struct Ctl {
    /// `StorageController/@name` (also what `VBoxManage storagectl --name` gets).
    name: &'static str,
    /// `StorageController/@type` (`TStorageControllerType`).
    kind: &'static str,
    /// `VBoxManage storagectl --add` bus.
    bus: &'static str,
    /// Ports the controller has at most.
    max_ports: u32,
    /// Devices per port.
    per_port: u32,
}

fn vbox_controller(c: Controller) -> Result<Ctl> {
    let ctl = |name, kind, bus, max_ports, per_port| Ctl {
        name,
        kind,
        bus,
        max_ports,
        per_port,
    };
    Ok(match c {
        Controller::Ide => ctl("IDE", "PIIX4", "ide", 2, 2),
        Controller::Sata => ctl("SATA", "AHCI", "sata", 30, 1),
        Controller::Lsilogic => ctl("SCSI", "LsiLogic", "scsi", 16, 1),
        Controller::Buslogic => ctl("BusLogic", "BusLogic", "scsi", 16, 1),
        Controller::Lsilogicsas => ctl("SAS", "LsiLogicSas", "sas", 255, 1),
        Controller::Nvme => ctl("NVMe", "NVMe", "pcie", 255, 1),
        Controller::VirtioScsi => ctl("VirtIO", "VirtioSCSI", "virtio", 256, 1),
        other => {
            return Err(OvfError::Unsupported(format!(
                "VirtualBox has no {} storage controller",
                other.name()
            )))
        }
    })
}

fn controller_of_type(t: &str) -> Option<Controller> {
    Some(match t {
        "PIIX3" | "PIIX4" | "ICH6" => Controller::Ide,
        "AHCI" => Controller::Sata,
        "LsiLogic" => Controller::Lsilogic,
        "BusLogic" => Controller::Buslogic,
        "LsiLogicSas" => Controller::Lsilogicsas,
        "NVMe" => Controller::Nvme,
        "VirtioSCSI" => Controller::VirtioScsi,
        // Floppy (I82078) and USB controllers hold nothing the profile models.
        _ => return None,
    })
}

/// `HardDisk/@format` for a profile disk: from its format, else its file extension; VDI when
/// neither says.
fn medium_format(d: &DiskProfile) -> Result<&'static str> {
    let ext = d
        .file
        .as_deref()
        .and_then(|f| Path::new(f).extension())
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let f = d.format.clone().or(ext).unwrap_or_else(|| "vdi".into());
    Ok(match f.to_ascii_lowercase().as_str() {
        "vdi" => "VDI",
        "vmdk" => "VMDK",
        "vpc" | "vhd" => "VHD",
        "vhdx" => "VHDX",
        other => {
            return Err(OvfError::Unsupported(format!(
                "VirtualBox does not attach {other} disks; convert to vdi, vmdk or vpc"
            )))
        }
    })
}

fn profile_format(f: &str) -> String {
    match f.to_ascii_uppercase().as_str() {
        "VHD" => "vpc".into(),
        other => other.to_ascii_lowercase(),
    }
}

/// A name-based UUID in VirtualBox's `{…}` form (SHA-256 of the inputs, version 8 layout), so the
/// same profile always gives the same file.
fn derived_uuid(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize()[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    braced(&b)
}

fn braced(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{{{}-{}-{}-{}-{}}}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Whether `s` is a `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` UUID that is not all zeros
/// (`TNonNullUUID`).
pub fn is_uuid(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) else {
        return false;
    };
    let groups: Vec<&str> = inner.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
        && inner.chars().any(|c| c.is_ascii_hexdigit() && c != '0')
}

/// Offset of the image UUID in a VDI header (`uuidCreate`, after the 64-byte text, signature,
/// version and the header fields; see `vmi_disk` `formats/vdi/header.rs`).
const VDI_UUID_OFFSET: usize = 0x188;
/// VDI signature at offset 0x40, little-endian.
const VDI_SIGNATURE: u32 = 0xbeda_107f;
/// How much of a VMDK file is searched for an embedded descriptor's `ddb.uuid.image`.
const VMDK_DESCRIPTOR_SCAN: u64 = 64 * 1024;
/// VHD footer cookie (Virtual Hard Disk Image Format Specification, "Hard Disk Footer Format").
const VHD_COOKIE: &[u8; 8] = b"conectix";
/// Offset of the footer's Unique Id.
const VHD_UNIQUE_ID_OFFSET: usize = 68;
/// Size of a VHD footer.
const VHD_FOOTER_LEN: u64 = 512;

/// The 16 bytes VirtualBox copies into its `RTUUID` as they are, in the text form VirtualBox
/// prints (the first three fields read little-endian).
fn rtuuid_text(raw: [u8; 16]) -> Option<String> {
    let mut b = raw;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let s = braced(&b);
    is_uuid(&s).then_some(s)
}

/// A VHD's footer Unique Id: from the footer at the end (every VHD) or its copy at offset 0
/// (dynamic and differencing disks).
fn vhd_unique_id(f: &mut std::fs::File, head: &[u8]) -> std::io::Result<Option<[u8; 16]>> {
    use std::io::{Read, Seek, SeekFrom};
    let id = |footer: &[u8]| -> Option<[u8; 16]> {
        if footer.get(..8)? != VHD_COOKIE {
            return None;
        }
        footer
            .get(VHD_UNIQUE_ID_OFFSET..VHD_UNIQUE_ID_OFFSET + 16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
    };
    let len = f.seek(SeekFrom::End(0))?;
    if len >= VHD_FOOTER_LEN {
        let mut footer = [0u8; VHD_FOOTER_LEN as usize];
        f.seek(SeekFrom::Start(len - VHD_FOOTER_LEN))?;
        f.read_exact(&mut footer)?;
        if let Some(u) = id(&footer) {
            return Ok(Some(u));
        }
    }
    Ok(id(head))
}

/// The UUID VirtualBox will find inside a disk file, which the media registry must repeat:
/// a VDI's image UUID, a VHD footer's Unique Id (both copied by VirtualBox into an `RTUUID` as
/// stored, so the first three fields read little-endian), or a VMDK's `ddb.uuid.image`. `None`
/// when the file has none — VirtualBox then takes the registry's — which includes every VHDX
/// (VirtualBox's VHDX backend reports no image UUID).
pub fn medium_uuid(path: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| OvfError::io("open", path, e))?;
    let mut head = Vec::new();
    (&mut f)
        .take(VMDK_DESCRIPTOR_SCAN)
        .read_to_end(&mut head)
        .map_err(|e| OvfError::io("read", path, e))?;
    if let Some(raw) = vhd_unique_id(&mut f, &head).map_err(|e| OvfError::io("read", path, e))? {
        return Ok(rtuuid_text(raw));
    }
    let sig = head
        .get(0x40..0x44)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes);
    if sig == Some(VDI_SIGNATURE) {
        return Ok(head
            .get(VDI_UUID_OFFSET..VDI_UUID_OFFSET + 16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .and_then(rtuuid_text));
    }
    let text = String::from_utf8_lossy(&head);
    for line in text.lines() {
        let Some(v) = line.trim().strip_prefix("ddb.uuid.image") else {
            continue;
        };
        let v = v
            .trim_start()
            .trim_start_matches('=')
            .trim()
            .trim_matches('"');
        let s = format!("{{{v}}}");
        if is_uuid(&s) {
            return Ok(Some(s.to_ascii_lowercase()));
        }
    }
    Ok(None)
}

/// What the settings file cannot derive from a profile.
#[derive(Debug, Clone, Default)]
pub struct VboxOptions {
    /// `Machine/@uuid`; derived from the name when absent.
    pub machine_uuid: Option<String>,
    /// Per profile disk, the UUID inside the disk file ([`medium_uuid`]); derived when absent.
    pub disk_uuids: Vec<Option<String>>,
}

/// The `.vbox` settings file for `p`, with derived UUIDs.
pub fn generate(p: &HardwareProfile) -> Result<String> {
    generate_with(p, &VboxOptions::default())
}

/// The `.vbox` settings file for `p`.
pub fn generate_with(p: &HardwareProfile, o: &VboxOptions) -> Result<String> {
    p.validate()?;
    if p.name.is_empty() {
        return Err(OvfError::Usage(
            "VirtualBox needs a machine name (Machine/@name)".into(),
        ));
    }
    if p.cpus > MAX_CPUS {
        return Err(OvfError::Unsupported(format!(
            "VirtualBox runs at most {MAX_CPUS} CPUs, the profile has {}",
            p.cpus
        )));
    }
    if !(MIN_RAM_MIB..=MAX_RAM_MIB).contains(&p.memory_mib) {
        return Err(OvfError::Unsupported(format!(
            "VirtualBox memory is {MIN_RAM_MIB}..={MAX_RAM_MIB} MiB, the profile has {}",
            p.memory_mib
        )));
    }
    if p.nics.len() > MAX_ADAPTERS {
        return Err(OvfError::Unsupported(format!(
            "VirtualBox has {MAX_ADAPTERS} network adapters, the profile has {}",
            p.nics.len()
        )));
    }
    let v = |local: &str| Element::new(VBOX_NS, local);
    let machine_uuid = match &o.machine_uuid {
        Some(u) if is_uuid(u) => u.clone(),
        Some(u) => return Err(OvfError::Usage(format!("'{u}' is not a {{UUID}}"))),
        None => derived_uuid(&["machine", &p.name]),
    };

    // Media registry: every disk, then every inserted ISO.
    let mut hard_disks = v("HardDisks");
    let mut disk_ids = Vec::new();
    for (i, d) in p.disks.iter().enumerate() {
        let id = match o.disk_uuids.get(i).cloned().flatten() {
            Some(u) if is_uuid(&u) => u,
            Some(u) => return Err(OvfError::Usage(format!("'{u}' is not a {{UUID}}"))),
            None => derived_uuid(&["disk", &p.name, &i.to_string()]),
        };
        let location = d
            .file
            .clone()
            .unwrap_or_else(|| format!("{}-disk{}.vdi", p.name, i + 1));
        hard_disks = hard_disks.child(
            v("HardDisk")
                .attr("", "uuid", &id)
                .attr("", "location", location)
                .attr("", "format", medium_format(d)?)
                .attr("", "type", "Normal"),
        );
        disk_ids.push(id);
    }
    let mut dvd_images = v("DVDImages");
    let mut dvd_ids = Vec::new();
    for (i, c) in p.cdroms.iter().enumerate() {
        dvd_ids.push(c.file.as_ref().map(|f| {
            let id = derived_uuid(&["dvd", &p.name, &i.to_string(), f]);
            dvd_images.children.push(xml::Node::Element(
                v("Image").attr("", "uuid", &id).attr("", "location", f),
            ));
            id
        }));
    }
    let mut registry = v("MediaRegistry");
    if !hard_disks.children.is_empty() {
        registry = registry.child(hard_disks);
    }
    if !dvd_images.children.is_empty() {
        registry = registry.child(dvd_images);
    }

    // Hardware.
    let mut hw = v("Hardware")
        .child(v("CPU").attr("", "count", p.cpus.to_string()))
        .child(v("Memory").attr("", "RAMSize", p.memory_mib.to_string()));
    if p.firmware.kind == FirmwareKind::Uefi {
        hw = hw.child(v("Firmware").attr("", "type", "EFI"));
    }
    if p.firmware.tpm {
        hw = hw.child(
            v("TrustedPlatformModule")
                .attr("", "type", "v2_0")
                .attr("", "location", ""),
        );
    }
    if !p.nics.is_empty() {
        let mut net = v("Network");
        for (i, n) in p.nics.iter().enumerate() {
            let mut a = v("Adapter")
                .attr("", "slot", i.to_string())
                .attr("", "enabled", "true");
            if let MacPolicy::Static(m) = &n.mac {
                let mac = m.replace(':', "").to_ascii_uppercase();
                // TNetworkAdapter/@MACAddress: unicast only (even first octet).
                if u8::from_str_radix(mac.get(0..2).unwrap_or("01"), 16).unwrap_or(1) & 1 != 0 {
                    return Err(OvfError::Unsupported(format!(
                        "VirtualBox takes unicast MAC addresses only, not {m}"
                    )));
                }
                a.set_attr("", "MACAddress", mac);
            }
            a.set_attr("", "type", adapter_type(&n.model)?);
            let attach = if n.network.is_empty() || n.network.eq_ignore_ascii_case("nat") {
                v("NAT")
            } else {
                v("InternalNetwork").attr("", "name", &n.network)
            };
            net = net.child(a.child(attach));
        }
        hw = hw.child(net);
    }

    // Storage: controllers in order of first use; devices take the next free port/device.
    let mut ctls: Vec<(Controller, Element, u32)> = Vec::new();
    let devices = p
        .disks
        .iter()
        .zip(&disk_ids)
        .map(|(d, id)| (d.controller, "HardDisk", Some(id.clone())))
        .chain(
            p.cdroms
                .iter()
                .zip(&dvd_ids)
                .map(|(c, id)| (c.controller, "DVD", id.clone())),
        );
    for (c, kind, image) in devices {
        let info = vbox_controller(c)?;
        let slot = match ctls.iter().position(|(m, _, _)| *m == c) {
            Some(i) => i,
            None => {
                let e = v("StorageController")
                    .attr("", "name", info.name)
                    .attr("", "type", info.kind);
                ctls.push((c, e, 0));
                ctls.len() - 1
            }
        };
        let Some((_, e, used)) = ctls.get_mut(slot) else {
            continue;
        };
        let n = *used;
        if n >= info.max_ports * info.per_port {
            return Err(OvfError::Unsupported(format!(
                "VirtualBox's {} controller takes {} devices, the profile attaches more",
                info.name,
                info.max_ports * info.per_port
            )));
        }
        *used += 1;
        let mut dev = v("AttachedDevice");
        if kind == "DVD" {
            dev.set_attr("", "passthrough", "false");
        }
        dev.set_attr("", "type", kind);
        dev.set_attr("", "hotpluggable", "false");
        dev.set_attr("", "port", (n / info.per_port).to_string());
        dev.set_attr("", "device", (n % info.per_port).to_string());
        if let Some(id) = image {
            dev = dev.child(v("Image").attr("", "uuid", id));
        }
        e.children.push(xml::Node::Element(dev));
    }
    let mut storage = v("StorageControllers");
    for (c, mut e, used) in ctls {
        let ports = match c {
            Controller::Ide => 2,
            Controller::Lsilogic | Controller::Buslogic => 16,
            _ => used.max(1),
        };
        e.set_attr("", "PortCount", ports.to_string());
        e.set_attr(
            "",
            "useHostIOCache",
            if c == Controller::Ide {
                "true"
            } else {
                "false"
            },
        );
        e.set_attr("", "Bootable", "true");
        storage = storage.child(e);
    }

    let mut machine = v("Machine")
        .attr("", "uuid", machine_uuid)
        .attr("", "name", &p.name)
        .attr("", "OSType", os_type(&p.guest_os))
        .attr("", "snapshotFolder", "Snapshots");
    if !registry.children.is_empty() {
        machine = machine.child(registry);
    }
    if let Some(a) = &p.annotation {
        machine = machine.leaf(VBOX_NS, "Description", a);
    }
    machine = machine.child(hw).child(storage);
    let version = if p.firmware.tpm {
        VERSION_TPM
    } else if p
        .disks
        .iter()
        .map(|d| d.controller)
        .chain(p.cdroms.iter().map(|c| c.controller))
        .any(|c| c == Controller::VirtioScsi)
    {
        VERSION_VIRTIO_SCSI
    } else {
        VERSION_BASE
    };
    let root = v("VirtualBox")
        .attr("", "version", format!("{version}-linux"))
        .child(machine);
    Ok(xml::write_document(&root, &[(VBOX_NS, "")]))
}

fn vbox_child<'a>(e: &'a Element, local: &str) -> Option<&'a Element> {
    e.elements().find(|c| c.is(VBOX_NS, local))
}

fn vbox_children<'a>(e: &'a Element, local: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
    e.elements().filter(move |c| c.is(VBOX_NS, local))
}

fn num<T: std::str::FromStr>(e: &Element, attr: &str, what: &str) -> Result<Option<T>> {
    match e.get_attr("", attr) {
        None => Ok(None),
        Some(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| OvfError::Invalid(format!("VirtualBox settings: {what} '{s}'"))),
    }
}

/// Parse a `.vbox` settings file into a profile.
pub fn parse(text: &str) -> Result<HardwareProfile> {
    let root = xml::parse(text)?;
    if !root.is(VBOX_NS, "VirtualBox") {
        return Err(OvfError::Invalid(format!(
            "root element is {{{}}}{}, not VirtualBox in {VBOX_NS}",
            root.name.ns, root.name.local
        )));
    }
    let Some(m) = vbox_child(&root, "Machine") else {
        return Err(OvfError::Invalid(
            "VirtualBox settings: no Machine element (a global VirtualBox.xml?)".into(),
        ));
    };
    let name = m
        .get_attr("", "name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| OvfError::Invalid("VirtualBox settings: Machine has no name".into()))?;
    let mut p = HardwareProfile::new(name);
    if let Some(os) = m.get_attr("", "OSType") {
        p.guest_os = guest_of(os);
    }
    p.annotation = vbox_child(m, "Description")
        .map(|d| d.text_content())
        .filter(|d| !d.is_empty());
    let hw = vbox_child(m, "Hardware")
        .ok_or_else(|| OvfError::Invalid("VirtualBox settings: Machine has no Hardware".into()))?;
    // CPU moved under Platform in settings 1.20 (VirtualBox 7.1).
    let cpu = vbox_child(hw, "CPU")
        .or_else(|| vbox_child(m, "Platform").and_then(|pl| vbox_child(pl, "CPU")));
    if let Some(c) = cpu {
        p.cpus = num(c, "count", "CPU count")?.unwrap_or(1);
    }
    if let Some(mem) = vbox_child(hw, "Memory") {
        p.memory_mib = num(mem, "RAMSize", "RAMSize")?.ok_or_else(|| {
            OvfError::Invalid("VirtualBox settings: Memory has no RAMSize".into())
        })?;
    }
    if let Some(fw) = vbox_child(hw, "Firmware") {
        if fw
            .get_attr("", "type")
            .is_some_and(|t| t.starts_with("EFI"))
        {
            p.firmware.kind = FirmwareKind::Uefi;
        }
    }
    if let Some(t) = vbox_child(hw, "TrustedPlatformModule") {
        p.firmware.tpm = matches!(t.get_attr("", "type"), Some("v2_0" | "Host" | "Swtpm"));
    }
    if let Some(net) = vbox_child(hw, "Network") {
        let mut adapters: Vec<(u32, &Element)> = Vec::new();
        for a in vbox_children(net, "Adapter") {
            if a.get_attr("", "enabled") != Some("true") {
                continue;
            }
            let slot = num(a, "slot", "Adapter slot")?.unwrap_or(0);
            adapters.push((slot, a));
            if adapters.len() > MAX_DEVICES {
                return Err(OvfError::Invalid(format!(
                    "VirtualBox settings: more than {MAX_DEVICES} adapters"
                )));
            }
        }
        adapters.sort_by_key(|(s, _)| *s);
        for (_, a) in adapters {
            // TNetworkAdapter/@type defaults to Am79C973.
            let model = model_of_adapter(a.get_attr("", "type").unwrap_or("Am79C973"));
            let mac = match a.get_attr("", "MACAddress") {
                Some(h) if h.len() == 12 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
                    let parts: Vec<&str> = (0..6).filter_map(|i| h.get(2 * i..2 * i + 2)).collect();
                    MacPolicy::Static(parts.join(":").to_ascii_lowercase())
                }
                Some(h) => {
                    return Err(OvfError::Invalid(format!(
                        "VirtualBox settings: MACAddress '{h}'"
                    )))
                }
                None => MacPolicy::Generated,
            };
            let network = a
                .elements()
                .find_map(|e| match e.name.local.as_str() {
                    "NAT" => Some("NAT".to_string()),
                    "DisabledModes" => None,
                    _ => e.get_attr("", "name").map(str::to_string),
                })
                .unwrap_or_default();
            p.nics.push(NicProfile {
                model,
                network,
                mac,
            });
        }
    }
    // Media registry: uuid → (location, format), in registry order.
    let mut disks_reg: Vec<(String, String, String)> = Vec::new();
    let mut dvds_reg: Vec<(String, String)> = Vec::new();
    if let Some(reg) = vbox_child(m, "MediaRegistry") {
        if let Some(hd) = vbox_child(reg, "HardDisks") {
            for d in vbox_children(hd, "HardDisk") {
                let (Some(id), Some(loc)) = (d.get_attr("", "uuid"), d.get_attr("", "location"))
                else {
                    return Err(OvfError::Invalid(
                        "VirtualBox settings: HardDisk without uuid or location".into(),
                    ));
                };
                disks_reg.push((
                    id.to_ascii_lowercase(),
                    loc.to_string(),
                    d.get_attr("", "format").unwrap_or("VDI").to_string(),
                ));
            }
        }
        if let Some(dv) = vbox_child(reg, "DVDImages") {
            for d in vbox_children(dv, "Image") {
                if let (Some(id), Some(loc)) = (d.get_attr("", "uuid"), d.get_attr("", "location"))
                {
                    dvds_reg.push((id.to_ascii_lowercase(), loc.to_string()));
                }
            }
        }
    }
    // Controllers sit under Machine (settings up to 1.19) or Hardware.
    let ctl_lists =
        vbox_children(m, "StorageControllers").chain(vbox_children(hw, "StorageControllers"));
    let mut disks: Vec<(usize, DiskProfile)> = Vec::new();
    let mut count = 0usize;
    for list in ctl_lists {
        for sc in vbox_children(list, "StorageController") {
            let Some(c) = sc.get_attr("", "type").and_then(controller_of_type) else {
                continue;
            };
            for dev in vbox_children(sc, "AttachedDevice") {
                count += 1;
                if count > MAX_DEVICES {
                    return Err(OvfError::Invalid(format!(
                        "VirtualBox settings: more than {MAX_DEVICES} attached devices"
                    )));
                }
                let image = vbox_child(dev, "Image")
                    .and_then(|i| i.get_attr("", "uuid"))
                    .map(str::to_ascii_lowercase);
                match dev.get_attr("", "type") {
                    Some("HardDisk") => {
                        let id = image.ok_or_else(|| {
                            OvfError::Invalid(
                                "VirtualBox settings: a HardDisk attachment has no Image".into(),
                            )
                        })?;
                        let (pos, (_, loc, fmt)) = disks_reg
                            .iter()
                            .enumerate()
                            .find(|(_, (u, _, _))| *u == id)
                            .ok_or_else(|| {
                                OvfError::Invalid(format!(
                                    "VirtualBox settings: attached disk {id} is not in the media registry"
                                ))
                            })?;
                        disks.push((
                            pos,
                            DiskProfile {
                                capacity: 0,
                                controller: c,
                                format: Some(profile_format(fmt)),
                                file: Some(loc.clone()),
                            },
                        ));
                    }
                    Some("DVD") => {
                        let file = image.and_then(|id| {
                            dvds_reg
                                .iter()
                                .find(|(u, _)| *u == id)
                                .map(|(_, l)| l.clone())
                        });
                        p.cdroms.push(CdromProfile {
                            controller: c,
                            file,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
    disks.sort_by_key(|(pos, _)| *pos);
    p.disks = disks.into_iter().map(|(_, d)| d).collect();
    Ok(p)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A POSIX shell script of `VBoxManage` commands creating and configuring the VM (VirtualBox 7.0
/// command syntax): the alternative to registering a generated `.vbox`.
pub fn script(p: &HardwareProfile) -> Result<String> {
    p.validate()?;
    let vm = quote(&p.name);
    let mut s = String::from("#!/bin/sh\nset -e\n");
    let _ = writeln!(
        s,
        "VBoxManage createvm --name {vm} --ostype {} --register",
        os_type(&p.guest_os)
    );
    let mut modify = format!(
        "VBoxManage modifyvm {vm} --cpus {} --memory {} --firmware {}",
        p.cpus,
        p.memory_mib,
        if p.firmware.kind == FirmwareKind::Uefi {
            "efi"
        } else {
            "bios"
        }
    );
    if p.firmware.tpm {
        modify.push_str(" --tpm-type 2.0");
    }
    for (i, n) in p.nics.iter().enumerate() {
        if n.network.is_empty() || n.network.eq_ignore_ascii_case("nat") {
            let _ = write!(modify, " --nic{0} nat", i + 1);
        } else {
            let _ = write!(
                modify,
                " --nic{0} intnet --intnet{0} {1}",
                i + 1,
                quote(&n.network)
            );
        }
        let _ = write!(modify, " --nictype{} {}", i + 1, adapter_type(&n.model)?);
        if let MacPolicy::Static(m) = &n.mac {
            let _ = write!(
                modify,
                " --macaddress{} {}",
                i + 1,
                m.replace(':', "").to_ascii_uppercase()
            );
        }
    }
    let _ = writeln!(s, "{modify}");
    if let Some(a) = &p.annotation {
        let _ = writeln!(s, "VBoxManage modifyvm {vm} --description {}", quote(a));
    }
    if p.firmware.secure_boot {
        // Secure boot is a property of the UEFI variable store, not of the settings file.
        let _ = writeln!(s, "VBoxManage modifynvram {vm} inituefivarstore");
        let _ = writeln!(s, "VBoxManage modifynvram {vm} enrollmssignatures");
        let _ = writeln!(s, "VBoxManage modifynvram {vm} enrollorclpk");
        let _ = writeln!(s, "VBoxManage modifynvram {vm} secureboot --enable");
    }
    let mut ctls: Vec<(Controller, u32)> = Vec::new();
    let devices = p
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                d.controller,
                "hdd",
                d.file
                    .clone()
                    .unwrap_or_else(|| format!("{}-disk{}.vdi", p.name, i + 1)),
            )
        })
        .chain(p.cdroms.iter().map(|c| {
            (
                c.controller,
                "dvddrive",
                c.file.clone().unwrap_or_else(|| "emptydrive".into()),
            )
        }));
    for (c, kind, medium) in devices {
        let info = vbox_controller(c)?;
        let n = match ctls.iter_mut().find(|(m, _)| *m == c) {
            Some((_, n)) => {
                *n += 1;
                *n - 1
            }
            None => {
                let _ = writeln!(
                    s,
                    "VBoxManage storagectl {vm} --name {} --add {} --controller {}",
                    info.name, info.bus, info.kind
                );
                ctls.push((c, 1));
                0
            }
        };
        let _ = writeln!(
            s,
            "VBoxManage storageattach {vm} --storagectl {} --port {} --device {} --type {kind} --medium {}",
            info.name,
            n / info.per_port,
            n % info.per_port,
            quote(&medium)
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample profile with what VirtualBox has.
    fn vbox_profile() -> HardwareProfile {
        let mut p = crate::profile::sample();
        p.disks[0].controller = Controller::Sata;
        p.disks[0].format = Some("vdi".into());
        p.disks[0].file = Some("web01-disk1.vdi".into());
        p.disks[1].controller = Controller::Nvme;
        p.nics[0].model = NicModel::VirtioNet;
        p
    }

    /// What survives a trip through a settings file: no capacities, product, EULA, hardware
    /// version, cores per socket or secure boot; the guest as the OS type table names it.
    fn settings_view(mut p: HardwareProfile) -> HardwareProfile {
        for d in &mut p.disks {
            d.capacity = 0;
        }
        p.product = None;
        p.eula = None;
        p.hardware_version = None;
        p.cores_per_socket = None;
        p.firmware.secure_boot = false;
        p.guest_os = guest_of(os_type(&p.guest_os));
        p
    }

    #[test]
    fn settings_file_round_trips_the_profile() {
        let mut p = vbox_profile();
        p.firmware.tpm = true;
        p.cdroms.push(CdromProfile {
            controller: Controller::Ide,
            file: Some("tools.iso".into()),
        });
        p.nics.push(NicProfile {
            model: NicModel::Pcnet32,
            network: "NAT".into(),
            mac: MacPolicy::Generated,
        });
        let text = generate(&p).unwrap();
        let back = parse(&text).unwrap();
        assert_eq!(back, settings_view(p), "{text}");
    }

    #[test]
    fn settings_file_names_the_elements_virtualbox_reads() {
        let text = generate(&vbox_profile()).unwrap();
        for needle in [
            "<VirtualBox xmlns=\"http://www.virtualbox.org/\" version=\"1.16-linux\">",
            "OSType=\"Ubuntu_64\"",
            "<CPU count=\"2\"/>",
            "<Memory RAMSize=\"2048\"/>",
            "<Firmware type=\"EFI\"/>",
            "type=\"virtio\"",
            "MACAddress=\"005056010203\" type=\"82540EM\"",
            "<InternalNetwork name=\"backend\"/>",
            "format=\"VDI\" type=\"Normal\"",
            "<StorageController name=\"SATA\" type=\"AHCI\" PortCount=\"1\"",
            "<StorageController name=\"NVMe\" type=\"NVMe\"",
            "<StorageController name=\"IDE\" type=\"PIIX4\" PortCount=\"2\"",
            "<AttachedDevice type=\"HardDisk\" hotpluggable=\"false\" port=\"0\" device=\"0\">",
            "<AttachedDevice passthrough=\"false\" type=\"DVD\"",
            "<Description>built &lt;nightly&gt;</Description>",
        ] {
            assert!(text.contains(needle), "missing {needle}\n{text}");
        }
        // Every attached disk's image is in the registry.
        let root = xml::parse(&text).unwrap();
        assert!(is_uuid(
            root.find_local("Machine")
                .and_then(|m| m.get_attr("", "uuid"))
                .unwrap()
        ));
    }

    #[test]
    fn settings_version_follows_the_features_used() {
        let mut p = vbox_profile();
        p.disks[1].controller = Controller::VirtioScsi;
        assert!(generate(&p).unwrap().contains("version=\"1.18-linux\""));
        p.firmware.tpm = true;
        let t = generate(&p).unwrap();
        assert!(t.contains("version=\"1.19-linux\""));
        assert!(t.contains("<TrustedPlatformModule type=\"v2_0\" location=\"\"/>"));
    }

    #[test]
    fn ide_devices_fill_two_ports_of_two_devices() {
        let mut p = HardwareProfile::new("ide");
        for _ in 0..4 {
            p.cdroms.push(CdromProfile {
                controller: Controller::Ide,
                file: None,
            });
        }
        let t = generate(&p).unwrap();
        assert!(t.contains("port=\"1\" device=\"1\""), "{t}");
        p.cdroms.push(CdromProfile {
            controller: Controller::Ide,
            file: None,
        });
        assert!(generate(&p).is_err());
    }

    #[test]
    fn models_virtualbox_lacks_are_errors_not_substitutions() {
        let p = crate::profile::sample(); // pvscsi + vmxnet3
        assert!(generate(&p).is_err());
        assert!(script(&p).is_err());
        let mut p = vbox_profile();
        p.nics[0].model = NicModel::E1000e;
        let e = generate(&p).unwrap_err().to_string();
        assert!(e.contains("e1000e"), "{e}");
        let mut p = vbox_profile();
        p.disks[0].format = Some("qcow2".into());
        assert!(generate(&p).is_err());
    }

    #[test]
    fn parse_reads_virtualbox_written_settings() {
        // The shape VirtualBox 6.1 writes (abridged), controllers under Machine.
        let text = r#"<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
  <Machine uuid="{6f1b1e4c-8f43-4d63-9d6a-0d8bb2d3e2a1}" name="deb" OSType="Debian_64" snapshotFolder="Snapshots">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{0a3d1f1e-2f76-4f5a-bb6c-6d7d9f2e8a10}" location="deb.vdi" format="VDI" type="Normal"/>
      </HardDisks>
    </MediaRegistry>
    <Hardware>
      <CPU count="4"><PAE enabled="false"/><LongMode enabled="true"/></CPU>
      <Memory RAMSize="4096"/>
      <Firmware type="EFI64"/>
      <Network>
        <Adapter slot="1" enabled="false" type="82540EM"/>
        <Adapter slot="0" enabled="true" MACAddress="080027C8F5A2" type="82545EM"><NAT/></Adapter>
        <Adapter slot="2" enabled="true" type="Am79C970A"><BridgedInterface name="eth0"/></Adapter>
      </Network>
    </Hardware>
    <StorageControllers>
      <StorageController name="IDE" type="PIIX4" PortCount="2" useHostIOCache="true" Bootable="true">
        <AttachedDevice passthrough="false" type="DVD" hotpluggable="false" port="1" device="0"/>
      </StorageController>
      <StorageController name="SATA" type="AHCI" PortCount="1" useHostIOCache="false" Bootable="true">
        <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="0">
          <Image uuid="{0a3d1f1e-2f76-4f5a-bb6c-6d7d9f2e8a10}"/>
        </AttachedDevice>
      </StorageController>
    </StorageControllers>
  </Machine>
</VirtualBox>"#;
        let p = parse(text).unwrap();
        assert_eq!(p.name, "deb");
        assert_eq!(p.guest_os.vmware_id.as_deref(), Some("debian10_64Guest"));
        assert_eq!((p.cpus, p.memory_mib), (4, 4096));
        assert_eq!(p.firmware.kind, FirmwareKind::Uefi);
        assert_eq!(p.nics.len(), 2);
        assert_eq!(p.nics[0].mac, MacPolicy::Static("08:00:27:c8:f5:a2".into()));
        assert_eq!(
            (p.nics[1].model.clone(), p.nics[1].network.as_str()),
            (NicModel::Pcnet32, "eth0")
        );
        assert_eq!(p.disks.len(), 1);
        assert_eq!(p.disks[0].controller, Controller::Sata);
        assert_eq!(p.disks[0].file.as_deref(), Some("deb.vdi"));
        assert_eq!(p.cdroms.len(), 1);
    }

    #[test]
    fn parse_refuses_dangling_attachments_and_foreign_roots() {
        assert!(parse("<VirtualBox version='1.16'/>").is_err());
        let t = r#"<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
  <Machine uuid="{6f1b1e4c-8f43-4d63-9d6a-0d8bb2d3e2a1}" name="x" OSType="Other">
    <Hardware><Memory RAMSize="64"/></Hardware>
    <StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">
      <AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{11111111-2222-3333-4444-555555555555}"/></AttachedDevice>
    </StorageController></StorageControllers>
  </Machine></VirtualBox>"#;
        let e = parse(t).unwrap_err().to_string();
        assert!(e.contains("not in the media registry"), "{e}");
    }

    #[test]
    fn medium_uuid_reads_a_vdi_header() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.vdi");
        let mut b = vec![0u8; 512];
        b[0x40..0x44].copy_from_slice(&VDI_SIGNATURE.to_le_bytes());
        b[0x188..0x198].copy_from_slice(&[
            0x4c, 0x1e, 0x1b, 0x6f, 0x43, 0x8f, 0x63, 0x4d, 0x9d, 0x6a, 0x0d, 0x8b, 0xb2, 0xd3,
            0xe2, 0xa1,
        ]);
        std::fs::write(&f, &b).unwrap();
        assert_eq!(
            medium_uuid(&f).unwrap().as_deref(),
            Some("{6f1b1e4c-8f43-4d63-9d6a-0d8bb2d3e2a1}")
        );
        std::fs::write(
            &f,
            b"# Disk DescriptorFile\nddb.uuid.image = \"0A3D1F1E-2F76-4F5A-BB6C-6D7D9F2E8A10\"\n",
        )
        .unwrap();
        assert_eq!(
            medium_uuid(&f).unwrap().as_deref(),
            Some("{0a3d1f1e-2f76-4f5a-bb6c-6d7d9f2e8a10}")
        );
    }

    #[test]
    fn medium_uuid_reads_a_vhd_footer_as_virtualbox_does() {
        let dir = tempfile::tempdir().unwrap();
        let raw = [
            0x4c, 0x1e, 0x1b, 0x6f, 0x43, 0x8f, 0x63, 0x4d, 0x9d, 0x6a, 0x0d, 0x8b, 0xb2, 0xd3,
            0xe2, 0xa1,
        ];
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(VHD_COOKIE);
        footer[68..84].copy_from_slice(&raw);
        let want = Some("{6f1b1e4c-8f43-4d63-9d6a-0d8bb2d3e2a1}");
        // Fixed: the footer only at the end.
        let f = dir.path().join("fixed.vhd");
        let mut b = vec![0u8; 4096];
        b.extend_from_slice(&footer);
        std::fs::write(&f, &b).unwrap();
        assert_eq!(medium_uuid(&f).unwrap().as_deref(), want);
        // Dynamic with a torn end: the copy at offset 0 answers.
        let f = dir.path().join("dynamic.vhd");
        let mut b = footer.clone();
        b.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&f, &b).unwrap();
        assert_eq!(medium_uuid(&f).unwrap().as_deref(), want);
    }

    #[test]
    fn script_creates_controllers_once_and_attaches_every_device() {
        let mut p = vbox_profile();
        p.disks[1].controller = Controller::Sata;
        let s = script(&p).unwrap();
        assert_eq!(s.matches("VBoxManage storagectl").count(), 2, "{s}");
        assert_eq!(s.matches("VBoxManage storageattach").count(), 3, "{s}");
        assert!(s.contains("--firmware efi"));
        assert!(s.contains("--ostype Ubuntu_64"));
        assert!(s.contains("--macaddress2 005056010203"));
        assert!(s.contains("secureboot --enable"));
    }

    #[test]
    fn names_with_quotes_are_shell_quoted() {
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
