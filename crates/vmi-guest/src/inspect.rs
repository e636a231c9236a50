//! `inspect`: what operating system an image holds, read from its files as virt-inspector does —
//! os-release (freedesktop.org), /etc/debian_version, /etc/hostname, /etc/fstab (fstab(5)),
//! /etc/passwd (passwd(5)), the ELF header of /bin/ls or /usr/bin/ls for the architecture, dpkg's
//! status file (deb-control(5) paragraphs) or rpm's SQLite database (`rpmdb.sqlite`, header blobs
//! as rpm's `lib/header.c` lays them out), kernels in /boot, and what a clone must not share:
//! SSH host keys, machine-id, cloud-init state, shell history.

use crate::error::{Error, Result};
use crate::ext4::{Ext4, FileKind};
use crate::guest::{filesystems, FoundFs};
use crate::partition::PartitionTable;
use serde::Serialize;
use vmi_disk::Image;

/// Largest guest text file read for inspection (dpkg status of a large install is a few MiB).
pub const MAX_TEXT_FILE: u64 = 64 << 20;
/// Largest rpm database copied out for reading.
pub const MAX_RPMDB: u64 = 512 << 20;
/// Most entries reported per list (packages, users, kernels).
pub const MAX_LIST: usize = 100_000;

/// Everything found in one image.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The partition table, if any.
    pub partition_table: Option<PartitionTable>,
    /// What each volume holds.
    pub filesystems: Vec<FilesystemReport>,
    /// One entry per operating system found.
    pub operating_systems: Vec<OsReport>,
}

/// One volume and its filesystem.
#[derive(Debug, Clone, Serialize)]
pub struct FilesystemReport {
    /// Where it is.
    #[serde(flatten)]
    pub found: FoundFs,
    /// Filesystem label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Filesystem UUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Why the filesystem could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A mount in /etc/fstab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// The device (`UUID=…`, `/dev/sda1`).
    pub spec: String,
    /// The mount point.
    pub mountpoint: String,
    /// The filesystem type.
    pub fstype: String,
    /// Mount options.
    pub options: String,
}

/// An installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    /// Name.
    pub name: String,
    /// Version as the package manager prints it (`[epoch:]version[-release]`).
    pub version: String,
    /// Architecture.
    pub arch: String,
}

/// A user account from /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// One operating system.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OsReport {
    /// The volume of its root filesystem ("partition 1").
    pub root: String,
    /// "linux".
    pub os_type: String,
    /// os-release ID ("debian", "fedora").
    pub distro: String,
    /// os-release PRETTY_NAME.
    pub product_name: String,
    /// The version (Debian: /etc/debian_version, else os-release VERSION_ID).
    pub version: String,
    /// os-release VERSION_CODENAME.
    pub codename: String,
    /// From the ELF header of /bin/ls ("x86_64", "aarch64").
    pub architecture: String,
    /// /etc/hostname.
    pub hostname: String,
    /// /etc/fstab.
    pub mounts: Vec<Mount>,
    /// Kernels in /boot (`vmlinuz-*`).
    pub kernels: Vec<String>,
    /// "deb" or "rpm".
    pub package_format: String,
    /// "apt", "dnf", "zypper".
    pub package_manager: String,
    /// Installed packages, sorted by name.
    pub packages: Vec<Package>,
    /// Accounts.
    pub users: Vec<User>,
    /// SSH host key files found in /etc/ssh.
    pub ssh_host_keys: Vec<String>,
    /// /etc/machine-id exists and is not empty.
    pub machine_id: bool,
    /// /var/lib/cloud holds state.
    pub cloud_init_state: bool,
    /// Shell history files found.
    pub shell_history: Vec<String>,
    /// Last package change (seconds since the epoch, UTC).
    pub last_update: Option<i64>,
    /// Where `last_update` comes from.
    pub last_update_source: Option<String>,
}

/// Inspect an image.
pub fn inspect(img: &Image) -> Result<Inspection> {
    let (table, found) = filesystems(img)?;
    let mut fss = Vec::new();
    let mut oses = Vec::new();
    for f in found {
        let mut rep = FilesystemReport {
            found: f.clone(),
            label: None,
            uuid: None,
            error: None,
        };
        if f.fs_type.as_deref() == Some("ext4") {
            match Ext4::open(f.volume(img)?, false) {
                Ok(fs) => {
                    let (label, uuid) = fs.label_uuid();
                    rep.label = Some(label);
                    rep.uuid = Some(uuid);
                    if fs.exists("/etc/os-release")? || fs.exists("/usr/lib/os-release")? {
                        oses.push(inspect_os(&fs, &f.device)?);
                    }
                }
                Err(e) => rep.error = Some(e.to_string()),
            }
        }
        if f.fs_type.as_deref() == Some("vfat") {
            match crate::fat::Fat::open(f.volume(img)?) {
                Ok(fat) => rep.label = Some(fat.label()),
                Err(e) => rep.error = Some(e.to_string()),
            }
        }
        fss.push(rep);
    }
    Ok(Inspection {
        partition_table: table,
        filesystems: fss,
        operating_systems: oses,
    })
}

/// A guest text file, or `None` when it does not exist.
pub fn read_text(fs: &Ext4<'_>, path: &str) -> Result<Option<String>> {
    match fs.read_to_vec(path, MAX_TEXT_FILE) {
        Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parse os-release `KEY=value` lines (values optionally quoted).
pub fn parse_os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.replace("\\\"", "\"")))
        })
        .collect()
}

fn inspect_os(fs: &Ext4<'_>, device: &str) -> Result<OsReport> {
    let osr = match read_text(fs, "/etc/os-release")? {
        Some(t) => t,
        None => read_text(fs, "/usr/lib/os-release")?.unwrap_or_default(),
    };
    let kv = parse_os_release(&osr);
    let get = |k: &str| {
        kv.iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut r = OsReport {
        root: device.to_string(),
        os_type: "linux".into(),
        distro: get("ID"),
        product_name: get("PRETTY_NAME"),
        version: get("VERSION_ID"),
        codename: get("VERSION_CODENAME"),
        ..Default::default()
    };
    if r.distro == "debian" {
        if let Some(v) = read_text(fs, "/etc/debian_version")? {
            r.version = v.trim().to_string();
        }
    }
    r.architecture = architecture(fs)?;
    r.hostname = read_text(fs, "/etc/hostname")?
        .and_then(|h| h.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default();
    r.mounts = read_text(fs, "/etc/fstab")?
        .map(|t| parse_fstab(&t))
        .unwrap_or_default();
    r.kernels = list(fs, "/boot")?
        .into_iter()
        .filter(|n| n.starts_with("vmlinuz-") || n.starts_with("vmlinux-"))
        .collect();
    r.kernels.sort();
    if let Some(status) = read_text(fs, "/var/lib/dpkg/status")? {
        r.package_format = "deb".into();
        r.package_manager = if fs.exists("/usr/bin/apt-get")? {
            "apt".into()
        } else {
            "dpkg".into()
        };
        r.packages = parse_dpkg_status(&status);
    } else if let Some(db) = [
        "/var/lib/rpm/rpmdb.sqlite",
        "/usr/lib/sysimage/rpm/rpmdb.sqlite",
    ]
    .into_iter()
    .find(|p| fs.exists(p).unwrap_or(false))
    {
        r.package_format = "rpm".into();
        r.package_manager = if fs.exists("/usr/bin/dnf")? || fs.exists("/usr/bin/dnf5")? {
            "dnf".into()
        } else if fs.exists("/usr/bin/zypper")? {
            "zypper".into()
        } else if fs.exists("/usr/bin/yum")? {
            "yum".into()
        } else {
            "rpm".into()
        };
        r.packages = crate::rpmdb::read_guest_rpmdb(fs, db)?;
    }
    r.packages
        .sort_by(|a, b| a.name.cmp(&b.name).then(a.arch.cmp(&b.arch)));
    r.users = read_text(fs, "/etc/passwd")?
        .map(|t| parse_passwd(&t))
        .unwrap_or_default();
    r.ssh_host_keys = list(fs, "/etc/ssh")?
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_") && n.contains("key"))
        .map(|n| format!("/etc/ssh/{n}"))
        .collect();
    r.ssh_host_keys.sort();
    r.machine_id = fs
        .stat_follow("/etc/machine-id")
        .map(|s| s.size > 0)
        .unwrap_or(false);
    r.cloud_init_state = !list(fs, "/var/lib/cloud")?.is_empty();
    r.shell_history = shell_history(fs, &r.users)?;
    if let Some(log) = read_text(fs, "/var/log/dpkg.log")? {
        r.last_update = log.lines().rev().find_map(parse_dpkg_log_time);
        if r.last_update.is_some() {
            r.last_update_source = Some("/var/log/dpkg.log".into());
        }
    }
    if r.last_update.is_none() {
        for p in ["/var/lib/dpkg/status", "/var/lib/rpm/rpmdb.sqlite"] {
            if let Ok(st) = fs.stat_follow(p) {
                r.last_update = Some(i64::from(st.mtime));
                r.last_update_source = Some(format!("{p} (modification time)"));
                break;
            }
        }
    }
    Ok(r)
}

/// Names in a guest directory; empty when it does not exist.
pub fn list(fs: &Ext4<'_>, dir: &str) -> Result<Vec<String>> {
    match fs.stat_follow(dir) {
        Ok(st) if st.kind == FileKind::Dir => {}
        Ok(_) | Err(Error::NotFound(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    Ok(fs.read_dir(dir)?.into_iter().map(|e| e.name).collect())
}

/// Shell history files: root's and each user's home.
pub fn shell_history(fs: &Ext4<'_>, users: &[User]) -> Result<Vec<String>> {
    const NAMES: [&str; 4] = [
        ".bash_history",
        ".zsh_history",
        ".ash_history",
        ".python_history",
    ];
    let mut homes: Vec<String> = vec!["/root".into()];
    for u in users {
        if u.home.starts_with('/') && u.home != "/" && !homes.contains(&u.home) {
            homes.push(u.home.clone());
        }
    }
    let mut out = Vec::new();
    for h in homes {
        for n in NAMES {
            let p = format!("{}/{n}", h.trim_end_matches('/'));
            if matches!(fs.stat(&p), Ok(st) if st.kind == FileKind::File) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The architecture from an ELF header (`e_machine`, with the class for 32/64-bit pairs).
pub fn elf_architecture(h: &[u8]) -> Option<&'static str> {
    if h.len() < 20 || &h[..4] != b"\x7fELF" {
        return None;
    }
    let class64 = h[4] == 2;
    let machine = match h[5] {
        1 => u16::from_le_bytes([h[18], h[19]]),
        2 => u16::from_be_bytes([h[18], h[19]]),
        _ => return None,
    };
    Some(match (machine, class64) {
        (0x03, _) => "i386",
        (0x3E, _) => "x86_64",
        (0x28, _) => "armv7l",
        (0xB7, _) => "aarch64",
        (0xF3, true) => "riscv64",
        (0xF3, false) => "riscv32",
        (0x15, _) => "ppc64",
        (0x14, _) => "ppc",
        (0x16, _) => "s390x",
        (0x08, true) => "mips64",
        (0x08, false) => "mips",
        (0x102, _) => "loongarch64",
        _ => return None,
    })
}

fn architecture(fs: &Ext4<'_>) -> Result<String> {
    for p in [
        "/usr/bin/ls",
        "/bin/ls",
        "/bin/sh",
        "/usr/bin/bash",
        "/sbin/init",
    ] {
        let Ok(st) = fs.stat_follow(p) else {
            continue;
        };
        if st.kind != FileKind::File {
            continue;
        }
        let mut head = HeadWriter(Vec::new());
        // A short write stops the copy: only the header is wanted.
        let _ = fs.read_file(p, &mut head);
        if let Some(a) = elf_architecture(&head.0) {
            return Ok(a.to_string());
        }
    }
    Ok(String::new())
}

/// Keeps the first 64 bytes written, then refuses more (ending the copy early).
struct HeadWriter(Vec<u8>);

impl std::io::Write for HeadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() >= 64 {
            return Err(std::io::Error::other("enough"));
        }
        let n = buf.len().min(64 - self.0.len());
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Parse fstab(5).
pub fn parse_fstab(text: &str) -> Vec<Mount> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| Mount {
                spec: f[0].to_string(),
                mountpoint: f[1].to_string(),
                fstype: f[2].to_string(),
                options: f.get(3).unwrap_or(&"defaults").to_string(),
            })
        })
        .take(MAX_LIST)
        .collect()
}

/// Parse passwd(5).
pub fn parse_passwd(text: &str) -> Vec<User> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(User {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
                shell: f[6].to_string(),
            })
        })
        .take(MAX_LIST)
        .collect()
}

/// The packages of dpkg's status file that are not `not-installed` (what `dpkg-query -W` lists).
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut name = None;
        let mut version = String::new();
        let mut arch = String::new();
        let mut status = String::new();
        for line in para.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k {
                "Package" => name = Some(v.to_string()),
                "Version" => version = v.to_string(),
                "Architecture" => arch = v.to_string(),
                "Status" => status = v.to_string(),
                _ => {}
            }
        }
        let Some(name) = name else { continue };
        if status.split_whitespace().nth(2) == Some("not-installed") {
            continue;
        }
        out.push(Package {
            name,
            version,
            arch,
        });
        if out.len() >= MAX_LIST {
            break;
        }
    }
    out
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `YYYY-MM-DD HH:MM:SS` UTC for seconds since the epoch.
pub fn format_time(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The time at the start of a dpkg.log line (`2024-05-01 12:34:56 status …`), as seconds since
/// the epoch (dpkg logs local time; taken as UTC).
pub fn parse_dpkg_log_time(line: &str) -> Option<i64> {
    let b = line.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| line.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, s) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_paragraphs_give_installed_packages_only() {
        let s = "Package: a\nStatus: install ok installed\nVersion: 1.0-1\nArchitecture: amd64\nDescription: x\n more\n\n\
                 Package: gone\nStatus: purge ok not-installed\nArchitecture: amd64\n\n\
                 Package: b\nStatus: install ok installed\nVersion: 2:3.4\nArchitecture: all\n";
        let p = parse_dpkg_status(s);
        assert_eq!(
            p,
            vec![
                Package {
                    name: "a".into(),
                    version: "1.0-1".into(),
                    arch: "amd64".into()
                },
                Package {
                    name: "b".into(),
                    version: "2:3.4".into(),
                    arch: "all".into()
                },
            ]
        );
    }

    #[test]
    fn dpkg_log_times_round_trip_through_the_civil_calendar() {
        let t = parse_dpkg_log_time("2024-02-29 23:59:58 status installed x:amd64 1").unwrap();
        assert_eq!(t, 1709251198);
        assert_eq!(format_time(t), "2024-02-29 23:59:58");
        assert_eq!(parse_dpkg_log_time("garbage"), None);
    }

    #[test]
    fn elf_headers_name_their_architecture() {
        let mut h = vec![0u8; 20];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 0xB7;
        assert_eq!(elf_architecture(&h), Some("aarch64"));
        h[18] = 0x3E;
        assert_eq!(elf_architecture(&h), Some("x86_64"));
        assert_eq!(elf_architecture(b"#!/bin/sh"), None);
    }

    #[test]
    fn os_release_values_are_unquoted() {
        let kv =
            parse_os_release("# c\nID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n");
        assert_eq!(kv[0], ("ID".into(), "debian".into()));
        assert_eq!(kv[1].1, "Debian GNU/Linux 12 (bookworm)");
    }
}
