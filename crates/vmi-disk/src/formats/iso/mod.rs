//! ISO 9660 / UDF optical images: recognised by their volume descriptors and read as raw (the raw
//! driver opens them and reports the format as `iso`).
//!
//! ECMA-119 §6.7 and §8: the volume descriptor set starts at logical sector 16 (byte 32768) of
//! 2048-byte sectors; every descriptor has its type at byte 0, the standard identifier `CD001` at
//! bytes 1–5 and version 1 at byte 6, and the set ends with a terminator (type 255). The Primary
//! Volume Descriptor (§8.4) records the volume space size and logical block size in both byte
//! orders. UDF (ECMA-167 Part 2 §9.1) puts a Volume Recognition Sequence in the same place:
//! `BEA01`, then `NSR02`/`NSR03`, then `TEA01`, possibly after an ISO 9660 set (a UDF bridge disc).
//!
//! Confidence: a consistent primary volume descriptor and a terminator, or a complete UDF
//! recognition sequence, is certain; any other `CD001`/`BEA01`/`NSR0x` descriptor is weak. See
//! `docs/formats/iso.md` and `docs/formats/probing.md`.

use crate::formats::{Confidence, ProbeInput};

/// Byte offset of the first volume descriptor: the system area is sectors 0–15 (ECMA-119 §6.2.1).
const VOLUME_DESCRIPTOR_START: usize = 16 * 2048;
/// Size of one volume descriptor (one 2048-byte sector, ECMA-119 §8.1).
const DESCRIPTOR_SIZE: usize = 2048;
/// Descriptors examined: sectors 16–31, which is what the probe head (64 KiB) covers; enough for
/// a primary, supplementary (Joliet), boot record and terminator plus a UDF sequence.
const MAX_DESCRIPTORS: usize = 16;
/// ECMA-119 §8.1.2: the standard identifier of every ISO 9660 volume descriptor.
const ISO_ID: &[u8] = b"CD001";
/// ECMA-167 2/9.2: Beginning Extended Area descriptor.
const UDF_BEA: &[u8] = b"BEA01";
/// ECMA-167 3/9.1: NSR descriptors (UDF 1.02 uses NSR02, UDF 2.00 and later NSR03).
const UDF_NSR: [&[u8]; 2] = [b"NSR02", b"NSR03"];
/// ECMA-167 2/9.3: Terminating Extended Area descriptor.
const UDF_TEA: &[u8] = b"TEA01";
/// ECMA-167 2/9.4 and 2/9.5: other identifiers allowed in a recognition sequence.
const OTHER_VRS_IDS: [&[u8]; 2] = [b"CDW02", b"BOOT2"];
/// ECMA-119 §8.4.1: volume descriptor type of the Primary Volume Descriptor.
const TYPE_PRIMARY: u8 = 1;
/// ECMA-119 §8.3.1: volume descriptor type of the Volume Descriptor Set Terminator.
const TYPE_TERMINATOR: u8 = 255;
/// ECMA-119 §8.1.3: volume descriptor version.
const DESCRIPTOR_VERSION: u8 = 1;
/// ECMA-119 §8.4.8: byte offset of the volume space size (both-endian 32-bit) in the PVD.
const PVD_VOLUME_SPACE_SIZE: usize = 80;
/// ECMA-119 §8.4.12: byte offset of the logical block size (both-endian 16-bit) in the PVD.
const PVD_LOGICAL_BLOCK_SIZE: usize = 128;
/// ECMA-119 §8.4.31: byte offset of the file structure version (1) in the PVD.
const PVD_FILE_STRUCTURE_VERSION: usize = 881;
/// ECMA-119 §6.1.2: logical block sizes are powers of two from 512 to the sector size (2048).
const LOGICAL_BLOCK_SIZES: [u64; 3] = [512, 1024, 2048];
/// The volume holds at least the system area and the descriptor set (sectors 0–16 and a
/// terminator), counted in 2048-byte sectors.
const MIN_VOLUME_SECTORS: u64 = 18;

/// Read a both-endian field (ECMA-119 §7.2.3 / §7.3.3): `n` little-endian bytes followed by the
/// same value big-endian. `None` when the copies disagree or the field is out of range.
fn both_endian(d: &[u8], at: usize, n: usize) -> Option<u64> {
    let le = d.get(at..at + n)?;
    let be = d.get(at + n..at + 2 * n)?;
    let le = le.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
    let be = be.iter().fold(0u64, |v, &b| v << 8 | u64::from(b));
    (le == be).then_some(le)
}

/// Whether a primary volume descriptor is internally consistent and fits in the file.
fn primary_is_consistent(d: &[u8], file_len: u64) -> bool {
    let (Some(blocks), Some(block_size)) = (
        both_endian(d, PVD_VOLUME_SPACE_SIZE, 4),
        both_endian(d, PVD_LOGICAL_BLOCK_SIZE, 2),
    ) else {
        return false;
    };
    let volume = blocks.saturating_mul(block_size);
    d.get(6) == Some(&DESCRIPTOR_VERSION)
        && d.get(PVD_FILE_STRUCTURE_VERSION) == Some(&1)
        && LOGICAL_BLOCK_SIZES.contains(&block_size)
        && volume >= MIN_VOLUME_SECTORS * DESCRIPTOR_SIZE as u64
        && volume <= file_len
}

pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    let mut primary_ok = false;
    let mut terminated = false;
    let mut seen = false;
    let (mut bea, mut nsr, mut tea) = (false, false, false);
    for i in 0..MAX_DESCRIPTORS {
        let at = VOLUME_DESCRIPTOR_START + i * DESCRIPTOR_SIZE;
        let Some(d) = input
            .head
            .get(at..(at + DESCRIPTOR_SIZE).min(input.head.len()))
        else {
            break;
        };
        let Some(id) = d.get(1..6) else {
            break;
        };
        if id == ISO_ID {
            seen = true;
            match d[0] {
                TYPE_PRIMARY => primary_ok |= primary_is_consistent(d, input.len),
                TYPE_TERMINATOR => terminated = true,
                _ => {}
            }
        } else if id == UDF_BEA {
            seen = true;
            bea = true;
        } else if UDF_NSR.contains(&id) {
            seen = true;
            nsr |= bea;
        } else if id == UDF_TEA {
            tea = bea && nsr;
            break;
        } else if !OTHER_VRS_IDS.contains(&id) {
            // The descriptor set and the recognition sequence end at the first sector that is
            // not a descriptor.
            break;
        }
    }
    if (primary_ok && terminated) || tea {
        Some(Confidence::Certain)
    } else if seen {
        Some(Confidence::Weak)
    } else {
        None
    }
}

/// Builders for minimal volume descriptor sets, shared by the unit tests.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    /// A descriptor sector: type, identifier, version 1.
    pub fn descriptor(kind: u8, id: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; DESCRIPTOR_SIZE];
        d[0] = kind;
        d[1..6].copy_from_slice(id);
        d[6] = DESCRIPTOR_VERSION;
        d
    }

    /// A primary volume descriptor for a volume of `sectors` 2048-byte sectors.
    pub fn primary(sectors: u32) -> Vec<u8> {
        let mut d = descriptor(TYPE_PRIMARY, ISO_ID);
        d[80..84].copy_from_slice(&sectors.to_le_bytes());
        d[84..88].copy_from_slice(&sectors.to_be_bytes());
        d[128..130].copy_from_slice(&2048u16.to_le_bytes());
        d[130..132].copy_from_slice(&2048u16.to_be_bytes());
        d[881] = 1;
        d
    }

    /// A whole image: 16 empty system-area sectors, then `descriptors`, padded to `sectors`.
    pub fn image(descriptors: &[Vec<u8>], sectors: usize) -> Vec<u8> {
        let mut v = vec![0u8; VOLUME_DESCRIPTOR_START];
        for d in descriptors {
            v.extend_from_slice(d);
        }
        v.resize(sectors * DESCRIPTOR_SIZE, 0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    fn probe_bytes(b: &[u8]) -> Option<Confidence> {
        let head = &b[..b.len().min(crate::formats::PROBE_HEAD)];
        probe(&ProbeInput {
            head,
            tail: &[],
            len: b.len() as u64,
        })
    }

    fn iso(sectors: u32) -> Vec<u8> {
        image(
            &[primary(sectors), descriptor(TYPE_TERMINATOR, ISO_ID)],
            sectors as usize,
        )
    }

    #[test]
    fn primary_volume_descriptor_with_terminator_is_certain() {
        assert_eq!(probe_bytes(&iso(20)), Some(Confidence::Certain));
    }

    #[test]
    fn missing_terminator_is_weak() {
        let b = image(&[primary(20)], 20);
        assert_eq!(probe_bytes(&b), Some(Confidence::Weak));
    }

    #[test]
    fn disagreeing_both_endian_copies_are_weak() {
        let mut b = iso(20);
        b[VOLUME_DESCRIPTOR_START + 84..VOLUME_DESCRIPTOR_START + 88]
            .copy_from_slice(&21u32.to_be_bytes());
        assert_eq!(probe_bytes(&b), Some(Confidence::Weak));
    }

    #[test]
    fn volume_larger_than_the_file_is_weak() {
        let mut b = iso(20);
        b.truncate(19 * DESCRIPTOR_SIZE);
        assert_eq!(probe_bytes(&b), Some(Confidence::Weak));
    }

    #[test]
    fn udf_recognition_sequence_is_certain() {
        let b = image(
            &[
                descriptor(0, UDF_BEA),
                descriptor(0, b"NSR03"),
                descriptor(0, UDF_TEA),
            ],
            20,
        );
        assert_eq!(probe_bytes(&b), Some(Confidence::Certain));
    }

    #[test]
    fn udf_bridge_after_an_iso_set_is_certain() {
        let b = image(
            &[
                primary(24),
                descriptor(TYPE_TERMINATOR, ISO_ID),
                descriptor(0, UDF_BEA),
                descriptor(0, b"NSR02"),
                descriptor(0, UDF_TEA),
            ],
            24,
        );
        assert_eq!(probe_bytes(&b), Some(Confidence::Certain));
    }

    #[test]
    fn lone_beginning_extended_area_is_weak() {
        let b = image(&[descriptor(0, UDF_BEA)], 20);
        assert_eq!(probe_bytes(&b), Some(Confidence::Weak));
    }

    #[test]
    fn identifier_after_a_gap_is_ignored() {
        let b = image(&[vec![0u8; DESCRIPTOR_SIZE], primary(20)], 20);
        assert_eq!(probe_bytes(&b), None);
    }

    #[test]
    fn short_file_is_not_iso() {
        assert_eq!(probe_bytes(&[0u8; 1000]), None);
    }
}
