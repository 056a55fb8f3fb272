//! How the writeback key buffer cuts batches: a refill done in several short scans (each one
//! hold of the metadata lock) still hands out every dirty key once per pass, in order, and
//! `take_runs` bounds the separate runs (range locks) of a batch of scattered keys.

use crate::fixtures::{arc, format_open, tiny_config};
use ubcache::cache::writeback::DirtyKeyBuf;
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::dev::{BlockDev, MemDev};

/// 200 dirty 4 KiB extents, every other 4 KiB block (so no two are adjacent), plus one run of
/// 8 adjacent 4 KiB writes after them.
fn scattered_dirty() -> CacheSet {
    let cache = arc(MemDev::new(8 << 20));
    let backing = arc(MemDev::new(8192 + (4 << 20)));
    let set = format_open(&cache, &backing, tiny_config(CacheMode::Writeback));
    set.set_sequential_cutoff(0);
    let dev = set.device(0).unwrap();
    let block = vec![0x5au8; 4096];
    for i in 0..200u64 {
        dev.write_at(&block, i * 8192).unwrap();
    }
    for i in 0..8u64 {
        dev.write_at(&block, (2 << 20) + i * 4096).unwrap();
    }
    set
}

#[test]
fn a_refill_larger_than_one_scan_chunk_returns_every_key_once_in_order() {
    let set = scattered_dirty();
    let mut buf = DirtyKeyBuf::new(1000);
    let keys = buf.take(&set, 10_000, u64::MAX).unwrap();
    assert_eq!(keys.len(), 208, "one refill holds every dirty key");
    assert!(keys.windows(2).all(|w| (w[0].dev, w[0].end) <= (w[1].dev, w[1].start())), "keys out of order");
    // The next take starts a new pass and finds the same keys again (nothing was written back).
    let again = buf.take(&set, 10_000, u64::MAX).unwrap();
    assert_eq!(again, keys);
    assert!(buf.passes() >= 1);
}

#[test]
fn take_runs_stops_at_the_run_limit_and_keeps_adjacent_keys_in_one_run() {
    let set = scattered_dirty();
    let mut buf = DirtyKeyBuf::new(1000);
    let first = buf.take_runs(&set, 10_000, u64::MAX, 50).unwrap();
    assert_eq!(first.len(), 50, "50 scattered keys are 50 runs");
    let rest = buf.take_runs(&set, 10_000, u64::MAX, 151).unwrap();
    // 150 scattered keys, then the 8 adjacent ones as the 151st run.
    assert_eq!(rest.len(), 158);
    assert!(first.last().unwrap().end <= rest[0].start());
}
