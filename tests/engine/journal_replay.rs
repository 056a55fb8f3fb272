//! Journal: append/commit/replay, group commit, ring space, torn tails and corruption.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use ubcache::dev::{BlockDev, DevError, DevResult, FileDev, FileDevOptions, MemDev};
use ubcache::format::{CheckpointEntry, JournalEntry, Key, NodePtr, Ptr, Region, TableSlot, Uuid};
use ubcache::journal::{Journal, JournalConfig, JournalError, RecoveryMode};

const DEV_BYTES: u64 = 1 << 20;
const REGION: Region = Region { offset_bytes: 64 * 1024, len_bytes: 64 * 1024 };
/// A region big enough for batches of hundreds of entries (pending is bounded to 1/32 of it).
const BIG_REGION: Region = Region { offset_bytes: 0, len_bytes: DEV_BYTES };

/// A memory device that keeps the durable image apart from writes not yet synced, so a test
/// can "crash" and keep, drop or tear the unsynced writes; it also counts syncs.
#[derive(Debug)]
struct CrashDev {
    live: MemDev,
    durable: Mutex<Vec<u8>>,
    unsynced: Mutex<Vec<(u64, Vec<u8>)>>,
    syncs: AtomicU64,
    /// Sleep this many microseconds in every sync (a slow disk makes committers overlap).
    sync_delay_us: AtomicU64,
    /// Fail the sync with this number (1-based; 0: never) and every write after it.
    fail_sync_at: AtomicU64,
}

impl CrashDev {
    fn new(len: u64) -> Self {
        Self {
            live: MemDev::new(len),
            durable: Mutex::new(vec![0; len as usize]),
            unsynced: Mutex::new(Vec::new()),
            syncs: AtomicU64::new(0),
            sync_delay_us: AtomicU64::new(0),
            fail_sync_at: AtomicU64::new(0),
        }
    }
    /// The device after a power loss: durable image plus, of each unsynced write, the sectors
    /// `keep(write index, sector index)` says survived.
    fn crash(&self, keep: impl Fn(usize, usize) -> bool) -> Arc<CrashDev> {
        let mut image = self.durable.lock().clone();
        for (i, (off, data)) in self.unsynced.lock().iter().enumerate() {
            for (s, chunk) in data.chunks(512).enumerate() {
                if keep(i, s) {
                    let at = *off as usize + s * 512;
                    image[at..at + chunk.len()].copy_from_slice(chunk);
                }
            }
        }
        let dev = CrashDev::new(image.len() as u64);
        dev.live.write_at(&image, 0).unwrap();
        *dev.durable.lock() = image;
        Arc::new(dev)
    }
    fn failed(&self) -> bool {
        self.syncs.load(Ordering::SeqCst) >= u64::MAX / 2
    }
    fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }
}

impl BlockDev for CrashDev {
    fn len(&self) -> u64 {
        self.live.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps::default()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.live.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        if self.failed() {
            return Err(DevError::Io {
                op: "write",
                offset,
                len: buf.len() as u64,
                source: std::io::Error::other("dead"),
            });
        }
        self.live.write_at(buf, offset)?;
        self.unsynced.lock().push((offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> DevResult<()> {
        let n = self.syncs.load(Ordering::SeqCst) + 1;
        if self.failed() || n == self.fail_sync_at.load(Ordering::SeqCst) {
            self.syncs.store(u64::MAX / 2, Ordering::SeqCst); // latch the failure
            return Err(DevError::Io {
                op: "sync",
                offset: 0,
                len: 0,
                source: std::io::Error::other("injected"),
            });
        }
        let delay = self.sync_delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
        let mut unsynced = self.unsynced.lock();
        let mut durable = self.durable.lock();
        for (off, data) in unsynced.drain(..) {
            durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn insert(i: u64) -> JournalEntry {
    JournalEntry::KeyInsert(Key {
        dev: 1,
        end: i * 8 + 8,
        size: 8,
        ptr: Ptr { offset: 10_000 + i * 8, generation: (i % 256) as u8 },
        dirty: i % 2 == 0,
    })
}

fn checkpoint(replay_from: u64) -> JournalEntry {
    JournalEntry::Checkpoint(CheckpointEntry {
        root: NodePtr { addr: replay_from * 8, seq: replay_from, len: 512, csum: 0 },
        table_slot: TableSlot::A,
        table_seq: replay_from,
        replay_from,
    })
}

fn open(
    dev: &Arc<CrashDev>,
    set: Uuid,
    mode: RecoveryMode,
) -> Result<(Journal, ubcache::journal::Replay), JournalError> {
    let cfg = JournalConfig { recovery_mode: mode, ..JournalConfig::default() };
    Journal::open(dev.clone(), REGION, set, cfg)
}

fn inserted_ids(replay: &ubcache::journal::Replay) -> Vec<u64> {
    replay
        .entries
        .iter()
        .map(|(_, e)| match e {
            JournalEntry::KeyInsert(k) => (k.end - 8) / 8,
            other => panic!("unexpected entry {other:?}"),
        })
        .collect()
}

#[test]
fn committed_entries_replay_in_order_with_their_seqs() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let j = Journal::create(dev.clone(), REGION, set, JournalConfig::default()).unwrap();
    assert_eq!(j.append(&[insert(0), insert(1)]).unwrap(), 2);
    assert_eq!(j.append(&[]).unwrap(), 2);
    j.commit(2).unwrap();
    assert_eq!(j.append(&[insert(2)]).unwrap(), 3);
    j.commit_all().unwrap();
    assert_eq!(j.durable_seq(), 3);
    drop(j);

    let (j, replay) = open(&dev, set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert!(replay.checkpoint.is_none());
    assert_eq!(replay.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(inserted_ids(&replay), vec![0, 1, 2]);
    assert_eq!(replay.stats.chain_records, 2);
    assert!(!replay.stats.torn_tail);
    // Appending continues after the replayed seqs, and survives another reopen.
    assert_eq!(j.append(&[insert(3)]).unwrap(), 4);
    j.commit(4).unwrap();
    drop(j);
    let (_, replay) = open(&dev, set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(inserted_ids(&replay), vec![0, 1, 2, 3]);
}

#[test]
fn uncommitted_entries_are_not_replayed_and_commit_of_unappended_seq_is_refused() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let j = Journal::create(dev.clone(), REGION, set, JournalConfig::default()).unwrap();
    j.append(&[insert(0)]).unwrap();
    j.commit(1).unwrap();
    j.append(&[insert(1)]).unwrap();
    assert!(matches!(j.commit(5), Err(JournalError::Invalid(_))));
    let crashed = dev.crash(|_, _| false);
    let (_, replay) = open(&crashed, set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(inserted_ids(&replay), vec![0]);
}

#[test]
fn a_commit_already_covered_does_no_io() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let j = Journal::create(dev.clone(), REGION, Uuid::random(), JournalConfig::default()).unwrap();
    let s1 = j.append(&[insert(0)]).unwrap();
    let s2 = j.append(&[insert(1)]).unwrap();
    let before = dev.syncs();
    j.commit(s2).unwrap();
    assert_eq!(dev.syncs(), before + 1, "one record, one sync for both appends");
    j.commit(s1).unwrap();
    j.commit(s2).unwrap();
    assert_eq!(dev.syncs(), before + 1);
    assert_eq!(j.stats().records_written, 1);
}

#[test]
fn concurrent_committers_coalesce_into_fewer_syncs() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let cfg = JournalConfig { checkpoint_fraction: 1.0, ..JournalConfig::default() };
    let j = Arc::new(
        Journal::create(dev.clone(), Region { offset_bytes: 0, len_bytes: DEV_BYTES }, set, cfg).unwrap(),
    );
    dev.sync_delay_us.store(2_000, Ordering::SeqCst);
    let before = dev.syncs();
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 50;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let j = j.clone();
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let seq = j.append(&[insert(t * 1000 + i)]).unwrap();
                    j.commit(seq).unwrap();
                    assert!(j.durable_seq() >= seq);
                }
            });
        }
    });
    let total = THREADS * PER_THREAD;
    assert_eq!(j.durable_seq(), total);
    let syncs = dev.syncs() - before;
    // While one committer waits 2 ms in sync, the other seven append and queue behind it; the
    // next one writes all of their entries in one record.
    assert!(syncs < total / 2, "{syncs} syncs for {total} commits: committers did not coalesce");
    let stats = j.stats();
    assert_eq!(stats.records_written, syncs);
    assert!(stats.coalesced_commits > 0);
    dev.sync_delay_us.store(0, Ordering::SeqCst);
    drop(j);
    let (_, replay) =
        Journal::open(dev, Region { offset_bytes: 0, len_bytes: DEV_BYTES }, set, JournalConfig::default())
            .unwrap();
    let mut ids = inserted_ids(&replay);
    assert_eq!(ids.len() as u64, total);
    ids.sort_unstable();
    let mut expected: Vec<u64> =
        (0..THREADS).flat_map(|t| (0..PER_THREAD).map(move |i| t * 1000 + i)).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
    assert_eq!(replay.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
}

/// Builds a journal with records of entries 0..n, one commit per entry.
fn journal_with_records(n: u64) -> (Arc<CrashDev>, Uuid) {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let j = Journal::create(dev.clone(), REGION, set, JournalConfig::default()).unwrap();
    for i in 0..n {
        let seq = j.append(&[insert(i)]).unwrap();
        j.commit(seq).unwrap();
    }
    (dev, set)
}

/// Commits `batch` on a copy of `dev` and returns the image before the commit, the image after
/// it, and the sectors the commit changed: the pieces a crash during the commit may keep.
fn commit_images(dev: &CrashDev, set: Uuid, batch: &[JournalEntry]) -> (Vec<u8>, Vec<u8>, Vec<usize>) {
    let copy = dev.crash(|_, _| true);
    let (j, _) = open(&copy, set, RecoveryMode::AbsoluteConsistency).unwrap();
    j.append(batch).unwrap();
    let before = copy.live.snapshot();
    j.commit_all().unwrap();
    let after = copy.live.snapshot();
    let changed = (0..after.len() / 512)
        .filter(|&s| after[s * 512..(s + 1) * 512] != before[s * 512..(s + 1) * 512])
        .collect();
    (before, after, changed)
}

fn image_dev(img: &[u8]) -> Arc<CrashDev> {
    let d = CrashDev::new(img.len() as u64);
    d.live.write_at(img, 0).unwrap();
    *d.durable.lock() = img.to_vec();
    Arc::new(d)
}

#[test]
fn torn_tail_is_tolerated_by_default_and_refused_in_absolute_mode() {
    let (dev, set) = journal_with_records(5);
    // A large last record (several sectors) torn: only its first sector reached the disk.
    let batch: Vec<JournalEntry> = (5..60).map(insert).collect();
    let (before, after, changed) = commit_images(&dev, set, &batch);
    assert!(changed.len() > 1, "the last record spans several sectors");
    let mut img = before;
    let first = changed[0];
    img[first * 512..(first + 1) * 512].copy_from_slice(&after[first * 512..(first + 1) * 512]);
    let torn = image_dev(&img);

    let (_, replay) = open(&torn, set, RecoveryMode::TolerateTailCorruption).unwrap();
    assert_eq!(inserted_ids(&replay), vec![0, 1, 2, 3, 4]);
    assert!(replay.stats.torn_tail);
    assert!(replay.stats.damaged_records >= 1);
    let err = open(&torn, set, RecoveryMode::AbsoluteConsistency).unwrap_err();
    assert!(matches!(err, JournalError::Corrupted(ref m) if m.contains("torn")), "{err}");

    // The whole record on disk (crash after the write, before the sync): replayed.
    let (_, replay) = open(&image_dev(&after), set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(inserted_ids(&replay), (0..60).collect::<Vec<_>>());
}

#[test]
fn after_a_torn_tail_new_records_continue_the_chain_and_the_torn_one_never_returns() {
    let (dev, set) = journal_with_records(4);
    let batch: Vec<JournalEntry> = (4..40).map(insert).collect();
    let (before, after, changed) = commit_images(&dev, set, &batch);
    // Keep every sector of the record except its last one.
    let mut img = before;
    for &s in &changed[..changed.len() - 1] {
        img[s * 512..(s + 1) * 512].copy_from_slice(&after[s * 512..(s + 1) * 512]);
    }
    let torn = image_dev(&img);
    let (j, replay) = open(&torn, set, RecoveryMode::TolerateTailCorruption).unwrap();
    assert_eq!(inserted_ids(&replay), vec![0, 1, 2, 3]);
    let seq = j.append(&[insert(100)]).unwrap();
    assert_eq!(seq, 5);
    j.commit(seq).unwrap();
    drop(j);
    let (_, replay) = open(&torn, set, RecoveryMode::TolerateTailCorruption).unwrap();
    assert_eq!(inserted_ids(&replay), vec![0, 1, 2, 3, 100]);
}

/// Finds the sector offsets (within the region) of the records, in seq order.
fn record_sectors(dev: &CrashDev) -> Vec<u64> {
    let img = dev.live.snapshot();
    let region = &img[REGION.offset_bytes as usize..(REGION.offset_bytes + REGION.len_bytes) as usize];
    let mut found: Vec<(u64, u64)> = region
        .chunks(512)
        .enumerate()
        .filter(|(_, s)| &s[..8] == b"ubcJRNL1")
        .map(|(i, s)| (u64::from_le_bytes(s[16..24].try_into().unwrap()), i as u64))
        .collect();
    found.sort_unstable();
    found.into_iter().map(|(_, s)| s).collect()
}

#[test]
fn bit_flip_in_the_middle_of_the_needed_chain_is_reported_as_corruption() {
    let (dev, set) = journal_with_records(6);
    let sectors = record_sectors(&dev);
    assert_eq!(sectors.len(), 6);
    let at = REGION.offset_bytes + sectors[2] * 512 + 80;
    let mut b = [0u8; 1];
    dev.live.read_at(&mut b, at).unwrap();
    dev.live.write_at(&[b[0] ^ 0x04], at).unwrap();
    for mode in [RecoveryMode::TolerateTailCorruption, RecoveryMode::AbsoluteConsistency] {
        let err = open(&dev, set, mode).unwrap_err();
        match err {
            JournalError::Corrupted(m) => assert!(m.contains("middle") && m.contains("damaged"), "{m}"),
            other => panic!("unexpected {other}"),
        }
    }
}

#[test]
fn bit_flip_in_the_last_record_loses_only_that_record() {
    let (dev, set) = journal_with_records(3);
    let sectors = record_sectors(&dev);
    let at = REGION.offset_bytes + sectors[2] * 512 + 75;
    let mut b = [0u8; 1];
    dev.live.read_at(&mut b, at).unwrap();
    dev.live.write_at(&[b[0] ^ 0x80], at).unwrap();
    let (_, replay) = open(&dev, set, RecoveryMode::TolerateTailCorruption).unwrap();
    assert_eq!(inserted_ids(&replay), vec![0, 1]);
    assert!(replay.stats.torn_tail);
    assert!(open(&dev, set, RecoveryMode::AbsoluteConsistency).is_err());
}

#[test]
fn records_of_another_cache_set_are_ignored() {
    let (dev, _old_set) = journal_with_records(3);
    let new_set = Uuid::random();
    let (_, replay) = open(&dev, new_set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert!(replay.entries.is_empty());
    assert_eq!(replay.stats.valid_records, 0);
}

#[test]
fn create_wipes_an_earlier_journal_of_the_same_set() {
    let (dev, set) = journal_with_records(3);
    let j = Journal::create(dev.clone(), REGION, set, JournalConfig::default()).unwrap();
    let seq = j.append(&[insert(9)]).unwrap();
    j.commit(seq).unwrap();
    drop(j);
    let (_, replay) = open(&dev, set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(inserted_ids(&replay), vec![9]);
}

#[test]
fn full_journal_refuses_without_losing_entries_and_a_checkpoint_still_fits() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let j = Journal::create(dev.clone(), REGION, set, JournalConfig::default()).unwrap();
    let mut last = 0;
    let mut full_at = None;
    for i in 0..10_000u64 {
        last = j.append(&[insert(i)]).unwrap();
        match j.commit(last) {
            Ok(()) => {}
            Err(JournalError::Full { .. }) => {
                full_at = Some(i);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let full_at = full_at.expect("a 64 KiB journal fills up");
    assert!(j.needs_checkpoint());
    assert!(j.fill_fraction() > 0.8, "{}", j.fill_fraction());
    assert_eq!(j.durable_seq(), last - 1);
    // Releasing without a checkpoint is refused: replay would break.
    assert!(matches!(j.release_before(last), Err(JournalError::Invalid(_))));

    // Nothing on disk was overwritten: everything committed replays.
    let (_, replay) = open(&dev.crash(|_, _| true), set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(inserted_ids(&replay), (0..full_at).collect::<Vec<_>>());

    // A commit that carries a checkpoint may use the space held back for it.
    let cp_seq = j.append(&[checkpoint(last + 1)]).unwrap();
    j.commit(cp_seq).unwrap();
    assert_eq!(j.durable_seq(), cp_seq, "the pending insert went out with the checkpoint");
    j.release_before(last + 1).unwrap();
    assert!(!j.needs_checkpoint(), "{}", j.fill_fraction());
    let seq = j.append(&[insert(50_000)]).unwrap();
    j.commit(seq).unwrap();
    drop(j);
    let (_, replay) = open(&dev, set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(replay.checkpoint.as_ref().unwrap().0, cp_seq);
    assert_eq!(inserted_ids(&replay), vec![50_000]);
}

#[test]
fn checkpoint_release_and_wrap_around_keep_replay_exact() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let j = Journal::create(dev.clone(), REGION, set, JournalConfig::default()).unwrap();
    let mut replay_from = 1;
    let mut checkpoints = 0;
    for i in 0..3_000u64 {
        let seq = j.append(&[insert(i)]).unwrap();
        // Commits of 1-3 records of different sizes so positions do not repeat.
        if i % 3 != 1 {
            j.commit(seq).unwrap();
        }
        if j.needs_checkpoint() {
            // The engine flushed the btree up to `seq`: replay from seq + 1.
            replay_from = seq + 1;
            let cp = j.append(&[checkpoint(replay_from)]).unwrap();
            j.commit(cp).unwrap();
            j.release_before(replay_from).unwrap();
            checkpoints += 1;
            assert!(!j.needs_checkpoint(), "release freed space: {}", j.fill_fraction());
        }
    }
    j.commit_all().unwrap();
    assert!(checkpoints > 5, "the ring wrapped several times ({checkpoints} checkpoints)");
    assert!(j.stats().bytes_written > 3 * REGION.len_bytes);
    let last = j.durable_seq();
    drop(j);

    let (j, replay) = open(&dev, set, RecoveryMode::AbsoluteConsistency).unwrap();
    let (cp_seq, cp) = replay.checkpoint.clone().unwrap();
    assert_eq!(cp.replay_from, replay_from);
    assert!(cp_seq >= replay_from);
    let seqs: Vec<u64> = replay.entries.iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (replay_from..=last).filter(|&s| s != cp_seq).collect();
    assert_eq!(seqs, expected);
    // Each insert i got seq i + 1 + (checkpoints before it); check contents via ids increasing.
    let ids = inserted_ids(&replay);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(*ids.last().unwrap(), 2_999);
    // The reopened ring keeps working and still refuses to release past the checkpoint.
    assert!(matches!(j.release_before(replay_from + 1), Err(JournalError::Invalid(_))));
    j.release_before(replay_from).unwrap();
    let seq = j.append(&[insert(5_000)]).unwrap();
    j.commit(seq).unwrap();
}

#[test]
fn crash_during_any_commit_replays_exactly_the_committed_prefix_or_the_whole_record() {
    let set = Uuid::random();
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let j = Journal::create(dev.clone(), REGION, set, JournalConfig::default()).unwrap();
    let mut committed = 0u64;
    for round in 0..40u64 {
        let batch: Vec<JournalEntry> = (0..(round % 7) * 9 + 1).map(|k| insert(committed + k)).collect();
        let n = batch.len() as u64;
        let (before, after, changed) = commit_images(&dev, set, &batch);
        // Keep none, all, the even or the odd sectors of the record.
        for keep in 0..4usize {
            let mut img = before.clone();
            for (i, &s) in changed.iter().enumerate() {
                if keep == 1 || (keep >= 2 && i % 2 == keep - 2) {
                    img[s * 512..(s + 1) * 512].copy_from_slice(&after[s * 512..(s + 1) * 512]);
                }
            }
            let whole = keep == 1 || (changed.len() == 1 && keep == 2);
            let (_, replay) = open(&image_dev(&img), set, RecoveryMode::TolerateTailCorruption).unwrap();
            let expect = if whole { committed + n } else { committed };
            assert_eq!(inserted_ids(&replay), (0..expect).collect::<Vec<_>>(), "round {round} keep {keep}");
        }
        j.append(&batch).unwrap();
        j.commit_all().unwrap();
        committed += n;
    }
}

#[test]
fn a_large_commit_is_split_into_records_each_synced_and_a_failure_is_sticky() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let cfg = JournalConfig { max_record_bytes: 4096, ..JournalConfig::default() };
    let j = Journal::create(dev.clone(), BIG_REGION, set, cfg).unwrap();
    let first = j.append(&[insert(0)]).unwrap();
    j.commit(first).unwrap();
    // ~29 bytes per insert: 400 inserts need 3 records of at most 4 KiB.
    let batch: Vec<JournalEntry> = (1..=400).map(insert).collect();
    let last = j.append(&batch).unwrap();
    let syncs_before = dev.syncs();
    // The third record's sync fails: records one and two of the commit are durable.
    dev.fail_sync_at.store(syncs_before + 3, Ordering::SeqCst);
    let err = j.commit(last).unwrap_err();
    assert!(matches!(err, JournalError::Dev(_)), "{err}");
    assert!(j.durable_seq() > first && j.durable_seq() < last, "{}", j.durable_seq());
    let durable = j.durable_seq();
    // Sticky: nothing more is accepted, so nobody is told a later entry is durable.
    assert!(matches!(j.append(&[insert(999)]), Err(JournalError::Failed(_))));
    assert!(matches!(j.commit(last), Err(JournalError::Failed(_))));

    let crashed = dev.crash(|_, _| false);
    let (_, replay) = Journal::open(crashed, BIG_REGION, set, JournalConfig::default()).unwrap();
    assert_eq!(inserted_ids(&replay), (0..durable).collect::<Vec<_>>());
    assert_eq!(replay.stats.chain_records, 3);
}

#[test]
fn journal_on_a_real_file_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache");
    let set = Uuid::random();
    {
        let file = FileDev::open(
            &path,
            &FileDevOptions { create_with_size: Some(DEV_BYTES), ..FileDevOptions::default() },
        )
        .unwrap();
        let j = Journal::create(Arc::new(file), BIG_REGION, set, JournalConfig::default()).unwrap();
        let seq = j.append(&(0..100).map(insert).collect::<Vec<_>>()).unwrap();
        j.commit(seq).unwrap();
    }
    let file = FileDev::open(&path, &FileDevOptions::default()).unwrap();
    let (_, replay) = Journal::open(Arc::new(file), BIG_REGION, set, JournalConfig::default()).unwrap();
    assert_eq!(inserted_ids(&replay), (0..100).collect::<Vec<_>>());
}

#[test]
fn bad_requests_and_regions_are_refused() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let cfg = JournalConfig::default();
    for region in [
        Region { offset_bytes: 100, len_bytes: 64 * 1024 },
        Region { offset_bytes: 0, len_bytes: 4096 },
        Region { offset_bytes: DEV_BYTES - 32 * 1024, len_bytes: 64 * 1024 },
    ] {
        assert!(Journal::create(dev.clone(), region, set, cfg).is_err(), "{region:?}");
    }
    let bad_cfg = JournalConfig { checkpoint_fraction: 0.0, ..cfg };
    assert!(Journal::create(dev.clone(), REGION, set, bad_cfg).is_err());
    let j = Journal::create(dev, REGION, set, cfg).unwrap();
    // A checkpoint cannot claim to cover entries after itself.
    assert!(matches!(j.append(&[insert(0), checkpoint(5)]), Err(JournalError::Invalid(_))));
    assert_eq!(j.last_appended_seq(), 0, "a refused append leaves nothing pending");
    // Pending entries are bounded (1/32 of the ring)...
    j.append(&[insert(0)]).unwrap();
    let big: Vec<JournalEntry> = (1..200).map(insert).collect();
    assert!(matches!(j.append(&big), Err(JournalError::Full { .. })));
    assert_eq!(j.last_appended_seq(), 1);
    // ...but a batch on an empty buffer is taken whatever its size, so commit-and-retry works.
    j.commit_all().unwrap();
    let seq = j.append(&big).unwrap();
    j.commit(seq).unwrap();
    assert_eq!(j.durable_seq(), 200);
}

/// Guards against an off-by-one in `release_before`: the record holding `replay_from` itself
/// must stay (it is needed for replay), only records entirely before it are freed.
#[test]
fn release_keeps_the_record_holding_replay_from() {
    let dev = Arc::new(CrashDev::new(DEV_BYTES));
    let set = Uuid::random();
    let j = Journal::create(dev.clone(), REGION, set, JournalConfig::default()).unwrap();
    j.append(&[insert(1), insert(2), insert(3)]).unwrap();
    j.commit_all().unwrap();
    j.append(&[insert(4), insert(5), insert(6)]).unwrap();
    j.commit_all().unwrap();
    let cp = j.append(&[checkpoint(6)]).unwrap();
    j.commit(cp).unwrap();
    assert_eq!(j.stats().used_sectors, 3);
    j.release_before(6).unwrap();
    assert_eq!(j.stats().used_sectors, 2, "record 4..=6 and the checkpoint stay");
    drop(j);
    let (_, replay) = open(&dev, set, RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(inserted_ids(&replay), vec![6]);
}

/// Measurement, not a check (no time is asserted). Run by hand:
/// `cargo test --test engine journal_figures -- --ignored --nocapture`
#[test]
#[ignore = "measurement; run by hand"]
fn journal_figures() {
    use std::time::Instant;
    let len = 64u64 << 20;
    let region = Region { offset_bytes: 0, len_bytes: len };
    let dev = Arc::new(MemDev::new(len));
    let set = Uuid::random();
    let cfg = JournalConfig { checkpoint_fraction: 1.0, ..JournalConfig::default() };
    let j = Journal::create(dev.clone(), region, set, cfg).unwrap();
    let n = 50_000u64;
    let t = Instant::now();
    for i in 0..n {
        let seq = j.append(&[insert(i)]).unwrap();
        j.commit(seq).unwrap();
    }
    let e = t.elapsed();
    println!("single-entry commits on MemDev: {:.0}/s", n as f64 / e.as_secs_f64());
    let t = Instant::now();
    let batches = 2_000u64;
    for b in 0..batches {
        let batch: Vec<JournalEntry> = (0..500).map(|k| insert(b * 500 + k)).collect();
        j.append(&batch).unwrap();
        j.commit_all().unwrap();
    }
    let e = t.elapsed();
    println!("500-entry commits: {:.0} entries/s", (batches * 500) as f64 / e.as_secs_f64());
    let fill = j.fill_fraction();
    drop(j);
    let t = Instant::now();
    let (_, replay) = Journal::open(dev, region, set, cfg).unwrap();
    let e = t.elapsed();
    println!(
        "replay of a {} MiB region ({:.0}% full, {} records, {} entries): {:.2} s, {:.0} MiB/s scanned",
        len >> 20,
        fill * 100.0,
        replay.stats.chain_records,
        replay.entries.len(),
        e.as_secs_f64(),
        replay.stats.bytes_scanned as f64 / (1 << 20) as f64 / e.as_secs_f64()
    );
}

#[test]
fn inspect_lists_valid_and_damaged_records_in_position_order() {
    let (dev, set) = journal_with_records(4);
    let sectors = record_sectors(&dev);
    let at = REGION.offset_bytes + sectors[1] * 512 + 90;
    let mut b = [0u8; 1];
    dev.live.read_at(&mut b, at).unwrap();
    dev.live.write_at(&[b[0] ^ 1], at).unwrap();
    let list = Journal::inspect(dev.as_ref(), REGION, set).unwrap();
    assert_eq!(list.iter().map(|r| r.sector).collect::<Vec<_>>(), sectors);
    assert_eq!(list.iter().filter(|r| r.problem.is_none()).count(), 3);
    assert!(list[1].problem.as_ref().unwrap().contains("checksum"), "{:?}", list[1]);
    assert_eq!(list[2].header.unwrap().first_seq, 3);
    // Another cache set's view: every record is foreign.
    let other = Journal::inspect(dev.as_ref(), REGION, Uuid::random()).unwrap();
    assert!(other.iter().all(|r| r.problem.is_some()));
}

/// The group-commit promise under concurrency and failure: every seq whose `commit` returned
/// Ok is in the replay after a power loss, even when a sync fails half way through the run
/// (the journal then refuses everything, so no later Ok can be a lie).
#[test]
fn every_acknowledged_commit_survives_a_failing_sync_under_concurrency() {
    for fail_at in [3u64, 17, 40] {
        let dev = Arc::new(CrashDev::new(DEV_BYTES));
        let set = Uuid::random();
        let region = BIG_REGION;
        let j = Arc::new(Journal::create(dev.clone(), region, set, JournalConfig::default()).unwrap());
        dev.sync_delay_us.store(200, Ordering::SeqCst);
        dev.fail_sync_at.store(dev.syncs() + fail_at, Ordering::SeqCst);
        let acked = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let j = j.clone();
                let acked = &acked;
                s.spawn(move || {
                    for i in 0..100 {
                        let Ok(seq) = j.append(&[insert(t * 1000 + i)]) else { return };
                        match j.commit(seq) {
                            Ok(()) => acked.lock().push((seq, t * 1000 + i)),
                            Err(JournalError::Dev(_) | JournalError::Failed(_)) => return,
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        let acked = acked.into_inner();
        assert!(!acked.is_empty(), "fail_at {fail_at}: nothing acknowledged before the failure");
        assert!(
            matches!(j.commit_all(), Err(JournalError::Failed(_)))
                || j.durable_seq() == j.last_appended_seq()
        );
        let crashed = dev.crash(|_, _| false);
        let (_, replay) = Journal::open(crashed, region, set, JournalConfig::default()).unwrap();
        let replayed: std::collections::HashMap<u64, u64> =
            replay.entries.iter().map(|(s, e)| (*s, inserted_ids_one(e))).collect();
        for (seq, id) in &acked {
            assert_eq!(replayed.get(seq), Some(id), "fail_at {fail_at}: acknowledged seq {seq} lost");
        }
    }
}

fn inserted_ids_one(e: &JournalEntry) -> u64 {
    match e {
        JournalEntry::KeyInsert(k) => (k.end - 8) / 8,
        other => panic!("unexpected entry {other:?}"),
    }
}
