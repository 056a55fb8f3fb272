//! Behaviour of each cache mode, the sequential cutoff, mode switches, FUA/FLUSH durability on a
//! crash-simulating device, generation wrap under heavy reclaim, concurrency and I/O errors.

use crate::fixtures::{arc, format_open, tiny_config};
use std::sync::Arc;
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::dev::{BlockDev, CrashMode, FaultDev, FaultOp, FaultRule, MemDev, SimDev};
use ubcache::format::{BackingState, read_backing_superblock};

const EXPORT: u64 = 512 * 1024;

fn setup(mode: CacheMode) -> (Arc<dyn BlockDev>, Arc<dyn BlockDev>, CacheSet) {
    let cache = arc(MemDev::new(1 << 20));
    let backing = arc(MemDev::new(EXPORT + 8192));
    let set = format_open(&cache, &backing, tiny_config(mode));
    (cache, backing, set)
}

fn backing_bytes(backing: &Arc<dyn BlockDev>, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    backing.read_at(&mut b, 8192 + off).unwrap();
    b
}

#[test]
fn writeback_keeps_data_in_the_cache_until_written_back() {
    let (_, backing, set) = setup(CacheMode::Writeback);
    let dev = set.device(0).unwrap();
    dev.write_at(&[7u8; 4096], 8192).unwrap();
    assert_eq!(backing_bytes(&backing, 8192, 4096), vec![0u8; 4096], "writeback must not touch backing");
    assert_eq!(set.stats().dirty_bytes, 4096);
    let bsb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    assert_eq!(bsb.state, BackingState::Dirty, "backing must say Dirty before a dirty write is acknowledged");
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
    set.write_back_all().unwrap();
    assert_eq!(backing_bytes(&backing, 8192, 4096), vec![7u8; 4096]);
    assert_eq!(set.stats().dirty_bytes, 0);
    let bsb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    assert_eq!(bsb.state, BackingState::Clean);
}

#[test]
fn writethrough_writes_both_and_reads_hit_the_cache() {
    let (_, backing, set) = setup(CacheMode::Writethrough);
    let dev = set.device(0).unwrap();
    dev.write_at(&[3u8; 2048], 0).unwrap();
    assert_eq!(backing_bytes(&backing, 0, 2048), vec![3u8; 2048]);
    let before = set.stats();
    let mut buf = vec![0u8; 2048];
    dev.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![3u8; 2048]);
    let after = set.stats();
    assert_eq!(after.read_hits - before.read_hits, 4);
    assert_eq!(after.read_misses, before.read_misses);
    assert_eq!(after.dirty_bytes, 0);
}

#[test]
fn writearound_bypasses_on_write_and_fills_on_read() {
    let (_, backing, set) = setup(CacheMode::Writearound);
    let dev = set.device(0).unwrap();
    dev.write_at(&[5u8; 1024], 4096).unwrap();
    assert_eq!(backing_bytes(&backing, 4096, 1024), vec![5u8; 1024]);
    assert_eq!(set.stats().write_bypassed, 1);
    let mut buf = vec![0u8; 1024];
    dev.read_at(&mut buf, 4096).unwrap();
    assert_eq!(set.stats().read_misses, 2);
    dev.read_at(&mut buf, 4096).unwrap();
    assert_eq!(set.stats().read_hits, 2, "the first read filled the cache");
    // A new write invalidates the cached copy.
    dev.write_at(&[6u8; 1024], 4096).unwrap();
    dev.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, vec![6u8; 1024]);
}

#[test]
fn mode_none_never_fills_but_serves_dirty_data_left_by_writeback() {
    let (_, backing, set) = setup(CacheMode::Writeback);
    let dev = set.device(0).unwrap();
    dev.write_at(&[9u8; 512], 0).unwrap();
    dev.set_mode(CacheMode::None, false).unwrap();
    assert_eq!(dev.mode(), CacheMode::None);
    let mut buf = vec![0u8; 512];
    dev.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![9u8; 512], "dirty data must still be served in mode none");
    dev.read_at(&mut buf, 65536).unwrap();
    dev.read_at(&mut buf, 65536).unwrap();
    assert_eq!(set.stats().read_misses, 2, "mode none does not fill");
    // A write over the dirty sector goes to backing and drops the dirty copy only after backing
    // has the new data.
    dev.write_at(&[1u8; 512], 0).unwrap();
    assert_eq!(backing_bytes(&backing, 0, 512), vec![1u8; 512]);
    dev.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![1u8; 512]);
    assert_eq!(set.stats().dirty_bytes, 0);
}

#[test]
fn leaving_writeback_with_flush_first_writes_everything_home() {
    let (_, backing, set) = setup(CacheMode::Writeback);
    let dev = set.device(0).unwrap();
    for i in 0..20u64 {
        dev.write_at(&[i as u8 + 1; 4096], i * 8192).unwrap();
    }
    assert!(set.stats().dirty_bytes > 0);
    dev.set_mode(CacheMode::Writethrough, true).unwrap();
    assert_eq!(set.stats().dirty_bytes, 0);
    for i in 0..20u64 {
        assert_eq!(backing_bytes(&backing, i * 8192, 4096), vec![i as u8 + 1; 4096]);
    }
    assert_eq!(read_backing_superblock(backing.as_ref()).unwrap().unwrap().state, BackingState::Clean);
}

#[test]
fn sequential_stream_past_the_cutoff_bypasses_the_cache() {
    let (_, backing, set) = setup(CacheMode::Writeback);
    let dev = set.device(0).unwrap();
    // Cutoff is 96 KiB in the tiny config: 32 KiB writes, the fourth crosses it.
    for i in 0..6u64 {
        dev.write_at(&[i as u8 + 1; 32768], i * 32768).unwrap();
    }
    let s = set.stats();
    assert_eq!(s.write_cached, 2, "{s:?}");
    assert_eq!(s.write_bypassed, 4, "{s:?}");
    assert_eq!(backing_bytes(&backing, 5 * 32768, 32768), vec![6u8; 32768]);
    let mut buf = vec![0u8; 6 * 32768];
    dev.read_at(&mut buf, 0).unwrap();
    for i in 0..6usize {
        assert!(buf[i * 32768..(i + 1) * 32768].iter().all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn unaligned_requests_use_read_modify_write_and_out_of_range_is_refused() {
    let (_, _, set) = setup(CacheMode::Writeback);
    let dev = set.device(0).unwrap();
    assert_eq!(dev.len(), EXPORT);
    let mut model = vec![0u8; 8192];
    dev.write_at(&[1u8; 4096], 0).unwrap();
    model[..4096].fill(1);
    dev.write_at(&[2u8; 100], 7).unwrap();
    model[7..107].fill(2);
    dev.write_at_fua(&[3u8; 1000], 4000).unwrap();
    model[4000..5000].fill(3);
    dev.write_zeroes(300, 5000, false).unwrap();
    model[300..5300].fill(0);
    dev.write_at(&[4u8; 10], 510).unwrap();
    model[510..520].fill(4);
    let mut buf = vec![0u8; 8192];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf == model);
    let mut small = [0u8; 13];
    dev.read_at(&mut small, 505).unwrap();
    assert_eq!(small[..], model[505..518]);
    dev.discard(100, 2000).unwrap();
    assert!(dev.write_at(&[0u8; 512], EXPORT).is_err());
    assert!(dev.read_at(&mut [0u8; 1024], EXPORT - 512).is_err());
    assert!(dev.discard(u64::MAX - 511, 512).is_err());
    assert!(dev.write_at(&[0u8; 2], EXPORT - 1).is_err());
}

/// The engine's own read-modify-write of partial sectors must not lose updates: threads writing
/// interleaved 100-byte pieces of the same sectors concurrently all survive, in every mode.
/// (The NBD server hands unaligned client requests straight to the engine; no wrapper serialises
/// them first.)
#[test]
fn concurrent_unaligned_writes_to_shared_sectors_are_not_lost() {
    const PIECE: u64 = 100;
    const THREADS: u64 = 4;
    const SPAN: u64 = 64 * 1024;
    for mode in CacheMode::ALL {
        let (_, _, set) = setup(mode);
        let set = Arc::new(set);
        for round in 1..=4u8 {
            let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (set, start) = (Arc::clone(&set), Arc::clone(&start));
                    std::thread::spawn(move || {
                        let dev = set.device(0).unwrap();
                        start.wait();
                        // Pieces t, t+4, t+8, ... interleave the threads inside every sector.
                        for i in (t..SPAN / PIECE).step_by(THREADS as usize) {
                            let byte = round.wrapping_mul(16) + t as u8 + 1;
                            dev.write_at(&[byte; PIECE as usize], i * PIECE).unwrap();
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let mut back = vec![0u8; SPAN as usize];
            set.device(0).unwrap().read_at(&mut back, 0).unwrap();
            for i in 0..SPAN / PIECE {
                let expected = round.wrapping_mul(16) + (i % THREADS) as u8 + 1;
                let piece = &back[(i * PIECE) as usize..((i + 1) * PIECE) as usize];
                assert!(
                    piece.iter().all(|&b| b == expected),
                    "{mode} round {round}: piece {i} lost its write"
                );
            }
        }
        let report = set.check().unwrap();
        assert!(report.is_clean(), "{mode}: {:?}", report.problems);
    }
}

/// FUA and FLUSH on a crash-simulating cache: after power loss with every unsynced write
/// dropped, FUA data and data written before a FLUSH is there; nothing else was promised.
#[test]
fn fua_and_flush_survive_power_loss_and_plain_writes_need_a_flush() {
    let cache = Arc::new(SimDev::new(1 << 20));
    let backing = Arc::new(SimDev::new(EXPORT + 8192));
    let c: Arc<dyn BlockDev> = Arc::clone(&cache) as _;
    let b: Arc<dyn BlockDev> = Arc::clone(&backing) as _;
    let set = format_open(&c, &b, tiny_config(CacheMode::Writeback));
    let dev = set.device(0).unwrap();
    dev.write_at_fua(&[1u8; 512], 0).unwrap();
    dev.write_at(&[2u8; 512], 512).unwrap();
    dev.sync().unwrap();
    dev.write_at(&[3u8; 512], 1024).unwrap();
    cache.crash_now();
    backing.crash_now();
    let c2: Arc<dyn BlockDev> = Arc::new(cache.crash_sim_dev(&CrashMode::DropAll));
    let b2: Arc<dyn BlockDev> = Arc::new(backing.crash_sim_dev(&CrashMode::DropAll));
    let set = CacheSet::open(c2, std::slice::from_ref(&b2), tiny_config(CacheMode::Writeback)).unwrap();
    let mut buf = vec![0u8; 1536];
    set.device(0).unwrap().read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[..512], [1u8; 512]);
    assert_eq!(buf[512..1024], [2u8; 512]);
    assert_eq!(buf[1024..], [0u8; 512], "an unflushed write was dropped with its journal entry");
    assert!(set.recovery().dirty_sectors >= 2);
}

/// Thousands of reclaims of few buckets: bucket generations advance far past the 96 a pointer
/// may lag, so GC must remove stale pointers in time, and reads stay right.
#[test]
fn generations_advance_safely_under_heavy_reclaim() {
    let cache = arc(MemDev::new(256 * 1024));
    let backing = arc(MemDev::new(EXPORT + 8192));
    ubcache::cache::format(
        &cache,
        std::slice::from_ref(&backing),
        ubcache::cache::FormatOptions { bucket_bytes: 4096, node_bytes: 2048 },
    )
    .unwrap();
    let mut cfg = tiny_config(CacheMode::Writethrough);
    cfg.sequential_cutoff = 0;
    let set = CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), cfg).unwrap();
    let dev = set.device(0).unwrap();
    let mut model = vec![0u8; 64 * 1024];
    for i in 0..6000u64 {
        let off = (i * 4096) % (64 * 1024);
        let data = vec![(i % 251) as u8 + 1; 4096];
        dev.write_at(&data, off).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        if i % 97 == 0 {
            let mut buf = vec![0u8; model.len()];
            dev.read_at(&mut buf, 0).unwrap();
            assert!(buf == model, "mismatch at iteration {i}");
        }
    }
    let s = set.stats();
    assert!(s.buckets_reclaimed > 3000, "{s:?}");
    let report = set.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    set.close().unwrap();
    let set = CacheSet::open(
        Arc::clone(&cache),
        std::slice::from_ref(&backing),
        tiny_config(CacheMode::Writethrough),
    )
    .unwrap();
    let mut buf = vec![0u8; model.len()];
    set.device(0).unwrap().read_at(&mut buf, 0).unwrap();
    assert!(buf == model);
}

/// Many threads on one device: disjoint ranges per thread with verification, plus shared
/// readers, writeback steps and flushes racing them. Must not deadlock, corrupt or misread.
#[test]
fn concurrent_requests_in_every_mode_stay_consistent() {
    for mode in CacheMode::ALL {
        let (_, _, set) = setup(mode);
        let set = Arc::new(set);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let set = Arc::clone(&set);
                std::thread::spawn(move || {
                    let dev = set.device(0).unwrap();
                    let base = t * 64 * 1024;
                    let mut model = vec![0u8; 64 * 1024];
                    for i in 0..300u64 {
                        let off = (i * 7 * 512 + t * 1024) % (60 * 1024);
                        let len = 512 * (1 + (i % 8));
                        let data = vec![(i as u8) ^ (t as u8 * 40) | 1; len as usize];
                        dev.write_at(&data, base + off).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        if i % 5 == 0 {
                            let mut buf = vec![0u8; model.len()];
                            dev.read_at(&mut buf, base).unwrap();
                            assert!(buf == model, "thread {t} mode {mode}: mismatch at {i}");
                        }
                        if i % 37 == 0 {
                            dev.sync().unwrap();
                        }
                        if i % 23 == 0 {
                            set.writeback_step(4).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in threads {
            h.join().unwrap();
        }
        let report = set.check().unwrap();
        assert!(report.is_clean(), "{mode}: {:?}", report.problems);
    }
}

/// An I/O error on the cache or backing device fails the request with an error (EIO), never a
/// panic; FLUSH after a failed journal write keeps failing instead of claiming durability.
#[test]
fn io_errors_fail_requests_without_panicking() {
    let mut dirty_cases = 0;
    for target_cache in [true, false] {
        for nth in [1u64, 3, 10, 40] {
            let cache_fault = Arc::new(FaultDev::new(MemDev::new(1 << 20)));
            let backing_fault = Arc::new(FaultDev::new(MemDev::new(EXPORT + 8192)));
            let c: Arc<dyn BlockDev> = Arc::clone(&cache_fault) as _;
            let b: Arc<dyn BlockDev> = Arc::clone(&backing_fault) as _;
            let set = format_open(&c, &b, tiny_config(CacheMode::Writeback));
            let dev = set.device(0).unwrap();
            let victim = if target_cache { &cache_fault } else { &backing_fault };
            victim.add_rule(FaultRule::nth(FaultOp::Write, nth).persistent());
            let mut errors = 0;
            for i in 0..60u64 {
                let r = dev.write_at(&[i as u8; 4096], (i * 3 * 4096) % EXPORT);
                errors += u32::from(r.is_err());
                if i % 10 == 9 {
                    errors += u32::from(dev.sync().is_err());
                    errors += u32::from(set.writeback_step(8).is_err());
                }
            }
            assert!(errors > 0, "cache={target_cache} nth={nth}: no error surfaced");
            if target_cache {
                // Every cache write fails from now on: a write followed by FLUSH cannot both succeed.
                let w = dev.write_at(&[0xAB; 4096], 0);
                let f = dev.sync();
                assert!(w.is_err() || f.is_err(), "cache={target_cache} nth={nth}: durability claimed");
            } else {
                // Dirty data cannot be written home: write_back_all must say so. (With nth=1 even
                // the backing superblock's Dirty mark fails, so no write was accepted dirty.)
                dev.write_at(&[0xCD; 4096], 8192).ok();
                if set.stats().dirty_bytes > 0 {
                    dirty_cases += 1;
                    assert!(set.write_back_all().is_err(), "nth={nth}: write_back_all claimed success");
                }
            }
        }
    }
    assert!(dirty_cases >= 2, "too few cases with dirty data under a failing backing device");
}

#[test]
fn detach_writes_dirty_data_home_and_releases_the_backing_device() {
    let (cache, backing, set) = setup(CacheMode::Writeback);
    let dev = set.device(0).unwrap();
    for i in 0..10u64 {
        dev.write_at(&[i as u8 + 1; 4096], i * 16384).unwrap();
    }
    set.detach(0).unwrap();
    for i in 0..10u64 {
        assert_eq!(backing_bytes(&backing, i * 16384, 4096), vec![i as u8 + 1; 4096]);
    }
    let bsb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    assert_eq!(bsb.state, BackingState::Detached);
    // Detached, the export goes on serving straight from the device (bcache's behaviour):
    // writes land in the data region, reads see them, nothing is cached or marked dirty.
    let stats_before = set.stats();
    dev.write_at(&[0xEE; 700], 100).unwrap();
    dev.sync().unwrap();
    let mut expect = vec![1u8; 4096];
    expect[100..800].fill(0xEE);
    assert_eq!(backing_bytes(&backing, 0, 4096), expect, "a detached export writes the device itself");
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, expect);
    let stats_after = set.stats();
    assert_eq!((stats_after.write_cached, stats_after.dirty_bytes), (stats_before.write_cached, 0));
    assert_eq!(stats_after.read_hits, stats_before.read_hits, "no cache lookups for a detached export");
    assert!(dev.write_at(&[0u8; 512], EXPORT).is_err(), "the export's range still holds");
    assert!(set.detach(0).is_err(), "detaching twice is an error");
    drop(dev);
    set.close().unwrap();
    // The cache set no longer knows the device, and the device no longer names the set.
    let set = CacheSet::open(Arc::clone(&cache), &[], tiny_config(CacheMode::Writeback)).unwrap();
    assert!(set.devices().is_empty());
    assert_eq!(set.stats().dirty_bytes, 0);
    drop(set);
    // Given again, it is a detached export of the set (served alone until attached).
    let set =
        CacheSet::open(cache, std::slice::from_ref(&backing), tiny_config(CacheMode::Writeback)).unwrap();
    assert!(set.devices()[0].is_detached());
}

/// Detach and attach cycles while writers keep going on their own ranges: requests that find a
/// detach or attach under way wait for it, then go through the cache or straight to the device;
/// every read sees the thread's last write, and at the end the device alone holds it all.
#[test]
fn detach_attach_cycles_under_load_keep_every_write() {
    let (_, backing, set) = setup(CacheMode::Writeback);
    let set = Arc::new(set);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    const REGION: u64 = 64 * 1024;
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let (set, stop) = (Arc::clone(&set), Arc::clone(&stop));
            std::thread::spawn(move || {
                let dev = set.device(0).unwrap();
                let mut model = vec![0u8; REGION as usize];
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 50 {
                    let off = (i * 1536 + t * 100) % (REGION - 4096);
                    let len = 300 + (i * 97) % 3000;
                    let data = vec![(i % 250) as u8 + 1; len as usize];
                    dev.write_at(&data, t * REGION + off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    if i % 7 == 0 {
                        let mut buf = vec![0u8; REGION as usize];
                        dev.read_at(&mut buf, t * REGION).unwrap();
                        assert!(buf == model, "thread {t}: a read missed a write at step {i}");
                    }
                    i += 1;
                }
                dev.sync().unwrap();
                model
            })
        })
        .collect();
    for _ in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(15));
        set.detach(0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(15));
        set.attach(0).unwrap();
    }
    set.detach(0).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (t, w) in writers.into_iter().enumerate() {
        let model = w.join().unwrap();
        assert!(
            backing_bytes(&backing, t as u64 * REGION, REGION as usize) == model,
            "thread {t}: the detached device lacks writes"
        );
    }
}

#[test]
fn prefetch_warms_the_cache_except_in_mode_none() {
    let (_, backing, set) = setup(CacheMode::Writearound);
    backing.write_at(&[4u8; 65536], 8192 + 131_072).unwrap();
    let dev = set.device(0).unwrap();
    assert_eq!(set.stats().readaheads, 0);
    dev.prefetch(131_072, 65536).unwrap();
    let after_prefetch = set.stats();
    assert_eq!(after_prefetch.read_misses, 128);
    assert_eq!(after_prefetch.readaheads, 1, "a prefetch that filled the cache is one read-ahead");
    let mut buf = vec![0u8; 65536];
    dev.read_at(&mut buf, 131_072).unwrap();
    assert_eq!(buf, vec![4u8; 65536]);
    assert_eq!(set.stats().read_hits - after_prefetch.read_hits, 128, "prefetched data must hit");
    dev.prefetch(131_072, 4096).unwrap();
    assert_eq!(set.stats().readaheads, 1, "a prefetch of cached data reads nothing ahead");
    dev.set_mode(CacheMode::None, false).unwrap();
    dev.prefetch(262_144, 4096).unwrap();
    assert_eq!(set.stats().read_misses, 128, "mode none does not prefetch");
    assert_eq!(set.stats().readaheads, 1);
}

/// Two backing devices share one cache; opening with only one of them keeps the other's dirty
/// data cached (it is never written to the wrong device) and writeback of the present one works.
#[test]
fn two_backing_devices_share_a_cache_and_a_missing_one_keeps_its_dirty_data() {
    let cache = arc(MemDev::new(1 << 20));
    let b0 = arc(MemDev::new(EXPORT + 8192));
    let b1 = arc(MemDev::new(EXPORT + 8192));
    ubcache::cache::format(&cache, &[Arc::clone(&b0), Arc::clone(&b1)], crate::fixtures::TINY).unwrap();
    let set = CacheSet::open(
        Arc::clone(&cache),
        &[Arc::clone(&b0), Arc::clone(&b1)],
        tiny_config(CacheMode::Writeback),
    )
    .unwrap();
    let (d0, d1) = (set.device(0).unwrap(), set.device(1).unwrap());
    d0.write_at(&[1u8; 4096], 0).unwrap();
    d1.write_at(&[2u8; 4096], 0).unwrap();
    let mut buf = vec![0u8; 4096];
    d0.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![1u8; 4096]);
    d1.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![2u8; 4096]);
    drop((d0, d1));
    set.close().unwrap();
    // Only device 1 present (in the other order, to check matching by uuid).
    let set =
        CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&b1), tiny_config(CacheMode::Writeback))
            .unwrap();
    assert!(set.device(0).is_none());
    set.write_back_all().unwrap();
    assert_eq!(backing_bytes(&b1, 0, 4096), vec![2u8; 4096]);
    assert_eq!(backing_bytes(&b0, 0, 4096), vec![0u8; 4096], "device 0's dirty data must stay in the cache");
    assert_eq!(set.stats().dirty_bytes, 4096);
    assert!(set.check().unwrap().is_clean());
    set.close().unwrap();
    let set = CacheSet::open(cache, &[b0.clone(), b1], tiny_config(CacheMode::Writeback)).unwrap();
    set.write_back_all().unwrap();
    assert_eq!(backing_bytes(&b0, 0, 4096), vec![1u8; 4096]);
}

#[test]
fn a_backing_device_of_another_set_or_a_raw_image_is_refused() {
    let (cache_a, _, set_a) = setup(CacheMode::Writeback);
    drop(set_a);
    let (_, backing_b, set_b) = setup(CacheMode::Writeback);
    drop(set_b);
    let err = CacheSet::open(
        Arc::clone(&cache_a),
        std::slice::from_ref(&backing_b),
        tiny_config(CacheMode::Writeback),
    )
    .unwrap_err();
    assert!(err.to_string().contains("belongs to cache set"), "{err}");
    let raw = arc(MemDev::new(EXPORT));
    let err = CacheSet::open(cache_a, &[raw], tiny_config(CacheMode::Writeback)).unwrap_err();
    assert!(err.to_string().contains("raw image"), "{err}");
}
