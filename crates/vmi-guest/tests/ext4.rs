//! ext4 through libext2fs over vmi images: filesystems made by `mkfs.ext4 -d` inside MBR/GPT
//! disks, read and written through qcow2 and VMDK, checked with `e2fsck -fn` and `debugfs`.

mod common;

use common::*;
use std::path::Path;
use vmi_disk::{Image, OpenOptions};
use vmi_guest::ext4::{Attrs, Ext4, FileKind};
use vmi_guest::{read_table, Volume};

/// A small tree: a file, a nested directory, a symlink, a 300 KiB file.
fn small_tree(dir: &Path) -> std::path::PathBuf {
    let t = dir.join("tree");
    std::fs::create_dir_all(t.join("etc/ssh")).unwrap();
    std::fs::create_dir_all(t.join("var/log/apt")).unwrap();
    std::fs::write(t.join("etc/hostname"), "builder\n").unwrap();
    std::fs::write(t.join("etc/ssh/ssh_host_ed25519_key"), "secret").unwrap();
    std::fs::write(t.join("var/log/apt/history.log"), "x".repeat(300 * 1024)).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", t.join("etc/link")).unwrap();
    t
}

fn open(p: &Path, write: bool) -> Image {
    Image::open(p, &OpenOptions::new().write(write)).unwrap()
}

fn first_volume(img: &Image) -> Volume<'_> {
    let t = read_table(img).unwrap().unwrap();
    Volume::of(img, &t.partitions[0]).unwrap()
}

#[test]
fn ext4_inside_gpt_reads_through_raw_qcow2_and_vmdk() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let part = mkfs_ext4(dir.path(), &small_tree(dir.path()), 16 << 20);
    let raw = disk_with(dir.path(), &part, "gpt");
    let q = dir.path().join("d.qcow2");
    let v = dir.path().join("d.vmdk");
    convert(&raw, "qcow2", &q);
    convert(&raw, "vmdk", &v);
    for p in [&raw, &q, &v] {
        let img = open(p, false);
        let fs = Ext4::open(first_volume(&img), false).unwrap();
        assert_eq!(fs.label_uuid().0, "vmiroot");
        let mut names: Vec<String> = fs
            .read_dir("/etc")
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        assert_eq!(names, ["hostname", "link", "ssh"]);
        assert_eq!(
            fs.read_to_vec("/etc/hostname", 1 << 20).unwrap(),
            b"builder\n"
        );
        assert_eq!(fs.readlink("/etc/link").unwrap(), "/etc/hostname");
        assert_eq!(fs.stat("/etc/link").unwrap().kind, FileKind::Symlink);
        let mut big = Vec::new();
        let n = fs.read_file("/var/log/apt/history.log", &mut big).unwrap();
        assert_eq!(n, 300 * 1024);
        assert!(big.iter().all(|&b| b == b'x'));
        assert!(matches!(
            fs.stat("/nope"),
            Err(vmi_guest::Error::NotFound(_))
        ));
    }
}

#[test]
fn writes_through_qcow2_leave_a_filesystem_e2fsck_finds_clean() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let part = mkfs_ext4(dir.path(), &small_tree(dir.path()), 16 << 20);
    let raw = disk_with(dir.path(), &part, "dos");
    let q = dir.path().join("d.qcow2");
    convert(&raw, "qcow2", &q);
    {
        let img = open(&q, true);
        let fs = Ext4::open(first_volume(&img), true).unwrap();
        fs.write_file("/etc/hostname", &mut &b"web01\n"[..], None)
            .unwrap();
        let big = vec![7u8; 200 * 1024];
        fs.mkdir_p(
            "/root/.ssh",
            Attrs {
                perm: 0o700,
                uid: 0,
                gid: 0,
            },
        )
        .unwrap();
        fs.write_file(
            "/root/.ssh/authorized_keys",
            &mut &big[..],
            Some(Attrs {
                perm: 0o600,
                uid: 1000,
                gid: 1001,
            }),
        )
        .unwrap();
        fs.unlink("/etc/ssh/ssh_host_ed25519_key").unwrap();
        fs.truncate("/var/log/apt/history.log").unwrap();
        fs.symlink("/etc/localtime", "/usr/share/zoneinfo/UTC")
            .unwrap();
        fs.set_attrs("/etc/hostname", Some(0o640), Some((0, 4)))
            .unwrap();
        fs.remove_tree("/var/log").unwrap();
        fs.close().unwrap();
        img.close().unwrap();
    }
    vmi_testkit::assert_qemu_check_clean(&q, "qcow2");
    let back = dir.path().join("back.raw");
    convert(&q, "raw", &back);
    assert_fsck_clean(&back);
    assert!(debugfs(&back, "cat /etc/hostname").contains("web01"));
    let st = debugfs(&back, "stat /root/.ssh/authorized_keys");
    assert!(
        st.contains("Mode:  0600")
            && st.contains("User:  1000")
            && st.contains("Group:  1001")
            && st.contains("Size: 204800"),
        "{st}"
    );
    let st = debugfs(&back, "stat /etc/hostname");
    assert!(
        st.contains("Mode:  0640") && st.contains("Group:     4"),
        "{st}"
    );
    assert!(debugfs(&back, "stat /etc/ssh/ssh_host_ed25519_key").contains("File not found"));
    assert!(debugfs(&back, "stat /var/log").contains("File not found"));
    assert!(debugfs(&back, "stat /etc/localtime")
        .contains("Fast link dest: \"/usr/share/zoneinfo/UTC\""));
}

#[test]
fn a_filesystem_whose_journal_needs_recovery_is_refused() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let part = mkfs_ext4(dir.path(), &small_tree(dir.path()), 16 << 20);
    // debugfs sets the needs_recovery flag and keeps the superblock checksum right.
    run(
        "debugfs",
        &["-w", "-R", "feature needs_recovery", part.to_str().unwrap()],
    );
    let img = open(&part, false);
    let e = Ext4::open(Volume::whole(&img), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("journal needs recovery"), "{e}");
}

#[test]
fn a_volume_without_ext4_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("zero.raw");
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    let img = open(&p, false);
    let e = Ext4::open(Volume::whole(&img), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no ext2/3/4 filesystem"), "{e}");
}

#[test]
fn writes_to_a_read_only_filesystem_are_refused() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let part = mkfs_ext4(dir.path(), &small_tree(dir.path()), 16 << 20);
    let img = open(&part, false);
    let fs = Ext4::open(Volume::whole(&img), false).unwrap();
    let e = fs.unlink("/etc/hostname").unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
}

#[test]
fn inspect_reads_an_rpm_based_root_from_its_sqlite_rpmdb() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    for (p, c) in [
        (
            "usr/lib/os-release",
            "NAME=\"Fedora Linux\"\nID=fedora\nVERSION_ID=40\nPRETTY_NAME=\"Fedora Linux 40 (Server Edition)\"\n",
        ),
        ("etc/hostname", "fedora-builder\n"),
        ("usr/bin/dnf", "#!/bin/sh\n"),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
    ] {
        std::fs::create_dir_all(t.join(p).parent().unwrap()).unwrap();
        std::fs::write(t.join(p), c).unwrap();
    }
    std::os::unix::fs::symlink("../usr/lib/os-release", t.join("etc/os-release")).unwrap();
    let db = t.join("usr/lib/sysimage/rpm/rpmdb.sqlite");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    {
        use vmi_guest::rpmdb::build_header;
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, blob BLOB NOT NULL);",
        )
        .unwrap();
        for b in [
            build_header("bash", "5.2.26", "3.fc40", "x86_64", None),
            build_header("shadow-utils", "4.15.1", "3.fc40", "x86_64", Some(2)),
            b"\x00\x00\xff\xffgarbage".to_vec(),
        ] {
            c.execute("INSERT INTO Packages (blob) VALUES (?1)", [b])
                .unwrap();
        }
    }
    let part = mkfs_ext4(dir.path(), &t, 16 << 20);
    let raw = disk_with(dir.path(), &part, "gpt");
    let img = open(&raw, false);
    let r = vmi_guest::inspect::inspect(&img).unwrap();
    let os = &r.operating_systems[0];
    assert_eq!(
        (
            os.distro.as_str(),
            os.version.as_str(),
            os.hostname.as_str()
        ),
        ("fedora", "40", "fedora-builder")
    );
    assert_eq!(
        (os.package_format.as_str(), os.package_manager.as_str()),
        ("rpm", "dnf")
    );
    let pkgs: Vec<(&str, &str, &str)> = os
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str(), p.arch.as_str()))
        .collect();
    assert_eq!(
        pkgs,
        [
            ("bash", "5.2.26-3.fc40", "x86_64"),
            ("shadow-utils", "2:4.15.1-3.fc40", "x86_64")
        ],
        "the malformed blob is skipped"
    );
}

#[test]
fn a_corrupt_superblock_is_an_error_not_a_crash() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let part = mkfs_ext4(dir.path(), &small_tree(dir.path()), 16 << 20);
    // s_log_block_size (superblock offset 24) = 40: a 2^50-byte block.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
        f.write_all_at(&40u32.to_le_bytes(), 1024 + 24).unwrap();
    }
    let img = open(&part, false);
    let e = Ext4::open(Volume::whole(&img), false)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("opening the ext2/3/4 filesystem:"), "{e}");
}

#[test]
fn a_directory_entry_pointing_at_itself_does_not_loop_a_recursive_remove() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let part = mkfs_ext4(dir.path(), &small_tree(dir.path()), 16 << 20);
    // A hard link to /etc inside /etc/ssh (debugfs allows what mkdir never would): a cycle.
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            "link /etc /etc/ssh/loop",
            part.to_str().unwrap(),
        ],
    );
    let img = open(&part, true);
    let fs = Ext4::open(Volume::whole(&img), true).unwrap();
    let e = fs.remove_tree("/etc").unwrap_err().to_string();
    assert!(e.contains("deeper than 64 directories"), "{e}");
}
