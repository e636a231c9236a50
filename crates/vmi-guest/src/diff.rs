//! `diff`: what changed between two versions of an image — files added, removed and changed
//! (kind, permissions, owner, size or contents, by walking both filesystems), and packages
//! added, removed, upgraded or downgraded (from [`crate::inspect`]).

use crate::error::Result;
use crate::ext4::{Ext4, FileKind, Stat};
use crate::inspect::Package;
use serde::Serialize;
use std::collections::BTreeMap;

/// Most entries walked in one filesystem.
pub const MAX_ENTRIES: usize = 4_000_000;
/// Deepest directory walked.
pub const MAX_DEPTH: usize = 64;

/// One file difference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    /// "added", "removed" or "changed".
    pub change: &'static str,
    /// Guest path.
    pub path: String,
    /// What differs, for "changed" ("size", "contents", "mode", "owner", "kind", "target").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<&'static str>,
}

/// One package difference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    /// "added", "removed", "upgraded", "downgraded", or "changed" (versions not ordered: rpm).
    pub change: &'static str,
    /// Package name and architecture (`name:arch`).
    pub name: String,
    /// Version in the first image.
    pub from: Option<String>,
    /// Version in the second image.
    pub to: Option<String>,
}

fn walk(fs: &Ext4<'_>, dir: &str, depth: usize, out: &mut BTreeMap<String, Stat>) -> Result<()> {
    if depth > MAX_DEPTH || out.len() >= MAX_ENTRIES {
        return Ok(());
    }
    for e in fs.read_dir(dir)? {
        let p = if dir == "/" {
            format!("/{}", e.name)
        } else {
            format!("{dir}/{}", e.name)
        };
        let st = fs.stat(&p)?;
        let is_dir = st.kind == FileKind::Dir;
        out.insert(p.clone(), st);
        if is_dir {
            walk(fs, &p, depth + 1, out)?;
        }
    }
    Ok(())
}

fn same_contents(a: &Ext4<'_>, b: &Ext4<'_>, path: &str) -> Result<bool> {
    let mut ha = crc32fast::Hasher::new();
    let mut hb = crc32fast::Hasher::new();
    a.read_file(path, &mut HashWriter(&mut ha))?;
    b.read_file(path, &mut HashWriter(&mut hb))?;
    Ok(ha.finalize() == hb.finalize())
}

struct HashWriter<'a>(&'a mut crc32fast::Hasher);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The file differences between two filesystems.
pub fn diff_files(a: &Ext4<'_>, b: &Ext4<'_>) -> Result<Vec<FileChange>> {
    let mut ta = BTreeMap::new();
    let mut tb = BTreeMap::new();
    walk(a, "/", 0, &mut ta)?;
    walk(b, "/", 0, &mut tb)?;
    let mut out = Vec::new();
    for (p, sa) in &ta {
        let Some(sb) = tb.get(p) else {
            out.push(FileChange {
                change: "removed",
                path: p.clone(),
                what: vec![],
            });
            continue;
        };
        let mut what = Vec::new();
        if sa.kind != sb.kind {
            what.push("kind");
        } else {
            if sa.size != sb.size {
                what.push("size");
            } else if sa.kind == FileKind::File && !same_contents(a, b, p)? {
                what.push("contents");
            }
            if sa.kind == FileKind::Symlink && a.readlink(p)? != b.readlink(p)? {
                what.push("target");
            }
        }
        if sa.perm != sb.perm {
            what.push("mode");
        }
        if (sa.uid, sa.gid) != (sb.uid, sb.gid) {
            what.push("owner");
        }
        if !what.is_empty() {
            out.push(FileChange {
                change: "changed",
                path: p.clone(),
                what,
            });
        }
    }
    for p in tb.keys() {
        if !ta.contains_key(p) {
            out.push(FileChange {
                change: "added",
                path: p.clone(),
                what: vec![],
            });
        }
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

/// The package differences between two package lists; `format` "deb" orders versions as dpkg
/// does (upgraded / downgraded), other formats report "changed".
pub fn diff_packages(a: &[Package], b: &[Package], format: &str) -> Vec<PackageChange> {
    let key = |p: &Package| format!("{}:{}", p.name, p.arch);
    let ma: BTreeMap<String, &Package> = a.iter().map(|p| (key(p), p)).collect();
    let mb: BTreeMap<String, &Package> = b.iter().map(|p| (key(p), p)).collect();
    let mut out = Vec::new();
    for (k, pa) in &ma {
        let change = match mb.get(k) {
            Some(pb) if pb.version == pa.version => continue,
            None => "removed",
            Some(pb) if format == "deb" => match compare_dpkg_versions(&pa.version, &pb.version) {
                std::cmp::Ordering::Less => "upgraded",
                std::cmp::Ordering::Greater => "downgraded",
                std::cmp::Ordering::Equal => continue,
            },
            Some(_) => "changed",
        };
        out.push(PackageChange {
            change,
            name: k.clone(),
            from: Some(pa.version.clone()),
            to: mb.get(k).map(|p| p.version.clone()),
        });
    }
    for (k, pb) in &mb {
        if !ma.contains_key(k) {
            out.push(PackageChange {
                change: "added",
                name: k.clone(),
                from: None,
                to: Some(pb.version.clone()),
            });
        }
    }
    out.sort_by(|x, y| x.name.cmp(&y.name));
    out
}

/// dpkg's ordering of one character in the non-digit parts (deb-version(7)): `~` before
/// everything (even the end), then the end, then letters, then everything else.
fn dpkg_order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// dpkg's `verrevcmp`: alternate non-digit and digit runs.
fn verrevcmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ac = dpkg_order(a.get(i).copied());
            let bc = dpkg_order(b.get(j).copied());
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let mut first_diff = std::cmp::Ordering::Equal;
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == std::cmp::Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return std::cmp::Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return std::cmp::Ordering::Less;
        }
        if first_diff != std::cmp::Ordering::Equal {
            return first_diff;
        }
    }
    std::cmp::Ordering::Equal
}

/// Compare two Debian versions `[epoch:]upstream[-revision]` as `dpkg --compare-versions` does.
pub fn compare_dpkg_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |v: &str| -> (u64, String, String) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.bytes().all(|c| c.is_ascii_digit()) && !e.is_empty() => {
                (e.parse().unwrap_or(u64::MAX), r)
            }
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u.to_string(), r.to_string()),
            None => (epoch, rest.to_string(), String::new()),
        }
    };
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_versions_order_as_dpkg_compare_versions_says() {
        let pairs = [
            ("1.0", "1.0.1"),
            ("1.0~rc1", "1.0"),
            ("1.0-1", "1.0-2"),
            ("2.0", "1:0.9"),
            ("2.30-21", "2.30-21+deb12u1"),
            ("5.2.15-2", "5.2.15-2+b7"),
            ("1.0a", "1.0b"),
            ("1.0", "1.0a"),
            ("1.0~", "1.0"),
            ("1.0~~", "1.0~"),
            ("010", "11"),
            ("2024a-0+deb12u1", "2025b-0+deb12u1"),
        ];
        for (lo, hi) in pairs {
            assert_eq!(
                compare_dpkg_versions(lo, hi),
                std::cmp::Ordering::Less,
                "{lo} < {hi}"
            );
            assert_eq!(
                compare_dpkg_versions(hi, lo),
                std::cmp::Ordering::Greater,
                "{hi} > {lo}"
            );
        }
        assert_eq!(
            compare_dpkg_versions("1.0-1", "1.00-1"),
            std::cmp::Ordering::Equal
        );
        // The oracle, where dpkg is installed.
        if std::process::Command::new("dpkg")
            .arg("--version")
            .output()
            .is_ok()
        {
            for (lo, hi) in pairs {
                let ok = std::process::Command::new("dpkg")
                    .args(["--compare-versions", lo, "lt", hi])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "dpkg disagrees: {lo} < {hi}");
            }
        }
    }

    #[test]
    fn package_lists_diff_into_added_removed_upgraded_and_downgraded() {
        let p = |n: &str, v: &str| Package {
            name: n.into(),
            version: v.into(),
            arch: "amd64".into(),
        };
        let a = [
            p("bash", "5.2-1"),
            p("old", "1"),
            p("libc6", "2.36-9"),
            p("zlib", "1:1.3-1"),
        ];
        let b = [
            p("bash", "5.2-2"),
            p("new", "3"),
            p("libc6", "2.36-9"),
            p("zlib", "1:1.2-1"),
        ];
        let d = diff_packages(&a, &b, "deb");
        let got: Vec<(&str, &str)> = d.iter().map(|c| (c.change, c.name.as_str())).collect();
        assert_eq!(
            got,
            [
                ("upgraded", "bash:amd64"),
                ("added", "new:amd64"),
                ("removed", "old:amd64"),
                ("downgraded", "zlib:amd64")
            ]
        );
    }
}
