//! Hand-written declarations of the libext2fs (e2fsprogs 1.46+) and com_err functions vmi-guest
//! calls, and of the two on-disk structures passed by pointer (`struct ext2_inode`, the 128-byte
//! inode of the ext2/3/4 on-disk format; `struct ext2_dir_entry`). Hand-written rather than
//! generated with bindgen: the set is small and stable (these signatures have not changed since
//! 1.43), the two structures are fixed by the on-disk format, and it keeps libclang out of the
//! build. Structures whose layout is libext2fs's own (`struct_io_manager`, `struct_io_channel`,
//! `struct_ext2_filsys`) are never touched from Rust: `shim.c` handles them with e2fsprogs'
//! headers.

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `errcode_t`.
pub type Errcode = std::ffi::c_long;

/// Returned by the stand-in shim (`shim_unavailable.c`) when vmi was built without e2fsprogs'
/// headers; not a libext2fs code.
pub const VMI_EXT2_UNAVAILABLE: Errcode = 0x766d_6901;
/// `ext2_filsys`, opaque.
pub type Filsys = *mut c_void;
/// `ext2_file_t`, opaque.
pub type File = *mut c_void;
/// `ext2_ino_t`.
pub type Ino = u32;

/// The root directory's inode number.
pub const ROOT_INO: Ino = 2;
/// `EXT2_FILE_WRITE`.
pub const FILE_WRITE: c_int = 0x0001;
/// `EXT2_ET_DIR_NO_SPACE`.
pub const ET_DIR_NO_SPACE: Errcode = 2133571366;
/// `EXT2_ET_FILE_NOT_FOUND`.
pub const ET_FILE_NOT_FOUND: Errcode = 2133571404;
/// `EXT4_INLINE_DATA_FL`.
pub const INLINE_DATA_FL: u32 = 0x1000_0000;
/// Directory entry file types (`EXT2_FT_*`).
pub const FT_REG_FILE: c_int = 1;

/// `struct ext2_inode`: the first 128 bytes of an on-disk inode (Linux flavour of the unions).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Inode {
    pub i_mode: u16,
    pub i_uid: u16,
    pub i_size: u32,
    pub i_atime: u32,
    pub i_ctime: u32,
    pub i_mtime: u32,
    pub i_dtime: u32,
    pub i_gid: u16,
    pub i_links_count: u16,
    pub i_blocks: u32,
    pub i_flags: u32,
    pub l_i_version: u32,
    pub i_block: [u32; 15],
    pub i_generation: u32,
    pub i_file_acl: u32,
    pub i_size_high: u32,
    pub i_faddr: u32,
    pub l_i_blocks_hi: u16,
    pub l_i_file_acl_high: u16,
    pub l_i_uid_high: u16,
    pub l_i_gid_high: u16,
    pub l_i_checksum_lo: u16,
    pub l_i_reserved: u16,
}

const _: () = assert!(std::mem::size_of::<Inode>() == 128);

/// `struct ext2_dir_entry` (name_len's high byte is the file type with the filetype feature).
#[repr(C)]
pub struct DirEntry {
    pub inode: u32,
    pub rec_len: u16,
    pub name_len: u16,
    pub name: [u8; 255],
}

/// The callback `ext2fs_dir_iterate2` calls for each entry.
pub type DirIterFn = unsafe extern "C" fn(
    dir: Ino,
    entry: c_int,
    dirent: *mut DirEntry,
    offset: c_int,
    blocksize: c_int,
    buf: *mut c_char,
    priv_data: *mut c_void,
) -> c_int;

#[link(name = "ext2fs")]
extern "C" {
    pub fn ext2fs_close2(fs: Filsys, flags: c_int) -> Errcode;
    pub fn ext2fs_free(fs: Filsys);
    pub fn ext2fs_read_bitmaps(fs: Filsys) -> Errcode;
    pub fn ext2fs_namei(
        fs: Filsys,
        root: Ino,
        cwd: Ino,
        name: *const c_char,
        ino: *mut Ino,
    ) -> Errcode;
    pub fn ext2fs_namei_follow(
        fs: Filsys,
        root: Ino,
        cwd: Ino,
        name: *const c_char,
        ino: *mut Ino,
    ) -> Errcode;
    pub fn ext2fs_read_inode(fs: Filsys, ino: Ino, inode: *mut Inode) -> Errcode;
    pub fn ext2fs_write_inode(fs: Filsys, ino: Ino, inode: *mut Inode) -> Errcode;
    pub fn ext2fs_write_new_inode(fs: Filsys, ino: Ino, inode: *mut Inode) -> Errcode;
    pub fn ext2fs_new_inode(
        fs: Filsys,
        dir: Ino,
        mode: c_int,
        map: *mut c_void,
        ret: *mut Ino,
    ) -> Errcode;
    pub fn ext2fs_inode_alloc_stats2(fs: Filsys, ino: Ino, inuse: c_int, isdir: c_int);
    pub fn ext2fs_block_alloc_stats2(fs: Filsys, blk: u64, inuse: c_int);
    pub fn ext2fs_link(
        fs: Filsys,
        dir: Ino,
        name: *const c_char,
        ino: Ino,
        flags: c_int,
    ) -> Errcode;
    pub fn ext2fs_unlink(
        fs: Filsys,
        dir: Ino,
        name: *const c_char,
        ino: Ino,
        flags: c_int,
    ) -> Errcode;
    pub fn ext2fs_expand_dir(fs: Filsys, dir: Ino) -> Errcode;
    pub fn ext2fs_mkdir(fs: Filsys, parent: Ino, inum: Ino, name: *const c_char) -> Errcode;
    pub fn ext2fs_symlink(
        fs: Filsys,
        parent: Ino,
        ino: Ino,
        name: *const c_char,
        target: *const c_char,
    ) -> Errcode;
    pub fn ext2fs_is_fast_symlink(inode: *mut Inode) -> c_int;
    pub fn ext2fs_inode_has_valid_blocks2(fs: Filsys, inode: *mut Inode) -> c_int;
    pub fn ext2fs_punch(
        fs: Filsys,
        ino: Ino,
        inode: *mut Inode,
        block_buf: *mut c_char,
        start: u64,
        end: u64,
    ) -> Errcode;
    pub fn ext2fs_adjust_ea_refcount3(
        fs: Filsys,
        blk: u64,
        block_buf: *mut c_char,
        adjust: c_int,
        newcount: *mut u32,
        inum: Ino,
    ) -> Errcode;
    pub fn ext2fs_extent_open2(
        fs: Filsys,
        ino: Ino,
        inode: *mut Inode,
        handle: *mut *mut c_void,
    ) -> Errcode;
    pub fn ext2fs_extent_free(handle: *mut c_void);
    pub fn ext2fs_inline_data_init(fs: Filsys, ino: Ino) -> Errcode;
    pub fn ext2fs_dir_iterate2(
        fs: Filsys,
        dir: Ino,
        flags: c_int,
        block_buf: *mut c_char,
        func: DirIterFn,
        priv_data: *mut c_void,
    ) -> Errcode;
    pub fn ext2fs_file_open(fs: Filsys, ino: Ino, flags: c_int, ret: *mut File) -> Errcode;
    pub fn ext2fs_file_close(file: File) -> Errcode;
    pub fn ext2fs_file_read(
        file: File,
        buf: *mut c_void,
        wanted: c_uint,
        got: *mut c_uint,
    ) -> Errcode;
    pub fn ext2fs_file_write(
        file: File,
        buf: *const c_void,
        nbytes: c_uint,
        written: *mut c_uint,
    ) -> Errcode;
    pub fn ext2fs_file_set_size2(file: File, size: u64) -> Errcode;
}

#[link(name = "com_err")]
extern "C" {
    pub fn error_message(code: Errcode) -> *const c_char;
}

// shim.c
extern "C" {
    pub fn vmi_ext2_open(volume: *mut c_void, writable: c_int, fs: *mut Filsys) -> Errcode;
    pub fn vmi_ext2_blocksize(fs: Filsys) -> c_uint;
    pub fn vmi_ext2_blocks_count(fs: Filsys) -> u64;
    pub fn vmi_ext2_free_blocks_count(fs: Filsys) -> u64;
    pub fn vmi_ext2_first_data_block(fs: Filsys) -> c_uint;
    pub fn vmi_ext2_needs_recovery(fs: Filsys) -> c_int;
    pub fn vmi_ext2_has_extents(fs: Filsys) -> c_int;
    pub fn vmi_ext2_has_inline_data(fs: Filsys) -> c_int;
    pub fn vmi_ext2_label_uuid(fs: Filsys, label: *mut c_char, uuid: *mut u8);
    pub fn vmi_ext2_block_bitmap_range(
        fs: Filsys,
        start: u64,
        num: c_uint,
        out: *mut c_void,
    ) -> Errcode;
}
