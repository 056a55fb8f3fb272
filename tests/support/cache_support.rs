//! Shared set-up for the cache engine's integration tests: tiny geometry so reclaim, writeback,
//! checkpoints and journal wrap happen constantly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use ubcache::alloc::ReplacementPolicy;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, DevResult, MemDev, SimDev};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Off,
    Armed(u64),
    Parked,
    Released,
}

/// A memory device whose first write at an armed offset parks until released: a test holds an
/// operation in the middle of its backing write and does something else meanwhile.
#[derive(Debug)]
pub struct GatedDev {
    inner: MemDev,
    gate: parking_lot::Mutex<Gate>,
    changed: parking_lot::Condvar,
}

impl GatedDev {
    pub fn new(len: u64) -> Self {
        Self {
            inner: MemDev::new(len),
            gate: parking_lot::Mutex::new(Gate::Off),
            changed: parking_lot::Condvar::new(),
        }
    }

    /// The next write at exactly `offset` parks.
    pub fn arm(&self, offset: u64) {
        *self.gate.lock() = Gate::Armed(offset);
    }

    pub fn wait_parked(&self) {
        let mut g = self.gate.lock();
        while *g != Gate::Parked {
            assert!(!self.changed.wait_for(&mut g, Duration::from_secs(30)).timed_out(), "never parked");
        }
    }

    pub fn release(&self) {
        *self.gate.lock() = Gate::Released;
        self.changed.notify_all();
    }
}

impl BlockDev for GatedDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        {
            let mut g = self.gate.lock();
            if *g == Gate::Armed(offset) {
                *g = Gate::Parked;
                self.changed.notify_all();
                while *g == Gate::Parked {
                    self.changed.wait(&mut g);
                }
            }
        }
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> DevResult<()> {
        self.inner.sync()
    }
}

/// Where a crash test cuts the power: never, after the n-th write or at the n-th sync of the
/// cache or the backing device (counted from when the cut is armed).
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    Never,
    CacheWrite(u64),
    CacheSync(u64),
    BackingWrite(u64),
    BackingSync(u64),
}

impl Cut {
    pub fn arm(self, cache: &SimDev, backing: &SimDev) {
        match self {
            Cut::Never => {}
            Cut::CacheWrite(n) => cache.set_crash_after_writes(n),
            Cut::CacheSync(n) => cache.set_crash_at_sync(n),
            Cut::BackingWrite(n) => backing.set_crash_after_writes(n),
            Cut::BackingSync(n) => backing.set_crash_at_sync(n),
        }
    }

    /// `Never`, then every `stride(count)`-th cut point of an operation that did
    /// `(writes, syncs)` on the cache and on the backing device.
    pub fn points(cache: (u64, u64), backing: (u64, u64), stride: impl Fn(u64) -> u64) -> Vec<Cut> {
        let every = |n: u64| (1..=n).step_by(stride(n).max(1) as usize);
        let mut out = vec![Cut::Never];
        out.extend(every(cache.0).map(Cut::CacheWrite));
        out.extend(every(cache.1).map(Cut::CacheSync));
        out.extend(every(backing.0).map(Cut::BackingWrite));
        out.extend(every(backing.1).map(Cut::BackingSync));
        out
    }
}

/// The crash images a crash test checks at each cut: every unsynced write dropped, every one
/// kept, and two random mixes (whole writes; torn writes).
pub fn crash_modes(rng: &mut impl rand::Rng) -> [ubcache::dev::CrashMode; 4] {
    use ubcache::dev::CrashMode;
    [
        CrashMode::DropAll,
        CrashMode::KeepAll,
        CrashMode::Random { seed: rng.r#gen() },
        CrashMode::TornRandom { seed: rng.r#gen() },
    ]
}
