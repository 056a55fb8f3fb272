//! A cache much smaller than the working set under sustained random writes in writeback mode:
//! it keeps serving (no deadlock, no client error) whether or not the writeback thread runs,
//! writes that find no space fall back to backing and show in the `bypass_full` statistic, GC
//! and reclaim keep the allocator consistent, and after a flush backing equals the model.

use crate::fixtures::{arc, format_open, tiny_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubcache::cache::writeback::{DrainStep, WritebackConfig, WritebackThread};
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::ctl::engine::control_target;
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::read_backing_superblock;

const BLOCK: u64 = 4096;
/// 512 KiB cache (about 20 data buckets of 16 KiB) under a 4 MiB working set.
const CACHE_BYTES: u64 = 512 * 1024;
const EXPORT_BYTES: u64 = 4 << 20;
const WRITERS: u64 = 4;
const WRITES_PER_WRITER: u64 = 300;

fn pattern(seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; BLOCK as usize];
    rng.fill(&mut v[..]);
    v
}

/// Runs the workload; returns the set, backing and the model of the export.
fn sustained_random_writes(with_thread: bool) -> (Arc<CacheSet>, Arc<dyn BlockDev>, Vec<u8>) {
    let cache = arc(MemDev::new(CACHE_BYTES));
    let backing = arc(MemDev::new(8192 + EXPORT_BYTES));
    let set = Arc::new(format_open(&cache, &backing, tiny_config(CacheMode::Writeback)));
    set.set_sequential_cutoff(0);
    let dev = Arc::new(set.devices().remove(0));
    let thread = with_thread.then(|| {
        WritebackThread::start(
            Arc::clone(&set),
            WritebackConfig {
                writeback_delay: Duration::ZERO,
                rate_update_interval: Duration::from_millis(5),
                idle_poll: Duration::from_millis(2),
                ..WritebackConfig::default()
            },
        )
    });
    // Random 4 KiB writers use the lower half; one more thread writes 768 KiB extents (larger
    // than the whole cache, so they can only go to backing) in the upper half.
    let blocks = EXPORT_BYTES / BLOCK / 2;
    let started = Instant::now();
    let large = {
        let dev = Arc::clone(&dev);
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(5);
            let mut image = vec![0u8; (EXPORT_BYTES / 2) as usize];
            for n in 0..6u64 {
                let len = 768 * 1024;
                let at = rng.gen_range(0..(EXPORT_BYTES / 2 - len) / BLOCK) * BLOCK;
                let mut data = vec![0u8; len as usize];
                StdRng::seed_from_u64(1000 + n).fill(&mut data[..]);
                dev.write_at(&data, EXPORT_BYTES / 2 + at).expect("a large client write failed");
                image[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
            image
        })
    };
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                // Disjoint blocks per writer (block % WRITERS == w): the model is exact.
                let mut rng = StdRng::seed_from_u64(w + 77);
                let mut last = vec![None; blocks as usize];
                for n in 0..WRITES_PER_WRITER {
                    let block = rng.gen_range(0..blocks / WRITERS) * WRITERS + w;
                    let seed = (w << 32) | n;
                    dev.write_at(&pattern(seed), block * BLOCK).expect("a client write failed");
                    last[block as usize] = Some(seed);
                    if n % 50 == 49 {
                        dev.sync().expect("a client FLUSH failed");
                    }
                }
                last
            })
        })
        .collect();
    let mut model = vec![0u8; EXPORT_BYTES as usize];
    model[(EXPORT_BYTES / 2) as usize..].copy_from_slice(&large.join().unwrap());
    for h in handles {
        for (block, seed) in h.join().unwrap().into_iter().enumerate() {
            if let Some(seed) = seed {
                let at = block * BLOCK as usize;
                model[at..at + BLOCK as usize].copy_from_slice(&pattern(seed));
            }
        }
    }
    // Not a speed check: a generous bound that a deadlock would blow.
    assert!(started.elapsed() < Duration::from_secs(120), "the workload took {:?}", started.elapsed());
    if let Some(t) = thread {
        let status = t.status();
        // The cache fills with dirty data: the thread must have gone full speed.
        assert!(status.urgent_batches > 0, "{status:?}");
        t.stop().unwrap();
    }
    let mut all = vec![0u8; model.len()];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == model, "reads through the full cache differ from the model");
    (set, backing, model)
}

fn finish(set: &Arc<CacheSet>, backing: &dyn BlockDev, model: &[u8]) {
    DrainStep::new(Arc::clone(set), WritebackConfig::default()).run_to_end().unwrap();
    assert_eq!(set.stats().dirty_bytes, 0);
    let sb = read_backing_superblock(backing).unwrap().unwrap();
    let mut raw = vec![0u8; model.len()];
    backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
    assert!(raw == model, "backing after the flush differs from the model");
    let report = set.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn full_cache_without_writeback_thread_falls_back_to_backing_and_counts_it() {
    let (set, backing, model) = sustained_random_writes(false);
    let stats = set.stats();
    assert!(stats.full_fallbacks > 0, "a cache 8x smaller than the working set must fill: {stats:?}");
    assert!(stats.buckets_reclaimed > 0, "{stats:?}");
    let dev = Arc::new(set.devices().remove(0));
    let target = control_target(Arc::clone(&set), vec![("d".to_owned(), dev)]);
    let s = target.stats();
    // `bypass_full` also counts reads whose miss fill found no space; the writes that fell
    // back to backing are among them.
    assert!(stats.bypass_full >= stats.full_fallbacks, "{stats:?}");
    assert_eq!(s.total.bypass_full, stats.bypass_full, "ctl reports the full-cache bypasses");
    assert_eq!(s.gauges.buckets_dirty > 0, s.gauges.dirty_bytes > 0, "{:?}", s.gauges);
    finish(&set, backing.as_ref(), &model);
}

#[test]
fn full_cache_with_writeback_thread_keeps_serving_and_drains() {
    let (set, backing, model) = sustained_random_writes(true);
    let stats = set.stats();
    assert!(stats.written_back_bytes > 0, "{stats:?}");
    assert!(stats.buckets_reclaimed > 0, "{stats:?}");
    finish(&set, backing.as_ref(), &model);
}
