//! raw: guest bytes are file bytes. Holes in the host file (found with `SEEK_DATA`/`SEEK_HOLE`)
//! are reported as zero ranges, so sparse raw images convert and map without reading holes.
//! ISO images are opened through this driver and only report a different format name.

use crate::driver::{Driver, FormatInfo, MapKind, Mapping};
use crate::error::{Error, Result};
use crate::formats::{CreateContext, Format, Measurement, OpenContext};
use crate::image::Image;
use crate::options::CreateOptions;
use crate::storage::Storage;
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

/// Granularity raw images report holes at: hole edges are rounded to it, as filesystems allocate
/// in 4 KiB blocks.
const RAW_ALIGN: u64 = 4096;

/// A raw (or ISO) image.
#[derive(Debug)]
pub struct RawDriver {
    storage: Box<dyn Storage>,
    format: Format,
    size: AtomicU64,
    writable: bool,
}

pub(crate) fn open(
    storage: Box<dyn Storage>,
    ctx: &OpenContext,
    format: Format,
) -> Result<Box<dyn Driver>> {
    let size = storage.len().map_err(|e| Error::io("reading size", e))?;
    Ok(Box::new(RawDriver {
        storage,
        format,
        size: AtomicU64::new(size),
        writable: ctx.writable,
    }))
}

pub(crate) fn create(
    storage: Box<dyn Storage>,
    _ctx: &CreateContext,
    opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    if opts.backing.is_some() {
        return Err(Error::usage("raw images cannot have a backing file"));
    }
    let prealloc = opts
        .options
        .choice("preallocation", &["off", "falloc", "full"])?
        .unwrap_or_else(|| "off".into());
    opts.options.finish("raw")?;
    storage
        .set_len(opts.size)
        .map_err(|e| Error::io("setting size", e))?;
    if prealloc == "full" || prealloc == "falloc" {
        crate::storage::write_zero_bytes(storage.as_ref(), 0, opts.size)
            .map_err(|e| Error::io("preallocating", e))?;
    }
    Ok(Box::new(RawDriver {
        storage,
        format: Format::Raw,
        size: AtomicU64::new(opts.size),
        writable: true,
    }))
}

/// qemu-img measure for raw: the virtual size, whatever the data (qemu reports both as the size).
pub(crate) fn measure(opts: &CreateOptions, source: Option<&Image>) -> Result<Measurement> {
    opts.options
        .choice("preallocation", &["off", "falloc", "full"])?;
    opts.options.finish("raw")?;
    let size = source.map_or(opts.size, Image::virtual_size);
    Ok(Measurement {
        required: size,
        fully_allocated: size,
    })
}

impl Driver for RawDriver {
    fn format(&self) -> Format {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn map(&self, offset: u64, len: u64) -> Result<Mapping> {
        let size = self.virtual_size();
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Err(Error::usage(format!(
                "offset {offset} is beyond the end of the image"
            )));
        }
        let data = Mapping {
            start: offset,
            len,
            kind: MapKind::Data { file: 0, offset },
        };
        match self
            .storage
            .next_data(offset)
            .map_err(|e| Error::io("finding data", e))?
        {
            None => Ok(Mapping {
                start: offset,
                len,
                kind: MapKind::Zero,
            }),
            Some((start, end)) => {
                // Round hole boundaries to whole blocks so partial blocks are read, never skipped.
                let start = start / RAW_ALIGN * RAW_ALIGN;
                let end = end.div_ceil(RAW_ALIGN).saturating_mul(RAW_ALIGN);
                if start > offset {
                    Ok(Mapping {
                        start: offset,
                        len: len.min(start - offset),
                        kind: MapKind::Zero,
                    })
                } else {
                    Ok(Mapping {
                        len: len.min(end.max(offset + 1) - offset),
                        ..data
                    })
                }
            }
        }
    }

    fn file(&self, index: usize) -> Result<&dyn Storage> {
        match index {
            0 => Ok(self.storage.as_ref()),
            _ => Err(Error::invalid(format!("raw images have no file {index}"))),
        }
    }

    fn info(&self) -> FormatInfo {
        FormatInfo::default()
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64, _backing: Option<&Image>) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("image is not open for writing"));
        }
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(format!("writing at {offset}"), e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _backing: Option<&Image>) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("image is not open for writing"));
        }
        self.storage
            .write_zeroes(offset, len)
            .map_err(|e| Error::io(format!("zeroing at {offset}"), e))
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.storage.sync().map_err(|e| Error::io("syncing", e))?;
        }
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::usage("image is not open for writing"));
        }
        self.storage
            .set_len(new_size)
            .map_err(|e| Error::io("resizing", e))?;
        self.size.store(new_size, Ordering::Relaxed);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
