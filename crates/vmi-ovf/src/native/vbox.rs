//! VirtualBox import settings: the `VBoxManage` command sequence (createvm, modifyvm, storagectl,
//! storageattach) that builds the machine a profile describes. VirtualBox has no PVSCSI,
//! virtio-blk, vmxnet3 or Hyper-V adapters: those are errors.

use crate::error::{OvfError, Result};
use crate::profile::*;
use std::fmt::Write as _;

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn nic_type(m: &NicModel) -> Result<&'static str> {
    Ok(match m {
        NicModel::E1000 => "82545EM",
        NicModel::E1000e => "82540EM",
        NicModel::Pcnet32 => "Am79C973",
        NicModel::VirtioNet => "virtio",
        other => {
            return Err(OvfError::Unsupported(format!(
                "VirtualBox has no {} network adapter",
                other.name()
            )))
        }
    })
}

fn controller(c: Controller) -> Result<(&'static str, &'static str, &'static str)> {
    // (controller name, --add bus, --controller chipset)
    Ok(match c {
        Controller::Ide => ("IDE", "ide", "PIIX4"),
        Controller::Sata => ("SATA", "sata", "IntelAhci"),
        Controller::Lsilogic => ("SCSI", "scsi", "LsiLogic"),
        Controller::Buslogic => ("SCSI-BusLogic", "scsi", "BusLogic"),
        Controller::Lsilogicsas => ("SAS", "sas", "LSILogicSAS"),
        Controller::Nvme => ("NVMe", "pcie", "NVMe"),
        Controller::VirtioScsi => ("VirtIO", "virtio", "VirtIO"),
        other => {
            return Err(OvfError::Unsupported(format!(
                "VirtualBox has no {} storage controller",
                other.name()
            )))
        }
    })
}

/// A POSIX shell script of `VBoxManage` commands creating and configuring the VM.
pub fn generate(p: &HardwareProfile) -> Result<String> {
    p.validate()?;
    let vm = quote(&p.name);
    let mut s = String::from("#!/bin/sh\nset -e\n");
    let _ = writeln!(
        s,
        "VBoxManage createvm --name {vm} --ostype Other_64 --register"
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
        let _ = write!(
            modify,
            " --nic{0} intnet --intnet{0} {1} --nictype{0} {2}",
            i + 1,
            quote(&n.network),
            nic_type(&n.model)?
        );
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
    let mut ctls: Vec<(Controller, u32)> = Vec::new();
    let devices = p
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                d.controller,
                "hdd",
                Some(
                    d.file
                        .clone()
                        .unwrap_or_else(|| format!("{}-disk{}.vdi", p.name, i + 1)),
                ),
            )
        })
        .chain(p.cdroms.iter().map(|c| {
            (
                c.controller,
                "dvddrive",
                Some(c.file.clone().unwrap_or_else(|| "emptydrive".into())),
            )
        }));
    for (c, kind, medium) in devices {
        let (name, bus, chipset) = controller(c)?;
        let port = match ctls.iter_mut().find(|(m, _)| *m == c) {
            Some((_, n)) => {
                *n += 1;
                *n - 1
            }
            None => {
                let _ = writeln!(
                    s,
                    "VBoxManage storagectl {vm} --name {name} --add {bus} --controller {chipset}"
                );
                ctls.push((c, 1));
                0
            }
        };
        // IDE has two ports of two devices each.
        let (port, device) = if c == Controller::Ide {
            (port / 2, port % 2)
        } else {
            (port, 0)
        };
        let _ = writeln!(
            s,
            "VBoxManage storageattach {vm} --storagectl {name} --port {port} --device {device} --type {kind} --medium {}",
            quote(medium.as_deref().unwrap_or("emptydrive"))
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_creates_controllers_once_and_attaches_every_device() {
        let mut p = crate::profile::sample();
        p.disks[0].controller = Controller::Sata;
        p.nics[0].model = NicModel::VirtioNet;
        let s = generate(&p).unwrap();
        assert_eq!(s.matches("VBoxManage storagectl").count(), 2, "{s}");
        assert_eq!(s.matches("VBoxManage storageattach").count(), 3, "{s}");
        assert!(s.contains("--firmware efi"));
        assert!(s.contains("--macaddress2 005056010203"));
    }

    #[test]
    fn models_virtualbox_lacks_are_errors() {
        let p = crate::profile::sample(); // pvscsi + vmxnet3
        assert!(generate(&p).is_err());
    }

    #[test]
    fn names_with_quotes_are_shell_quoted() {
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
