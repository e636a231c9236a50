//! qemu-img map: merged ranges of equal status.

use serde::Serialize;
use vmi_disk::{Error, Image, Result};

/// One entry of `map --output=json`, with qemu-img's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that answered (0 = top).
    pub depth: usize,
    /// Stored compressed.
    pub compressed: bool,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zero.
    pub zero: bool,
    /// Has data.
    pub data: bool,
    /// Host offset for uncompressed data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Call `f` with each merged map entry, in order.
pub fn map_entries(_img: &Image, _f: &mut dyn FnMut(MapEntry) -> Result<()>) -> Result<()> {
    Err(Error::unsupported("map: not yet implemented"))
}
