//! Cache bypass by reason: congestion (the cache device's latency over its threshold), the
//! sequential cutoff, a full cache and the mode each send requests past the cache, each moves its
//! own counter and only it (engine counters, the control target's totals and windows, and the
//! Prometheus `reason` label), and data stays equal to a reference model throughout, including
//! overwrites of dirty data in writeback mode while the cache is congested.
//!
//! The cache device here is a [`LaggyDev`]: a memory device whose reads and writes sleep for a
//! latency the test sets, so the engine measures a high latency deterministically (a sleep is
//! never shorter than asked).

use crate::fixtures::{arc, format_open, tiny_config};
use crate::laggy_dev::LaggyDev;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, CachedDev, StatsSnapshot};
use ubcache::ctl::engine::control_target;
use ubcache::ctl::metrics::render_prometheus;
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::read_backing_superblock;

const BLOCK: usize = 4096;
/// Latency of the slow cache: 20x the threshold, so one sample (weight 1/8) lifts the average
/// to 2.5x the threshold, where every request bypasses. A scheduling hiccup would need 32 ms
/// to make a fast cache look congested.
const SLOW: Duration = Duration::from_millis(80);
const THRESHOLD_US: u64 = 4_000;

struct Fixture {
    set: Arc<CacheSet>,
    dev: CachedDev,
    backing: Arc<dyn BlockDev>,
    cache: Arc<dyn BlockDev>,
    delay_us: Arc<AtomicU64>,
}

fn fixture(mode: CacheMode, cache_bytes: u64) -> Fixture {
    let delay_us = Arc::new(AtomicU64::new(0));
    let cache = arc(LaggyDev { inner: MemDev::new(cache_bytes), delay_us: Arc::clone(&delay_us) });
    let backing = arc(MemDev::new(8192 + (4 << 20)));
    let cfg = CacheConfig {
        congested_read_threshold_us: THRESHOLD_US,
        congested_write_threshold_us: THRESHOLD_US,
        ..tiny_config(mode)
    };
    let set = Arc::new(format_open(&cache, &backing, cfg));
    set.set_sequential_cutoff(0);
    let dev = set.device(0).unwrap();
    Fixture { set, dev, backing, cache, delay_us }
}

impl Fixture {
    fn slow(&self, on: bool) {
        let us = if on { u64::try_from(SLOW.as_micros()).unwrap() } else { 0 };
        self.delay_us.store(us, Ordering::Relaxed);
    }

    fn write(&self, model: &mut [u8], block: usize, fill: u8) {
        let buf = vec![fill; BLOCK];
        self.dev.write_at(&buf, (block * BLOCK) as u64).unwrap();
        model[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&buf);
    }

    fn read(&self, block: usize) -> Vec<u8> {
        let mut buf = vec![0u8; BLOCK];
        self.dev.read_at(&mut buf, (block * BLOCK) as u64).unwrap();
        buf
    }

    fn assert_reads_model(&self, model: &[u8]) {
        let mut buf = vec![0u8; model.len()];
        self.dev.read_at(&mut buf, 0).unwrap();
        assert!(buf == model, "export differs from the model");
    }

    fn backing_image(&self, len: usize) -> Vec<u8> {
        let sb = read_backing_superblock(self.backing.as_ref()).unwrap().unwrap();
        let mut raw = vec![0u8; len];
        self.backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
        raw
    }
}

/// The four per-reason counters as (mode, sequential, congestion, full).
fn reasons(s: &StatsSnapshot) -> (u64, u64, u64, u64) {
    (s.bypass_mode, s.bypass_sequential, s.bypass_congestion, s.bypass_full)
}

#[test]
fn a_congested_cache_is_bypassed_until_its_latency_decays() {
    let f = fixture(CacheMode::Writethrough, 1 << 20);
    let mut model = vec![0u8; 64 * BLOCK];
    f.write(&mut model, 0, 1);
    assert!(f.set.congestion().write_latency_us < THRESHOLD_US, "{:?}", f.set.congestion());

    // One slow cache write: its latency (80 ms, weight 1/8) lifts the average to 10 ms, far
    // enough over 4 ms that every request bypasses (cutoff under 4 KiB).
    f.slow(true);
    f.write(&mut model, 1, 2);
    assert!(f.set.congestion().write_latency_us > 2 * THRESHOLD_US, "{:?}", f.set.congestion());
    let before = f.set.stats();
    assert_eq!(before.write_cached, 2);
    for block in 2..6 {
        f.write(&mut model, block, block as u8 + 10);
    }
    let s = f.set.stats();
    assert_eq!(s.write_cached, 2, "congested writes must not go to the cache");
    assert_eq!(reasons(&s), (0, 0, 4, 0), "{s:?}");
    assert_eq!(f.backing_image(6 * BLOCK), model[..6 * BLOCK], "bypassed writes are on backing");

    // A read hit on the slow cache makes reads congested; a miss is then not filled, twice.
    assert_eq!(f.read(0), model[..BLOCK]);
    assert!(f.set.congestion().read_latency_us > 2 * THRESHOLD_US);
    assert_eq!(f.read(20), model[20 * BLOCK..21 * BLOCK]);
    assert_eq!(f.read(20), model[20 * BLOCK..21 * BLOCK]);
    let s = f.set.stats();
    assert_eq!(reasons(&s), (0, 0, 6, 0), "two congested read misses: {s:?}");
    assert_eq!(s.read_misses, 16, "block 20 missed twice (not filled)");
    // A hit is still served from the (slow) cache: congestion never bypasses cached data.
    assert_eq!(s.read_hits, 8);

    // The device is fast again; with no new samples (everything bypasses) the averages decay
    // by half every second, so after 2.5 s (10 ms -> 2.5 ms, under 4 ms) the cache is
    // used again. Slower machines only decay more.
    f.slow(false);
    std::thread::sleep(Duration::from_millis(2_500));
    assert!(f.set.congestion().write_latency_us < THRESHOLD_US, "{:?}", f.set.congestion());
    f.write(&mut model, 7, 7);
    assert_eq!(f.read(21), model[21 * BLOCK..22 * BLOCK]);
    assert_eq!(f.read(21), model[21 * BLOCK..22 * BLOCK]);
    let s = f.set.stats();
    assert_eq!(s.write_cached, 3, "{s:?}");
    assert_eq!(s.read_hits, 16, "block 21 was filled and then hit");
    assert_eq!(reasons(&s), (0, 0, 6, 0), "no new bypass: {s:?}");
    f.assert_reads_model(&model);
}

#[test]
fn zero_threshold_disables_the_congestion_bypass_at_runtime() {
    let f = fixture(CacheMode::Writethrough, 1 << 20);
    let mut model = vec![0u8; 16 * BLOCK];
    f.slow(true);
    f.write(&mut model, 0, 1);
    f.write(&mut model, 1, 2);
    assert_eq!(reasons(&f.set.stats()), (0, 0, 1, 0));
    f.set.set_congestion_thresholds(Some(0), Some(0));
    f.write(&mut model, 2, 3);
    assert_eq!(f.read(0), model[..BLOCK]);
    assert_eq!(f.read(9), model[9 * BLOCK..10 * BLOCK]);
    let s = f.set.stats();
    assert_eq!(reasons(&s), (0, 0, 1, 0), "threshold 0: never congested: {s:?}");
    assert_eq!(s.write_cached, 2);
    f.assert_reads_model(&model);
}

/// In writeback mode a congested write over dirty data must still replace it in the cache
/// (sending it to backing could race the writeback of the older dirty copy), and a read of
/// dirty data must come from the cache; writes over clean or uncached data bypass. Checked
/// against a model through reads, a flush to backing, and a reopen.
#[test]
fn congested_writeback_keeps_dirty_overwrites_in_the_cache_and_data_matches_the_model() {
    let f = fixture(CacheMode::Writeback, 1 << 20);
    let mut model = vec![0u8; 64 * BLOCK];
    for block in 0..16 {
        f.write(&mut model, block, block as u8 + 1);
    }
    assert_eq!(f.set.stats().dirty_bytes, 16 * BLOCK as u64);
    f.slow(true);
    f.write(&mut model, 40, 0x40); // measured slow; cached dirty
    assert!(f.set.congestion().write_latency_us > 2 * THRESHOLD_US);
    let cached_before = f.set.stats().write_cached;
    // Overwrites of dirty blocks: into the cache, not bypassed.
    for block in 0..8 {
        f.write(&mut model, block, 0xa0 + block as u8);
    }
    // A write straddling dirty block 15 and clean block 16: stays in the cache too.
    let straddle = vec![0x5a; 2 * BLOCK];
    f.dev.write_at(&straddle, (15 * BLOCK) as u64).unwrap();
    model[15 * BLOCK..17 * BLOCK].copy_from_slice(&straddle);
    let s = f.set.stats();
    assert_eq!(s.write_cached, cached_before + 9, "{s:?}");
    assert_eq!(reasons(&s), (0, 0, 0, 0), "{s:?}");
    // Writes over data that is not dirty bypass to backing.
    for block in 20..26 {
        f.write(&mut model, block, 0xc0 + block as u8);
    }
    let s = f.set.stats();
    assert_eq!(reasons(&s), (0, 0, 6, 0), "{s:?}");
    assert_eq!(f.backing_image(26 * BLOCK)[20 * BLOCK..], model[20 * BLOCK..26 * BLOCK]);
    // Reads of dirty data come from the cache even though it is congested.
    let hits = s.read_hits;
    assert_eq!(f.read(3), model[3 * BLOCK..4 * BLOCK]);
    assert_eq!(f.set.stats().read_hits, hits + 8);
    f.assert_reads_model(&model);

    f.slow(false);
    f.set.write_back_all().unwrap();
    assert_eq!(f.set.stats().dirty_bytes, 0);
    assert!(f.backing_image(model.len()) == model, "backing differs from the model after the flush");
    let cache = Arc::clone(&f.cache);
    let backing = Arc::clone(&f.backing);
    drop(f.dev);
    Arc::try_unwrap(f.set).unwrap().close().unwrap();
    let set = CacheSet::open(cache, &[backing], tiny_config(CacheMode::Writeback)).unwrap();
    let mut buf = vec![0u8; model.len()];
    set.device(0).unwrap().read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "reopened export differs from the model");
}

/// Each cause moves its own counter, in the engine, in the control target's totals and
/// 5-minute window, and in the Prometheus `reason` label.
#[test]
fn each_bypass_reason_moves_only_its_own_counter() {
    // 512 KiB cache: a 768 KiB write cannot fit even after reclaiming every clean bucket.
    let f = fixture(CacheMode::Writethrough, 512 * 1024);
    let target =
        control_target(Arc::clone(&f.set), vec![("disk0".to_owned(), Arc::new(f.set.device(0).unwrap()))]);
    let mut model = vec![0u8; 4 << 20];
    fn put(dev: &CachedDev, model: &mut [u8], at: usize, data: &[u8]) {
        dev.write_at(data, at as u64).unwrap();
        model[at..at + data.len()].copy_from_slice(data);
    }

    // Full: nothing dirty to write back, and the write is bigger than the cache.
    put(&f.dev, &mut model, 1 << 20, &vec![0xf1; 768 * 1024]);
    assert_eq!(reasons(&f.set.stats()), (0, 0, 0, 1));
    assert_eq!(f.set.stats().full_fallbacks, 1);

    // Sequential: cutoff 96 KiB, 32 KiB writes: the 3rd reaches it (3 x 32 = 96), so 3rd-6th.
    f.set.set_sequential_cutoff(96 * 1024);
    for i in 0..6 {
        put(&f.dev, &mut model, (3 << 20) + i * 32768, &vec![i as u8 + 1; 32768]);
    }
    assert_eq!(reasons(&f.set.stats()), (0, 4, 0, 1));
    // A sequential read stream past the cutoff does not fill: the 3rd and 4th reads.
    let mut buf = vec![0u8; 32768];
    for i in 0..4 {
        f.dev.read_at(&mut buf, (2 << 20) + i * 32768).unwrap();
    }
    assert_eq!(reasons(&f.set.stats()), (0, 6, 0, 1));
    f.set.set_sequential_cutoff(0);

    // Mode: writearound writes, mode-none read misses.
    f.dev.set_mode(CacheMode::Writearound, false).unwrap();
    put(&f.dev, &mut model, 0, &[7u8; BLOCK]);
    assert_eq!(reasons(&f.set.stats()), (1, 6, 0, 1));
    f.dev.set_mode(CacheMode::None, false).unwrap();
    f.dev.read_at(&mut buf[..BLOCK], 500 * BLOCK as u64).unwrap();
    assert_eq!(reasons(&f.set.stats()), (2, 6, 0, 1));

    // Congestion.
    f.dev.set_mode(CacheMode::Writethrough, false).unwrap();
    f.slow(true);
    put(&f.dev, &mut model, 8 * BLOCK, &[8u8; BLOCK]); // cached, measured slow
    put(&f.dev, &mut model, 9 * BLOCK, &[9u8; BLOCK]); // bypassed
    f.slow(false);
    assert_eq!(reasons(&f.set.stats()), (2, 6, 1, 1));

    let s = target.stats();
    for values in [&s.total, &s.five_minute, &s.hour, &s.day] {
        assert_eq!(
            (values.bypass_mode, values.bypass_sequential, values.bypass_congestion, values.bypass_full),
            (2, 6, 1, 1)
        );
    }
    let text = render_prometheus(&s);
    for line in [
        "ubcache_bypassed_total{reason=\"mode\"} 2",
        "ubcache_bypassed_total{reason=\"sequential\"} 6",
        "ubcache_bypassed_total{reason=\"congestion\"} 1",
        "ubcache_bypassed_total{reason=\"full\"} 1",
        "ubcache_bypass_congestion_total 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    let mut all = vec![0u8; model.len()];
    f.dev.read_at(&mut all, 0).unwrap();
    assert!(all == model, "export differs from the model");
}
