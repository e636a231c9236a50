//! End-to-end tests of `vmi guest`: a small Debian-shaped tree put in an ext4 partition of a GPT
//! disk by `mkfs.ext4 -d` and `sfdisk`, converted to qcow2 by qemu-img, then inspected, cleaned,
//! customised, sparsified and browsed through the real binary; `debugfs` and `e2fsck` check the
//! results. (The full Debian 12 fixture runs in vmi-guest's own tests.)

use serde_json::Value;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }
}

fn vmi(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_vmi"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn tools() -> bool {
    for t in ["mkfs.ext4", "debugfs", "e2fsck", "sfdisk"] {
        if Command::new(t).arg("-V").output().is_err() {
            eprintln!("skipped: {t} is not installed (apt-get install e2fsprogs fdisk)");
            return false;
        }
    }
    true
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PART: u64 = 32 << 20;

/// `disk.qcow2` in `dir`: GPT, partition 1 at 1 MiB holding an ext4 with a Debian-shaped tree.
fn guest_disk(dir: &Path) -> PathBuf {
    let t = dir.join("tree");
    let files: &[(&str, &str)] = &[
        ("etc/os-release", "ID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
        ("etc/debian_version", "12.7\n"),
        ("etc/hostname", "builder\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost\n"),
        ("etc/fstab", "UUID=abc / ext4 errors=remount-ro 0 1\n"),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n"),
        ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
        ("etc/ssh/ssh_host_ed25519_key", "PRIVATE\n"),
        ("var/lib/dpkg/status", "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b7\nArchitecture: amd64\n\nPackage: tzdata\nStatus: install ok installed\nVersion: 2024a-0+deb12u1\nArchitecture: all\n"),
        ("var/log/dpkg.log", "2024-06-01 10:00:00 status installed bash:amd64 5.2.15-2+b7\n"),
        ("root/.bash_history", "ls\n"),
        ("home/alice/.bash_history", "sudo -i\n"),
        ("var/lib/cloud/instance/boot-finished", "x"),
        ("usr/share/zoneinfo/Europe/Paris", "TZif2"),
    ];
    for (p, c) in files {
        let f = t.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, c).unwrap();
    }
    // An ELF header for the architecture probe: x86-64.
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[18] = 0x3e;
    std::fs::create_dir_all(t.join("usr/bin")).unwrap();
    std::fs::write(t.join("usr/bin/ls"), &elf).unwrap();
    std::fs::write(t.join("var/big.bin"), vec![0x5a; 8 << 20]).unwrap();
    let part = dir.join("part.ext4");
    std::fs::File::create(&part).unwrap().set_len(PART).unwrap();
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "root_owner=0:0",
            "-d",
            t.to_str().unwrap(),
            part.to_str().unwrap(),
        ],
    );
    let raw = dir.join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(PART + (2 << 20))
        .unwrap();
    let mut c = Command::new("sfdisk")
        .arg("-q")
        .arg(&raw)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(
        c.stdin.take().unwrap(),
        "label: gpt\nstart=2048, size={}, type=L",
        PART / 512
    )
    .unwrap();
    assert!(c.wait().unwrap().success());
    sh(
        "dd",
        &[
            &format!("if={}", part.display()),
            &format!("of={}", raw.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc",
            "status=none",
        ],
    );
    let q = dir.join("disk.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    q
}

/// The partition of a qcow2 disk as e2fsprogs names it, after converting it back to raw.
fn as_raw(dir: &Path, q: &Path) -> String {
    let raw = dir.join("check.raw");
    let _ = std::fs::remove_file(&raw);
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            q.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    format!("{}?offset=1048576", raw.display())
}

fn debugfs(dev: &str, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd, dev])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

fn fsck_clean(dev: &str) {
    let out = Command::new("e2fsck").args(["-fn", dev]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn guest_inspect_json_reports_the_os_packages_and_clone_sensitive_state() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    guest_disk(d.path());
    let j = vmi(
        d.path(),
        &["guest", "inspect", "--output", "json", "disk.qcow2"],
    )
    .ok()
    .json();
    assert_eq!(j["partition_table"]["kind"], "gpt");
    let os = &j["operating_systems"][0];
    assert_eq!(os["distro"], "debian");
    assert_eq!(os["version"], "12.7");
    assert_eq!(os["codename"], "bookworm");
    assert_eq!(os["architecture"], "x86_64");
    assert_eq!(os["hostname"], "builder");
    assert_eq!(os["mounts"][0]["mountpoint"], "/");
    assert_eq!(os["package_format"], "deb");
    assert_eq!(os["packages"][1]["name"], "tzdata");
    assert_eq!(os["packages"][1]["version"], "2024a-0+deb12u1");
    assert_eq!(os["ssh_host_keys"][0], "/etc/ssh/ssh_host_ed25519_key");
    assert_eq!(os["machine_id"], true);
    assert_eq!(
        os["shell_history"],
        serde_json::json!(["/root/.bash_history", "/home/alice/.bash_history"])
    );
    assert_eq!(os["last_update"], 1717236000);
    let human = vmi(d.path(), &["guest", "inspect", "disk.qcow2"])
        .ok()
        .stdout
        .clone();
    assert!(
        human.contains("Debian GNU/Linux 12 (bookworm)")
            && human.contains("2 installed (dpkg, deb)"),
        "{human}"
    );
}

#[test]
fn guest_sysprep_dry_run_changes_nothing_and_the_real_run_cleans() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let q = guest_disk(d.path());
    let before = std::fs::read(&q).unwrap();
    let dry = vmi(d.path(), &["guest", "sysprep", "--dry-run", "disk.qcow2"])
        .ok()
        .stdout
        .clone();
    assert!(
        dry.contains("[ssh-hostkeys] would remove /etc/ssh/ssh_host_ed25519_key"),
        "{dry}"
    );
    assert!(
        dry.contains("[bash-history] would remove /home/alice/.bash_history"),
        "{dry}"
    );
    assert_eq!(
        std::fs::read(&q).unwrap(),
        before,
        "a dry run leaves the image byte for byte"
    );
    let j = vmi(
        d.path(),
        &[
            "guest",
            "sysprep",
            "--operations",
            "machine-id,bash-history",
            "--output",
            "json",
            "disk.qcow2",
        ],
    )
    .ok()
    .json();
    assert_eq!(j["changes"].as_array().unwrap().len(), 3, "{j}");
    let dev = as_raw(d.path(), &q);
    fsck_clean(&dev);
    assert!(debugfs(&dev, "stat /etc/machine-id").contains("Size: 0"));
    assert!(debugfs(&dev, "stat /root/.bash_history").contains("File not found"));
    assert!(
        !debugfs(&dev, "stat /etc/ssh/ssh_host_ed25519_key").contains("File not found"),
        "not selected"
    );
    let bad = vmi(
        d.path(),
        &[
            "guest",
            "sysprep",
            "--operations",
            "wipe-disk",
            "disk.qcow2",
        ],
    );
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("unknown sysprep operation 'wipe-disk'"),
        "{}",
        bad.stderr
    );
}

#[test]
fn guest_customize_applies_options_and_a_recipe_and_refuses_run_command() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let q = guest_disk(d.path());
    std::fs::write(
        d.path().join("key.pub"),
        "ssh-ed25519 AAAAkey alice@laptop\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("recipe.toml"),
        "[[step]]\nmkdir = \"/srv/www\"\n[[step]]\nwrite = { path = \"/srv/www/index.html\", content = \"hi\" }\n\
         [[step]]\nchown = { owner = \"1000:1000\", path = \"/srv/www/index.html\" }\n",
    )
    .unwrap();
    let refused = vmi(
        d.path(),
        &[
            "guest",
            "customize",
            "disk.qcow2",
            "--hostname",
            "x",
            "--run-command",
            "apt-get update",
        ],
    );
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("needs") && refused.stderr.contains("--firstboot-command"),
        "{}",
        refused.stderr
    );
    vmi(
        d.path(),
        &[
            "guest",
            "customize",
            "disk.qcow2",
            "--recipe",
            "recipe.toml",
            "--hostname",
            "web01",
            "--timezone",
            "Europe/Paris",
            "--root-password",
            "password:pw",
            "--ssh-inject",
            "alice:file:key.pub",
            "--write",
            "/etc/motd:hello",
            "--chmod",
            "0600:/etc/motd",
            "--delete",
            "/var/lib/cloud",
            "--firstboot-command",
            "echo booted",
        ],
    )
    .ok();
    let dev = as_raw(d.path(), &q);
    fsck_clean(&dev);
    assert!(debugfs(&dev, "cat /etc/hostname").ends_with("web01\n"));
    assert!(
        debugfs(&dev, "stat /etc/hostname").contains("Size: 6"),
        "hostname was not touched by refused run"
    );
    let ak = debugfs(&dev, "stat /home/alice/.ssh/authorized_keys");
    assert!(
        ak.contains("Mode:  0600") && ak.contains("User:  1000"),
        "{ak}"
    );
    assert!(debugfs(&dev, "stat /etc/motd").contains("Mode:  0600"));
    let idx = debugfs(&dev, "stat /srv/www/index.html");
    assert!(
        idx.contains("User:  1000") && idx.contains("Size: 2"),
        "{idx}"
    );
    assert!(debugfs(&dev, "stat /var/lib/cloud").contains("File not found"));
    assert!(debugfs(&dev, "cat /etc/shadow").contains("root:$6$"));
    assert!(
        debugfs(&dev, "cat /var/lib/vmi-firstboot/scripts/0001-command").contains("echo booted")
    );
}

#[test]
fn guest_ls_cat_cp_in_cp_out_and_diff_work_on_the_same_image() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let q = guest_disk(d.path());
    std::fs::copy(&q, d.path().join("old.qcow2")).unwrap();
    let ls = vmi(d.path(), &["guest", "ls", "-l", "disk.qcow2", "/etc/ssh"])
        .ok()
        .stdout
        .clone();
    assert!(
        ls.contains("-0644      0      0            8 ssh_host_ed25519_key"),
        "{ls}"
    );
    assert_eq!(
        vmi(d.path(), &["guest", "cat", "disk.qcow2", "/etc/hostname"])
            .ok()
            .stdout,
        "builder\n"
    );
    std::fs::write(d.path().join("new.txt"), "payload").unwrap();
    vmi(
        d.path(),
        &["guest", "cp-in", "disk.qcow2", "new.txt", "/etc"],
    )
    .ok();
    vmi(
        d.path(),
        &["guest", "cp-out", "disk.qcow2", "/etc/new.txt", "out.txt"],
    )
    .ok();
    assert_eq!(
        std::fs::read_to_string(d.path().join("out.txt")).unwrap(),
        "payload"
    );
    let missing = vmi(d.path(), &["guest", "cat", "disk.qcow2", "/etc/nope"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("/etc/nope: no such file"),
        "{}",
        missing.stderr
    );
    let diff = vmi(
        d.path(),
        &[
            "guest",
            "diff",
            "--output",
            "json",
            "old.qcow2",
            "disk.qcow2",
        ],
    )
    .ok()
    .json();
    assert_eq!(
        diff["files"],
        serde_json::json!([{ "change": "added", "path": "/etc/new.txt" }]),
        "{diff}"
    );
    fsck_clean(&as_raw(d.path(), &q));
}

#[test]
fn guest_sparsify_reports_the_bytes_a_deleted_file_gave_back() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let q = guest_disk(d.path());
    vmi(
        d.path(),
        &[
            "guest",
            "customize",
            "disk.qcow2",
            "--delete",
            "/var/big.bin",
        ],
    )
    .ok();
    let j = vmi(
        d.path(),
        &["guest", "sparsify", "--output", "json", "disk.qcow2"],
    )
    .ok()
    .json();
    // Clusters the file shared with used blocks at its extents' ends stay allocated.
    assert!(j["reclaimed"].as_u64().unwrap() >= 7 << 20, "{j}");
    assert_eq!(j["volumes"][0]["fs_type"], "ext4");
    sh("qemu-img", &["check", q.to_str().unwrap()]);
    fsck_clean(&as_raw(d.path(), &q));
}

#[test]
fn guest_sysprep_on_a_linked_clone_leaves_the_golden_image_untouched() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let golden = guest_disk(d.path());
    let before = std::fs::read(&golden).unwrap();
    vmi(
        d.path(),
        &["clone", "--linked", "disk.qcow2", "web01.qcow2"],
    )
    .ok();
    let denied = vmi(d.path(), &["guest", "sysprep", "web01.qcow2"]);
    assert_eq!(
        denied.code, 1,
        "the backing file is not opened unless allowed"
    );
    vmi(
        d.path(),
        &["guest", "sysprep", "--allow-backing", "web01.qcow2"],
    )
    .ok();
    vmi(
        d.path(),
        &[
            "guest",
            "customize",
            "--allow-backing",
            "web01.qcow2",
            "--hostname",
            "web01",
        ],
    )
    .ok();
    assert_eq!(
        std::fs::read(&golden).unwrap(),
        before,
        "golden image unchanged"
    );
    let clone = vmi(
        d.path(),
        &[
            "guest",
            "inspect",
            "--allow-backing",
            "--output",
            "json",
            "web01.qcow2",
        ],
    )
    .ok()
    .json();
    let os = &clone["operating_systems"][0];
    assert_eq!(os["hostname"], "web01");
    assert_eq!(os["machine_id"], false);
    assert_eq!(os["ssh_host_keys"], serde_json::json!([]));
    let gold = vmi(
        d.path(),
        &["guest", "inspect", "--output", "json", "disk.qcow2"],
    )
    .ok()
    .json();
    assert_eq!(gold["operating_systems"][0]["hostname"], "builder");
    fsck_clean(&as_raw(d.path(), &d.path().join("web01.qcow2")));
}

#[test]
fn guest_file_commands_reach_an_efi_system_partition_with_partition() {
    let have = ["mkfs.vfat", "mmd", "fsck.fat", "sfdisk"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !have {
        eprintln!("skipped: dosfstools, mtools or fdisk is not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let part = d.path().join("esp.img");
    std::fs::File::create(&part)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    sh(
        "mkfs.vfat",
        &["-F", "32", "-n", "EFISYS", part.to_str().unwrap()],
    );
    sh(
        "mmd",
        &["-i", part.to_str().unwrap(), "::/EFI", "::/EFI/BOOT"],
    );
    let raw = d.path().join("esp-disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(42 << 20)
        .unwrap();
    let mut c = Command::new("sfdisk")
        .arg("-q")
        .arg(&raw)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(
        c.stdin.take().unwrap(),
        "label: gpt\nstart=2048, size=81920, type=U"
    )
    .unwrap();
    assert!(c.wait().unwrap().success());
    sh(
        "dd",
        &[
            &format!("if={}", part.display()),
            &format!("of={}", raw.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc",
            "status=none",
        ],
    );
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            d.path().join("esp.qcow2").to_str().unwrap(),
        ],
    );
    std::fs::write(d.path().join("grubx64.efi"), "MZ loader").unwrap();
    vmi(
        d.path(),
        &[
            "guest",
            "cp-in",
            "--partition",
            "1",
            "esp.qcow2",
            "grubx64.efi",
            "/EFI/BOOT",
        ],
    )
    .ok();
    let ls = vmi(
        d.path(),
        &[
            "guest",
            "ls",
            "-l",
            "--partition",
            "1",
            "esp.qcow2",
            "/EFI/BOOT",
        ],
    )
    .ok()
    .stdout
    .clone();
    assert_eq!(ls, "-            9 grubx64.efi\n");
    let cat = vmi(
        d.path(),
        &[
            "guest",
            "cat",
            "--partition",
            "1",
            "esp.qcow2",
            "/EFI/BOOT/GRUBX64.EFI",
        ],
    )
    .ok()
    .stdout
    .clone();
    assert_eq!(cat, "MZ loader");
    let j = vmi(
        d.path(),
        &["guest", "inspect", "--output", "json", "esp.qcow2"],
    )
    .ok()
    .json();
    assert_eq!(j["filesystems"][0]["fs_type"], "vfat");
    assert_eq!(j["filesystems"][0]["label"], "EFISYS");
    let back = d.path().join("back.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            d.path().join("esp.qcow2").to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    );
    let esp = d.path().join("back-esp.img");
    sh(
        "dd",
        &[
            &format!("if={}", back.display()),
            &format!("of={}", esp.display()),
            "bs=1M",
            "skip=1",
            "count=40",
            "status=none",
        ],
    );
    let out = Command::new("fsck.fat")
        .args(["-n", esp.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
