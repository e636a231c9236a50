//! The gate: the only way a driver may open a file named inside an image.
//!
//! Images are untrusted (see `docs/threat-model.md`). A backing file, external data file or extent
//! named in an image could point at `/etc/shadow`, a device, or a protocol such as `nbd:` or
//! `json:{...}` (CVE-2024-32498, CVE-2022-47951). The gate denies backing and data files unless the
//! caller allowed them, confines every allowed path to one directory (after resolving symlinks and
//! `..`), and always refuses protocol prefixes.

use crate::error::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// Deepest backing chain vmi opens: deep enough for layered templates, small enough that a hostile
/// chain cannot exhaust file descriptors or stack.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// Longest file name an image may declare (qcow2 allows 1023 bytes for a backing name).
pub const MAX_REFERENCE_LEN: usize = 4096;

/// What kind of file an image refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Referral {
    /// A backing (parent) image.
    Backing,
    /// An external data file (qcow2 `data_file`).
    DataFile,
    /// An extent of a multi-file image (VMDK descriptors); must sit in the descriptor's folder.
    Extent,
}

impl Referral {
    fn noun(self) -> &'static str {
        match self {
            Referral::Backing => "backing file",
            Referral::DataFile => "external data file",
            Referral::Extent => "extent file",
        }
    }
}

/// The policy for files named inside images. The default denies backing and data files and allows
/// extents only in the descriptor's own folder.
#[derive(Debug, Clone)]
pub struct Gate {
    allow_backing: bool,
    allow_data_file: bool,
    allow_extents: bool,
    root: Option<PathBuf>,
    max_depth: usize,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            allow_backing: false,
            allow_data_file: false,
            allow_extents: true,
            root: None,
            max_depth: MAX_CHAIN_DEPTH,
        }
    }
}

impl Gate {
    /// The default policy: deny backing and data files, extents only beside their descriptor.
    pub fn new() -> Self {
        Self::default()
    }

    /// Deny everything, extents included (for inspecting untrusted uploads).
    pub fn deny_all() -> Self {
        Gate {
            allow_extents: false,
            ..Self::default()
        }
    }

    /// Allow opening backing files (confined to the root directory).
    pub fn allow_backing(mut self, yes: bool) -> Self {
        self.allow_backing = yes;
        self
    }

    /// Allow opening external data files (confined to the root directory).
    pub fn allow_data_file(mut self, yes: bool) -> Self {
        self.allow_data_file = yes;
        self
    }

    /// Allow extent files at all.
    pub fn allow_extents(mut self, yes: bool) -> Self {
        self.allow_extents = yes;
        self
    }

    /// Confine backing and data files to `dir` (default: the directory of the top image).
    pub fn confine_to(mut self, dir: impl Into<PathBuf>) -> Self {
        self.root = Some(dir.into());
        self
    }

    /// Limit the backing chain depth (at most [`MAX_CHAIN_DEPTH`]).
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth.min(MAX_CHAIN_DEPTH);
        self
    }

    /// The chain depth limit.
    pub fn depth_limit(&self) -> usize {
        self.max_depth
    }

    /// Whether backing files may be opened.
    pub fn backing_allowed(&self) -> bool {
        self.allow_backing
    }

    /// The confinement directory, if set.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// Fill in the confinement directory from the top image when the caller gave none.
    pub fn rooted_at_image(&self, top_image: &Path) -> Gate {
        let mut g = self.clone();
        if g.root.is_none() {
            g.root = Some(parent_dir(top_image));
        }
        g
    }

    /// Resolve `name`, found inside `referrer`, to a host path the caller may open, or refuse.
    ///
    /// Relative names resolve against the referrer's folder, as qemu does. The result is
    /// canonical (symlinks resolved) and inside the allowed directory.
    pub fn resolve(&self, what: Referral, referrer: &Path, name: &str) -> Result<PathBuf> {
        let noun = what.noun();
        check_reference_syntax(what, name)?;
        let allowed = match what {
            Referral::Backing => self.allow_backing,
            Referral::DataFile => self.allow_data_file,
            Referral::Extent => self.allow_extents,
        };
        if !allowed {
            let hint = match what {
                Referral::Backing => " (allow backing files explicitly, e.g. --allow-backing)",
                Referral::DataFile => " (allow data files explicitly, e.g. --allow-data-file)",
                Referral::Extent => "",
            };
            return Err(Error::refused(format!(
                "image names {noun} '{}'; not opened{hint}",
                name.escape_debug()
            ))
            .with_path(referrer));
        }
        let base = parent_dir(referrer);
        let joined = if Path::new(name).is_absolute() {
            PathBuf::from(name)
        } else {
            base.join(name)
        };
        let root = match what {
            Referral::Extent => base.clone(),
            _ => self.root.clone().unwrap_or_else(|| base.clone()),
        };
        let root = if root.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            root
        };
        let canon_root = root
            .canonicalize()
            .map_err(|e| Error::io(format!("resolving allowed directory {}", root.display()), e))?;
        let canon = joined.canonicalize().map_err(|e| {
            Error::io(format!("opening {noun} '{}'", joined.display()), e).with_path(referrer)
        })?;
        if !canon.starts_with(&canon_root) {
            return Err(Error::refused(format!(
                "{noun} '{}' resolves to {}, outside the allowed directory {}",
                name.escape_debug(),
                canon.display(),
                canon_root.display()
            ))
            .with_path(referrer));
        }
        let meta = std::fs::metadata(&canon)
            .map_err(|e| Error::io(format!("opening {noun} '{}'", canon.display()), e))?;
        if !meta.is_file() {
            return Err(Error::refused(format!(
                "{noun} '{}' is not a regular file",
                canon.display()
            ))
            .with_path(referrer));
        }
        Ok(canon)
    }
}

/// Reject names that can never be safe, whatever the policy: protocol prefixes, empty names, NUL
/// bytes, over-long names, and (for extents) any directory component.
pub fn check_reference_syntax(what: Referral, name: &str) -> Result<()> {
    let noun = what.noun();
    if name.is_empty() {
        return Err(Error::invalid(format!("empty {noun} name")));
    }
    if name.len() > MAX_REFERENCE_LEN {
        return Err(Error::limit(format!(
            "{noun} name is {} bytes long",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Error::invalid(format!("{noun} name contains a NUL byte")));
    }
    if let Some(proto) = protocol_prefix(name) {
        return Err(Error::refused(format!(
            "{noun} '{}' uses the protocol prefix '{proto}:'; only plain file names are accepted",
            name.escape_debug()
        )));
    }
    if what == Referral::Extent {
        let p = Path::new(name);
        let plain = p.components().count() == 1
            && matches!(p.components().next(), Some(Component::Normal(_)));
        if !plain || name.contains('/') || name.contains('\\') {
            return Err(Error::refused(format!(
                "extent file '{}' is not a plain file name in the descriptor's folder",
                name.escape_debug()
            )));
        }
    }
    Ok(())
}

/// The protocol name when `name` starts with `proto:` before any slash (qemu's rule for
/// `json:`, `nbd:`, `file:`, `http:` …).
pub fn protocol_prefix(name: &str) -> Option<&str> {
    let head = name.split('/').next().unwrap_or("");
    let (proto, _) = head.split_once(':')?;
    Some(proto)
}

/// The folder holding `p` (`.` for a bare file name, where `Path::parent` gives an empty path).
pub fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn default_gate_refuses_backing_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("top.qcow2");
        std::fs::write(dir.path().join("base.raw"), b"x").unwrap();
        let e = Gate::new()
            .resolve(Referral::Backing, &img, "base.raw")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert!(e.to_string().contains("base.raw"), "{e}");
    }

    #[test]
    fn protocol_prefixes_are_refused_even_when_allowed() {
        let g = Gate::new().allow_backing(true);
        for name in [
            "json:{\"file\":\"/etc/passwd\"}",
            "nbd:127.0.0.1:10809",
            "file:x",
        ] {
            let e = g
                .resolve(Referral::Backing, Path::new("/tmp/a"), name)
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Refused, "{name}");
        }
    }

    #[test]
    fn allowed_backing_outside_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("top.qcow2");
        let e = Gate::new()
            .allow_backing(true)
            .resolve(Referral::Backing, &img, "/etc/passwd");
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Refused);
        let e =
            Gate::new()
                .allow_backing(true)
                .resolve(Referral::Backing, &img, "../../etc/passwd");
        assert!(e.is_err());
    }

    #[test]
    fn allowed_backing_inside_root_resolves() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("base.raw"), b"x").unwrap();
        let img = dir.path().join("sub/top.qcow2");
        let g = Gate::new().allow_backing(true).confine_to(dir.path());
        let p = g.resolve(Referral::Backing, &img, "../base.raw").unwrap();
        assert_eq!(p, dir.path().join("base.raw").canonicalize().unwrap());
    }

    #[test]
    fn an_empty_confinement_directory_means_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.raw"), b"x").unwrap();
        let img = dir.path().join("top.qcow2");
        let g = Gate::new().allow_backing(true).confine_to("");
        // The current directory (the crate's folder under the test runner) is not the image's
        // temporary folder, so the backing file is outside it: refused, not an I/O error.
        let e = g.resolve(Referral::Backing, &img, "base.raw").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        assert_eq!(parent_dir(Path::new("new.qcow2")), PathBuf::from("."));
    }

    #[test]
    fn extents_with_directories_are_refused() {
        for name in ["../x.vmdk", "/etc/passwd", "sub/x.vmdk", ".."] {
            let e = check_reference_syntax(Referral::Extent, name).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Refused, "{name}");
        }
        check_reference_syntax(Referral::Extent, "disk-flat.vmdk").unwrap();
    }

    #[test]
    fn symlink_escaping_the_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("base")).unwrap();
        let img = dir.path().join("top");
        let e = Gate::new()
            .allow_backing(true)
            .resolve(Referral::Backing, &img, "base");
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Refused);
    }
}
