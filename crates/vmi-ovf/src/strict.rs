//! Strict descriptor checks (`vmi ovf verify`, [`crate::envelope::parse_strict`]): the rules of
//! DSP0243 (OVF 1.1/2.0 specification) and DSP8023 (its schema) that
//! [`crate::envelope::parse`] does not enforce, because real-world descriptors break them and
//! importers cope. Each problem names the element and the values.
//!
//! Checked:
//! - one VirtualSystem or VirtualSystemCollection per envelope (DSP0243 §5.1); OVF 0.9
//!   `Section`/`Content` with an `xsi:type` that resolves, and `ovf:version` on 0.9 envelopes;
//! - `Info` on VirtualHardware, OperatingSystem and Install sections (§9, `Section_Type`) and, in
//!   1.x/2.x envelopes, on virtual systems and collections (`Content_Type`);
//! - sections where §9 puts them: disk, network and deployment-option sections on the envelope,
//!   hardware/OS/product/annotation/EULA/install sections on a virtual system,
//!   resource-allocation and startup sections on a collection;
//! - sections in an OVF namespace that OVF does not define, unless `ovf:required="false"` (§9.1);
//! - File sizes that are integers (§7.1); Disk ids unique, `ovf:capacity` present, `parentRef` to
//!   an earlier disk, `populatedSize` not above the capacity (§9.1);
//! - hardware items (§9.8): an `InstanceID` unique within its configuration, a `ResourceType` in
//!   the CIM value map, a `Parent` that exists, `HostResource` `ovf:/disk/ID` / `ovf:/file/ID`
//!   that exist, integer quantities, CIM properties that exist (or are `ovf:required="false"`),
//!   `ovf:bound` min/max items that have a normal item and come once, one processor and one
//!   memory item per configuration;
//! - Ethernet `Connection`s naming a network of the NetworkSection (§9.3);
//! - ProductSection properties with a key, a type of §9.5.1 (or one vSphere deploys) and unique
//!   keys, and one ProductSection per class/instance (§9.5).
//!
//! Not enforced, because valid descriptors in the field break them: `Info` on envelope-level
//! sections and on OVF 0.9 virtual systems, `ovf:format` on Disk, one disk per file (deployment options
//! share files), keys without `.` (`guestinfo.…`), `ovf:version` on 1.x envelopes.

use crate::envelope::{ovf_attr, section_kind};
use crate::error::Result;
use crate::units;
use crate::xml::{self, Element};
use std::collections::{BTreeMap, BTreeSet};

/// Sections that belong on the Envelope.
const ENVELOPE_SECTIONS: &[&str] = &["DiskSection", "NetworkSection", "DeploymentOptionSection"];
/// Sections that belong on a VirtualSystem (or a collection, for the shared ones).
const SYSTEM_SECTIONS: &[&str] = &[
    "VirtualHardwareSection",
    "OperatingSystemSection",
    "InstallSection",
];
/// Sections allowed on a VirtualSystem or a VirtualSystemCollection.
const CONTENT_SECTIONS: &[&str] = &["ProductSection", "AnnotationSection", "EulaSection"];
/// Sections that belong on a VirtualSystemCollection.
const COLLECTION_SECTIONS: &[&str] = &["ResourceAllocationSection", "StartupSection"];

/// DSP0243 §9.5.1 property types (and VMware's `password`/`ip` qualifier forms are attributes).
const PROPERTY_TYPES: &[&str] = &[
    "uint8", "sint8", "uint16", "sint16", "uint32", "sint32", "uint64", "sint64", "string",
    "boolean", "real32", "real64",
];

/// A §9.5.1 type, or one of the forms vSphere also deploys (`int`, `password`, `ip`,
/// `ip:NETWORK`, `expression`).
fn property_type_ok(t: &str) -> bool {
    let t = t.to_ascii_lowercase();
    let t = t.as_str();
    PROPERTY_TYPES.contains(&t) || VSPHERE_PROPERTY_TYPES.contains(&t) || t.starts_with("ip:")
}

/// Property types vSphere accepts beyond DSP0243.
const VSPHERE_PROPERTY_TYPES: &[&str] = &["int", "password", "ip", "expression", "real"];

/// OVF 2.x sections (DSP0243 2.x §9.11–9.16, §10): known, placement not checked here.
const OVF2_SECTIONS: &[&str] = &[
    "ScaleOutSection",
    "PlacementGroupSection",
    "PlacementSection",
    "EncryptionSection",
    "EnvironmentFilesSection",
    "BootDeviceSection",
    "SharedDiskSection",
];

fn is_known_section(kind: &str) -> bool {
    OVF2_SECTIONS.contains(&kind)
        || ENVELOPE_SECTIONS.contains(&kind)
        || SYSTEM_SECTIONS.contains(&kind)
        || CONTENT_SECTIONS.contains(&kind)
        || COLLECTION_SECTIONS.contains(&kind)
        || matches!(
            kind,
            "References"
                | "VirtualSystem"
                | "VirtualSystemCollection"
                | "Info"
                | "Name"
                | "Strings"
                | "ResourceAllocationSection"
        )
}

/// Whether `e` is meant as a section: OVF 0.9 `Section`, or a `…Section` element.
fn is_section(e: &Element) -> bool {
    e.name.local == "Section" || e.name.local.ends_with("Section")
}

fn text_of(e: &Element, local: &str) -> Option<String> {
    e.elements()
        .find(|c| c.name.local.eq_ignore_ascii_case(local))
        .map(|c| c.text_content())
}

/// Strict problems of a descriptor, empty when it passes. XML that cannot be read is an error.
pub fn problems(text: &str) -> Result<Vec<String>> {
    let root = xml::parse(text)?;
    let mut out = Vec::new();
    check_envelope(&root, &mut out);
    Ok(out)
}

fn check_envelope(root: &Element, out: &mut Vec<String>) {
    let contents: Vec<&Element> = root
        .elements()
        .filter(|e| {
            matches!(
                section_kind(e).as_str(),
                "VirtualSystem" | "VirtualSystemCollection"
            )
        })
        .collect();
    match contents.len() {
        1 => {}
        0 => out.push("Envelope has no VirtualSystem or VirtualSystemCollection".into()),
        n => out.push(format!(
            "Envelope has {n} top-level virtual systems; DSP0243 allows one"
        )),
    }
    if root.name.ns == crate::envelope::NS_OVF09 && ovf_attr(root, "version").is_none() {
        out.push("OVF 0.9 Envelope without ovf:version".into());
    }
    unknown_required_sections(root, 0, out);
    let mut networks = BTreeSet::new();
    let mut disks = BTreeSet::new();
    let mut files = BTreeSet::new();
    for e in root.elements() {
        let kind = section_kind(e);
        match kind.as_str() {
            "References" => check_files(e, &mut files, out),
            "NetworkSection" => {
                for n in e.elements().filter(|n| n.name.local == "Network") {
                    if let Some(name) = ovf_attr(n, "name") {
                        networks.insert(name.to_string());
                    }
                }
            }
            _ => {}
        }
        check_section_common(e, &kind, "Envelope", out);
    }
    for e in root.elements().filter(|e| section_kind(e) == "DiskSection") {
        check_disks(e, &mut disks, out);
    }
    let cx = Refs {
        have_network_section: root.elements().any(|e| section_kind(e) == "NetworkSection"),
        networks,
        disks,
        files,
    };
    for c in contents {
        check_content(c, &cx, 0, out);
    }
}

/// What hardware items may refer to.
struct Refs {
    /// Whether the envelope has a NetworkSection at all.
    have_network_section: bool,
    /// `Network/@ovf:name`s.
    networks: BTreeSet<String>,
    /// `Disk/@ovf:diskId`s.
    disks: BTreeSet<String>,
    /// `File/@ovf:id`s.
    files: BTreeSet<String>,
}

/// Info, placement and `ovf:required` for one child of `parent` (`Envelope`, `VirtualSystem` or
/// `VirtualSystemCollection`).
fn check_section_common(e: &Element, kind: &str, parent: &str, out: &mut Vec<String>) {
    if !is_section(e) && !matches!(kind, "VirtualSystem" | "VirtualSystemCollection") {
        return;
    }
    if matches!(e.name.local.as_str(), "Section" | "Content") && kind == e.name.local {
        out.push(format!(
            "{parent}: {} element whose xsi:type does not resolve to an OVF type",
            e.name.local
        ));
        return;
    }
    // Info is required everywhere (Section_Type, Content_Type), but exporters leave it out of
    // envelope-level sections, and OVF 0.9 (ovftool's own test descriptors) out of virtual
    // systems; it is checked on the hardware, OS and install sections, and on the virtual
    // systems of DSP8023 (1.x/2.x) envelopes.
    let content = matches!(kind, "VirtualSystem" | "VirtualSystemCollection")
        && e.name.ns != crate::envelope::NS_OVF09
        && !e.name.ns.is_empty();
    if (SYSTEM_SECTIONS.contains(&kind) || content) && e.elements().all(|c| c.name.local != "Info")
    {
        out.push(format!("{parent}: {kind} has no Info element"));
    }
    let allowed = match parent {
        "Envelope" => {
            // VMware Studio writes EulaSection on the envelope; ovftool takes it.
            ENVELOPE_SECTIONS.contains(&kind) || kind == "References" || kind == "EulaSection"
        }
        "VirtualSystem" => SYSTEM_SECTIONS.contains(&kind) || CONTENT_SECTIONS.contains(&kind),
        _ => {
            COLLECTION_SECTIONS.contains(&kind)
                || CONTENT_SECTIONS.contains(&kind)
                || kind == "OperatingSystemSection"
                || kind == "VirtualHardwareSection"
        }
    };
    if is_known_section(kind)
        && !allowed
        && !OVF2_SECTIONS.contains(&kind)
        && !matches!(
            kind,
            "VirtualSystem" | "VirtualSystemCollection" | "Strings"
        )
    {
        out.push(format!("{kind} is not allowed on {parent}"));
    }
}

/// Sections in an OVF namespace (or none) that OVF does not define and that do not say
/// `ovf:required="false"` (DSP0243 §9.1: a consumer must refuse required sections it does not
/// understand). Vendor sections in their own namespaces are left to their vendors.
fn unknown_required_sections(e: &Element, depth: usize, out: &mut Vec<String>) {
    use crate::envelope::{NS_OVF09, NS_OVF1, NS_OVF2};
    for c in e.elements() {
        let ovf_ns = matches!(c.name.ns.as_str(), "" | NS_OVF1 | NS_OVF2 | NS_OVF09);
        let kind = section_kind(c);
        if ovf_ns
            && c.name.local.ends_with("Section")
            && !is_known_section(&kind)
            && !matches!(ovf_attr(c, "required"), Some("false" | "0"))
        {
            out.push(format!(
                "{}: {kind} is not an OVF section and is not marked ovf:required=\"false\"",
                e.name.local
            ));
        }
        if depth < 8 {
            unknown_required_sections(c, depth + 1, out);
        }
    }
}

fn check_files(refs: &Element, files: &mut BTreeSet<String>, out: &mut Vec<String>) {
    for f in refs.elements().filter(|f| f.name.local == "File") {
        if let Some(id) = ovf_attr(f, "id") {
            files.insert(id.to_string());
        }
        if let Some(s) = ovf_attr(f, "size") {
            // Negative sizes are ovftool's "unknown"; anything else must be an xs:long.
            if s.trim().parse::<u64>().is_err() && s.trim().parse::<i64>().is_err() {
                out.push(format!(
                    "File '{}': ovf:size '{s}' is not an integer in range",
                    ovf_attr(f, "id").unwrap_or("?")
                ));
            }
        }
    }
}

fn bytes_of(e: &Element, value_attr: &str, units_attr: &str) -> Option<u64> {
    units::to_bytes(ovf_attr(e, value_attr)?, ovf_attr(e, units_attr)).ok()
}

fn check_disks(ds: &Element, ids: &mut BTreeSet<String>, out: &mut Vec<String>) {
    for d in ds.elements().filter(|d| d.name.local == "Disk") {
        let id = ovf_attr(d, "diskId").unwrap_or("?").to_string();
        if ovf_attr(d, "capacity").is_none() {
            out.push(format!("Disk '{id}' has no ovf:capacity"));
        }
        if let Some(parent) = ovf_attr(d, "parentRef") {
            if !ids.contains(parent) {
                out.push(format!(
                    "Disk '{id}': parentRef '{parent}' is not a disk listed before it"
                ));
            }
        }
        if let (Some(cap), Some(pop)) = (
            bytes_of(d, "capacity", "capacityAllocationUnits"),
            ovf_attr(d, "populatedSize").and_then(|p| p.trim().parse::<u64>().ok()),
        ) {
            // i64::MAX is the "unknown" some exporters write.
            if pop > cap && pop < i64::MAX as u64 {
                out.push(format!(
                    "Disk '{id}': populatedSize {pop} is larger than the capacity {cap}"
                ));
            }
        }
        if !ids.insert(id.clone()) {
            out.push(format!("DiskSection: duplicate diskId '{id}'"));
        }
    }
}

fn check_content(c: &Element, cx: &Refs, depth: usize, out: &mut Vec<String>) {
    let kind = section_kind(c);
    let mut products = BTreeSet::new();
    for s in c.elements() {
        let sk = section_kind(s);
        check_section_common(s, &sk, &kind, out);
        match sk.as_str() {
            "VirtualHardwareSection" => check_hardware(s, cx, out),
            "ProductSection" => {
                let key = (
                    ovf_attr(s, "class").unwrap_or("").to_string(),
                    ovf_attr(s, "instance").unwrap_or("").to_string(),
                );
                if !products.insert(key.clone()) {
                    out.push(format!(
                        "{kind}: two ProductSections for class '{}' instance '{}'",
                        key.0, key.1
                    ));
                }
                check_product(s, out);
            }
            "VirtualSystem" | "VirtualSystemCollection" if depth < 16 => {
                check_content(s, cx, depth + 1, out)
            }
            _ => {}
        }
    }
}

fn check_product(s: &Element, out: &mut Vec<String>) {
    let mut keys = BTreeSet::new();
    for p in s.elements().filter(|e| e.name.local == "Property") {
        let Some(key) = ovf_attr(p, "key") else {
            out.push("ProductSection: a Property has no ovf:key".into());
            continue;
        };
        // DSP0243 also bars '.' and ':' in keys, but VMware's own appliances use dotted keys
        // (`guestinfo.…`, `vami.…`) everywhere; only an empty key is refused.
        if key.trim().is_empty() {
            out.push("ProductSection: a Property has an empty ovf:key".into());
        }
        match ovf_attr(p, "type") {
            None => out.push(format!("ProductSection: Property '{key}' has no ovf:type")),
            Some(t) if !property_type_ok(t) => out.push(format!(
                "ProductSection: Property '{key}' has type '{t}', not one of DSP0243 §9.5.1"
            )),
            Some(_) => {}
        }
        if !keys.insert(key.to_string()) {
            out.push(format!("ProductSection: duplicate Property key '{key}'"));
        }
    }
}

/// CIM_ResourceAllocationSettingData properties (DSP8023's CIM schema, version 2.22 and the
/// EthernetPort/Storage allocation classes of OVF 2.x).
const RASD_PROPERTIES: &[&str] = &[
    // OVF 0.9 descriptors use the older CIM 2.x class with BusNumber.
    "BusNumber",
    "Address",
    "AddressOnParent",
    "AllocationUnits",
    "AutomaticAllocation",
    "AutomaticDeallocation",
    "Caption",
    "ChangeableType",
    "ComponentSetting",
    "ConfigurationName",
    "Connection",
    "ConsumerVisibility",
    "Description",
    "ElementName",
    "Generation",
    "HostExtentName",
    "HostExtentNameFormat",
    "HostExtentNameNamespace",
    "HostExtentStartingAddress",
    "HostResource",
    "HostResourceBlockSize",
    "InstanceID",
    "Limit",
    "MappingBehavior",
    "OtherHostExtentNameFormat",
    "OtherHostExtentNameNamespace",
    "OtherResourceType",
    "Parent",
    "PoolID",
    "Reservation",
    "ResourceSubType",
    "ResourceType",
    "SoID",
    "SoOrgID",
    "VirtualQuantity",
    "VirtualQuantityUnits",
    "VirtualResourceBlockSize",
    "Weight",
    "Access",
    "AllowedPriorities",
    "AllowedToReceiveMACAddresses",
    "AllowedToReceiveVLANs",
    "AllowedToTransmitMACAddresses",
    "AllowedToTransmitVLANs",
    "DefaultPortVID",
    "DefaultPriority",
    "DesiredVLANEndpointMode",
    "GroupID",
    "ManagerID",
    "NetworkPortProfileID",
    "NetworkPortProfileIDType",
    "OtherEndpointMode",
    "OtherNetworkPortProfileIDTypeInfo",
    "PortCorrelationID",
    "PortVID",
    "Promiscuous",
    "ReceiveBandwidthLimit",
    "ReceiveBandwidthReservation",
    "SourceMACFilteringEnabled",
    "VSITypeID",
    "VSITypeIDVersion",
];

/// Item properties that are CIM integers (`xs:unsignedLong`/`unsignedInt` in DSP8023).
const RASD_INTEGERS: &[&str] = &["Reservation", "Limit", "VirtualQuantity", "Weight"];

/// Unknown CIM properties an item marks `ovf:required` (DSP0243 §9.8: the consumer must
/// understand them) and integer properties that are not integers (`${property}` references
/// excepted).
fn check_item_properties(it: &Element, id: &str, out: &mut Vec<String>) {
    for c in it.elements() {
        let cim = c
            .name
            .ns
            .starts_with("http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/");
        if !cim {
            continue;
        }
        let local = c.name.local.as_str();
        let known = RASD_PROPERTIES
            .iter()
            .any(|k| k.eq_ignore_ascii_case(local));
        if !known && !matches!(ovf_attr(c, "required"), Some("false" | "0")) {
            out.push(format!(
                "item '{id}': required property {local} is not a CIM allocation property"
            ));
        }
        if RASD_INTEGERS.contains(&local) {
            let t = c.text_content();
            if !t.is_empty() && !t.starts_with("${") && t.parse::<u64>().is_err() {
                out.push(format!("item '{id}': {local} '{t}' is not an integer"));
            }
        }
    }
}

/// `HostResource` references (DSP0243 §9.8 table 8): `ovf:/disk/ID` names a Disk, `ovf:/file/ID`
/// a File (`/disk/ID` is the OVF 0.9 form).
fn check_host_resource(it: &Element, id: &str, cx: &Refs, out: &mut Vec<String>) {
    for h in it.elements().filter(|c| c.name.local == "HostResource") {
        let t = h.text_content();
        let r = t.strip_prefix("ovf:").unwrap_or(&t);
        if let Some(d) = r.strip_prefix("/disk/") {
            if !cx.disks.contains(d) {
                out.push(format!(
                    "item '{id}': HostResource '{t}' names no Disk of the DiskSection"
                ));
            }
        } else if let Some(f) = r.strip_prefix("/file/") {
            if !cx.files.contains(f) {
                out.push(format!(
                    "item '{id}': HostResource '{t}' names no File of the References"
                ));
            }
        }
    }
}

/// CIM `ResourceType` value map: 1..=35 defined, 32768..=65535 vendor reserved.
fn resource_type_ok(v: u32) -> bool {
    (1..=35).contains(&v) || (32768..=65535).contains(&v)
}

fn check_hardware(hw: &Element, cx: &Refs, out: &mut Vec<String>) {
    // (InstanceID, configuration) → bounds seen.
    let mut normal: BTreeMap<(String, String), ()> = BTreeMap::new();
    let mut bounds: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    let mut all_ids = BTreeSet::new();
    // (processor|memory, configuration) seen: one of each per configuration.
    let mut single = BTreeSet::new();
    let items: Vec<&Element> = hw
        .elements()
        .filter(|e| {
            matches!(
                e.name.local.as_str(),
                "Item" | "EthernetPortItem" | "StorageItem"
            )
        })
        .collect();
    for it in &items {
        let Some(id) = text_of(it, "InstanceID") else {
            out.push(format!(
                "VirtualHardwareSection: an item ('{}') has no InstanceID",
                text_of(it, "ElementName")
                    .or_else(|| text_of(it, "Caption"))
                    .unwrap_or_default()
            ));
            continue;
        };
        all_ids.insert(id.clone());
        check_item_properties(it, &id, out);
        check_host_resource(it, &id, cx, out);
        let conf = ovf_attr(it, "configuration").unwrap_or("").to_string();
        match ovf_attr(it, "bound") {
            None | Some("normal") => {
                if normal.insert((id.clone(), conf.clone()), ()).is_some() {
                    out.push(format!(
                        "VirtualHardwareSection: duplicate InstanceID '{id}'"
                    ));
                }
            }
            Some(b @ ("min" | "max")) => {
                let n = bounds
                    .entry((id.clone(), conf.clone(), b.to_string()))
                    .or_insert(0);
                *n += 1;
                if *n == 2 {
                    out.push(format!(
                        "VirtualHardwareSection: item '{id}' has two ovf:bound=\"{b}\" items"
                    ));
                }
            }
            Some(other) => out.push(format!(
                "VirtualHardwareSection: item '{id}' has ovf:bound '{other}'"
            )),
        }
        let rt = text_of(it, "ResourceType").and_then(|t| t.parse::<u32>().ok());
        if matches!(rt, Some(3 | 4)) && matches!(ovf_attr(it, "bound"), None | Some("normal")) {
            let what = if rt == Some(3) { "processor" } else { "memory" };
            if !single.insert((what, conf.clone())) {
                out.push(format!(
                    "VirtualHardwareSection: a second {what} item ('{id}'){}",
                    if conf.is_empty() {
                        String::new()
                    } else {
                        format!(" in configuration '{conf}'")
                    }
                ));
            }
        }
        match text_of(it, "ResourceType").map(|t| t.parse::<u32>()) {
            None => out.push(format!(
                "VirtualHardwareSection: item '{id}' has no ResourceType"
            )),
            Some(Ok(v)) if resource_type_ok(v) => {
                if v == 10 {
                    for conn in it.elements().filter(|c| c.name.local == "Connection") {
                        let n = conn.text_content();
                        if !cx.have_network_section && !n.is_empty() {
                            out.push(format!(
                                "item '{id}': connected to network '{n}' but the envelope has no NetworkSection"
                            ));
                        } else if !n.is_empty() && !cx.networks.contains(&n) {
                            out.push(format!(
                                "item '{id}': network '{n}' is not in the NetworkSection"
                            ));
                        }
                    }
                }
            }
            Some(_) => out.push(format!(
                "VirtualHardwareSection: item '{id}' has ResourceType '{}', not a CIM value",
                text_of(it, "ResourceType").unwrap_or_default()
            )),
        }
    }
    for (id, conf, b) in bounds.keys() {
        if !normal.contains_key(&(id.clone(), conf.clone()))
            && !normal.contains_key(&(id.clone(), String::new()))
        {
            out.push(format!(
                "VirtualHardwareSection: ovf:bound=\"{b}\" item '{id}' has no normal item"
            ));
        }
    }
    for it in &items {
        if let Some(p) = text_of(it, "Parent") {
            if !p.is_empty() && !all_ids.contains(&p) {
                out.push(format!(
                    "VirtualHardwareSection: item '{}' has Parent '{p}', which no item has as InstanceID",
                    text_of(it, "InstanceID").unwrap_or_default()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{descriptor_for, write, WriteOptions, VMDK_STREAM_URI};

    fn written() -> String {
        let mut p = crate::profile::sample();
        p.disks.truncate(1);
        let d = descriptor_for(&p, &[("a.vmdk".into(), 10, VMDK_STREAM_URI.into())]);
        write(&d, &WriteOptions::default()).unwrap()
    }

    #[test]
    fn what_vmi_writes_passes_the_strict_checks() {
        assert_eq!(problems(&written()).unwrap(), Vec::<String>::new());
        assert!(crate::envelope::parse_strict(&written()).is_ok());
    }

    #[test]
    fn duplicate_instance_ids_and_dangling_parents_are_problems() {
        let t = written();
        let first = t.find("<rasd:InstanceID>").unwrap();
        let end = t[first..].find("</rasd:InstanceID>").unwrap() + first;
        let id = &t[first + "<rasd:InstanceID>".len()..end];
        let dup = t.replacen(
            &format!(
                "<rasd:InstanceID>{}</rasd:InstanceID>",
                (id.parse::<u32>().unwrap() + 1)
            ),
            &format!("<rasd:InstanceID>{id}</rasd:InstanceID>"),
            1,
        );
        let p = problems(&dup).unwrap();
        assert!(
            p.iter().any(|x| x.contains("duplicate InstanceID")),
            "{p:?}"
        );
        assert!(
            crate::envelope::parse(&dup).is_ok(),
            "the lenient parser still reads it"
        );
        assert!(crate::envelope::parse_strict(&dup).is_err());
    }

    #[test]
    fn a_second_memory_item_in_one_configuration_is_a_problem() {
        let t = written();
        let start = t.find("<ovf:Item>").unwrap();
        let mem = t[start..]
            .split("</ovf:Item>")
            .find(|i| i.contains("<rasd:ResourceType>4<"))
            .unwrap()
            .trim_start_matches(|c: char| c != '<');
        let item = format!("{mem}</ovf:Item>");
        let second = item.replace(
            &item
                [item.find("<rasd:InstanceID>").unwrap()..item.find("</rasd:InstanceID>").unwrap()],
            "<rasd:InstanceID>99",
        );
        let doubled = t.replacen(&item, &format!("{item}{second}"), 1);
        let p = problems(&doubled).unwrap();
        assert!(
            p.iter().any(|x| x.contains("a second memory item ('99')")),
            "{p:?}"
        );
        // In another deployment configuration it is an alternative, not a second one.
        let alt = second.replacen("<ovf:Item>", "<ovf:Item ovf:configuration=\"big\">", 1);
        let p = problems(&t.replacen(&item, &format!("{item}{alt}"), 1)).unwrap();
        assert!(!p.iter().any(|x| x.contains("second memory")), "{p:?}");
    }

    #[test]
    fn misplaced_sections_and_bad_properties_are_problems() {
        let t = written().replacen(
            "<ovf:VirtualSystem ",
            "<ovf:AnnotationSection><ovf:Info>x</ovf:Info><ovf:Annotation>a</ovf:Annotation>\
             </ovf:AnnotationSection><ovf:VirtualSystem ",
            1,
        );
        let p = problems(&t).unwrap();
        assert!(
            p.iter()
                .any(|x| x.contains("AnnotationSection is not allowed on Envelope")),
            "{p:?}"
        );
        assert!(property_type_ok("uint16") && property_type_ok("ip:VM Network"));
        assert!(!property_type_ok("nosuchtype"));
        assert!(resource_type_ok(17) && !resource_type_ok(0) && !resource_type_ok(36));
    }
}
