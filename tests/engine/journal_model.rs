//! The journal against a model, in a reopen loop: random batches, commits, checkpoints with
//! release, and reopen (dropping whatever was not committed) on a small ring that wraps many
//! times. After every reopen the replay must be exactly the committed entries from the newest
//! durable checkpoint's `replay_from` on, and a commit that reports `Full` must succeed after a
//! checkpoint.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use ubcache::dev::MemDev;
use ubcache::format::{CheckpointEntry, JournalEntry, NodePtr, Region, TableSlot, Uuid};
use ubcache::journal::{Journal, JournalConfig, JournalError, RecoveryMode};

const REGION: Region = Region { offset_bytes: 4096, len_bytes: 48 * 1024 };

fn entry(id: u64) -> JournalEntry {
    // Mixed sizes: invalidates (23 bytes) and replaces with an expected key (57 bytes).
    if id % 3 == 0 {
        JournalEntry::Invalidate { dev: (id % 7) as u32, start: id, end: id + 1 }
    } else {
        JournalEntry::BucketGen { bucket: id, generation: (id % 251) as u8 }
    }
}

fn id_of(e: &JournalEntry) -> u64 {
    match e {
        JournalEntry::Invalidate { start, .. } => *start,
        JournalEntry::BucketGen { bucket, .. } => *bucket,
        other => panic!("unexpected {other:?}"),
    }
}

fn checkpoint(replay_from: u64) -> JournalEntry {
    JournalEntry::Checkpoint(CheckpointEntry {
        root: NodePtr { addr: replay_from, seq: 1, len: 512, csum: 0 },
        table_slot: if replay_from % 2 == 0 { TableSlot::A } else { TableSlot::B },
        table_seq: replay_from,
        replay_from,
    })
}

struct Model {
    /// (seq, id) of every durable non-checkpoint entry.
    durable: Vec<(u64, u64)>,
    /// (seq, id) appended but not committed.
    pending: Vec<(u64, u64)>,
    replay_from: u64,
    next_id: u64,
}

/// The engine flushed everything appended so far into the btree: checkpoint, commit (which
/// must fit, even in a full ring), release.
fn do_checkpoint(j: &Journal, m: &mut Model) {
    let replay_from = j.last_appended_seq() + 1;
    let cp = j.append(&[checkpoint(replay_from)]).unwrap();
    j.commit(cp).unwrap_or_else(|e| panic!("checkpoint commit failed: {e}"));
    m.durable.append(&mut m.pending);
    m.replay_from = replay_from;
    j.release_before(replay_from).unwrap();
}

fn run(seed: u64) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Arc::new(MemDev::new(REGION.offset_bytes + REGION.len_bytes));
    let set = Uuid::random();
    let cfg = JournalConfig { max_record_bytes: 4096, ..JournalConfig::default() };
    let mut j = Journal::create(dev.clone(), REGION, set, cfg).unwrap();
    let mut m = Model { durable: Vec::new(), pending: Vec::new(), replay_from: 1, next_id: 0 };
    let mut reopens = 0;
    let mut checkpoints = 0;
    let mut fulls = 0;
    for step in 0..800 {
        // Odd seeds checkpoint only when a commit reports `Full` (what the engine does), so the
        // ring fills up again and again.
        let checkpoint_now = seed % 2 == 0 && rng.gen_range(0..6) == 0;
        match if checkpoint_now { 9 } else { rng.gen_range(0..9) } {
            0..=5 => {
                let n = rng.gen_range(1..50);
                let batch: Vec<JournalEntry> = (0..n).map(|k| entry(m.next_id + k)).collect();
                match j.append(&batch) {
                    Ok(last) => {
                        let first = last + 1 - n;
                        m.pending.extend((0..n).map(|k| (first + k, m.next_id + k)));
                        m.next_id += n;
                    }
                    Err(JournalError::Full { .. }) => {
                        assert!(!m.pending.is_empty(), "step {step}: append refused with nothing pending");
                    }
                    Err(e) => panic!("step {step}: {e}"),
                }
            }
            6..=7 => match commit_some(&j, &mut rng, step) {
                Ok(upto) => {
                    let still_pending =
                        m.pending.split_off(m.pending.partition_point(|&(seq, _)| seq <= upto));
                    m.durable.append(&mut m.pending);
                    m.pending = still_pending;
                }
                Err(JournalError::Full { .. }) => {
                    fulls += 1;
                    assert!(j.fill_fraction() > 0.5, "step {step}: full at {}", j.fill_fraction());
                    assert!(j.needs_checkpoint());
                    do_checkpoint(&j, &mut m);
                    checkpoints += 1;
                }
                Err(e) => panic!("step {step}: {e}"),
            },
            9 => {
                do_checkpoint(&j, &mut m);
                checkpoints += 1;
            }
            _ => {
                drop(j);
                m.pending.clear();
                let (reopened, replay) = Journal::open(
                    dev.clone(),
                    REGION,
                    set,
                    JournalConfig { recovery_mode: RecoveryMode::AbsoluteConsistency, ..cfg },
                )
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                let got: Vec<(u64, u64)> = replay.entries.iter().map(|(s, e)| (*s, id_of(e))).collect();
                let want: Vec<(u64, u64)> =
                    m.durable.iter().copied().filter(|(s, _)| *s >= m.replay_from).collect();
                assert_eq!(got, want, "seed {seed} step {step}");
                assert_eq!(replay.checkpoint.map_or(1, |(_, c)| c.replay_from), m.replay_from);
                assert!(!replay.stats.torn_tail);
                j = reopened;
                reopens += 1;
            }
        }
    }
    assert!(reopens > 10 && checkpoints >= 2, "seed {seed}: {reopens} reopens, {checkpoints} checkpoints");
    fulls
}

/// Half the time commits everything, else `commit_through` a random pending seq (what a
/// committer that does not hold off appends does). Returns the seq durable through.
fn commit_some(j: &Journal, rng: &mut StdRng, step: usize) -> Result<u64, JournalError> {
    let (durable, last) = (j.durable_seq(), j.last_appended_seq());
    if last <= durable || rng.gen_bool(0.5) {
        j.commit_all()?;
        return Ok(last);
    }
    let upto = rng.gen_range(durable + 1..=last);
    j.commit_through(upto)?;
    // Exactly through `upto`: not less, and none of the entries appended after it.
    assert_eq!(j.durable_seq(), upto, "step {step}: commit_through({upto}) with {last} appended");
    Ok(upto)
}

#[test]
fn replay_after_every_reopen_matches_the_model() {
    let fulls: usize = (0..24).map(run).sum();
    assert!(fulls > 5, "the ring rarely filled up ({fulls} full commits): the test misses that path");
}
