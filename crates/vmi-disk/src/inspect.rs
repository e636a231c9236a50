//! Safety inspection of untrusted images, for uploads and imports.
//!
//! [`inspect`] runs the checks OpenStack's `format_inspector` runs, and more: it probes the format
//! (reporting every format that claims the file), opens the image with a gate that denies every
//! referenced file, and reports each reason the image is not a safe, self-contained disk: a backing
//! file, an external data file, extents (VMDK descriptors), a create type that is not self-contained,
//! unknown incompatible features, a format other than the declared one, several formats at once
//! (a polyglot), a format vmi knows but cannot open, a VMDK embedded descriptor naming anything but
//! its own sparse extent, or a raw disk whose MBR format_inspector would refuse. It never opens any
//! file but the one inspected. OpenStack's own format_inspector test cases run against it
//! (`tests/format_inspector.rs`).

use crate::error::{Error, ErrorKind, Result};
use crate::formats::vmdk::{Embedded, VmdkDriver};
use crate::formats::{Confidence, Format};
use crate::gate::Gate;
use crate::image::{probe_matches, Image};
use crate::storage::{FileStorage, Storage};
use serde::Serialize;
use std::path::Path;

/// VMDK create types that keep all data inside the one file.
const SELF_CONTAINED_VMDK: [&str; 2] = ["monolithicSparse", "streamOptimized"];

/// Why an image is unsafe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViolationKind {
    /// The image names a backing (parent) file.
    BackingFile,
    /// The image stores its data in an external file.
    DataFile,
    /// The image is a descriptor that names extent files.
    Extents,
    /// The image's subformat is not self-contained.
    CreateType,
    /// The image uses features vmi does not understand.
    UnknownFeatures,
    /// More than one format claims the file.
    MultipleFormats,
    /// The detected format differs from the one declared.
    FormatMismatch,
    /// The header is malformed.
    Invalid,
    /// The content is a format vmi knows but cannot open (its data cannot be vouched for).
    UnsupportedFormat,
    /// A raw disk whose MBR partition table is not one a disk would carry (the checks of
    /// format_inspector's GPT inspector).
    PartitionTable,
    /// A VMDK's embedded descriptor says something other than "this one sparse extent".
    Descriptor,
}

/// One reason an image is unsafe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The kind of problem.
    pub kind: ViolationKind,
    /// What exactly was found.
    pub detail: String,
}

/// What to require of an image.
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// The format the uploader declared; a different detected format is a violation.
    pub expected_format: Option<Format>,
    /// Accept a backing file (registries should not).
    pub allow_backing: bool,
}

/// The result of [`inspect`].
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The detected format.
    pub format: Format,
    /// How sure the probe was.
    pub confidence: Confidence,
    /// Every non-raw format whose probe matched.
    pub matches: Vec<Format>,
    /// Guest size, when the image could be opened.
    #[serde(rename = "virtual-size")]
    pub virtual_size: Option<u64>,
    /// Everything unsafe that was found; empty means safe.
    pub violations: Vec<Violation>,
}

impl Inspection {
    /// True when nothing unsafe was found.
    pub fn is_safe(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Inspect the image file at `path`.
pub fn inspect_path(path: &Path, opts: &InspectOptions) -> Result<Inspection> {
    let storage =
        FileStorage::open(path, false).map_err(|e| Error::io("opening", e).with_path(path))?;
    inspect(Box::new(storage), path, opts).map_err(|e| e.with_path(path))
}

/// Inspect an image on any storage. `name` is used in messages only.
pub fn inspect(
    storage: Box<dyn Storage>,
    name: &Path,
    opts: &InspectOptions,
) -> Result<Inspection> {
    let probes = probe_matches(storage.as_ref())?;
    let mut violations = Vec::new();
    let (format, confidence) = match probes.as_slice() {
        [] => (Format::Raw, Confidence::Fallback),
        [(f, c)] => (*f, *c),
        many => {
            let names: Vec<&str> = many.iter().map(|(f, _)| f.name()).collect();
            violations.push(Violation {
                kind: ViolationKind::MultipleFormats,
                detail: format!("the file is a valid {} at once", names.join(" and ")),
            });
            let best = many
                .iter()
                .max_by_key(|(_, c)| *c)
                .copied()
                .unwrap_or((Format::Raw, Confidence::Fallback));
            best
        }
    };
    if let Some(expected) = opts.expected_format {
        // An ISO declared as raw is not a mismatch; ISO images are raw bytes.
        let same = expected == format || (expected == Format::Raw && format == Format::Iso);
        if !same {
            violations.push(Violation {
                kind: ViolationKind::FormatMismatch,
                detail: format!("declared {expected}, but the content is {format}"),
            });
        }
    }
    if format == Format::Raw {
        let mut mbr = [0u8; 512];
        let len = storage
            .len()
            .map_err(|e| Error::io("reading file size", e))?;
        if len >= 512 {
            storage
                .read_at(&mut mbr, 0)
                .map_err(|e| Error::io("reading the first sector", e))?;
            if let Some(detail) = mbr_problem(&mbr) {
                violations.push(Violation {
                    kind: ViolationKind::PartitionTable,
                    detail,
                });
            }
        }
    }
    let mut virtual_size = None;
    match Image::from_storage(storage, name, Some(format), false, &Gate::deny_all()) {
        Ok(img) => {
            virtual_size = Some(img.virtual_size());
            if let Some(b) = img.driver().backing() {
                if !opts.allow_backing {
                    violations.push(Violation {
                        kind: ViolationKind::BackingFile,
                        detail: format!("names backing file '{}'", b.name.escape_debug()),
                    });
                }
            }
            if let Some(v) = img.driver().as_any().downcast_ref::<VmdkDriver>() {
                violations.extend(embedded_descriptor_problems(v));
            }
            let info = img.driver().info();
            if format == Format::Vmdk {
                let ct = info
                    .format_specific
                    .pointer("/data/create-type")
                    .and_then(|v| v.as_str());
                if let Some(ct) = ct {
                    if !SELF_CONTAINED_VMDK.contains(&ct) {
                        violations.push(Violation {
                            kind: ViolationKind::CreateType,
                            detail: format!(
                                "VMDK create type '{ct}' is not a self-contained image"
                            ),
                        });
                    }
                }
            }
        }
        Err(e) => violations.push(classify_open_error(&e)),
    }
    Ok(Inspection {
        format,
        confidence,
        matches: probes.iter().map(|(f, _)| *f).collect(),
        virtual_size,
        violations,
    })
}

fn classify_open_error(e: &Error) -> Violation {
    let msg = e.message().to_string();
    let kind = match e.kind() {
        ErrorKind::Refused if msg.contains("data file") => ViolationKind::DataFile,
        ErrorKind::Refused if msg.contains("extent") => ViolationKind::Extents,
        ErrorKind::Refused if msg.contains("backing") => ViolationKind::BackingFile,
        ErrorKind::Unsupported
            if msg.starts_with("format ") && msg.ends_with("is not supported") =>
        {
            ViolationKind::UnsupportedFormat
        }
        ErrorKind::Unsupported => ViolationKind::UnknownFeatures,
        _ => ViolationKind::Invalid,
    };
    Violation { kind, detail: msg }
}

/// The MBR rules of OpenStack format_inspector's GPT inspector, for a raw disk whose first sector
/// ends in the MBR signature and is not a FAT boot sector: every boot flag is 0x00 or 0x80, at least
/// one partition is defined, and a protective (0xEE) entry is the only one, starts at LBA 1 and
/// CHS 0/2/0.
fn mbr_problem(mbr: &[u8; 512]) -> Option<String> {
    const FAT_MEDIA_FIXED: u8 = 0xf8;
    if mbr[510..512] != [0x55, 0xaa] || (mbr[0x10] == 2 && mbr[0x15] == FAT_MEDIA_FIXED) {
        return None;
    }
    let mut defined = Vec::new();
    let mut protective = false;
    for i in 0..4 {
        let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
        if e[0] != 0x00 && e[0] != 0x80 {
            return Some(format!(
                "MBR partition entry {i} has invalid boot flag {:#04x}",
                e[0]
            ));
        }
        if e[4] != 0 {
            defined.push(i);
        }
        if e[4] == 0xee {
            protective = true;
            if e[1..4] != [0x00, 0x02, 0x00] {
                return Some("GPT protective MBR entry has an invalid start CHS".into());
            }
            if e[8..12] != 1u32.to_le_bytes() {
                return Some("GPT protective MBR entry has an invalid start LBA".into());
            }
        }
    }
    if protective && defined != [0] {
        return Some("GPT protective MBR defines extra partitions".into());
    }
    if defined.is_empty() {
        return Some("MBR signature present but no partition defined".into());
    }
    None
}

/// The embedded descriptor of a monolithicSparse or streamOptimized VMDK must describe exactly the
/// file it is in: at sector 1, only comment, `key=value`, `ddb.*` and extent lines, and exactly
/// one extent line, `RW|RDONLY <capacity> SPARSE "<name>"` with a plain file name. Anything else
/// (an added FLAT extent naming a host file, a replaced extent, an unknown access word like
/// `wronly`, no extent at all) is a disk another reader would assemble differently.
fn embedded_descriptor_problems(d: &VmdkDriver) -> Vec<Violation> {
    let bad = |kind, detail: String| Violation { kind, detail };
    let (offset, text) = match d.embedded_descriptor() {
        Embedded::NotHosted => return Vec::new(),
        Embedded::Absent => {
            return vec![bad(
                ViolationKind::Descriptor,
                "the VMDK has no embedded descriptor".into(),
            )]
        }
        Embedded::Text { offset, text } => (offset, text),
    };
    let mut out = Vec::new();
    if offset != 512 {
        out.push(bad(
            ViolationKind::Descriptor,
            format!("the embedded descriptor is at byte {offset}, not at sector 1"),
        ));
    }
    let text = String::from_utf8_lossy(text);
    let mut extents = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        let header_field = line
            .split_once('=')
            .is_some_and(|(k, _)| !k.trim().is_empty() && !k.trim().contains(char::is_whitespace));
        if matches!(
            first.to_ascii_lowercase().as_str(),
            "rw" | "rdonly" | "noaccess"
        ) {
            extents.push(line);
        } else if !line.starts_with("ddb") && !header_field {
            out.push(bad(
                ViolationKind::Descriptor,
                format!(
                    "embedded descriptor line {} is not a descriptor line: '{}'",
                    n + 1,
                    line.escape_debug()
                ),
            ));
        }
    }
    match extents.as_slice() {
        [] => out.push(bad(
            ViolationKind::Extents,
            "the embedded descriptor names no extent".into(),
        )),
        [one] if is_own_extent(one, d.capacity()) => {}
        many => {
            for e in many.iter().filter(|e| !is_own_extent(e, d.capacity())) {
                out.push(bad(
                    ViolationKind::Extents,
                    format!(
                        "the embedded descriptor names an extent other than this file: '{}'",
                        e.escape_debug()
                    ),
                ));
            }
            if many.len() > 1 {
                out.push(bad(
                    ViolationKind::Extents,
                    format!(
                        "the embedded descriptor names {} extents, not one",
                        many.len()
                    ),
                ));
            }
        }
    }
    out
}

/// `RW|RDONLY <sectors> SPARSE "<name>"`, the sectors being the image's capacity and the name a
/// plain file name.
fn is_own_extent(line: &str, capacity: u64) -> bool {
    let Some((head, rest)) = line.split_once('"') else {
        return false;
    };
    let Some((name, tail)) = rest.split_once('"') else {
        return false;
    };
    let words: Vec<&str> = head.split_whitespace().collect();
    let [access, sectors, kind] = words.as_slice() else {
        return false;
    };
    matches!(*access, "RW" | "RDONLY")
        && kind.eq_ignore_ascii_case("sparse")
        && sectors.parse::<u64>().ok().and_then(|s| s.checked_mul(512)) == Some(capacity)
        && !name.is_empty()
        && !name.contains(['/', '\\'])
        && tail.trim().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn zeroed_file_is_safe_raw() {
        let s = Box::new(MemStorage::from_bytes(vec![0u8; 1 << 20]));
        let i = inspect(s, Path::new("x"), &InspectOptions::default()).unwrap();
        assert_eq!(i.format, Format::Raw);
        assert!(i.is_safe(), "{:?}", i.violations);
        assert_eq!(i.virtual_size, Some(1 << 20));
    }

    #[test]
    fn declared_format_must_match() {
        let s = Box::new(MemStorage::from_bytes(vec![0u8; 4096]));
        let o = InspectOptions {
            expected_format: Some(Format::Qcow2),
            ..Default::default()
        };
        let i = inspect(s, Path::new("x"), &o).unwrap();
        assert_eq!(i.violations[0].kind, ViolationKind::FormatMismatch);
    }
}
