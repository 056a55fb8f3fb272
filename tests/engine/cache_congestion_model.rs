//! Random workloads against a reference model while the cache device flips between fast and
//! slow (so requests keep switching between cached and congestion-bypassed), with mode switches
//! in every direction mixed in: every read matches the model, after a flush backing equals the
//! model, the online check is clean, and a reopened set serves the model.

use crate::fixtures::{TINY, tiny_config};
use crate::laggy_dev::LaggyDev;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use ubcache::cache::{CacheConfig, CacheMode, CacheSet};
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::read_backing_superblock;

const SECTOR: usize = 512;
const EXPORT_BYTES: usize = 256 * 1024;
/// 5 ms when slow against a 200 µs threshold: one slow sample makes the cache congested.
const SLOW_US: u64 = 5_000;
const THRESHOLD_US: u64 = 200;

fn config(mode: CacheMode) -> CacheConfig {
    CacheConfig {
        congested_read_threshold_us: THRESHOLD_US,
        congested_write_threshold_us: THRESHOLD_US,
        sequential_cutoff: 64 * 1024,
        ..tiny_config(mode)
    }
}

fn run(seed: u64, initial: CacheMode) -> u64 {
    let delay_us = Arc::new(AtomicU64::new(0));
    let cache_dev = Arc::new(LaggyDev { inner: MemDev::new(1 << 20), delay_us: Arc::clone(&delay_us) });
    let cache: Arc<dyn BlockDev> = cache_dev;
    let backing: Arc<dyn BlockDev> = Arc::new(MemDev::new(8192 + EXPORT_BYTES as u64));
    ubcache::cache::format(&cache, std::slice::from_ref(&backing), TINY).unwrap();
    let set = CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), config(initial)).unwrap();
    let dev = set.device(0).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; EXPORT_BYTES];
    let label = |i: usize, mode: CacheMode| format!("seed {seed} op {i} mode {mode}");
    for i in 0..250 {
        match rng.gen_range(0..100) {
            0..=49 => {
                let sectors = rng.gen_range(1..=24usize);
                let sector = rng.gen_range(0..EXPORT_BYTES / SECTOR - sectors);
                let mut data = vec![0u8; sectors * SECTOR];
                rng.fill(&mut data[..]);
                dev.write_at(&data, (sector * SECTOR) as u64).unwrap();
                model[sector * SECTOR..sector * SECTOR + data.len()].copy_from_slice(&data);
            }
            50..=84 => {
                let sectors = rng.gen_range(1..=32usize);
                let sector = rng.gen_range(0..EXPORT_BYTES / SECTOR - sectors);
                let mut buf = vec![0u8; sectors * SECTOR];
                dev.read_at(&mut buf, (sector * SECTOR) as u64).unwrap();
                let want = &model[sector * SECTOR..sector * SECTOR + buf.len()];
                assert!(buf == want, "{}: read differs from the model", label(i, dev.mode()));
            }
            85..=94 => {
                let slow = delay_us.load(Ordering::Relaxed) == 0;
                delay_us.store(if slow { SLOW_US } else { 0 }, Ordering::Relaxed);
            }
            95..=97 => {
                let mode = CacheMode::ALL[rng.gen_range(0..CacheMode::ALL.len())];
                dev.set_mode(mode, rng.gen_bool(0.5)).unwrap();
            }
            _ => dev.sync().unwrap(),
        }
    }
    delay_us.store(0, Ordering::Relaxed);
    let mut all = vec![0u8; EXPORT_BYTES];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == model, "seed {seed}: final read differs from the model");
    let report = set.check().unwrap();
    assert!(report.problems.is_empty(), "seed {seed}: {:?}", report.problems);
    let congestion = set.stats().bypass_congestion;
    set.write_back_all().unwrap();
    let sb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    let mut raw = vec![0u8; EXPORT_BYTES];
    backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
    assert!(raw == model, "seed {seed}: backing after the flush differs from the model");
    drop(dev);
    set.close().unwrap();
    let set = CacheSet::open(cache, &[backing], config(CacheMode::Writeback)).unwrap();
    set.device(0).unwrap().read_at(&mut all, 0).unwrap();
    assert!(all == model, "seed {seed}: reopened set differs from the model");
    congestion
}

#[test]
fn congestion_flips_and_mode_switches_keep_data_equal_to_the_model() {
    let mut congested = 0;
    for (seed, mode) in CacheMode::ALL.into_iter().enumerate() {
        congested += run(seed as u64 + 100, mode);
    }
    assert!(congested > 20, "the workloads must actually bypass for congestion ({congested})");
}
