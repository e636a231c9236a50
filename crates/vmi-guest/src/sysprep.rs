//! `sysprep`: remove what makes an installed system one particular machine, so that clones of it
//! are distinct — the default operations of libguestfs's virt-sysprep that apply to a Linux guest
//! (machine-id, SSH host keys, logs, temporary files, package caches, shell history, cloud-init
//! state, DHCP leases, udev's persistent net rules, the random seed). All selected operations are
//! planned first (read-only) and then applied in one pass; a dry run stops after planning.

use crate::error::{Error, Result};
use crate::ext4::{Ext4, FileKind};
use crate::inspect::{list, parse_passwd, read_text, shell_history};
use serde::Serialize;

/// Deepest directory walked under /var/log.
const MAX_LOG_DEPTH: usize = 16;

/// One sysprep operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    /// Name, as `--operations` takes it (virt-sysprep's names).
    pub name: &'static str,
    /// What it does.
    pub description: &'static str,
}

/// Every operation, in the order they are applied.
pub const OPERATIONS: &[Operation] = &[
    Operation { name: "machine-id", description: "Empty /etc/machine-id and remove /var/lib/dbus/machine-id (systemd makes a new one at boot)" },
    Operation { name: "ssh-hostkeys", description: "Remove the SSH host keys in /etc/ssh (sshd makes new ones at boot)" },
    Operation { name: "logfiles", description: "Truncate the log files under /var/log and remove rotated ones" },
    Operation { name: "tmp-files", description: "Remove everything in /tmp and /var/tmp" },
    Operation { name: "package-manager-cache", description: "Remove apt's and dnf/yum's caches of downloaded packages and indexes" },
    Operation { name: "bash-history", description: "Remove shell history files of root and every user" },
    Operation { name: "cloud-init", description: "Remove cloud-init's state in /var/lib/cloud so it runs again" },
    Operation { name: "dhcp-client-state", description: "Remove DHCP client leases" },
    Operation { name: "udev-persistent-net", description: "Remove udev's persistent network interface rules" },
    Operation { name: "random-seed", description: "Remove the saved random seed" },
];

/// What sysprep does to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Removed (with everything under it, for a directory).
    Remove,
    /// Cut to zero length, kept with its mode and owner.
    Truncate,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The operation that asks for it.
    pub operation: &'static str,
    /// The guest path.
    pub path: String,
    /// What happens to it.
    pub action: Action,
}

/// Resolve `--operations` names (comma-separated; `-name` removes one from the defaults).
pub fn select(spec: Option<&str>) -> Result<Vec<&'static str>> {
    let all: Vec<&'static str> = OPERATIONS.iter().map(|o| o.name).collect();
    let Some(spec) = spec else {
        return Ok(all);
    };
    let mut out: Vec<&'static str> = Vec::new();
    let mut minus = Vec::new();
    for w in spec.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let (neg, name) = match w.strip_prefix('-') {
            Some(n) => (true, n),
            None => (false, w),
        };
        let op = if name == "defaults" {
            None
        } else {
            Some(*all.iter().find(|n| **n == name).ok_or_else(|| {
                Error::Usage(format!(
                    "unknown sysprep operation '{name}' (see --list-operations)"
                ))
            })?)
        };
        match (neg, op) {
            (false, None) => out.extend(all.iter().copied()),
            (false, Some(o)) => out.push(o),
            (true, Some(o)) => minus.push(o),
            (true, None) => return Err(Error::Usage("'-defaults' means nothing".into())),
        }
    }
    if out.is_empty() {
        out = all.clone();
    }
    out.retain(|o| !minus.contains(o));
    // Keep the defined order, without duplicates.
    Ok(all.into_iter().filter(|o| out.contains(o)).collect())
}

fn is_file(fs: &Ext4<'_>, p: &str) -> bool {
    matches!(fs.stat(p), Ok(st) if st.kind == FileKind::File || st.kind == FileKind::Symlink)
}

fn exists(fs: &Ext4<'_>, p: &str) -> bool {
    fs.stat(p).is_ok()
}

/// Entries of `dir` whose names `keep` accepts, as full paths.
fn entries(fs: &Ext4<'_>, dir: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    Ok(list(fs, dir)?
        .into_iter()
        .filter(|n| keep(n))
        .map(|n| format!("{}/{n}", dir.trim_end_matches('/')))
        .collect())
}

/// A rotated log's name: `x.1`, `x.2.gz`, `x.gz`, `x.old`, `x-20240101`.
fn is_rotated(name: &str) -> bool {
    let base = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".xz"))
        .unwrap_or(name);
    name.len() != base.len()
        || base.ends_with(".old")
        || base
            .rsplit_once('.')
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        || base
            .rsplit_once('-')
            .is_some_and(|(_, n)| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()))
}

fn plan_logs(fs: &Ext4<'_>, dir: &str, depth: usize, out: &mut Vec<Change>) -> Result<()> {
    if depth > MAX_LOG_DEPTH {
        return Ok(());
    }
    for e in list(fs, dir)? {
        let p = format!("{dir}/{e}");
        let Ok(st) = fs.stat(&p) else { continue };
        match st.kind {
            FileKind::Dir => plan_logs(fs, &p, depth + 1, out)?,
            FileKind::File if is_rotated(&e) => out.push(Change {
                operation: "logfiles",
                path: p,
                action: Action::Remove,
            }),
            FileKind::File if st.size > 0 => out.push(Change {
                operation: "logfiles",
                path: p,
                action: Action::Truncate,
            }),
            _ => {}
        }
    }
    Ok(())
}

/// The changes the selected operations make to this filesystem (nothing is changed).
pub fn plan(fs: &Ext4<'_>, ops: &[&'static str]) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    let mut add = |operation: &'static str, paths: Vec<String>, action: Action| {
        for path in paths {
            out.push(Change {
                operation,
                path,
                action,
            });
        }
    };
    for &op in ops {
        match op {
            "machine-id" => {
                if matches!(fs.stat("/etc/machine-id"), Ok(st) if st.kind == FileKind::File && st.size > 0)
                {
                    add(op, vec!["/etc/machine-id".into()], Action::Truncate);
                }
                if is_file(fs, "/var/lib/dbus/machine-id") {
                    add(op, vec!["/var/lib/dbus/machine-id".into()], Action::Remove);
                }
            }
            "ssh-hostkeys" => add(
                op,
                entries(fs, "/etc/ssh", |n| {
                    n.starts_with("ssh_host_") && n.contains("_key")
                })?,
                Action::Remove,
            ),
            "logfiles" => {
                let mut v = Vec::new();
                plan_logs(fs, "/var/log", 0, &mut v)?;
                for c in v {
                    add(op, vec![c.path], c.action);
                }
            }
            "tmp-files" => {
                add(op, entries(fs, "/tmp", |_| true)?, Action::Remove);
                add(op, entries(fs, "/var/tmp", |_| true)?, Action::Remove);
            }
            "package-manager-cache" => {
                add(
                    op,
                    entries(fs, "/var/cache/apt", |n| n.ends_with(".bin"))?,
                    Action::Remove,
                );
                add(
                    op,
                    entries(fs, "/var/cache/apt/archives", |n| n.ends_with(".deb"))?,
                    Action::Remove,
                );
                add(
                    op,
                    entries(fs, "/var/cache/apt/archives/partial", |_| true)?,
                    Action::Remove,
                );
                add(
                    op,
                    entries(fs, "/var/lib/apt/lists", |n| {
                        n != "lock" && n != "partial" && n != "auxfiles"
                    })?,
                    Action::Remove,
                );
                for d in ["/var/cache/dnf", "/var/cache/yum", "/var/cache/zypp"] {
                    add(op, entries(fs, d, |_| true)?, Action::Remove);
                }
            }
            "bash-history" => {
                let users = read_text(fs, "/etc/passwd")?
                    .map(|t| parse_passwd(&t))
                    .unwrap_or_default();
                add(op, shell_history(fs, &users)?, Action::Remove);
            }
            "cloud-init" => add(op, entries(fs, "/var/lib/cloud", |_| true)?, Action::Remove),
            "dhcp-client-state" => {
                add(
                    op,
                    entries(fs, "/var/lib/dhcp", |n| n.contains("lease"))?,
                    Action::Remove,
                );
                add(
                    op,
                    entries(fs, "/var/lib/dhclient", |_| true)?,
                    Action::Remove,
                );
                add(
                    op,
                    entries(fs, "/var/lib/NetworkManager", |n| n.contains("lease"))?,
                    Action::Remove,
                );
                add(
                    op,
                    entries(fs, "/var/lib/systemd/network", |_| true)?,
                    Action::Remove,
                );
            }
            "udev-persistent-net" => {
                for p in [
                    "/etc/udev/rules.d/70-persistent-net.rules",
                    "/etc/udev/rules.d/75-persistent-net-generator.rules",
                ] {
                    if exists(fs, p) {
                        add(op, vec![p.into()], Action::Remove);
                    }
                }
            }
            "random-seed" => {
                for p in [
                    "/var/lib/systemd/random-seed",
                    "/var/lib/urandom/random-seed",
                    "/var/lib/random-seed",
                ] {
                    if is_file(fs, p) {
                        add(op, vec![p.into()], Action::Remove);
                    }
                }
            }
            other => {
                return Err(Error::Usage(format!("unknown sysprep operation '{other}'")));
            }
        }
    }
    Ok(out)
}

/// Apply planned changes (the filesystem must be open for writing).
pub fn apply(fs: &Ext4<'_>, changes: &[Change]) -> Result<()> {
    for c in changes {
        match c.action {
            Action::Remove => match fs.remove_tree(&c.path) {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            },
            Action::Truncate => fs.truncate(&c.path)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_select_by_name_and_by_exclusion() {
        assert_eq!(select(None).unwrap().len(), OPERATIONS.len());
        assert_eq!(
            select(Some("random-seed,machine-id")).unwrap(),
            ["machine-id", "random-seed"]
        );
        let all_but = select(Some("defaults,-logfiles")).unwrap();
        assert!(!all_but.contains(&"logfiles") && all_but.len() == OPERATIONS.len() - 1);
        assert!(select(Some("format-disk"))
            .unwrap_err()
            .to_string()
            .contains("unknown"));
    }

    #[test]
    fn rotated_logs_are_told_from_live_ones() {
        for r in [
            "syslog.1",
            "dpkg.log.2.gz",
            "messages-20240101",
            "x.old",
            "y.gz",
        ] {
            assert!(is_rotated(r), "{r}");
        }
        for l in ["syslog", "dpkg.log", "wtmp", "cloud-init.log"] {
            assert!(!is_rotated(l), "{l}");
        }
    }
}
