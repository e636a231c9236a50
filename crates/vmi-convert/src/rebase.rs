//! `rebase`: change the backing file an overlay records (qemu-img rebase semantics).
//!
//! Safe mode keeps the overlay's guest contents: wherever the overlay itself allocates nothing,
//! the old chain and the new backing are read side by side, and the ranges where they differ are
//! copied (from the old chain) into the overlay before the header is rewritten. Ranges the overlay
//! allocates, and ranges where old and new agree, are left alone, so only what differs is copied.
//! An empty new backing name flattens: the overlay receives everything it used to read from its
//! chain and becomes standalone. Unsafe mode (`-u`) rewrites the header only.

use std::path::{Path, PathBuf};
use vmi_disk::driver::{BackingSpec, MapKind};
use vmi_disk::gate::Gate;
use vmi_disk::image::BackingMode;
use vmi_disk::{Error, Format, Image, OpenOptions, Referral, Result};

/// Largest range compared (and copied) at once; a multiple of every cluster size up to 2 MiB.
const REBASE_CHUNK: u64 = 2 << 20;

/// What to rebase onto.
#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// The overlay's format (`-f`); probed when `None`.
    pub format: Option<Format>,
    /// New backing file name, recorded as given and resolved against the overlay's folder as
    /// qemu does (`-b`). `None` or an empty name flattens the overlay into a standalone image.
    pub backing: Option<String>,
    /// New backing format (`-F`); probed from the new backing file when `None`.
    pub backing_format: Option<Format>,
    /// Rewrite the header only (`-u`): the guest contents change if old and new backing differ.
    pub header_only: bool,
    /// Gate for opening the overlay's current chain (must allow backing files in safe mode).
    pub gate: Gate,
}

/// What a rebase did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebaseStats {
    /// Guest bytes copied into the overlay because old and new backing differ there.
    pub copied_bytes: u64,
    /// The backing the overlay records now.
    pub backing: Option<BackingSpec>,
}

/// Open a backing file the user named (it may live anywhere); its own chain stays confined to
/// its folder. Relative names resolve against the overlay's folder.
pub(crate) fn open_named_backing(
    overlay: &Path,
    name: &str,
    format: Option<Format>,
) -> Result<Image> {
    let dir = match overlay.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let guess = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        dir.join(name)
    };
    let root = guess.parent().unwrap_or(&dir).to_path_buf();
    let gate = Gate::new().allow_backing(true).confine_to(root);
    let path = gate.resolve(Referral::Backing, overlay, name)?;
    Image::open(&path, &OpenOptions::new().format(format).gate(gate))
        .map_err(|e| e.context(format!("opening the new backing file '{name}'")))
}

/// Read `buf.len()` guest bytes at `offset` from `img`, zeroes past its end or with no image.
fn read_view(img: Option<&Image>, buf: &mut [u8], offset: u64) -> Result<()> {
    buf.fill(0);
    let Some(img) = img else { return Ok(()) };
    let size = img.virtual_size();
    if offset >= size {
        return Ok(());
    }
    let n = (size - offset).min(buf.len() as u64) as usize;
    img.read_at(&mut buf[..n], offset)
}

/// Rebase the overlay at `path` (see the module documentation).
pub fn rebase(path: &Path, opts: &RebaseOptions) -> Result<RebaseStats> {
    let name = opts.backing.clone().filter(|n| !n.is_empty());
    let mode = if opts.header_only {
        BackingMode::Skip
    } else {
        BackingMode::Open
    };
    let img = Image::open(
        path,
        &OpenOptions::new()
            .format(opts.format)
            .write(true)
            .gate(opts.gate.clone())
            .backing(mode),
    )?;
    if !matches!(img.format(), Format::Qcow2 | Format::Vmdk) {
        // Refuse before copying anything: only these formats can record a new backing file.
        return Err(Error::unsupported(format!(
            "changing the backing file recorded in {} images",
            img.format()
        ))
        .with_path(path));
    }
    if !opts.header_only && img.driver().backing().is_some() && img.backing_image().is_none() {
        return Err(Error::usage(
            "the overlay's current backing file could not be opened; a safe rebase needs it (use -u to rewrite the header only)",
        )
        .with_path(path));
    }
    let new_backing = match &name {
        Some(n) => match open_named_backing(path, n, opts.backing_format) {
            Ok(b) => Some(b),
            Err(e) if opts.header_only => {
                // Unsafe mode may name a file that is not there yet; only its format is lost.
                if opts.backing_format.is_none() {
                    return Err(e.context("probing the new backing format (give -F)"));
                }
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let spec = name.map(|n| BackingSpec {
        name: n,
        format: opts
            .backing_format
            .or_else(|| new_backing.as_ref().map(Image::format)),
    });
    let mut copied = 0u64;
    if !opts.header_only {
        copied = copy_differences(&img, new_backing.as_ref())?;
        img.flush()?;
    }
    img.driver()
        .set_backing(spec.as_ref(), new_backing.as_ref())
        .map_err(|e| e.with_path(path))?;
    img.close()?;
    Ok(RebaseStats {
        copied_bytes: copied,
        backing: spec,
    })
}

/// Copy into `img` every range it does not allocate where its current chain and `new` differ.
fn copy_differences(img: &Image, new: Option<&Image>) -> Result<u64> {
    let size = img.virtual_size();
    let old = img.backing_image();
    // Compare per allocation unit so that only units that differ get allocated.
    let unit = img
        .driver()
        .info()
        .cluster_size
        .unwrap_or(65536)
        .clamp(512, REBASE_CHUNK);
    let mut a = vec![0u8; REBASE_CHUNK as usize];
    let mut b = vec![0u8; REBASE_CHUNK as usize];
    let mut copied = 0u64;
    let mut off = 0u64;
    while off < size {
        let m = img.mapping(off, size - off)?;
        let run_end = off + m.len;
        if m.kind != MapKind::Unallocated {
            off = run_end;
            continue;
        }
        while off < run_end {
            let end = ((off / REBASE_CHUNK + 1) * REBASE_CHUNK).min(run_end);
            let n = (end - off) as usize;
            read_view(old, &mut a[..n], off)?;
            read_view(new, &mut b[..n], off)?;
            // Runs of consecutive differing units, each written at once.
            let mut pos = off;
            let mut run: Option<u64> = None;
            while pos < end {
                let next = ((pos / unit + 1) * unit).min(end);
                let (i, j) = ((pos - off) as usize, (next - off) as usize);
                let differs = a[i..j] != b[i..j];
                match (differs, run) {
                    (true, None) => run = Some(pos),
                    (false, Some(start)) => {
                        let k = (start - off) as usize;
                        img.write_at(&a[k..i], start)?;
                        copied += pos - start;
                        run = None;
                    }
                    _ => {}
                }
                pos = next;
            }
            if let Some(start) = run {
                let k = (start - off) as usize;
                img.write_at(&a[k..n], start)?;
                copied += end - start;
            }
            off = end;
        }
    }
    Ok(copied)
}
