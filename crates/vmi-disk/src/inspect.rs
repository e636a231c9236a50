//! Safety inspection of untrusted images, for uploads and imports.
//!
//! [`inspect`] runs the checks OpenStack's `format_inspector` runs, and more: it probes the format
//! (reporting every format that claims the file), opens the image with a gate that denies every
//! referenced file, and reports each reason the image is not a safe, self-contained disk: a backing
//! file, an external data file, extents (VMDK descriptors), a create type that is not self-contained,
//! unknown incompatible features, a format other than the declared one, or several formats at once
//! (a polyglot). It never opens any file but the one inspected.

use crate::error::{Error, ErrorKind, Result};
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
        ErrorKind::Unsupported => ViolationKind::UnknownFeatures,
        _ => ViolationKind::Invalid,
    };
    Violation { kind, detail: msg }
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
