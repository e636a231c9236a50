//! `commit`: merge an overlay into its backing image, or into an image further down its chain
//! (qemu-img commit semantics).
//!
//! Every range that the overlay — or an image between it and the base — allocates is written into
//! the base with the contents the overlay shows (zero ranges become zero writes, so the base can
//! keep them sparse). The base grows when the overlay is larger. Afterwards the overlay is emptied
//! (every cluster unallocated, so it reads through to the now up-to-date base) unless `keep` is
//! set. Committing into an image further down implies `keep`, as with qemu: the images in between
//! no longer hold a consistent state, but the overlay still reads correctly through them.

use std::path::{Path, PathBuf};
use vmi_disk::gate::Gate;
use vmi_disk::image::BlockKind;
use vmi_disk::{Error, Format, Image, OpenOptions, Result};

/// Largest range read and written at once.
const COMMIT_CHUNK: u64 = 2 << 20;

/// How to commit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The overlay's format (`-f`); probed when `None`.
    pub format: Option<Format>,
    /// The image to commit into (`-b`): any image of the chain below the overlay. `None` is the
    /// overlay's direct backing file.
    pub base: Option<PathBuf>,
    /// Keep the overlay's contents (`-d`) instead of emptying it.
    pub keep: bool,
    /// Gate for opening the chain (must allow backing files).
    pub gate: Gate,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The image committed into.
    pub base: PathBuf,
    /// Guest bytes written into it.
    pub committed_bytes: u64,
    /// Whether the overlay was emptied.
    pub emptied: bool,
}

/// Commit the overlay at `path` (see the module documentation).
pub fn commit(path: &Path, opts: &CommitOptions) -> Result<CommitOutcome> {
    let top = Image::open(
        path,
        &OpenOptions::new()
            .format(opts.format)
            .write(!opts.keep)
            .gate(opts.gate.clone()),
    )?;
    if top.driver().backing().is_none() {
        return Err(Error::usage("the image has no backing file to commit into").with_path(path));
    }
    // The chain below the overlay, with each layer's depth (1 = the direct backing file).
    let mut chain = Vec::new();
    let mut layer = top.backing_image();
    while let Some(l) = layer {
        chain.push(l);
        layer = l.backing_image();
    }
    let (depth, base_layer) = match &opts.base {
        None => chain
            .first()
            .map(|l| (1usize, *l))
            .ok_or_else(|| Error::usage("the backing file is not open").with_path(path))?,
        Some(b) => {
            let want = b
                .canonicalize()
                .map_err(|e| Error::io("resolving the commit base", e).with_path(b))?;
            chain
                .iter()
                .enumerate()
                .find(|(_, l)| l.path().canonicalize().ok().as_deref() == Some(want.as_path()))
                .map(|(i, l)| (i + 1, *l))
                .ok_or_else(|| {
                    Error::usage(format!(
                        "{} is not in the backing chain of the image",
                        b.display()
                    ))
                    .with_path(path)
                })?
        }
    };
    let keep = opts.keep || depth > 1;
    let base_path = base_layer.path().to_path_buf();
    let base = Image::open(
        &base_path,
        &OpenOptions::new()
            .format(Some(base_layer.format()))
            .write(true)
            .gate(opts.gate.rooted_at_image(path)),
    )
    .map_err(|e| e.context("opening the commit base for writing"))?;
    let size = top.virtual_size();
    if base.virtual_size() < size {
        base.resize(size)?;
    }
    let mut buf = vec![0u8; COMMIT_CHUNK as usize];
    let mut committed = 0u64;
    let mut off = 0u64;
    while off < size {
        let st = top.block_status(off, (size - off).min(COMMIT_CHUNK))?;
        let len = st.len;
        if st.depth < depth {
            match st.kind {
                BlockKind::Data | BlockKind::Compressed => {
                    let b = &mut buf[..len as usize];
                    top.read_at(b, off)?;
                    base.write_at(b, off)?;
                }
                BlockKind::Zero | BlockKind::Unallocated => base.write_zeroes(off, len)?,
            }
            committed += len;
        }
        off += len;
    }
    base.close()?;
    let mut emptied = false;
    // Formats other than qcow2 cannot discard allocated blocks: their overlay keeps its (now
    // redundant) data, which still reads the same.
    if !keep && top.format() == Format::Qcow2 {
        vmi_disk::formats::qcow2::make_empty(&top)?;
        emptied = true;
    }
    top.close()?;
    Ok(CommitOutcome {
        base: base_path,
        committed_bytes: committed,
        emptied,
    })
}
