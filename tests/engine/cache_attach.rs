//! Runtime attach (`CacheSet::attach`, `ubcache attach`) of a backing device detached at
//! runtime: the device is bound to the set again (superblock Clean with the set's uuid, listed
//! in the cache superblock), starts with an empty cache for it, so data written to it while it
//! was detached reads back (no stale cached copy), writes are cached again, and the binding
//! holds after a restart.
//!
//! Crash ordering: power is cut at every write and sync of either device during an attach (with
//! unsynced writes dropped, kept, kept at random and torn); every crash image must read as
//! either detached-and-consistent (backing alone holds the data, the cache opens without it, and
//! with it as a detached export that attaches again) or
//! attached-and-consistent (the set opens with it and serves exactly the data). The opposite
//! order (backing superblock first) is shown to leave an image that is neither.
//!
//! The same holds after a restart: a device whose superblock says Detached when the set opens
//! (detached before the restart) is served straight from the device under a dev id no
//! registered device uses, attaches with the same ordering, and stays attached; a device bound
//! to another cache set is refused untouched.

use crate::fixtures::{TINY, tiny_config};
use crate::power_cut::{Cut, crash_modes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::check::ProblemKind;
use ubcache::dev::{BlockDev, CrashMode, MemDev, SimDev, SimStats};
use ubcache::format::{self, BackingState, read_backing_superblock, read_cache_superblock};

const SECTOR: usize = 512;
const BLOCK: usize = 4096;
const EXPORT_BYTES: usize = 256 * 1024;
const CACHE_BYTES: u64 = 1 << 20;
const DATA_OFFSET: u64 = format::BACKING_DATA_OFFSET_BYTES;

fn dynd<D: BlockDev + 'static>(d: &Arc<D>) -> Arc<dyn BlockDev> {
    Arc::clone(d) as Arc<dyn BlockDev>
}

fn backing_data(backing: &dyn BlockDev) -> Vec<u8> {
    let mut raw = vec![0u8; EXPORT_BYTES];
    backing.read_at(&mut raw, DATA_OFFSET).unwrap();
    raw
}

/// Writes random data through `dev` and into `model`; also reads some of it back, so the cache
/// holds clean copies too.
fn workload(dev: &dyn BlockDev, model: &mut [u8], rng: &mut StdRng, writes: usize) {
    for _ in 0..writes {
        let sectors = rng.gen_range(1..=16usize);
        let sector = rng.gen_range(0..EXPORT_BYTES / SECTOR - sectors);
        let mut data = vec![0u8; sectors * SECTOR];
        rng.fill(&mut data[..]);
        dev.write_at(&data, (sector * SECTOR) as u64).unwrap();
        model[sector * SECTOR..sector * SECTOR + data.len()].copy_from_slice(&data);
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, (sector * SECTOR) as u64).unwrap();
    }
}

/// Writes to the backing device directly (as a user of the detached device would), over
/// ranges that were cached before the detach.
fn write_alone(backing: &dyn BlockDev, model: &mut [u8], rng: &mut StdRng) {
    for _ in 0..20 {
        let block = rng.gen_range(0..EXPORT_BYTES / BLOCK);
        let data = vec![rng.r#gen::<u8>() | 1; BLOCK];
        backing.write_at(&data, DATA_OFFSET + (block * BLOCK) as u64).unwrap();
        model[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&data);
    }
    backing.sync().unwrap();
}

#[test]
fn detach_write_alone_attach_reads_the_newest_data_caches_again_and_survives_a_restart() {
    let cache = Arc::new(MemDev::new(CACHE_BYTES));
    let backing = Arc::new(MemDev::new(DATA_OFFSET + EXPORT_BYTES as u64));
    ubcache::cache::format(&dynd(&cache), &[dynd(&backing)], TINY).unwrap();
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
    set.set_sequential_cutoff(0);
    let dev = set.device(0).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let mut model = vec![0u8; EXPORT_BYTES];
    workload(&dev, &mut model, &mut rng, 80);
    assert!(set.stats().dirty_bytes > 0);
    assert!(matches!(set.attach(0), Err(ubcache::cache::CacheError::Invalid(_))), "attached already");
    assert!(set.attach(9).is_err(), "no such device");

    set.detach(0).unwrap();
    assert!(backing_data(backing.as_ref()) == model, "detach wrote everything home");
    write_alone(backing.as_ref(), &mut model, &mut rng);

    set.attach(0).unwrap();
    let sb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    assert_eq!((sb.state, sb.set_uuid), (BackingState::Clean, set.uuid()));
    let csb = read_cache_superblock(cache.as_ref()).unwrap().sb;
    assert!(csb.backing.iter().any(|e| e.uuid == sb.uuid && e.dev_id == 0), "registered again");
    let hits_before = set.stats().read_hits;
    let mut all = vec![0u8; EXPORT_BYTES];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == model, "the re-attached device must read the data written while detached");
    assert_eq!(set.stats().read_hits, hits_before, "nothing of the device is cached after attach");
    let cached_before = set.stats().write_cached;
    workload(&dev, &mut model, &mut rng, 20);
    assert_eq!(set.stats().write_cached, cached_before + 20, "writes are cached again");
    assert!(set.stats().dirty_bytes > 0);
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == model);
    assert!(set.check().unwrap().problems.is_empty());
    drop(dev);
    set.close().unwrap();

    // The binding holds after a restart (dirty data included).
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
    let dev = set.device(0).unwrap();
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == model, "after restart");
    assert!(set.stats().dirty_bytes > 0);
    set.write_back_all().unwrap();
    assert!(backing_data(backing.as_ref()) == model);
}

/// A set in writeback mode with a workload written and FLUSHed, on fresh SimDevs holding the
/// durable images.
fn prepared(seed: u64) -> (Arc<SimDev>, Arc<SimDev>, Vec<u8>) {
    let cache = Arc::new(SimDev::new(CACHE_BYTES));
    let backing = Arc::new(SimDev::new(DATA_OFFSET + EXPORT_BYTES as u64));
    ubcache::cache::format(&dynd(&cache), &[dynd(&backing)], TINY).unwrap();
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
    set.set_sequential_cutoff(0);
    let dev = set.device(0).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; EXPORT_BYTES];
    workload(&dev, &mut model, &mut rng, 40);
    dev.sync().unwrap();
    drop(dev);
    drop(set);
    (
        Arc::new(SimDev::from_image(cache.durable_image())),
        Arc::new(SimDev::from_image(backing.durable_image())),
        model,
    )
}

/// Opens the set, detaches, writes to the device alone, then attaches with the cut armed.
/// Returns whether the attach completed; `model` gets the data written alone.
fn run_attach(cache: &Arc<SimDev>, backing: &Arc<SimDev>, model: &mut [u8], seed: u64, cut: Cut) -> bool {
    let set = CacheSet::open(dynd(cache), &[dynd(backing)], tiny_config(CacheMode::Writeback)).unwrap();
    set.detach(0).unwrap();
    write_alone(backing.as_ref(), model, &mut StdRng::seed_from_u64(seed ^ 0xa77));
    cut.arm(cache, backing);
    let done = set.attach(0).is_ok();
    cache.crash_now();
    backing.crash_now();
    done
}

/// Which consistent state a crash image is in; panics if it is in neither.
#[derive(Debug, PartialEq, Eq)]
enum State {
    Detached,
    Attached,
}

fn verify(cache_image: Vec<u8>, backing_image: Vec<u8>, model: &[u8], label: &str) -> State {
    let backing = Arc::new(SimDev::from_image(backing_image));
    let cache = Arc::new(SimDev::from_image(cache_image));
    let sb = read_backing_superblock(backing.as_ref())
        .unwrap_or_else(|e| panic!("{label}: backing superblock unreadable: {e}"))
        .unwrap_or_else(|| panic!("{label}: backing superblock lost"));
    if sb.state == BackingState::Detached {
        assert_eq!(sb.set_uuid, format::Uuid::NIL, "{label}");
        assert!(backing_data(backing.as_ref()) == model, "{label}: detached device lacks data");
        // The cache opens without it and is consistent.
        let set = CacheSet::open(dynd(&cache), &[], tiny_config(CacheMode::Writeback))
            .unwrap_or_else(|e| panic!("{label}: cache does not open without the device: {e}"));
        assert!(set.check().unwrap().problems.is_empty(), "{label}");
        drop(set);
        // And with it, as a detached export that serves the device's own data and attaches
        // (even when the crash left the cache superblock listing it).
        let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback))
            .unwrap_or_else(|e| panic!("{label}: cache does not open with the detached device: {e}"));
        let dev = set.device(set.devices()[0].dev_id()).unwrap();
        assert!(dev.is_detached(), "{label}");
        let mut all = vec![0u8; EXPORT_BYTES];
        dev.read_at(&mut all, 0).unwrap();
        assert!(all == model, "{label}: detached export lacks data");
        set.attach(dev.dev_id()).unwrap_or_else(|e| panic!("{label}: attach after the crash: {e}"));
        dev.read_at(&mut all, 0).unwrap();
        assert!(all == model, "{label}: stale data after attaching a crashed-detached device");
        assert!(set.check().unwrap().problems.is_empty(), "{label}");
        return State::Detached;
    }
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback))
        .unwrap_or_else(|e| panic!("{label}: attached device does not open with its cache: {e}"));
    let dev = set.device(0).unwrap();
    let mut all = vec![0u8; EXPORT_BYTES];
    dev.read_at(&mut all, 0).unwrap();
    if let Some(i) = all.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{label}: sector {} differs after attach + crash (stale cache?)", i / SECTOR);
    }
    assert!(set.check().unwrap().problems.is_empty(), "{label}");
    State::Attached
}

/// Cuts the power at every write and sync of one attach (whose uncut run changed the devices'
/// stats from `.0` to `.1`): `run` prepares fresh devices, attaches with the cut armed and
/// returns them with the model and whether the attach completed. Every crash image must be
/// consistently detached or attached, and a completed attach must be durable. Returns how many
/// images were (detached, attached).
fn sweep_attach_cuts(
    label: &str,
    cache: (SimStats, SimStats),
    backing: (SimStats, SimStats),
    seed: u64,
    run: impl Fn(Cut) -> (Arc<SimDev>, Arc<SimDev>, Vec<u8>, bool),
) -> (usize, usize) {
    let ((c0, c1), (b0, b1)) = (cache, backing);
    assert!(b1.syncs > b0.syncs && c1.syncs > c0.syncs, "{label}: attach writes both superblocks");
    let cuts = Cut::points(
        (c1.writes - c0.writes, c1.syncs - c0.syncs),
        (b1.writes - b0.writes, b1.syncs - b0.syncs),
        |_| 1,
    );
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let (mut detached, mut attached) = (0, 0);
    for cut in cuts {
        let (cache, backing, model, completed) = run(cut);
        for mode in crash_modes(&mut rng) {
            let label = format!("{label} cut {cut:?} (completed: {completed}) crash {mode:?}");
            match verify(cache.crash_image(&mode), backing.crash_image(&mode), &model, &label) {
                State::Detached => {
                    assert!(!completed, "{label}: a completed attach must be durable");
                    detached += 1;
                }
                State::Attached => attached += 1,
            }
        }
    }
    (detached, attached)
}

#[test]
fn power_loss_during_attach_leaves_it_detached_or_attached_and_consistent() {
    let (mut detached, mut attached) = (0, 0);
    for seed in 0..2u64 {
        let (cache, backing, mut model) = prepared(seed);
        // Count the attach's own I/O: run once uncut, measuring from after the detach.
        let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
        set.detach(0).unwrap();
        write_alone(backing.as_ref(), &mut model, &mut StdRng::seed_from_u64(seed ^ 0xa77));
        let (c0, b0) = (cache.stats(), backing.stats());
        set.attach(0).unwrap();
        let (c1, b1) = (cache.stats(), backing.stats());
        drop(set);
        let (d, a) = sweep_attach_cuts(&format!("seed {seed}"), (c0, c1), (b0, b1), seed, |cut| {
            let (cache, backing, mut model) = prepared(seed);
            let completed = run_attach(&cache, &backing, &mut model, seed, cut);
            (cache, backing, model, completed)
        });
        detached += d;
        attached += a;
    }
    eprintln!("attach crash states: {detached} detached, {attached} attached");
    assert!(detached > 10 && attached > 10, "both outcomes must occur: {detached} / {attached}");
}

/// The harness must catch the wrong order: binding the backing superblock before the cache
/// superblock lists the device leaves, on a crash in between, a device that says it belongs
/// to the set while the set does not know it: it opens neither alone nor with its cache.
#[test]
fn binding_the_backing_superblock_first_is_caught() {
    let (cache, backing, mut model) = prepared(7);
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
    set.detach(0).unwrap();
    write_alone(backing.as_ref(), &mut model, &mut StdRng::seed_from_u64(3));
    // The wrong first step, then power loss before the cache superblock is written.
    let mut sb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    sb.state = BackingState::Clean;
    sb.set_uuid = set.uuid();
    sb.seq += 1;
    format::write_backing_superblock(backing.as_ref(), &sb).unwrap();
    cache.crash_now();
    backing.crash_now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        verify(
            cache.crash_image(&CrashMode::KeepAll),
            backing.crash_image(&CrashMode::KeepAll),
            &model,
            "broken",
        )
    }));
    assert!(result.is_err(), "a backing superblock bound before the cache lists it must be caught");
}

/// Opens the set on `cache` with `backings` in writeback mode.
fn open_wb(cache: &Arc<dyn BlockDev>, backings: &[Arc<dyn BlockDev>]) -> CacheSet {
    let set = CacheSet::open(Arc::clone(cache), backings, tiny_config(CacheMode::Writeback)).unwrap();
    set.set_sequential_cutoff(0);
    set
}

/// Writes `model` whole through `dev`.
fn write_model(dev: &dyn BlockDev, model: &[u8]) {
    dev.write_at(model, 0).unwrap();
}

fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut all = vec![0u8; EXPORT_BYTES];
    dev.read_at(&mut all, 0).unwrap();
    all
}

/// Regression: a device detached before a restart could not be attached again — `open`
/// refused it ("belongs to cache set 00000000-...") so `ubcache serve` would not start. Now it
/// is served straight from the device, attaches with an empty cache for it, and stays attached
/// over the next restart.
#[test]
fn a_device_detached_before_a_restart_is_served_alone_then_attaches_and_stays_attached() {
    let cache = Arc::new(MemDev::new(CACHE_BYTES));
    let backing = Arc::new(MemDev::new(DATA_OFFSET + EXPORT_BYTES as u64));
    let (c, b) = (dynd(&cache), dynd(&backing));
    ubcache::cache::format(&c, std::slice::from_ref(&b), TINY).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut model = vec![0u8; EXPORT_BYTES];
    let set = open_wb(&c, std::slice::from_ref(&b));
    workload(&set.device(0).unwrap(), &mut model, &mut rng, 60);
    set.detach(0).unwrap();
    set.close().unwrap();
    write_alone(backing.as_ref(), &mut model, &mut rng);
    let sb_before = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    assert_eq!(sb_before.state, BackingState::Detached);
    // The offline check (`ubcache check` with serve's command line) accepts it, with a note.
    let report = ubcache::check::check(&c, std::slice::from_ref(&b)).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.warnings.iter().any(|w| w.contains("detached")), "{:?}", report.warnings);

    // Restart: served alone (straight from the device), nothing cached, superblock untouched.
    let set = open_wb(&c, std::slice::from_ref(&b));
    let dev = set.devices().remove(0);
    assert!(dev.is_detached(), "a Detached device opens as a detached export");
    assert_eq!(dev.dev_id(), 0, "the lowest id the cache superblock does not list");
    assert!(read_all(&dev) == model);
    workload(&dev, &mut model, &mut rng, 20);
    assert!(backing_data(backing.as_ref()) == model, "detached writes go straight to the device");
    let s = set.stats();
    assert_eq!((s.write_cached, s.read_hits, s.read_misses, s.dirty_bytes), (0, 0, 0, 0), "nothing cached");
    assert_eq!(read_backing_superblock(backing.as_ref()).unwrap().unwrap(), sb_before, "open wrote it");
    assert!(read_cache_superblock(cache.as_ref()).unwrap().sb.backing.is_empty());
    assert!(matches!(set.detach(0), Err(ubcache::cache::CacheError::Invalid(_))), "already detached");

    set.attach(0).unwrap();
    assert!(!dev.is_detached());
    let sb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    assert_eq!((sb.state, sb.set_uuid, sb.uuid), (BackingState::Clean, set.uuid(), sb_before.uuid));
    let listed = read_cache_superblock(cache.as_ref()).unwrap().sb.backing;
    assert_eq!(listed.iter().map(|e| (e.uuid, e.dev_id)).collect::<Vec<_>>(), [(sb.uuid, 0)]);
    assert!(read_all(&dev) == model, "reads the data written while detached");
    assert_eq!(set.stats().read_hits, 0, "the cache starts empty for it");
    workload(&dev, &mut model, &mut rng, 30);
    assert!(set.stats().write_cached >= 30, "writes are cached after attach");
    assert!(set.stats().dirty_bytes > 0);
    assert!(set.check().unwrap().problems.is_empty());
    set.close().unwrap();

    // The next restart finds it attached, with its dirty data.
    let set = open_wb(&c, std::slice::from_ref(&b));
    let dev = set.device(0).unwrap();
    assert!(!dev.is_detached());
    assert!(set.stats().dirty_bytes > 0);
    assert!(read_all(&dev) == model);
    assert!(set.stats().read_hits > 0, "served through the cache");
    set.write_back_all().unwrap();
    assert!(backing_data(backing.as_ref()) == model);
}

/// Keys carry only a dev id: a detached device must never be given the id of a registered
/// device that is absent now but still has (dirty) data in the cache, or attaching it would
/// serve that device's data as its own — and writeback would write it onto the wrong disk.
#[test]
fn a_device_detached_before_a_restart_never_takes_the_dev_id_of_a_registered_device() {
    let cache = Arc::new(MemDev::new(CACHE_BYTES));
    let b0 = Arc::new(MemDev::new(DATA_OFFSET + EXPORT_BYTES as u64));
    let b1 = Arc::new(MemDev::new(DATA_OFFSET + EXPORT_BYTES as u64));
    let c = dynd(&cache);
    ubcache::cache::format(&c, &[dynd(&b0), dynd(&b1)], TINY).unwrap();
    let mut rng = StdRng::seed_from_u64(12);
    let (mut model0, mut model1) = (vec![0u8; EXPORT_BYTES], vec![0u8; EXPORT_BYTES]);
    rng.fill(&mut model0[..]);
    rng.fill(&mut model1[..]);
    let set = open_wb(&c, &[dynd(&b0), dynd(&b1)]);
    write_model(&set.device(0).unwrap(), &model0);
    write_model(&set.device(1).unwrap(), &model1);
    set.sync().unwrap();
    set.detach(1).unwrap();
    // Detach wrote everything home: dirty dev 0 again.
    rng.fill(&mut model0[..]);
    write_model(&set.device(0).unwrap(), &model0);
    set.sync().unwrap();
    assert!(set.stats().dirty_bytes > 0, "dev 0 keeps dirty data in the cache");
    set.close().unwrap();
    write_alone(b1.as_ref(), &mut model1, &mut rng);

    // Restart with the detached device alone (the registered dev 0 is absent).
    let set = open_wb(&c, &[dynd(&b1)]);
    let dev = set.devices().remove(0);
    assert!(dev.is_detached());
    assert_ne!(dev.dev_id(), 0, "dev id 0 is still registered (and has dirty keys)");
    assert!(read_all(&dev) == model1);
    set.attach(dev.dev_id()).unwrap();
    assert!(read_all(&dev) == model1, "attached, it reads its own data, not dev 0's");
    workload(&dev, &mut model1, &mut rng, 20);
    set.close().unwrap();

    // Both together: each reads its own data, dev 0's dirty data intact.
    let set = open_wb(&c, &[dynd(&b0), dynd(&b1)]);
    let devs = set.devices();
    assert!(devs.iter().all(|d| !d.is_detached()));
    assert!(read_all(&devs[0]) == model0, "dev 0's dirty data survives");
    assert!(read_all(&devs[1]) == model1);
    assert!(set.check().unwrap().problems.is_empty());
    set.write_back_all().unwrap();
    assert!(backing_data(b0.as_ref()) == model0 && backing_data(b1.as_ref()) == model1);
}

/// A device bound to another cache set is refused with an error naming that set, and nothing
/// is written to it: it must never be silently re-bound (its own cache may hold its data).
#[test]
fn a_device_bound_to_another_cache_set_is_refused_and_left_untouched() {
    let cache = Arc::new(MemDev::new(CACHE_BYTES));
    let other_cache = Arc::new(MemDev::new(CACHE_BYTES));
    let backing = Arc::new(MemDev::new(DATA_OFFSET + EXPORT_BYTES as u64));
    let (c, b) = (dynd(&cache), dynd(&backing));
    ubcache::cache::format(&c, std::slice::from_ref(&b), TINY).unwrap();
    let set = open_wb(&c, std::slice::from_ref(&b));
    set.detach(0).unwrap();
    set.close().unwrap();
    // Bound to another set (formatted there), with dirty data in that cache.
    let other = ubcache::cache::format(&dynd(&other_cache), std::slice::from_ref(&b), TINY).unwrap();
    let other_set = open_wb(&dynd(&other_cache), std::slice::from_ref(&b));
    other_set.device(0).unwrap().write_at(&[0xabu8; BLOCK], 0).unwrap();
    other_set.sync().unwrap();
    drop(other_set);
    let sb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    assert_eq!((sb.state, sb.set_uuid), (BackingState::Dirty, other));

    let mut image = vec![0u8; DATA_OFFSET as usize];
    backing.read_at(&mut image, 0).unwrap();
    let cache_sb = read_cache_superblock(cache.as_ref()).unwrap().sb;
    let err = CacheSet::open(Arc::clone(&c), std::slice::from_ref(&b), tiny_config(CacheMode::Writeback))
        .unwrap_err()
        .to_string();
    assert!(err.contains("belongs to cache set") && err.contains(&other.to_string()), "{err}");
    let mut after = vec![0u8; DATA_OFFSET as usize];
    backing.read_at(&mut after, 0).unwrap();
    assert!(after == image, "the refused device's superblock was written");
    assert_eq!(read_cache_superblock(cache.as_ref()).unwrap().sb, cache_sb);
}

/// A superblock that says Detached while the cache holds dirty data of its dev id (damage, or
/// a hand edit: detach writes everything home before it marks the device Detached) is refused:
/// served alone it would lose that data, attached it would drop it.
#[test]
fn a_detached_superblock_with_dirty_data_in_the_cache_is_refused() {
    let cache = Arc::new(MemDev::new(CACHE_BYTES));
    let backing = Arc::new(MemDev::new(DATA_OFFSET + EXPORT_BYTES as u64));
    let (c, b) = (dynd(&cache), dynd(&backing));
    ubcache::cache::format(&c, std::slice::from_ref(&b), TINY).unwrap();
    let set = open_wb(&c, std::slice::from_ref(&b));
    workload(&set.device(0).unwrap(), &mut vec![0u8; EXPORT_BYTES], &mut StdRng::seed_from_u64(13), 20);
    set.sync().unwrap();
    assert!(set.stats().dirty_bytes > 0);
    drop(set);
    let mut sb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    sb.state = BackingState::Detached;
    sb.set_uuid = format::Uuid::NIL;
    sb.seq += 1;
    format::write_backing_superblock(backing.as_ref(), &sb).unwrap();
    let report = ubcache::check::check(&c, std::slice::from_ref(&b)).unwrap();
    assert!(report.has(ProblemKind::BackingStateMismatch), "{:?}", report.problems);
    let err = CacheSet::open(c, &[b], tiny_config(CacheMode::Writeback)).unwrap_err().to_string();
    assert!(err.contains("dirty sectors"), "{err}");
}

/// The state a restart finds: a set with a workload written, the device detached, written
/// alone, and the server stopped cleanly; on fresh SimDevs holding the durable images.
fn prepared_detached_restart(seed: u64) -> (Arc<SimDev>, Arc<SimDev>, Vec<u8>) {
    let (cache, backing, mut model) = prepared(seed);
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
    set.detach(0).unwrap();
    set.close().unwrap();
    write_alone(backing.as_ref(), &mut model, &mut StdRng::seed_from_u64(seed ^ 0xa77));
    (
        Arc::new(SimDev::from_image(cache.durable_image())),
        Arc::new(SimDev::from_image(backing.durable_image())),
        model,
    )
}

/// After the restart: opens the set with the detached device, writes through the detached
/// export (straight to the device, FLUSHed), then attaches with the cut armed. Returns whether
/// the attach completed.
fn run_attach_after_restart(cache: &Arc<SimDev>, backing: &Arc<SimDev>, model: &mut [u8], cut: Cut) -> bool {
    let set = CacheSet::open(dynd(cache), &[dynd(backing)], tiny_config(CacheMode::Writeback)).unwrap();
    let dev = set.devices().remove(0);
    assert!(dev.is_detached());
    let data = vec![0x3cu8; BLOCK];
    dev.write_at(&data, 5 * BLOCK as u64).unwrap();
    dev.sync().unwrap();
    model[5 * BLOCK..6 * BLOCK].copy_from_slice(&data);
    cut.arm(cache, backing);
    let done = set.attach(dev.dev_id()).is_ok();
    cache.crash_now();
    backing.crash_now();
    done
}

#[test]
fn power_loss_during_attach_after_a_restart_leaves_it_detached_or_attached_and_consistent() {
    let (mut detached, mut attached) = (0, 0);
    for seed in 0..2u64 {
        // Count the attach's own I/O: run once uncut.
        let (cache, backing, _) = prepared_detached_restart(seed);
        let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
        let (c0, b0) = (cache.stats(), backing.stats());
        set.attach(set.devices()[0].dev_id()).unwrap();
        let (c1, b1) = (cache.stats(), backing.stats());
        drop(set);
        let (d, a) = sweep_attach_cuts(&format!("restart seed {seed}"), (c0, c1), (b0, b1), seed, |cut| {
            let (cache, backing, mut model) = prepared_detached_restart(seed);
            let completed = run_attach_after_restart(&cache, &backing, &mut model, cut);
            (cache, backing, model, completed)
        });
        detached += d;
        attached += a;
    }
    eprintln!("attach-after-restart crash states: {detached} detached, {attached} attached");
    assert!(detached > 10 && attached > 10, "both outcomes must occur: {detached} / {attached}");
}

/// Writes a detached export took without a FLUSH must be durable once a FLUSH through the
/// cache is acknowledged after the attach: that FLUSH syncs backing only for writes that went
/// through the cache, so attach itself must make the detached writes durable.
#[test]
fn writes_taken_while_detached_are_durable_after_attach_and_a_flush() {
    let (cache, backing, mut model) = prepared_detached_restart(21);
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
    let dev = set.devices().remove(0);
    assert!(dev.is_detached());
    let data = vec![0x77u8; 3 * BLOCK];
    dev.write_at(&data, 9 * BLOCK as u64).unwrap(); // acknowledged, not FLUSHed
    model[9 * BLOCK..12 * BLOCK].copy_from_slice(&data);
    set.attach(dev.dev_id()).unwrap();
    dev.sync().unwrap(); // the client's FLUSH, now through the cache
    cache.crash_now();
    backing.crash_now();
    let state = verify(
        cache.crash_image(&CrashMode::DropAll),
        backing.crash_image(&CrashMode::DropAll),
        &model,
        "flush after attach",
    );
    assert_eq!(state, State::Attached);
}
