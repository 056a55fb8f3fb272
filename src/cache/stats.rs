//! Statistics counters of a cache set: atomics bumped on the request path without a lock, and a
//! serde snapshot for the control socket and `ubcache stats`.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters. Monotonic except `dirty_bytes`, which is a gauge.
#[derive(Debug, Default)]
pub struct Stats {
    pub read_hits: AtomicU64,
    pub read_misses: AtomicU64,
    pub read_bypassed: AtomicU64,
    pub write_cached: AtomicU64,
    pub write_bypassed: AtomicU64,
    pub collisions: AtomicU64,
    pub dirty_bytes: AtomicU64,
    pub written_back_bytes: AtomicU64,
    pub buckets_reclaimed: AtomicU64,
    pub checkpoints: AtomicU64,
    pub journal_commits: AtomicU64,
    pub full_fallbacks: AtomicU64,
    pub bypass_mode: AtomicU64,
    pub bypass_sequential: AtomicU64,
    pub bypass_congestion: AtomicU64,
    pub bypass_full: AtomicU64,
    pub readaheads: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Read sectors served from the cache.
    pub read_hits: u64,
    /// Read sectors served from backing (cache miss).
    pub read_misses: u64,
    /// Read requests that skipped cache insertion (mode none or sequential cutoff).
    pub read_bypassed: u64,
    /// Write requests whose data went into the cache.
    pub write_cached: u64,
    /// Write requests that went to backing only.
    pub write_bypassed: u64,
    /// Read-miss fills dropped because a write raced them (whole or in part).
    pub collisions: u64,
    /// Bytes of dirty data in the cache now.
    pub dirty_bytes: u64,
    /// Bytes copied home by writeback.
    pub written_back_bytes: u64,
    pub buckets_reclaimed: u64,
    pub checkpoints: u64,
    pub journal_commits: u64,
    /// Writes that went to backing because no cache space could be freed (rule 6 fallback).
    pub full_fallbacks: u64,
    /// Requests that bypassed the cache because of the mode: writes in writearound/none, read
    /// misses in none. Each bypassing request counts under exactly one reason.
    pub bypass_mode: u64,
    /// Requests that bypassed because their stream passed the sequential cutoff (writes sent to
    /// backing; reads whose misses did not fill the cache).
    pub bypass_sequential: u64,
    /// Requests that bypassed because the cache device was congested.
    pub bypass_congestion: u64,
    /// Requests that bypassed because no cache space could be freed: writes sent to backing
    /// (`full_fallbacks`) and reads whose miss fill found no space.
    pub bypass_full: u64,
    /// Read-ahead: prefetch (NBD CACHE) requests that brought missing data into the cache.
    #[serde(default)]
    pub readaheads: u64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one request that bypassed the cache for `reason`.
    pub fn bypassed(&self, reason: super::policy::BypassReason) {
        use super::policy::BypassReason;
        let counter = match reason {
            BypassReason::Mode => &self.bypass_mode,
            BypassReason::Sequential => &self.bypass_sequential,
            BypassReason::Congestion => &self.bypass_congestion,
            BypassReason::Full => &self.bypass_full,
        };
        Stats::add(counter, 1);
    }

    #[must_use]
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            read_hits: g(&self.read_hits),
            read_misses: g(&self.read_misses),
            read_bypassed: g(&self.read_bypassed),
            write_cached: g(&self.write_cached),
            write_bypassed: g(&self.write_bypassed),
            collisions: g(&self.collisions),
            dirty_bytes: g(&self.dirty_bytes),
            written_back_bytes: g(&self.written_back_bytes),
            buckets_reclaimed: g(&self.buckets_reclaimed),
            checkpoints: g(&self.checkpoints),
            journal_commits: g(&self.journal_commits),
            full_fallbacks: g(&self.full_fallbacks),
            bypass_mode: g(&self.bypass_mode),
            bypass_sequential: g(&self.bypass_sequential),
            bypass_congestion: g(&self.bypass_congestion),
            bypass_full: g(&self.bypass_full),
            readaheads: g(&self.readaheads),
        }
    }
}
