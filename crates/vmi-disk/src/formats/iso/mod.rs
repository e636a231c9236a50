//! ISO 9660 / UDF optical images: recognised by their volume descriptors and read as raw.
//!
//! ECMA-119 §8: the volume descriptor set starts at sector 16 (byte 32768) of 2048-byte sectors;
//! each descriptor has the standard identifier `CD001` at byte 1. UDF (ECMA-167 §2/9.1) uses
//! `BEA01`, `NSR02`/`NSR03` and `TEA01` in the same area.

use crate::formats::{Confidence, ProbeInput};

/// Byte offset of the first volume descriptor (system area is sectors 0–15).
const VOLUME_DESCRIPTOR_START: usize = 16 * 2048;
/// Size of one volume descriptor.
const DESCRIPTOR_SIZE: usize = 2048;
/// Descriptors we look at: enough for the PVD, supplementary descriptors and a UDF sequence.
const MAX_DESCRIPTORS: usize = 8;

pub(crate) fn probe(input: &ProbeInput) -> Option<Confidence> {
    let mut found = None;
    for i in 0..MAX_DESCRIPTORS {
        let at = VOLUME_DESCRIPTOR_START + i * DESCRIPTOR_SIZE;
        let Some(id) = input.head.get(at + 1..at + 6) else {
            break;
        };
        match id {
            b"CD001" => {
                // A primary volume descriptor (type 1) with version 1 is what every ISO has.
                if input.head[at] == 1 && input.head.get(at + 6) == Some(&1) {
                    return Some(Confidence::Certain);
                }
                found = Some(Confidence::Weak);
            }
            b"BEA01" | b"NSR02" | b"NSR03" => found = Some(Confidence::Certain),
            b"TEA01" => break,
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso_head() -> Vec<u8> {
        let mut head = vec![0u8; 40960];
        head[32768] = 1;
        head[32769..32774].copy_from_slice(b"CD001");
        head[32774] = 1;
        head
    }

    #[test]
    fn primary_volume_descriptor_is_certain() {
        let head = iso_head();
        let p = probe(&ProbeInput {
            head: &head,
            tail: &[],
            len: 1 << 20,
        });
        assert_eq!(p, Some(Confidence::Certain));
    }

    #[test]
    fn short_file_is_not_iso() {
        let head = vec![0u8; 1000];
        assert_eq!(
            probe(&ProbeInput {
                head: &head,
                tail: &[],
                len: 1000
            }),
            None
        );
    }
}
