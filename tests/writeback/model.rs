//! Writeback against a reference model:
//! - a model-based test interleaving writes, reads, FLUSH, writeback batches from a key buffer
//!   filled earlier (possibly stale), full flushes and mode switches: every read returns the
//!   model, and after a final flush backing equals the model byte for byte;
//! - concurrent overwrites while the writeback thread runs at full speed (many seeds): after a
//!   flush backing holds the newest data;
//! - mode switches in every direction under a write load, with the writeback thread running.

use crate::fixtures::{arc, format_open, tiny_config};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use ubcache::cache::writeback::policy::CoalesceLimits;
use ubcache::cache::writeback::{DirtyKeyBuf, DrainStep, WritebackConfig, WritebackThread};
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::{BackingState, read_backing_superblock};

const SECTOR: usize = 512;
/// Export of 512 KiB over a 1 MiB cache of 16 KiB buckets: writeback mode fills it.
const EXPORT_SECTORS: u64 = 1024;

fn setup(mode: CacheMode) -> (Arc<CacheSet>, Arc<dyn BlockDev>) {
    let cache = arc(MemDev::new(1 << 20));
    let backing = arc(MemDev::new(8192 + EXPORT_SECTORS * SECTOR as u64));
    let set = Arc::new(format_open(&cache, &backing, tiny_config(mode)));
    (set, backing)
}

fn backing_image(backing: &dyn BlockDev, len: usize) -> Vec<u8> {
    let sb = read_backing_superblock(backing).unwrap().unwrap();
    let mut raw = vec![0u8; len];
    backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
    raw
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    /// NBD FLUSH.
    Sync,
    /// Refill the test's own key buffer (it then goes stale as writes continue).
    Scan,
    /// Write back a batch from the (possibly stale) key buffer.
    WritebackBatch {
        keys: usize,
    },
    /// Flush everything home.
    FlushAll,
    SetMode {
        mode: CacheMode,
        flush_first: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..EXPORT_SECTORS, 1u64..=24, any::<u64>())
            .prop_map(|(sector, n, seed)| Op::Write { sector, sectors: n.min(EXPORT_SECTORS - sector), seed }),
        2 => (0..EXPORT_SECTORS, 1u64..=32)
            .prop_map(|(sector, n)| Op::Read { sector, sectors: n.min(EXPORT_SECTORS - sector) }),
        1 => Just(Op::Sync),
        1 => Just(Op::Scan),
        3 => (1usize..=16).prop_map(|keys| Op::WritebackBatch { keys }),
        1 => Just(Op::FlushAll),
        1 => (prop_oneof![
            Just(CacheMode::Writethrough),
            Just(CacheMode::Writeback),
            Just(CacheMode::Writearound),
            Just(CacheMode::None)
        ], any::<bool>())
            .prop_map(|(mode, flush_first)| Op::SetMode { mode, flush_first }),
    ]
}

fn run_model(ops: &[Op]) {
    let (set, backing) = setup(CacheMode::Writeback);
    set.set_sequential_cutoff(0);
    let dev = set.devices().remove(0);
    let mut model = vec![0u8; EXPORT_SECTORS as usize * SECTOR];
    let mut keybuf = DirtyKeyBuf::new(24);
    let mut held = Vec::new();
    let limits = CoalesceLimits { max_io_len: 64, max_extents: 8 };
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { sector, sectors, seed } => {
                let data = pattern(seed, sectors as usize * SECTOR);
                dev.write_at(&data, sector * SECTOR as u64).unwrap();
                let at = sector as usize * SECTOR;
                model[at..at + data.len()].copy_from_slice(&data);
            }
            Op::Read { sector, sectors } => {
                let mut buf = vec![0u8; sectors as usize * SECTOR];
                dev.read_at(&mut buf, sector * SECTOR as u64).unwrap();
                let at = sector as usize * SECTOR;
                assert!(buf == model[at..at + buf.len()], "op {i}: read of {sector}+{sectors} differs");
            }
            Op::Sync => dev.sync().unwrap(),
            Op::Scan => held = keybuf.take(&set, 64, u64::MAX).unwrap(),
            Op::WritebackBatch { keys } => {
                let n = keys.min(held.len());
                let batch: Vec<_> = held.drain(..n).collect();
                set.write_back_keys(&batch, limits).unwrap();
            }
            Op::FlushAll => {
                DrainStep::new(Arc::clone(&set), WritebackConfig::default()).run_to_end().unwrap();
                assert_eq!(set.stats().dirty_bytes, 0, "op {i}");
            }
            Op::SetMode { mode, flush_first } => dev.set_mode(mode, flush_first).unwrap(),
        }
    }
    let mut all = vec![0u8; model.len()];
    dev.read_at(&mut all, 0).unwrap();
    assert_eq!(first_difference(&all, &model), None, "final read through the cache");
    DrainStep::new(Arc::clone(&set), WritebackConfig::default()).run_to_end().unwrap();
    assert_eq!(set.stats().dirty_bytes, 0);
    let image = backing_image(backing.as_ref(), model.len());
    assert_eq!(first_difference(&image, &model), None, "backing after the final flush");
    assert_eq!(read_backing_superblock(backing.as_ref()).unwrap().unwrap().state, BackingState::Clean);
    let report = set.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn writeback_batches_flushes_and_mode_switches_match_the_model(ops in prop::collection::vec(op(), 1..120)) {
        run_model(&ops);
    }
}

/// Full-speed writeback config.
fn urgent_config() -> WritebackConfig {
    WritebackConfig {
        writeback_delay: Duration::ZERO,
        writeback_percent: 0,
        min_rate: 1 << 30,
        rate_update_interval: Duration::from_millis(5),
        idle_poll: Duration::from_millis(1),
        batch_keys: 8,
        ..WritebackConfig::default()
    }
}

/// One writer overwrites a small hot range (so writes keep landing on keys being written back)
/// while the writeback thread runs flat out; after a flush backing must hold the newest data.
fn concurrent_overwrites(seed: u64) {
    let (set, backing) = setup(CacheMode::Writeback);
    set.set_sequential_cutoff(0);
    let dev = set.devices().remove(0);
    let thread = WritebackThread::start(Arc::clone(&set), urgent_config());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; EXPORT_SECTORS as usize * SECTOR];
    for n in 0..400u64 {
        let sector = rng.gen_range(0..128u64);
        let sectors = rng.gen_range(1..=16u64).min(EXPORT_SECTORS - sector);
        let data = pattern(seed * 100_000 + n, sectors as usize * SECTOR);
        dev.write_at(&data, sector * SECTOR as u64).unwrap();
        let at = sector as usize * SECTOR;
        model[at..at + data.len()].copy_from_slice(&data);
        if n % 64 == 0 {
            dev.sync().unwrap();
        }
        if n % 100 == 50 {
            // A mode switch mid-run: writethrough writes go to backing directly and race the
            // writeback of older copies of the same sectors (rule 6).
            dev.set_mode(CacheMode::Writethrough, false).unwrap();
        }
        if n % 100 == 75 {
            dev.set_mode(CacheMode::Writeback, false).unwrap();
        }
    }
    thread.request_drain();
    let start = std::time::Instant::now();
    while set.stats().dirty_bytes > 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "seed {seed}: flush did not finish");
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = thread.status();
    thread.stop().unwrap();
    DrainStep::new(Arc::clone(&set), WritebackConfig::default()).run_to_end().unwrap();
    let image = backing_image(backing.as_ref(), model.len());
    assert_eq!(first_difference(&image, &model), None, "seed {seed}: backing after flush ({status:?})");
    let mut all = vec![0u8; model.len()];
    dev.read_at(&mut all, 0).unwrap();
    assert_eq!(first_difference(&all, &model), None, "seed {seed}: read through the cache");
}

#[test]
fn concurrent_overwrites_during_writeback_leave_the_newest_data_on_backing() {
    for seed in 0..12 {
        concurrent_overwrites(seed);
    }
}

/// Writers keep writing (disjoint block sets, so the model is exact) while the mode goes
/// through every ordered pair of modes, with and without flush-first, and the writeback thread
/// runs. Afterwards reads and (after a flush) backing equal the model.
#[test]
fn mode_switches_in_every_direction_under_load_keep_data_correct() {
    let (set, backing) = setup(CacheMode::Writeback);
    set.set_sequential_cutoff(0);
    let dev = Arc::new(set.devices().remove(0));
    let thread =
        WritebackThread::start(Arc::clone(&set), WritebackConfig { batch_keys: 4, ..urgent_config() });
    let stop = Arc::new(AtomicBool::new(false));
    const WRITERS: u64 = 3;
    const BLOCK_SECTORS: u64 = 8;
    let blocks = EXPORT_SECTORS / BLOCK_SECTORS;
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let dev = Arc::clone(&dev);
        let stop = Arc::clone(&stop);
        handles.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(w);
            let mut mine = vec![None::<u64>; blocks as usize];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 50 {
                let block = rng.gen_range(0..blocks / WRITERS) * WRITERS + w;
                let seed = (w << 40) | n;
                let data = pattern(seed, (BLOCK_SECTORS as usize) * SECTOR);
                dev.write_at(&data, block * BLOCK_SECTORS * SECTOR as u64).unwrap();
                mine[block as usize] = Some(seed);
                n += 1;
                if n % 32 == 0 {
                    dev.sync().unwrap();
                }
            }
            mine
        }));
    }
    // Switches go through the control target (flush-first drains with `DrainStep`, as
    // `ubcache set-mode --flush-first` does).
    let target =
        ubcache::ctl::engine::control_target(Arc::clone(&set), vec![("d".to_owned(), Arc::clone(&dev))]);
    let mut switches = 0;
    for from in CacheMode::ALL {
        for to in CacheMode::ALL {
            if from == to {
                continue;
            }
            target.set_mode(None, from, false).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            target.set_mode(Some("d"), to, switches % 2 == 0).unwrap();
            switches += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut model = vec![0u8; EXPORT_SECTORS as usize * SECTOR];
    for h in handles {
        for (block, seed) in h.join().unwrap().into_iter().enumerate() {
            if let Some(seed) = seed {
                let at = block * BLOCK_SECTORS as usize * SECTOR;
                let len = BLOCK_SECTORS as usize * SECTOR;
                model[at..at + len].copy_from_slice(&pattern(seed, len));
            }
        }
    }
    assert_eq!(switches, 12);
    let mut all = vec![0u8; model.len()];
    dev.read_at(&mut all, 0).unwrap();
    assert_eq!(first_difference(&all, &model), None, "read through the cache after the switches");
    thread.stop().unwrap();
    DrainStep::new(Arc::clone(&set), WritebackConfig::default()).run_to_end().unwrap();
    let image = backing_image(backing.as_ref(), model.len());
    assert_eq!(first_difference(&image, &model), None, "backing after the flush");
    assert!(set.check().unwrap().problems.is_empty());
}
