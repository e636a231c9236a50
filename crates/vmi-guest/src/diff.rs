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
    /// Package name (with architecture when not the only one).
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

/// The package differences between two package lists.
pub fn diff_packages(a: &[Package], b: &[Package]) -> Vec<PackageChange> {
    let key = |p: &Package| format!("{}:{}", p.name, p.arch);
    let ma: BTreeMap<String, &Package> = a.iter().map(|p| (key(p), p)).collect();
    let mb: BTreeMap<String, &Package> = b.iter().map(|p| (key(p), p)).collect();
    let mut out = Vec::new();
    for (k, pa) in &ma {
        match mb.get(k) {
            Some(pb) if pb.version == pa.version => {}
            other => out.push(PackageChange {
                name: k.clone(),
                from: Some(pa.version.clone()),
                to: other.map(|p| p.version.clone()),
            }),
        }
    }
    for (k, pb) in &mb {
        if !ma.contains_key(k) {
            out.push(PackageChange {
                name: k.clone(),
                from: None,
                to: Some(pb.version.clone()),
            });
        }
    }
    out.sort_by(|x, y| x.name.cmp(&y.name));
    out
}
