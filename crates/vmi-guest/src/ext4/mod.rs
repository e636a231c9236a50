//! ext2/3/4 read and write through libext2fs, the library e2fsprogs (`e2fsck`, `debugfs`,
//! `mke2fs -d`) is built on, driven through its `io_manager` interface with a vmi [`Volume`] as
//! the block device: the filesystem inside a qcow2, VMDK or VHDX partition is read and changed in
//! process, without a loop device, FUSE or root.
//!
//! Bindings: hand-written `extern "C"` declarations for the functions used (`sys.rs`) plus a small C
//! shim (`shim.c`) that defines the io_manager and reads `ext2_filsys` fields, so that no
//! libext2fs-private structure layout is transcribed by hand (see `sys.rs` for why not bindgen).
//!
//! Journal: like `debugfs -w`, writes go straight to the filesystem, not through the journal; a
//! filesystem whose journal needs recovery (not cleanly unmounted) is refused with a message, as
//! e2fsprogs' tools refuse to write it before `e2fsck` replays the journal.
//!
//! Guest paths are resolved by libext2fs inside the filesystem (`ext2fs_namei` from the root
//! inode: an absolute symlink points inside the guest, never at the host; nesting is bounded by
//! libext2fs). Callbacks from C never unwind: each catches panics and returns an error code.

mod sys;

use crate::error::{Error, Result};
use crate::volume::Volume;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The ext2 superblock magic, at byte 56 of the superblock (which is at byte 1024).
const EXT2_MAGIC: u16 = 0xEF53;
/// Bytes copied per libext2fs file read/write call.
const IO_CHUNK: usize = 1 << 20;
/// Deepest directory tree [`Ext4::remove_tree`] descends.
pub const MAX_TREE_DEPTH: usize = 64;
/// Most entries one [`Ext4::read_dir`] returns (a directory with more is hostile or unusual).
pub const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Bits of block bitmap read per call when listing free ranges.
const BITMAP_CHUNK_BITS: u32 = 1 << 18;

const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const S_IFLNK: u16 = 0o120000;

/// True when the volume holds an ext2/3/4 superblock.
pub fn probe(vol: &Volume<'_>) -> bool {
    let mut b = [0u8; 2];
    vol.len() >= 2048
        && vol.read_at(&mut b, 1024 + 56).is_ok()
        && u16::from_le_bytes(b) == EXT2_MAGIC
}

// The three callbacks shim.c's io channel makes. `volume` is the `Volume` an `Ext4` keeps boxed
// and alive for as long as libext2fs may call.

/// Read for the io channel.
#[no_mangle]
extern "C" fn vmi_guest_volume_read(
    volume: *mut c_void,
    offset: u64,
    len: usize,
    buf: *mut u8,
) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        if volume.is_null() || buf.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: `volume` is the `Box<Volume>` pointer Ext4::open passed to vmi_ext2_open; the
        // box outlives the ext2_filsys (closed in Ext4::close/drop before the box is freed).
        let vol = unsafe { &*(volume as *const Volume<'_>) };
        // SAFETY: libext2fs passes a buffer of at least `len` bytes for the request.
        let out = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        match vol.read_at(out, offset) {
            Ok(()) => 0,
            Err(_) => libc::EIO,
        }
    }))
    .unwrap_or(libc::EIO)
}

/// Write for the io channel.
#[no_mangle]
extern "C" fn vmi_guest_volume_write(
    volume: *mut c_void,
    offset: u64,
    len: usize,
    buf: *const u8,
) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        if volume.is_null() || buf.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: as in vmi_guest_volume_read.
        let vol = unsafe { &*(volume as *const Volume<'_>) };
        // SAFETY: libext2fs passes `len` readable bytes.
        let data = unsafe { std::slice::from_raw_parts(buf, len) };
        match vol.write_at(data, offset) {
            Ok(()) => 0,
            Err(_) => libc::EIO,
        }
    }))
    .unwrap_or(libc::EIO)
}

/// Flush for the io channel.
#[no_mangle]
extern "C" fn vmi_guest_volume_flush(volume: *mut c_void) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        if volume.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: as in vmi_guest_volume_read.
        let vol = unsafe { &*(volume as *const Volume<'_>) };
        match vol.flush() {
            Ok(()) => 0,
            Err(_) => libc::EIO,
        }
    }))
    .unwrap_or(libc::EIO)
}

/// libext2fs's message for an error code.
fn message(code: sys::Errcode) -> String {
    if code == sys::VMI_EXT2_UNAVAILABLE {
        return "this vmi was built without e2fsprogs' headers; install libext2fs-dev and \
                rebuild to read and write ext2/3/4 filesystems"
            .into();
    }
    // SAFETY: error_message returns a pointer to a static (or thread-local) NUL-terminated string
    // for any code.
    let p = unsafe { sys::error_message(code) };
    if p.is_null() {
        return format!("error {code}");
    }
    // SAFETY: non-null and NUL-terminated, per com_err.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn check(code: sys::Errcode, op: impl FnOnce() -> String) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Ext2 {
            op: op(),
            message: message(code),
            code,
        })
    }
}

/// The kind of a directory entry or inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Device, FIFO or socket.
    Other,
}

impl FileKind {
    fn of_mode(mode: u16) -> Self {
        match mode & S_IFMT {
            S_IFREG => FileKind::File,
            S_IFDIR => FileKind::Dir,
            S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }
}

/// What `stat` says about a guest file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stat {
    /// Inode number.
    pub ino: u32,
    /// The kind.
    pub kind: FileKind,
    /// Permission bits (and setuid/setgid/sticky).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (seconds since the epoch).
    pub mtime: u32,
    /// Hard links.
    pub links: u16,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirEntry {
    /// The name (guest bytes, lossily decoded).
    pub name: String,
    /// Inode number.
    pub ino: u32,
}

/// Who owns a new file, and its permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    /// Permission bits.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl Attrs {
    /// `perm`, owned by root.
    pub fn root(perm: u32) -> Self {
        Attrs {
            perm,
            uid: 0,
            gid: 0,
        }
    }
}

/// An open ext2/3/4 filesystem on a volume.
pub struct Ext4<'v> {
    fs: sys::Filsys,
    // Boxed so its address, handed to libext2fs, stays fixed; must outlive `fs`.
    volume: Box<Volume<'v>>,
    writable: bool,
}

impl std::fmt::Debug for Ext4<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ext4")
            .field("volume", &self.volume)
            .field("writable", &self.writable)
            .finish()
    }
}

fn now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

fn cpath(path: &str) -> Result<CString> {
    if !path.starts_with('/') {
        return Err(Error::Usage(format!(
            "{path}: guest paths must be absolute"
        )));
    }
    CString::new(path).map_err(|_| Error::Usage(format!("{path:?}: NUL byte in a guest path")))
}

/// Split an absolute guest path into its parent and final name.
pub fn split_path(path: &str) -> Result<(&str, &str)> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = trimmed
        .rsplit_once('/')
        .ok_or_else(|| Error::Usage(format!("{path}: guest paths must be absolute")))?;
    if name.is_empty() || name == "." || name == ".." || name.len() > 255 {
        return Err(Error::Usage(format!("{path}: not a file name")));
    }
    Ok((if parent.is_empty() { "/" } else { parent }, name))
}

impl<'v> Ext4<'v> {
    /// Open the filesystem on `volume`, read-only or for writing.
    pub fn open(volume: Volume<'v>, writable: bool) -> Result<Self> {
        if !probe(&volume) {
            return Err(Error::Unsupported(
                "the volume holds no ext2/3/4 filesystem".into(),
            ));
        }
        let volume = Box::new(volume);
        let mut fs: sys::Filsys = std::ptr::null_mut();
        let vp = &*volume as *const Volume<'v> as *mut c_void;
        // SAFETY: `vp` points at the boxed volume, which `Ext4` owns and frees only after the
        // filesystem is closed; `fs` is a valid out-pointer.
        let rc = unsafe { sys::vmi_ext2_open(vp, c_int::from(writable), &mut fs) };
        check(rc, || "opening the ext2/3/4 filesystem".into())?;
        let me = Ext4 {
            fs,
            volume,
            writable,
        };
        // SAFETY: `fs` is open.
        if unsafe { sys::vmi_ext2_needs_recovery(me.fs) } != 0 {
            return Err(Error::Unsupported(
                "the ext4 journal needs recovery (the filesystem was not cleanly unmounted); \
                 replay it with `e2fsck -fy` (or boot the guest once) first"
                    .into(),
            ));
        }
        // SAFETY: `fs` is open.
        check(unsafe { sys::ext2fs_read_bitmaps(me.fs) }, || {
            "reading the allocation bitmaps".into()
        })?;
        Ok(me)
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        // SAFETY: `fs` is open for the life of self.
        u64::from(unsafe { sys::vmi_ext2_blocksize(self.fs) })
    }

    /// Total blocks.
    pub fn blocks_count(&self) -> u64 {
        // SAFETY: `fs` is open.
        unsafe { sys::vmi_ext2_blocks_count(self.fs) }
    }

    /// Free blocks, as the superblock counts them.
    pub fn free_blocks(&self) -> u64 {
        // SAFETY: `fs` is open.
        unsafe { sys::vmi_ext2_free_blocks_count(self.fs) }
    }

    /// Volume label and UUID.
    pub fn label_uuid(&self) -> (String, String) {
        let mut label = [0 as c_char; 17];
        let mut uuid = [0u8; 16];
        // SAFETY: buffers of the sizes the shim writes (17 and 16 bytes).
        unsafe { sys::vmi_ext2_label_uuid(self.fs, label.as_mut_ptr(), uuid.as_mut_ptr()) };
        // SAFETY: the shim NUL-terminates label[16].
        let l = unsafe { CStr::from_ptr(label.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        (l, uuid::Uuid::from_bytes(uuid).hyphenated().to_string())
    }

    fn need_write(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::Usage("the filesystem is open read-only".into()))
        }
    }

    /// The inode at `path` (a final symlink is not followed).
    pub fn lookup(&self, path: &str) -> Result<u32> {
        let c = cpath(path)?;
        let mut ino: sys::Ino = 0;
        // SAFETY: `fs` is open, `c` is NUL-terminated, `ino` a valid out-pointer.
        let rc = unsafe {
            sys::ext2fs_namei(self.fs, sys::ROOT_INO, sys::ROOT_INO, c.as_ptr(), &mut ino)
        };
        if rc == sys::ET_FILE_NOT_FOUND {
            return Err(Error::NotFound(path.to_string()));
        }
        check(rc, || format!("looking up {path}"))?;
        Ok(ino)
    }

    /// The inode at `path`, following a final symlink (inside the guest; nesting bounded by
    /// libext2fs).
    pub fn lookup_follow(&self, path: &str) -> Result<u32> {
        let c = cpath(path)?;
        let mut ino: sys::Ino = 0;
        // SAFETY: `fs` is open, `c` is NUL-terminated, `ino` a valid out-pointer.
        let rc = unsafe {
            sys::ext2fs_namei_follow(self.fs, sys::ROOT_INO, sys::ROOT_INO, c.as_ptr(), &mut ino)
        };
        if rc == sys::ET_FILE_NOT_FOUND {
            return Err(Error::NotFound(path.to_string()));
        }
        check(rc, || format!("looking up {path}"))?;
        Ok(ino)
    }

    /// Facts about `path`, following a final symlink.
    pub fn stat_follow(&self, path: &str) -> Result<Stat> {
        let ino = self.lookup_follow(path)?;
        Ok(Self::stat_inode(ino, &self.read_inode(ino)?))
    }

    /// Whether `path` exists (a dangling final symlink exists).
    pub fn exists(&self, path: &str) -> Result<bool> {
        match self.lookup(path) {
            Ok(_) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn read_inode(&self, ino: u32) -> Result<sys::Inode> {
        let mut inode = sys::Inode::default();
        check(
            // SAFETY: `fs` is open; `inode` is a 128-byte struct ext2_inode.
            unsafe { sys::ext2fs_read_inode(self.fs, ino, &mut inode) },
            || format!("reading inode {ino}"),
        )?;
        Ok(inode)
    }

    fn write_inode(&self, ino: u32, inode: &mut sys::Inode) -> Result<()> {
        // SAFETY: `fs` is open; `inode` is a valid struct ext2_inode.
        check(
            unsafe { sys::ext2fs_write_inode(self.fs, ino, inode) },
            || format!("writing inode {ino}"),
        )
    }

    fn stat_inode(ino: u32, i: &sys::Inode) -> Stat {
        Stat {
            ino,
            kind: FileKind::of_mode(i.i_mode),
            perm: u32::from(i.i_mode & 0o7777),
            uid: u32::from(i.i_uid) | (u32::from(i.l_i_uid_high) << 16),
            gid: u32::from(i.i_gid) | (u32::from(i.l_i_gid_high) << 16),
            size: u64::from(i.i_size) | (u64::from(i.i_size_high) << 32),
            mtime: i.i_mtime,
            links: i.i_links_count,
        }
    }

    /// Facts about `path` (not following a final symlink).
    pub fn stat(&self, path: &str) -> Result<Stat> {
        let ino = self.lookup(path)?;
        Ok(Self::stat_inode(ino, &self.read_inode(ino)?))
    }

    /// The entries of the directory at `path`, without `.` and `..`.
    pub fn read_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        let ino = self.lookup(path)?;
        if FileKind::of_mode(self.read_inode(ino)?.i_mode) != FileKind::Dir {
            return Err(Error::Usage(format!("{path}: not a directory")));
        }
        struct Acc {
            out: Vec<DirEntry>,
            overflow: bool,
        }
        unsafe extern "C" fn cb(
            _dir: sys::Ino,
            _entry: c_int,
            dirent: *mut sys::DirEntry,
            _offset: c_int,
            _blocksize: c_int,
            _buf: *mut c_char,
            priv_data: *mut c_void,
        ) -> c_int {
            const DIRENT_ABORT: c_int = 2;
            catch_unwind(AssertUnwindSafe(|| {
                // SAFETY: priv_data is the &mut Acc passed to ext2fs_dir_iterate2 below, alive
                // for the duration of the call; dirent points at a live entry in libext2fs's
                // block buffer.
                let (acc, d) = unsafe { (&mut *(priv_data as *mut Acc), &*dirent) };
                let len = usize::from(d.name_len & 0xff);
                let name = &d.name[..len];
                if name == b"." || name == b".." || d.inode == 0 {
                    return 0;
                }
                if acc.out.len() >= MAX_DIR_ENTRIES {
                    acc.overflow = true;
                    return DIRENT_ABORT;
                }
                acc.out.push(DirEntry {
                    name: String::from_utf8_lossy(name).into_owned(),
                    ino: d.inode,
                });
                0
            }))
            .unwrap_or(DIRENT_ABORT)
        }
        let mut acc = Acc {
            out: Vec::new(),
            overflow: false,
        };
        // SAFETY: `fs` is open; `cb` matches the callback type and `acc` outlives the call.
        let rc = unsafe {
            sys::ext2fs_dir_iterate2(
                self.fs,
                ino,
                0,
                std::ptr::null_mut(),
                cb,
                &mut acc as *mut Acc as *mut c_void,
            )
        };
        check(rc, || format!("reading directory {path}"))?;
        if acc.overflow {
            return Err(Error::Unsupported(format!(
                "{path}: more than {MAX_DIR_ENTRIES} entries"
            )));
        }
        Ok(acc.out)
    }

    /// Stream the contents of the regular file at `path` (following symlinks) into `out`;
    /// returns the bytes copied.
    pub fn read_file(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let ino = self.lookup_follow(path)?;
        let inode = self.read_inode(ino)?;
        if FileKind::of_mode(inode.i_mode) != FileKind::File {
            return Err(Error::Usage(format!("{path}: not a regular file")));
        }
        self.copy_out(ino, path, out, u64::MAX)
    }

    /// The contents of the regular file at `path` (following symlinks), at most `max` bytes
    /// (more is an error).
    pub fn read_to_vec(&self, path: &str, max: u64) -> Result<Vec<u8>> {
        let st = self.stat_follow(path)?;
        if st.kind != FileKind::File {
            return Err(Error::Usage(format!("{path}: not a regular file")));
        }
        if st.size > max {
            return Err(Error::Unsupported(format!(
                "{path}: {} bytes, more than the {max} read here",
                st.size
            )));
        }
        let mut v = Vec::new();
        self.copy_out(st.ino, path, &mut v, max)?;
        Ok(v)
    }

    fn copy_out(&self, ino: u32, path: &str, out: &mut dyn Write, max: u64) -> Result<u64> {
        let mut file: sys::File = std::ptr::null_mut();
        check(
            // SAFETY: `fs` is open; `file` is a valid out-pointer.
            unsafe { sys::ext2fs_file_open(self.fs, ino, 0, &mut file) },
            || format!("opening {path}"),
        )?;
        let guard = FileGuard(file);
        let mut buf = vec![0u8; IO_CHUNK];
        let mut total = 0u64;
        loop {
            let mut got: c_uint = 0;
            // SAFETY: `file` is open; `buf` has IO_CHUNK writable bytes.
            let rc = unsafe {
                sys::ext2fs_file_read(
                    guard.0,
                    buf.as_mut_ptr() as *mut c_void,
                    IO_CHUNK as c_uint,
                    &mut got,
                )
            };
            check(rc, || format!("reading {path}"))?;
            let n = (got as usize).min(IO_CHUNK);
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > max {
                return Err(Error::Unsupported(format!(
                    "{path}: longer than {max} bytes"
                )));
            }
            out.write_all(&buf[..n])
                .map_err(|e| Error::io(format!("copying {path}"), e))?;
        }
        guard.close(path)?;
        Ok(total)
    }

    /// The target of the symlink at `path`.
    pub fn readlink(&self, path: &str) -> Result<String> {
        let ino = self.lookup(path)?;
        let mut inode = self.read_inode(ino)?;
        if FileKind::of_mode(inode.i_mode) != FileKind::Symlink {
            return Err(Error::Usage(format!("{path}: not a symbolic link")));
        }
        let size = (u64::from(inode.i_size) | (u64::from(inode.i_size_high) << 32)).min(4096);
        // SAFETY: `inode` is a valid struct ext2_inode.
        let fast = unsafe { sys::ext2fs_is_fast_symlink(&mut inode) } != 0;
        let bytes = if fast {
            let raw: Vec<u8> = inode.i_block.iter().flat_map(|w| w.to_le_bytes()).collect();
            raw[..(size as usize).min(raw.len())].to_vec()
        } else {
            let mut v = Vec::new();
            self.copy_out(ino, path, &mut v, 4096)?;
            v.truncate(size as usize);
            v
        };
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn parent_ino(&self, path: &str) -> Result<(u32, String)> {
        let (parent, name) = split_path(path)?;
        let pino = self.lookup(parent)?;
        if FileKind::of_mode(self.read_inode(pino)?.i_mode) != FileKind::Dir {
            return Err(Error::Usage(format!("{parent}: not a directory")));
        }
        Ok((pino, name.to_string()))
    }

    fn link(&self, dir: u32, name: &CStr, ino: u32, ft: c_int, path: &str) -> Result<()> {
        // SAFETY: `fs` is open; `name` is NUL-terminated.
        let mut rc = unsafe { sys::ext2fs_link(self.fs, dir, name.as_ptr(), ino, ft) };
        if rc == sys::ET_DIR_NO_SPACE {
            // SAFETY: `fs` is open.
            check(unsafe { sys::ext2fs_expand_dir(self.fs, dir) }, || {
                format!("growing the directory of {path}")
            })?;
            // SAFETY: as above.
            rc = unsafe { sys::ext2fs_link(self.fs, dir, name.as_ptr(), ino, ft) };
        }
        check(rc, || format!("linking {path}"))
    }

    /// Write `data` to the regular file at `path`: a new file gets `attrs`; an existing one is
    /// replaced and keeps its mode and owner unless `attrs` is given.
    pub fn write_file(&self, path: &str, data: &mut dyn Read, attrs: Option<Attrs>) -> Result<()> {
        self.need_write()?;
        let attrs = match self.stat(path) {
            Ok(st) if st.kind == FileKind::File => {
                let keep = Attrs {
                    perm: st.perm,
                    uid: st.uid,
                    gid: st.gid,
                };
                self.unlink(path)?;
                attrs.unwrap_or(keep)
            }
            Ok(_) => {
                return Err(Error::Usage(format!(
                    "{path}: exists and is not a regular file"
                )))
            }
            Err(Error::NotFound(_)) => attrs.unwrap_or(Attrs::root(0o644)),
            Err(e) => return Err(e),
        };
        let (dir, name) = self.parent_ino(path)?;
        let cname = CString::new(name).map_err(|_| Error::Usage("NUL in name".into()))?;
        let mut ino: sys::Ino = 0;
        check(
            // SAFETY: `fs` is open; `ino` is a valid out-pointer; a null map means the fs's own.
            unsafe {
                sys::ext2fs_new_inode(self.fs, dir, 0o100644, std::ptr::null_mut(), &mut ino)
            },
            || format!("allocating an inode for {path}"),
        )?;
        self.link(dir, &cname, ino, sys::FT_REG_FILE, path)?;
        // SAFETY: `fs` is open; `ino` was just allocated.
        unsafe { sys::ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0) };
        let t = now();
        let mut inode = sys::Inode {
            i_mode: S_IFREG | (attrs.perm & 0o7777) as u16,
            i_uid: attrs.uid as u16,
            l_i_uid_high: (attrs.uid >> 16) as u16,
            i_gid: attrs.gid as u16,
            l_i_gid_high: (attrs.gid >> 16) as u16,
            i_atime: t,
            i_ctime: t,
            i_mtime: t,
            i_links_count: 1,
            ..Default::default()
        };
        // SAFETY: `fs` is open.
        let inline = unsafe { sys::vmi_ext2_has_inline_data(self.fs) } != 0;
        // SAFETY: `fs` is open.
        let extents = unsafe { sys::vmi_ext2_has_extents(self.fs) } != 0;
        if inline {
            inode.i_flags |= sys::INLINE_DATA_FL;
        } else if extents {
            let mut handle: *mut c_void = std::ptr::null_mut();
            check(
                // SAFETY: `fs` is open; `inode` is valid; opening an extent handle on an inode
                // without EXTENTS_FL initialises its extent header in i_block (as mke2fs -d does).
                unsafe { sys::ext2fs_extent_open2(self.fs, ino, &mut inode, &mut handle) },
                || format!("initialising the extent tree of {path}"),
            )?;
            // SAFETY: `handle` came from ext2fs_extent_open2.
            unsafe { sys::ext2fs_extent_free(handle) };
        }
        check(
            // SAFETY: `fs` is open; `inode` is valid.
            unsafe { sys::ext2fs_write_new_inode(self.fs, ino, &mut inode) },
            || format!("writing the inode of {path}"),
        )?;
        if inline {
            check(
                // SAFETY: `fs` is open; the inode has INLINE_DATA_FL.
                unsafe { sys::ext2fs_inline_data_init(self.fs, ino) },
                || format!("initialising inline data of {path}"),
            )?;
        }
        let mut file: sys::File = std::ptr::null_mut();
        check(
            // SAFETY: `fs` is open; `file` is a valid out-pointer.
            unsafe { sys::ext2fs_file_open(self.fs, ino, sys::FILE_WRITE, &mut file) },
            || format!("opening {path} for writing"),
        )?;
        let guard = FileGuard(file);
        let mut buf = vec![0u8; IO_CHUNK];
        loop {
            let n = data
                .read(&mut buf)
                .map_err(|e| Error::io(format!("reading the data for {path}"), e))?;
            if n == 0 {
                break;
            }
            let mut done = 0;
            while done < n {
                let mut written: c_uint = 0;
                // SAFETY: `file` is open for writing; `buf[done..n]` is readable.
                let rc = unsafe {
                    sys::ext2fs_file_write(
                        guard.0,
                        buf[done..n].as_ptr() as *const c_void,
                        (n - done) as c_uint,
                        &mut written,
                    )
                };
                check(rc, || format!("writing {path}"))?;
                if written == 0 {
                    return Err(Error::Unsupported(format!("{path}: short write")));
                }
                done += written as usize;
            }
        }
        guard.close(path)
    }

    /// Set the length of the regular file at `path` to zero (freeing its blocks).
    pub fn truncate(&self, path: &str) -> Result<()> {
        self.need_write()?;
        let st = self.stat(path)?;
        if st.kind != FileKind::File {
            return Err(Error::Usage(format!("{path}: not a regular file")));
        }
        let mut file: sys::File = std::ptr::null_mut();
        check(
            // SAFETY: `fs` is open; `file` is a valid out-pointer.
            unsafe { sys::ext2fs_file_open(self.fs, st.ino, sys::FILE_WRITE, &mut file) },
            || format!("opening {path} for writing"),
        )?;
        let guard = FileGuard(file);
        // SAFETY: `file` is open for writing.
        check(unsafe { sys::ext2fs_file_set_size2(guard.0, 0) }, || {
            format!("truncating {path}")
        })?;
        guard.close(path)
    }

    /// Create the directory `path`.
    pub fn mkdir(&self, path: &str, attrs: Attrs) -> Result<()> {
        self.need_write()?;
        let (dir, name) = self.parent_ino(path)?;
        let cname = CString::new(name).map_err(|_| Error::Usage("NUL in name".into()))?;
        // SAFETY: `fs` is open; `cname` NUL-terminated; inum 0 lets libext2fs allocate.
        let mut rc = unsafe { sys::ext2fs_mkdir(self.fs, dir, 0, cname.as_ptr()) };
        if rc == sys::ET_DIR_NO_SPACE {
            // SAFETY: `fs` is open.
            check(unsafe { sys::ext2fs_expand_dir(self.fs, dir) }, || {
                format!("growing the parent of {path}")
            })?;
            // SAFETY: as above.
            rc = unsafe { sys::ext2fs_mkdir(self.fs, dir, 0, cname.as_ptr()) };
        }
        check(rc, || format!("creating directory {path}"))?;
        self.set_attrs(path, Some(attrs.perm), Some((attrs.uid, attrs.gid)))
    }

    /// Create `path` and its missing parents.
    pub fn mkdir_p(&self, path: &str, attrs: Attrs) -> Result<()> {
        let mut cur = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            match self.stat(&cur) {
                Ok(st) if st.kind == FileKind::Dir => {}
                Ok(_) => {
                    return Err(Error::Usage(format!(
                        "{cur}: exists and is not a directory"
                    )))
                }
                Err(Error::NotFound(_)) => self.mkdir(&cur, attrs)?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Create the symlink `path` pointing at `target`.
    pub fn symlink(&self, path: &str, target: &str) -> Result<()> {
        self.need_write()?;
        let (dir, name) = self.parent_ino(path)?;
        let cname = CString::new(name).map_err(|_| Error::Usage("NUL in name".into()))?;
        let ctarget =
            CString::new(target).map_err(|_| Error::Usage("NUL in the link target".into()))?;
        // SAFETY: `fs` is open; both strings NUL-terminated.
        let mut rc =
            unsafe { sys::ext2fs_symlink(self.fs, dir, 0, cname.as_ptr(), ctarget.as_ptr()) };
        if rc == sys::ET_DIR_NO_SPACE {
            // SAFETY: `fs` is open.
            check(unsafe { sys::ext2fs_expand_dir(self.fs, dir) }, || {
                format!("growing the parent of {path}")
            })?;
            // SAFETY: as above.
            rc = unsafe { sys::ext2fs_symlink(self.fs, dir, 0, cname.as_ptr(), ctarget.as_ptr()) };
        }
        check(rc, || format!("creating symlink {path}"))
    }

    /// Change permission bits and/or owner of `path` (not following a final symlink).
    pub fn set_attrs(
        &self,
        path: &str,
        perm: Option<u32>,
        owner: Option<(u32, u32)>,
    ) -> Result<()> {
        self.need_write()?;
        let ino = self.lookup(path)?;
        let mut inode = self.read_inode(ino)?;
        if let Some(p) = perm {
            inode.i_mode = (inode.i_mode & S_IFMT) | (p & 0o7777) as u16;
        }
        if let Some((uid, gid)) = owner {
            inode.i_uid = uid as u16;
            inode.l_i_uid_high = (uid >> 16) as u16;
            inode.i_gid = gid as u16;
            inode.l_i_gid_high = (gid >> 16) as u16;
        }
        inode.i_ctime = now();
        self.write_inode(ino, &mut inode)
    }

    /// Remove the non-directory `path`, freeing its inode and blocks when it was the last link.
    pub fn unlink(&self, path: &str) -> Result<()> {
        self.need_write()?;
        let (dir, name) = self.parent_ino(path)?;
        let ino = self.lookup(path)?;
        let mut inode = self.read_inode(ino)?;
        if FileKind::of_mode(inode.i_mode) == FileKind::Dir {
            return Err(Error::Usage(format!("{path}: is a directory")));
        }
        let cname = CString::new(name).map_err(|_| Error::Usage("NUL in name".into()))?;
        check(
            // SAFETY: `fs` is open; `cname` NUL-terminated.
            unsafe { sys::ext2fs_unlink(self.fs, dir, cname.as_ptr(), ino, 0) },
            || format!("unlinking {path}"),
        )?;
        inode.i_links_count = inode.i_links_count.saturating_sub(1);
        inode.i_ctime = now();
        if inode.i_links_count > 0 {
            return self.write_inode(ino, &mut inode);
        }
        self.release_inode(ino, &mut inode, false, path)
    }

    /// Free an inode with no links left: its blocks, its xattr block, the inode itself (as
    /// debugfs's `kill_file` does).
    fn release_inode(
        &self,
        ino: u32,
        inode: &mut sys::Inode,
        is_dir: bool,
        path: &str,
    ) -> Result<()> {
        inode.i_links_count = 0;
        inode.i_dtime = now();
        self.write_inode(ino, inode)?;
        // SAFETY: `fs` is open; `inode` is valid.
        if unsafe { sys::ext2fs_inode_has_valid_blocks2(self.fs, inode) } != 0
            || inode.i_flags & sys::INLINE_DATA_FL != 0
        {
            check(
                // SAFETY: `fs` is open; `inode` is the inode's current contents; end ~0 frees all.
                unsafe {
                    sys::ext2fs_punch(self.fs, ino, inode, std::ptr::null_mut(), 0, u64::MAX)
                },
                || format!("freeing the blocks of {path}"),
            )?;
        }
        let acl = u64::from(inode.i_file_acl) | (u64::from(inode.l_i_file_acl_high) << 32);
        if acl != 0 {
            let mut count = 0u32;
            check(
                // SAFETY: `fs` is open; a null block_buf makes libext2fs allocate its own.
                unsafe {
                    sys::ext2fs_adjust_ea_refcount3(
                        self.fs,
                        acl,
                        std::ptr::null_mut(),
                        -1,
                        &mut count,
                        ino,
                    )
                },
                || format!("releasing the xattr block of {path}"),
            )?;
            if count == 0 {
                // SAFETY: `fs` is open; `acl` is a block this inode referenced.
                unsafe { sys::ext2fs_block_alloc_stats2(self.fs, acl, -1) };
            }
        }
        // SAFETY: `fs` is open; the inode is being released.
        unsafe { sys::ext2fs_inode_alloc_stats2(self.fs, ino, -1, c_int::from(is_dir)) };
        Ok(())
    }

    /// Remove the empty directory `path`.
    pub fn rmdir(&self, path: &str) -> Result<()> {
        self.need_write()?;
        if !self.read_dir(path)?.is_empty() {
            return Err(Error::Usage(format!("{path}: directory not empty")));
        }
        let (dir, name) = self.parent_ino(path)?;
        let ino = self.lookup(path)?;
        let mut inode = self.read_inode(ino)?;
        let cname = CString::new(name).map_err(|_| Error::Usage("NUL in name".into()))?;
        check(
            // SAFETY: `fs` is open; `cname` NUL-terminated.
            unsafe { sys::ext2fs_unlink(self.fs, dir, cname.as_ptr(), ino, 0) },
            || format!("unlinking {path}"),
        )?;
        self.release_inode(ino, &mut inode, true, path)?;
        let mut parent = self.read_inode(dir)?;
        parent.i_links_count = parent.i_links_count.saturating_sub(1).max(2);
        self.write_inode(dir, &mut parent)
    }

    /// Remove `path` and, for a directory, everything under it (symlinks are removed, never
    /// followed). Returns the number of entries removed.
    pub fn remove_tree(&self, path: &str) -> Result<u64> {
        self.remove_tree_at(path, 0)
    }

    fn remove_tree_at(&self, path: &str, depth: usize) -> Result<u64> {
        if depth > MAX_TREE_DEPTH {
            return Err(Error::Unsupported(format!(
                "{path}: deeper than {MAX_TREE_DEPTH} directories"
            )));
        }
        let st = self.stat(path)?;
        if st.kind != FileKind::Dir {
            self.unlink(path)?;
            return Ok(1);
        }
        let mut n = 0;
        for e in self.read_dir(path)? {
            n += self.remove_tree_at(
                &format!("{}/{}", path.trim_end_matches('/'), e.name),
                depth + 1,
            )?;
        }
        self.rmdir(path)?;
        Ok(n + 1)
    }

    /// Remove what is inside the directory `path`, keeping the directory.
    pub fn clear_dir(&self, path: &str) -> Result<u64> {
        let mut n = 0;
        for e in self.read_dir(path)? {
            n += self.remove_tree_at(&format!("{}/{}", path.trim_end_matches('/'), e.name), 1)?;
        }
        Ok(n)
    }

    /// The free blocks as byte ranges of the volume (from the block bitmaps).
    pub fn free_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let bs = self.block_size();
        let total = self.blocks_count();
        // SAFETY: `fs` is open.
        let first = u64::from(unsafe { sys::vmi_ext2_first_data_block(self.fs) });
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut bits = vec![0u8; (BITMAP_CHUNK_BITS / 8) as usize];
        let mut blk = first;
        while blk < total {
            let n = (total - blk).min(u64::from(BITMAP_CHUNK_BITS)) as u32;
            check(
                // SAFETY: `fs` is open; `bits` holds BITMAP_CHUNK_BITS bits >= n.
                unsafe {
                    sys::vmi_ext2_block_bitmap_range(
                        self.fs,
                        blk,
                        n,
                        bits.as_mut_ptr() as *mut c_void,
                    )
                },
                || "reading the block bitmap".into(),
            )?;
            for i in 0..u64::from(n) {
                let used = bits[(i / 8) as usize] & (1 << (i % 8)) != 0;
                if used {
                    continue;
                }
                let off = (blk + i) * bs;
                match out.last_mut() {
                    Some((s, l)) if *s + *l == off => *l += bs,
                    _ => out.push((off, bs)),
                }
            }
            blk += u64::from(n);
        }
        // Never past the volume (a filesystem claiming more blocks than its volume holds).
        let vlen = self.volume.len();
        out.retain_mut(|(s, l)| {
            if *s >= vlen {
                return false;
            }
            *l = (*l).min(vlen - *s);
            true
        });
        Ok(out)
    }

    /// The volume the filesystem lives on.
    pub fn volume(&self) -> &Volume<'v> {
        &self.volume
    }

    /// Write everything back and close the filesystem.
    pub fn close(mut self) -> Result<()> {
        let fs = std::mem::replace(&mut self.fs, std::ptr::null_mut());
        // SAFETY: `fs` is open and is not used after this (self.fs is now null).
        let rc = unsafe { sys::ext2fs_close2(fs, 0) };
        if rc != 0 {
            // SAFETY: ext2fs_close2 leaves the handle allocated when it fails.
            unsafe { sys::ext2fs_free(fs) };
        }
        check(rc, || "writing back and closing the filesystem".into())?;
        self.volume.flush()
    }
}

impl Drop for Ext4<'_> {
    fn drop(&mut self) {
        if !self.fs.is_null() {
            // SAFETY: `fs` is open and not used after this; the volume box is dropped after.
            let rc = unsafe { sys::ext2fs_close2(self.fs, 0) };
            if rc != 0 {
                // SAFETY: ext2fs_close2 leaves the handle allocated when it fails.
                unsafe { sys::ext2fs_free(self.fs) };
            }
            self.fs = std::ptr::null_mut();
        }
    }
}

/// Closes an `ext2_file_t` on every path.
struct FileGuard(sys::File);

impl FileGuard {
    fn close(mut self, path: &str) -> Result<()> {
        let f = std::mem::replace(&mut self.0, std::ptr::null_mut());
        // SAFETY: `f` is an open ext2 file, closed once.
        check(unsafe { sys::ext2fs_file_close(f) }, || {
            format!("closing {path}")
        })
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: an open ext2 file, closed once.
            unsafe { sys::ext2fs_file_close(self.0) };
        }
    }
}
