//! A latency-injecting wrapper: makes any device behave like a slow disk, for benchmarks of the
//! cache over a slow backing device.
//!
//! The model, per operation: a fixed latency; a seek penalty (uniform in a range, from a seeded
//! generator) when the op does not start where the previous one ended, as a disk head must move;
//! and a transfer time at a bandwidth shared by all ops (a channel busy until some instant: a
//! new transfer starts when the previous one has finished). With `serialize`, ops run one at a
//! time like a single spindle, so queueing shows up as latency.
//!
//! With `virtual_time` nothing sleeps: the delays are only added up in [`SlowStats`], which gives
//! deterministic figures ("how long would this workload take on a disk") without waiting.

use super::sim::SplitMix64;
use super::{BlockDev, DevCaps, DevResult};
use parking_lot::Mutex;
use std::ops::Range;
use std::time::{Duration, Instant};

/// How slow a [`SlowDev`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowDevConfig {
    /// Added to every read, write, sync, discard and zeroing.
    pub per_op_latency: Duration,
    /// Added to a sync (on top of `per_op_latency`): a cache flush.
    pub sync_latency: Duration,
    /// A non-sequential read or write waits a seek drawn uniformly from `min..=max`.
    pub seek_latency: Option<(Duration, Duration)>,
    /// Transfer bandwidth in bytes per second, shared by all ops (`None`: unlimited).
    pub bytes_per_sec: Option<u64>,
    /// One op at a time, like a single spindle.
    pub serialize: bool,
    /// Only account the delays, never sleep.
    pub virtual_time: bool,
    /// Seed of the seek-time generator.
    pub seed: u64,
}

impl Default for SlowDevConfig {
    /// No delay at all: a pass-through to refine field by field.
    fn default() -> Self {
        Self {
            per_op_latency: Duration::ZERO,
            sync_latency: Duration::ZERO,
            seek_latency: None,
            bytes_per_sec: None,
            serialize: false,
            virtual_time: false,
            seed: 0,
        }
    }
}

impl SlowDevConfig {
    /// A 7200 rpm hard disk: 5–8 ms seeks (including rotational delay), 150 MB/s sequential,
    /// 0.1 ms command overhead, a 2 ms cache flush, one op at a time.
    #[must_use]
    pub fn hdd() -> Self {
        Self {
            per_op_latency: Duration::from_micros(100),
            sync_latency: Duration::from_millis(2),
            seek_latency: Some((Duration::from_millis(5), Duration::from_millis(8))),
            bytes_per_sec: Some(150_000_000),
            serialize: true,
            virtual_time: false,
            seed: 0,
        }
    }
}

/// What a [`SlowDev`] has done and how much delay it modelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlowStats {
    pub ops: u64,
    /// Reads and writes that did not start where the previous op ended.
    pub seeks: u64,
    /// Total modelled delay (slept, unless `virtual_time`).
    pub modeled_delay: Duration,
}

#[derive(Debug)]
struct SlowState {
    /// Where the previous read or write ended: the head position.
    head: Option<u64>,
    rng: SplitMix64,
    /// When the shared transfer channel is next free (real time).
    channel_free_at: Option<Instant>,
    stats: SlowStats,
}

/// Wraps `D`, delaying each op as [`SlowDevConfig`] says. Data and errors pass through unchanged.
#[derive(Debug)]
pub struct SlowDev<D> {
    inner: D,
    config: SlowDevConfig,
    state: Mutex<SlowState>,
    /// Held for a whole op when `serialize` is set.
    spindle: Mutex<()>,
}

impl<D: BlockDev> SlowDev<D> {
    pub fn new(inner: D, config: SlowDevConfig) -> Self {
        let state = SlowState {
            head: None,
            rng: SplitMix64::new(config.seed),
            channel_free_at: None,
            stats: SlowStats::default(),
        };
        Self { inner, config, state: Mutex::new(state), spindle: Mutex::new(()) }
    }

    pub fn stats(&self) -> SlowStats {
        self.state.lock().stats
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    pub fn into_inner(self) -> D {
        self.inner
    }

    /// Runs `op` after the modelled delay for an access to `range` (`None`: a sync).
    fn delayed<T>(&self, range: Option<Range<u64>>, op: impl FnOnce() -> DevResult<T>) -> DevResult<T> {
        let _spindle = self.config.serialize.then(|| self.spindle.lock());
        let wait_until = self.account(range);
        if let Some(deadline) = wait_until {
            let now = Instant::now();
            if deadline > now {
                std::thread::sleep(deadline - now);
            }
        }
        op()
    }

    /// Adds this op's delay to the stats and returns when it may run (`None`: at once).
    fn account(&self, range: Option<Range<u64>>) -> Option<Instant> {
        let cfg = &self.config;
        let mut st = self.state.lock();
        st.stats.ops += 1;
        let mut fixed = cfg.per_op_latency;
        let mut transfer = Duration::ZERO;
        match range {
            None => fixed += cfg.sync_latency,
            Some(range) => {
                if st.head != Some(range.start) {
                    if let Some((min, max)) = cfg.seek_latency {
                        st.stats.seeks += 1;
                        let spread = max.saturating_sub(min).as_nanos() as u64;
                        let extra = if spread == 0 { 0 } else { st.rng.next() % (spread + 1) };
                        fixed += min + Duration::from_nanos(extra);
                    }
                }
                st.head = Some(range.end);
                if let Some(bps) = cfg.bytes_per_sec.filter(|&b| b > 0) {
                    let len = range.end - range.start;
                    let nanos = u128::from(len) * 1_000_000_000 / u128::from(bps);
                    transfer = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
                }
            }
        }
        st.stats.modeled_delay += fixed + transfer;
        if cfg.virtual_time || (fixed.is_zero() && transfer.is_zero()) {
            return None;
        }
        // The transfer occupies the shared channel after the op's own latency; a later op's
        // transfer queues behind it.
        let now = Instant::now();
        let ready = now + fixed;
        let start = st.channel_free_at.map_or(ready, |free| free.max(ready));
        let done = start + transfer;
        if !transfer.is_zero() {
            st.channel_free_at = Some(done);
        }
        Some(done)
    }
}

impl<D: BlockDev> BlockDev for SlowDev<D> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let end = offset.saturating_add(buf.len() as u64);
        self.delayed(Some(offset..end), || self.inner.read_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let end = offset.saturating_add(buf.len() as u64);
        self.delayed(Some(offset..end), || self.inner.write_at(buf, offset))
    }

    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let end = offset.saturating_add(buf.len() as u64);
        self.delayed(Some(offset..end), || self.inner.write_at_fua(buf, offset))
    }

    fn sync(&self) -> DevResult<()> {
        self.delayed(None, || self.inner.sync())
    }

    /// Discard and zeroing cost the fixed latency (and a seek), but no transfer.
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.delayed(Some(offset..offset), || self.inner.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        self.delayed(Some(offset..offset), || self.inner.write_zeroes(offset, len, may_unmap))
    }

    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        self.inner.known_zero_ranges(offset, len)
    }

    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        self.inner.prefetch(offset, len)
    }

    /// The inner device's capabilities, minus those the model makes untrue or would skip: its
    /// writes are not cheap (each one waits); it models a disk (a seek, then a transfer), where
    /// writes in offset order beat parallel ones; and a bulk copy or early writeout would move
    /// data without paying the modelled latency.
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps { cheap_writes: false, parallel_writes: false, bulk: None, ..self.inner.capabilities() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDev;

    fn virtual_hdd() -> SlowDevConfig {
        SlowDevConfig { virtual_time: true, ..SlowDevConfig::hdd() }
    }

    #[test]
    fn sequential_access_does_not_seek() {
        let dev = SlowDev::new(MemDev::new(1 << 20), virtual_hdd());
        for i in 0..10u64 {
            dev.write_at(&[1; 4096], i * 4096).unwrap();
        }
        // The first access seeks (head position unknown), the rest stream.
        assert_eq!(dev.stats().seeks, 1);
        for i in 0..10u64 {
            dev.read_at(&mut [0; 4096], (9 - i) * 4096).unwrap();
        }
        assert_eq!(dev.stats().seeks, 11);
        assert_eq!(dev.stats().ops, 20);
    }

    #[test]
    fn modeled_delay_follows_the_config() {
        let cfg = SlowDevConfig {
            per_op_latency: Duration::from_millis(1),
            sync_latency: Duration::from_millis(3),
            seek_latency: Some((Duration::from_millis(5), Duration::from_millis(5))),
            bytes_per_sec: Some(1_000_000),
            virtual_time: true,
            ..SlowDevConfig::default()
        };
        let dev = SlowDev::new(MemDev::new(1 << 20), cfg);
        dev.write_at(&[0; 1000], 0).unwrap(); // 1 ms + 5 ms seek + 1 ms transfer
        dev.write_at(&[0; 2000], 1000).unwrap(); // 1 ms + 2 ms transfer
        dev.sync().unwrap(); // 1 ms + 3 ms
        assert_eq!(dev.stats().modeled_delay, Duration::from_millis(14));
    }

    #[test]
    fn seek_times_are_deterministic_and_in_range() {
        let run = |seed| {
            let dev = SlowDev::new(MemDev::new(1 << 20), SlowDevConfig { seed, ..virtual_hdd() });
            for i in 0..50u64 {
                dev.read_at(&mut [0; 512], (i * 7919 * 512) % (1 << 20)).unwrap();
            }
            dev.stats()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1).modeled_delay, run(2).modeled_delay);
        let s = run(3);
        let per_op_min = Duration::from_micros(100) + Duration::from_millis(5);
        let per_op_max = Duration::from_micros(100) + Duration::from_millis(8) + Duration::from_micros(4);
        assert!(s.modeled_delay >= per_op_min * 50 && s.modeled_delay <= per_op_max * 50);
    }
}
