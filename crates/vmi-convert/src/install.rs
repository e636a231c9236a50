//! Installing a conversion's result: [`convert_to_path`] builds the destination as an anonymous
//! file (or under a temporary name) beside it and moves it into place only when everything
//! succeeded, so a failed, interrupted or killed conversion never leaves a partial image at the
//! destination (or clobbers an older one), and leaves no debris a later run does not remove. The
//! host-file mechanics (`O_TMPFILE`, `linkat`, `RENAME_EXCHANGE`, owner locks) are in `outfile`.

use crate::convert::{convert, ConvertOptions, ConvertStats};
use crate::outfile;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use vmi_disk::gate::Gate;
use vmi_disk::storage::{FileStorage, Storage};
use vmi_disk::{CreateOptions, Error, Format, Image, OpenOptions, Result};

/// How a conversion's output is made durable: qemu-img's `-t CACHE`.
///
/// vmi always writes through the page cache (no `O_DIRECT`, no `O_DSYNC`); what the mode decides
/// is whether the new image is fsynced before it is renamed into place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// The default. Every file of the new image is fsynced before its rename and the folder after
    /// it, so after a host crash the destination name holds either what it held before or the
    /// complete new image. `none`, `writethrough` and `directsync` are accepted for qemu-img
    /// compatibility and mean this too: they give this guarantee, not their cache bypass.
    #[default]
    Writeback,
    /// Nothing is fsynced (qemu-img convert's default). The image is still renamed into place
    /// only after the conversion succeeded, so a failed or killed conversion leaves nothing
    /// behind; but after a host crash (power loss, kernel panic) shortly after the conversion the
    /// destination may be empty or hold partly written data. The data reaches the disk when the
    /// kernel writes back its page cache (or at `sync`).
    Unsafe,
}

impl CacheMode {
    /// Every name `-t` accepts.
    pub const NAMES: &'static [&'static str] =
        &["writeback", "unsafe", "none", "writethrough", "directsync"];

    /// Make `img` follow this mode from now on: with [`CacheMode::Unsafe`] every host file of the
    /// image stops syncing (also for a target that existed before, `convert -n`).
    pub fn apply(self, img: &Image) {
        if self != CacheMode::Unsafe {
            return;
        }
        // File 0 is the image file; formats with extents or data files number the others.
        for i in 0..MAX_FILES {
            match img.driver().file(i) {
                Ok(f) => {
                    f.ignore_sync();
                }
                Err(_) => break,
            }
        }
    }

    fn durable(self) -> bool {
        self == CacheMode::Writeback
    }
}

impl std::str::FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "writeback" | "none" | "writethrough" | "directsync" => Ok(CacheMode::Writeback),
            "unsafe" => Ok(CacheMode::Unsafe),
            _ => Err(Error::usage(format!(
                "unknown cache mode '{s}' (expected one of: {})",
                CacheMode::NAMES.join(", ")
            ))),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Unsafe => "unsafe",
        })
    }
}

/// Most host files [`CacheMode::apply`] looks at (VMDK descriptors name at most a few thousand
/// extents; the loop stops at the first index the driver does not know anyway).
const MAX_FILES: usize = 1 << 16;

/// An internal invariant broke.
fn internal(what: &str) -> Error {
    Error::new(
        vmi_disk::ErrorKind::Io,
        format!("internal error: {what} out of range"),
    )
}

/// Where [`convert_to_path`] writes.
#[derive(Debug, Clone)]
pub struct Target {
    /// Final path.
    pub path: PathBuf,
    /// Output format.
    pub format: Format,
    /// Creation options (size is filled from the source when 0).
    pub create: CreateOptions,
}

/// Temporary files and folders of an unfinished [`convert_to_path`], removed on drop unless the
/// conversion completed (also when a panic unwinds through it).
#[derive(Default)]
struct TempGuard {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    done: bool,
    /// Held open (and `flock`ed) for the whole run: tells [`outfile::remove_stale`] in other
    /// processes that the temporary names' owner is alive.
    owner: Option<File>,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Counter that makes temporary names unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name `.NAME.vmi-tmp-<pid>-<n>` beside the destination that does not exist yet.
fn temp_name(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(outfile::temp_file_name(name, std::process::id(), n));
        if std::fs::symlink_metadata(&p).is_err() {
            return p;
        }
    }
}

/// Whether images of `format` may consist of several files that name each other by file name, so
/// they must be created under their final names (in a temporary folder).
fn multi_file(format: Format, path: &Path) -> bool {
    format == Format::Vmdk || !vmi_disk::formats::companion_files(format, path).is_empty()
}

fn fsync_path(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("syncing", e).with_path(p))
}

/// Move `from` to `to` (see [`outfile::replace`]: an existing file is exchanged, not renamed over).
fn rename(from: &Path, to: &Path) -> Result<()> {
    outfile::replace(from, to)
        .map_err(|e| Error::io(format!("renaming {} into place", from.display()), e).with_path(to))
}

/// Open the backing file a new target records, so partial allocation units are completed from it.
/// The user named this file, so it may live anywhere; its own chain stays confined to its folder.
fn open_target_backing(target: &Path, name: &str, format: Option<Format>) -> Result<Image> {
    let dir = vmi_disk::gate::parent_dir(target);
    let root = vmi_disk::gate::parent_dir(&dir.join(name));
    let gate = Gate::new().allow_backing(true).confine_to(root);
    let path = gate.resolve(vmi_disk::Referral::Backing, target, name)?;
    Image::open(&path, &OpenOptions::new().format(format).gate(gate))
        .map_err(|e| e.context("opening the target's backing file"))
}

/// Create `target` as an anonymous file or under a temporary name beside it, convert `src` into
/// it, and move it into place only when everything succeeded.
///
/// Single-file formats are written to an anonymous file (`O_TMPFILE`) in the destination's folder
/// and linked to the destination's name at the end; an existing destination is replaced by
/// exchanging names. Where the filesystem has no anonymous files they are created as
/// `.NAME.vmi-tmp-<pid>-<n>` there. Formats whose image is several files (VMDK extents named
/// inside the descriptor) are created under their final names in a temporary folder there; the
/// companions are moved into place first and the main file last. Every file is fsynced before it
/// is moved and the folder after, so a crash leaves either the old destination or the complete
/// new one. On any error (or panic) the temporary files are removed and the destination is
/// untouched; after `SIGKILL` (or a power cut) an anonymous file vanishes by itself, and named
/// leftovers are removed by the next conversion to the same destination.
pub fn convert_to_path(
    src: &Image,
    target: &Target,
    opts: &ConvertOptions,
) -> Result<ConvertStats> {
    let path = &target.path;
    let name = path
        .file_name()
        .ok_or_else(|| Error::usage("the target path has no file name").with_path(path))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut create = target.create.clone();
    if create.size == 0 {
        create.size = src.virtual_size();
    }
    // Debris of earlier runs for this destination that were killed.
    outfile::remove_stale(&dir, name);
    let mut guard = TempGuard::default();
    let multi = multi_file(target.format, path);
    let creating =
        |e: std::io::Error, p: &Path| Error::io("creating", e).with_path(p).renaming_path(p, path);
    // The anonymous file, when the image is one: linked into place by `install_anonymous`.
    let mut anonymous = None;
    let (st, tmp_main) = if multi {
        let d = temp_name(&dir, name);
        std::fs::create_dir(&d)
            .map_err(|e| Error::io("creating a temporary folder", e).with_path(&d))?;
        guard.dir = Some(d.clone());
        guard.owner = Some(outfile::own(&d).map_err(|e| creating(e, &d))?);
        let t = d.join(name);
        (FileStorage::create(&t).map_err(|e| creating(e, &t))?, t)
    } else if let Some(f) = outfile::anonymous_file(&dir) {
        // A name for messages (and for the link, if the destination exists by then).
        let t = temp_name(&dir, name);
        let _ = outfile::try_lock(&f);
        let handle = f.try_clone().map_err(|e| creating(e, &t))?;
        anonymous = Some(handle);
        (FileStorage::adopt(f, &t), t)
    } else {
        let t = temp_name(&dir, name);
        let st = FileStorage::create(&t).map_err(|e| creating(e, &t))?;
        guard.files.push(t.clone());
        guard.owner = Some(outfile::own(&t).map_err(|e| creating(e, &t))?);
        (st, t)
    };

    // Errors name the destination the user asked for, not the temporary file.
    let named = |e: Error| e.renaming_path(&tmp_main, path);
    if !opts.cache.durable() {
        // Sync-free from its first byte: the driver's own syncs while creating are skipped too.
        st.ignore_sync();
    }
    let mut dst =
        Image::create_on(Box::new(st), &tmp_main, target.format, &create).map_err(named)?;
    opts.cache.apply(&dst);
    if let Some(spec) = &create.backing {
        let b = open_target_backing(path, &spec.name, spec.format)?;
        dst.set_backing(Some(b));
    }
    let cloned = match reflink_source(src, target, opts) {
        Some(sf) => {
            let df = match &anonymous {
                Some(f) => f.try_clone(),
                None => std::fs::OpenOptions::new().write(true).open(&tmp_main),
            };
            df.and_then(|df| outfile::clone_file(sf, &df))
                .map_err(|e| named(Error::io("cloning", e).with_path(&tmp_main)))?
        }
        None => false,
    };
    let stats = if cloned {
        let size = src.virtual_size();
        if let Some(cb) = &opts.progress {
            cb(crate::Progress {
                done: size,
                total: size,
            });
        }
        ConvertStats {
            data_bytes: size,
            zero_bytes: 0,
        }
    } else {
        convert(src, &dst, opts).map_err(named)?
    };
    dst.close().map_err(named)?;

    match &anonymous {
        Some(f) => install_anonymous(&mut guard, f, &tmp_main, path, &dir, opts.cache.durable())?,
        None => install(&mut guard, &tmp_main, path, &dir, opts.cache.durable())?,
    }
    Ok(stats)
}

/// The source file of a raw → raw conversion that a reflink clone (`FICLONE`) may do whole: a
/// plain raw file without backing, of exactly its virtual size, into a raw target of the same
/// size without preallocation, zero detection on (`-S 0` asks for every byte to be allocated),
/// no compression, nothing shallow. `None` when any of that does not hold.
fn reflink_source<'a>(src: &'a Image, target: &Target, opts: &ConvertOptions) -> Option<&'a File> {
    if src.format() != Format::Raw
        || target.format != Format::Raw
        || src.backing_image().is_some()
        || target.create.backing.is_some()
        || target.create.options.contains("preallocation")
        || opts.compress
        || opts.shallow
        || opts.target_has_data
        || opts.min_sparse == 0
        || (target.create.size != 0 && target.create.size != src.virtual_size())
    {
        return None;
    }
    let f = src.driver().file(0).ok()?.host_file()?;
    let len = f.metadata().ok()?.len();
    (len == src.virtual_size()).then_some(f)
}

/// Give the finished anonymous file `f` the name `path`: linked straight to it when the name is
/// free, otherwise linked to the temporary name `tmp` and exchanged with the existing file
/// ([`outfile::replace`]). Fsynced before and the folder after (unless not `durable`).
fn install_anonymous(
    guard: &mut TempGuard,
    f: &File,
    tmp: &Path,
    path: &Path,
    dir: &Path,
    durable: bool,
) -> Result<()> {
    if durable {
        f.sync_all()
            .map_err(|e| Error::io("syncing", e).with_path(path))?;
    }
    let linking =
        |e: std::io::Error| Error::io("linking the new image into place", e).with_path(path);
    let free = std::fs::symlink_metadata(path).is_err();
    let linked = free
        && match outfile::link_anonymous(f, path) {
            Ok(()) => true,
            // Someone created it meanwhile: replace it as any existing destination.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(linking(e)),
        };
    if !linked {
        let name = path.file_name().ok_or_else(|| internal("target name"))?;
        let mut t = tmp.to_path_buf();
        loop {
            match outfile::link_anonymous(f, &t) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    t = temp_name(dir, name);
                }
                Err(e) => return Err(linking(e)),
            }
        }
        guard.files.push(t.clone());
        rename(&t, path)?;
    }
    guard.done = true;
    if durable {
        fsync_path(dir)?;
    }
    Ok(())
}

/// Move a finished image from its temporary place to `path`: companions (every other file in the
/// temporary folder, i.e. the extents `formats::companion_files` would list) first, the main file
/// last, each fsynced before its rename, then the folder fsynced (no fsync unless `durable`).
fn install(
    guard: &mut TempGuard,
    tmp_main: &Path,
    path: &Path,
    dir: &Path,
    durable: bool,
) -> Result<()> {
    let sync = |p: &Path| if durable { fsync_path(p) } else { Ok(()) };
    if let Some(tmp_dir) = guard.dir.clone() {
        let main_name = tmp_main
            .file_name()
            .ok_or_else(|| internal("main file name"))?;
        let mut companions = Vec::new();
        let entries = std::fs::read_dir(&tmp_dir)
            .map_err(|e| Error::io("listing the temporary folder", e).with_path(&tmp_dir))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| Error::io("listing the temporary folder", e).with_path(&tmp_dir))?;
            if entry.file_name() != main_name {
                companions.push(entry.path());
            }
        }
        companions.sort();
        for c in companions
            .iter()
            .chain(std::iter::once(&tmp_main.to_path_buf()))
        {
            sync(c)?;
        }
        for c in &companions {
            let fname = c.file_name().ok_or_else(|| internal("companion name"))?;
            let final_path = dir.join(fname);
            rename(c, &final_path)?;
            // Until the main file is in place, a failure removes the companions as well.
            guard.files.push(final_path);
        }
        rename(tmp_main, path)?;
    } else {
        sync(tmp_main)?;
        rename(tmp_main, path)?;
    }
    guard.done = true;
    if let Some(d) = &guard.dir {
        let _ = std::fs::remove_dir(d);
    }
    sync(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_file_image_is_installed_companions_first_and_the_folder_removed() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(".img.vmdk.vmi-tmp-1-0");
        std::fs::create_dir(&tmp).unwrap();
        for (f, body) in [
            ("img.vmdk", "descriptor"),
            ("img-s001.vmdk", "e1"),
            ("img-s002.vmdk", "e2"),
        ] {
            std::fs::write(tmp.join(f), body).unwrap();
        }
        // An older image of the same name is replaced.
        std::fs::write(dir.path().join("img.vmdk"), "old").unwrap();
        let mut guard = TempGuard::default();
        guard.dir = Some(tmp.clone());
        let dest = dir.path().join("img.vmdk");
        install(&mut guard, &tmp.join("img.vmdk"), &dest, dir.path(), true).unwrap();
        drop(guard);
        assert!(!tmp.exists());
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "descriptor");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("img-s002.vmdk")).unwrap(),
            "e2"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn an_unfinished_multi_file_image_is_removed_with_its_moved_companions() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(".x.vmi-tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("x-s001.vmdk"), "e1").unwrap();
        std::fs::write(tmp.join("x.vmdk"), "descriptor").unwrap();
        let mut guard = TempGuard::default();
        guard.dir = Some(tmp.clone());
        // The destination is a non-empty folder, so the main file's rename fails after the
        // companion moved.
        let dest = dir.path().join("x.vmdk");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("keep"), "").unwrap();
        assert!(install(&mut guard, &tmp.join("x.vmdk"), &dest, dir.path(), true).is_err());
        drop(guard);
        assert!(!dir.path().join("x-s001.vmdk").exists());
        assert!(!tmp.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_target_backing_resolves_beside_the_target_and_refuses_protocols() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.raw"), vec![7u8; 4096]).unwrap();
        let target = dir.path().join("new.qcow2");
        let b = open_target_backing(&target, "base.raw", Some(Format::Raw)).unwrap();
        assert_eq!(b.virtual_size(), 4096);
        let e = open_target_backing(&target, "nbd:localhost:10809", None).unwrap_err();
        assert_eq!(e.kind(), vmi_disk::ErrorKind::Refused, "{e}");
    }
}
