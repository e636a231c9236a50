//! vmdk: VMware virtual disks (VMware "Virtual Disk Format 1.1"; qemu's `block/vmdk.c` is the
//! reference for what tools actually write).
//!
//! Subformats: `monolithicSparse` (one hosted sparse extent with an embedded descriptor),
//! `streamOptimized` (compressed grains with markers, written in order, directory at the end),
//! `monolithicFlat`, `twoGbMaxExtentFlat` and `twoGbMaxExtentSparse` (a text descriptor naming
//! extent files). Extent files are opened only through the gate, which confines them to the
//! descriptor's folder and refuses any name with a directory part (CVE-2022-47951).
//!
//! File 0 is the file that was opened (the sparse extent itself, or the text descriptor); extent
//! files are numbered from 1 in descriptor order.

pub mod descriptor;
pub mod sparse;
pub mod stream;

use crate::check::{CheckMode, CheckReport};
use crate::driver::{BackingSpec, CompressedWrite, Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{Confidence, CreateContext, Format, OpenContext, ProbeInput};
use crate::gate::{check_reference_syntax, Gate, Referral};
use crate::image::Image;
use crate::options::CreateOptions;
use crate::storage::{FileStorage, Storage};
use descriptor::{
    Access, Descriptor, ExtentLine, ExtentType, CID_NO_PARENT, MAX_DESCRIPTOR_SIZE, SECTOR,
};
use serde_json::json;
use sparse::{GrainMap, Header, RawHeader, SparseExtent};
use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use stream::StreamWriter;

/// What a text descriptor file starts with (VMDK 1.1, "The Descriptor File").
const DESCRIPTOR_SIGNATURE: &[u8] = b"# Disk DescriptorFile";
/// Size of each extent of the `twoGbMaxExtent*` subformats, as qemu splits them: 2 GiB.
const SPLIT_BYTES: u64 = 2 << 30;
/// qemu's default `ddb.toolsVersion`.
const DEFAULT_TOOLS_VERSION: &str = "2147483647";
/// Subformats vmi creates (qemu's `subformat` option values).
const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];
/// Adapter types (qemu's `adapter_type` option values).
const ADAPTERS: [&str; 4] = ["ide", "lsilogic", "buslogic", "legacyESX"];

pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    let head = input.head;
    if head.starts_with(&sparse::SPARSE_MAGIC) {
        return Some(if Header::parse(head).is_ok() {
            Confidence::Certain
        } else {
            Confidence::Weak
        });
    }
    if head.starts_with(&sparse::COWD_MAGIC) {
        return Some(Confidence::Weak);
    }
    if head.starts_with(DESCRIPTOR_SIGNATURE) && contains(head, b"createType") {
        return Some(Confidence::Certain);
    }
    None
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What backs one extent.
#[derive(Debug)]
enum ExtentKind {
    /// Verbatim in `file` from byte `offset`.
    Flat { file: usize, offset: u64 },
    /// Reads as zeroes.
    Zero,
    /// A hosted sparse extent.
    Sparse(SparseExtent),
}

/// One extent placed in the guest address space.
#[derive(Debug)]
struct Extent {
    /// Guest byte offset of the extent's first byte.
    start: u64,
    /// Guest bytes.
    len: u64,
    kind: ExtentKind,
    /// File name as the descriptor gives it (the image's own name for monolithic images).
    name: String,
    /// Descriptor type word, empty for the extent of a monolithic image.
    type_name: &'static str,
    /// Whether the descriptor lets the extent be written (`RW`).
    rw: bool,
}

/// An open VMDK image.
#[derive(Debug)]
pub struct VmdkDriver {
    files: Vec<Box<dyn Storage>>,
    extents: Vec<Extent>,
    size: u64,
    desc: Descriptor,
    /// Where the descriptor text lives, for updating its CID.
    text: Option<DescriptorText>,
    /// Current content id (a new one is written on the first write, as qemu does).
    cid: AtomicU32,
    cid_updated: AtomicBool,
    writable: bool,
    backing: Option<BackingSpec>,
    stream: Option<Mutex<StreamWriter>>,
}

/// The descriptor text as found in file 0.
#[derive(Debug, Clone)]
struct DescriptorText {
    /// Byte offset in file 0.
    offset: u64,
    /// Bytes available there (the embedded area), or `None` for a standalone descriptor file.
    area: Option<u64>,
    /// The text.
    text: Vec<u8>,
}

/// `text` with its `CID=` line replaced by `cid`.
fn replace_cid(text: &[u8], cid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for line in text.split_inclusive(|&b| b == b'\n') {
        let key = line.split(|&b| b == b'=').next().unwrap_or(b"");
        if line.contains(&b'=') && key.trim_ascii() == b"CID" {
            out.extend_from_slice(format!("CID={cid:08x}").as_bytes());
            if line.ends_with(b"\n") {
                out.push(b'\n');
            }
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

/// `text` with its `parentCID=` line set to `parent_cid` and its `parentFileNameHint=` line set
/// to `hint` (inserted after `parentCID` when missing, removed when `hint` is `None`).
fn replace_parent(text: &[u8], hint: Option<&str>, parent_cid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + hint.map_or(0, str::len) + 32);
    let hint_line = hint.map(|h| format!("parentFileNameHint=\"{h}\"\n"));
    let mut hint_done = false;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let key = line
            .split(|&b| b == b'=')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        if !line.contains(&b'=') {
            out.extend_from_slice(line);
        } else if key == b"parentCID" {
            out.extend_from_slice(format!("parentCID={parent_cid:08x}\n").as_bytes());
            if let (Some(h), false) = (&hint_line, hint_done) {
                out.extend_from_slice(h.as_bytes());
                hint_done = true;
            }
        } else if key == b"parentFileNameHint" {
            // Written next to parentCID (or dropped).
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

fn random_cid() -> u32 {
    let b = uuid::Uuid::new_v4();
    let b = b.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    let len = storage.len().map_err(|e| Error::io("reading size", e))?;
    let mut magic = [0u8; 4];
    if len >= 4 {
        storage
            .read_at(&mut magic, 0)
            .map_err(|e| Error::io("reading magic", e))?;
    }
    if magic == sparse::SPARSE_MAGIC {
        return Ok(Box::new(open_monolithic(
            storage,
            &ctx.path.display().to_string(),
            ctx.writable,
        )?));
    }
    if magic == sparse::COWD_MAGIC {
        return Err(Error::unsupported("ESX Server sparse (COWD) VMDK extents"));
    }
    if len > MAX_DESCRIPTOR_SIZE {
        return Err(Error::limit(format!(
            "VMDK descriptor file is {len} bytes, more than the {MAX_DESCRIPTOR_SIZE} allowed"
        )));
    }
    let mut text = vec![0u8; len as usize];
    storage
        .read_at(&mut text, 0)
        .map_err(|e| Error::io("reading descriptor", e))?;
    let desc = Descriptor::parse(&text)?;
    let text = DescriptorText {
        offset: 0,
        area: None,
        text,
    };
    let mut files: Vec<Option<Box<dyn Storage>>> = Vec::with_capacity(desc.extents.len());
    for line in &desc.extents {
        let Some(name) = &line.file else {
            files.push(None);
            continue;
        };
        let writable = ctx.writable && line.access == Access::ReadWrite;
        let o = ctx.gate.open(Referral::Extent, &ctx.path, name, writable)?;
        let f = FileStorage::from_open_file(o.file, &o.path, writable)
            .map_err(|e| Error::io(format!("opening extent file '{}'", name.escape_debug()), e))?;
        files.push(Some(Box::new(f)));
    }
    Ok(Box::new(assemble(
        storage,
        &ctx.path,
        files,
        desc,
        Some(text),
        ctx.writable,
    )?))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Open a file that starts with a `KDMV` header as a whole image.
fn open_monolithic(storage: Box<dyn Storage>, name: &str, writable: bool) -> Result<VmdkDriver> {
    let x = SparseExtent::open(storage.as_ref(), 0)?;
    let mut first = [0u8; SECTOR as usize];
    storage
        .read_at(&mut first, 0)
        .map_err(|e| Error::io("reading header", e))?;
    let h0 = Header::parse(&first)?;
    let embedded = match h0.descriptor {
        Some((off, sectors)) => {
            let at = off.checked_mul(SECTOR);
            let n = sectors.saturating_mul(SECTOR).min(MAX_DESCRIPTOR_SIZE);
            let end = at.and_then(|a| a.checked_add(n));
            if end.is_none_or(|e| e > x.file_len()) {
                return Err(Error::invalid(format!(
                    "embedded descriptor at sector {off} ({sectors} sectors) lies beyond the end of the file"
                )));
            }
            let mut buf = vec![0u8; n as usize];
            storage
                .read_at(&mut buf, off * SECTOR)
                .map_err(|e| Error::io("reading embedded descriptor", e))?;
            if buf.iter().all(|&b| b == 0) {
                None
            } else {
                let d = Descriptor::parse(&buf).map_err(|e| e.context("embedded descriptor"))?;
                let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                buf.truncate(end);
                Some((
                    d,
                    DescriptorText {
                        offset: off * SECTOR,
                        area: Some(n),
                        text: buf,
                    },
                ))
            }
        }
        None => None,
    };
    let create_type = if x.header.compressed() {
        "streamOptimized"
    } else {
        "monolithicSparse"
    };
    let (desc, text) = match embedded {
        Some((d, t)) => (d, Some(t)),
        None => (
            Descriptor {
                parent_cid: CID_NO_PARENT,
                create_type: create_type.to_string(),
                ..Descriptor::default()
            },
            None,
        ),
    };
    let size = x.capacity_bytes();
    let backing = desc
        .parent_hint
        .clone()
        .map(|name| BackingSpec { name, format: None });
    Ok(VmdkDriver {
        files: vec![storage],
        extents: vec![Extent {
            start: 0,
            len: size,
            kind: ExtentKind::Sparse(x),
            name: name.to_string(),
            type_name: "",
            rw: true,
        }],
        size,
        cid: AtomicU32::new(desc.cid),
        cid_updated: AtomicBool::new(false),
        desc,
        text,
        writable,
        backing,
        stream: None,
    })
}

/// Build a driver from a descriptor and its opened extent files (`None` for `ZERO` extents).
fn assemble(
    main: Box<dyn Storage>,
    path: &Path,
    files: Vec<Option<Box<dyn Storage>>>,
    desc: Descriptor,
    text: Option<DescriptorText>,
    writable: bool,
) -> Result<VmdkDriver> {
    let total = desc.total_bytes()?;
    if total / SECTOR > sparse::MAX_CAPACITY_SECTORS {
        return Err(Error::limit(format!(
            "descriptor declares {total} bytes, more than the {} supported",
            sparse::MAX_CAPACITY_SECTORS * SECTOR
        )));
    }
    let mut all: Vec<Box<dyn Storage>> = vec![main];
    let mut extents = Vec::with_capacity(desc.extents.len());
    let mut start = 0u64;
    for (i, (line, file)) in desc.extents.iter().zip(files).enumerate() {
        let len = line.sectors * SECTOR;
        // Named as qemu names them: the descriptor's folder joined with the extent's name.
        let name = match &line.file {
            Some(f) => path.with_file_name(f).display().to_string(),
            None => String::new(),
        };
        let kind = match (line.kind, file) {
            (ExtentType::Zero, _) => ExtentKind::Zero,
            (_, None) => return Err(Error::invalid(format!("extent {i} has no file"))),
            (ExtentType::Flat | ExtentType::Vmfs, Some(f)) => {
                let offset = line.offset.checked_mul(SECTOR).ok_or_else(|| {
                    Error::invalid(format!("extent {i} offset {} overflows", line.offset))
                })?;
                let flen = f.len().map_err(|e| Error::io("reading extent size", e))?;
                if offset.checked_add(len).is_none_or(|e| e > flen) {
                    return Err(Error::invalid(format!(
                        "flat extent '{}' is {flen} bytes, short of its {len} bytes from offset {offset}",
                        name.escape_debug()
                    )));
                }
                all.push(f);
                ExtentKind::Flat {
                    file: all.len() - 1,
                    offset,
                }
            }
            (ExtentType::Sparse, Some(f)) => {
                let x = SparseExtent::open(f.as_ref(), all.len())
                    .map_err(|e| e.context(format!("extent '{}'", name.escape_debug())))?;
                if line.sectors > x.header.capacity {
                    return Err(Error::invalid(format!(
                        "extent '{}' is listed as {} sectors but holds {}",
                        name.escape_debug(),
                        line.sectors,
                        x.header.capacity
                    )));
                }
                all.push(f);
                ExtentKind::Sparse(x)
            }
        };
        if len > 0 {
            extents.push(Extent {
                start,
                len,
                kind,
                name,
                type_name: line.kind.name(),
                rw: line.access == Access::ReadWrite,
            });
        }
        start += len;
    }
    let backing = desc
        .parent_hint
        .clone()
        .map(|name| BackingSpec { name, format: None });
    Ok(VmdkDriver {
        files: all,
        extents,
        size: total,
        cid: AtomicU32::new(desc.cid),
        cid_updated: AtomicBool::new(false),
        desc,
        text,
        writable,
        backing,
        stream: None,
    })
}

pub(crate) fn create(
    storage: Box<dyn Storage>,
    ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    let o = &opts.options;
    let sub = o
        .choice("subformat", &SUBFORMATS)?
        .unwrap_or_else(|| "monolithicSparse".into());
    let adapter = o
        .choice("adapter_type", &ADAPTERS)?
        .unwrap_or_else(|| "ide".into());
    let hw = o.str("hwversion");
    let compat6 = o.bool("compat6")?.unwrap_or(false);
    let tools = o
        .str("toolsversion")
        .unwrap_or_else(|| DEFAULT_TOOLS_VERSION.into());
    let zeroed = o.bool("zeroed_grain")?.unwrap_or(false);
    if let Some(f) = o.str("backing_fmt") {
        if f != "vmdk" {
            return Err(Error::usage("backing_fmt must be 'vmdk' if present"));
        }
    }
    // qemu's other preallocation modes (falloc, full) are not implemented.
    o.choice("preallocation", &["off"])?;
    o.finish("vmdk")?;
    for (what, v) in [
        ("hwversion", hw.as_deref()),
        ("toolsversion", Some(tools.as_str())),
    ] {
        if let Some(v) = v {
            descriptor_safe(what, v)?;
        }
    }
    descriptor_safe("image file name", &file_name(&ctx.path))?;
    if let Some(b) = &opts.backing {
        descriptor_safe("backing file name", &b.name)?;
    }
    if hw.is_some() && compat6 {
        return Err(Error::usage(
            "hwversion and compat6 cannot be given together",
        ));
    }
    let parent = match &opts.backing {
        Some(_) if sub == "streamOptimized" => {
            return Err(Error::usage(
                "streamOptimized images cannot have a backing file",
            ))
        }
        Some(spec) => Some((spec.name.clone(), parent_cid(ctx, spec)?)),
        None => None,
    };
    if opts.size % SECTOR != 0 {
        return Err(Error::usage(format!(
            "vmdk size {} is not a multiple of 512 bytes",
            opts.size
        )));
    }
    let sectors = opts.size / SECTOR;
    if sectors > sparse::MAX_CAPACITY_SECTORS {
        return Err(Error::limit(format!(
            "vmdk size {} is more than the {} supported",
            opts.size,
            sparse::MAX_CAPACITY_SECTORS * SECTOR
        )));
    }
    let hw = hw.unwrap_or_else(|| if compat6 { "6" } else { "4" }.into());
    let cid = random_cid();
    let name = file_name(&ctx.path);
    let mut desc = Descriptor {
        cid,
        parent_cid: parent.as_ref().map_or(CID_NO_PARENT, |p| p.1),
        create_type: sub.clone(),
        parent_hint: parent.map(|p| p.0),
        extents: Vec::new(),
        adapter_type: Some(adapter.clone()),
        hw_version: Some(hw),
        geometry: Some(descriptor::geometry(opts.size, &adapter)),
        uuid: None,
        tools_version: Some(tools),
    };
    let rw = |sectors, kind, file: String| ExtentLine {
        access: Access::ReadWrite,
        sectors,
        kind,
        file: Some(file),
        offset: 0,
    };
    match sub.as_str() {
        "monolithicSparse" => {
            desc.extents
                .push(rw(sectors, ExtentType::Sparse, name.clone()));
            sparse::create(storage.as_ref(), sectors, zeroed, desc.render().as_bytes())?;
            let shown = ctx.path.display().to_string();
            Ok(Box::new(open_monolithic(storage, &shown, true)?))
        }
        "streamOptimized" => {
            desc.extents
                .push(rw(sectors, ExtentType::Sparse, name.clone()));
            create_stream(storage, &ctx.path.display().to_string(), sectors, &desc)
        }
        _ => {
            let (sparse_ext, split) = match sub.as_str() {
                "monolithicFlat" => (false, None),
                "twoGbMaxExtentFlat" => (false, Some('f')),
                _ => (true, Some('s')),
            };
            let (stem, ext) = match name.rfind('.') {
                Some(i) if i > 0 => (&name[..i], &name[i..]),
                _ => (name.as_str(), ""),
            };
            let chunk = if split.is_some() {
                SPLIT_BYTES / SECTOR
            } else {
                sectors.max(1)
            };
            let mut left = sectors;
            let mut i = 0;
            while left > 0 || (i == 0 && split.is_none()) {
                let n = left.min(chunk);
                let file = match split {
                    None => format!("{stem}-flat{ext}"),
                    Some(c) => format!("{stem}-{c}{:03}{ext}", i + 1),
                };
                let kind = if sparse_ext {
                    ExtentType::Sparse
                } else {
                    ExtentType::Flat
                };
                desc.extents.push(rw(n, kind, file));
                left -= n;
                i += 1;
                if n == 0 {
                    break;
                }
            }
            create_split(storage, ctx, desc, zeroed)
        }
    }
}

/// Refuse a value that would break out of its quoted descriptor field (a quote, a line break, a
/// NUL): descriptors are line-oriented text.
fn descriptor_safe(what: &str, v: &str) -> Result<()> {
    if v.chars().any(|c| c == '"' || c.is_control()) {
        return Err(Error::usage(format!(
            "{what} '{}' cannot be written into a vmdk descriptor (quotes and control characters are not allowed)",
            v.escape_debug()
        )));
    }
    Ok(())
}

/// The CID of the backing image `spec` names, which qemu records as `parentCID`. The backing file
/// must be a VMDK image; it is opened read-only through the gate, confined to the new image's
/// folder.
fn parent_cid(ctx: &CreateContext, spec: &BackingSpec) -> Result<u32> {
    if spec.format.is_some_and(|f| f != Format::Vmdk) {
        return Err(Error::usage(
            "the backing file of a vmdk image must be a vmdk image",
        ));
    }
    let gate = Gate::new().allow_backing(true).rooted_at_image(&ctx.path);
    let o = gate.open(Referral::Backing, &ctx.path, &spec.name, false)?;
    let path = o.path;
    let storage = FileStorage::from_open_file(o.file, &path, false)
        .map_err(|e| Error::io(format!("opening backing file {}", path.display()), e))?;
    let octx = OpenContext {
        path: path.clone(),
        writable: false,
        gate: Gate::new(),
        secret: None,
    };
    let parent = open(Box::new(storage), &octx)
        .map_err(|e| e.context("the backing file of a vmdk image must be a vmdk image"))?;
    parent
        .as_any()
        .downcast_ref::<VmdkDriver>()
        .map(|d| d.cid.load(Ordering::Relaxed))
        .ok_or_else(|| Error::invalid("backing file is not a vmdk image"))
}

/// Create the extent files a descriptor names beside the descriptor, write the descriptor, and
/// open the result.
fn create_split(
    storage: Box<dyn Storage>,
    ctx: &CreateContext,
    desc: Descriptor,
    zeroed: bool,
) -> Result<Box<dyn Driver>> {
    let dir = match ctx.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut created: Vec<PathBuf> = Vec::new();
    let result = (|| {
        let mut files: Vec<Option<Box<dyn Storage>>> = Vec::new();
        for line in &desc.extents {
            let name = line.file.clone().unwrap_or_default();
            check_reference_syntax(Referral::Extent, &name)?;
            let path = dir.join(&name);
            let f = FileStorage::create(&path)
                .map_err(|e| Error::io(format!("creating extent file {}", path.display()), e))?;
            created.push(path);
            match line.kind {
                ExtentType::Sparse => sparse::create(&f, line.sectors, zeroed, b"")?,
                _ => f
                    .set_len(line.sectors * SECTOR)
                    .map_err(|e| Error::io("sizing flat extent", e))?,
            }
            files.push(Some(Box::new(f)));
        }
        let text = desc.render().into_bytes();
        storage
            .write_at(&text, 0)
            .map_err(|e| Error::io("writing descriptor", e))?;
        let text = DescriptorText {
            offset: 0,
            area: None,
            text,
        };
        assemble(storage, &ctx.path, files, desc.clone(), Some(text), true)
    })();
    match result {
        Ok(d) => Ok(Box::new(d)),
        Err(e) => {
            for p in created {
                let _ = std::fs::remove_file(p);
            }
            Err(e)
        }
    }
}

/// Start a streamOptimized image: header with the directory at the end, embedded descriptor, and
/// a writer that appends grains from the first grain-aligned sector.
fn create_stream(
    storage: Box<dyn Storage>,
    name: &str,
    sectors: u64,
    desc: &Descriptor,
) -> Result<Box<dyn Driver>> {
    let text = desc.render();
    if text.len() as u64 > sparse::EMBEDDED_DESCRIPTOR_SECTORS * SECTOR {
        return Err(Error::limit(
            "descriptor does not fit the embedded descriptor area",
        ));
    }
    let flags = sparse::FLAG_NL_DETECT | sparse::FLAG_COMPRESSED | sparse::FLAG_MARKERS;
    let mut h = RawHeader::new(3, flags, sectors, sparse::DEFAULT_GRAIN_SECTORS);
    let first = sparse::DEFAULT_GRAIN_SECTORS;
    h.descriptor_offset = 1.into();
    h.descriptor_size = sparse::EMBEDDED_DESCRIPTOR_SECTORS.into();
    h.gd_offset = sparse::GD_AT_END.into();
    h.overhead = first.into();
    h.compress_algorithm = sparse::COMPRESSION_DEFLATE.into();
    let io = |e| Error::io("writing streamOptimized header", e);
    use zerocopy::IntoBytes;
    storage.write_at(h.as_bytes(), 0).map_err(io)?;
    storage.write_at(text.as_bytes(), SECTOR).map_err(io)?;
    storage.set_len(first * SECTOR).map_err(io)?;
    let gd_entries = sectors
        .div_ceil(sparse::DEFAULT_GRAIN_SECTORS)
        .div_ceil(u64::from(sparse::GTES_PER_GT));
    let writer = StreamWriter::new(h, first, gd_entries);
    Ok(Box::new(VmdkDriver {
        files: vec![storage],
        extents: vec![Extent {
            start: 0,
            len: sectors * SECTOR,
            kind: ExtentKind::Zero,
            name: name.to_string(),
            type_name: "",
            rw: true,
        }],
        size: sectors * SECTOR,
        cid: AtomicU32::new(desc.cid),
        cid_updated: AtomicBool::new(true),
        desc: desc.clone(),
        text: None,
        writable: true,
        backing: None,
        stream: Some(Mutex::new(writer)),
    }))
}

/// The extent files a text descriptor at `path` names (for renaming and removal). Names that are
/// not plain file names are left out: they are never opened either.
pub(crate) fn companion_files(path: &Path) -> Vec<PathBuf> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut text = Vec::new();
    use std::io::Read;
    if f.take(MAX_DESCRIPTOR_SIZE + 1)
        .read_to_end(&mut text)
        .is_err()
        || text.len() as u64 > MAX_DESCRIPTOR_SIZE
        || text.starts_with(&sparse::SPARSE_MAGIC)
    {
        return Vec::new();
    }
    let Ok(desc) = Descriptor::parse(&text) else {
        return Vec::new();
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let own = file_name(path);
    desc.extents
        .iter()
        .filter_map(|e| e.file.as_deref())
        .filter(|n| *n != own && check_reference_syntax(Referral::Extent, n).is_ok())
        .map(|n| dir.join(n))
        .collect()
}

/// What an image opened from a hosted sparse extent (monolithicSparse, streamOptimized) carries
/// as its embedded descriptor, for inspection: the extent lines of such a descriptor are not used
/// to read the image, but other readers (libvmdk, older qemu) follow them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embedded<'a> {
    /// The image was opened from a text descriptor, not from a sparse extent.
    NotHosted,
    /// The header records no descriptor, or the area is all zeroes.
    Absent,
    /// The text found at this byte offset of the file.
    Text {
        /// Byte offset of the descriptor in the file.
        offset: u64,
        /// The text, up to its first NUL.
        text: &'a [u8],
    },
}

impl VmdkDriver {
    /// The embedded descriptor of an image opened from its sparse extent.
    pub fn embedded_descriptor(&self) -> Embedded<'_> {
        let hosted = self.extents.len() == 1 && self.extents[0].type_name.is_empty();
        match (&self.text, hosted) {
            (_, false) => Embedded::NotHosted,
            (None, true) => Embedded::Absent,
            (Some(t), true) => Embedded::Text {
                offset: t.offset,
                text: &t.text,
            },
        }
    }

    /// The guest size of the image (the sparse header's capacity for hosted sparse extents).
    pub fn capacity(&self) -> u64 {
        self.size
    }

    /// The descriptor (embedded or standalone): CID, createType, `ddb.*` keys, extent lines.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            cid: self.cid.load(Ordering::Relaxed),
            ..self.desc.clone()
        }
    }

    /// Give the image a new content id before its first change, as qemu does, so that children
    /// recording the old one as `parentCID` can tell their parent changed.
    fn bump_cid(&self) -> Result<()> {
        let Some(t) = &self.text else {
            return Ok(());
        };
        if !self.writable || self.cid_updated.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let cid = random_cid();
        let mut new = replace_cid(&t.text, cid);
        let s = self.storage(0)?;
        let io = |e| Error::io("updating the descriptor's CID", e);
        match t.area {
            Some(area) => {
                if new.len() as u64 > area {
                    return Ok(());
                }
                new.resize(new.len().max(t.text.len()), 0);
                s.write_at(&new, t.offset).map_err(io)?;
            }
            None => {
                s.write_at(&new, t.offset).map_err(io)?;
                s.set_len(new.len() as u64).map_err(io)?;
            }
        }
        self.cid.store(cid, Ordering::Relaxed);
        Ok(())
    }

    /// Rewrite the descriptor's parent lines (`rebase -u`); see [`Driver::set_backing`].
    fn rewrite_parent(&self, backing: Option<&BackingSpec>, parent: Option<&Image>) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("vmdk image is not open for writing"));
        }
        let Some(t) = &self.text else {
            return Err(Error::unsupported(
                "changing the backing file of a vmdk image without a descriptor",
            ));
        };
        let (hint, parent_cid) = match backing {
            None => (None, CID_NO_PARENT),
            Some(b) => {
                descriptor_safe("backing file name", &b.name)?;
                if b.format.is_some_and(|f| f != Format::Vmdk) {
                    return Err(Error::usage("a vmdk image's parent must be a vmdk image"));
                }
                let cid = parent
                    .and_then(|p| p.driver().as_any().downcast_ref::<VmdkDriver>())
                    .map(|d| d.cid.load(Ordering::Relaxed))
                    .ok_or_else(|| {
                        Error::unsupported(
                            "recording a vmdk parent needs the parent opened (its CID goes into parentCID)",
                        )
                    })?;
                (Some(b.name.as_str()), cid)
            }
        };
        // The chain changed: a new CID too, and no later CID bump from the stale text.
        self.cid_updated.store(true, Ordering::Relaxed);
        let cid = random_cid();
        let mut new = replace_cid(&replace_parent(&t.text, hint, parent_cid), cid);
        let s = self.storage(0)?;
        let io = |e| Error::io("rewriting the descriptor", e);
        match t.area {
            Some(area) => {
                if new.len() as u64 > area {
                    return Err(Error::limit(format!(
                        "the vmdk descriptor would need {} bytes, more than its {area}-byte area",
                        new.len()
                    )));
                }
                new.resize(area as usize, 0);
                s.write_at(&new, t.offset).map_err(io)?;
            }
            None => {
                s.write_at(&new, t.offset).map_err(io)?;
                s.set_len(t.offset + new.len() as u64).map_err(io)?;
            }
        }
        s.sync().map_err(|e| Error::io("syncing", e))?;
        self.cid.store(cid, Ordering::Relaxed);
        Ok(())
    }

    fn extent_at(&self, offset: u64) -> Result<&Extent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        self.extents
            .get(i)
            .filter(|e| e.start <= offset)
            .ok_or_else(|| Error::usage(format!("offset {offset} is beyond the end of the image")))
    }

    fn storage(&self, file: usize) -> Result<&dyn Storage> {
        self.files
            .get(file)
            .map(|f| f.as_ref())
            .ok_or_else(|| Error::invalid(format!("vmdk image has no file {file}")))
    }

    fn writer(&self) -> Option<std::sync::MutexGuard<'_, StreamWriter>> {
        self.stream
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn grain_size(&self) -> Option<u64> {
        if let Some(w) = self.writer() {
            return Some(w.grain_bytes());
        }
        self.extents.iter().find_map(|e| match &e.kind {
            ExtentKind::Sparse(x) => Some(x.header.grain_bytes()),
            _ => None,
        })
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::usage("image is not open for writing"))
        }
    }
}

impl Driver for VmdkDriver {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        if self.stream.is_some() {
            return Err(Error::unsupported(
                "reading a streamOptimized image before it is finished",
            ));
        }
        let e = self.extent_at(offset)?;
        let local = offset - e.start;
        let len = len.min(e.len - local);
        if len == 0 {
            return Err(Error::usage(format!("empty mapping request at {offset}")));
        }
        let (kind, len) = match &e.kind {
            ExtentKind::Flat { file, offset: base } => (
                MapKind::Data {
                    file: *file,
                    offset: base + local,
                },
                len,
            ),
            ExtentKind::Zero => (MapKind::Zero, len),
            ExtentKind::Sparse(x) => {
                let (m, n) = x.map(self.storage(x.file)?, local, len)?;
                let kind = match m {
                    GrainMap::Data(host) => MapKind::Data {
                        file: x.file,
                        offset: host,
                    },
                    GrainMap::Zero => MapKind::Zero,
                    GrainMap::Unallocated => MapKind::Unallocated,
                    GrainMap::Compressed(_) => {
                        let g = x.header.grain_bytes();
                        MapKind::Compressed {
                            unit: e.start + local / g * g,
                        }
                    }
                };
                (kind, n)
            }
        };
        Ok(Mapping {
            start: offset,
            len,
            kind,
        })
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        self.storage(index)
    }

    fn read_compressed(&self, unit: u64, out: &mut Vec<u8>) -> Result<()> {
        let e = self.extent_at(unit)?;
        let ExtentKind::Sparse(x) = &e.kind else {
            return Err(Error::invalid(format!("no compressed grain at {unit}")));
        };
        let local = unit - e.start;
        let guest_len = x.header.grain_bytes().min(e.len - local);
        x.read_compressed(self.storage(x.file)?, local, guest_len, out)
    }

    fn set_backing(&self, backing: Option<&BackingSpec>, parent: Option<&Image>) -> Result<()> {
        self.rewrite_parent(backing, parent)
    }

    fn backing(&self) -> Option<&BackingSpec> {
        self.backing.as_ref()
    }

    fn info(&self) -> FormatInfo {
        let extents: Vec<serde_json::Value> = self
            .extents
            .iter()
            .map(|e| {
                // qemu's ImageInfoSpecificVmdk extent order: compressed, virtual-size, filename,
                // cluster-size, format.
                let mut v = serde_json::Map::new();
                let sparse = match &e.kind {
                    ExtentKind::Sparse(x) => Some(x),
                    _ => None,
                };
                if sparse.is_some_and(|x| x.header.compressed()) {
                    v.insert("compressed".into(), json!(true));
                }
                v.insert("virtual-size".into(), json!(e.len));
                v.insert("filename".into(), json!(e.name));
                if let Some(x) = sparse {
                    v.insert("cluster-size".into(), json!(x.header.grain_bytes()));
                }
                v.insert("format".into(), json!(e.type_name));
                serde_json::Value::Object(v)
            })
            .collect();
        FormatInfo {
            cluster_size: self.grain_size(),
            dirty: false,
            format_specific: json!({
                "type": "vmdk",
                "data": {
                    "cid": self.cid.load(Ordering::Relaxed),
                    "parent-cid": self.desc.parent_cid,
                    "create-type": self.desc.create_type,
                    "extents": extents,
                }
            }),
            snapshots: Vec::new(),
        }
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, backing: Option<&Image>) -> Result<()> {
        self.check_writable()?;
        if let Some(mut w) = self.writer() {
            return w.write_plain(self.storage(0)?, buf, offset);
        }
        self.bump_cid()?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = self.extent_at(pos)?;
            let local = pos - e.start;
            let n = ((e.len - local) as usize).min(buf.len() - done);
            let chunk = &buf[done..done + n];
            if !e.rw {
                return Err(Error::usage(format!(
                    "extent '{}' is not writable (the descriptor does not mark it RW)",
                    e.name.escape_debug()
                )));
            }
            match &e.kind {
                ExtentKind::Flat { file, offset: base } => self
                    .storage(*file)?
                    .write_at(chunk, base + local)
                    .map_err(|err| {
                        Error::io(format!("writing extent '{}'", e.name.escape_debug()), err)
                    })?,
                ExtentKind::Zero => {
                    return Err(Error::unsupported(format!(
                        "writing to the ZERO extent at guest offset {}",
                        e.start
                    )))
                }
                ExtentKind::Sparse(x) => {
                    x.write(self.storage(x.file)?, chunk, local, e.start, backing)?
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        self.check_writable()?;
        if self.stream.is_none() {
            self.bump_cid()?;
        }
        const CHUNK: u64 = 1 << 20;
        let zero = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let left = len - done;
            let handled = if self.stream.is_some() {
                None
            } else {
                let e = self.extent_at(pos)?;
                let local = pos - e.start;
                let in_extent = left.min(e.len - local);
                match &e.kind {
                    ExtentKind::Flat { file, offset: base } => {
                        self.storage(*file)?
                            .write_zeroes(base + local, in_extent)
                            .map_err(|err| Error::io("zeroing flat extent", err))?;
                        Some(in_extent)
                    }
                    ExtentKind::Sparse(x) => {
                        let g = x.header.grain_bytes();
                        let storage = self.storage(x.file)?;
                        if local % g == 0 && in_extent >= g {
                            let ok = x.zero_grain(storage, local / g, backing.is_some())?;
                            ok.then_some(g)
                        } else {
                            // Part of a grain: nothing to do when it already reads as zero.
                            let part = (g - local % g).min(in_extent);
                            match x.map(storage, local, 1)?.0 {
                                GrainMap::Zero => Some(part),
                                GrainMap::Unallocated if backing.is_none() => Some(part),
                                _ => None,
                            }
                        }
                    }
                    ExtentKind::Zero => Some(in_extent),
                }
            };
            let n = match handled {
                Some(n) => n,
                None => {
                    let n = match self.grain_size() {
                        Some(g) if pos % g != 0 => (g - pos % g).min(left),
                        Some(g) => g.min(left).min(CHUNK),
                        None => left.min(CHUNK),
                    };
                    self.write_at(&zero[..n as usize], pos, backing)?;
                    n
                }
            };
            done += n;
        }
        Ok(())
    }

    fn sequential_only(&self) -> bool {
        self.stream.is_some()
    }

    fn compresses_everything(&self) -> bool {
        self.stream.is_some()
    }

    fn compressed_writer(&self) -> Option<&dyn CompressedWrite> {
        self.stream.as_ref().map(|_| self as &dyn CompressedWrite)
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            for f in &self.files {
                f.sync().map_err(|e| Error::io("syncing", e))?;
            }
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        if let Some(mut w) = self.writer() {
            w.finish(self.storage(0)?)?;
        }
        self.flush()
    }

    fn check(&self, _mode: CheckMode) -> Result<CheckReport> {
        let mut r = CheckReport {
            allocated_clusters: Some(0),
            ..CheckReport::default()
        };
        for e in &self.extents {
            let ExtentKind::Sparse(x) = &e.kind else {
                continue;
            };
            if let Err(err) = x.check(self.storage(x.file)?, &e.name, &mut r) {
                r.check_errors += 1;
                r.messages
                    .push(format!("ERROR: extent '{}': {err}", e.name));
            }
        }
        Ok(r)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CompressedWrite for VmdkDriver {
    fn unit_size(&self) -> u64 {
        self.grain_size()
            .unwrap_or(sparse::DEFAULT_GRAIN_SECTORS * SECTOR)
    }

    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        stream::compress(data).map(Some)
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        let g = self.unit_size();
        if offset % g != 0 {
            return Err(Error::usage(format!(
                "compressed grain offset {offset} is not a multiple of the {g}-byte grain"
            )));
        }
        let storage = self.storage(0)?;
        match self.writer() {
            Some(mut w) => w.write_compressed(storage, offset / g, compressed),
            None => Err(Error::unsupported(
                "compressed writes to a VMDK that is not being streamed",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_bytes(head: &[u8]) -> Option<Confidence> {
        probe(&ProbeInput {
            head,
            tail: &[],
            len: head.len() as u64,
        })
    }

    #[test]
    fn replace_parent_sets_removes_and_inserts_the_parent_lines() {
        let t = b"version=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n";
        let with = replace_parent(t, Some("base.vmdk"), 0xabcd);
        assert_eq!(
            String::from_utf8(with.clone()).unwrap(),
            "version=1\nCID=12345678\nparentCID=0000abcd\nparentFileNameHint=\"base.vmdk\"\ncreateType=\"monolithicSparse\"\n"
        );
        let moved = replace_parent(&with, Some("other.vmdk"), 7);
        assert!(String::from_utf8(moved)
            .unwrap()
            .contains("parentCID=00000007\nparentFileNameHint=\"other.vmdk\"\ncreateType"));
        assert_eq!(replace_parent(&with, None, CID_NO_PARENT), t.to_vec());
    }

    #[test]
    fn replace_cid_changes_only_the_cid_line() {
        let t = b"version=1\nCID=12345678\nparentCID=ffffffff\n";
        assert_eq!(
            replace_cid(t, 0xabcdef01),
            b"version=1\nCID=abcdef01\nparentCID=ffffffff\n".to_vec()
        );
    }

    #[test]
    fn probe_is_certain_for_descriptors_and_weak_for_cowd() {
        let d = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n";
        assert_eq!(probe_bytes(d), Some(Confidence::Certain));
        assert_eq!(probe_bytes(b"# Disk DescriptorFile\n"), None);
        assert_eq!(probe_bytes(b"COWD\x01\0\0\0"), Some(Confidence::Weak));
        assert_eq!(probe_bytes(b"KDMV\x09\0\0\0"), Some(Confidence::Weak));
        assert_eq!(probe_bytes(b"hello"), None);
    }
}
