//! How writeback marks keys clean and copies them (`cache/writeback/copy.rs`):
//!
//! - keys written one after another (adjacent on backing, adjacent in one cache bucket) are
//!   marked clean with one replace of the whole run, so they end up as one clean key per
//!   bucket; a key overwritten while its run was being copied keeps its new data dirty, and
//!   the rest of the run is still cleaned (replace works sector by sector). The same holds
//!   after journal replay;
//! - runs copied through memory go through a writer thread; a backing write failing in it
//!   fails the call with every key still dirty and every pin released, and a later writeback
//!   writes everything home.

use crate::fixtures::{TINY, format_open, tiny_config};
use crate::gated_dev::GatedDev;
use std::sync::Arc;
use ubcache::cache::writeback::policy::CoalesceLimits;
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::dev::{BlockDev, FaultDev, FaultOp, FaultRule, MemDev};
use ubcache::format::read_backing_superblock;
use ubcache_btree::Pos;

const BLOCK: u64 = 4096;
const BUCKET_SECTORS: u64 = TINY.bucket_bytes / 512;
const LIMITS: CoalesceLimits = CoalesceLimits { max_io_len: 2048, max_extents: 1024 };

fn data_offset(backing: &dyn BlockDev) -> u64 {
    read_backing_superblock(backing).unwrap().unwrap().data_offset_bytes
}

fn fill(i: u64, generation: u8) -> Vec<u8> {
    vec![(i as u8).wrapping_mul(7).wrapping_add(generation); BLOCK as usize]
}

#[test]
fn a_written_back_run_becomes_one_clean_key_per_bucket_and_stays_so_after_replay() {
    let cache: Arc<dyn BlockDev> = Arc::new(MemDev::new(4 << 20));
    let backing: Arc<dyn BlockDev> = Arc::new(MemDev::new(8192 + (4 << 20)));
    let cfg = CacheConfigs::writeback();
    let set = format_open(&cache, &backing, cfg.clone());
    set.set_sequential_cutoff(0);
    let dev = set.devices().remove(0);
    let n = 4 * BUCKET_SECTORS * 512 / BLOCK; // four buckets' worth of 4 KiB writes
    for i in 0..n {
        dev.write_at(&fill(i, 1), i * BLOCK).unwrap();
    }
    let keys = set.scan_dirty(Pos::MIN, 1000).unwrap().keys;
    assert_eq!(keys.len() as u64, n);
    let buckets: std::collections::BTreeSet<u64> =
        keys.iter().map(|k| k.ptr.offset / BUCKET_SECTORS).collect();
    let report = set.write_back_keys(&keys, LIMITS).unwrap();
    assert_eq!(report.keys_written as u64, n, "{report:?}");
    let check = set.check().unwrap();
    assert!(check.is_clean(), "{:?}", check.problems);
    assert_eq!(check.dirty_keys, 0);
    // Without merging there would be one clean key per write.
    assert!(
        check.keys <= buckets.len() as u64,
        "{} clean keys for {n} writes in {} buckets",
        check.keys,
        buckets.len()
    );
    let mut home = vec![0u8; BLOCK as usize];
    for i in 0..n {
        backing.read_at(&mut home, data_offset(backing.as_ref()) + i * BLOCK).unwrap();
        assert!(home == fill(i, 1), "block {i} on backing");
    }
    // The clean entries are journalled, not checkpointed: reopen without closing replays them.
    set.sync().unwrap();
    drop(dev);
    drop(set);
    let set = CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), cfg).unwrap();
    let replayed = set.check().unwrap();
    assert!(replayed.is_clean(), "{:?}", replayed.problems);
    assert_eq!((replayed.keys, replayed.dirty_keys), (check.keys, 0));
    let dev = set.devices().remove(0);
    let mut got = vec![0u8; BLOCK as usize];
    for i in 0..n {
        dev.read_at(&mut got, i * BLOCK).unwrap();
        assert!(got == fill(i, 1), "block {i} after replay");
    }
}

/// Test configs in one place.
struct CacheConfigs;

impl CacheConfigs {
    fn writeback() -> ubcache::cache::CacheConfig {
        ubcache::cache::CacheConfig { sequential_cutoff: 0, ..tiny_config(CacheMode::Writeback) }
    }
}

#[test]
fn a_key_overwritten_during_the_copy_stays_dirty_and_the_rest_of_its_run_is_cleaned() {
    let cache: Arc<dyn BlockDev> = Arc::new(MemDev::new(4 << 20));
    let gated = Arc::new(GatedDev::new(8192 + (4 << 20)));
    let backing: Arc<dyn BlockDev> = Arc::clone(&gated) as Arc<dyn BlockDev>;
    let set = Arc::new(format_open(&cache, &backing, CacheConfigs::writeback()));
    set.set_sequential_cutoff(0);
    let dev = set.devices().remove(0);
    // One bucket's worth of adjacent 4 KiB writes: one run, one backing write.
    let n = BUCKET_SECTORS * 512 / BLOCK;
    for i in 0..n {
        dev.write_at(&fill(i, 1), i * BLOCK).unwrap();
    }
    let keys = set.scan_dirty(Pos::MIN, 1000).unwrap().keys;
    assert_eq!(keys.len() as u64, n);
    let first = keys[0].ptr.offset;
    assert!(
        keys.iter().enumerate().all(|(i, k)| k.ptr.offset == first + i as u64 * 8)
            && first % BUCKET_SECTORS == 0,
        "the writes did not land side by side in one bucket: {keys:?}"
    );
    let offset = data_offset(backing.as_ref());
    gated.arm(offset);
    let wb_set = Arc::clone(&set);
    let writeback = std::thread::spawn(move || wb_set.write_back_keys(&keys, LIMITS).unwrap());
    gated.wait_parked();
    // A writeback-mode write does not wait for writeback: it lands while the run is copied.
    let overwritten = 1;
    dev.write_at(&fill(overwritten, 2), overwritten * BLOCK).unwrap();
    gated.release();
    let report = writeback.join().unwrap();
    assert_eq!(report.keys_written as u64, n, "{report:?}");

    let check = set.check().unwrap();
    assert!(check.is_clean(), "{:?}", check.problems);
    assert_eq!(
        (check.dirty_keys, check.dirty_sectors),
        (1, BLOCK / 512),
        "only the overwritten block is dirty"
    );
    // The clean key before it and the one after it (merged), and the new dirty key.
    assert_eq!(check.keys, 3);
    assert_eq!(set.usage().unwrap().buckets_pinned, 0);
    let mut got = vec![0u8; BLOCK as usize];
    for i in 0..n {
        let want = if i == overwritten { fill(i, 2) } else { fill(i, 1) };
        dev.read_at(&mut got, i * BLOCK).unwrap();
        assert!(got == want, "block {i} through the cache");
        backing.read_at(&mut got, offset + i * BLOCK).unwrap();
        assert!(got == fill(i, 1), "block {i} on backing: the copy made before the overwrite");
    }
    set.write_back_all().unwrap();
    backing.read_at(&mut got, offset + overwritten * BLOCK).unwrap();
    assert!(got == fill(overwritten, 2), "the overwrite reached backing at the next writeback");
}

/// A writeback-mode set over a fault-injecting backing device with `n` dirty 4 KiB keys with
/// gaps between them (one run, and one backing write, per key): (backing's faults, backing,
/// set, the dirty keys).
fn spaced_dirty_keys(
    n: u64,
) -> (Arc<FaultDev<MemDev>>, Arc<dyn BlockDev>, CacheSet, Vec<ubcache_btree::Key>) {
    let cache: Arc<dyn BlockDev> = Arc::new(MemDev::new(4 << 20));
    let faulty = Arc::new(FaultDev::new(MemDev::new(8192 + (4 << 20))));
    let backing: Arc<dyn BlockDev> = Arc::clone(&faulty) as Arc<dyn BlockDev>;
    let set = format_open(&cache, &backing, CacheConfigs::writeback());
    set.set_sequential_cutoff(0);
    let dev = set.devices().remove(0);
    for i in 0..n {
        dev.write_at(&fill(i, 1), 2 * i * BLOCK).unwrap();
    }
    let keys = set.scan_dirty(Pos::MIN, 1000).unwrap().keys;
    assert_eq!(keys.len() as u64, n);
    (faulty, backing, set, keys)
}

#[test]
fn a_backing_write_failing_in_the_writer_thread_keeps_every_key_dirty_and_unpinned() {
    let n = 24u64;
    let (faulty, backing, set, keys) = spaced_dirty_keys(n);
    let failing = faulty.add_rule(FaultRule::nth(FaultOp::Write, 5));
    let err = set.write_back_keys(&keys, LIMITS).expect_err("the fifth backing write failed");
    assert!(err.to_string().contains("I/O") || err.to_string().to_lowercase().contains("error"), "{err}");
    let usage = set.usage().unwrap();
    assert_eq!(usage.buckets_pinned, 0, "a failed writeback left buckets pinned");
    assert_eq!(usage.dirty_bytes, n * BLOCK, "keys were marked clean though their batch failed");
    faulty.remove_rule(failing);
    let report = set.write_back_keys(&keys, LIMITS).unwrap();
    assert_eq!((report.keys_written as u64, report.backing_writes as u64), (n, n), "{report:?}");
    assert_eq!(set.usage().unwrap().dirty_bytes, 0);
    let offset = data_offset(backing.as_ref());
    let mut got = vec![0u8; BLOCK as usize];
    for i in 0..n {
        backing.read_at(&mut got, offset + 2 * i * BLOCK).unwrap();
        assert!(got == fill(i, 1), "block {i} on backing");
    }
}

/// Short runs are written by several writer threads at once. A failure at any one of the
/// writes must end the call with an error, never hang it (the other writers are idle or busy
/// when it happens, and fewer jobs than writers may be left), and lose nothing.
#[test]
fn a_failure_at_any_write_among_several_writers_ends_the_call_without_hanging() {
    let n = 6u64;
    for failing_write in 1..=n {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (faulty, _, set, keys) = spaced_dirty_keys(n);
            let rule = faulty.add_rule(FaultRule::nth(FaultOp::Write, failing_write));
            let failed = set.write_back_keys(&keys, LIMITS).is_err();
            let usage = set.usage().unwrap();
            faulty.remove_rule(rule);
            let retried = set.write_back_keys(&keys, LIMITS).unwrap();
            done_tx.send((failed, usage.buckets_pinned, usage.dirty_bytes, retried.keys_written)).unwrap();
        });
        let (failed, pinned, dirty, retried) = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("write {failing_write} failing: the writeback hung"));
        assert!(failed, "write {failing_write} failing: the call reported success");
        assert_eq!((pinned, dirty), (0, n * BLOCK), "write {failing_write} failing");
        assert_eq!(retried as u64, n, "write {failing_write} failing: the retry");
    }
}

/// A backing device that counts the writes it has been given (before they park) and says
/// whether parallel writes help it.
#[derive(Debug)]
struct CountingDev {
    gated: GatedDev,
    writes_started: std::sync::atomic::AtomicU64,
    parallel: bool,
}

impl BlockDev for CountingDev {
    fn len(&self) -> u64 {
        self.gated.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps { parallel_writes: self.parallel, ..Default::default() }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> ubcache::dev::DevResult<()> {
        self.gated.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> ubcache::dev::DevResult<()> {
        self.writes_started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.gated.write_at(buf, offset)
    }
    fn sync(&self) -> ubcache::dev::DevResult<()> {
        self.gated.sync()
    }
}

/// Long runs go to a device in offset order, one at a time, unless the device says parallel
/// writes help it (a remote volume): then the next run's write starts while the first one is
/// still in flight.
#[test]
fn long_runs_are_written_one_at_a_time_unless_the_device_says_parallel_writes_help() {
    for parallel in [false, true] {
        let cache: Arc<dyn BlockDev> = Arc::new(MemDev::new(8 << 20));
        let dev_impl = Arc::new(CountingDev {
            gated: GatedDev::new(8192 + (8 << 20)),
            writes_started: std::sync::atomic::AtomicU64::new(0),
            parallel,
        });
        let backing: Arc<dyn BlockDev> = Arc::clone(&dev_impl) as Arc<dyn BlockDev>;
        let set = Arc::new(format_open(&cache, &backing, CacheConfigs::writeback()));
        set.set_sequential_cutoff(0);
        let dev = set.devices().remove(0);
        // Three runs of 512 KiB (long), with gaps between them.
        for run in 0..3u64 {
            for i in 0..128u64 {
                dev.write_at(&fill(run * 128 + i, 1), run * (1 << 20) + i * BLOCK).unwrap();
            }
        }
        let keys = set.scan_dirty(Pos::MIN, 1000).unwrap().keys;
        let started_before = dev_impl.writes_started.load(std::sync::atomic::Ordering::SeqCst);
        dev_impl.gated.arm(data_offset(backing.as_ref()));
        let wb_set = Arc::clone(&set);
        let writeback = std::thread::spawn(move || wb_set.write_back_keys(&keys, LIMITS).unwrap());
        dev_impl.gated.wait_parked();
        let second_started =
            || dev_impl.writes_started.load(std::sync::atomic::Ordering::SeqCst) >= started_before + 2;
        if parallel {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !second_started() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(second_started(), "no second write started while the first was in flight");
        } else {
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert!(!second_started(), "a second long run was written while the first was in flight");
        }
        dev_impl.gated.release();
        let report = writeback.join().unwrap();
        assert_eq!((report.keys_written, report.backing_writes), (3 * 128, 3), "{report:?}");
        let mut got = vec![0u8; BLOCK as usize];
        let offset = data_offset(backing.as_ref());
        for run in 0..3u64 {
            for i in [0, 127] {
                backing.read_at(&mut got, offset + run * (1 << 20) + i * BLOCK).unwrap();
                assert!(got == fill(run * 128 + i, 1), "parallel={parallel}: run {run} block {i}");
            }
        }
    }
}
