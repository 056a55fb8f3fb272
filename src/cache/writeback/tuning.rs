//! Writeback tuning: [`WritebackConfig`] (how a writeback thread or drain runs) and
//! [`WritebackTuning`], the runtime knobs and gauges of a cache set's writeback. The tuning is
//! a field of the cache set ([`CacheSet::writeback_tuning`](crate::cache::CacheSet::writeback_tuning)): the writeback thread reads it
//! before each decision, and the control socket changes it (`ubcache set writeback_percent
//! 20` reaches a running thread without either knowing the other).

use super::policy::CoalesceLimits;
use crate::dev::SECTOR_SIZE;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Tuning of the writeback thread. Defaults follow bcache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackConfig {
    /// Dirty data aimed for, percent of the cache's data capacity (default 10).
    pub writeback_percent: u8,
    /// Wait before writing back dirty data that appeared in a clean cache (default 30 s).
    pub writeback_delay: Duration,
    /// Lowest rate, bytes/s: below the target writeback trickles at this rate (default 4 KiB/s).
    pub min_rate: u64,
    /// Highest rate, bytes/s (default 1 GiB/s).
    pub max_rate: u64,
    /// PI controller gains as inverses (bcache: 40 and 10000); see [`super::policy::RateConfig`].
    pub p_term_inverse: u64,
    pub i_term_inverse: u64,
    /// How often the rate is recomputed (bcache: 5 s; default 1 s).
    pub rate_update_interval: Duration,
    /// Share of data buckets holding dirty data (percent) at which writeback goes full speed
    /// (default 70).
    pub urgent_percent: u8,
    /// Keys written per batch at most (default 256; a rate-paced batch is also bounded by
    /// what the rate allows in [`super::RATE_SLICE`]).
    pub batch_keys: usize,
    /// Largest coalesced backing write, bytes (default 1 MiB).
    pub max_io_bytes: u64,
    /// Keys the key buffer holds (bcache: 500).
    pub keybuf_keys: usize,
    /// How often an idle thread looks for new dirty data (default 100 ms).
    pub idle_poll: Duration,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        Self {
            writeback_percent: 10,
            writeback_delay: Duration::from_secs(30),
            min_rate: 4096,
            max_rate: 1 << 30,
            p_term_inverse: 40,
            i_term_inverse: 10_000,
            rate_update_interval: Duration::from_secs(1),
            urgent_percent: 70,
            batch_keys: 256,
            max_io_bytes: 1 << 20,
            keybuf_keys: 500,
            idle_poll: Duration::from_millis(100),
        }
    }
}

impl WritebackConfig {
    /// Tuning for a writeback drain: large batches (up to 16384 keys, at most 64 MiB and, in
    /// [`super::DrainStep`], 1024 separate runs), so the one backing sync per batch is spread over
    /// many keys. With 512 keys per batch a drain of contiguous 4 KiB extents (2 MiB batches) ran at
    /// a sixth of the backing file's sequential write speed, with 4096 (16 MiB) at about a
    /// third; with 16384, the in-kernel copy, early writeout, one clean entry per run and the
    /// writer thread it runs at 80-100% (`examples/wb_latency.rs`, `docs/benchmarks.md`). The
    /// range locks of a batch are held until it is synced, so a writethrough or bypass write
    /// into a range being drained waits up to one batch (a writeback-mode write never does).
    #[must_use]
    pub fn for_drain() -> Self {
        Self { batch_keys: 16384, keybuf_keys: 16384, ..Self::default() }
    }

    pub(crate) fn limits(&self) -> CoalesceLimits {
        CoalesceLimits {
            max_io_len: (self.max_io_bytes / SECTOR_SIZE).max(1),
            max_extents: self.batch_keys.max(1),
        }
    }
}

/// The part of the configuration the control socket changes at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TuningValues {
    pub writeback_percent: u8,
    pub writeback_delay: Duration,
    pub min_rate: u64,
    pub max_rate: u64,
}

impl From<&WritebackConfig> for TuningValues {
    fn from(c: &WritebackConfig) -> Self {
        Self {
            writeback_percent: c.writeback_percent,
            writeback_delay: c.writeback_delay,
            min_rate: c.min_rate,
            max_rate: c.max_rate,
        }
    }
}

/// Runtime tuning and gauges of a cache set's writeback, shared by its writeback thread and its
/// control target (a field of the set: [`CacheSet::writeback_tuning`](crate::cache::CacheSet::writeback_tuning)).
#[derive(Debug)]
pub struct WritebackTuning {
    values: Mutex<TuningValues>,
    /// Rate of the last controller update, bytes/s (0: no thread, or nothing dirty).
    pub(super) rate: AtomicU64,
    /// A writeback drain at full speed was asked of the thread (cleared once nothing is dirty).
    pub(super) drain_requested: AtomicBool,
    /// Whether a writeback thread runs for the set.
    pub(super) running: AtomicBool,
    pub(super) wake: Condvar,
    pub(super) wake_lock: Mutex<()>,
}

impl Default for WritebackTuning {
    /// [`WritebackConfig::default`] values, no thread running.
    fn default() -> Self {
        Self::new(TuningValues::from(&WritebackConfig::default()))
    }
}

impl WritebackTuning {
    fn new(values: TuningValues) -> Self {
        Self {
            values: Mutex::new(values),
            rate: AtomicU64::new(0),
            drain_requested: AtomicBool::new(false),
            running: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
        }
    }

    /// The values now.
    #[must_use]
    pub fn values(&self) -> TuningValues {
        *self.values.lock()
    }

    /// Changes the values (the caller validated them) and wakes the thread.
    pub fn update(&self, f: impl FnOnce(&mut TuningValues)) {
        f(&mut self.values.lock());
        self.notify();
    }

    /// The current writeback rate, bytes/s (0 when no thread runs or nothing is dirty).
    #[must_use]
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Whether a writeback thread runs for the set.
    #[must_use]
    pub fn thread_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    pub(super) fn notify(&self) {
        let _g = self.wake_lock.lock();
        self.wake.notify_all();
    }
}
