//! Shared set-up for the cache engine's integration tests: tiny geometry so reclaim, writeback,
//! checkpoints and journal wrap happen constantly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use ubcache::alloc::ReclaimPolicy;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, DevResult, MemDev};
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
        reclaim_policy: ReclaimPolicy::Fifo,
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

/// A memory device whose reads and writes take at least `delay_us` (syncs are not delayed):
/// a cache device whose latency a test turns up and down, for the congestion bypass.
#[derive(Debug)]
pub struct LaggyDev {
    pub inner: MemDev,
    pub delay_us: Arc<AtomicU64>,
}

impl LaggyDev {
    fn lag(&self) {
        let us = self.delay_us.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}

impl BlockDev for LaggyDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.lag();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.lag();
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> DevResult<()> {
        self.inner.sync()
    }
}
