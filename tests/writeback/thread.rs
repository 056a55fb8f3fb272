//! The background writeback thread (`ubcache::writeback`): it drains dirty data toward the
//! target and no further, waits `writeback_delay` on fresh dirty data unless a flush is
//! requested, flushes to zero with backing then equal to a reference model byte for byte, and
//! coalesces contiguous dirty extents into fewer backing writes.

use crate::fixtures::{arc, format_open, tiny_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubcache::cache::writeback::policy::CoalesceLimits;
use ubcache::cache::writeback::{WritebackConfig, WritebackThread};
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::{BackingState, read_backing_superblock};

const BLOCK: usize = 4096;

/// A writeback-mode set over MemDevs: 1 MiB cache (tiny buckets), 2 MiB backing.
fn setup() -> (Arc<CacheSet>, Arc<dyn BlockDev>) {
    let cache = arc(MemDev::new(1 << 20));
    let backing = arc(MemDev::new(2 << 20));
    let set = Arc::new(format_open(&cache, &backing, tiny_config(CacheMode::Writeback)));
    set.set_sequential_cutoff(0);
    (set, backing)
}

/// Random 4 KiB writes within the first `span` bytes; returns the model of the export.
fn random_writes(dev: &dyn BlockDev, model: &mut [u8], span: usize, count: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..count {
        let at = rng.gen_range(0..span / BLOCK) * BLOCK;
        let mut buf = vec![0u8; BLOCK];
        rng.fill(&mut buf[..]);
        dev.write_at(&buf, at as u64).unwrap();
        model[at..at + BLOCK].copy_from_slice(&buf);
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The backing device's data area (after its superblock) equals `model`.
fn assert_backing_equals(backing: &dyn BlockDev, model: &[u8]) {
    let sb = read_backing_superblock(backing).unwrap().unwrap();
    let mut raw = vec![0u8; model.len()];
    backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
    if let Some(i) = raw.iter().zip(model).position(|(a, b)| a != b) {
        panic!("backing differs from the model at export byte {i} (sector {})", i / 512);
    }
}

fn fast_config() -> WritebackConfig {
    WritebackConfig {
        writeback_delay: Duration::ZERO,
        rate_update_interval: Duration::from_millis(10),
        idle_poll: Duration::from_millis(5),
        ..WritebackConfig::default()
    }
}

#[test]
fn thread_brings_dirty_down_to_the_target() {
    let (set, _backing) = setup();
    let dev = set.devices().remove(0);
    let mut model = vec![0u8; dev.len() as usize];
    random_writes(&dev, &mut model, 512 * 1024, 300, 1);
    let capacity = set.data_capacity_bytes();
    let target = capacity / 10;
    let dirty0 = set.stats().dirty_bytes;
    assert!(dirty0 > 2 * target, "the burst must leave well above the target dirty ({dirty0} vs {target})");
    // A strong controller above the target.
    let cfg = WritebackConfig {
        p_term_inverse: 1,
        i_term_inverse: 1,
        min_rate: 512,
        urgent_percent: 100,
        ..fast_config()
    };
    let thread = WritebackThread::start(Arc::clone(&set), cfg);
    wait_until("dirty at or below the target", Duration::from_secs(60), || set.stats().dirty_bytes <= target);
    let status = thread.status();
    assert!(status.bytes_written >= dirty0 - target, "{status:?}");
    assert_eq!(status.urgent_batches, 0, "never urgent: no flush asked, cache not full");
    thread.stop().unwrap();
    // Data is intact through the cache.
    let mut got = vec![0u8; model.len()];
    dev.read_at(&mut got, 0).unwrap();
    assert!(got == model, "data read back through the cache differs from the model");
}

#[test]
fn below_the_target_writeback_trickles_at_the_minimum_rate() {
    let (set, _backing) = setup();
    let dev = set.devices().remove(0);
    // 8 dirty blocks (32 KiB), far below the 10% target.
    for i in 0..8u64 {
        dev.write_at(&[i as u8 + 1; BLOCK], i * 2 * BLOCK as u64).unwrap();
    }
    assert!(set.stats().dirty_bytes < set.data_capacity_bytes() / 10);
    let cfg = WritebackConfig { min_rate: 512, ..fast_config() };
    let thread = WritebackThread::start(Arc::clone(&set), cfg);
    wait_until("the first trickle batch", Duration::from_secs(30), || thread.status().bytes_written > 0);
    std::thread::sleep(Duration::from_millis(300));
    // At 512 B/s one 4 KiB key is followed by a pause of 2.5 s (the cap): nothing more yet.
    let status = thread.status();
    assert_eq!(status.bytes_written, BLOCK as u64, "{status:?}");
    assert_eq!(set.stats().dirty_bytes, 7 * BLOCK as u64);
    assert_eq!(status.rate, 512);
    thread.stop().unwrap();
}

#[test]
fn delay_holds_fresh_dirty_data_until_a_flush_is_requested_then_backing_matches_the_model() {
    let (set, backing) = setup();
    let dev = set.devices().remove(0);
    let mut model = vec![0u8; dev.len() as usize];
    let cfg = WritebackConfig { writeback_delay: Duration::from_secs(3600), ..fast_config() };
    let thread = WritebackThread::start(Arc::clone(&set), cfg);
    random_writes(&dev, &mut model, 768 * 1024, 60, 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(thread.status().bytes_written, 0, "fresh dirty data waits for writeback_delay");
    assert!(set.stats().dirty_bytes > 0);
    thread.request_drain();
    wait_until("a clean cache after the flush request", Duration::from_secs(60), || {
        set.stats().dirty_bytes == 0
    });
    // The thread marks the backing device Clean once nothing is dirty.
    wait_until("backing superblock Clean", Duration::from_secs(10), || {
        read_backing_superblock(backing.as_ref()).unwrap().unwrap().state == BackingState::Clean
    });
    let status = thread.status();
    assert!(status.urgent_batches > 0, "{status:?}");
    thread.stop().unwrap();
    assert_backing_equals(backing.as_ref(), &model);
    assert!(set.check().unwrap().problems.is_empty());
}

#[test]
fn contiguous_dirty_extents_are_coalesced_into_fewer_backing_writes() {
    let (set, backing) = setup();
    let dev = set.devices().remove(0);
    let mut model = vec![0u8; dev.len() as usize];
    // Written backwards, so the cache holds them out of order and the btree cannot merge the
    // keys: 32 keys contiguous on backing.
    for i in (0..32u64).rev() {
        let buf = vec![i as u8 + 1; BLOCK];
        dev.write_at(&buf, i * BLOCK as u64).unwrap();
        model[(i as usize) * BLOCK..(i as usize + 1) * BLOCK].copy_from_slice(&buf);
    }
    let scan = set.scan_dirty(ubcache_btree::Pos::MIN, 1000).unwrap();
    assert!(scan.keys.len() >= 16, "expected separate keys, got {}", scan.keys.len());
    let limits = CoalesceLimits { max_io_len: 64 * 1024 / 512, max_extents: 64 };
    let report = set.write_back_keys(&scan.keys, limits).unwrap();
    assert_eq!(report.keys_written, scan.keys.len());
    assert_eq!(report.bytes_written, 32 * BLOCK as u64);
    assert_eq!(report.backing_writes, 2, "128 KiB of contiguous keys in 64 KiB writes: {report:?}");
    assert_eq!(set.stats().dirty_bytes, 0);
    set.finish_drain().unwrap();
    assert_backing_equals(backing.as_ref(), &model);
}

#[test]
fn stale_keys_from_an_old_scan_are_skipped_not_written_over_newer_data() {
    // A key buffer filled before a writethrough write replaced the key on backing must not write
    // the old copy home (it would overwrite the newer data while a clean key claims it).
    let (set, backing) = setup();
    let dev = set.devices().remove(0);
    let mut model = vec![0u8; dev.len() as usize];
    dev.write_at(&[1u8; BLOCK], 0).unwrap();
    let old = set.scan_dirty(ubcache_btree::Pos::MIN, 10).unwrap().keys;
    assert_eq!(old.len(), 1);
    dev.set_mode(CacheMode::Writethrough, false).unwrap();
    dev.write_at(&[2u8; BLOCK], 0).unwrap();
    model[..BLOCK].copy_from_slice(&[2u8; BLOCK]);
    let report = set.write_back_keys(&old, CoalesceLimits { max_io_len: 2048, max_extents: 64 }).unwrap();
    assert_eq!(report.keys_written, 0);
    assert_eq!(report.keys_skipped, 1);
    assert_backing_equals(backing.as_ref(), &model);
    let mut got = vec![0u8; BLOCK];
    dev.read_at(&mut got, 0).unwrap();
    assert_eq!(got, vec![2u8; BLOCK]);
}

#[test]
fn stop_joins_promptly_even_with_a_long_pause_pending() {
    let (set, _backing) = setup();
    let dev = set.devices().remove(0);
    let mut model = vec![0u8; dev.len() as usize];
    random_writes(&dev, &mut model, 256 * 1024, 50, 3);
    let cfg = WritebackConfig { min_rate: 512, max_rate: 512, ..fast_config() };
    let thread = WritebackThread::start(Arc::clone(&set), cfg);
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    thread.stop().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "stop must interrupt rate pauses");
}
