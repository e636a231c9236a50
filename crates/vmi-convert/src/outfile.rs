//! Host-file operations for installing outputs without leaving debris (Linux `open(2)` `O_TMPFILE`,
//! `linkat(2)`, `renameat2(2)` `RENAME_EXCHANGE`, `flock(2)`).
//!
//! - An output is first written to an **anonymous file** (`O_TMPFILE`) in the destination's folder
//!   where the filesystem supports it: if the process dies, the kernel frees it and no name is
//!   left behind. It is given a name (`linkat` through `/proc/self/fd`) only once it is complete.
//! - An existing destination is **replaced by exchanging** names (`RENAME_EXCHANGE`) and unlinking
//!   the old file afterwards, not by renaming over it: ext4 (`auto_da_alloc`) writes back the whole
//!   new file inside a `rename` that replaces a file, which costs seconds for a large image.
//! - Where a temporary **name** is needed anyway (filesystems without `O_TMPFILE`, images made of
//!   several files), it has the form `.NAME.vmi-tmp-<pid>-<n>` and its owner holds an exclusive
//!   `flock` on it for as long as it runs. [`remove_stale`] removes such names beside a destination
//!   when their owner is gone (no such process and the lock is free), so a run killed with
//!   `SIGKILL` leaves nothing the next run for the same destination does not clean up.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The marker between a destination's name and the owner's pid in temporary names.
const TEMP_MARK: &str = ".vmi-tmp-";

/// `.NAME.vmi-tmp-<pid>-<n>`.
pub fn temp_file_name(name: &OsStr, pid: u32, n: u64) -> OsString {
    let mut s = OsString::from(".");
    s.push(name);
    s.push(format!("{TEMP_MARK}{pid}-{n}"));
    s
}

/// The owner pid of a temporary name made by [`temp_file_name`] for destination `name`.
fn temp_owner(entry: &OsStr, name: &OsStr) -> Option<u32> {
    let rest = entry.as_bytes().strip_prefix(b".")?;
    let rest = rest.strip_prefix(name.as_bytes())?;
    let rest = rest.strip_prefix(TEMP_MARK.as_bytes())?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (pid, n) = rest.split_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// An anonymous read-write file in `dir` (`O_TMPFILE`), or `None` where the kernel or the
/// filesystem cannot make one (the caller then uses a temporary name).
pub fn anonymous_file(dir: &Path) -> Option<File> {
    let c = cpath(dir).ok()?;
    // SAFETY: open(2) with a NUL-terminated path that outlives the call; on success we own the
    // returned descriptor and hand it to File, which closes it.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o666 as libc::c_uint,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Some(unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) })
}

/// Give the anonymous file `f` the name `to` (fails with `AlreadyExists` when `to` exists).
pub fn link_anonymous(f: &File, to: &Path) -> io::Result<()> {
    let proc_path = cpath(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())))?;
    let c_to = cpath(to)?;
    // SAFETY: linkat(2) with NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOENT) {
        return Err(e);
    }
    // No /proc: AT_EMPTY_PATH links the descriptor itself (needs CAP_DAC_READ_SEARCH).
    let empty = c"";
    // SAFETY: as above; the empty path is a static NUL-terminated string.
    let r = unsafe {
        libc::linkat(
            f.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Atomically swap the names `a` and `b` (both must exist). `Ok(false)` when the filesystem or
/// kernel cannot (the caller falls back to `rename`).
pub fn exchange(a: &Path, b: &Path) -> io::Result<bool> {
    let (ca, cb) = (cpath(a)?, cpath(b)?);
    // SAFETY: renameat2(2) through syscall(2) with NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

/// Move `from` to `to`, replacing what is there. A regular file at `to` is replaced by exchanging
/// the two names and unlinking the old file (see the module documentation); anything else by
/// `rename`. Either way `to` names the old or the new file at every moment.
pub fn replace(from: &Path, to: &Path) -> io::Result<()> {
    let existing = std::fs::symlink_metadata(to).is_ok_and(|m| m.file_type().is_file());
    if existing && exchange(from, to)? {
        // `from` now names the old destination. Failing to remove it loses nothing: the next
        // run for this destination removes it once this process is gone.
        let _ = std::fs::remove_file(from);
        return Ok(());
    }
    std::fs::rename(from, to)
}

/// Make `dst` share all of `src`'s data blocks (`FICLONE`: a reflink on XFS, Btrfs, bcachefs, OCFS2
/// and NFS 4.2 servers that support it): no data is copied, holes stay holes. `Ok(false)` when the
/// filesystem cannot (ext4, tmpfs, different filesystems); `dst` is then unchanged.
pub fn clone_file(src: &File, dst: &File) -> io::Result<bool> {
    // SAFETY: ioctl(2) FICLONE takes the source descriptor as its integer argument; both
    // descriptors are open for the duration of the call and no memory is passed.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP)
        | Some(libc::ENOTTY)
        | Some(libc::EXDEV)
        | Some(libc::EINVAL)
        | Some(libc::ENOSYS)
        | Some(libc::EPERM)
        | Some(libc::EBADF) => Ok(false),
        _ => Err(e),
    }
}

/// Take an exclusive `flock` on `f` without waiting; `Ok(false)` when someone else holds a lock.
pub fn try_lock(f: &File) -> io::Result<bool> {
    // SAFETY: flock(2) on a descriptor we own; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Open `p` (a file or a folder) and lock it as its owner. Filesystems without `flock` still get
/// the handle: the pid in the name then decides alone.
pub fn own(p: &Path) -> io::Result<File> {
    let f = File::open(p)?;
    match try_lock(&f) {
        Ok(true) => Ok(f),
        Ok(false) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "another process holds the temporary file",
        )),
        Err(e) if e.raw_os_error() == Some(libc::ENOLCK) => Ok(f),
        Err(e) => Err(e),
    }
}

/// Whether a process with this pid exists (in this pid namespace).
fn alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks that the process exists; it sends nothing.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Remove the temporary names of earlier runs for destination `name` in `dir` whose owner is gone:
/// its pid names no process and nobody holds the lock on it. Returns what was removed. Errors are
/// ignored: a leftover that cannot be removed stays, as it would have without this call.
pub fn remove_stale(dir: &Path, name: &OsStr) -> Vec<PathBuf> {
    let me = std::process::id();
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let fname = entry.file_name();
        let Some(pid) = temp_owner(&fname, name) else {
            continue;
        };
        if pid == me || alive(pid) {
            continue;
        }
        let p = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if !(meta.is_file() || meta.is_dir()) {
            continue;
        }
        // A live owner in another pid namespace still holds its lock.
        match File::open(&p).and_then(|f| try_lock(&f)) {
            Ok(true) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOLCK) => {}
            _ => continue,
        }
        let gone = if meta.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if gone.is_ok() {
            removed.push(p);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The pid of a process that has exited (and been reaped).
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[test]
    fn temporary_names_parse_back_to_their_owner_and_other_names_do_not() {
        let name = OsStr::new("disk.qcow2");
        assert_eq!(temp_owner(&temp_file_name(name, 4242, 7), name), Some(4242));
        for other in [
            ".disk.qcow2.vmi-tmp-4242-",
            ".disk.qcow2.vmi-tmp-x-1",
            "disk.qcow2.vmi-tmp-4242-0",
            ".other.qcow2.vmi-tmp-4242-0",
            ".disk.qcow2",
        ] {
            assert_eq!(temp_owner(OsStr::new(other), name), None, "{other}");
        }
    }

    #[test]
    fn leftovers_of_dead_owners_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let name = OsStr::new("out.qcow2");
        let dead = dead_pid();
        let stale_file = dir.path().join(temp_file_name(name, dead, 0));
        std::fs::write(&stale_file, "partial").unwrap();
        let stale_dir = dir.path().join(temp_file_name(name, dead, 1));
        std::fs::create_dir(&stale_dir).unwrap();
        std::fs::write(stale_dir.join("out.qcow2"), "x").unwrap();
        // Ours (this process is alive), and a dead pid whose lock is still held (an owner in
        // another pid namespace).
        let mine = dir.path().join(temp_file_name(name, std::process::id(), 2));
        std::fs::write(&mine, "in progress").unwrap();
        let held = dir.path().join(temp_file_name(name, dead, 3));
        std::fs::write(&held, "in progress elsewhere").unwrap();
        let lock = own(&held).unwrap();
        // Another destination's leftovers are not this run's business.
        let other = dir
            .path()
            .join(temp_file_name(OsStr::new("b.raw"), dead, 0));
        std::fs::write(&other, "").unwrap();

        let mut removed = remove_stale(dir.path(), name);
        removed.sort();
        let mut want = vec![stale_file, stale_dir];
        want.sort();
        assert_eq!(removed, want);
        assert!(mine.exists() && held.exists() && other.exists());
        drop(lock);
        assert_eq!(remove_stale(dir.path(), name), vec![held]);
    }

    #[test]
    fn an_anonymous_file_gets_its_name_only_when_linked() {
        let dir = tempfile::tempdir().unwrap();
        let Some(mut f) = anonymous_file(dir.path()) else {
            // The filesystem of the temporary folder has no O_TMPFILE: nothing to test here.
            return;
        };
        f.write_all(b"complete").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let to = dir.path().join("img");
        link_anonymous(&f, &to).unwrap();
        let mut s = String::new();
        File::open(&to).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "complete");
        let e = link_anonymous(&f, &to).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn replacing_an_existing_file_leaves_only_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join(".new"), dir.path().join("img"));
        std::fs::write(&from, "new").unwrap();
        std::fs::write(&to, "old").unwrap();
        replace(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "new");
        assert!(!from.exists());
        // And into a free name.
        std::fs::write(&from, "newer").unwrap();
        std::fs::remove_file(&to).unwrap();
        replace(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "newer");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_clone_either_copies_everything_or_leaves_the_target_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let body: Vec<u8> = (0..3 * 65536u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&a, &body).unwrap();
        let src = File::open(&a).unwrap();
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&b)
            .unwrap();
        if clone_file(&src, &dst).unwrap() {
            assert_eq!(std::fs::read(&b).unwrap(), body);
        } else {
            assert_eq!(std::fs::metadata(&b).unwrap().len(), 0);
        }
    }

    #[test]
    fn a_folder_is_never_exchanged_for_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join(".new"), dir.path().join("img"));
        std::fs::write(&from, "new").unwrap();
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join("keep"), "").unwrap();
        assert!(replace(&from, &to).is_err());
        assert!(to.join("keep").exists());
        assert_eq!(std::fs::read_to_string(&from).unwrap(), "new");
    }
}
