//! SimDev's crash model, checked against an independent model of durable and live state.
//!
//! These invariants are what every crash test of the cache relies on: if SimDev kept unsynced
//! writes it should drop, or lost synced ones, the cache's crash tests would prove nothing.

use proptest::prelude::*;
use std::sync::Arc;
use ubcache::dev::{BlockDev, CrashMode, DevError, SECTOR_SIZE, SimDev, WriteFate};

const DEV_LEN: u64 = 64 * 1024;
const SECTOR: usize = SECTOR_SIZE as usize;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, byte: u8 },
    Fua { offset: u64, len: u64, byte: u8 },
    Zero { offset: u64, len: u64 },
    Sync,
}

/// Ops at arbitrary byte offsets and lengths (so writes straddle sector boundaries).
fn arb_op(aligned: bool) -> impl Strategy<Value = Op> {
    let unit = if aligned { SECTOR_SIZE } else { 1 };
    let max_units = DEV_LEN / unit;
    let extent = (0..max_units, 1..=(8 * SECTOR_SIZE / unit)).prop_map(move |(start, n)| {
        let offset = start * unit;
        (offset, (n * unit).min(DEV_LEN - offset))
    });
    prop_oneof![
        6 => (extent.clone(), 1..=255u8).prop_map(|((offset, len), byte)| Op::Write { offset, len, byte }),
        1 => (extent.clone(), 1..=255u8).prop_map(|((offset, len), byte)| Op::Fua { offset, len, byte }),
        1 => extent.prop_map(|(offset, len)| Op::Zero { offset, len }),
        2 => Just(Op::Sync),
    ]
}

/// A straightforward model: the durable image, and the unsynced writes as full images of the
/// bytes they set.
#[derive(Debug)]
struct Model {
    durable: Vec<u8>,
    live: Vec<u8>,
    /// (offset, bytes, fua) per unsynced write, in order.
    unsynced: Vec<(u64, Vec<u8>, bool)>,
}

impl Model {
    fn new() -> Self {
        Self { durable: vec![0; DEV_LEN as usize], live: vec![0; DEV_LEN as usize], unsynced: Vec::new() }
    }

    fn apply(&mut self, dev: &SimDev, op: &Op) {
        let (offset, bytes, fua) = match *op {
            Op::Write { offset, len, byte } => {
                dev.write_at(&vec![byte; len as usize], offset).unwrap();
                (offset, vec![byte; len as usize], false)
            }
            Op::Fua { offset, len, byte } => {
                dev.write_at_fua(&vec![byte; len as usize], offset).unwrap();
                (offset, vec![byte; len as usize], true)
            }
            Op::Zero { offset, len } => {
                dev.write_zeroes(offset, len, true).unwrap();
                (offset, vec![0; len as usize], false)
            }
            Op::Sync => {
                dev.sync().unwrap();
                for (offset, bytes, _) in self.unsynced.drain(..) {
                    self.durable[offset as usize..][..bytes.len()].copy_from_slice(&bytes);
                }
                return;
            }
        };
        self.live[offset as usize..][..bytes.len()].copy_from_slice(&bytes);
        self.unsynced.push((offset, bytes, fua));
    }

    /// The durable image plus FUA writes, replayed in order.
    fn drop_all(&self) -> Vec<u8> {
        let mut image = self.durable.clone();
        for (offset, bytes, fua) in &self.unsynced {
            if *fua {
                image[*offset as usize..][..bytes.len()].copy_from_slice(bytes);
            }
        }
        image
    }
}

fn run(ops: &[Op]) -> (SimDev, Model) {
    let dev = SimDev::new(DEV_LEN);
    let mut model = Model::new();
    for op in ops {
        model.apply(&dev, op);
    }
    (dev, model)
}

fn read_all(dev: &SimDev) -> Vec<u8> {
    let mut buf = vec![0; DEV_LEN as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// KeepAll equals the live state; DropAll equals the last synced state plus FUA writes; and
    /// after a sync every mode returns exactly the synced data.
    #[test]
    fn keep_all_is_live_and_drop_all_is_synced(ops in prop::collection::vec(arb_op(false), 1..40)) {
        let (dev, model) = run(&ops);
        prop_assert_eq!(&read_all(&dev), &model.live);
        prop_assert_eq!(&dev.crash_image(&CrashMode::KeepAll), &model.live);
        prop_assert_eq!(dev.crash_image(&CrashMode::DropAll), model.drop_all());
        prop_assert_eq!(dev.durable_image(), model.drop_all());
        dev.sync().unwrap();
        for mode in [CrashMode::DropAll, CrashMode::KeepAll, CrashMode::Random { seed: 7 },
                     CrashMode::TornRandom { seed: 7 }, CrashMode::KeepFirst(0)] {
            prop_assert_eq!(dev.crash_image(&mode), model.live.clone());
        }
    }

    /// Byte level, for arbitrary (unaligned) writes: every byte of a torn crash image is its
    /// durable value or a value some unsynced write put there, and FUA data always survives.
    #[test]
    fn torn_images_hold_only_old_or_written_bytes(
        ops in prop::collection::vec(arb_op(false), 1..40),
        seed in any::<u64>(),
    ) {
        let (dev, model) = run(&ops);
        let image = dev.crash_image(&CrashMode::TornRandom { seed });
        for (i, &b) in image.iter().enumerate() {
            let i = i as u64;
            let written = model.unsynced.iter().any(|(off, bytes, _)| {
                i >= *off && i < off + bytes.len() as u64 && bytes[(i - off) as usize] == b
            });
            prop_assert!(b == model.durable[i as usize] || written, "byte {} = {} came from nowhere", i, b);
        }
        // Same seed, same image: crash states are reproducible from the seed alone.
        prop_assert_eq!(dev.crash_image(&CrashMode::TornRandom { seed }), image);
    }

    /// Sector level, for sector-aligned writes: each sector of a torn image is wholly its durable
    /// contents or wholly the contents one unsynced write gave it — never a mix.
    #[test]
    fn torn_sectors_are_old_or_new_never_mixed(
        ops in prop::collection::vec(arb_op(true), 1..40),
        seed in any::<u64>(),
    ) {
        let (dev, model) = run(&ops);
        let image = dev.crash_image(&CrashMode::TornRandom { seed });
        for (s, sector) in image.chunks(SECTOR).enumerate() {
            let start = (s * SECTOR) as u64;
            let old = &model.durable[s * SECTOR..][..SECTOR];
            let ok = sector == old || model.unsynced.iter().any(|(off, bytes, _)| {
                start >= *off && start < off + bytes.len() as u64
                    && sector == &bytes[(start - off) as usize..][..SECTOR]
            });
            prop_assert!(ok, "sector {} is neither old nor any write's new contents", s);
        }
    }

    /// Random (non-torn) mode keeps or drops each write whole: a write no other unsynced write
    /// overlaps reads back as all its new bytes or all the old ones.
    #[test]
    fn random_mode_never_tears(ops in prop::collection::vec(arb_op(true), 1..30), seed in any::<u64>()) {
        let (dev, model) = run(&ops);
        let image = dev.crash_image(&CrashMode::Random { seed });
        for (index, (off, bytes, _)) in model.unsynced.iter().enumerate() {
            let end = off + bytes.len() as u64;
            let overlapped = model.unsynced.iter().enumerate()
                .any(|(i2, (o2, b2, _))| i2 != index && *o2 < end && o2 + b2.len() as u64 > *off);
            if overlapped || bytes.is_empty() {
                continue;
            }
            let region = &image[*off as usize..end as usize];
            let old = &model.durable[*off as usize..end as usize];
            prop_assert!(region == &bytes[..] || region == old, "write {} was torn in Random mode", index);
        }
    }
}

/// A harness pattern: crash after every possible number of writes, and check the frozen state.
#[test]
fn crash_after_each_write_freezes_exactly_that_prefix() {
    let ops: Vec<Op> = (0..12u8)
        .map(|i| {
            if i % 4 == 3 {
                Op::Sync
            } else {
                Op::Write { offset: u64::from(i) * 700, len: 900, byte: i + 1 }
            }
        })
        .collect();
    let write_count = ops.iter().filter(|op| !matches!(op, Op::Sync)).count() as u64;
    for crash_after in 0..=write_count {
        let dev = SimDev::new(DEV_LEN);
        dev.set_crash_after_writes(crash_after);
        let mut model = Model::new();
        let mut completed_writes = 0;
        for op in &ops {
            if dev.is_dead() {
                let result = match op {
                    Op::Sync => dev.sync(),
                    _ => dev.write_at(&[0xee; 10], 0),
                };
                assert!(matches!(result, Err(DevError::Io { .. })), "a dead device accepted {op:?}");
                continue;
            }
            model.apply(&dev, op);
            if !matches!(op, Op::Sync) {
                completed_writes += 1;
            }
        }
        assert_eq!(completed_writes, crash_after);
        assert_eq!(dev.crash_image(&CrashMode::KeepAll), model.live);
        assert_eq!(dev.crash_image(&CrashMode::DropAll), model.drop_all());
        // Restart from the crash image: a fresh device that holds it durably.
        let restarted = SimDev::from_image(dev.crash_image(&CrashMode::DropAll));
        assert_eq!(read_all(&restarted), model.drop_all());
    }
}

/// Crashing at each sync: the sync fails, and what it would have persisted stays unsynced.
#[test]
fn crash_at_each_sync_keeps_the_previous_sync_point() {
    for crash_sync in 1..=3u64 {
        let dev = SimDev::new(DEV_LEN);
        dev.set_crash_at_sync(crash_sync);
        let mut synced_rounds = 0u64;
        for round in 0..3u8 {
            dev.write_at(&[round + 1; 1024], u64::from(round) * 1024).unwrap();
            if dev.sync().is_err() {
                break;
            }
            synced_rounds += 1;
        }
        assert_eq!(synced_rounds, crash_sync - 1);
        assert!(dev.is_dead());
        let image = dev.crash_image(&CrashMode::DropAll);
        for round in 0..3u64 {
            let expected = if round < synced_rounds { round as u8 + 1 } else { 0 };
            assert_eq!(image[(round * 1024) as usize], expected, "crash at sync {crash_sync}, round {round}");
        }
        // The write before the failed sync is still at the crash mode's mercy.
        let kept = dev.crash_image(&CrashMode::KeepAll);
        assert_eq!(kept[(synced_rounds * 1024) as usize], synced_rounds as u8 + 1);
    }
}

/// KeepSectors(n) keeps exactly the first n sectors a write touches.
#[test]
fn explicit_fates_are_applied_in_write_order() {
    let dev = SimDev::new(DEV_LEN);
    dev.write_at(&[1; 2048], 0).unwrap();
    dev.write_at(&[2; 512], 512).unwrap();
    dev.write_at(&[3; 100], 4096).unwrap();
    let image = dev.crash_image(&CrashMode::Explicit(vec![
        WriteFate::KeepSectors(3),
        WriteFate::Drop,
        WriteFate::Keep,
    ]));
    assert!(image[..1536].iter().all(|&b| b == 1));
    assert!(image[1536..2048].iter().all(|&b| b == 0));
    assert!(image[4096..4196].iter().all(|&b| b == 3));
    // Later write over an earlier one wins when both are kept.
    let both = dev.crash_image(&CrashMode::KeepFirst(2));
    assert!(both[512..1024].iter().all(|&b| b == 2));
    assert!(both[4096..4196].iter().all(|&b| b == 0));
}

/// Different seeds really produce different crash states (a constant generator would make a
/// crash harness explore one state only).
#[test]
fn seeds_explore_different_states() {
    let dev = SimDev::new(DEV_LEN);
    for i in 0..16u8 {
        dev.write_at(&[i + 1; 2048], u64::from(i) * 2048).unwrap();
    }
    let images: std::collections::HashSet<Vec<u8>> =
        (0..32).map(|seed| dev.crash_image(&CrashMode::TornRandom { seed })).collect();
    assert!(images.len() > 16, "only {} distinct images from 32 seeds", images.len());
}

/// Concurrent writers and syncs: nothing is lost, reads never see another thread's range.
#[test]
fn concurrent_writers_and_syncs() {
    let dev = Arc::new(SimDev::new(DEV_LEN));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let base = u64::from(t) * (DEV_LEN / 4);
                for i in 0..200u64 {
                    let off = base + (i * 512) % (DEV_LEN / 4);
                    dev.write_at(&[t + 1; 512], off).unwrap();
                    let mut back = [0; 512];
                    dev.read_at(&mut back, off).unwrap();
                    assert_eq!(back, [t + 1; 512]);
                    if i % 17 == 0 {
                        dev.sync().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    dev.sync().unwrap();
    let image = dev.crash_image(&CrashMode::DropAll);
    for (q, quarter) in image.chunks((DEV_LEN / 4) as usize).enumerate() {
        assert!(quarter.iter().all(|&b| b == q as u8 + 1));
    }
    assert_eq!(dev.stats().writes, 800);
}

/// A toy commit protocol: record `i` is written to block `i + 1`, then block 0 (the header) is
/// set to the number of committed records. Returns how many commits were acknowledged before
/// the device died.
fn toy_commits(dev: &SimDev, records: u64, sync_between: bool) -> u64 {
    let mut acked = 0;
    for i in 0..records {
        let step = || -> Result<(), DevError> {
            dev.write_at(&[i as u8 + 1; 512], (i + 1) * 512)?;
            if sync_between {
                // The record must be durable before the header points at it.
                dev.sync()?;
            }
            dev.write_at(&(i + 1).to_le_bytes(), 0)?;
            dev.sync()
        };
        if step().is_err() {
            break;
        }
        acked = i + 1;
    }
    acked
}

/// Checks the toy contract on a crash image: every acknowledged commit is there, and the header
/// never points at a record that is not.
fn toy_contract_holds(image: &[u8], acked: u64) -> bool {
    let committed = u64::from_le_bytes(image[..8].try_into().unwrap());
    committed >= acked && (0..committed).all(|i| image[((i + 1) * 512) as usize] == i as u8 + 1)
}

/// Crashes at every sync, in many ways each, and reports whether any crash state broke the
/// contract.
fn toy_harness_finds_violation(lying_sync: bool, sync_between: bool) -> bool {
    const RECORDS: u64 = 6;
    for crash_at in 1..=(2 * RECORDS + 1) {
        let dev = SimDev::new(DEV_LEN);
        dev.set_lying_sync(lying_sync);
        dev.set_crash_at_sync(crash_at);
        let acked = toy_commits(&dev, RECORDS, sync_between);
        let mut modes = vec![CrashMode::DropAll, CrashMode::KeepAll];
        modes.extend((0..16).map(|seed| CrashMode::Random { seed }));
        modes.extend((0..16).map(|seed| CrashMode::TornRandom { seed }));
        if modes.iter().any(|m| !toy_contract_holds(&dev.crash_image(m), acked)) {
            return true;
        }
    }
    false
}

/// The crash model is strong enough to catch the two classic bugs, and a correct protocol
/// passes: a harness that catches nothing proves nothing.
#[test]
fn crash_harness_catches_broken_flush_and_missing_barrier() {
    assert!(!toy_harness_finds_violation(false, true), "a correct protocol must pass");
    assert!(toy_harness_finds_violation(true, true), "a lying FLUSH must be caught");
    assert!(toy_harness_finds_violation(false, false), "a missing write barrier must be caught");
}
