//! VMware `.vmx` configuration files: `key = "value"` lines (VMware's VMX format, as written by
//! Workstation and ESXi; special characters in values are `|XX` hex escapes).
//!
//! Disk capacities live in the VMDK files, not the `.vmx`: parsed disks have capacity 0 until the
//! caller fills them from the images.

use crate::error::{OvfError, Result};
use crate::profile::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Largest `.vmx` read.
pub const MAX_VMX_BYTES: usize = 4 * 1024 * 1024;

/// The `scsiN.virtualDev` value for a SCSI model VMware has.
fn scsi_dev(c: Controller) -> Option<&'static str> {
    match c {
        Controller::Lsilogic => Some("lsilogic"),
        Controller::Lsilogicsas => Some("lsisas1068"),
        Controller::Buslogic => Some("buslogic"),
        Controller::Pvscsi => Some("pvscsi"),
        _ => None,
    }
}

fn nic_dev(m: &NicModel) -> Option<&'static str> {
    match m {
        NicModel::E1000 => Some("e1000"),
        NicModel::E1000e => Some("e1000e"),
        NicModel::Vmxnet3 => Some("vmxnet3"),
        NicModel::Pcnet32 => Some("vlance"),
        _ => None,
    }
}

/// Escape a value: `"`, `|`, `#` and control characters become `|XX`.
fn esc(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        if c == '"' || c == '|' || c == '#' || (c as u32) < 0x20 {
            let _ = write!(o, "|{:02X}", c as u32);
        } else {
            o.push(c);
        }
    }
    o
}

fn unesc(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'|' && i + 2 < b.len() {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Generate a `.vmx` for `p`. Device models VMware does not have are an error.
pub fn generate(p: &HardwareProfile) -> Result<String> {
    p.validate()?;
    let mut kv: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| kv.push((k.to_string(), v));
    put(".encoding", "UTF-8".into());
    put("config.version", "8".into());
    let hw = p
        .hardware_version
        .as_deref()
        .and_then(|h| h.strip_prefix("vmx-"))
        .and_then(|h| h.parse::<u32>().ok())
        .unwrap_or(14);
    put("virtualHW.version", hw.to_string());
    put("displayName", p.name.clone());
    put(
        "guestOS",
        p.guest_os
            .vmware_id
            .clone()
            .unwrap_or_else(|| "other-64".into()),
    );
    put("numvcpus", p.cpus.to_string());
    if let Some(c) = p.cores_per_socket {
        put("cpuid.coresPerSocket", c.to_string());
    }
    put("memsize", p.memory_mib.to_string());
    if p.firmware.kind == FirmwareKind::Uefi {
        put("firmware", "efi".into());
    }
    if p.firmware.secure_boot {
        put("uefi.secureBoot.enabled", "TRUE".into());
    }
    if p.firmware.tpm {
        put("vtpm.present", "TRUE".into());
    }
    // Buses: one adapter per model; SCSI models each get their own scsiN.
    let mut buses: Vec<(Controller, String, u32)> = Vec::new();
    let mut slot = |c: Controller, kv: &mut Vec<(String, String)>| -> Result<String> {
        if let Some(b) = buses.iter_mut().find(|b| b.0 == c) {
            let unit = b.2;
            b.2 += 1;
            if c.is_scsi() && b.2 == 7 {
                b.2 += 1;
            }
            return Ok(format!("{}:{unit}", b.1));
        }
        let (kind, n) = match c {
            Controller::Ide => ("ide", 0),
            Controller::Sata => ("sata", 0),
            Controller::Nvme => ("nvme", 0),
            _ if scsi_dev(c).is_some() => ("scsi", buses.iter().filter(|b| b.0.is_scsi()).count()),
            _ => {
                return Err(OvfError::Unsupported(format!(
                    "VMware has no {} storage controller",
                    c.name()
                )))
            }
        };
        let bus = format!("{kind}{n}");
        if kind != "ide" {
            kv.push((format!("{bus}.present"), "TRUE".into()));
        }
        if let Some(dev) = scsi_dev(c) {
            kv.push((format!("{bus}.virtualDev"), dev.into()));
        }
        buses.push((c, bus.clone(), 1));
        Ok(format!("{bus}:0"))
    };
    for (i, d) in p.disks.iter().enumerate() {
        let s = slot(d.controller, &mut kv)?;
        kv.push((format!("{s}.present"), "TRUE".into()));
        let file = d
            .file
            .clone()
            .unwrap_or_else(|| format!("{}-disk{}.vmdk", p.name, i + 1));
        kv.push((format!("{s}.fileName"), file));
    }
    for c in &p.cdroms {
        let s = slot(c.controller, &mut kv)?;
        kv.push((format!("{s}.present"), "TRUE".into()));
        match &c.file {
            Some(f) => {
                kv.push((format!("{s}.deviceType"), "cdrom-image".into()));
                kv.push((format!("{s}.fileName"), f.clone()));
            }
            None => {
                kv.push((format!("{s}.deviceType"), "cdrom-raw".into()));
                kv.push((format!("{s}.startConnected"), "FALSE".into()));
            }
        }
    }
    for (i, n) in p.nics.iter().enumerate() {
        let dev = nic_dev(&n.model).ok_or_else(|| {
            OvfError::Unsupported(format!("VMware has no {} network adapter", n.model.name()))
        })?;
        let e = format!("ethernet{i}");
        kv.push((format!("{e}.present"), "TRUE".into()));
        kv.push((format!("{e}.virtualDev"), dev.into()));
        kv.push((format!("{e}.networkName"), n.network.clone()));
        match &n.mac {
            MacPolicy::Generated => kv.push((format!("{e}.addressType"), "generated".into())),
            MacPolicy::Static(m) => {
                kv.push((format!("{e}.addressType"), "static".into()));
                kv.push((format!("{e}.address"), m.clone()));
            }
        }
    }
    if let Some(a) = &p.annotation {
        kv.push(("annotation".into(), a.clone()));
    }
    let mut out = String::new();
    for (k, v) in kv {
        let _ = writeln!(out, "{k} = \"{}\"", esc(&v));
    }
    Ok(out)
}

/// Parse a `.vmx` into a profile.
pub fn parse(text: &str) -> Result<HardwareProfile> {
    if text.len() > MAX_VMX_BYTES {
        return Err(OvfError::Invalid(format!(
            "vmx is {} bytes, more than {MAX_VMX_BYTES}",
            text.len()
        )));
    }
    let mut kv: BTreeMap<String, String> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| OvfError::Invalid(format!("vmx line {}: no '='", n + 1)))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        kv.insert(k.trim().to_ascii_lowercase(), unesc(v));
    }
    let get = |k: &str| kv.get(&k.to_ascii_lowercase()).cloned();
    let yes = |k: &str| get(k).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let num = |k: &str| -> Result<Option<u64>> {
        get(k)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| OvfError::Invalid(format!("vmx {k} = '{v}'")))
            })
            .transpose()
    };
    let mut p = HardwareProfile::new(get("displayName").unwrap_or_default());
    p.guest_os.vmware_id = get("guestOS");
    p.cpus = num("numvcpus")?
        .unwrap_or(1)
        .try_into()
        .map_err(|_| OvfError::Invalid("vmx numvcpus".into()))?;
    p.cores_per_socket = num("cpuid.coresPerSocket")?.and_then(|c| u32::try_from(c).ok());
    p.memory_mib = num("memsize")?.unwrap_or(p.memory_mib);
    p.hardware_version = num("virtualHW.version")?.map(|v| format!("vmx-{v}"));
    if get("firmware").is_some_and(|f| f.eq_ignore_ascii_case("efi")) {
        p.firmware.kind = FirmwareKind::Uefi;
    }
    p.firmware.secure_boot = yes("uefi.secureBoot.enabled");
    p.firmware.tpm = yes("vtpm.present");
    p.annotation = get("annotation").filter(|a| !a.is_empty());
    // Devices: walk bus:unit keys in a stable order.
    let mut slots: Vec<(String, u32, u32)> = Vec::new();
    for k in kv.keys() {
        let Some((dev, rest)) = k.split_once('.') else {
            continue;
        };
        if rest != "present" {
            continue;
        }
        let Some((bus, unit)) = dev.split_once(':') else {
            continue;
        };
        let kind_len = bus.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (Ok(bn), Ok(un)) = (bus[kind_len..].parse::<u32>(), unit.parse::<u32>()) else {
            continue;
        };
        slots.push((bus[..kind_len].to_string(), bn, un));
    }
    slots.sort_by(|a, b| {
        let order = |k: &str| {
            ["scsi", "sata", "nvme", "ide"]
                .iter()
                .position(|x| *x == k)
                .unwrap_or(9)
        };
        (order(&a.0), a.1, a.2).cmp(&(order(&b.0), b.1, b.2))
    });
    for (kind, bn, un) in slots {
        let s = format!("{kind}{bn}:{un}");
        if !yes(&format!("{s}.present")) {
            continue;
        }
        let controller = match kind.as_str() {
            "ide" => Controller::Ide,
            "sata" => Controller::Sata,
            "nvme" => Controller::Nvme,
            "scsi" => match get(&format!("{kind}{bn}.virtualDev"))
                .unwrap_or_default()
                .to_ascii_lowercase()
                .as_str()
            {
                "lsisas1068" => Controller::Lsilogicsas,
                "buslogic" => Controller::Buslogic,
                "pvscsi" => Controller::Pvscsi,
                _ => Controller::Lsilogic,
            },
            _ => continue,
        };
        let dtype = get(&format!("{s}.deviceType"))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let file = get(&format!("{s}.fileName"));
        if dtype.starts_with("cdrom") || dtype == "atapi-cdrom" {
            let file = if dtype == "cdrom-image" { file } else { None };
            p.cdroms.push(CdromProfile { controller, file });
        } else {
            let format = file.as_ref().map(|f| {
                f.rsplit_once('.')
                    .map(|(_, e)| e.to_ascii_lowercase())
                    .unwrap_or_else(|| "vmdk".into())
            });
            p.disks.push(DiskProfile {
                capacity: 0,
                controller,
                format,
                file,
            });
        }
    }
    for i in 0..64 {
        let e = format!("ethernet{i}");
        if !yes(&format!("{e}.present")) {
            continue;
        }
        let model = match get(&format!("{e}.virtualDev"))
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str()
        {
            "e1000e" => NicModel::E1000e,
            "vmxnet3" => NicModel::Vmxnet3,
            "vlance" => NicModel::Pcnet32,
            "e1000" | "" => NicModel::E1000,
            other => NicModel::Other(other.to_string()),
        };
        let mac = match get(&format!("{e}.addressType"))
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str()
        {
            "static" => get(&format!("{e}.address"))
                .map(|m| MacPolicy::Static(m.to_ascii_lowercase()))
                .unwrap_or_default(),
            _ => MacPolicy::Generated,
        };
        p.nics.push(NicProfile {
            model,
            network: get(&format!("{e}.networkName")).unwrap_or_default(),
            mac,
        });
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmware_profile() -> HardwareProfile {
        let mut p = crate::profile::sample();
        p.guest_os.cim_id = None;
        p.guest_os.description = None;
        p.product = None;
        p.eula = None;
        p.annotation = Some("line one\nsays \"hi\" | #1".into());
        p.cdroms[0].file = Some("tools.iso".into());
        for d in &mut p.disks {
            d.capacity = 0;
        }
        p
    }

    #[test]
    fn generate_then_parse_round_trips_what_vmx_carries() {
        let p = vmware_profile();
        let text = generate(&p).unwrap();
        assert!(text.contains("scsi0.virtualDev = \"pvscsi\""), "{text}");
        assert!(text.contains("ethernet0.virtualDev = \"vmxnet3\""));
        assert_eq!(parse(&text).unwrap(), p, "{text}");
    }

    #[test]
    fn generate_refuses_models_vmware_lacks() {
        let mut p = vmware_profile();
        p.nics[0].model = NicModel::VirtioNet;
        assert!(generate(&p).is_err());
        let mut p = vmware_profile();
        p.disks[0].controller = Controller::VirtioBlk;
        assert!(generate(&p).is_err());
    }

    #[test]
    fn parse_reads_a_workstation_style_file() {
        let text = "displayName = \"ws\"\nmemsize = \"4096\"\nnumvcpus = \"4\"\nsata0.present = \"TRUE\"\nsata0:1.present = \"TRUE\"\nsata0:1.deviceType = \"cdrom-image\"\nsata0:1.fileName = \"x.iso\"\nnvme0.present = \"TRUE\"\nnvme0:0.present = \"TRUE\"\nnvme0:0.fileName = \"ws.vmdk\"\nethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"e1000e\"\n# comment\n";
        let p = parse(text).unwrap();
        assert_eq!((p.memory_mib, p.cpus), (4096, 4));
        assert_eq!(p.disks[0].controller, Controller::Nvme);
        assert_eq!(p.cdroms[0].file.as_deref(), Some("x.iso"));
        assert_eq!(p.nics[0].model, NicModel::E1000e);
        assert!(parse("garbage line\n").is_err());
        assert!(parse("memsize = \"lots\"\n").is_err());
    }
}
