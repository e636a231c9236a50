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

#[cfg(test)]
mod tests {
    //! Regression tests for what fuzzing found, each named after its finding.

    use super::*;
    use std::process::Command;

    /// A 64 KiB qcow2 with 512-byte clusters, made by qemu-img.
    fn small_qcow2() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
            .arg(&p)
            .arg("64K")
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(&p).unwrap()
    }

    fn check_report(data: Vec<u8>) -> crate::check::CheckReport {
        let img = Image::from_storage(
            Box::new(MemStorage::from_bytes(data)),
            Path::new("fuzz.img"),
            Some(Format::Qcow2),
            false,
            &Gate::deny_all(),
        )
        .unwrap();
        img.driver().check(CheckMode::ReadOnly).unwrap()
    }

    #[test]
    fn fuzz_qcow2_check_reports_a_refcount_block_offset_near_2_pow_64_instead_of_overflowing() {
        let mut data = small_qcow2();
        let reftable = u64::from_be_bytes(data[48..56].try_into().unwrap()) as usize;
        data[reftable + 8..reftable + 16].copy_from_slice(&0xffff_ffff_ffff_fe00u64.to_be_bytes());
        assert!(exercise(Some(Format::Qcow2), &data));
        assert!(check_report(data).corruptions >= 1);
    }

    /// Inputs the fuzzers found, kept in their corpora (`fuzz/corpus/<target>/crash-*`) so every
    /// fuzzing run replays them too.
    #[test]
    fn fuzz_qcow2_an_unaligned_l2_offset_at_the_end_of_the_address_space_does_not_overflow_check() {
        let data = include_bytes!(
            "../../../fuzz/corpus/qcow2/crash-8c98bf66e615b371946fb041ce155e28e5c0a387"
        );
        exercise(Some(Format::Qcow2), data);
    }

    #[test]
    fn fuzz_qed_check_of_an_l2_entry_near_2_pow_64_does_not_overflow() {
        let data = include_bytes!(
            "../../../fuzz/corpus/probe/crash-312495107954953296b3ecd6167ecc8f2a981a7f"
        );
        exercise(None, data);
    }
}
