//! The gate: the only way a driver may open a file named inside an image.
//!
//! Images are untrusted (see `docs/threat-model.md`). A backing file, external data file or extent
//! named in an image could point at `/etc/shadow`, a device, or a protocol such as `nbd:` or
//! `json:{...}` (CVE-2024-32498, CVE-2022-47951). The gate denies backing and data files unless the
//! caller allowed them, confines every allowed path to one directory (after resolving symlinks and
//! `..`), and always refuses protocol prefixes.
//!
//! Checking a path and opening it are one step ([`Gate::open`]): the file is opened relative to a
//! descriptor of the allowed directory with Linux's `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)`, so the kernel resolves every component (symlinks and `..` included)
//! and refuses any that leaves the directory. A symlink swapped in after a check cannot redirect
//! the open, because there is no separate check. Where `openat2` is missing (Linux before 5.6,
//! `ENOSYS`), the path is walked one component at a time with `O_NOFOLLOW | O_DIRECTORY`,
//! refusing symlinks and `..` above the directory.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
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

    /// Resolve `name`, found inside `referrer`, to a host path, or refuse.
    ///
    /// Relative names resolve against the referrer's folder, as qemu does. The result is
    /// canonical (symlinks resolved) and was inside the allowed directory when it was checked;
    /// opening it by name later races with whoever can change the directory, so use
    /// [`Gate::open`] to open a referenced file.
    pub fn resolve(&self, what: Referral, referrer: &Path, name: &str) -> Result<PathBuf> {
        self.open(what, referrer, name, false).map(|o| o.path)
    }

    /// Open `name`, found inside `referrer`, beneath the allowed directory in one step, or
    /// refuse: the kernel resolves the path relative to the directory and refuses symlinks or
    /// `..` that leave it, so nothing can be swapped in between the check and the open.
    pub fn open(
        &self,
        what: Referral,
        referrer: &Path,
        name: &str,
        writable: bool,
    ) -> Result<Opened> {
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
        let joined = if Path::new(name).is_absolute() {
            PathBuf::from(name)
        } else {
            let canon_base = base.canonicalize().map_err(|e| {
                Error::io(format!("resolving folder {}", base.display()), e).with_path(referrer)
            })?;
            canon_base.join(name)
        };
        let outside = || {
            Error::refused(format!(
                "{noun} '{}' resolves outside the allowed directory {}",
                name.escape_debug(),
                canon_root.display()
            ))
            .with_path(referrer)
        };
        // The part below the allowed directory, as written: the kernel resolves it beneath.
        let abs_root = std::path::absolute(&root).unwrap_or_else(|_| root.clone());
        let rel = joined
            .strip_prefix(&canon_root)
            .or_else(|_| joined.strip_prefix(&abs_root))
            .map_err(|_| outside())?;
        let dir = open_dir(&canon_root).map_err(|e| {
            Error::io(
                format!("opening allowed directory {}", canon_root.display()),
                e,
            )
        })?;
        let file = match open_beneath(&dir, rel, writable) {
            Ok(f) => f,
            Err(e) if escaped(&e) => return Err(outside()),
            Err(e) => {
                return Err(
                    Error::io(format!("opening {noun} '{}'", joined.display()), e)
                        .with_path(referrer),
                )
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("opening {noun} '{}'", joined.display()), e))?;
        if !meta.is_file() {
            return Err(Error::refused(format!(
                "{noun} '{}' is not a regular file",
                joined.display()
            ))
            .with_path(referrer));
        }
        // The path the descriptor was reached by (for messages and loop detection).
        let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok()
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| canon_root.join(rel));
        if !path.starts_with(&canon_root) {
            return Err(outside());
        }
        Ok(Opened { file, path })
    }
}

/// A file the gate opened, with the canonical path it was reached by.
#[derive(Debug)]
pub struct Opened {
    /// The open file (read-only, or read-write when asked).
    pub file: File,
    /// Canonical path of the file when it was opened.
    pub path: PathBuf,
}

/// Whether an open failed because the path left the directory (`openat2`'s `EXDEV`, a magic link's
/// `ELOOP`, the walk's refusals).
fn escaped(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EXDEV) | Some(libc::ELOOP))
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A descriptor of the directory `dir` (`O_PATH`: it only anchors lookups).
fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let c = cstr(dir)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; the returned descriptor is
    // checked and then owned by the `OwnedFd`.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct open_how` of `linux/openat2.h` (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Flags of the final open: read-only or read-write, never creating, never a controlling tty.
fn access_flags(writable: bool) -> libc::c_int {
    let mode = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    mode | libc::O_CLOEXEC | libc::O_NOCTTY
}

/// Open `rel` beneath `dir`: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`, or the
/// component walk where the kernel lacks it.
pub(crate) fn open_beneath(dir: &OwnedFd, rel: &Path, writable: bool) -> io::Result<File> {
    match openat2_beneath(dir, rel, writable) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => walk_beneath(dir, rel, writable),
        other => other,
    }
}

fn openat2_beneath(dir: &OwnedFd, rel: &Path, writable: bool) -> io::Result<File> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let c = cstr(rel)?;
    let how = OpenHow {
        flags: access_flags(writable) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2(2) reads `c` (NUL-terminated, alive for the call) and `how` (a
    // `struct open_how` of exactly the size passed); `dir` is an open descriptor we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd)
        .map_err(|_| io::Error::other("openat2 returned a bad descriptor"))?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// One `openat` relative to `dir`, never following a symlink in the last component.
fn openat_nofollow(
    dir: libc::c_int,
    name: &std::ffi::OsStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))?;
    // SAFETY: `c` is a NUL-terminated single component alive for the call; `dir` is an open
    // descriptor; the result is checked and then owned.
    let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The fallback: walk `rel` one component at a time from `dir`, each directory opened with
/// `O_NOFOLLOW | O_DIRECTORY` (a symlink anywhere is refused with `ELOOP`), `..` going back to
/// the directory it came from and refused (`EXDEV`) above `dir`.
pub(crate) fn walk_beneath(dir: &OwnedFd, rel: &Path, writable: bool) -> io::Result<File> {
    let mut stack: Vec<OwnedFd> = Vec::new();
    let comps: Vec<Component> = rel.components().collect();
    let Some((last, parents)) = comps.split_last() else {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    };
    let cur = |stack: &Vec<OwnedFd>| stack.last().map_or(dir.as_raw_fd(), |f| f.as_raw_fd());
    for c in parents {
        match c {
            Component::Normal(n) => {
                let fd = openat_nofollow(cur(&stack), n, libc::O_PATH | libc::O_DIRECTORY)
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::ENOTDIR) => io::Error::from_raw_os_error(libc::ELOOP),
                        _ => e,
                    })?;
                stack.push(fd);
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if stack.pop().is_none() {
                    return Err(io::Error::from_raw_os_error(libc::EXDEV));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(io::Error::from_raw_os_error(libc::EXDEV))
            }
        }
    }
    let Component::Normal(n) = last else {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    };
    let fd = openat_nofollow(cur(&stack), n, access_flags(writable))?;
    Ok(File::from(fd))
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
    fn open_refuses_a_symlink_pointing_outside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("rel")).unwrap();
        let g = Gate::new().allow_backing(true).confine_to(&root);
        for name in ["abs", "rel"] {
            let e = g
                .open(Referral::Backing, &root.join("top"), name, false)
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Refused, "{name}: {e}");
        }
    }

    #[test]
    fn open_refuses_dot_dot_leaving_the_root_and_follows_it_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        std::fs::write(root.join("base"), b"base").unwrap();
        let g = Gate::new().allow_backing(true).confine_to(&root);
        let top = root.join("sub/top");
        let e = g
            .open(Referral::Backing, &top, "../../secret", false)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        let e = g
            .open(
                Referral::Backing,
                &top,
                &dir.path().join("secret").display().to_string(),
                false,
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        let o = g.open(Referral::Backing, &top, "../base", false).unwrap();
        assert_eq!(std::io::read_to_string(o.file).unwrap(), "base");
        assert_eq!(o.path, root.join("base").canonicalize().unwrap());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_during_opens_never_lets_one_escape() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("sub/base"), b"inside").unwrap();
        std::fs::write(outside.join("base"), b"outside").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (root, outside, stop) = (root.clone(), outside.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::fs::rename(root.join("sub"), root.join("real")).unwrap();
                    if n % 2 == 0 {
                        std::os::unix::fs::symlink(&outside, root.join("sub")).unwrap();
                    } else {
                        std::os::unix::fs::symlink("../outside", root.join("sub")).unwrap();
                    }
                    std::fs::remove_file(root.join("sub")).unwrap();
                    std::fs::rename(root.join("real"), root.join("sub")).unwrap();
                    n += 1;
                }
            })
        };
        let g = Gate::new().allow_backing(true).confine_to(&root);
        let top = root.join("top");
        let rootfd = open_dir(&root).unwrap();
        for _ in 0..2000 {
            // Whatever `sub` is at the moment, an open either reads the file inside or fails.
            match g.open(Referral::Backing, &top, "sub/base", false) {
                Ok(o) => assert_eq!(std::io::read_to_string(o.file).unwrap(), "inside"),
                Err(e) => assert!(
                    matches!(e.kind(), ErrorKind::Refused | ErrorKind::Io),
                    "{e}"
                ),
            }
            // The same through the component walk (the fallback without openat2).
            match walk_beneath(&rootfd, Path::new("sub/base"), false) {
                Ok(f) => assert_eq!(std::io::read_to_string(f).unwrap(), "inside"),
                Err(e) => assert!(
                    escaped(&e) || e.kind() == std::io::ErrorKind::NotFound,
                    "{e}"
                ),
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
    }

    #[test]
    fn the_component_walk_refuses_symlinks_and_dot_dot_above_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"f").unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        std::os::unix::fs::symlink("b/f", root.join("a/link")).unwrap();
        let fd = open_dir(&root).unwrap();
        let f = walk_beneath(&fd, Path::new("a/./b/../b/f"), false).unwrap();
        assert_eq!(std::io::read_to_string(f).unwrap(), "f");
        for bad in ["../secret", "a/../../secret", "up/secret", "a/link"] {
            let e = walk_beneath(&fd, Path::new(bad), false).unwrap_err();
            assert!(escaped(&e), "{bad}: {e}");
        }
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
