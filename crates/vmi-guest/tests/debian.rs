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

/// debugfs's answer for a path that does not exist.
fn gone(raw: &Path, path: &str) -> bool {
    debugfs(raw, &format!("stat {path}")).contains("File not found by ext2_lookup")
}

#[test]
fn sysprep_removes_what_clones_must_not_share_and_e2fsck_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    let Some(raw) = debian_disk(dir.path(), "gpt") else {
        return;
    };
    let q = dir.path().join("d.qcow2");
    convert(&raw, "qcow2", &q);
    {
        let img = open(&q, true);
        let (_, fs) = vmi_guest::guest::open_root(&img, true).unwrap();
        let ops = vmi_guest::sysprep::select(None).unwrap();
        let plan = vmi_guest::sysprep::plan(&fs, &ops).unwrap();
        let has = |op: &str, p: &str| plan.iter().any(|c| c.operation == op && c.path == p);
        assert!(has("machine-id", "/etc/machine-id"), "{plan:#?}");
        assert!(has("ssh-hostkeys", "/etc/ssh/ssh_host_rsa_key"));
        assert!(has("logfiles", "/var/log/dpkg.log"));
        assert!(has("bash-history", "/root/.bash_history"));
        assert!(has("cloud-init", "/var/lib/cloud/instance"));
        assert!(has(
            "dhcp-client-state",
            "/var/lib/dhcp/dhclient.eth0.leases"
        ));
        assert!(has(
            "udev-persistent-net",
            "/etc/udev/rules.d/70-persistent-net.rules"
        ));
        assert!(has("random-seed", "/var/lib/systemd/random-seed"));
        assert!(has(
            "package-manager-cache",
            "/var/cache/apt/archives/old.deb"
        ));
        assert!(has("tmp-files", "/tmp/build-leftover"));
        vmi_guest::sysprep::apply(&fs, &plan).unwrap();
        fs.close().unwrap();
        img.close().unwrap();
    }
    vmi_testkit::assert_qemu_check_clean(&q, "qcow2");
    let back = dir.path().join("back.raw");
    convert(&q, "raw", &back);
    assert_fsck_clean(&back);
    for p in [
        "/var/lib/dbus/machine-id",
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_ed25519_key.pub",
        "/etc/ssh/ssh_host_rsa_key",
        "/root/.bash_history",
        "/var/lib/cloud/instance",
        "/var/lib/cloud/instances",
        "/var/lib/dhcp/dhclient.eth0.leases",
        "/etc/udev/rules.d/70-persistent-net.rules",
        "/var/lib/systemd/random-seed",
        "/var/cache/apt/pkgcache.bin",
        "/var/cache/apt/archives/old.deb",
        "/tmp/build-leftover",
        "/var/tmp/leftover",
    ] {
        assert!(gone(&back, p), "{p} is still there");
    }
    let mid = debugfs(&back, "stat /etc/machine-id");
    assert!(mid.contains("Size: 0"), "{mid}");
    let log = debugfs(&back, "stat /var/log/dpkg.log");
    assert!(log.contains("Size: 0"), "{log}");
    assert!(!gone(&back, "/var/lib/cloud"), "the directory itself stays");
    assert!(!gone(&back, "/etc/ssh"), "the directory itself stays");
}

#[test]
fn sysprep_with_chosen_operations_touches_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let Some(raw) = debian_disk(dir.path(), "dos") else {
        return;
    };
    {
        let img = open(&raw, true);
        let (_, fs) = vmi_guest::guest::open_root(&img, true).unwrap();
        let ops = vmi_guest::sysprep::select(Some("ssh-hostkeys")).unwrap();
        let plan = vmi_guest::sysprep::plan(&fs, &ops).unwrap();
        assert!(plan.iter().all(|c| c.operation == "ssh-hostkeys") && plan.len() == 3);
        vmi_guest::sysprep::apply(&fs, &plan).unwrap();
        fs.close().unwrap();
    }
    assert_fsck_clean(&raw);
    assert!(gone(&raw, "/etc/ssh/ssh_host_rsa_key"));
    assert!(!gone(&raw, "/root/.bash_history"));
}

#[test]
fn customize_leaves_files_with_the_given_contents_modes_and_owners() {
    use vmi_guest::customize::{apply, parse_ssh_inject, Step};
    let dir = tempfile::tempdir().unwrap();
    let Some(raw) = debian_disk(dir.path(), "gpt") else {
        return;
    };
    let v = dir.path().join("d.vmdk");
    convert(&raw, "vmdk", &v);
    let upload = dir.path().join("app.conf");
    std::fs::write(&upload, "port = 8080\n").unwrap();
    let steps = vec![
        Step::Hostname("web01.example.org".into()),
        Step::Timezone("Europe/Paris".into()),
        Step::RootPassword("password:s3cret".into()),
        parse_ssh_inject("root:string:ssh-ed25519 AAAAC3Nz test@host").unwrap(),
        Step::Mkdir("/opt/app/conf".into()),
        Step::Upload {
            src: upload.clone(),
            dst: "/opt/app/conf".into(),
        },
        Step::Write {
            path: "/etc/motd".into(),
            content: "welcome\n".into(),
        },
        Step::Chmod {
            mode: "0600".into(),
            path: "/etc/motd".into(),
        },
        Step::Chown {
            owner: "1000:100".into(),
            path: "/opt/app/conf/app.conf".into(),
        },
        Step::Delete("/var/cache/apt/archives".into()),
        Step::FirstbootCommand("echo first > /root/booted".into()),
    ];
    {
        let img = open(&v, true);
        let (_, fs) = vmi_guest::guest::open_root(&img, true).unwrap();
        let log = apply(&fs, &steps).unwrap();
        assert_eq!(log.len(), steps.len());
        fs.close().unwrap();
        img.close().unwrap();
    }
    let back = dir.path().join("back.raw");
    convert(&v, "raw", &back);
    assert_fsck_clean(&back);
    assert_eq!(
        debugfs(&back, "cat /etc/hostname").lines().last(),
        Some("web01.example.org")
    );
    assert!(debugfs(&back, "cat /etc/hosts").contains("127.0.1.1\tweb01.example.org web01"));
    assert!(debugfs(&back, "stat /etc/localtime").contains("/usr/share/zoneinfo/Europe/Paris"));
    assert!(debugfs(&back, "cat /etc/timezone").contains("Europe/Paris"));
    let shadow = debugfs(&back, "cat /etc/shadow");
    let root = shadow.lines().find(|l| l.starts_with("root:")).unwrap();
    let hash = root.split(':').nth(1).unwrap();
    assert!(sha_crypt::sha512_check("s3cret", hash).is_ok(), "{root}");
    let st = debugfs(&back, "stat /etc/shadow");
    assert!(
        st.contains("Mode:  0640") && st.contains("Group:    42"),
        "shadow keeps its mode: {st}"
    );
    let ak = debugfs(&back, "stat /root/.ssh/authorized_keys");
    assert!(ak.contains("Mode:  0600"), "{ak}");
    assert!(debugfs(&back, "stat /root/.ssh").contains("Mode:  0700"));
    assert!(
        debugfs(&back, "cat /root/.ssh/authorized_keys").contains("ssh-ed25519 AAAAC3Nz test@host")
    );
    let conf = debugfs(&back, "stat /opt/app/conf/app.conf");
    assert!(
        conf.contains("User:  1000") && conf.contains("Group:   100") && conf.contains("Size: 12"),
        "{conf}"
    );
    let motd = debugfs(&back, "stat /etc/motd");
    assert!(motd.contains("Mode:  0600"), "{motd}");
    assert!(gone(&back, "/var/cache/apt/archives"));
    let unit = debugfs(&back, "cat /etc/systemd/system/vmi-firstboot.service");
    assert!(
        unit.contains("Type=oneshot") && unit.contains("ConditionDirectoryNotEmpty"),
        "{unit}"
    );
    assert!(debugfs(
        &back,
        "stat /etc/systemd/system/multi-user.target.wants/vmi-firstboot.service"
    )
    .contains("Type: symlink"));
    assert!(
        debugfs(&back, "cat /var/lib/vmi-firstboot/scripts/0001-command")
            .contains("echo first > /root/booted")
    );
    assert!(debugfs(&back, "stat /usr/local/sbin/vmi-firstboot").contains("Mode:  0755"));
}

/// Bytes the file occupies on the host.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn sparsify_gives_back_a_deleted_files_space_and_keeps_the_guest_data() {
    let dir = tempfile::tempdir().unwrap();
    let Some(raw) = debian_disk(dir.path(), "gpt") else {
        return;
    };
    // A 64 MiB file of random data, written and then deleted (by libext2fs: blocks freed, data
    // left on disk, as after an `rm` in a running guest).
    const BIG: u64 = 64 << 20;
    {
        let img = open(&raw, true);
        let (_, fs) = vmi_guest::guest::open_root(&img, true).unwrap();
        let data = vmi_testkit::pattern(7, BIG as usize);
        fs.write_file("/var/big.bin", &mut &data[..], None).unwrap();
        fs.close().unwrap();
    }
    let q = dir.path().join("d.qcow2");
    convert(&raw, "qcow2", &q);
    {
        let img = open(&q, true);
        let (_, fs) = vmi_guest::guest::open_root(&img, true).unwrap();
        fs.unlink("/var/big.bin").unwrap();
        fs.close().unwrap();
        img.close().unwrap();
    }
    let before_q = allocated(&q);
    let before_raw = dir.path().join("before.raw");
    convert(&q, "raw", &before_raw);
    let img = open(&q, true);
    let rep = vmi_guest::sparsify::sparsify(&img, false).unwrap();
    img.close().unwrap();
    assert!(rep.zeroed >= BIG, "{rep:?}");
    let after_q = allocated(&q);
    // A 64 KiB qcow2 cluster that the file shares with used blocks at either end of an extent
    // stays allocated (zeroed): allow two per extent, for up to two extents.
    assert!(
        before_q - after_q >= BIG - 4 * 65536,
        "allocated {before_q} -> {after_q}"
    );
    vmi_testkit::assert_qemu_check_clean(&q, "qcow2");
    let after_raw = dir.path().join("after.raw");
    convert(&q, "raw", &after_raw);
    assert_fsck_clean(&after_raw);
    // Every file's contents are unchanged: debugfs dumps the tree of both and they agree.
    let dump = |raw: &Path, to: &str| {
        let d = dir.path().join(to);
        std::fs::create_dir(&d).unwrap();
        debugfs(raw, &format!("rdump / {}", d.display()));
        d
    };
    let a = dump(&before_raw, "tree-before");
    let b = dump(&after_raw, "tree-after");
    let diff = std::process::Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    // Raw: holes punched.
    let raw2 = dir.path().join("again.raw");
    std::fs::copy(&before_raw, &raw2).unwrap();
    let before = allocated(&raw2);
    let img = open(&raw2, true);
    vmi_guest::sparsify::sparsify(&img, false).unwrap();
    img.close().unwrap();
    assert!(
        before - allocated(&raw2) >= BIG,
        "raw allocated {before} -> {}",
        allocated(&raw2)
    );
    assert!(vmi_testkit::qemu_compare(&raw2, "raw", &after_raw, "raw"));
}

#[test]
fn diff_between_two_versions_names_the_changed_files_and_the_upgraded_package() {
    let dir = tempfile::tempdir().unwrap();
    let Some(old) = debian_disk(dir.path(), "gpt") else {
        return;
    };
    let new = dir.path().join("new.qcow2");
    convert(&old, "qcow2", &new);
    {
        let img = open(&new, true);
        let (_, fs) = vmi_guest::guest::open_root(&img, true).unwrap();
        let status = fs.read_to_vec("/var/lib/dpkg/status", 64 << 20).unwrap();
        let status = String::from_utf8(status).unwrap();
        let bash = status
            .split("\n\n")
            .find(|p| p.starts_with("Package: bash\n"))
            .unwrap();
        let version = bash
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .unwrap();
        let bumped = status.replacen(
            &format!("Package: bash\n{}", &bash["Package: bash\n".len()..]),
            &bash.replace(
                &format!("Version: {version}"),
                &format!("Version: {version}+vmi1"),
            ),
            1,
        );
        fs.write_file("/var/lib/dpkg/status", &mut bumped.as_bytes(), None)
            .unwrap();
        fs.write_file("/etc/added.conf", &mut &b"x"[..], None)
            .unwrap();
        fs.unlink("/etc/hostname").unwrap();
        fs.close().unwrap();
        img.close().unwrap();
    }
    let (ia, ib) = (open(&old, false), open(&new, false));
    let (_, fa) = vmi_guest::guest::open_root(&ia, false).unwrap();
    let (_, fb) = vmi_guest::guest::open_root(&ib, false).unwrap();
    let files = vmi_guest::diff::diff_files(&fa, &fb).unwrap();
    let got: Vec<(&str, &str)> = files.iter().map(|f| (f.change, f.path.as_str())).collect();
    assert_eq!(
        got,
        [
            ("added", "/etc/added.conf"),
            ("removed", "/etc/hostname"),
            ("changed", "/var/lib/dpkg/status")
        ]
    );
    let pa = inspect(&ia).unwrap().operating_systems[0].packages.clone();
    let pb = inspect(&ib).unwrap().operating_systems[0].packages.clone();
    let pk = vmi_guest::diff::diff_packages(&pa, &pb, "deb");
    assert_eq!(pk.len(), 1, "{pk:?}");
    assert_eq!(pk[0].change, "upgraded");
    assert!(pk[0].name.starts_with("bash:"), "{pk:?}");
}
