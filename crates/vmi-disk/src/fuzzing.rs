//! Entry points for fuzz targets and mutation tests: open arbitrary bytes as an image of a given
//! format (in memory, nothing else opened), walk its mapping, read its data, and run `check`.
//! Anything but a panic, an overflow or unbounded allocation is a pass.

use crate::check::CheckMode;
use crate::formats::Format;
use crate::gate::Gate;
use crate::image::Image;
use crate::storage::MemStorage;
use std::path::Path;

/// Most guest bytes one exercise reads: keeps a hostile "16 EiB" header from taking forever.
const MAX_READ: u64 = 8 << 20;
/// Most mapping steps one exercise walks.
const MAX_STEPS: usize = 4096;

/// Open `data` as `format` (or probe when `None`) and exercise every read path. Never panics on
/// any input; returns whether the image opened.
pub fn exercise(format: Option<Format>, data: &[u8]) -> bool {
    let storage = Box::new(MemStorage::from_bytes(data.to_vec()));
    let Ok(img) = Image::from_storage(
        storage,
        Path::new("fuzz.img"),
        format,
        false,
        &Gate::deny_all(),
    ) else {
        return false;
    };
    let size = img.virtual_size();
    let mut off = 0u64;
    let mut read = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAX_STEPS {
        if off >= size || read >= MAX_READ {
            break;
        }
        let Ok(st) = img.block_status(off, size - off) else {
            break;
        };
        let n = st.len.min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], off);
        read += n as u64;
        // Jump past long ranges so both ends of the image get visited.
        off = if st.len > n as u64 {
            off + st.len
        } else {
            off + n as u64
        };
    }
    let _ = img.driver().check(CheckMode::ReadOnly);
    let _ = img.driver().info();
    true
}
