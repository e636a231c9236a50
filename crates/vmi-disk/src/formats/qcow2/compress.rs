//! Compressed clusters (qemu `docs/interop/qcow2.txt`, "Compressed Clusters Descriptor" and the
//! `compression_type` header field): inflating zlib (raw deflate) and zstd data into exactly one
//! cluster, and deflating clusters for writing.
//!
//! Inflation is bounded: the output buffer is one cluster plus one byte, so a cluster that would
//! inflate to more ("zip bomb") is reported, never expanded. zlib clusters are first inflated with
//! libdeflate into exactly one cluster (`crate::inflate`); only when that does not succeed does the
//! streaming inflater below run, and its verdict is the answer.

use super::header::Compression;
use crate::error::{Error, Result};
use crate::inflate::Framing;
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

/// Deflate window qemu uses for compressed clusters: 2^12 = 4 KiB (qemu reads with the same
/// window and cannot inflate data deflated with a larger one).
pub const ZLIB_WINDOW_BITS: u8 = 12;
/// zstd compression level qemu uses (its default).
pub const ZSTD_LEVEL: i32 = 3;

/// Inflate `input` into `out`, which must come out exactly `cluster` bytes long.
pub fn inflate(kind: Compression, input: &[u8], cluster: usize, out: &mut Vec<u8>) -> Result<()> {
    if kind == Compression::Zlib {
        // Every byte of the cluster is overwritten on success: no need to clear it first.
        if out.len() != cluster {
            out.resize(cluster, 0);
        }
        if crate::inflate::inflate_fast(Framing::Raw, input, out) == Some(cluster) {
            return Ok(());
        }
    }
    out.clear();
    out.resize(cluster + 1, 0);
    let produced = match kind {
        Compression::Zlib => {
            // Raw deflate; the largest window is accepted on read.
            let mut d = Decompress::new_with_window_bits(false, 15);
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(Status::Ok | Status::StreamEnd | Status::BufError) => d.total_out() as usize,
                Err(e) => {
                    return Err(Error::invalid(format!(
                        "qcow2 compressed cluster does not inflate (zlib): {e}"
                    )))
                }
            }
        }
        Compression::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| Error::io("starting zstd decoder", e))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(&mut out[..]);
            loop {
                let before = (inb.pos(), outb.pos());
                let hint = d.run(&mut inb, &mut outb).map_err(|e| {
                    Error::invalid(format!(
                        "qcow2 compressed cluster does not inflate (zstd): {e}"
                    ))
                })?;
                if hint == 0 || outb.pos() == outb.capacity() || before == (inb.pos(), outb.pos()) {
                    break;
                }
            }
            outb.pos()
        }
    };
    if produced > cluster {
        return Err(Error::invalid(format!(
            "qcow2 compressed cluster inflates to more than its {cluster}-byte cluster"
        )));
    }
    if produced < cluster {
        return Err(Error::invalid(format!(
            "qcow2 compressed cluster inflates to {produced} bytes, short of its {cluster}-byte cluster"
        )));
    }
    out.truncate(cluster);
    Ok(())
}

/// Deflate one cluster. `None` when the result would not be smaller than the cluster.
pub fn deflate(kind: Compression, data: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        Compression::Zlib => {
            let mut c = Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                ZLIB_WINDOW_BITS,
            );
            let mut out = Vec::with_capacity(data.len());
            match c.compress_vec(data, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => out,
                // Output did not fit in one cluster: not worth compressing.
                Ok(_) => return Ok(None),
                Err(e) => return Err(Error::invalid(format!("deflating a cluster: {e}"))),
            }
        }
        Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL)
            .map_err(|e| Error::io("compressing a cluster with zstd", e))?,
    };
    Ok((out.len() < data.len()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_round_trip_one_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        for k in [Compression::Zlib, Compression::Zstd] {
            let c = deflate(k, &data).unwrap().unwrap();
            let mut out = Vec::new();
            inflate(k, &c, data.len(), &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn cluster_inflating_beyond_its_size_is_an_error() {
        let data = vec![0u8; 8192];
        for k in [Compression::Zlib, Compression::Zstd] {
            let c = deflate(k, &data).unwrap().unwrap();
            let mut out = Vec::new();
            let e = inflate(k, &c, 4096, &mut out).unwrap_err();
            assert!(e.to_string().contains("more than"), "{e}");
        }
    }

    #[test]
    fn zlib_cluster_inflates_with_trailing_sector_padding_into_a_reused_buffer() {
        let data: Vec<u8> = (0..65536u32)
            .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
            .collect();
        let mut c = deflate(Compression::Zlib, &data).unwrap().unwrap();
        // Stored clusters are read in whole sectors: the stream ends before the bytes do.
        c.resize(c.len().div_ceil(512) * 512 + 512, 0x5a);
        let mut out = vec![0xee; 3];
        inflate(Compression::Zlib, &c, data.len(), &mut out).unwrap();
        assert_eq!(out, data);
        // A buffer that already holds a cluster (of other data) is overwritten entirely.
        let mut out = vec![0xee; 65536];
        inflate(Compression::Zlib, &c, data.len(), &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn a_stream_that_fills_the_cluster_without_its_end_marker_is_accepted_as_qemu_does() {
        // qemu accepts a deflate stream that produces exactly one cluster even when the input ends
        // before the final block is closed; libdeflate refuses it, so the fallback decides.
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 256) as u8).collect();
        let mut c = Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
        let mut full = Vec::with_capacity(8192);
        c.compress_vec(&data, &mut full, FlushCompress::Sync)
            .unwrap();
        assert!(crate::inflate::inflate_fast(Framing::Raw, &full, &mut vec![0; 4096]).is_none());
        let mut out = Vec::new();
        inflate(Compression::Zlib, &full, 4096, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn malformed_zlib_clusters_are_errors() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 31 % 256) as u8).collect();
        let c = deflate(Compression::Zlib, &data).unwrap().unwrap();
        let mut out = Vec::new();
        // Truncated.
        let e = inflate(Compression::Zlib, &c[..c.len() / 2], 65536, &mut out).unwrap_err();
        assert!(e.to_string().contains("short of"), "{e}");
        // Too short a cluster for the stream.
        let e = inflate(Compression::Zlib, &c, 32768, &mut out).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        // Corrupted in the middle: an error or (if it still decodes) never a panic.
        for at in [0, 1, c.len() / 3, c.len() - 2] {
            let mut bad = c.clone();
            bad[at] ^= 0xff;
            let _ = inflate(Compression::Zlib, &bad, 65536, &mut out);
        }
        assert!(inflate(Compression::Zlib, &[], 65536, &mut out).is_err());
    }

    #[test]
    fn garbage_does_not_inflate() {
        let mut out = Vec::new();
        assert!(inflate(Compression::Zlib, &[0xff; 64], 512, &mut out).is_err());
        assert!(inflate(Compression::Zstd, &[0xff; 64], 512, &mut out).is_err());
    }
}
