//! Fixture builders for the guest tests: ext4 filesystems made by `mkfs.ext4 -d`, put in MBR or
//! GPT disks made by `sfdisk`, converted by `qemu-img`; `e2fsck` and `debugfs` as oracles (on
//! `disk.raw?offset=N`, e2fsprogs' own way of reaching a partition inside a disk file).

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the helpers"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the partition starts in the disks built here.
pub const PART_OFFSET: u64 = 1 << 20;

/// Whether the e2fsprogs and util-linux tools are here; prints why a test is skipped.
pub fn have_tools() -> bool {
    for t in ["mkfs.ext4", "e2fsck", "debugfs", "sfdisk"] {
        let ok = Command::new(t)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            eprintln!("skipped: {t} is not installed (apt-get install e2fsprogs fdisk)");
            return false;
        }
    }
    true
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An ext4 filesystem of `size` bytes holding `tree`, as a file.
pub fn mkfs_ext4(dir: &Path, tree: &Path, size: u64) -> PathBuf {
    let p = dir.join("part.ext4");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "vmiroot",
            "-E",
            "root_owner=0:0",
            "-d",
            tree.to_str().unwrap(),
            p.to_str().unwrap(),
        ],
    );
    p
}

/// A raw disk with an MBR (`label` "dos") or GPT (`label` "gpt") table holding `part` as
/// partition 1 at [`PART_OFFSET`].
pub fn disk_with(dir: &Path, part: &Path, label: &str) -> PathBuf {
    let plen = std::fs::metadata(part).unwrap().len();
    let disk = dir.join(format!("disk-{label}.raw"));
    let size = PART_OFFSET + plen + (1 << 20);
    std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        "label: {label}\nstart=2048, size={}, type=L",
        plen / 512
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    run(
        "dd",
        &[
            &format!("if={}", part.display()),
            &format!("of={}", disk.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc,sparse",
            "status=none",
        ],
    );
    disk
}

/// `qemu-img convert -O fmt`.
pub fn convert(src: &Path, fmt: &str, dst: &Path) {
    let out = vmi_testkit::qemu_img(&[
        "convert",
        "-O",
        fmt,
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
}

/// The partition at [`PART_OFFSET`] as e2fsprogs names it.
pub fn at_offset(raw: &Path) -> String {
    format!("{}?offset={PART_OFFSET}", raw.display())
}

/// `e2fsck -fn` on the partition: (exit code, output).
pub fn e2fsck(raw: &Path) -> (i32, String) {
    let out = Command::new("e2fsck")
        .args(["-fn", &at_offset(raw)])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn assert_fsck_clean(raw: &Path) {
    let (code, out) = e2fsck(raw);
    assert_eq!(code, 0, "e2fsck -fn is not clean:\n{out}");
}

/// `debugfs -R CMD` on the partition (stderr, then stdout).
pub fn debugfs(raw: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd, &at_offset(raw)])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// The cached debootstrap tarball (built by `tests/debian-fixture.sh`).
pub fn debian_tar() -> PathBuf {
    std::env::var_os("VMI_TEST_DEBIAN_TAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/vmi-test/debian-bookworm-minbase.tar".into())
}

/// Size of the Debian root partition.
pub const DEBIAN_PART_SIZE: u64 = 768 << 20;

/// Files a built image carries and sysprep removes, added to the Debian tree before mkfs.
pub const BUILDER_ARTEFACTS: &[(&str, &str)] = &[
    ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
    (
        "var/lib/dbus/machine-id",
        "0123456789abcdef0123456789abcdef\n",
    ),
    ("etc/ssh/ssh_host_ed25519_key", "PRIVATE\n"),
    (
        "etc/ssh/ssh_host_ed25519_key.pub",
        "ssh-ed25519 AAAA builder\n",
    ),
    ("etc/ssh/ssh_host_rsa_key", "PRIVATE\n"),
    ("root/.bash_history", "apt-get install secret-tool\n"),
    ("var/lib/cloud/instance/boot-finished", "done\n"),
    ("var/lib/cloud/instances/i-1/datasource", "DataSourceNone\n"),
    ("var/lib/dhcp/dhclient.eth0.leases", "lease {}\n"),
    (
        "etc/udev/rules.d/70-persistent-net.rules",
        "SUBSYSTEM==\"net\"\n",
    ),
    ("var/lib/systemd/random-seed", "seedseedseed"),
    ("var/cache/apt/pkgcache.bin", "cache"),
    ("var/cache/apt/archives/old.deb", "deb"),
    ("tmp/build-leftover", "tmp"),
    ("var/tmp/leftover", "tmp"),
];

/// The Debian 12 root filesystem (an ext4 file of [`DEBIAN_PART_SIZE`]) and the package list
/// `dpkg-query -W` gives for its tree (`name\tversion\tarch` lines), built once from the cached
/// debootstrap tarball and cached beside it. `None` (with the reason printed) when the tarball is
/// missing and debootstrap is not installed to build it.
pub fn debian_root() -> Option<(PathBuf, String)> {
    if !have_tools() {
        return None;
    }
    let tar = debian_tar();
    if !tar.exists() {
        let has_debootstrap = Command::new("debootstrap")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !has_debootstrap {
            eprintln!(
                "skipped: no Debian fixture at {} and debootstrap is not installed \
                 (apt-get install debootstrap; tests/debian-fixture.sh builds it)",
                tar.display()
            );
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/debian-fixture.sh");
        run("bash", &[script.to_str().unwrap()]);
    }
    let cache = tar.with_extension("ext4");
    let pkgs = tar.with_extension("packages");
    // One test process builds the cache; the others wait for it (tests run in parallel).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(tar.with_extension("lock"))
        .unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns; released when `lock` closes.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "locking the fixture cache");
    }
    if !cache.exists() || !pkgs.exists() {
        let work = tempfile::tempdir_in(tar.parent().unwrap()).unwrap();
        let tree = work.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        run(
            "tar",
            &[
                "-xf",
                tar.to_str().unwrap(),
                "-C",
                tree.to_str().unwrap(),
                "--numeric-owner",
            ],
        );
        for (p, content) in BUILDER_ARTEFACTS {
            let f = tree.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, content).unwrap();
        }
        let list = run(
            "dpkg-query",
            &[
                &format!("--admindir={}", tree.join("var/lib/dpkg").display()),
                "-W",
                "-f",
                "${Package}\\t${Version}\\t${Architecture}\\n",
            ],
        );
        let part = mkfs_ext4(work.path(), &tree, DEBIAN_PART_SIZE);
        let tmp_pkgs = work.path().join("packages");
        std::fs::write(&tmp_pkgs, list).unwrap();
        std::fs::rename(&tmp_pkgs, &pkgs).unwrap();
        std::fs::rename(&part, &cache).unwrap();
    }
    drop(lock);
    Some((cache, std::fs::read_to_string(&pkgs).unwrap()))
}

/// A raw disk (`label` "dos" or "gpt") with the Debian root as partition 1.
pub fn debian_disk(dir: &Path, label: &str) -> Option<PathBuf> {
    let (part, _) = debian_root()?;
    Some(disk_with(dir, &part, label))
}
