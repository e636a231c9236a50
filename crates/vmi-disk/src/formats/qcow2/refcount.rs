//! Refcount blocks (qemu `docs/interop/qcow2.txt`, "Cluster mapping" / refcount table and blocks):
//! reading and writing one refcount of any width (`refcount_order` 0-6, 1 to 64 bits) inside a
//! block's bytes, and the metadata-size arithmetic `measure` shares with qemu.

/// Largest refcount table accepted (qemu's QCOW_MAX_REFTABLE_SIZE, 8 MiB).
pub const MAX_REFTABLE_SIZE: u64 = 8 << 20;

/// Refcount `index` in a block of width `1 << order` bits (big-endian, bit 0 of byte 0 being the
/// least significant bit for widths below 8, as the spec describes).
pub fn get(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = index * bits;
        let byte = block.get((bit / 8) as usize).copied().unwrap_or(0);
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let at = index as usize * n;
        block.get(at..at + n).map_or(0, |b| {
            b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        })
    }
}

/// Set refcount `index` (the value must fit the width; see [`max`]).
pub fn set(block: &mut [u8], index: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = index * bits;
        if let Some(byte) = block.get_mut((bit / 8) as usize) {
            let mask = (((1u64 << bits) - 1) << (bit % 8)) as u8;
            *byte = (*byte & !mask) | (((value << (bit % 8)) as u8) & mask);
        }
    } else {
        let n = (bits / 8) as usize;
        let at = index as usize * n;
        if let Some(b) = block.get_mut(at..at + n) {
            for (i, x) in b.iter_mut().enumerate() {
                let shift = 8 * (n - 1 - i);
                *x = (value >> shift) as u8;
            }
        }
    }
}

/// Largest refcount of width `1 << order`.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    }
}

/// Bytes of refcount table and blocks needed to cover `clusters` clusters plus themselves (qemu's
/// `qcow2_refcount_metadata_size` without the generous increase).
pub fn metadata_size(clusters: u64, cluster_size: u64, order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = cluster_size * 8 / (1u64 << order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cluster_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_at_both_ends_of_a_block() {
        for order in 0..=6 {
            let mut block = vec![0u8; 512];
            let per = 512 * 8 / (1u64 << order);
            for idx in [0, 1, per / 2, per - 1] {
                set(&mut block, idx, order, max(order));
                assert_eq!(
                    get(&block, idx, order),
                    max(order),
                    "order {order} idx {idx}"
                );
                set(&mut block, idx, order, 1);
                assert_eq!(get(&block, idx, order), 1);
            }
            assert_eq!(get(&block, 2, order), 0);
        }
    }

    #[test]
    fn one_bit_refcounts_start_at_the_least_significant_bit() {
        let mut block = vec![0u8; 1];
        set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        set(&mut block, 7, 0, 1);
        assert_eq!(block[0], 0x81);
    }
}
