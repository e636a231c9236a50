//! Whole-buffer inflation of compressed allocation units (qcow2 compressed clusters, raw deflate,
//! RFC 1951; VMDK stream-optimized grains, zlib, RFC 1950) with libdeflate.
//!
//! A compressed unit is always inflated as one buffer of known size, which is libdeflate's
//! strength: it inflates such buffers about 1.6× faster than zlib-rs (`docs/performance.md`,
//! "Deflate libraries"). libdeflate is only a fast path. Every answer other than a success that
//! fits the caller's bound is left to the streaming inflater (zlib-rs through `flate2`), whose
//! verdicts define what vmi accepts: a successful libdeflate result is a complete, valid stream, on
//! which both libraries produce the same bytes, and anything else (truncated or corrupt data, output
//! larger than the unit, a qcow2 cluster whose stream fills the cluster but lacks its end marker,
//! which qemu accepts) gets exactly the answer it got before. Malformed input is an error from the
//! caller, never a panic.
//!
//! Deflating (writing) stays on zlib-rs: qcow2 readers require a window of at most 4 KiB, which
//! libdeflate cannot be asked for.

use libdeflater::Decompressor;
use std::cell::RefCell;

thread_local! {
    /// One decompressor per thread (libdeflate's state is ~10 KiB, not worth allocating per unit).
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

/// The stream framing of a compressed unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Raw deflate (RFC 1951): qcow2 `compression_type` zlib.
    Raw,
    /// zlib (RFC 1950: header, deflate, Adler-32): VMDK grains.
    Zlib,
}

/// Inflate one complete stream from `input` into `out` with libdeflate. Bytes after the end of
/// the stream are ignored. Returns the number of bytes produced, or `None` when libdeflate did not
/// succeed (bad or truncated data, or more output than `out` holds): the caller then asks its
/// streaming inflater, which gives the error (or accepts what qemu accepts).
pub(crate) fn inflate_fast(framing: Framing, input: &[u8], out: &mut [u8]) -> Option<usize> {
    DECOMPRESSOR.with(|cell| {
        // A re-entrant call cannot happen (nothing below calls back), but never panic over it.
        let mut slot = cell.try_borrow_mut().ok()?;
        let d = slot.get_or_insert_with(Decompressor::new);
        let r = match framing {
            Framing::Raw => d.deflate_decompress(input, out),
            Framing::Zlib => d.zlib_decompress(input, out),
        };
        r.ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};
    use std::io::Write;

    fn raw_deflate(data: &[u8], window_bits: u8) -> Vec<u8> {
        let mut c = Compress::new_with_window_bits(Compression::default(), false, window_bits);
        let mut out = Vec::with_capacity(data.len() + 1024);
        c.compress_vec(data, &mut out, FlushCompress::Finish)
            .unwrap();
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 7) % 251) as u8 ^ (i / 300) as u8)
            .collect()
    }

    #[test]
    fn raw_stream_inflates_and_trailing_bytes_are_ignored() {
        let data = sample(65536);
        let mut c = raw_deflate(&data, 12);
        // Stored compressed clusters end on a sector boundary: whatever follows is not the stream.
        c.extend_from_slice(&[0xa5; 511]);
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate_fast(Framing::Raw, &c, &mut out), Some(65536));
        assert_eq!(out, data);
    }

    #[test]
    fn zlib_stream_inflates_to_its_own_length() {
        let data = sample(40000);
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(&data).unwrap();
        let c = e.finish().unwrap();
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate_fast(Framing::Zlib, &c, &mut out), Some(40000));
        assert_eq!(&out[..40000], &data[..]);
    }

    #[test]
    fn output_larger_than_the_buffer_is_refused() {
        let c = raw_deflate(&vec![0u8; 8192], 12);
        let mut out = vec![0u8; 4096];
        assert_eq!(inflate_fast(Framing::Raw, &c, &mut out), None);
    }

    #[test]
    fn truncated_and_garbage_streams_are_refused() {
        let data = sample(65536);
        let c = raw_deflate(&data, 12);
        let mut out = vec![0u8; 65536];
        assert_eq!(
            inflate_fast(Framing::Raw, &c[..c.len() / 2], &mut out),
            None
        );
        assert_eq!(inflate_fast(Framing::Raw, &[0xff; 64], &mut out), None);
        assert_eq!(
            inflate_fast(Framing::Zlib, &[0x78, 0x9c, 0xff, 0xff], &mut out),
            None
        );
        assert_eq!(inflate_fast(Framing::Raw, &[], &mut out), None);
    }

    #[test]
    fn a_bad_zlib_checksum_is_refused() {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(&sample(4096)).unwrap();
        let mut c = e.finish().unwrap();
        let last = c.len() - 1;
        c[last] ^= 1;
        let mut out = vec![0u8; 4096];
        assert_eq!(inflate_fast(Framing::Zlib, &c, &mut out), None);
    }
}
