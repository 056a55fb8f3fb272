//! The configuration the golden format-V1 images (`tests/data/golden/`) were made with: the
//! format crate's golden-image tests and the fuzz crate's whole-image open batch both open them
//! with it, so the two cannot drift apart.

use ubcache::cache::{CacheConfig, CacheMode};
use ubcache::journal::JournalConfig;
use ubcache_btree::TreeConfig;

pub fn config() -> CacheConfig {
    CacheConfig {
        journal: JournalConfig {
            max_record_bytes: 4096,
            checkpoint_fraction: 0.5,
            ..JournalConfig::default()
        },
        tree: TreeConfig { max_cached_nodes: 64, bset_align: 512 },
        sequential_cutoff: 0,
        reclaim_batch: 2,
        max_uncommitted_entries: 64,
        mode: CacheMode::Writeback,
        ..CacheConfig::default()
    }
}
