//! The allocator behind a SKU's maps: the global allocator, except that a large
//! block has each of its pages written once before it is handed out.
//!
//! A SKU's order and buyer maps are sized for its whole stock at import. Left to the
//! kernel, their pages would be faulted in one at a time by whichever insert first
//! lands on each, in the middle of the drop: measured under wrk at 2,000,000 cards,
//! 0.7 page faults per order and about 2 µs more kernel time per order than at
//! 700,000. Written here, those faults are taken in one sweep inside the import
//! (about 0.3 s per GiB on a VM), before any buyer arrives. Small blocks are passed
//! through untouched; a map that grows during a drop writes every entry into its new
//! block while rehashing anyway, so touching it first adds little.
//!
//! This is the pure state machine's only `unsafe`: an allocator, no I/O.

use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};

/// Blocks at least this large are written through before use.
const PREFAULT_BYTES_MIN: usize = 1 << 20;
/// The smallest page size; on a system with larger pages some writes are redundant.
const PAGE_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, Default)]
pub struct Prefaulted;

// SAFETY: every method forwards to `Global`, which upholds the `Allocator` contract;
// `allocate` only writes into the block it is about to return.
unsafe impl Allocator for Prefaulted {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let block = Global.allocate(layout)?;
        if block.len() >= PREFAULT_BYTES_MIN {
            let start = block.cast::<u8>().as_ptr();
            for offset in (0..block.len()).step_by(PAGE_BYTES) {
                // SAFETY: `offset < block.len()`, so the byte is inside the block we
                // own; its contents are uninitialised, so no one may rely on them.
                // Volatile, so the write that faults the page in is not elided.
                unsafe { start.add(offset).write_volatile(0) };
            }
        }
        Ok(block)
    }

    unsafe fn deallocate(&self, block: NonNull<u8>, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (so `Global`) returned,
        // with its layout, as `deallocate`'s contract requires.
        unsafe { Global.deallocate(block, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults of this process so far.
    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        // Field 10 (minflt), counted after the parenthesised name.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name
            .split_whitespace()
            .nth(7)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_large_block_is_faulted_in_before_use() {
        let layout = Layout::from_size_align(64 << 20, 8).unwrap();
        let block = Prefaulted.allocate(layout).unwrap();
        let start = block.cast::<u8>().as_ptr();
        let before = minor_faults();
        for offset in (0..block.len()).step_by(PAGE_BYTES) {
            // SAFETY: inside the block just allocated.
            unsafe { start.add(offset).write_volatile(1) };
        }
        let taken = minor_faults() - before;
        // 16,384 pages written; other threads of the test binary may fault a few.
        assert!(taken < 1_000, "{taken} page faults after prefaulting");
        // SAFETY: allocated above with this layout.
        unsafe { Prefaulted.deallocate(block.cast(), layout) };
    }

    #[test]
    fn maps_in_it_work_as_maps() {
        let mut map: hashbrown::HashMap<u64, u64, foldhash::quality::RandomState, Prefaulted> =
            hashbrown::HashMap::default();
        map.reserve(200_000);
        for key in 0..200_000 {
            map.insert(key, key * 2);
        }
        assert_eq!(map.len(), 200_000);
        assert_eq!(map.get(&4_321), Some(&8_642));
        let copy = map.clone();
        assert_eq!(copy, map);
    }
}
