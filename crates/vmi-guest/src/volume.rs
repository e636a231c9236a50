//! A [`Volume`]: a byte range of an [`Image`] (a partition, or the whole disk) with positional
//! reads and writes confined to the range. Filesystems see only their volume.

use crate::error::{Error, Result};
use crate::partition::Partition;
use vmi_disk::Image;

/// A byte range of an image.
#[derive(Debug, Clone, Copy)]
pub struct Volume<'a> {
    image: &'a Image,
    start: u64,
    len: u64,
}

impl<'a> Volume<'a> {
    /// The whole image as one volume.
    pub fn whole(image: &'a Image) -> Self {
        Volume {
            image,
            start: 0,
            len: image.virtual_size(),
        }
    }

    /// The range `start..start+len` of `image`, which must lie inside it.
    pub fn new(image: &'a Image, start: u64, len: u64) -> Result<Self> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::Usage(format!("volume {start}+{len} overflows")))?;
        if end > image.virtual_size() {
            return Err(Error::Usage(format!(
                "volume {start}+{len} ends past the image's {} bytes",
                image.virtual_size()
            )));
        }
        Ok(Volume { image, start, len })
    }

    /// The volume of a partition.
    pub fn of(image: &'a Image, p: &Partition) -> Result<Self> {
        Self::new(image, p.start, p.len)
    }

    /// The image underneath.
    pub fn image(&self) -> &'a Image {
        self.image
    }

    /// Offset of the volume in the image.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty volume.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn abs(&self, offset: u64, n: usize) -> Result<u64> {
        let n = n as u64;
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(self.start + offset),
            _ => Err(Error::Usage(format!(
                "access {offset}+{n} is outside the {}-byte volume",
                self.len
            ))),
        }
    }

    /// Read `buf.len()` bytes at `offset` within the volume.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let abs = self.abs(offset, buf.len())?;
        Ok(self.image.read_at(buf, abs)?)
    }

    /// Write `buf` at `offset` within the volume.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let abs = self.abs(offset, buf.len())?;
        Ok(self.image.write_at(buf, abs)?)
    }

    /// Make `len` bytes at `offset` read as zeroes, deallocating where the format can.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let n = usize::try_from(len).map_err(|_| Error::Usage("zero range too long".into()))?;
        let abs = self.abs(offset, n)?;
        Ok(self.image.write_zeroes(abs, len)?)
    }

    /// Flush the image.
    pub fn flush(&self) -> Result<()> {
        Ok(self.image.flush()?)
    }
}
