//! Finding what an image holds: its partition table, the filesystem on each partition (or on
//! the whole disk), and the root filesystem of the operating system (the ext2/3/4 filesystem
//! with an `os-release`).

use crate::error::{Error, Result};
use crate::ext4::{self, Ext4};
use crate::partition::{read_table, Partition, PartitionTable};
use crate::volume::Volume;
use serde::Serialize;
use vmi_disk::Image;

/// `SWAPSPACE2` / `SWAP-SPACE`, the signature at the end of a swap area's first 4 KiB page.
const SWAP_SIGNATURE_OFFSET: u64 = 4086;

/// A filesystem (or other volume content) found on the image.
#[derive(Debug, Clone, Serialize)]
pub struct FoundFs {
    /// "partition N" or "whole disk".
    pub device: String,
    /// The partition, when there is a table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<Partition>,
    /// Byte offset of the volume in the image.
    pub offset: u64,
    /// Length of the volume in bytes.
    pub size: u64,
    /// "ext4" (any of ext2/3/4), "vfat", "swap", or `None` when not recognised.
    pub fs_type: Option<String>,
}

impl FoundFs {
    /// The volume this filesystem is on.
    pub fn volume<'a>(&self, img: &'a Image) -> Result<Volume<'a>> {
        Volume::new(img, self.offset, self.size)
    }
}

fn kind_of(vol: &Volume<'_>) -> Option<String> {
    if ext4::probe(vol) {
        return Some("ext4".into());
    }
    let mut s = [0u8; 512];
    if vol.len() >= 512
        && vol.read_at(&mut s, 0).is_ok()
        && s[510..512] == [0x55, 0xAA]
        && (&s[54..57] == b"FAT" || &s[82..87] == b"FAT32")
    {
        return Some("vfat".into());
    }
    let mut sig = [0u8; 10];
    if vol.len() >= 4096
        && vol.read_at(&mut sig, SWAP_SIGNATURE_OFFSET).is_ok()
        && (&sig == b"SWAPSPACE2" || &sig == b"SWAP-SPACE")
    {
        return Some("swap".into());
    }
    None
}

/// The partition table (if any) and the volumes of the image with what each holds.
pub fn filesystems(img: &Image) -> Result<(Option<PartitionTable>, Vec<FoundFs>)> {
    let table = read_table(img)?;
    let mut out = Vec::new();
    match &table {
        Some(t) => {
            for p in &t.partitions {
                let vol = Volume::of(img, p)?;
                out.push(FoundFs {
                    device: format!("partition {}", p.number),
                    partition: Some(p.clone()),
                    offset: p.start,
                    size: p.len,
                    fs_type: kind_of(&vol),
                });
            }
        }
        None => {
            let vol = Volume::whole(img);
            out.push(FoundFs {
                device: "whole disk".into(),
                partition: None,
                offset: 0,
                size: vol.len(),
                fs_type: kind_of(&vol),
            });
        }
    }
    Ok((table, out))
}

/// The root filesystems: every ext2/3/4 filesystem holding `/etc/os-release` or
/// `/usr/lib/os-release`.
pub fn roots(img: &Image) -> Result<Vec<FoundFs>> {
    let (_, found) = filesystems(img)?;
    let mut out = Vec::new();
    // A filesystem that cannot be opened (a dirty journal on a data partition) does not hide
    // the root; its error is returned only when no root is found.
    let mut first_error = None;
    for f in found {
        if f.fs_type.as_deref() != Some("ext4") {
            continue;
        }
        let fs = match Ext4::open(f.volume(img)?, false) {
            Ok(fs) => fs,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        if fs.exists("/etc/os-release")? || fs.exists("/usr/lib/os-release")? {
            out.push(f);
        }
    }
    match first_error {
        Some(e) if out.is_empty() => Err(e),
        _ => Ok(out),
    }
}

/// Open the operating system's root filesystem (the only one; several are refused as
/// ambiguous for commands that change an image).
pub fn open_root(img: &Image, writable: bool) -> Result<(FoundFs, Ext4<'_>)> {
    let mut r = roots(img)?;
    match r.len() {
        0 => Err(Error::Unsupported(
            "no Linux root filesystem found (an ext2/3/4 filesystem with /etc/os-release)".into(),
        )),
        1 => {
            let f = r.remove(0);
            let fs = Ext4::open(f.volume(img)?, writable)?;
            Ok((f, fs))
        }
        n => Err(Error::Unsupported(format!(
            "{n} operating systems found; this command works on images with one"
        ))),
    }
}

/// Open the filesystem a file command works on: the ext2/3/4 filesystem on partition
/// `partition` when given, else the operating system's root, else the only ext2/3/4 filesystem.
pub fn open_fs(img: &Image, writable: bool, partition: Option<u32>) -> Result<(FoundFs, Ext4<'_>)> {
    let (_, found) = filesystems(img)?;
    if let Some(n) = partition {
        let f = found
            .into_iter()
            .find(|f| f.partition.as_ref().is_some_and(|p| p.number == n))
            .ok_or_else(|| Error::Usage(format!("the image has no partition {n}")))?;
        if f.fs_type.as_deref() != Some("ext4") {
            return Err(Error::Unsupported(format!(
                "partition {n} holds {}, not an ext2/3/4 filesystem",
                f.fs_type
                    .as_deref()
                    .unwrap_or("no filesystem vmi recognises")
            )));
        }
        let fs = Ext4::open(f.volume(img)?, writable)?;
        return Ok((f, fs));
    }
    match open_root(img, writable) {
        Ok(r) => Ok(r),
        Err(Error::Unsupported(why)) => {
            let mut ext: Vec<FoundFs> = found
                .into_iter()
                .filter(|f| f.fs_type.as_deref() == Some("ext4"))
                .collect();
            if ext.len() == 1 {
                let f = ext.remove(0);
                let fs = Ext4::open(f.volume(img)?, writable)?;
                Ok((f, fs))
            } else if ext.is_empty() {
                Err(Error::Unsupported(
                    "the image holds no ext2/3/4 filesystem".into(),
                ))
            } else {
                Err(Error::Unsupported(format!(
                    "{why}; choose one with --partition"
                )))
            }
        }
        Err(e) => Err(e),
    }
}

/// A filesystem the file commands can use.
#[derive(Debug)]
pub enum AnyFs<'a> {
    /// ext2/3/4.
    Ext4(Ext4<'a>),
    /// FAT12/16/32.
    Fat(Box<crate::fat::Fat<'a>>),
}

/// [`open_fs`], except that `--partition N` may also name a FAT partition.
pub fn open_any(img: &Image, writable: bool, partition: Option<u32>) -> Result<AnyFs<'_>> {
    if let Some(n) = partition {
        let (_, found) = filesystems(img)?;
        if let Some(f) = found
            .iter()
            .find(|f| f.partition.as_ref().is_some_and(|p| p.number == n))
        {
            if f.fs_type.as_deref() == Some("vfat") {
                return Ok(AnyFs::Fat(Box::new(crate::fat::Fat::open(f.volume(img)?)?)));
            }
        }
    }
    open_fs(img, writable, partition).map(|(_, fs)| AnyFs::Ext4(fs))
}
