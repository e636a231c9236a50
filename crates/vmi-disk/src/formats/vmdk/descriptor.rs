//! The VMDK text descriptor (VMware "Virtual Disk Format 1.1", section "The Descriptor File"):
//! header keys (`version`, `CID`, `parentCID`, `createType`, `parentFileNameHint`), the extent
//! description (`RW 204800 SPARSE "disk-s001.vmdk"`), and the disk database (`ddb.*` keys).
//!
//! The descriptor is untrusted text: its size is capped by [`MAX_DESCRIPTOR_SIZE`], the number of
//! extents by [`MAX_EXTENTS`], and every extent's sector count is checked for overflow. Names are
//! returned as written; opening them is the gate's business.

use crate::error::{Error, Result};

/// Largest descriptor accepted, embedded or standalone. qemu reads at most 64 KiB of a text
/// descriptor (`DESC_SIZE` is 20 sectors for the embedded one it writes); anything bigger is not a
/// descriptor a tool produced.
pub const MAX_DESCRIPTOR_SIZE: u64 = 64 * 1024;

/// Most extents one descriptor may list. A 2 GiB-split disk of 8 TiB has 4096 extents; more than that
/// is a resource-exhaustion attempt (each extent is an open file).
pub const MAX_EXTENTS: usize = 4096;

/// `parentCID` value meaning "no parent" (VMDK 1.1, "Parent Content ID").
pub const CID_NO_PARENT: u32 = 0xffff_ffff;

/// Bytes per sector: every size in a descriptor counts 512-byte sectors.
pub const SECTOR: u64 = 512;

/// How an extent may be accessed (first word of an extent line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `RW`
    ReadWrite,
    /// `RDONLY`
    ReadOnly,
    /// `NOACCESS`
    NoAccess,
}

/// An extent's type (third word of an extent line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// `FLAT`: guest bytes verbatim in the file, from a sector offset.
    Flat,
    /// `SPARSE`: a hosted sparse extent (`KDMV` header, grain directory and tables).
    Sparse,
    /// `ZERO`: reads as zeroes, no file.
    Zero,
    /// `VMFS`: an ESX flat extent, read like `FLAT`.
    Vmfs,
}

impl ExtentType {
    /// The spelling in descriptors.
    pub fn name(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
        }
    }
}

/// One line of the extent description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name as written (absent for `ZERO`).
    pub file: Option<String>,
    /// Start of the data in the file, in sectors (flat extents only).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `CID`: content id, changed on every modification.
    pub cid: u32,
    /// `parentCID`: the parent's CID, or [`CID_NO_PARENT`].
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// `parentFileNameHint`: the backing file.
    pub parent_hint: Option<String>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
    /// `ddb.adapterType`.
    pub adapter_type: Option<String>,
    /// `ddb.virtualHWVersion`.
    pub hw_version: Option<String>,
    /// `ddb.geometry.cylinders`, `heads`, `sectors`.
    pub geometry: Option<(u64, u64, u64)>,
    /// `ddb.uuid`.
    pub uuid: Option<String>,
    /// `ddb.toolsVersion`.
    pub tools_version: Option<String>,
}

impl Descriptor {
    /// Parse descriptor text. `bytes` may be NUL-padded (embedded descriptors are).
    pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
        if bytes.len() as u64 > MAX_DESCRIPTOR_SIZE {
            return Err(Error::limit(format!(
                "descriptor is {} bytes, more than the {MAX_DESCRIPTOR_SIZE} allowed",
                bytes.len()
            )));
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(&bytes[..end])
            .map_err(|e| Error::invalid(format!("descriptor is not UTF-8 text: {e}")))?;
        let mut d = Descriptor {
            parent_cid: CID_NO_PARENT,
            ..Descriptor::default()
        };
        let mut cylinders = None;
        let mut heads = None;
        let mut sectors = None;
        let mut have_cid = false;
        for (lineno, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(Error::limit(format!(
                        "descriptor lists more than {MAX_EXTENTS} extents"
                    )));
                }
                d.extents.push(
                    parse_extent(line)
                        .map_err(|e| e.context(format!("descriptor line {}", lineno + 1)))?,
                );
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim();
            let value = unquote(value.trim());
            match key {
                "CID" => {
                    d.cid = parse_cid("CID", value)?;
                    have_cid = true;
                }
                "parentCID" => d.parent_cid = parse_cid("parentCID", value)?,
                "createType" => d.create_type = value.to_string(),
                "parentFileNameHint" => d.parent_hint = Some(value.to_string()),
                "ddb.adapterType" => d.adapter_type = Some(value.to_string()),
                "ddb.virtualHWVersion" => d.hw_version = Some(value.to_string()),
                "ddb.uuid" => d.uuid = Some(value.to_string()),
                "ddb.toolsVersion" => d.tools_version = Some(value.to_string()),
                "ddb.geometry.cylinders" => cylinders = value.parse().ok(),
                "ddb.geometry.heads" => heads = value.parse().ok(),
                "ddb.geometry.sectors" => sectors = value.parse().ok(),
                _ => {}
            }
        }
        if d.create_type.is_empty() {
            return Err(Error::invalid("descriptor has no createType"));
        }
        if !have_cid {
            d.cid = 0;
        }
        if let (Some(c), Some(h), Some(s)) = (cylinders, heads, sectors) {
            d.geometry = Some((c, h, s));
        }
        Ok(d)
    }

    /// Total size of all extents in bytes.
    pub fn total_bytes(&self) -> Result<u64> {
        let mut sectors = 0u64;
        for e in &self.extents {
            sectors = sectors
                .checked_add(e.sectors)
                .ok_or_else(|| Error::invalid("extent sizes in the descriptor overflow 64 bits"))?;
        }
        sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::invalid(format!("descriptor declares {sectors} sectors")))
    }

    /// Write the descriptor as qemu-img writes it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# Disk DescriptorFile\nversion=1\n");
        s.push_str(&format!("CID={:08x}\n", self.cid));
        s.push_str(&format!("parentCID={:08x}\n", self.parent_cid));
        s.push_str(&format!("createType=\"{}\"\n", self.create_type));
        if let Some(p) = &self.parent_hint {
            s.push_str(&format!("parentFileNameHint=\"{p}\"\n"));
        }
        s.push_str("\n# Extent description\n");
        for e in &self.extents {
            let access = match e.access {
                Access::ReadWrite => "RW",
                Access::ReadOnly => "RDONLY",
                Access::NoAccess => "NOACCESS",
            };
            s.push_str(&format!("{access} {} {}", e.sectors, e.kind.name()));
            if let Some(f) = &e.file {
                s.push_str(&format!(" \"{f}\""));
            }
            if matches!(e.kind, ExtentType::Flat | ExtentType::Vmfs) {
                s.push_str(&format!(" {}", e.offset));
            }
            s.push('\n');
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        if let Some(v) = &self.hw_version {
            s.push_str(&format!("ddb.virtualHWVersion = \"{v}\"\n"));
        }
        if let Some((c, h, sec)) = self.geometry {
            s.push_str(&format!("ddb.geometry.cylinders = \"{c}\"\n"));
            s.push_str(&format!("ddb.geometry.heads = \"{h}\"\n"));
            s.push_str(&format!("ddb.geometry.sectors = \"{sec}\"\n"));
        }
        if let Some(a) = &self.adapter_type {
            s.push_str(&format!("ddb.adapterType = \"{a}\"\n"));
        }
        if let Some(u) = &self.uuid {
            s.push_str(&format!("ddb.uuid = \"{u}\"\n"));
        }
        if let Some(t) = &self.tools_version {
            s.push_str(&format!("ddb.toolsVersion = \"{t}\"\n"));
        }
        s
    }
}

/// The geometry qemu records for a disk of `size` bytes behind `adapter`: 63 sectors per track, 16
/// heads for IDE and 255 otherwise, and as many whole cylinders as fit.
pub fn geometry(size: u64, adapter: &str) -> (u64, u64, u64) {
    let heads = if adapter == "ide" { 16 } else { 255 };
    (size / SECTOR / (heads * 63), heads, 63)
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

fn parse_cid(key: &str, v: &str) -> Result<u32> {
    u32::from_str_radix(v, 16)
        .map_err(|_| Error::invalid(format!("descriptor {key} '{v}' is not a 32-bit hex number")))
}

/// Parse `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
fn parse_extent(line: &str) -> Result<ExtentLine> {
    let (head, rest) = match line.find('"') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let mut words = head.split_whitespace();
    let access = match words.next() {
        Some("RW") => Access::ReadWrite,
        Some("RDONLY") => Access::ReadOnly,
        _ => Access::NoAccess,
    };
    let sectors_word = words.next().unwrap_or("");
    let sectors: u64 = sectors_word.parse().map_err(|_| {
        Error::invalid(format!(
            "extent size '{sectors_word}' is not a sector count"
        ))
    })?;
    let type_word = words.next().unwrap_or("");
    let kind = match type_word {
        "FLAT" => ExtentType::Flat,
        "SPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        "VMFS" => ExtentType::Vmfs,
        "" => return Err(Error::invalid("extent line has no type")),
        other => {
            return Err(Error::unsupported(format!(
                "extent type '{}'",
                other.escape_debug()
            )))
        }
    };
    let (file, offset) = match rest {
        None => (None, 0),
        Some(rest) => {
            let close = rest
                .find('"')
                .ok_or_else(|| Error::invalid("extent file name has no closing quote"))?;
            let name = &rest[..close];
            let tail = rest[close + 1..].trim();
            let offset = if tail.is_empty() {
                0
            } else {
                tail.parse::<u64>().map_err(|_| {
                    Error::invalid(format!(
                        "extent offset '{}' is not a number",
                        tail.escape_debug()
                    ))
                })?
            };
            (Some(name.to_string()), offset)
        }
    };
    if kind != ExtentType::Zero && file.is_none() {
        return Err(Error::invalid(format!(
            "{} extent names no file",
            kind.name()
        )));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=4c1f301c\nparentCID=ffffffff\n\
createType=\"monolithicFlat\"\n\n# Extent description\nRW 204800 FLAT \"d-flat.vmdk\" 0\n\n\
# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"203\"\n\
ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n\
ddb.toolsVersion = \"2147483647\"\n";

    #[test]
    fn parses_a_qemu_descriptor_and_renders_it_back_identically() {
        let d = Descriptor::parse(QEMU_FLAT.as_bytes()).unwrap();
        assert_eq!(d.cid, 0x4c1f301c);
        assert_eq!(d.parent_cid, CID_NO_PARENT);
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].file.as_deref(), Some("d-flat.vmdk"));
        assert_eq!(d.geometry, Some((203, 16, 63)));
        assert_eq!(d.render(), QEMU_FLAT);
    }

    #[test]
    fn geometry_matches_qemu_for_ide_and_scsi() {
        assert_eq!(geometry(100 << 20, "ide"), (203, 16, 63));
        assert_eq!(geometry(100 << 30, "ide"), (208050, 16, 63));
        assert_eq!(geometry(100 << 30, "lsilogic"), (13054, 255, 63));
    }

    #[test]
    fn parse_rejects_a_descriptor_without_create_type() {
        assert!(Descriptor::parse(b"# Disk DescriptorFile\nCID=1\n").is_err());
    }

    #[test]
    fn parse_rejects_oversized_descriptors() {
        let big = vec![b'#'; MAX_DESCRIPTOR_SIZE as usize + 1];
        assert!(Descriptor::parse(&big).is_err());
    }

    #[test]
    fn parse_rejects_unknown_extent_types_and_bad_sizes() {
        let d = "createType=\"x\"\nRW 10 VMFSSPARSE \"a\"\n";
        assert!(Descriptor::parse(d.as_bytes()).is_err());
        let d = "createType=\"x\"\nRW -1 FLAT \"a\" 0\n";
        assert!(Descriptor::parse(d.as_bytes()).is_err());
        let d = "createType=\"x\"\nRW 10 FLAT \"a\n";
        assert!(Descriptor::parse(d.as_bytes()).is_err());
    }

    #[test]
    fn total_bytes_refuses_overflowing_extent_sizes() {
        let d = format!(
            "createType=\"x\"\nRW {} FLAT \"a\" 0\nRW {} FLAT \"b\" 0\n",
            u64::MAX,
            u64::MAX
        );
        let d = Descriptor::parse(d.as_bytes()).unwrap();
        assert!(d.total_bytes().is_err());
    }
}
