//! Crash atomicity of the backing superblock rewrite.
//!
//! Regression guard for a bug in the first backing superblock layout: it was one 4 KiB copy
//! with the fields in its first sector and the crc in its last, rewritten in place on every
//! Clean <-> Dirty change. A power loss that persisted some sectors of that write but not
//! others paired new fields with an old crc, and the backing device could no longer be opened.
//!
//! Every test here crashes a [`write_backing_superblock`] at each point (after each write,
//! at each sync, after it returned) and, for each frozen state, looks at every fate the
//! unsynced write can have in the [`SimDev`] model (dropped, kept, any subset of its sectors
//! persisted), then asserts that the superblock reads back as exactly the old or the new one,
//! and as the new one whenever the write had returned `Ok`. The data area behind the header
//! is never touched.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ubcache::dev::{BlockDev, CrashMode, MemDev, SimDev, WriteFate};
use ubcache::format::{
    self, BACKING_DATA_OFFSET_BYTES, BackingSbCopy, BackingState, BackingSuperblock, StoredCacheMode, Uuid,
};

const DEV_BYTES: u64 = 64 * 1024;
const SECTOR: usize = 512;

/// The superblock a raw device "had" before its first format: none.
type Before = Option<BackingSuperblock>;

/// A device whose data area holds a recognisable pattern, so a test can show the header
/// writes never reach it.
fn data_pattern() -> Vec<u8> {
    (0..DEV_BYTES - BACKING_DATA_OFFSET_BYTES).map(|i| (i % 251) as u8 ^ 0x5a).collect()
}

/// A durable device holding `before` (written through the real writer and synced) and the
/// data pattern.
fn device_with(before: &Before) -> SimDev {
    let dev = SimDev::new(DEV_BYTES);
    dev.write_at(&data_pattern(), BACKING_DATA_OFFSET_BYTES).unwrap();
    if let Some(sb) = before {
        format::write_backing_superblock(&dev, sb).unwrap();
    }
    dev.sync().unwrap();
    assert_eq!(dev.unsynced_write_count(), 0);
    dev
}

fn attached(state: BackingState, set: Uuid, seq: u64) -> BackingSuperblock {
    let mut sb = BackingSuperblock::new(Uuid([7; 16]), DEV_BYTES).unwrap();
    sb.state = state;
    sb.set_uuid = set;
    sb.seq = seq;
    sb.cache_mode = StoredCacheMode::Writeback;
    sb
}

/// Where the power is cut during one `write_backing_superblock` (2 writes, 2 syncs).
#[derive(Debug, Clone, Copy)]
enum CutPoint {
    AfterWrite(u64),
    AtSync(u64),
    /// After the call returned.
    Never,
}

const CUT_POINTS: [CutPoint; 5] = [
    CutPoint::AfterWrite(1),
    CutPoint::AtSync(1),
    CutPoint::AfterWrite(2),
    CutPoint::AtSync(2),
    CutPoint::Never,
];

/// Runs the rewrite on a fresh device holding `before`, cut at `cut`. Returns the frozen
/// device and whether the writer reported success.
fn rewrite_cut(before: &Before, after: &BackingSuperblock, cut: CutPoint) -> (SimDev, bool) {
    let dev = device_with(before);
    match cut {
        CutPoint::AfterWrite(n) => dev.set_crash_after_writes(n),
        CutPoint::AtSync(n) => dev.set_crash_at_sync(n),
        CutPoint::Never => {}
    }
    let result = format::write_backing_superblock(&dev, after);
    if !matches!(cut, CutPoint::Never) {
        assert!(result.is_err(), "{cut:?}: the writer must fail once the device died, not claim durability");
    }
    (dev, result.is_ok())
}

/// Reads the crash image and asserts it holds exactly `before` or `after` (and `after` when
/// `must_be_new`, e.g. the write had been acknowledged), with the data area intact. Returns
/// which one it was.
fn check_image(
    image: Vec<u8>,
    before: &Before,
    after: &BackingSuperblock,
    must_be_new: bool,
    what: &str,
) -> bool {
    let dev = MemDev::from_bytes(image);
    let got = format::read_backing_superblock(&dev)
        .unwrap_or_else(|e| panic!("{what}: the backing superblock must stay readable, got {e}"));
    let is_new = got.as_ref() == Some(after);
    assert!(
        is_new || got == *before,
        "{what}: read {got:?}, neither the old {before:?} nor the new {after:?}"
    );
    assert!(
        !must_be_new || is_new,
        "{what}: copy A was durable (or the write returned Ok) but the old superblock is read"
    );
    let mut data = vec![0u8; (DEV_BYTES - BACKING_DATA_OFFSET_BYTES) as usize];
    dev.read_at(&mut data, BACKING_DATA_OFFSET_BYTES).unwrap();
    assert!(data == data_pattern(), "{what}: a superblock write reached the data area");
    is_new
}

/// Every image a crash of `dev` can leave: its one unsynced write (the writer syncs after each
/// copy, so there is never more than one) dropped, kept, or persisted as any subset of its
/// sectors, built directly from the durable image and the write's bytes; plus the
/// `CrashMode::Explicit` prefixes as SimDev produces them.
fn every_crash_image(dev: &SimDev) -> Vec<(String, Vec<u8>)> {
    let durable = dev.durable_image();
    let live = dev.live_image();
    let writes = dev.unsynced_writes();
    assert!(writes.len() <= 1, "the writer left {} writes unsynced at once", writes.len());
    let mut images = vec![("durable".to_string(), durable.clone())];
    if let Some(w) = writes.first() {
        assert_eq!(w.offset % SECTOR as u64, 0);
        let sectors = w.sectors as usize;
        assert!(sectors <= 16, "a superblock copy is one small block, not {sectors} sectors");
        for mask in 0u32..(1 << sectors) {
            let mut image = durable.clone();
            for s in 0..sectors {
                if mask & (1 << s) != 0 {
                    let at = w.offset as usize + s * SECTOR;
                    image[at..at + SECTOR].copy_from_slice(&live[at..at + SECTOR]);
                }
            }
            images.push((format!("write at {} sectors {mask:#b}", w.offset), image));
        }
        for n in 0..=w.sectors {
            let fates = vec![WriteFate::KeepSectors(n)];
            images.push((format!("KeepSectors({n})"), dev.crash_image(&CrashMode::Explicit(fates))));
        }
        images.push(("Keep".into(), dev.crash_image(&CrashMode::Explicit(vec![WriteFate::Keep]))));
    }
    images
}

/// Crashes the rewrite `before -> after` at every cut point with every fate; returns how many
/// images read the old and the new state.
fn crash_everywhere(before: &Before, after: &BackingSuperblock) -> (usize, usize) {
    let (mut old, mut new) = (0, 0);
    for cut in CUT_POINTS {
        let (dev, acked) = rewrite_cut(before, after, cut);
        // Once the first sync returned, copy A holds the new superblock durably and copy B is
        // at most as new: the new one is in force from then on, before the call returns.
        let copy_a_durable = acked || matches!(cut, CutPoint::AfterWrite(2) | CutPoint::AtSync(2));
        for (fate, image) in every_crash_image(&dev) {
            let what = format!("{before:?} -> {after:?}, cut {cut:?}, {fate}");
            if check_image(image, before, after, copy_a_durable, &what) {
                new += 1;
            } else {
                old += 1;
            }
        }
    }
    (old, new)
}

#[test]
fn clean_to_dirty_crashed_anywhere_reads_old_or_new() {
    let set = Uuid([3; 16]);
    let before = attached(BackingState::Clean, set, 41);
    let after = attached(BackingState::Dirty, set, 42);
    let (old, new) = crash_everywhere(&Some(before), &after);
    // Both outcomes must really occur, or the harness is not crashing inside the write.
    assert!(old > 0 && new > 0, "old {old} new {new}");
}

#[test]
fn dirty_to_clean_crashed_anywhere_reads_old_or_new() {
    let set = Uuid([3; 16]);
    let before = attached(BackingState::Dirty, set, 9);
    let mut after = attached(BackingState::Clean, set, 10);
    after.cache_mode = StoredCacheMode::Writethrough;
    let (old, new) = crash_everywhere(&Some(before), &after);
    assert!(old > 0 && new > 0, "old {old} new {new}");
}

#[test]
fn detach_crashed_anywhere_reads_old_or_new() {
    let before = attached(BackingState::Clean, Uuid([3; 16]), 5);
    let mut after = before.clone();
    after.state = BackingState::Detached;
    after.set_uuid = Uuid::NIL;
    after.seq += 1;
    let (old, new) = crash_everywhere(&Some(before), &after);
    assert!(old > 0 && new > 0, "old {old} new {new}");
}

/// The first superblock on a raw device: a crash reads as still raw (`None`) or formatted,
/// never as an unreadable device.
#[test]
fn first_format_crashed_anywhere_reads_raw_or_formatted() {
    let after = attached(BackingState::Clean, Uuid([3; 16]), 1);
    let (old, new) = crash_everywhere(&None, &after);
    assert!(old > 0 && new > 0, "old {old} new {new}");
}

/// Reformatting a device that was a backing device before: the new superblock starts again at
/// seq 1 with a new uuid while the leftover copy B has a high seq. A crash between the two
/// copies must not resurrect the old incarnation once copy A durably holds the new one
/// (checked by `crash_everywhere`), and must read as one of the two.
#[test]
fn reformat_with_new_uuid_crashed_anywhere_reads_old_or_new() {
    let old_incarnation = attached(BackingState::Dirty, Uuid([1; 16]), 1_000_000);
    let mut after = BackingSuperblock::new(Uuid([9; 16]), DEV_BYTES).unwrap();
    after.state = BackingState::Clean;
    after.set_uuid = Uuid([2; 16]);
    let (old, new) = crash_everywhere(&Some(old_incarnation), &after);
    assert!(old > 0 && new > 0, "old {old} new {new}");
}

/// `CrashMode::TornRandom` over many seeds at every cut point of a Clean -> Dirty -> Clean
/// cycle, each step starting from the previous crash image (so a rewrite also starts from a
/// device whose two copies differ after an earlier interrupted rewrite).
#[test]
fn torn_random_chains_of_rewrites_always_read_old_or_new() {
    let set = Uuid([4; 16]);
    let mut rng = StdRng::seed_from_u64(0xb5b_0001);
    let (mut old, mut new, mut differing_starts) = (0, 0, 0);
    for chain in 0..60u64 {
        let mut image = {
            let dev = device_with(&Some(attached(BackingState::Clean, set, 1)));
            dev.durable_image()
        };
        for step in 0..12 {
            let start = SimDev::from_image(image.clone());
            let read = format::read_backing_superblock_copies(&start).unwrap().unwrap();
            if !read.copies_identical {
                differing_starts += 1;
            }
            let before = read.sb;
            let mut after = before.clone();
            after.state =
                if before.state == BackingState::Clean { BackingState::Dirty } else { BackingState::Clean };
            after.seq += 1;
            let cut = CUT_POINTS[rng.gen_range(0..CUT_POINTS.len())];
            match cut {
                CutPoint::AfterWrite(n) => start.set_crash_after_writes(n),
                CutPoint::AtSync(n) => start.set_crash_at_sync(n),
                CutPoint::Never => {}
            }
            let acked = format::write_backing_superblock(&start, &after).is_ok();
            let seed = rng.r#gen::<u64>();
            let next = start.crash_image(&CrashMode::TornRandom { seed });
            let what = format!("chain {chain} step {step} cut {cut:?} seed {seed:#x}");
            if check_image(next.clone(), &Some(before), &after, acked, &what) {
                new += 1;
            } else {
                old += 1;
            }
            image = next;
        }
    }
    assert!(old > 50 && new > 50, "old {old} new {new}: both outcomes must occur");
    assert!(differing_starts > 0, "no rewrite started from differing copies");
}

/// After an interrupted rewrite leaves copy A new and copy B old, the reader says so, and the
/// next completed write restores two identical copies.
#[test]
fn interrupted_rewrite_is_reported_and_repaired_by_the_next_write() {
    let set = Uuid([5; 16]);
    let before = attached(BackingState::Clean, set, 7);
    let after = attached(BackingState::Dirty, set, 8);
    let (dev, _) = rewrite_cut(&Some(before), &after, CutPoint::AfterWrite(2));
    // Copy A durable and new, copy B's write dropped.
    let image = dev.crash_image(&CrashMode::DropAll);
    let dev = SimDev::from_image(image);
    let read = format::read_backing_superblock_copies(&dev).unwrap().unwrap();
    assert_eq!(read.sb, after);
    assert_eq!(read.copy, BackingSbCopy::A);
    assert!(read.other_copy_error.is_none());
    assert!(!read.copies_identical);

    let mut next = after;
    next.state = BackingState::Clean;
    next.seq += 1;
    format::write_backing_superblock(&dev, &next).unwrap();
    let read = format::read_backing_superblock_copies(&dev).unwrap().unwrap();
    assert_eq!(read.sb, next);
    assert!(read.copies_identical);
    assert_eq!(dev.stats().syncs, 2, "one sync per copy");
}
