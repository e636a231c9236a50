//! Compressed loopback images (cloop, read only).
//!
//! Placeholder: the format is known to the format registry but not yet probed or opened; opening
//! it is refused with "format cloop is not supported".

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::formats::{Confidence, Format, OpenContext, ProbeInput};
use crate::storage::Storage;

pub(crate) fn probe(_input: &ProbeInput) -> Option<Confidence> {
    None
}

pub(crate) fn open(_storage: Box<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    Err(Error::unsupported(format!(
        "format {} is not supported",
        Format::Cloop
    )))
}
