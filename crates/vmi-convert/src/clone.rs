//! `clone`: full clones (a flattened, standalone copy in any format, through
//! [`crate::convert_to_path`]) and linked clones (a thin qcow2 overlay whose backing file is the
//! source: creating one writes a few clusters whatever the source's size).
//!
//! Every clone records where it came from in a sidecar file `NAME.vmi.json` beside it (a sidecar
//! works for every output format and survives tools that rewrite headers). The record holds the
//! source's canonical path and format, and an identity of the source taken cheaply at clone time:
//! its file size, modification time, and the SHA-256 of its first and last
//! [`IDENTITY_SPAN`] bytes, where every supported format keeps its header, footer and top-level
//! tables. It is an identity, not a digest of every guest byte (that would take time proportional
//! to the image), and [`verify_source`] uses it to tell whether the source has changed since.

use crate::convert::{ConvertOptions, ConvertStats};
use crate::install::{convert_to_path, Target};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;
use vmi_disk::driver::BackingSpec;
use vmi_disk::image::BackingMode;
use vmi_disk::{CreateOptions, Error, Format, Image, OpenOptions, Result};

/// Bytes hashed at each end of the source file for its identity digest.
pub const IDENTITY_SPAN: u64 = 1 << 20;
/// Largest sidecar read back (it is a few hundred bytes).
const MAX_SIDECAR: u64 = 64 * 1024;

/// Where a clone came from: the contents of `NAME.vmi.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// `"full"` or `"linked"`.
    pub kind: String,
    /// Canonical path of the source image file.
    pub source: String,
    /// The source's format.
    pub source_format: String,
    /// The source's virtual size.
    pub virtual_size: u64,
    /// The source file's size in bytes at clone time.
    pub source_file_size: u64,
    /// The source file's modification time (seconds and nanoseconds since the epoch).
    pub source_mtime: [u64; 2],
    /// `sha256:` + hex SHA-256 of the source file's first and last [`IDENTITY_SPAN`] bytes.
    pub source_digest: String,
    /// When the clone was made (seconds since the epoch).
    pub created: u64,
}

/// The sidecar path of an image: `NAME.vmi.json` beside it.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_os_string();
    s.push(".vmi.json");
    PathBuf::from(s)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cheap identity of a source file: (size, mtime, digest). See the module documentation.
fn identity(path: &Path) -> Result<(u64, [u64; 2], String)> {
    let f =
        File::open(path).map_err(|e| Error::io("opening the clone source", e).with_path(path))?;
    let meta = f
        .metadata()
        .map_err(|e| Error::io("reading the clone source's metadata", e).with_path(path))?;
    let len = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or([0, 0], |d| [d.as_secs(), u64::from(d.subsec_nanos())]);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; IDENTITY_SPAN.min(len) as usize];
    let read = |buf: &mut [u8], at: u64| {
        f.read_exact_at(buf, at)
            .map_err(|e| Error::io("reading the clone source", e).with_path(path))
    };
    read(&mut buf, 0)?;
    h.update(&buf);
    if len > IDENTITY_SPAN {
        let tail = IDENTITY_SPAN.min(len - IDENTITY_SPAN);
        buf.truncate(tail as usize);
        read(&mut buf, len - tail)?;
        h.update(&buf);
    }
    h.update(len.to_le_bytes());
    Ok((len, mtime, format!("sha256:{}", hex(&h.finalize()))))
}

fn record(kind: &str, src: &Image, dst: &Path) -> Result<Provenance> {
    let source = src
        .path()
        .canonicalize()
        .map_err(|e| Error::io("resolving the clone source", e).with_path(src.path()))?;
    let (size, mtime, digest) = identity(&source)?;
    let p = Provenance {
        kind: kind.into(),
        source: source.display().to_string(),
        source_format: src.format().name().into(),
        virtual_size: src.virtual_size(),
        source_file_size: size,
        source_mtime: mtime,
        source_digest: digest,
        created: std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let side = sidecar_path(dst);
    let text = serde_json::to_string_pretty(&p)
        .map_err(|e| Error::invalid(format!("serialising provenance: {e}")))?;
    std::fs::write(&side, text + "\n")
        .map_err(|e| Error::io("writing the provenance sidecar", e).with_path(&side))?;
    Ok(p)
}

/// Read an image's provenance sidecar, if it has one.
pub fn read_provenance(image: &Path) -> Result<Option<Provenance>> {
    let side = sidecar_path(image);
    let meta = match std::fs::metadata(&side) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading the provenance sidecar", e).with_path(&side)),
    };
    if meta.len() > MAX_SIDECAR {
        return Err(Error::limit(format!(
            "provenance sidecar is {} bytes, more than {MAX_SIDECAR}",
            meta.len()
        ))
        .with_path(&side));
    }
    let text = std::fs::read_to_string(&side)
        .map_err(|e| Error::io("reading the provenance sidecar", e).with_path(&side))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::invalid(format!("provenance sidecar: {e}")).with_path(&side))
}

/// Whether the source a clone records still has the identity it had at clone time.
pub fn verify_source(p: &Provenance) -> Result<bool> {
    let (size, mtime, digest) = identity(Path::new(&p.source))?;
    Ok(size == p.source_file_size && mtime == p.source_mtime && digest == p.source_digest)
}

/// Full clone: convert `src` (flattened through its chain) into `target` and record provenance.
pub fn clone_full(src: &Image, target: &Target, opts: &ConvertOptions) -> Result<Provenance> {
    let _: ConvertStats = convert_to_path(src, target, opts)?;
    record("full", src, &target.path)
}

/// Linked clone: create a qcow2 overlay at `dst` backed by the image at `src` and record
/// provenance. The overlay names its source by file name when both share a folder (so the pair
/// can move together) and by canonical path otherwise. Refuses to overwrite `dst`.
pub fn clone_linked(src: &Path, src_format: Option<Format>, dst: &Path) -> Result<Provenance> {
    if std::fs::symlink_metadata(dst).is_ok() {
        return Err(Error::usage("the clone destination already exists").with_path(dst));
    }
    let img = Image::open(
        src,
        &OpenOptions::new()
            .format(src_format)
            .backing(BackingMode::Skip),
    )?;
    let canon = src
        .canonicalize()
        .map_err(|e| Error::io("resolving the clone source", e).with_path(src))?;
    let dst_dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let same_dir = dst_dir.canonicalize().ok().as_deref() == canon.parent();
    let name = match (same_dir, canon.file_name()) {
        (true, Some(n)) => n.to_string_lossy().into_owned(),
        _ => canon.display().to_string(),
    };
    let spec = BackingSpec {
        name,
        format: Some(img.format()),
    };
    let created = Image::create(
        dst,
        Format::Qcow2,
        &CreateOptions::new(img.virtual_size()).backing(spec),
    )?;
    created.close()?;
    match record("linked", &img, dst) {
        Ok(p) => Ok(p),
        Err(e) => {
            let _ = std::fs::remove_file(dst);
            Err(e)
        }
    }
}
