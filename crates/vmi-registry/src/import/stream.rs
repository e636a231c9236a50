//! On-the-fly conversion for downloads in formats that can be written front to back: raw, VMDK
//! streamOptimized and fixed VHD.
//!
//! vmi's copy engine writes these targets in guest order (the VMDK stream writer appends grains,
//! grain tables and the footer; raw and fixed VHD are written at their guest offsets), so the
//! target can be a [`PipeStorage`]: a write-only storage that sends each byte range to the HTTP
//! response as soon as everything before it is known. Gaps (zero ranges the engine skips) are sent
//! as zeros. A small write that lands at the very end of the file before the data in front of it
//! (the fixed VHD footer, written when the image is created) is held back and sent last. Memory
//! is bounded by the channel: at most [`CHANNEL_DEPTH`] blocks of [`SEND_BYTES`] are in flight;
//! when the client is slower the conversion waits, and when it goes away the conversion stops.

use crate::api::images::expected_format;
use crate::error::{RegistryError, Result};
use crate::server::App;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
use tokio::sync::mpsc;
use vmi_disk::gate::Gate;
use vmi_disk::storage::Storage;
use vmi_disk::{CreateOptions, Format, Image};

/// Glance disk formats that are converted on the fly.
pub const STREAMABLE: [&str; 3] = ["raw", "vmdk", "vhd"];
/// Bytes gathered before a block is sent.
pub const SEND_BYTES: usize = 1 << 20;
/// Blocks in flight between the conversion and the response.
pub const CHANNEL_DEPTH: usize = 8;
/// Largest write held back until the end (a fixed VHD footer is 512 bytes).
const MAX_TAIL_BYTES: usize = 64 << 10;

/// What the pipe has sent and holds.
#[derive(Debug, Default)]
struct PipeState {
    /// Bytes sent (or queued in `out`) so far.
    pos: u64,
    /// The file's length as the writer set it.
    len: u64,
    /// Bytes gathered for the next send.
    out: Vec<u8>,
    /// Writes at the end of the file held back until everything before them is sent.
    tail: BTreeMap<u64, Vec<u8>>,
    /// Bytes in `tail`.
    tail_bytes: usize,
}

/// A write-only, front-to-back storage whose bytes go to a channel.
pub struct PipeStorage {
    state: Mutex<PipeState>,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl std::fmt::Debug for PipeStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PipeStorage")
    }
}

fn out_of_order(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what)
}

impl PipeStorage {
    /// A pipe sending to `tx`.
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        PipeStorage {
            state: Mutex::new(PipeState::default()),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, st: &mut PipeState, force: bool) -> io::Result<()> {
        while st.out.len() >= SEND_BYTES || (force && !st.out.is_empty()) {
            let n = st.out.len().min(SEND_BYTES);
            let block: Vec<u8> = st.out.drain(..n).collect();
            self.tx
                .blocking_send(Ok(Bytes::from(block)))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        }
        Ok(())
    }

    /// Append `n` zero bytes.
    fn zeros(&self, st: &mut PipeState, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let room = (SEND_BYTES - st.out.len().min(SEND_BYTES)).max(1) as u64;
            let k = n.min(room);
            let new_len = st.out.len() + k as usize;
            st.out.resize(new_len, 0);
            st.pos += k;
            n -= k;
            self.send(st, false)?;
        }
        Ok(())
    }

    fn append(&self, st: &mut PipeState, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset > st.pos {
            self.zeros(st, offset - st.pos)?;
        }
        st.out.extend_from_slice(buf);
        st.pos += buf.len() as u64;
        st.len = st.len.max(st.pos);
        self.send(st, false)
    }

    /// Send everything up to the file's length: held-back tail writes and trailing zeros.
    pub fn finish(&self) -> io::Result<()> {
        let mut st = self.lock();
        let tail = std::mem::take(&mut st.tail);
        st.tail_bytes = 0;
        for (off, b) in tail {
            if off < st.pos {
                return Err(out_of_order(format!(
                    "held-back write at {off} overlaps data already sent up to {}",
                    st.pos
                )));
            }
            self.append(&mut st, &b, off)?;
        }
        let rest = st.len.saturating_sub(st.pos);
        self.zeros(&mut st, rest)?;
        self.send(&mut st, true)
    }
}

impl Storage for PipeStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Nothing is kept once sent; what was not written yet reads as zeros.
        let st = self.lock();
        let end = offset.saturating_add(buf.len() as u64);
        let clear_of_tail = st
            .tail
            .iter()
            .all(|(&t, b)| end <= t || offset >= t.saturating_add(b.len() as u64));
        if offset >= st.pos && clear_of_tail {
            buf.fill(0);
            return Ok(());
        }
        Err(out_of_order(format!(
            "reading at {offset} from a streamed image (sent up to {})",
            st.pos
        )))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| out_of_order("write offset overflows".into()))?;
        if offset < st.pos {
            return Err(out_of_order(format!(
                "write at {offset} behind data already sent up to {}",
                st.pos
            )));
        }
        let is_tail = offset > st.pos && end == st.len && buf.len() <= MAX_TAIL_BYTES;
        if is_tail || st.tail.contains_key(&offset) {
            let old = st.tail.insert(offset, buf.to_vec()).map_or(0, |o| o.len());
            st.tail_bytes = st.tail_bytes - old + buf.len();
            if st.tail_bytes > MAX_TAIL_BYTES {
                return Err(out_of_order("too much data written ahead".into()));
            }
            return Ok(());
        }
        if let Some((&t, _)) = st.tail.iter().next() {
            if end > t {
                return Err(out_of_order(format!(
                    "write up to {end} overlaps data held back at {t}"
                )));
            }
        }
        self.append(&mut st, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        if len < st.pos {
            return Err(out_of_order(format!(
                "truncating a streamed image to {len} after {} bytes were sent",
                st.pos
            )));
        }
        st.len = len;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A conversion streamed to a download.
pub struct Streaming {
    /// The converted bytes, in order; an error ends a conversion that failed midway.
    pub data: mpsc::Receiver<io::Result<Bytes>>,
    /// Sent once the source is open and the target created: the output's exact length when the
    /// format fixes it in advance (raw: the virtual size; a fixed VHD: that and its footer), or
    /// `None` (a streamOptimized VMDK is as long as its compressed grains); an error when the
    /// conversion cannot start, so the caller can answer with it instead of a broken body.
    pub length: tokio::sync::oneshot::Receiver<Result<Option<u64>>>,
}

/// Start converting the stored object `src` (`src_size` bytes of `from`) into Glance format
/// `to` (one of [`STREAMABLE`]), holding `slot` until the conversion ends. A source whose
/// virtual size exceeds the image size cap is refused (413) before anything is sent.
pub fn convert_streaming(
    app: &App,
    image_id: &str,
    src: &str,
    src_size: u64,
    from: Format,
    to: &str,
    slot: crate::guards::ConversionSlot,
) -> Result<Streaming> {
    if !STREAMABLE.contains(&to) {
        return Err(RegistryError::BadRequest(format!(
            "{to} cannot be converted on the fly"
        )));
    }
    let target = expected_format(to)
        .ok_or_else(|| RegistryError::BadRequest(format!("cannot convert to '{to}'")))?;
    let options = super::convert::create_options(to)?;
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let (len_tx, len_rx) = tokio::sync::oneshot::channel();
    let fixed_length = target != Format::Vmdk;
    let data = app.data.clone();
    let cap = app.config.image_size_cap;
    let (loc, id) = (src.to_string(), image_id.to_string());
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut len_tx = Some(len_tx);
        let run = || -> Result<()> {
            let failed = |e: &dyn std::fmt::Display| {
                RegistryError::store(format!("converting image {id} to {target}"), e.to_string())
            };
            let storage = data.random_access(&loc, src_size)?;
            let name = PathBuf::from(&id);
            let img = Image::from_storage(storage, &name, Some(from), false, &Gate::deny_all())
                .map_err(|e| failed(&e))?;
            super::convert::check_virtual_size(img.virtual_size(), cap)?;
            let pipe = std::sync::Arc::new(PipeStorage::new(tx.clone()));
            let dst = Image::create_on(
                Box::new(SharedPipe(pipe.clone())),
                &name,
                target,
                &CreateOptions::new(img.virtual_size()).options(options),
            )
            .map_err(|e| failed(&e))?;
            // Raw and fixed VHD targets are created at their final length.
            let length = if fixed_length {
                Some(pipe.len().map_err(|e| failed(&e))?)
            } else {
                None
            };
            if let Some(l) = len_tx.take() {
                let _ = l.send(Ok(length));
            }
            vmi_convert::convert(&img, &dst, &vmi_convert::ConvertOptions::default())
                .map_err(|e| failed(&e))?;
            dst.close().map_err(|e| failed(&e))?;
            pipe.finish().map_err(|e| failed(&e))
        };
        let result = run();
        let e = match (result, len_tx.take()) {
            (Ok(()), _) => return,
            // Nothing was sent yet: the request answers with the error.
            (Err(e), Some(l)) => {
                let _ = l.send(Err(e));
                return;
            }
            (Err(e), None) => crate::error::chain(&e),
        };
        eprintln!("vmi-registry: converting image {id} to {target} for a download: {e}");
        // The response is already under way: end it with an error so the client sees a
        // truncated transfer rather than a short file that looks complete.
        let _ = tx.blocking_send(Err(io::Error::other(e)));
    });
    Ok(Streaming {
        data: rx,
        length: len_rx,
    })
}

/// A [`PipeStorage`] shared with the code that finishes it.
#[derive(Debug)]
struct SharedPipe(std::sync::Arc<PipeStorage>);

impl Storage for SharedPipe {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(mut rx: mpsc::Receiver<io::Result<Bytes>>) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some(b) = rx.blocking_recv() {
            v.extend_from_slice(&b.unwrap());
        }
        v
    }

    #[test]
    fn a_pipe_sends_gaps_as_zeros_and_the_held_back_footer_last() {
        let (tx, rx) = mpsc::channel(1024);
        let p = PipeStorage::new(tx);
        p.set_len(4096 + 512).unwrap();
        p.write_at(&[0xAA; 512], 4096).unwrap();
        p.write_at(&[1; 100], 0).unwrap();
        p.write_at(&[2; 100], 1000).unwrap();
        p.write_at(&[0xBB; 512], 4096).unwrap();
        p.finish().unwrap();
        drop(p);
        let v = collect(rx);
        assert_eq!(v.len(), 4608);
        assert_eq!(&v[..100], &[1; 100]);
        assert!(v[100..1000].iter().all(|&b| b == 0));
        assert_eq!(&v[1000..1100], &[2; 100]);
        assert_eq!(&v[4096..], &[0xBB; 512]);
    }

    #[test]
    fn a_pipe_refuses_writes_behind_what_it_sent() {
        let (tx, _rx) = mpsc::channel(1024);
        let p = PipeStorage::new(tx);
        p.write_at(&[1; 10], 100).unwrap();
        assert!(p.write_at(&[1; 10], 50).is_err());
        assert!(p.set_len(20).is_err());
    }

    #[test]
    fn a_pipe_stops_when_the_receiver_is_gone() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let p = PipeStorage::new(tx);
        assert!(p.write_at(&vec![0; SEND_BYTES * 2], 0).is_err());
    }
}
