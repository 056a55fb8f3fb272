//! Power loss during a flush (the coalescing writeback of `ubcache::cache::writeback::DrainStep`) or a
//! detach loses nothing: every write acknowledged by a FLUSH before the flush started reads
//! back exactly after recovery, and after a flush of the recovered set backing equals the
//! model byte for byte. The cut is swept over every write and sync of either device during the
//! operation (SimDev), and the unsynced writes at the cut are dropped, kept, kept at random or
//! torn.
//!
//! A deliberately broken writeback (keys marked clean before backing is synced) must be caught
//! by the same harness, or it proves nothing: see
//! `marking_clean_before_backing_is_durable_is_caught`.

use crate::fixtures::{TINY, tiny_config};
use crate::power_cut::{Cut, crash_modes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use ubcache::cache::writeback::policy::CoalesceLimits;
use ubcache::cache::writeback::{DirtyKeyBuf, DrainStep, WritebackConfig};
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::dev::{BlockDev, CrashMode, SimDev};
use ubcache::format::{BackingState, read_backing_superblock};

const SECTOR: usize = 512;
const EXPORT_BYTES: usize = 256 * 1024;
const CACHE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Flush,
    Detach,
}

fn dynd(d: &Arc<SimDev>) -> Arc<dyn BlockDev> {
    Arc::clone(d) as Arc<dyn BlockDev>
}

/// Formats, writes a random workload in writeback mode and FLUSHes it: the model is durable.
fn prepared(seed: u64) -> (Arc<SimDev>, Arc<SimDev>, Vec<u8>) {
    let cache = Arc::new(SimDev::new(CACHE_BYTES));
    let backing = Arc::new(SimDev::new(8192 + EXPORT_BYTES as u64));
    ubcache::cache::format(&dynd(&cache), &[dynd(&backing)], TINY).unwrap();
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
    set.set_sequential_cutoff(0);
    let dev = set.device(0).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; EXPORT_BYTES];
    for _ in 0..60 {
        let sectors = rng.gen_range(1..=16usize);
        let sector = rng.gen_range(0..EXPORT_BYTES / SECTOR - sectors);
        let mut data = vec![0u8; sectors * SECTOR];
        rng.fill(&mut data[..]);
        dev.write_at(&data, (sector * SECTOR) as u64).unwrap();
        model[sector * SECTOR..sector * SECTOR + data.len()].copy_from_slice(&data);
    }
    dev.sync().unwrap();
    assert!(set.stats().dirty_bytes > 0);
    drop(dev);
    drop(set);
    // Reopen on fresh SimDevs holding the durable images, so write counters start at 0 and
    // the crash sweep counts only the operation's own I/O.
    let cache = Arc::new(SimDev::from_image(cache.durable_image()));
    let backing = Arc::new(SimDev::from_image(backing.durable_image()));
    (cache, backing, model)
}

/// Runs the operation with the cut armed; returns whether it completed.
fn run_operation(cache: &Arc<SimDev>, backing: &Arc<SimDev>, op: Operation, cut: Cut) -> bool {
    let set =
        Arc::new(CacheSet::open(dynd(cache), &[dynd(backing)], tiny_config(CacheMode::Writeback)).unwrap());
    cut.arm(cache, backing);
    let done = match op {
        Operation::Flush => {
            let cfg = WritebackConfig { batch_keys: 4, max_io_bytes: 8192, ..WritebackConfig::default() };
            DrainStep::new(Arc::clone(&set), cfg).run_to_end().is_ok()
        }
        Operation::Detach => set.detach(0).is_ok(),
    };
    // Power fails for both devices at the same moment.
    cache.crash_now();
    backing.crash_now();
    done
}

/// What a crash state turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Verified,
}

/// Recovers from the crash images and checks that nothing acknowledged was lost.
fn verify(cache_image: Vec<u8>, backing_image: Vec<u8>, model: &[u8], label: &str) -> Outcome {
    let backing = Arc::new(SimDev::from_image(backing_image));
    let sb = match read_backing_superblock(backing.as_ref()) {
        Ok(Some(sb)) => sb,
        Ok(None) => panic!("{label}: backing superblock lost"),
        // Two single-sector copies written in turn: a crash (even a torn write) leaves one
        // readable.
        Err(e) => panic!("{label}: backing superblock unreadable after the crash: {e}"),
    };
    if sb.state == BackingState::Detached {
        // Detach wrote everything home before saying Detached: backing alone is the data.
        let mut raw = vec![0u8; model.len()];
        backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
        assert!(raw == model, "{label}: a Detached backing device lacks data");
        return Outcome::Verified;
    }
    let cache = Arc::new(SimDev::from_image(cache_image));
    let set = Arc::new(
        CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback))
            .unwrap_or_else(|e| panic!("{label}: recovery failed: {e}")),
    );
    let dev = set.device(0).unwrap();
    let mut all = vec![0u8; model.len()];
    dev.read_at(&mut all, 0).unwrap();
    if let Some(i) = all.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{label}: after recovery sector {} differs from the acknowledged data", i / SECTOR);
    }
    DrainStep::new(Arc::clone(&set), WritebackConfig::default()).run_to_end().unwrap();
    let mut raw = vec![0u8; model.len()];
    backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
    if let Some(i) = raw.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{label}: after recovery and flush backing sector {} differs", i / SECTOR);
    }
    let report = set.check().unwrap();
    assert!(report.problems.is_empty(), "{label}: {:?}", report.problems);
    Outcome::Verified
}

/// Every cut point of the operation (writes and syncs of both devices), with a stride so the
/// sweep stays fast.
fn cuts(op: Operation, seed: u64) -> Vec<Cut> {
    let (cache, backing, _) = prepared(seed);
    assert!(run_operation(&cache, &backing, op, Cut::Never));
    let cs = cache.stats();
    let bs = backing.stats();
    let out = Cut::points((cs.writes, cs.syncs), (bs.writes, bs.syncs), |n| n / 12);
    assert!(bs.writes > 0 && bs.syncs > 0, "the operation must write backing");
    out
}

/// Returns the number of crash states verified.
fn campaign(op: Operation, seeds: std::ops::Range<u64>) -> usize {
    let mut checked = 0;
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        for cut in cuts(op, seed) {
            let (cache, backing, model) = prepared(seed);
            let completed = run_operation(&cache, &backing, op, cut);
            for mode in crash_modes(&mut rng) {
                let label = format!("{op:?} seed {seed} cut {cut:?} (completed: {completed}) crash {mode:?}");
                assert_eq!(
                    verify(cache.crash_image(&mode), backing.crash_image(&mode), &model, &label),
                    Outcome::Verified
                );
                checked += 1;
            }
        }
    }
    checked
}

#[test]
fn power_loss_during_a_flush_loses_nothing() {
    let checked = campaign(Operation::Flush, 0..3);
    eprintln!("flush: {checked} crash states verified");
    assert!(checked > 100, "only {checked} crash states checked");
}

#[test]
fn power_loss_during_a_detach_loses_nothing() {
    let checked = campaign(Operation::Detach, 10..12);
    eprintln!("detach: {checked} crash states verified");
    assert!(checked > 60, "only {checked} crash states checked");
}

/// The harness must catch a writeback that journals keys clean before backing is durable:
/// here a "flush" that writes backing without syncing it, then marks the keys clean and
/// commits (by writing each key back through a set whose backing sync lies).
#[test]
fn marking_clean_before_backing_is_durable_is_caught() {
    let (cache, backing, model) = prepared(42);
    let set =
        Arc::new(CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap());
    backing.set_lying_sync(true);
    let mut keybuf = DirtyKeyBuf::new(100);
    loop {
        let keys = keybuf.take(&set, 100, u64::MAX).unwrap();
        if keys.is_empty() {
            break;
        }
        set.write_back_keys(&keys, CoalesceLimits { max_io_len: 64, max_extents: 16 }).unwrap();
    }
    set.finish_drain().unwrap();
    cache.crash_now();
    backing.crash_now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        verify(
            cache.crash_image(&CrashMode::KeepAll),
            backing.crash_image(&CrashMode::DropAll),
            &model,
            "broken",
        );
    }));
    assert!(result.is_err(), "a writeback whose backing sync does nothing must be caught");
}
