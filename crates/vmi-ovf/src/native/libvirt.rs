//! libvirt domain XML for KVM (libvirt's "Domain XML format"): generated from a profile and parsed
//! back. Machine type is `q35` unless an IDE device needs `pc` (q35 has no IDE).
//!
//! Disk capacities are not part of domain XML: parsed disks have capacity 0.

use crate::error::{OvfError, Result};
use crate::profile::*;
use crate::xml::{self, Element};

fn nic_model(m: &NicModel) -> &str {
    match m {
        NicModel::E1000 => "e1000",
        NicModel::E1000e => "e1000e",
        NicModel::Vmxnet3 => "vmxnet3",
        NicModel::VirtioNet => "virtio",
        NicModel::Rtl8139 => "rtl8139",
        NicModel::Pcnet32 => "pcnet",
        NicModel::HypervSynthetic => "netvsc",
        NicModel::Other(s) => s,
    }
}

/// libvirt `<controller type="scsi" model=…>` for a SCSI model.
fn scsi_model(c: Controller) -> Option<&'static str> {
    match c {
        Controller::Lsilogic => Some("lsilogic"),
        Controller::Lsilogicsas => Some("lsisas1068"),
        Controller::Buslogic => Some("buslogic"),
        Controller::Pvscsi => Some("vmpvscsi"),
        Controller::VirtioScsi => Some("virtio-scsi"),
        _ => None,
    }
}

fn bus_of(c: Controller) -> &'static str {
    match c {
        Controller::Ide => "ide",
        Controller::Sata => "sata",
        Controller::VirtioBlk => "virtio",
        Controller::Nvme => "nvme",
        _ => "scsi",
    }
}

fn dev_name(bus: &str, n: usize) -> String {
    let prefix = match bus {
        "virtio" => "vd",
        "ide" => "hd",
        "nvme" => "nvme",
        _ => "sd",
    };
    if bus == "nvme" {
        return format!("nvme0n{}", n + 1);
    }
    // a..z, then aa, ab, … as libvirt names them.
    let mut s = String::new();
    let mut k = n;
    loop {
        s.insert(0, (b'a' + (k % 26) as u8) as char);
        if k < 26 {
            break;
        }
        k = k / 26 - 1;
    }
    format!("{prefix}{s}")
}

/// Generate domain XML for `p`.
pub fn generate(p: &HardwareProfile) -> Result<String> {
    p.validate()?;
    // The domain schema of the libvirt releases in use has no emulated NVMe disk bus.
    if p.disks.iter().any(|d| d.controller == Controller::Nvme)
        || p.cdroms.iter().any(|c| c.controller == Controller::Nvme)
    {
        return Err(OvfError::Unsupported(
            "libvirt domain XML has no emulated NVMe disk bus; use virtio-blk or virtio-scsi"
                .into(),
        ));
    }
    let any_ide = p.disks.iter().any(|d| d.controller == Controller::Ide)
        || p.cdroms.iter().any(|c| c.controller == Controller::Ide);
    let machine = if any_ide { "pc" } else { "q35" };
    let mut dom = Element::new("", "domain")
        .attr("", "type", "kvm")
        .leaf("", "name", &p.name);
    if let Some(a) = &p.annotation {
        dom = dom.leaf("", "description", a);
    }
    dom = dom
        .child(
            Element::new("", "memory")
                .attr("", "unit", "MiB")
                .text(p.memory_mib.to_string()),
        )
        .leaf("", "vcpu", p.cpus.to_string());
    let mut os = Element::new("", "os");
    if p.firmware.kind == FirmwareKind::Uefi {
        os.set_attr("", "firmware", "efi");
    }
    os = os.child(
        Element::new("", "type")
            .attr("", "arch", "x86_64")
            .attr("", "machine", machine)
            .text("hvm"),
    );
    if p.firmware.kind == FirmwareKind::Uefi {
        os = os.child(
            Element::new("", "firmware").child(
                Element::new("", "feature")
                    .attr(
                        "",
                        "enabled",
                        if p.firmware.secure_boot { "yes" } else { "no" },
                    )
                    .attr("", "name", "secure-boot"),
            ),
        );
    }
    dom = dom.child(os);
    let mut features = Element::new("", "features")
        .child(Element::new("", "acpi"))
        .child(Element::new("", "apic"));
    if p.firmware.secure_boot {
        features = features.child(Element::new("", "smm").attr("", "state", "on"));
    }
    dom = dom.child(features);
    if let Some(c) = p.cores_per_socket {
        let sockets = (p.cpus / c.max(1)).max(1);
        dom = dom.child(
            Element::new("", "cpu").child(
                Element::new("", "topology")
                    .attr("", "sockets", sockets.to_string())
                    .attr("", "cores", c.to_string())
                    .attr("", "threads", "1"),
            ),
        );
    }
    let mut dev = Element::new("", "devices");
    let mut per_bus: Vec<(&str, usize)> = Vec::new();
    let mut next_dev = |bus: &'static str| -> String {
        // sd* names are shared by SCSI and SATA, as libvirt shares them.
        let key = if bus == "sata" { "scsi" } else { bus };
        let n = match per_bus.iter_mut().find(|(b, _)| *b == key) {
            Some((_, n)) => {
                *n += 1;
                *n - 1
            }
            None => {
                per_bus.push((key, 1));
                0
            }
        };
        dev_name(bus, n)
    };
    let mut scsi_models: Vec<&str> = Vec::new();
    for c in p
        .disks
        .iter()
        .map(|d| d.controller)
        .chain(p.cdroms.iter().map(|c| c.controller))
    {
        if let Some(m) = scsi_model(c) {
            if !scsi_models.contains(&m) {
                scsi_models.push(m);
            }
        }
    }
    for (i, d) in p.disks.iter().enumerate() {
        let bus = bus_of(d.controller);
        let fmt = d.format.clone().unwrap_or_else(|| "qcow2".into());
        let fmt = if fmt == "vpc" { "vpc".to_string() } else { fmt };
        let file = d
            .file
            .clone()
            .unwrap_or_else(|| format!("{}-disk{}.{fmt}", p.name, i + 1));
        let mut target = Element::new("", "target")
            .attr("", "dev", next_dev(bus))
            .attr("", "bus", bus);
        let mut addr = None;
        if let Some(m) = scsi_model(d.controller) {
            let ctl = scsi_models.iter().position(|x| *x == m).unwrap_or(0);
            addr = Some(Element::new("", "address").attr("", "type", "drive").attr(
                "",
                "controller",
                ctl.to_string(),
            ));
        }
        if bus == "nvme" {
            target = target.attr("", "bus", "nvme");
        }
        let mut disk = Element::new("", "disk")
            .attr("", "type", "file")
            .attr("", "device", "disk")
            .child(
                Element::new("", "driver")
                    .attr("", "name", "qemu")
                    .attr("", "type", fmt),
            )
            .child(Element::new("", "source").attr("", "file", file))
            .child(target);
        if let Some(a) = addr {
            disk = disk.child(a);
        }
        dev = dev.child(disk);
    }
    for c in &p.cdroms {
        let bus = bus_of(c.controller);
        let mut cd = Element::new("", "disk")
            .attr("", "type", "file")
            .attr("", "device", "cdrom")
            .child(
                Element::new("", "driver")
                    .attr("", "name", "qemu")
                    .attr("", "type", "raw"),
            );
        if let Some(f) = &c.file {
            cd = cd.child(Element::new("", "source").attr("", "file", f));
        }
        cd = cd.child(
            Element::new("", "target")
                .attr("", "dev", next_dev(bus))
                .attr("", "bus", bus),
        );
        cd = cd.child(Element::new("", "readonly"));
        if let Some(m) = scsi_model(c.controller) {
            let ctl = scsi_models.iter().position(|x| *x == m).unwrap_or(0);
            cd = cd.child(Element::new("", "address").attr("", "type", "drive").attr(
                "",
                "controller",
                ctl.to_string(),
            ));
        }
        dev = dev.child(cd);
    }
    for (i, m) in scsi_models.iter().enumerate() {
        dev = dev.child(
            Element::new("", "controller")
                .attr("", "type", "scsi")
                .attr("", "index", i.to_string())
                .attr("", "model", *m),
        );
    }
    for n in &p.nics {
        let mut iface = Element::new("", "interface").attr("", "type", "network");
        if let MacPolicy::Static(m) = &n.mac {
            iface = iface.child(Element::new("", "mac").attr("", "address", m));
        }
        iface = iface
            .child(Element::new("", "source").attr("", "network", &n.network))
            .child(Element::new("", "model").attr("", "type", nic_model(&n.model)));
        dev = dev.child(iface);
    }
    if p.firmware.tpm {
        dev = dev.child(
            Element::new("", "tpm").attr("", "model", "tpm-crb").child(
                Element::new("", "backend")
                    .attr("", "type", "emulator")
                    .attr("", "version", "2.0"),
            ),
        );
    }
    dom = dom.child(dev);
    Ok(xml::write_document(&dom, &[]))
}

/// Parse domain XML into a profile.
pub fn parse(text: &str) -> Result<HardwareProfile> {
    let root = xml::parse(text)?;
    if root.name.local != "domain" {
        return Err(OvfError::Invalid(format!(
            "root element is {}, not domain",
            root.name.local
        )));
    }
    let mut p = HardwareProfile::new(root.child_text("name").unwrap_or_default());
    p.annotation = root.child_text("description").filter(|d| !d.is_empty());
    if let Some(m) = root.find_local("memory") {
        let unit = m.get_attr("", "unit").unwrap_or("KiB");
        let mult: u64 = match unit {
            "b" | "bytes" => 1,
            "KB" => 1000,
            "k" | "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "M" | "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "G" | "GiB" => 1 << 30,
            other => return Err(OvfError::Invalid(format!("domain memory unit '{other}'"))),
        };
        let q: u64 = m
            .text_content()
            .parse()
            .map_err(|_| OvfError::Invalid(format!("domain memory '{}'", m.text_content())))?;
        p.memory_mib = q
            .checked_mul(mult)
            .ok_or_else(|| OvfError::Invalid("domain memory overflows".into()))?
            >> 20;
    }
    if let Some(v) = root.child_text("vcpu") {
        p.cpus = v
            .parse()
            .map_err(|_| OvfError::Invalid(format!("domain vcpu '{v}'")))?;
    }
    if let Some(t) = root
        .find_local("cpu")
        .and_then(|c| c.find_local("topology"))
    {
        p.cores_per_socket = t.get_attr("", "cores").and_then(|c| c.parse().ok());
    }
    if let Some(os) = root.find_local("os") {
        let efi = os.get_attr("", "firmware") == Some("efi")
            || os
                .find_local("loader")
                .is_some_and(|l| l.get_attr("", "type") == Some("pflash"));
        if efi {
            p.firmware.kind = FirmwareKind::Uefi;
        }
        let sb_feature = os.find_local("firmware").is_some_and(|f| {
            f.elements().any(|x| {
                x.get_attr("", "name") == Some("secure-boot")
                    && x.get_attr("", "enabled") == Some("yes")
            })
        });
        let sb_loader = os
            .find_local("loader")
            .is_some_and(|l| l.get_attr("", "secure") == Some("yes"));
        p.firmware.secure_boot = efi && (sb_feature || sb_loader);
    }
    let Some(devs) = root.find_local("devices") else {
        return Ok(p);
    };
    let scsi_ctls: Vec<(String, Controller)> = devs
        .elements()
        .filter(|c| c.name.local == "controller" && c.get_attr("", "type") == Some("scsi"))
        .map(|c| {
            let model = match c.get_attr("", "model").unwrap_or("") {
                "lsisas1068" | "lsisas1078" => Controller::Lsilogicsas,
                "buslogic" => Controller::Buslogic,
                "vmpvscsi" => Controller::Pvscsi,
                "lsilogic" => Controller::Lsilogic,
                _ => Controller::VirtioScsi,
            };
            (c.get_attr("", "index").unwrap_or("0").to_string(), model)
        })
        .collect();
    for d in devs.elements() {
        match d.name.local.as_str() {
            "disk" => {
                let bus = d
                    .find_local("target")
                    .and_then(|t| t.get_attr("", "bus"))
                    .unwrap_or("virtio");
                let controller = match bus {
                    "ide" => Controller::Ide,
                    "sata" => Controller::Sata,
                    "nvme" => Controller::Nvme,
                    "scsi" => {
                        let idx = d
                            .find_local("address")
                            .and_then(|a| a.get_attr("", "controller"))
                            .unwrap_or("0");
                        scsi_ctls
                            .iter()
                            .find(|(i, _)| i == idx)
                            .map(|(_, m)| *m)
                            .unwrap_or(Controller::VirtioScsi)
                    }
                    _ => Controller::VirtioBlk,
                };
                let file = d
                    .find_local("source")
                    .and_then(|s| s.get_attr("", "file"))
                    .map(str::to_string);
                if d.get_attr("", "device") == Some("cdrom") {
                    p.cdroms.push(CdromProfile { controller, file });
                } else if d.get_attr("", "device").is_none_or(|x| x == "disk") {
                    let format = d
                        .find_local("driver")
                        .and_then(|x| x.get_attr("", "type"))
                        .map(str::to_string);
                    p.disks.push(DiskProfile {
                        capacity: 0,
                        controller,
                        format,
                        file,
                    });
                }
            }
            "interface" => {
                let src = d.find_local("source");
                let network = src
                    .and_then(|s| {
                        s.get_attr("", "network")
                            .or_else(|| s.get_attr("", "bridge"))
                    })
                    .unwrap_or("")
                    .to_string();
                let model = match d
                    .find_local("model")
                    .and_then(|m| m.get_attr("", "type"))
                    .unwrap_or("virtio")
                {
                    "virtio" => NicModel::VirtioNet,
                    "e1000" => NicModel::E1000,
                    "e1000e" => NicModel::E1000e,
                    "vmxnet3" => NicModel::Vmxnet3,
                    "rtl8139" => NicModel::Rtl8139,
                    "pcnet" => NicModel::Pcnet32,
                    "netvsc" => NicModel::HypervSynthetic,
                    other => NicModel::Other(other.to_string()),
                };
                let mac = d
                    .find_local("mac")
                    .and_then(|m| m.get_attr("", "address"))
                    .map(|m| MacPolicy::Static(m.to_ascii_lowercase()))
                    .unwrap_or_default();
                p.nics.push(NicProfile {
                    model,
                    network,
                    mac,
                });
            }
            "tpm" => p.firmware.tpm = true,
            _ => {}
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm_profile() -> HardwareProfile {
        let mut p = crate::profile::sample();
        p.guest_os = GuestOs::default();
        p.hardware_version = None;
        p.product = None;
        p.eula = None;
        p.firmware.tpm = true;
        p.disks[0].controller = Controller::VirtioBlk;
        p.disks[1].controller = Controller::VirtioScsi;
        p.cdroms[0].controller = Controller::Sata;
        p.nics[0].model = NicModel::VirtioNet;
        for d in &mut p.disks {
            d.capacity = 0;
            d.format = Some("qcow2".into());
        }
        p
    }

    #[test]
    fn generate_then_parse_round_trips_what_domain_xml_carries() {
        let p = kvm_profile();
        let text = generate(&p).unwrap();
        assert!(text.contains("machine=\"q35\""), "{text}");
        assert_eq!(parse(&text).unwrap(), p, "{text}");
    }

    #[test]
    fn nvme_disks_are_refused() {
        let mut p = kvm_profile();
        p.disks[0].controller = Controller::Nvme;
        assert!(generate(&p).is_err());
    }

    #[test]
    fn ide_devices_select_the_pc_machine() {
        let mut p = kvm_profile();
        p.cdroms[0].controller = Controller::Ide;
        assert!(generate(&p).unwrap().contains("machine=\"pc\""));
    }

    #[test]
    fn device_names_follow_libvirt_lettering() {
        assert_eq!(dev_name("virtio", 0), "vda");
        assert_eq!(dev_name("scsi", 25), "sdz");
        assert_eq!(dev_name("scsi", 26), "sdaa");
    }

    #[test]
    fn parse_reads_memory_units_and_rejects_other_roots() {
        let p = parse(
            "<domain type='kvm'><name>a</name><memory unit='GiB'>2</memory><vcpu>3</vcpu></domain>",
        )
        .unwrap();
        assert_eq!((p.memory_mib, p.cpus), (2048, 3));
        let p = parse("<domain><name>a</name><memory>1048576</memory></domain>").unwrap();
        assert_eq!(p.memory_mib, 1024);
        assert!(parse("<network/>").is_err());
        assert!(parse("<domain><memory unit='parsec'>1</memory></domain>").is_err());
    }
}
