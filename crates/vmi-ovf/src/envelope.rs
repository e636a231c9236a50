//! OVF descriptors (DMTF DSP0243 1.x/2.x and VMware's OVF 0.9): parse the envelope into a
//! [`HardwareProfile`] plus the package structure (References, DiskSection, NetworkSection), keep
//! every section and hardware item vmi does not model, and write OVF 1.x (or 2.x) that validates
//! against DSP8023.
//!
//! Dialects: VMware (`vmw:` attributes, `vmw:Config` keys for firmware), VirtualBox (`vbox:`
//! machine section kept verbatim, `AHCI`/`PIIX4` controller subtypes), OVF 0.9 (`Section
//! xsi:type="ovf:DiskSection_Type"`, `rasd:InstanceId`), OVF 2.x (`EthernetPortItem`,
//! `StorageItem`).

use crate::error::{invalid, OvfError, Result};
use crate::profile::*;
use crate::units::{best_unit, to_bytes};
use crate::xml::{self, Element, Node};
use std::collections::BTreeSet;

/// OVF 1.x envelope namespace (DSP0243 1.x §5).
pub const NS_OVF1: &str = "http://schemas.dmtf.org/ovf/envelope/1";
/// OVF 2.x envelope namespace (DSP0243 2.x §5).
pub const NS_OVF2: &str = "http://schemas.dmtf.org/ovf/envelope/2";
/// VMware's pre-standard OVF 0.9 namespace.
pub const NS_OVF09: &str = "http://www.vmware.com/schema/ovf/1/envelope";
/// CIM ResourceAllocationSettingData (DSP8023 imports it for `Item`).
pub const NS_RASD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
/// CIM VirtualSystemSettingData (`System`).
pub const NS_VSSD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";
/// CIM EthernetPortAllocationSettingData (OVF 2.x `EthernetPortItem`).
pub const NS_EPASD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData";
/// CIM StorageAllocationSettingData (OVF 2.x `StorageItem`).
pub const NS_SASD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData";
/// WS-CIM common types.
pub const NS_CIM: &str = "http://schemas.dmtf.org/wbem/wscim/1/common";
/// XML Schema instance.
pub const NS_XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// VMware's OVF extensions.
pub const NS_VMW: &str = "http://www.vmware.com/schema/ovf";
/// VirtualBox's OVF extensions.
pub const NS_VBOX: &str = "http://www.virtualbox.org/ovf/machine";

/// Disk format URI for VMDK streamOptimized (what ESXi and ovftool expect).
pub const VMDK_STREAM_URI: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

/// Most File, Disk, Network or Item entries accepted in one descriptor.
pub const MAX_ENTRIES: usize = 4096;

/// CIM ResourceType values (DSP1041 / CIM_ResourceAllocationSettingData.ResourceType).
mod rt {
    pub const OTHER: u32 = 1;
    pub const PROCESSOR: u32 = 3;
    pub const MEMORY: u32 = 4;
    pub const IDE: u32 = 5;
    pub const SCSI: u32 = 6;
    pub const ETHERNET: u32 = 10;
    pub const CD_DRIVE: u32 = 15;
    pub const DVD_DRIVE: u32 = 16;
    pub const DISK: u32 = 17;
    pub const OTHER_STORAGE: u32 = 20;
}

/// OVF specification generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OvfVersion {
    /// VMware's OVF 0.9.
    V0_9,
    /// DSP0243 1.x.
    V1,
    /// DSP0243 2.x.
    V2,
}

impl OvfVersion {
    fn ns(self) -> &'static str {
        match self {
            OvfVersion::V0_9 => NS_OVF09,
            OvfVersion::V1 => NS_OVF1,
            OvfVersion::V2 => NS_OVF2,
        }
    }
}

/// A `References/File`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileRef {
    /// `ovf:id`.
    pub id: String,
    /// `ovf:href` (a relative name inside the package).
    pub href: String,
    /// `ovf:size` in bytes.
    pub size: Option<u64>,
    /// `ovf:compression` (`gzip`).
    pub compression: Option<String>,
    /// `ovf:chunkSize`: the file is split into `href.000000000`, `href.000000001`, ….
    pub chunk_size: Option<u64>,
}

/// A `DiskSection/Disk`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskRef {
    /// `ovf:diskId`.
    pub disk_id: String,
    /// `ovf:fileRef`, absent for a blank disk.
    pub file_ref: Option<String>,
    /// Capacity in bytes (0 when the descriptor gives it as a property reference).
    pub capacity: u64,
    /// The capacity as a `${property}` reference, written back as it was.
    pub capacity_ref: Option<String>,
    /// `ovf:format` URI.
    pub format: Option<String>,
    /// `ovf:populatedSize`.
    pub populated_size: Option<u64>,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct Descriptor {
    /// Which OVF generation it was written in.
    pub version: OvfVersion,
    /// The files of the package.
    pub files: Vec<FileRef>,
    /// The virtual disks; `profile.disks[i]` corresponds to the disk item pointing at one of them.
    pub disks: Vec<DiskRef>,
    /// For each profile disk, the `diskId` it uses.
    pub disk_ids: Vec<String>,
    /// Logical networks.
    pub networks: Vec<String>,
    /// The virtual machine (the first one, for a VirtualSystemCollection).
    pub profile: HardwareProfile,
    /// Envelope-level sections vmi does not model, kept to write back.
    pub extra_sections: Vec<Element>,
    /// VirtualSystem sections vmi does not model.
    pub extra_system_sections: Vec<Element>,
    /// VirtualHardwareSection items vmi does not model (video, USB, sound, …).
    pub extra_items: Vec<Element>,
    /// VirtualHardwareSection extension elements (`vmw:Config`, `vmw:ExtraConfig`) not modeled.
    pub extra_hardware: Vec<Element>,
    /// Number of virtual systems in the envelope.
    pub virtual_systems: usize,
}

pub(crate) fn ovf_attr<'a>(e: &'a Element, local: &str) -> Option<&'a str> {
    e.attr_any(&[NS_OVF1, NS_OVF2, NS_OVF09, ""], local)
}

fn parse_u64(what: &str, s: &str) -> Result<u64> {
    s.trim()
        .parse()
        .map_err(|_| OvfError::Invalid(format!("{what} '{s}' is not a non-negative integer")))
}

/// The section kind of an element: its local name, or for OVF 0.9 `Section`/`Content` elements
/// the `xsi:type` without prefix and `_Type` suffix.
pub(crate) fn section_kind(e: &Element) -> String {
    if e.name.local == "Section" || e.name.local == "Content" {
        if let Some(t) = e.get_attr(NS_XSI, "type") {
            let t = t.rsplit(':').next().unwrap_or(t);
            return t.strip_suffix("_Type").unwrap_or(t).to_string();
        }
    }
    e.name.local.clone()
}

/// Parse descriptor text.
pub fn parse(text: &str) -> Result<Descriptor> {
    let root = xml::parse(text)?;
    from_element(&root)
}

/// Parse descriptor text and apply the strict checks of [`crate::strict`] (what `vmi ovf verify`
/// enforces): any problem is an error listing all of them.
pub fn parse_strict(text: &str) -> Result<Descriptor> {
    let d = parse(text)?;
    let problems = crate::strict::problems(text)?;
    if !problems.is_empty() {
        invalid!("descriptor breaks DSP0243: {}", problems.join("; "));
    }
    Ok(d)
}

fn from_element(root: &Element) -> Result<Descriptor> {
    let version = match root.name.ns.as_str() {
        NS_OVF1 => OvfVersion::V1,
        NS_OVF2 => OvfVersion::V2,
        NS_OVF09 => OvfVersion::V0_9,
        other => invalid!(
            "root element is {{{other}}}{}, not an OVF Envelope",
            root.name.local
        ),
    };
    if root.name.local != "Envelope" {
        invalid!("root element is {}, not Envelope", root.name.local);
    }
    if let Some(v) = ovf_attr(root, "version") {
        let ok = match version {
            OvfVersion::V0_9 => v.starts_with("0.9"),
            OvfVersion::V1 => v.starts_with("1."),
            OvfVersion::V2 => v.starts_with("2."),
        };
        if !ok {
            invalid!("Envelope ovf:version '{v}' does not match its namespace");
        }
    }
    let mut d = Descriptor {
        version,
        files: Vec::new(),
        disks: Vec::new(),
        disk_ids: Vec::new(),
        networks: Vec::new(),
        profile: HardwareProfile::new(""),
        extra_sections: Vec::new(),
        extra_system_sections: Vec::new(),
        extra_items: Vec::new(),
        extra_hardware: Vec::new(),
        virtual_systems: 0,
    };
    let mut system: Option<&Element> = None;
    for e in root.elements() {
        match section_kind(e).as_str() {
            "References" => parse_references(e, &mut d)?,
            "DiskSection" => parse_disks(e, &mut d)?,
            "NetworkSection" => {
                for n in e.elements().filter(|n| n.name.local == "Network") {
                    let name = ovf_attr(n, "name")
                        .ok_or_else(|| OvfError::Invalid("Network without ovf:name".into()))?;
                    d.networks.push(name.to_string());
                }
                if d.networks.len() > MAX_ENTRIES {
                    invalid!("NetworkSection has more than {MAX_ENTRIES} networks");
                }
            }
            "VirtualSystem" => {
                d.virtual_systems += 1;
                system = Some(e);
            }
            "VirtualSystemCollection" => {
                let mut stack = vec![e];
                while let Some(c) = stack.pop() {
                    for s in c.elements() {
                        match section_kind(s).as_str() {
                            "VirtualSystem" => {
                                d.virtual_systems += 1;
                                system = system.or(Some(s));
                            }
                            "VirtualSystemCollection" => stack.push(s),
                            _ => {}
                        }
                    }
                }
                d.extra_sections.push(e.clone());
            }
            _ => d.extra_sections.push(e.clone()),
        }
    }
    let mut seen = BTreeSet::new();
    for f in &d.files {
        if !seen.insert(f.id.as_str()) {
            invalid!("References: duplicate file id '{}'", f.id);
        }
    }
    let mut seen = BTreeSet::new();
    for f in &d.files {
        if !seen.insert(f.href.as_str()) {
            invalid!("References: file '{}' listed twice", f.href);
        }
    }
    for disk in &d.disks {
        if let Some(fr) = &disk.file_ref {
            if !d.files.iter().any(|f| &f.id == fr) {
                invalid!(
                    "Disk '{}' refers to file id '{fr}' missing from References",
                    disk.disk_id
                );
            }
        }
    }
    // An envelope may carry no virtual system at all (an empty package, or collections only).
    if let Some(vs) = system {
        if ovf_attr(vs, "id").is_none() {
            invalid!("VirtualSystem without the required ovf:id");
        }
        parse_system(vs, &mut d)?;
    }
    Ok(d)
}

fn parse_references(e: &Element, d: &mut Descriptor) -> Result<()> {
    for f in e.elements().filter(|f| f.name.local == "File") {
        if d.files.len() >= MAX_ENTRIES {
            invalid!("References lists more than {MAX_ENTRIES} files");
        }
        let id =
            ovf_attr(f, "id").ok_or_else(|| OvfError::Invalid("File without ovf:id".into()))?;
        let href = ovf_attr(f, "href")
            .ok_or_else(|| OvfError::Invalid(format!("File '{id}' without ovf:href")))?;
        if href.is_empty() {
            invalid!("File '{id}' has an empty ovf:href");
        }
        // Some producers write a negative size for "unknown"; read it as absent.
        let size = match ovf_attr(f, "size").map(str::trim) {
            Some(s) if s.starts_with('-') && s[1..].chars().all(|c| c.is_ascii_digit()) => None,
            Some(s) => Some(parse_u64("File ovf:size", s)?),
            None => None,
        };
        let chunk_size = ovf_attr(f, "chunkSize")
            .map(|s| parse_u64("File ovf:chunkSize", s))
            .transpose()?;
        if chunk_size == Some(0) {
            invalid!("File '{id}' has ovf:chunkSize 0");
        }
        let compression = ovf_attr(f, "compression").map(str::to_string);
        if let Some(c) = &compression {
            if c != "gzip" && c != "identity" {
                invalid!("File '{id}' uses unknown compression '{c}'");
            }
        }
        d.files.push(FileRef {
            id: id.to_string(),
            href: href.to_string(),
            size,
            compression,
            chunk_size,
        });
    }
    Ok(())
}

fn parse_disks(e: &Element, d: &mut Descriptor) -> Result<()> {
    for k in e.elements().filter(|k| k.name.local == "Disk") {
        if d.disks.len() >= MAX_ENTRIES {
            invalid!("DiskSection lists more than {MAX_ENTRIES} disks");
        }
        let disk_id = ovf_attr(k, "diskId")
            .ok_or_else(|| OvfError::Invalid("Disk without ovf:diskId".into()))?;
        let cap = ovf_attr(k, "capacity")
            .ok_or_else(|| OvfError::Invalid(format!("Disk '{disk_id}' without ovf:capacity")))?;
        let capacity_ref = cap.trim_start().starts_with("${").then(|| cap.to_string());
        let capacity = if capacity_ref.is_some() {
            0
        } else {
            let c = to_bytes(cap, ovf_attr(k, "capacityAllocationUnits"))
                .map_err(|e| OvfError::Invalid(format!("Disk '{disk_id}' capacity: {e}")))?;
            if c == 0 {
                invalid!("Disk '{disk_id}' has capacity 0");
            }
            c
        };
        let populated_size = ovf_attr(k, "populatedSize")
            .map(|s| parse_u64("Disk ovf:populatedSize", s))
            .transpose()?;
        d.disks.push(DiskRef {
            disk_id: disk_id.to_string(),
            file_ref: ovf_attr(k, "fileRef")
                .filter(|r| !r.is_empty())
                .map(str::to_string),
            capacity,
            capacity_ref,
            format: ovf_attr(k, "format").map(str::to_string),
            populated_size,
        });
    }
    Ok(())
}

/// One hardware item reduced to the RASD fields vmi reads.
struct Item<'a> {
    el: &'a Element,
    instance: String,
    rtype: u32,
    subtype: String,
    parent: Option<String>,
}

fn item_field(e: &Element, local: &str) -> Option<String> {
    e.find_local(local).map(|c| c.text_content())
}

fn parse_system(vs: &Element, d: &mut Descriptor) -> Result<()> {
    let p = &mut d.profile;
    p.name = vs
        .child_text("Name")
        .filter(|n| !n.is_empty())
        .or_else(|| ovf_attr(vs, "id").map(str::to_string))
        .unwrap_or_default();
    // Sections taken into the profile (the first of each kind); every other one is kept.
    let mut taken: Vec<*const Element> = Vec::new();
    let mut hardware: Option<&Element> = None;
    let mut kinds_taken: BTreeSet<String> = BTreeSet::new();
    for s in vs.elements() {
        let kind = section_kind(s);
        if kind == "Info" || kind == "Name" {
            taken.push(s);
            continue;
        }
        if kinds_taken.contains(&kind) {
            continue;
        }
        let took = match kind.as_str() {
            "OperatingSystemSection" => {
                // The id is required (DSP8023); a section without one is read as 1, "Other".
                p.guest_os.cim_id = Some(
                    ovf_attr(s, "id")
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(1),
                );
                p.guest_os.vmware_id = s.get_attr(NS_VMW, "osType").map(str::to_string);
                p.guest_os.description = s.child_text("Description").filter(|t| !t.is_empty());
                true
            }
            // A ProductSection with properties or a class is kept whole.
            "ProductSection"
                if s.find_local("Property").is_none()
                    && s.find_local("Category").is_none()
                    && ovf_attr(s, "class").is_none()
                    && ovf_attr(s, "instance").is_none() =>
            {
                let t = |n: &str| s.child_text(n).filter(|t| !t.is_empty());
                p.product = Some(Product {
                    name: t("Product"),
                    vendor: t("Vendor"),
                    version: t("Version"),
                    full_version: t("FullVersion").or_else(|| t("Full-version")),
                    product_url: t("ProductUrl"),
                    vendor_url: t("VendorUrl"),
                });
                true
            }
            "AnnotationSection" => {
                p.annotation = s.child_text("Annotation").filter(|t| !t.is_empty());
                p.annotation.is_some()
            }
            "EulaSection" => {
                p.eula = s.child_text("License").filter(|t| !t.is_empty());
                p.eula.is_some()
            }
            "VirtualHardwareSection" => {
                hardware = Some(s);
                true
            }
            _ => false,
        };
        if took {
            taken.push(s);
            kinds_taken.insert(kind);
        }
    }
    for s in vs.elements() {
        if !taken.iter().any(|t| std::ptr::eq(*t, s)) {
            d.extra_system_sections.push(s.clone());
        }
    }
    match hardware {
        Some(hw) => parse_hardware(hw, d),
        None => invalid!(
            "VirtualSystem '{}' has no VirtualHardwareSection",
            d.profile.name
        ),
    }
}

fn parse_hardware(hw: &Element, d: &mut Descriptor) -> Result<()> {
    let p = &mut d.profile;
    if let Some(sys) = hw.find_local("System") {
        p.hardware_version = item_field(sys, "VirtualSystemType").filter(|t| !t.is_empty());
    }
    let mut items = Vec::new();
    for e in hw.elements() {
        match e.name.local.as_str() {
            "Info" | "System" => {}
            "Item" | "EthernetPortItem" | "StorageItem" => {
                if items.len() >= MAX_ENTRIES {
                    invalid!("VirtualHardwareSection has more than {MAX_ENTRIES} items");
                }
                let bound = ovf_attr(e, "bound").unwrap_or("normal");
                if ovf_attr(e, "configuration").is_some() || bound != "normal" {
                    // Items for a non-default deployment option, and the min/max bounds of a
                    // range, are not part of the profile.
                    d.extra_items.push(e.clone());
                    continue;
                }
                let instance = item_field(e, "InstanceID")
                    .or_else(|| item_field(e, "InstanceId"))
                    .unwrap_or_default();
                let rtype = match item_field(e, "ResourceType") {
                    Some(t) => t.trim().parse::<u32>().map_err(|_| {
                        OvfError::Invalid(format!("Item {instance}: ResourceType '{t}'"))
                    })?,
                    None => invalid!("Item {instance} has no ResourceType"),
                };
                items.push(Item {
                    el: e,
                    instance,
                    rtype,
                    subtype: item_field(e, "ResourceSubType").unwrap_or_default(),
                    parent: item_field(e, "Parent"),
                });
            }
            _ if e.is(NS_VMW, "Config") => {
                let key = e.get_attr(NS_VMW, "key").unwrap_or("");
                let value = e.get_attr(NS_VMW, "value").unwrap_or("");
                match key {
                    "firmware" => {
                        p.firmware.kind = if value == "efi" {
                            FirmwareKind::Uefi
                        } else {
                            FirmwareKind::Bios
                        }
                    }
                    "bootOptions.efiSecureBootEnabled" => p.firmware.secure_boot = value == "true",
                    "cpuHotAddEnabled" | "memoryHotAddEnabled" => d.extra_hardware.push(e.clone()),
                    _ => d.extra_hardware.push(e.clone()),
                }
            }
            _ => d.extra_hardware.push(e.clone()),
        }
    }
    let controller_of = |parent: &Option<String>| -> Controller {
        let Some(par) = parent else {
            return Controller::Ide;
        };
        items
            .iter()
            .find(|i| &i.instance == par)
            .and_then(|i| controller_model(i.rtype, &i.subtype))
            .unwrap_or(Controller::Ide)
    };
    for it in &items {
        match it.rtype {
            rt::PROCESSOR => {
                let q = item_field(it.el, "VirtualQuantity").unwrap_or_else(|| "1".into());
                p.cpus = q
                    .trim()
                    .parse()
                    .map_err(|_| OvfError::Invalid(format!("CPU VirtualQuantity '{q}'")))?;
                if p.cpus == 0 {
                    invalid!("CPU VirtualQuantity is 0");
                }
                // VMware writes the topology as `<vmw:CoresPerSocket>` inside the CPU item.
                if let Some(c) = it.el.elements().find(|c| c.is(NS_VMW, "CoresPerSocket")) {
                    p.cores_per_socket = c.text_content().parse().ok();
                }
            }
            rt::MEMORY => {
                let Some(q) = item_field(it.el, "VirtualQuantity") else {
                    d.extra_items.push(it.el.clone());
                    continue;
                };
                let units = item_field(it.el, "AllocationUnits");
                let bytes = to_bytes(&q, Some(units.as_deref().unwrap_or("byte * 2^20")))
                    .map_err(|e| OvfError::Invalid(format!("memory: {e}")))?;
                p.memory_mib = bytes >> 20;
                if p.memory_mib == 0 {
                    invalid!("memory is {bytes} bytes, less than 1 MiB");
                }
            }
            rt::IDE | rt::SCSI | rt::OTHER_STORAGE => {
                if controller_model(it.rtype, &it.subtype).is_none() {
                    d.extra_items.push(it.el.clone());
                }
            }
            rt::DISK => {
                let host = item_field(it.el, "HostResource").unwrap_or_default();
                let id = host
                    .trim()
                    .strip_prefix("ovf:")
                    .unwrap_or(host.trim())
                    .trim_start_matches('/')
                    .strip_prefix("disk/")
                    .unwrap_or("")
                    .to_string();
                let disk = d.disks.iter().find(|k| k.disk_id == id);
                let Some(disk) = disk else {
                    if host.is_empty() {
                        d.extra_items.push(it.el.clone());
                        continue;
                    }
                    invalid!("disk Item {} points at '{host}', not a Disk", it.instance);
                };
                let file = disk
                    .file_ref
                    .as_ref()
                    .and_then(|r| d.files.iter().find(|f| &f.id == r))
                    .map(|f| f.href.clone());
                p.disks.push(DiskProfile {
                    capacity: disk.capacity,
                    controller: controller_of(&it.parent),
                    format: disk.format.as_deref().map(format_from_uri),
                    file,
                });
                d.disk_ids.push(id);
            }
            rt::CD_DRIVE | rt::DVD_DRIVE => {
                let host = item_field(it.el, "HostResource").filter(|h| !h.is_empty());
                let file = host.and_then(|h| {
                    let id = h
                        .trim()
                        .strip_prefix("ovf:")
                        .unwrap_or(h.trim())
                        .trim_start_matches('/');
                    let id = id.strip_prefix("file/").unwrap_or(id).to_string();
                    d.files.iter().find(|f| f.id == id).map(|f| f.href.clone())
                });
                p.cdroms.push(CdromProfile {
                    controller: controller_of(&it.parent),
                    file,
                });
            }
            rt::ETHERNET => {
                let network = item_field(it.el, "Connection").unwrap_or_default();
                let mac = item_field(it.el, "Address")
                    .filter(|a| is_mac(a))
                    .map(|a| MacPolicy::Static(a.to_ascii_lowercase()))
                    .unwrap_or_default();
                p.nics.push(NicProfile {
                    model: nic_model(&it.subtype),
                    network,
                    mac,
                });
            }
            rt::OTHER if it.subtype.eq_ignore_ascii_case("vmware.vtpm") => p.firmware.tpm = true,
            _ => d.extra_items.push(it.el.clone()),
        }
    }
    Ok(())
}

/// The controller model an item describes, if it is a storage controller vmi models.
fn controller_model(rtype: u32, subtype: &str) -> Option<Controller> {
    let s = subtype.to_ascii_lowercase();
    match rtype {
        rt::IDE => Some(Controller::Ide),
        rt::SCSI => Some(match s.as_str() {
            "buslogic" => Controller::Buslogic,
            "lsilogicsas" => Controller::Lsilogicsas,
            "virtualscsi" | "pvscsi" => Controller::Pvscsi,
            "virtio-scsi" | "virtio_scsi" => Controller::VirtioScsi,
            _ => Controller::Lsilogic,
        }),
        rt::OTHER_STORAGE => match s.as_str() {
            "vmware.sata.ahci" | "ahci" | "sata" => Some(Controller::Sata),
            "vmware.nvme.controller" | "nvme" => Some(Controller::Nvme),
            "virtio-blk" => Some(Controller::VirtioBlk),
            _ => None,
        },
        _ => None,
    }
}

fn nic_model(subtype: &str) -> NicModel {
    match subtype.to_ascii_lowercase().as_str() {
        "e1000" | "" => NicModel::E1000,
        "e1000e" => NicModel::E1000e,
        "vmxnet3" => NicModel::Vmxnet3,
        "virtio" | "virtio-net" | "virtionet" => NicModel::VirtioNet,
        "rtl8139" => NicModel::Rtl8139,
        "pcnet32" => NicModel::Pcnet32,
        "netvsc" | "hyperv-synthetic" => NicModel::HypervSynthetic,
        _ => NicModel::Other(subtype.to_string()),
    }
}

fn nic_subtype(m: &NicModel) -> &str {
    match m {
        NicModel::E1000 => "E1000",
        NicModel::E1000e => "E1000e",
        NicModel::Vmxnet3 => "VmxNet3",
        NicModel::VirtioNet => "virtio",
        NicModel::Rtl8139 => "rtl8139",
        NicModel::Pcnet32 => "PCNet32",
        NicModel::HypervSynthetic => "netvsc",
        NicModel::Other(s) => s,
    }
}

fn format_from_uri(uri: &str) -> String {
    let u = uri.to_ascii_lowercase();
    if u.contains("vmdk") {
        "vmdk".into()
    } else if u.contains("qcow2") {
        "qcow2".into()
    } else if u.contains("vhdx") {
        "vhdx".into()
    } else if u.contains("vhd") {
        "vpc".into()
    } else if u.contains("vdi") {
        "vdi".into()
    } else if u.contains("raw") {
        "raw".into()
    } else {
        uri.to_string()
    }
}

/// How [`write`] lays out the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// OVF generation: [`OvfVersion::V1`] (default) or [`OvfVersion::V2`].
    pub version: OvfVersion,
    /// Add VMware extensions (`vmw:osType`, `vmw:Config` for firmware).
    pub vmware: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            version: OvfVersion::V1,
            vmware: true,
        }
    }
}

/// Build a descriptor for `profile` whose disks are packaged as `disk_files` (one entry per
/// profile disk: file name in the package, its size in bytes, its format URI).
pub fn descriptor_for(
    profile: &HardwareProfile,
    disk_files: &[(String, u64, String)],
) -> Descriptor {
    let mut d = Descriptor {
        version: OvfVersion::V1,
        files: Vec::new(),
        disks: Vec::new(),
        disk_ids: Vec::new(),
        networks: Vec::new(),
        profile: profile.clone(),
        extra_sections: Vec::new(),
        extra_system_sections: Vec::new(),
        extra_items: Vec::new(),
        extra_hardware: Vec::new(),
        virtual_systems: 1,
    };
    for (i, disk) in profile.disks.iter().enumerate() {
        let id = format!("vmdisk{}", i + 1);
        let (file_ref, format) = match disk_files.get(i) {
            Some((name, size, uri)) => {
                let fid = format!("file{}", i + 1);
                d.files.push(FileRef {
                    id: fid.clone(),
                    href: name.clone(),
                    size: Some(*size),
                    compression: None,
                    chunk_size: None,
                });
                d.profile.disks[i].file = Some(name.clone());
                (Some(fid), Some(uri.clone()))
            }
            None => (None, None),
        };
        d.disks.push(DiskRef {
            disk_id: id.clone(),
            file_ref,
            capacity: disk.capacity,
            capacity_ref: None,
            format,
            populated_size: None,
        });
        d.disk_ids.push(id);
    }
    for n in &profile.nics {
        if !d.networks.contains(&n.network) {
            d.networks.push(n.network.clone());
        }
    }
    d
}

/// Serialize `d` as an OVF descriptor.
pub fn write(d: &Descriptor, opts: &WriteOptions) -> Result<String> {
    let v = if opts.version == OvfVersion::V0_9 {
        OvfVersion::V1
    } else {
        opts.version
    };
    let o = v.ns();
    let mut env = Element::new(o, "Envelope");
    if v == OvfVersion::V2 {
        env.set_attr(o, "version", "2.0");
    }
    let mut refs = Element::new(o, "References");
    for f in &d.files {
        let mut fe = Element::new(o, "File")
            .attr(o, "href", &f.href)
            .attr(o, "id", &f.id);
        if let Some(s) = f.size {
            fe.set_attr(o, "size", s.to_string());
        }
        if let Some(c) = &f.compression {
            fe.set_attr(o, "compression", c);
        }
        if let Some(c) = f.chunk_size {
            fe.set_attr(o, "chunkSize", c.to_string());
        }
        refs = refs.child(fe);
    }
    env = env.child(refs);
    if !d.disks.is_empty() {
        let mut ds = Element::new(o, "DiskSection").leaf(o, "Info", "Virtual disk information");
        for k in &d.disks {
            let (q, unit) = best_unit(k.capacity);
            let mut ke = match &k.capacity_ref {
                Some(r) => Element::new(o, "Disk").attr(o, "capacity", r),
                None => Element::new(o, "Disk")
                    .attr(o, "capacity", q.to_string())
                    .attr(o, "capacityAllocationUnits", unit),
            };
            ke.set_attr(o, "diskId", &k.disk_id);
            if let Some(f) = &k.file_ref {
                ke.set_attr(o, "fileRef", f);
            }
            if let Some(f) = &k.format {
                ke.set_attr(o, "format", f);
            }
            if let Some(ps) = k.populated_size {
                ke.set_attr(o, "populatedSize", ps.to_string());
            }
            ds = ds.child(ke);
        }
        env = env.child(ds);
    }
    if !d.networks.is_empty() {
        let mut ns =
            Element::new(o, "NetworkSection").leaf(o, "Info", "The list of logical networks");
        for n in &d.networks {
            ns = ns.child(Element::new(o, "Network").attr(o, "name", n).leaf(
                o,
                "Description",
                format!("The {n} network"),
            ));
        }
        env = env.child(ns);
    }
    let has_collection = d
        .extra_sections
        .iter()
        .any(|s| section_kind(s) == "VirtualSystemCollection");
    for s in &d.extra_sections {
        if section_kind(s) != "VirtualSystemCollection" {
            env = env.child(remap(s, d.version, v));
        }
    }
    if has_collection {
        // A collection is written back as it was: the profile describes only its first machine.
        for s in d
            .extra_sections
            .iter()
            .filter(|s| section_kind(s) == "VirtualSystemCollection")
        {
            env = env.child(remap(s, d.version, v));
        }
    } else if d.virtual_systems > 0 || !d.profile.name.is_empty() {
        env = env.child(virtual_system(d, opts, v)?);
    }
    Ok(xml::write_document(
        &env,
        &[
            (o, ""),
            (o, "ovf"),
            (NS_CIM, "cim"),
            (NS_RASD, "rasd"),
            (NS_VSSD, "vssd"),
            (NS_EPASD, "epasd"),
            (NS_SASD, "sasd"),
            (NS_VMW, "vmw"),
            (NS_VBOX, "vbox"),
            (NS_XSI, "xsi"),
        ],
    ))
}

/// Move a kept element from the source's envelope namespace into the output's, turning OVF 0.9
/// `Section xsi:type="ovf:X_Type"` into `X`.
fn remap(e: &Element, from: OvfVersion, to: OvfVersion) -> Element {
    let mut out = e.clone();
    remap_in_place(&mut out, from.ns(), to.ns());
    out
}

fn remap_in_place(e: &mut Element, from: &str, to: &str) {
    if from == to {
        return;
    }
    if e.name.ns == from {
        if e.name.local == "Section" || e.name.local == "Content" {
            // An `xsi:type` that is no XML name (`" T"`) cannot become an element name.
            let kind = section_kind(e);
            if crate::xml::is_ncname(&kind) {
                e.attrs
                    .retain(|a| !(a.name.ns == NS_XSI && a.name.local == "type"));
                e.name.local = kind;
            }
        }
        e.name.ns = to.to_string();
    }
    for a in &mut e.attrs {
        if a.name.ns == from {
            a.name.ns = to.to_string();
        }
    }
    e.decls.retain(|(_, u)| u != from);
    for c in &mut e.children {
        if let Node::Element(ce) = c {
            remap_in_place(ce, from, to);
        }
    }
}

/// Build an Item (RASD or, in 2.x, EPASD/SASD) with children sorted into schema order (the CIM
/// schemas list properties alphabetically).
fn item(tag: &str, ns: &str, o: &str, fields: Vec<(&str, String)>, extra: Vec<Element>) -> Element {
    let mut fields = fields;
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let mut e = Element::new(o, tag);
    for (k, v) in fields {
        e = e.leaf(ns, k, v);
    }
    for x in extra {
        e = e.child(x);
    }
    e
}

fn virtual_system(d: &Descriptor, opts: &WriteOptions, v: OvfVersion) -> Result<Element> {
    let o = v.ns();
    let p = &d.profile;
    let vm_id = if p.name.is_empty() {
        "vm".to_string()
    } else {
        p.name.clone()
    };
    let mut vs = Element::new(o, "VirtualSystem")
        .attr(o, "id", &vm_id)
        .leaf(o, "Info", "A virtual machine")
        .leaf(o, "Name", &vm_id);
    if let Some(prod) = &p.product {
        let mut ps = Element::new(o, "ProductSection").leaf(o, "Info", "Product information");
        for (tag, val) in [
            ("Product", &prod.name),
            ("Vendor", &prod.vendor),
            ("Version", &prod.version),
            ("FullVersion", &prod.full_version),
            ("ProductUrl", &prod.product_url),
            ("VendorUrl", &prod.vendor_url),
        ] {
            if let Some(val) = val {
                ps = ps.leaf(o, tag, val);
            }
        }
        vs = vs.child(ps);
    }
    if let Some(a) = &p.annotation {
        vs = vs.child(
            Element::new(o, "AnnotationSection")
                .leaf(o, "Info", "A human-readable annotation")
                .leaf(o, "Annotation", a),
        );
    }
    if let Some(l) = &p.eula {
        vs = vs.child(
            Element::new(o, "EulaSection")
                .leaf(o, "Info", "End user licence agreement")
                .leaf(o, "License", l),
        );
    }
    // A profile that names no guest OS gets no OperatingSystemSection (nothing to say).
    let g = &p.guest_os;
    if g.cim_id.is_some() || g.description.is_some() || (opts.vmware && g.vmware_id.is_some()) {
        let mut os = Element::new(o, "OperatingSystemSection").attr(
            o,
            "id",
            g.cim_id.unwrap_or(1).to_string(),
        );
        if opts.vmware {
            if let Some(id) = &g.vmware_id {
                os.set_attr(NS_VMW, "osType", id);
            }
        }
        os = os.leaf(o, "Info", "The kind of installed guest operating system");
        if let Some(desc) = &g.description {
            os = os.leaf(o, "Description", desc);
        }
        vs = vs.child(os);
    }
    vs = vs.child(hardware_section(d, opts, v)?);
    for s in &d.extra_system_sections {
        vs = vs.child(remap(s, d.version, v));
    }
    Ok(vs)
}

fn hardware_section(d: &Descriptor, opts: &WriteOptions, v: OvfVersion) -> Result<Element> {
    let o = v.ns();
    let p = &d.profile;
    let r = NS_RASD;
    let mut system = Element::new(o, "System")
        .leaf(NS_VSSD, "ElementName", "Virtual Hardware Family")
        .leaf(NS_VSSD, "InstanceID", "0")
        .leaf(NS_VSSD, "VirtualSystemIdentifier", &p.name);
    if let Some(t) = &p.hardware_version {
        system = system.leaf(NS_VSSD, "VirtualSystemType", t);
    }
    let mut hw = Element::new(o, "VirtualHardwareSection")
        .leaf(o, "Info", "Virtual hardware requirements")
        .child(system);
    let mut next = 1u32;
    let mut id = || {
        let i = next;
        next += 1;
        i.to_string()
    };
    let mut items: Vec<Element> = Vec::new();
    let mut cpu_extra = Vec::new();
    if let (Some(c), true) = (p.cores_per_socket, opts.vmware) {
        cpu_extra.push(
            Element::new(NS_VMW, "CoresPerSocket")
                .attr(o, "required", "false")
                .text(c.to_string()),
        );
    }
    items.push(item(
        "Item",
        r,
        o,
        vec![
            ("AllocationUnits", "hertz * 10^6".into()),
            ("Description", "Number of virtual CPUs".into()),
            ("ElementName", format!("{} virtual CPU(s)", p.cpus)),
            ("InstanceID", id()),
            ("ResourceType", rt::PROCESSOR.to_string()),
            ("VirtualQuantity", p.cpus.to_string()),
        ],
        if v == OvfVersion::V1 {
            cpu_extra
        } else {
            Vec::new()
        },
    ));
    items.push(item(
        "Item",
        r,
        o,
        vec![
            ("AllocationUnits", "byte * 2^20".into()),
            ("Description", "Memory size".into()),
            ("ElementName", format!("{}MB of memory", p.memory_mib)),
            ("InstanceID", id()),
            ("ResourceType", rt::MEMORY.to_string()),
            ("VirtualQuantity", p.memory_mib.to_string()),
        ],
        Vec::new(),
    ));
    // Controllers: one per model in use, in first-use order; unit numbers per controller.
    let mut controllers: Vec<(Controller, String, u32)> = Vec::new();
    let used = p
        .disks
        .iter()
        .map(|k| k.controller)
        .chain(p.cdroms.iter().map(|c| c.controller));
    for c in used {
        if controllers.iter().any(|(m, _, _)| *m == c) {
            continue;
        }
        let iid = id();
        let index = controllers
            .iter()
            .filter(|(m, _, _)| same_bus(*m, c))
            .count();
        let (rtype, sub, name): (u32, Option<&str>, String) = match c {
            Controller::Ide => (rt::IDE, None, format!("ideController{index}")),
            Controller::Sata => (
                rt::OTHER_STORAGE,
                Some("vmware.sata.ahci"),
                format!("sataController{index}"),
            ),
            Controller::Nvme => (
                rt::OTHER_STORAGE,
                Some("vmware.nvme.controller"),
                format!("nvmeController{index}"),
            ),
            Controller::VirtioBlk => (
                rt::OTHER_STORAGE,
                Some("virtio-blk"),
                format!("virtioController{index}"),
            ),
            Controller::Lsilogic => (rt::SCSI, Some("lsilogic"), format!("SCSIController{index}")),
            Controller::Lsilogicsas => (
                rt::SCSI,
                Some("lsilogicsas"),
                format!("SCSIController{index}"),
            ),
            Controller::Buslogic => (rt::SCSI, Some("buslogic"), format!("SCSIController{index}")),
            Controller::Pvscsi => (
                rt::SCSI,
                Some("VirtualSCSI"),
                format!("SCSIController{index}"),
            ),
            Controller::VirtioScsi => (
                rt::SCSI,
                Some("virtio-scsi"),
                format!("SCSIController{index}"),
            ),
        };
        let mut f = vec![
            ("Address", index.to_string()),
            ("Description", format!("{} controller", c.name())),
            ("ElementName", name),
            ("InstanceID", iid.clone()),
            ("ResourceType", rtype.to_string()),
        ];
        if let Some(s) = sub {
            f.push(("ResourceSubType", s.to_string()));
        }
        items.push(item("Item", r, o, f, Vec::new()));
        controllers.push((c, iid, 0));
    }
    let parent_of = |c: Controller, cs: &[(Controller, String, u32)]| -> String {
        cs.iter()
            .find(|(m, _, _)| *m == c)
            .map(|(_, i, _)| i.clone())
            .unwrap_or_default()
    };
    let disk_tag = if v == OvfVersion::V2 {
        ("StorageItem", NS_SASD)
    } else {
        ("Item", r)
    };
    let mut disk_items = Vec::new();
    for (i, k) in p.disks.iter().enumerate() {
        let disk_id = d
            .disk_ids
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("vmdisk{}", i + 1));
        let unit = next_unit(&mut controllers, k.controller);
        disk_items.push((k.controller, unit, disk_id));
    }
    for (c, unit, disk_id) in disk_items {
        let parent = parent_of(c, &controllers);
        items.push(item(
            disk_tag.0,
            disk_tag.1,
            o,
            vec![
                ("AddressOnParent", unit),
                ("ElementName", format!("disk-{disk_id}")),
                ("HostResource", format!("ovf:/disk/{disk_id}")),
                ("InstanceID", id()),
                ("Parent", parent),
                ("ResourceType", rt::DISK.to_string()),
            ],
            Vec::new(),
        ));
    }
    let mut cd_items = Vec::new();
    for c in &p.cdroms {
        cd_items.push((
            c.controller,
            next_unit(&mut controllers, c.controller),
            c.file.clone(),
        ));
    }
    for (n, (c, unit, file)) in cd_items.into_iter().enumerate() {
        let parent = parent_of(c, &controllers);
        let mut f = vec![
            ("AddressOnParent", unit),
            ("AutomaticAllocation", "false".to_string()),
            ("ElementName", format!("cdrom{n}")),
            ("InstanceID", id()),
            ("Parent", parent),
            ("ResourceType", rt::DVD_DRIVE.to_string()),
        ];
        if let Some(fr) = file.and_then(|h| d.files.iter().find(|f| f.href == h)) {
            f.push(("HostResource", format!("ovf:/file/{}", fr.id)));
        }
        items.push(item("Item", r, o, f, Vec::new()));
    }
    let nic_tag = if v == OvfVersion::V2 {
        ("EthernetPortItem", NS_EPASD)
    } else {
        ("Item", r)
    };
    for (n, nic) in p.nics.iter().enumerate() {
        let mut f = vec![
            ("AddressOnParent", (n + 7).to_string()),
            ("AutomaticAllocation", "true".to_string()),
            ("Connection", nic.network.clone()),
            (
                "Description",
                format!(
                    "{} ethernet adapter on \"{}\"",
                    nic.model.name(),
                    nic.network
                ),
            ),
            ("ElementName", format!("ethernet{n}")),
            ("InstanceID", id()),
            ("ResourceSubType", nic_subtype(&nic.model).to_string()),
            ("ResourceType", rt::ETHERNET.to_string()),
        ];
        if let MacPolicy::Static(mac) = &nic.mac {
            f.push(("Address", mac.clone()));
        }
        items.push(item(nic_tag.0, nic_tag.1, o, f, Vec::new()));
    }
    if p.firmware.tpm {
        items.push(item(
            "Item",
            r,
            o,
            vec![
                ("ElementName", "Virtual TPM".into()),
                ("InstanceID", id()),
                ("ResourceSubType", "vmware.vtpm".into()),
                ("ResourceType", rt::OTHER.to_string()),
            ],
            Vec::new(),
        ));
    }
    // Kept items get fresh InstanceIDs only when theirs would collide.
    let mut taken: BTreeSet<String> = items
        .iter()
        .filter_map(|i| item_field(i, "InstanceID"))
        .collect();
    for x in &d.extra_items {
        let mut x = remap(x, d.version, v);
        let iid = item_field(&x, "InstanceID").or_else(|| item_field(&x, "InstanceId"));
        if iid.as_ref().is_none_or(|i| taken.contains(i)) {
            let fresh = id();
            for c in &mut x.children {
                if let Node::Element(ce) = c {
                    if ce.name.local == "InstanceID" || ce.name.local == "InstanceId" {
                        ce.children = vec![Node::Text(fresh.clone())];
                    }
                }
            }
            taken.insert(fresh);
        } else if let Some(i) = iid {
            taken.insert(i);
        }
        items.push(x);
    }
    // DSP8023 1.x: all Items first, then foreign elements; 2.x: Item, EthernetPortItem, StorageItem.
    let order = |e: &Element| match e.name.local.as_str() {
        "Item" => 0,
        "EthernetPortItem" => 1,
        "StorageItem" => 2,
        _ => 3,
    };
    items.sort_by_key(order);
    for it in items {
        hw = hw.child(it);
    }
    if opts.vmware {
        if p.firmware.kind == FirmwareKind::Uefi {
            hw = hw.child(vmw_config(o, "firmware", "efi"));
        }
        if p.firmware.secure_boot {
            hw = hw.child(vmw_config(o, "bootOptions.efiSecureBootEnabled", "true"));
        }
    }
    for x in &d.extra_hardware {
        hw = hw.child(remap(x, d.version, v));
    }
    Ok(hw)
}

/// The next free unit number on controller `c` (SCSI unit 7 is the host adapter itself).
fn next_unit(cs: &mut [(Controller, String, u32)], c: Controller) -> String {
    let Some(entry) = cs.iter_mut().find(|(m, _, _)| *m == c) else {
        return "0".to_string();
    };
    let u = entry.2;
    entry.2 += 1;
    if c.is_scsi() && entry.2 == 7 {
        entry.2 += 1;
    }
    u.to_string()
}

fn same_bus(a: Controller, b: Controller) -> bool {
    a == b || (a.is_scsi() && b.is_scsi())
}

fn vmw_config(o: &str, key: &str, value: &str) -> Element {
    Element::new(NS_VMW, "Config")
        .attr(o, "required", "false")
        .attr(NS_VMW, "key", key)
        .attr(NS_VMW, "value", value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTY: &str = r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:href="d1.vmdk" ovf:id="file1" ovf:size="10595840"/></References>
  <DiskSection><Info>x</Info><Disk ovf:capacity="30" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
  <NetworkSection><Info>n</Info><Network ovf:name="nat"/></NetworkSection>
  <vmw:StorageGroupSection ovf:required="false"><Info>keep me</Info></vmw:StorageGroupSection>
  <VirtualSystem ovf:id="vm"><Info>A</Info><Name>tty</Name>
    <OperatingSystemSection ovf:id="36" vmw:osType="otherLinuxGuest"><Info>os</Info></OperatingSystemSection>
    <VirtualHardwareSection><Info>hw</Info>
      <System><vssd:ElementName>V</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID><vssd:VirtualSystemType>vmx-09</vssd:VirtualSystemType></System>
      <Item><rasd:ElementName>cpu</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:ElementName>mem</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>32</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>scsi</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:ElementName>disk0</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:AA:BB:CC</rasd:Address><rasd:Connection>nat</rasd:Connection><rasd:ElementName>eth0</rasd:ElementName><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item ovf:required="false"><rasd:ElementName>video</rasd:ElementName><rasd:InstanceID>6</rasd:InstanceID><rasd:ResourceType>24</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
      <vmw:ExtraConfig ovf:required="false" vmw:key="tools.syncTimeWithHost" vmw:value="true"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

    #[test]
    fn parse_reads_the_vmware_dialect_into_the_profile() {
        let d = parse(TTY).unwrap();
        assert_eq!(d.version, OvfVersion::V1);
        let p = &d.profile;
        assert_eq!(p.name, "tty");
        assert_eq!(p.cpus, 2);
        assert_eq!(p.memory_mib, 32);
        assert_eq!(p.firmware.kind, FirmwareKind::Uefi);
        assert_eq!(p.guest_os.vmware_id.as_deref(), Some("otherLinuxGuest"));
        assert_eq!(p.guest_os.cim_id, Some(36));
        assert_eq!(p.disks.len(), 1);
        assert_eq!(p.disks[0].capacity, 30 << 20);
        assert_eq!(p.disks[0].controller, Controller::Pvscsi);
        assert_eq!(p.disks[0].file.as_deref(), Some("d1.vmdk"));
        assert_eq!(p.nics[0].model, NicModel::Vmxnet3);
        assert_eq!(p.nics[0].mac, MacPolicy::Static("00:50:56:aa:bb:cc".into()));
        assert_eq!(d.extra_items.len(), 1);
        assert_eq!(d.extra_hardware.len(), 1);
        assert_eq!(d.extra_sections.len(), 1);
    }

    #[test]
    fn parse_write_parse_preserves_profile_and_unknown_sections() {
        let d = parse(TTY).unwrap();
        let text = write(&d, &WriteOptions::default()).unwrap();
        let again = parse(&text).unwrap();
        assert_eq!(again.profile, d.profile, "{text}");
        assert_eq!(again.files, d.files);
        assert_eq!(
            again.disks.iter().map(|k| k.capacity).collect::<Vec<_>>(),
            vec![30 << 20]
        );
        assert_eq!(again.extra_sections.len(), 1);
        assert!(text.contains("keep me"));
        assert!(text.contains("tools.syncTimeWithHost"));
        assert_eq!(again.extra_items.len(), 1);
    }

    #[test]
    fn ovf_09_sections_by_xsi_type_are_understood() {
        let text = r#"<ovf:Envelope xmlns:ovf="http://www.vmware.com/schema/ovf/1/envelope" xmlns="http://www.vmware.com/schema/ovf/1/envelope" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ovf:version="0.9">
  <References><File ovf:href="system.vmdk" ovf:id="f1"/></References>
  <Section xsi:type="ovf:DiskSection_Type"><Info>d</Info><Disk ovf:diskId="system" ovf:fileRef="f1" ovf:capacity="2147483648"/></Section>
  <Content ovf:id="centos" xsi:type="ovf:VirtualSystem_Type"><Info>A</Info>
    <Section xsi:type="ovf:VirtualHardwareSection_Type"><Info>h</Info>
      <Item><rasd:InstanceId>1</rasd:InstanceId><rasd:ResourceType>4</rasd:ResourceType><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:VirtualQuantity>512</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceId>2</rasd:InstanceId><rasd:ResourceType>17</rasd:ResourceType><rasd:HostResource>/disk/system</rasd:HostResource></Item>
    </Section>
  </Content></ovf:Envelope>"#;
        let d = parse(text).unwrap();
        assert_eq!(d.version, OvfVersion::V0_9);
        assert_eq!(d.profile.name, "centos");
        assert_eq!(d.profile.memory_mib, 512);
        assert_eq!(d.profile.disks[0].capacity, 2 << 30);
    }

    #[test]
    fn parse_rejects_structural_errors() {
        let dup = TTY.replace(
            "</References>",
            "<File ovf:href=\"x\" ovf:id=\"file1\"/></References>",
        );
        assert!(parse(&dup)
            .unwrap_err()
            .to_string()
            .contains("duplicate file id"));
        let missing = TTY.replace("ovf:fileRef=\"file1\"", "ovf:fileRef=\"nope\"");
        assert!(parse(&missing).is_err());
        let zero = TTY.replace("ovf:capacity=\"30\"", "ovf:capacity=\"0\"");
        assert!(parse(&zero).is_err());
        let neg = TTY.replace("ovf:size=\"10595840\"", "ovf:size=\"-1\"");
        assert_eq!(parse(&neg).unwrap().files[0].size, None);
        let bad = TTY.replace("ovf:size=\"10595840\"", "ovf:size=\"12x\"");
        assert!(parse(&bad).is_err());
        assert!(parse("<Envelope xmlns=\"urn:other\"/>").is_err());
        let noid = TTY.replace("<VirtualSystem ovf:id=\"vm\">", "<VirtualSystem>");
        assert!(parse(&noid).is_err());
    }

    #[test]
    fn writer_orders_rasd_children_alphabetically_and_gives_every_item_an_id() {
        let mut p = crate::profile::sample();
        p.cores_per_socket = Some(2);
        let files = vec![
            ("a.vmdk".to_string(), 100, VMDK_STREAM_URI.to_string()),
            ("b.vmdk".to_string(), 200, VMDK_STREAM_URI.to_string()),
        ];
        let d = descriptor_for(&p, &files);
        let text = write(&d, &WriteOptions::default()).unwrap();
        let root = xml::parse(&text).unwrap();
        let vs = root.find_local("VirtualSystem").unwrap();
        let hw = vs.find_local("VirtualHardwareSection").unwrap();
        for it in hw.elements().filter(|e| e.name.local == "Item") {
            let names: Vec<&str> = it
                .elements()
                .filter(|c| c.name.ns == NS_RASD)
                .map(|c| c.name.local.as_str())
                .collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted);
            assert!(names.contains(&"ElementName") && names.contains(&"InstanceID"));
        }
        let again = parse(&text).unwrap();
        let mut expect = p.clone();
        expect.disks[0].file = Some("a.vmdk".into());
        expect.disks[1].file = Some("b.vmdk".into());
        assert_eq!(again.profile, expect, "{text}");
    }

    #[test]
    fn ovf2_writer_uses_ethernet_port_and_storage_items() {
        let p = crate::profile::sample();
        let d = descriptor_for(&p, &[]);
        let text = write(
            &d,
            &WriteOptions {
                version: OvfVersion::V2,
                vmware: true,
            },
        )
        .unwrap();
        assert!(text.contains("EthernetPortItem") && text.contains("StorageItem"));
        let again = parse(&text).unwrap();
        assert_eq!(again.version, OvfVersion::V2);
        assert_eq!(again.profile.nics, p.nics);
        assert_eq!(again.profile.disks.len(), 2);
    }
}
