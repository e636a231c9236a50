//! The generic access layer: an [`Image`] is a driver plus its (optional) opened backing chain.
//! Reads walk the driver's mappings; unallocated ranges fall through to the backing image; writes
//! go to the top driver, which completes partial allocation units from the backing image.

use crate::driver::{Driver, MapKind, Mapping};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{
    self, Confidence, CreateContext, Format, OpenContext, ProbeInput, PROBE_HEAD, PROBE_TAIL,
};
use crate::gate::{Gate, Referral};
use crate::options::CreateOptions;
use crate::secret::Secret;
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What to do with a backing file the image declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingMode {
    /// Open it through the gate (which denies unless allowed).
    #[default]
    Open,
    /// Do not open it; reading an unallocated range is then an error. For `info`.
    Skip,
}

/// How to open an image. A builder: `OpenOptions::new().write(true).format(Format::Qcow2)`.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    format: Option<Format>,
    writable: bool,
    gate: Gate,
    backing: BackingMode,
    secret: Option<Secret>,
    force_share: bool,
}

impl OpenOptions {
    /// Read-only, probe the format, default gate.
    pub fn new() -> Self {
        Self::default()
    }
    /// Open for writing.
    pub fn write(mut self, yes: bool) -> Self {
        self.writable = yes;
        self
    }
    /// Do not probe: use this format.
    pub fn format(mut self, f: Option<Format>) -> Self {
        self.format = f;
        self
    }
    /// The gate for referenced files.
    pub fn gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }
    /// What to do with a backing file.
    pub fn backing(mut self, mode: BackingMode) -> Self {
        self.backing = mode;
        self
    }
    /// The key of an encrypted image (LUKS, qcow2 `encrypt.format=luks`): its passphrase.
    /// Without one, an encrypted image opens for `info` but its data cannot be read.
    pub fn secret(mut self, secret: Option<Secret>) -> Self {
        self.secret = secret;
        self
    }
    /// Take no image locks (qemu-img's `-U`/`--force-share`): read an image another process
    /// may be writing. Only for read-only opens; a writable open ignores it.
    pub fn force_share(mut self, yes: bool) -> Self {
        self.force_share = yes;
        self
    }
    /// The gate in use.
    pub fn gate_ref(&self) -> &Gate {
        &self.gate
    }
}

/// The outcome of probing a file's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The format chosen.
    pub format: Format,
    /// How sure the probe is.
    pub confidence: Confidence,
    /// Every non-raw format whose probe matched.
    pub matches: Vec<(Format, Confidence)>,
}

/// Every non-raw format whose probe claims the storage (reads the first [`PROBE_HEAD`] and last
/// [`PROBE_TAIL`] bytes once). [`probe`] decides from these; inspection reports them all.
pub fn probe_matches(storage: &dyn Storage) -> Result<Vec<(Format, Confidence)>> {
    let len = storage
        .len()
        .map_err(|e| Error::io("reading file size", e))?;
    let head_len = len.min(PROBE_HEAD as u64) as usize;
    let mut head = vec![0u8; head_len];
    storage
        .read_at(&mut head, 0)
        .map_err(|e| Error::io("reading header for probing", e))?;
    let tail_len = len.min(PROBE_TAIL as u64) as usize;
    let mut tail = vec![0u8; tail_len];
    storage
        .read_at(&mut tail, len - tail_len as u64)
        .map_err(|e| Error::io("reading footer for probing", e))?;
    let input = ProbeInput {
        head: &head,
        tail: &tail,
        len,
    };
    Ok(formats::probe_all(&input)
        .into_iter()
        .filter(|(f, _)| *f != Format::Raw)
        .collect())
}

/// Probe a storage's format. A file that more than one non-raw format claims is refused as
/// ambiguous (a polyglot), except the benign case of an ISO that is also a valid MBR/GPT disk,
/// which is not a format here.
pub fn probe(storage: &dyn Storage) -> Result<Probe> {
    let matches = probe_matches(storage)?;
    match matches.as_slice() {
        [] => Ok(Probe {
            format: Format::Raw,
            confidence: Confidence::Fallback,
            matches,
        }),
        [(f, c)] => Ok(Probe {
            format: *f,
            confidence: *c,
            matches: matches.clone(),
        }),
        many => {
            let names: Vec<String> = many.iter().map(|(f, c)| format!("{f} ({c:?})")).collect();
            Err(Error::refused(format!(
                "ambiguous format: the file matches {}; give the format explicitly",
                names.join(", ")
            )))
        }
    }
}

/// An open image with its backing chain.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    driver: Box<dyn Driver>,
    backing: Option<Box<Image>>,
    backing_skipped: bool,
    probe: Option<Probe>,
    /// The last inflated compressed unit: (driver-identity, unit offset, bytes).
    unit_cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl Image {
    /// Open the image at `path` (and its backing chain, through the gate).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let gate = opts.gate.rooted_at_image(path);
        let mut seen = Vec::new();
        Self::open_at(
            path,
            None,
            opts.format,
            opts.writable,
            opts.force_share && !opts.writable,
            &gate,
            opts.backing,
            0,
            &mut seen,
            opts.secret.clone(),
        )
    }

    /// `opened`: the file, already opened by the gate (backing files); else `path` is opened.
    #[expect(clippy::too_many_arguments, reason = "one private recursive helper")]
    fn open_at(
        path: &Path,
        opened: Option<std::fs::File>,
        format: Option<Format>,
        writable: bool,
        share: bool,
        gate: &Gate,
        mode: BackingMode,
        depth: usize,
        seen: &mut Vec<PathBuf>,
        secret: Option<Secret>,
    ) -> Result<Image> {
        if depth > gate.depth_limit() {
            return Err(Error::limit(format!(
                "backing chain deeper than {} images",
                gate.depth_limit()
            ))
            .with_path(path));
        }
        let canon = path
            .canonicalize()
            .map_err(|e| Error::io("opening", e).with_path(path))?;
        if seen.contains(&canon) {
            return Err(Error::invalid("backing chain loops back to this image").with_path(path));
        }
        seen.push(canon);
        let storage = match (opened, share) {
            (Some(f), true) => FileStorage::from_open_file_shared(f, path),
            (Some(f), false) => FileStorage::from_open_file(f, path, writable)
                .map_err(|e| Error::io("opening", e).with_path(path))?,
            (None, true) => FileStorage::open_shared(path)
                .map_err(|e| Error::io("opening", e).with_path(path))?,
            (None, false) => FileStorage::open(path, writable)
                .map_err(|e| Error::io("opening", e).with_path(path))?,
        };
        let mut img =
            Self::from_storage_at(Box::new(storage), path, format, writable, gate, secret)?;
        if let (Some(spec), BackingMode::Open) = (img.driver.backing().cloned(), mode) {
            // Checked and opened in one step (no window for a swapped symlink).
            let opened = gate
                .open(Referral::Backing, path, &spec.name, false)
                .map_err(|e| e.with_path(path))?;
            let bpath = opened.path;
            let b = Self::open_at(
                &bpath,
                Some(opened.file),
                spec.format,
                false,
                share,
                gate,
                mode,
                depth + 1,
                seen,
                None,
            )
            .map_err(|e| e.context(format!("backing file of {}", path.display())))?;
            img.driver
                .verify_backing(&b)
                .map_err(|e| e.with_path(path))?;
            img.backing = Some(Box::new(b));
        } else if img.driver.backing().is_some() {
            img.backing_skipped = true;
        }
        Ok(img)
    }

    /// Open an image over any storage (no backing chain is opened). `path` is used for messages
    /// and for resolving referenced files.
    pub fn from_storage(
        storage: Box<dyn Storage>,
        path: &Path,
        format: Option<Format>,
        writable: bool,
        gate: &Gate,
    ) -> Result<Image> {
        Self::from_storage_keyed(storage, path, format, writable, gate, None)
    }

    /// [`Image::from_storage`] with the key of an encrypted image.
    pub fn from_storage_keyed(
        storage: Box<dyn Storage>,
        path: &Path,
        format: Option<Format>,
        writable: bool,
        gate: &Gate,
        secret: Option<Secret>,
    ) -> Result<Image> {
        let mut img = Self::from_storage_at(storage, path, format, writable, gate, secret)?;
        img.backing_skipped = img.driver.backing().is_some();
        Ok(img)
    }

    fn from_storage_at(
        storage: Box<dyn Storage>,
        path: &Path,
        format: Option<Format>,
        writable: bool,
        gate: &Gate,
        secret: Option<Secret>,
    ) -> Result<Image> {
        let (format, probed) = match format {
            Some(f) => (f, None),
            None => {
                let p = probe(storage.as_ref()).map_err(|e| e.with_path(path))?;
                (p.format, Some(p))
            }
        };
        let ctx = OpenContext {
            path: path.to_path_buf(),
            writable,
            gate: gate.clone(),
            secret,
        };
        let driver = formats::open_driver(format, storage, &ctx).map_err(|e| e.with_path(path))?;
        Ok(Image {
            path: path.to_path_buf(),
            driver,
            backing: None,
            backing_skipped: false,
            probe: probed,
            unit_cache: Mutex::new(None),
        })
    }

    /// Create a new image at `path` (which must not exist) and return it open for writing. A
    /// backing file in `opts` is recorded, not opened; use [`Image::set_backing`] to attach one.
    pub fn create(path: &Path, format: Format, opts: &CreateOptions) -> Result<Image> {
        let storage =
            FileStorage::create(path).map_err(|e| Error::io("creating", e).with_path(path))?;
        let ctx = CreateContext {
            path: path.to_path_buf(),
        };
        match formats::create_driver(format, Box::new(storage), &ctx, opts) {
            Ok(driver) => Ok(Image::from_driver(driver, path)),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e.with_path(path))
            }
        }
    }

    /// Create on any storage (tests, in-memory).
    pub fn create_on(
        storage: Box<dyn Storage>,
        path: &Path,
        format: Format,
        opts: &CreateOptions,
    ) -> Result<Image> {
        let ctx = CreateContext {
            path: path.to_path_buf(),
        };
        let driver =
            formats::create_driver(format, storage, &ctx, opts).map_err(|e| e.with_path(path))?;
        Ok(Image::from_driver(driver, path))
    }

    /// Wrap an already open driver.
    pub fn from_driver(driver: Box<dyn Driver>, path: &Path) -> Image {
        Image {
            path: path.to_path_buf(),
            driver,
            backing: None,
            backing_skipped: false,
            probe: None,
            unit_cache: Mutex::new(None),
        }
    }

    /// Attach an opened backing image (after create, or to replace the one from the header).
    pub fn set_backing(&mut self, backing: Option<Image>) {
        self.backing_skipped = false;
        self.backing = backing.map(Box::new);
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format driver.
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    /// The format.
    pub fn format(&self) -> Format {
        self.driver.format()
    }

    /// The probe result, when the format was probed.
    pub fn probe_result(&self) -> Option<&Probe> {
        self.probe.as_ref()
    }

    /// Guest size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.driver.virtual_size()
    }

    /// The opened backing image.
    pub fn backing_image(&self) -> Option<&Image> {
        self.backing.as_deref()
    }

    /// Take the opened backing image out (for commit and rebase).
    pub fn take_backing(&mut self) -> Option<Image> {
        self.backing.take().map(|b| *b)
    }

    /// Number of images in the opened chain (1 for a standalone image).
    pub fn chain_len(&self) -> usize {
        1 + self.backing.as_ref().map_or(0, |b| b.chain_len())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::usage("offset overflow"))?;
        if end > self.virtual_size() {
            return Err(Error::usage(format!(
                "range {offset}+{len} is beyond the virtual size {}",
                self.virtual_size()
            ))
            .with_path(&self.path));
        }
        Ok(())
    }

    /// The top driver's mapping at `offset` (bounded to `len`), with its path in errors.
    pub fn mapping(&self, offset: u64, len: u64) -> Result<Mapping> {
        let m = self
            .driver
            .map(offset, len)
            .map_err(|e| e.with_path(&self.path))?;
        if m.start != offset || m.len == 0 || m.len > len {
            return Err(Error::invalid(format!(
                "driver returned mapping {}+{} for request {offset}+{len}",
                m.start, m.len
            ))
            .with_path(&self.path));
        }
        Ok(m)
    }

    /// Read guest bytes. The range must lie within the virtual size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let m = self.mapping(pos, (buf.len() - done) as u64)?;
            let n = m.len as usize;
            let out = &mut buf[done..done + n];
            self.read_mapped(&m, out)?;
            done += n;
        }
        Ok(())
    }

    fn read_mapped(&self, m: &Mapping, out: &mut [u8]) -> Result<()> {
        match m.kind {
            MapKind::Data { file, offset } => self
                .driver
                .file(file)
                .and_then(|s| {
                    s.read_at(out, offset).map_err(|e| {
                        Error::io(
                            format!("reading guest offset {} at host offset {offset}", m.start),
                            e,
                        )
                    })
                })
                .map_err(|e| e.with_path(&self.path)),
            MapKind::Zero => {
                out.fill(0);
                Ok(())
            }
            MapKind::Unallocated => self.read_backing(out, m.start),
            MapKind::Compressed { unit } => {
                let data = self.compressed_unit(unit)?;
                let skip =
                    usize::try_from(m.start - unit).map_err(|_| Error::invalid("unit offset"))?;
                let src = data.get(skip..skip + out.len()).ok_or_else(|| {
                    Error::invalid(format!(
                        "compressed unit at guest offset {unit} inflates to {} bytes, short of the mapping",
                        data.len()
                    ))
                    .with_path(&self.path)
                })?;
                out.copy_from_slice(src);
                Ok(())
            }
        }
    }

    fn compressed_unit(&self, unit: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((u, data)) = &*self.unit_cache.lock().unwrap_or_else(|e| e.into_inner()) {
            if *u == unit {
                return Ok(Arc::clone(data));
            }
        }
        let mut v = Vec::new();
        self.driver
            .read_compressed(unit, &mut v)
            .map_err(|e| e.with_path(&self.path))?;
        let data = Arc::new(v);
        *self.unit_cache.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((unit, Arc::clone(&data)));
        Ok(data)
    }

    /// Read from the backing chain what this image leaves unallocated; zeroes past the backing
    /// image's end or when there is none.
    fn read_backing(&self, out: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) => {
                let bsize = b.virtual_size();
                let avail = bsize.saturating_sub(offset).min(out.len() as u64) as usize;
                if avail > 0 {
                    b.read_at(&mut out[..avail], offset)?;
                }
                out[avail..].fill(0);
                Ok(())
            }
            None if self.backing_skipped => Err(Error::new(
                ErrorKind::Usage,
                "reading an unallocated range needs the backing file, which was not opened",
            )
            .with_path(&self.path)),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    /// Where the guest range at `offset` comes from, resolved through the chain (for `map`).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range(offset, len.max(1))?;
        self.block_status_at(offset, len, 0)
    }

    fn block_status_at(&self, offset: u64, len: u64, depth: usize) -> Result<BlockStatus> {
        let m = self.mapping(offset, len)?;
        let st = |kind, offset| BlockStatus {
            start: m.start,
            len: m.len,
            depth,
            kind,
            offset,
        };
        Ok(match m.kind {
            MapKind::Data { file, offset: host } => {
                st(BlockKind::Data, if file == 0 { Some(host) } else { None })
            }
            MapKind::Zero => st(BlockKind::Zero, None),
            MapKind::Compressed { .. } => st(BlockKind::Compressed, None),
            MapKind::Unallocated => match &self.backing {
                Some(b) if offset < b.virtual_size() => {
                    let blen = m.len.min(b.virtual_size() - offset);
                    b.block_status_at(offset, blen, depth + 1)?
                }
                Some(_) => BlockStatus {
                    depth: depth + 1,
                    ..st(BlockKind::Unallocated, None)
                },
                None => st(BlockKind::Unallocated, None),
            },
        })
    }

    /// Write guest bytes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        *self.unit_cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.driver
            .write_at(buf, offset, self.backing.as_deref())
            .map_err(|e| e.with_path(&self.path))
    }

    /// Make a guest range read as zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        *self.unit_cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.driver
            .write_zeroes(offset, len, self.backing.as_deref())
            .map_err(|e| e.with_path(&self.path))
    }

    /// Write cached metadata and sync.
    pub fn flush(&self) -> Result<()> {
        self.driver.flush().map_err(|e| e.with_path(&self.path))
    }

    /// Finish the image (footers, dirty flags) and release it.
    pub fn close(self) -> Result<()> {
        self.driver.close().map_err(|e| e.with_path(&self.path))
    }

    /// Change the virtual size.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.driver
            .resize(new_size)
            .map_err(|e| e.with_path(&self.path))
    }
}

/// How a guest range reads, resolved through the backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Stored data.
    Data,
    /// Stored compressed.
    Compressed,
    /// Allocated, reads as zero.
    Zero,
    /// Allocated nowhere in the chain: reads as zero.
    Unallocated,
}

/// One range of `map` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Guest offset.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// Which layer answered (0 = the top image).
    pub depth: usize,
    /// What it is.
    pub kind: BlockKind,
    /// Host offset in that layer's image file, for uncompressed data.
    pub offset: Option<u64>,
}
