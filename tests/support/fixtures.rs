//! The cache set every engine-level test starts from: tiny geometry so reclaim, writeback,
//! checkpoints and journal wrap happen constantly. Used by the `engine`, `writeback` and `ctl`
//! test crates.

use std::sync::Arc;
use ubcache::alloc::ReplacementPolicy;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::BlockDev;
use ubcache::journal::JournalConfig;
use ubcache_btree::TreeConfig;

/// 16 KiB buckets, 2 KiB btree nodes.
pub const TINY: FormatOptions = FormatOptions { bucket_bytes: 16 * 1024, node_bytes: 2048 };

/// Engine tuning for tests: small journal records, frequent commits, a small sequential cutoff.
pub fn tiny_config(mode: CacheMode) -> CacheConfig {
    CacheConfig {
        journal: JournalConfig {
            max_record_bytes: 4096,
            checkpoint_fraction: 0.5,
            ..JournalConfig::default()
        },
        tree: TreeConfig { max_cached_nodes: 64, bset_align: 512 },
        sequential_cutoff: 96 * 1024,
        reclaim_policy: ReplacementPolicy::Fifo,
        reclaim_batch: 2,
        max_uncommitted_entries: 32,
        mode,
        ..CacheConfig::default()
    }
}

pub fn arc(d: impl BlockDev + 'static) -> Arc<dyn BlockDev> {
    Arc::new(d)
}

/// Formats and opens a set over the given devices.
pub fn format_open(cache: &Arc<dyn BlockDev>, backing: &Arc<dyn BlockDev>, cfg: CacheConfig) -> CacheSet {
    ubcache::cache::format(cache, std::slice::from_ref(backing), TINY).unwrap();
    CacheSet::open(Arc::clone(cache), std::slice::from_ref(backing), cfg).unwrap()
}
