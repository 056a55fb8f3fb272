//! The replacement policy changes at runtime (`CacheSet::set_replacement_policy`, the
//! `replacement_policy` knob): the next reclaim picks its victims by the new policy, and the
//! choice survives a restart (stored in the cache superblock's compat bits).
//!
//! The workload tells LRU from FIFO: the bucket holding blocks 0..4 is the first data bucket
//! ever opened and is read after every write. LRU keeps it (it is always the most recently
//! used); FIFO evicts it first (it is the oldest).

use crate::fixtures::{arc, format_open, tiny_config};
use std::sync::Arc;
use ubcache::alloc::ReplacementPolicy;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, CachedDev};
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format;

const BLOCK: usize = 4096;
/// Blocks per 16 KiB bucket.
const HOT: u64 = 4;

fn config(policy: ReplacementPolicy) -> CacheConfig {
    CacheConfig { reclaim_policy: policy, reclaim_batch: 1, ..tiny_config(CacheMode::Writethrough) }
}

fn write(dev: &CachedDev, block: u64) {
    dev.write_at(&vec![(block % 251) as u8 + 1; BLOCK], block * BLOCK as u64).unwrap();
}

/// Reads the hot blocks; returns how many of their sectors missed.
fn read_hot(set: &CacheSet, dev: &CachedDev) -> u64 {
    let before = set.stats().read_misses;
    let mut buf = vec![0u8; BLOCK];
    for block in 0..HOT {
        dev.read_at(&mut buf, block * BLOCK as u64).unwrap();
        assert!(buf.iter().all(|&b| b == (block % 251) as u8 + 1), "block {block} reads wrong data");
    }
    set.stats().read_misses - before
}

#[test]
fn reclaim_follows_the_policy_set_at_runtime_and_the_choice_survives_a_restart() {
    // About 100 data buckets: at every reclaim round there are buckets older than the hot one.
    let cache = arc(MemDev::new(2 << 20));
    let backing = arc(MemDev::new(8192 + (8 << 20)));
    let set = format_open(&cache, &backing, config(ReplacementPolicy::Lru));
    set.set_sequential_cutoff(0);
    assert_eq!(set.replacement_policy(), ReplacementPolicy::Lru);
    let dev = set.device(0).unwrap();
    for block in 0..HOT {
        write(&dev, block);
    }
    assert_eq!(read_hot(&set, &dev), 0);

    // LRU: many reclaim rounds, and the hot bucket (read after every write) is never taken.
    let mut next = 100;
    while set.stats().buckets_reclaimed < 250 {
        write(&dev, next);
        next += 1;
        assert_eq!(read_hot(&set, &dev), 0, "LRU evicted the hot bucket after {} writes", next - 100);
        assert!(next < 1900, "too few reclaims");
    }

    // FIFO from now on: the hot bucket is the oldest, so the very next reclaim takes it.
    set.set_replacement_policy(ReplacementPolicy::Fifo).unwrap();
    assert_eq!(set.replacement_policy(), ReplacementPolicy::Fifo);
    let reclaimed = set.stats().buckets_reclaimed;
    while set.stats().buckets_reclaimed == reclaimed {
        write(&dev, next);
        next += 1;
        assert!(next < 4000, "no reclaim happened");
    }
    assert_eq!(read_hot(&set, &dev), HOT * 8, "FIFO must evict the oldest bucket (the hot one) first");

    // Stored in the superblock: a restart configured for LRU keeps FIFO.
    let sb = format::read_cache_superblock(cache.as_ref()).unwrap().sb;
    assert_eq!(sb.replacement_policy(), Some(ReplacementPolicy::Fifo));
    drop(dev);
    set.close().unwrap();
    let set =
        CacheSet::open(Arc::clone(&cache), &[Arc::clone(&backing)], config(ReplacementPolicy::Lru)).unwrap();
    assert_eq!(set.replacement_policy(), ReplacementPolicy::Fifo);
    set.set_replacement_policy(ReplacementPolicy::Random).unwrap();
    set.close().unwrap();
    let set = CacheSet::open(cache, &[backing], config(ReplacementPolicy::Lru)).unwrap();
    assert_eq!(set.replacement_policy(), ReplacementPolicy::Random, "the stored policy wins");
}

/// A superblock without a stored policy (never changed at runtime) opens with the configured
/// one, and old superblocks (compat bits 0) read as "not stored".
#[test]
fn without_a_stored_policy_the_configured_one_applies() {
    let cache = arc(MemDev::new(512 * 1024));
    let backing = arc(MemDev::new(8192 + (1 << 20)));
    let set = format_open(&cache, &backing, config(ReplacementPolicy::Fifo));
    assert_eq!(set.replacement_policy(), ReplacementPolicy::Fifo);
    let sb = format::read_cache_superblock(cache.as_ref()).unwrap().sb;
    assert_eq!(sb.features.compat, 0);
    assert_eq!(sb.replacement_policy(), None);
    set.close().unwrap();
    let set = CacheSet::open(cache, &[backing], config(ReplacementPolicy::Lru)).unwrap();
    assert_eq!(set.replacement_policy(), ReplacementPolicy::Lru);
}
