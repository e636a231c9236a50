//! Image locking compatible with QEMU's (`block/file-posix.c`: `raw_apply_lock_bytes`,
//! `raw_check_lock_bytes`): open-file-description byte-range locks (`F_OFD_SETLK`, Linux 3.15+)
//! on single bytes of the image file.
//!
//! QEMU knows four permissions: consistent read (bit 0), write (1), write unchanged (2) and
//! resize (3). A process that holds permission *X* takes a shared lock on byte `100 + X`; one
//! that does not let others have *X* takes a shared lock on byte `200 + X`. Before it uses the
//! image it tests, with an exclusive `F_OFD_GETLK`, that nobody else holds byte `200 + X` for a
//! permission it wants, nor byte `100 + X` for one it refuses to share. All locks being shared,
//! two processes that race both see each other and at least one fails. vmi takes what qemu-img
//! takes: read-only opens hold *consistent read* and share neither *write* nor *resize*; writable
//! opens also hold *write* and *resize*. `-U` (`force-share`) opens take no locks.
//!
//! OFD locks of two open file descriptions conflict even inside one process, so every image file
//! a process opens is locked through one description per file (the first opener's, kept by a
//! `dup`), holding the union of what this process's openers need: vmi never refuses itself, as
//! QEMU's permission system never does within one process.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// First byte of the "holds permission" locks (QEMU's `RAW_LOCK_PERM_BASE`).
const PERM_BASE: i64 = 100;
/// First byte of the "does not share permission" locks (QEMU's `RAW_LOCK_SHARED_BASE`).
const SHARED_BASE: i64 = 200;
/// QEMU's permission names by bit (`BLK_PERM_*`, qemu 6.1 and later).
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// Consistent read (bit 0).
const READ: u8 = 1 << 0;
/// Write (bit 1).
const WRITE: u8 = 1 << 1;
/// Resize (bit 3).
const RESIZE: u8 = 1 << 3;

/// What one opener holds and refuses to share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Perms {
    held: u8,
    unshared: u8,
}

impl Perms {
    fn for_open(writable: bool) -> Perms {
        Perms {
            held: if writable {
                READ | WRITE | RESIZE
            } else {
                READ
            },
            unshared: WRITE | RESIZE,
        }
    }

    fn union(list: &[(u64, Perms)]) -> Perms {
        list.iter().fold(Perms::default(), |a, (_, p)| Perms {
            held: a.held | p.held,
            unshared: a.unshared | p.unshared,
        })
    }
}

/// The locking description of one file and its openers in this process.
#[derive(Debug)]
struct Entry {
    file: File,
    openers: Vec<(u64, Perms)>,
}

#[derive(Debug, Default)]
struct Registry {
    files: HashMap<(u64, u64), Entry>,
    next_id: u64,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Registry::default()))
}

/// The locks one opener holds; dropping it gives them back.
#[derive(Debug)]
pub struct ImageLock {
    key: (u64, u64),
    id: u64,
}

/// Why locking failed: another process holds a conflicting lock (the message is QEMU's), or the
/// system call failed.
pub(crate) fn conflict(path: &Path, shared: bool, perm: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "Failed to get {}\"{perm}\" lock: Is another process using the image [{}]?",
            if shared { "shared " } else { "" },
            path.display()
        ),
    )
}

/// One OFD lock call on byte `at`: `F_RDLCK` to take, `F_UNLCK` to drop (`F_OFD_SETLK`), or a
/// test for an exclusive lock (`F_OFD_GETLK`, true when someone else holds the byte).
fn ofd(file: &File, cmd: libc::c_int, kind: libc::c_int, at: i64) -> io::Result<bool> {
    // SAFETY: `flock` is plain old data; all-zero is a valid value that is filled in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = at;
    fl.l_len = 1;
    fl.l_pid = 0;
    // SAFETY: fcntl with an OFD lock command reads and (for GETLK) writes the `flock` we own, on
    // a descriptor we own.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Make `file`'s lock bytes say `want` (taking and dropping bytes relative to `had`), then test
/// for other processes' conflicting locks (QEMU's apply-then-check order).
fn apply(file: &File, path: &Path, had: Perms, want: Perms) -> io::Result<()> {
    for bit in 0..PERM_NAMES.len() {
        let m = 1u8 << bit;
        for (set, base) in [(want.held, PERM_BASE), (want.unshared, SHARED_BASE)] {
            let old = if base == PERM_BASE {
                had.held
            } else {
                had.unshared
            };
            if set & m != 0 {
                ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, base + bit as i64)?;
            } else if old & m != 0 {
                ofd(file, libc::F_OFD_SETLK, libc::F_UNLCK, base + bit as i64)?;
            }
        }
    }
    for (bit, name) in PERM_NAMES.iter().enumerate() {
        let m = 1u8 << bit;
        if want.held & m != 0
            && ofd(
                file,
                libc::F_OFD_GETLK,
                libc::F_WRLCK,
                SHARED_BASE + bit as i64,
            )?
        {
            return Err(conflict(path, false, name));
        }
        if want.unshared & m != 0
            && ofd(
                file,
                libc::F_OFD_GETLK,
                libc::F_WRLCK,
                PERM_BASE + bit as i64,
            )?
        {
            return Err(conflict(path, true, name));
        }
    }
    Ok(())
}

/// Whether an error means the file system offers no OFD locks (then, as QEMU's `locking=auto`,
/// the image is used unlocked).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Take QEMU's locks on the image `file` (at `path`, for messages) for a read-only or writable
/// open. `Ok(None)` when the file system has no OFD locks.
pub fn lock_image(file: &File, path: &Path, writable: bool) -> io::Result<Option<ImageLock>> {
    let meta = file.metadata()?;
    let key = (meta.dev(), meta.ino());
    let mine = Perms::for_open(writable);
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    let id = reg.next_id;
    reg.next_id += 1;
    let fresh = !reg.files.contains_key(&key);
    if fresh {
        let dup = file.try_clone()?;
        reg.files.insert(
            key,
            Entry {
                file: dup,
                openers: Vec::new(),
            },
        );
    }
    let Some(entry) = reg.files.get_mut(&key) else {
        return Ok(None);
    };
    let had = Perms::union(&entry.openers);
    entry.openers.push((id, mine));
    let want = Perms::union(&entry.openers);
    match apply(&entry.file, path, had, want) {
        Ok(()) => Ok(Some(ImageLock { key, id })),
        Err(e) => {
            entry.openers.pop();
            // Back to what the other openers hold (best effort: the error is what matters).
            let _ = apply_quiet(&entry.file, want, had);
            if fresh || entry.openers.is_empty() {
                reg.files.remove(&key);
            }
            if unsupported(&e) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// Set the lock bytes without testing for conflicts (when giving locks back).
fn apply_quiet(file: &File, had: Perms, want: Perms) -> io::Result<()> {
    for bit in 0..PERM_NAMES.len() {
        let m = 1u8 << bit;
        for (set, old, base) in [
            (want.held, had.held, PERM_BASE),
            (want.unshared, had.unshared, SHARED_BASE),
        ] {
            if set & m != 0 && old & m == 0 {
                ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, base + bit as i64)?;
            } else if set & m == 0 && old & m != 0 {
                ofd(file, libc::F_OFD_SETLK, libc::F_UNLCK, base + bit as i64)?;
            }
        }
    }
    Ok(())
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = reg.files.get_mut(&self.key) else {
            return;
        };
        let had = Perms::union(&entry.openers);
        entry.openers.retain(|(id, _)| *id != self.id);
        if entry.openers.is_empty() {
            // Closing the last descriptor of the description drops all its locks.
            reg.files.remove(&self.key);
            return;
        }
        let want = Perms::union(&entry.openers);
        let _ = apply_quiet(&entry.file, had, want);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_may_open_an_image_for_reading_and_writing_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let a = File::open(&p).unwrap();
        let b = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let ra = lock_image(&a, &p, false).unwrap();
        let rb = lock_image(&b, &p, true).unwrap();
        drop(ra);
        drop(rb);
        assert!(registry().lock().unwrap().files.is_empty());
    }

    #[test]
    fn the_conflict_message_is_qemus() {
        let e = conflict(Path::new("a.qcow2"), false, "write");
        assert_eq!(
            e.to_string(),
            "Failed to get \"write\" lock: Is another process using the image [a.qcow2]?"
        );
    }
}
