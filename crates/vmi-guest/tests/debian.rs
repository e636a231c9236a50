//! The guest layer on a real Debian 12 image: debootstrap's minbase tree in an ext4 partition of
//! MBR and GPT disks, as raw, qcow2 and VMDK; `dpkg-query`, `e2fsck` and `debugfs` are the oracles.

mod common;

use common::*;
use std::path::Path;
use vmi_disk::{Image, OpenOptions};
use vmi_guest::inspect::inspect;

fn open(p: &Path, write: bool) -> Image {
    Image::open(p, &OpenOptions::new().write(write)).unwrap()
}

#[test]
fn inspect_finds_debian_12_and_exactly_the_packages_dpkg_query_lists() {
    let dir = tempfile::tempdir().unwrap();
    let Some(raw) = debian_disk(dir.path(), "gpt") else {
        return;
    };
    let (_, oracle) = debian_root().unwrap();
    let q = dir.path().join("d.qcow2");
    let v = dir.path().join("d.vmdk");
    convert(&raw, "qcow2", &q);
    convert(&raw, "vmdk", &v);
    for p in [&raw, &q, &v] {
        let img = open(p, false);
        let r = inspect(&img).unwrap();
        assert_eq!(r.operating_systems.len(), 1, "{r:#?}");
        let os = &r.operating_systems[0];
        assert_eq!(os.root, "partition 1");
        assert_eq!(os.distro, "debian");
        assert!(os.version.starts_with("12."), "{}", os.version);
        assert_eq!(os.codename, "bookworm");
        assert_eq!(os.architecture, std::env::consts::ARCH);
        assert_eq!(os.package_format, "deb");
        assert_eq!(os.package_manager, "apt");
        let mut got: Vec<String> = os
            .packages
            .iter()
            .map(|p| format!("{}\t{}\t{}", p.name, p.version, p.arch))
            .collect();
        let mut want: Vec<String> = oracle.lines().map(str::to_string).collect();
        got.sort();
        want.sort();
        assert!(want.len() > 50, "{want:?}");
        assert_eq!(got, want);
        assert!(os.users.iter().any(|u| u.name == "root" && u.uid == 0));
        assert_eq!(
            os.ssh_host_keys,
            [
                "/etc/ssh/ssh_host_ed25519_key",
                "/etc/ssh/ssh_host_ed25519_key.pub",
                "/etc/ssh/ssh_host_rsa_key"
            ]
        );
        assert!(os.machine_id && os.cloud_init_state);
        assert_eq!(os.shell_history, ["/root/.bash_history"]);
        assert_eq!(os.last_update_source.as_deref(), Some("/var/log/dpkg.log"));
        assert!(os.last_update.unwrap() > 1_700_000_000);
        assert!(os.kernels.is_empty(), "minbase installs no kernel");
    }
}

#[test]
fn inspect_reads_the_mbr_variant_too() {
    let dir = tempfile::tempdir().unwrap();
    let Some(raw) = debian_disk(dir.path(), "dos") else {
        return;
    };
    let img = open(&raw, false);
    let r = inspect(&img).unwrap();
    assert_eq!(
        r.partition_table.as_ref().unwrap().kind,
        vmi_guest::TableKind::Mbr
    );
    assert_eq!(r.operating_systems[0].codename, "bookworm");
    assert_eq!(r.filesystems[0].label.as_deref(), Some("vmiroot"));
}
