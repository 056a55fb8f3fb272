//! The journal: a ring of checksummed records over the journal buckets of the cache device,
//! with group commit and replay.
//!
//! # API summary
//! ```text
//! Journal::create(dev, region, set_uuid, cfg) -> Result<Journal>           // fresh format (zeroes the region)
//! Journal::open(dev, region, set_uuid, cfg) -> Result<(Journal, Replay)>   // recovery: scan + replay
//! journal.append(&[JournalEntry]) -> Result<u64 /* seq of the last entry */>   // cheap, in memory
//! journal.commit(upto_seq) -> Result<()>    // durable through upto_seq; concurrent callers coalesce
//! journal.commit_through(upto_seq) -> Result<()>  // the same, writing only entries <= upto_seq
//! journal.commit_all() -> Result<()>
//! journal.release_before(seq) -> Result<()> // after a durable checkpoint whose replay_from >= seq
//! journal.needs_checkpoint() -> bool; journal.fill_fraction() -> f64; journal.stats()
//! Journal::inspect(dev, region, set_uuid) -> Result<Vec<RecordSummary>>   // read-only listing for tools
//! ```
//! Every entry gets a seq (strictly increasing by one); `append` returns the seq of its last
//! entry. `commit(s)` returns once every entry with seq <= s is durable.
//!
//! # Caller obligations (crash ordering)
//! - **Data before metadata**: before appending (at the latest: before committing) an entry that
//!   references cache data, the caller must have made that data durable (`sync` on the cache
//!   device). The journal writes the record and syncs, nothing more: it cannot know which
//!   data writes an entry depends on.
//! - **Checkpoint, then release**: the engine writes out the btree's changed nodes (and syncs
//!   them), writes the bucket table (synced by [`crate::format::write_bucket_table`]), appends a
//!   [`JournalEntry::Checkpoint`] with `replay_from` = the oldest seq the written-out btree does not
//!   cover, commits it, and only then calls [`Journal::release_before`]`(replay_from)`. The
//!   journal refuses to release past the newest durable checkpoint.
//!
//! # Ring and records
//! Records are written back to back at the tail, sector aligned; a record that does not fit
//! before the end of the region starts again at sector 0 (the gap is counted as used until the
//! record after it is released). A record is never written over a record that is still
//! retained: when there is no room, [`JournalError::Full`] is returned and the entries stay
//! pending. Each record links to its predecessor (seq and sector), see
//! [`crate::format::RecordHeader`].
//!
//! Space: 1/8 of the ring is held back for commits that carry a checkpoint, and pending entries
//! are bounded to 1/32 of the ring (`append` returns `Full`: commit first), so when a commit
//! fails with `Full` the engine can always checkpoint (append a checkpoint, commit: it fits in
//! the reserve), release, and go on. [`Journal::needs_checkpoint`] turns true at half full
//! (configurable) so that this is rare.
//!
//! Failure: if a write or sync fails, the journal fails for good ([`JournalError::Failed`]):
//! entries that were taken for the failed commit cannot be promised durable. Reopen to recover.
//!
//! **At most one record is ever unsynced**: a commit larger than the maximum record size writes
//! several records, each followed by its own sync. So after a crash only the last record can be
//! torn, and a bad record followed by valid newer ones is corruption, not a torn write.
//!
//! # Replay
//! 1. Scan the region for sectors starting with the journal magic; keep records whose header,
//!    own address, cache-set uuid and crc32c are valid.
//! 2. Walk back from the record with the highest seq along the prev links, decoding entries,
//!    until the newest checkpoint entry and then the record holding its `replay_from` seq (or
//!    the first record after format) are reached. A broken link before that is
//!    [`JournalError::Corrupted`] in every mode: entries the btree does not cover are missing.
//! 3. Entries with seq >= `replay_from` (checkpoint entries excluded) are returned in order.
//! 4. A damaged record right after the chain end is a torn tail: tolerated (and counted) in
//!    [`RecoveryMode::TolerateTailCorruption`], an error in [`RecoveryMode::AbsoluteConsistency`].

use crate::dev::{BlockDev, DevError, SECTOR_SIZE};
use crate::format::{
    self, CheckpointEntry, FormatError, JOURNAL_MAGIC, JournalEntry, RECORD_HEADER_LEN, RecordHeader, Region,
    Uuid,
};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// No room. From [`Journal::append`]: too many entries pending, commit first. From
    /// [`Journal::commit`]: the ring has no room without overwriting records still needed;
    /// checkpoint (a commit carrying a checkpoint may use the reserve) and
    /// [`Journal::release_before`], then commit again. Nothing was lost either way.
    #[error(
        "journal full: {needed_sectors} sectors needed, {free_sectors} free of {total_sectors}; checkpoint and release first"
    )]
    Full { needed_sectors: u64, free_sectors: u64, total_sectors: u64 },
    /// The journal on disk is damaged in a way replay cannot tolerate.
    #[error("journal corrupted: {0}")]
    Corrupted(String),
    /// A structure failed to decode or encode.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// An earlier write or sync failed; durability of later records cannot be promised, so the
    /// journal refuses all further commits until it is reopened.
    #[error("journal failed earlier ({0}); reopen the cache to recover")]
    Failed(String),
    /// The device failed.
    #[error(transparent)]
    Dev(#[from] DevError),
    /// A request that cannot be right (commit of a seq never appended, release past the
    /// checkpoint, bad configuration).
    #[error("invalid journal request: {0}")]
    Invalid(String),
}

impl From<JournalError> for DevError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::Dev(d) => d,
            JournalError::Format(f) => f.into(),
            JournalError::Full { .. } => DevError::NoSpace(e.to_string()),
            JournalError::Corrupted(_) => DevError::Corrupted(e.to_string()),
            JournalError::Failed(_) => DevError::Io {
                op: "journal",
                offset: 0,
                len: 0,
                source: std::io::Error::other(e.to_string()),
            },
            JournalError::Invalid(_) => DevError::Invalid(e.to_string()),
        }
    }
}

pub type JournalResult<T> = Result<T, JournalError>;

/// What replay does with damage at the end of the journal (as raft-engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// A torn last record (a crash during its write) is dropped: its commit never returned.
    #[default]
    TolerateTailCorruption,
    /// A torn tail is an error too (as is any damage inside the needed chain, in both modes).
    /// Damaged leftovers of released records are ignored in both modes: records partially
    /// overwritten by later laps of the ring are normal.
    AbsoluteConsistency,
}

/// Journal tuning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JournalConfig {
    pub recovery_mode: RecoveryMode,
    /// Largest record written; a bigger commit writes several records (one sync each). Clamped
    /// to [4 KiB, region / 4].
    pub max_record_bytes: u64,
    /// [`Journal::needs_checkpoint`] turns true at this fill fraction.
    pub checkpoint_fraction: f64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            recovery_mode: RecoveryMode::default(),
            max_record_bytes: 256 * 1024,
            checkpoint_fraction: 0.5,
        }
    }
}

/// What replay found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Bytes read from the device during the scan.
    pub bytes_scanned: u64,
    /// Records with a valid crc, address and uuid anywhere in the region (incl. stale ones).
    pub valid_records: u64,
    /// Sectors that start with the journal magic but hold no valid record.
    pub damaged_records: u64,
    /// Records of the chain walked back from the newest record.
    pub chain_records: u64,
    /// Entries returned for replay.
    pub replayed_entries: u64,
    /// Seq of the first returned entry (`replay_from`), 0 if none.
    pub first_seq: u64,
    /// Seq of the last entry in the journal, 0 if the journal is empty.
    pub last_seq: u64,
    /// A damaged record follows the chain end (dropped under TolerateTailCorruption).
    pub torn_tail: bool,
}

/// The result of replay.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// The newest checkpoint in the journal and its seq; `None` if none was ever written (then
    /// `entries` holds everything since format).
    pub checkpoint: Option<(u64, CheckpointEntry)>,
    /// Entries to re-apply, in order, with their seq. Checkpoint entries are not included.
    pub entries: Vec<(u64, JournalEntry)>,
    pub stats: ReplayStats,
}

/// One magic-bearing sector of the journal region, as [`Journal::inspect`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSummary {
    /// Sector within the region.
    pub sector: u64,
    /// The header, if it decoded.
    pub header: Option<RecordHeader>,
    /// Why the record is not valid here (bad header, crc, address, other cache set); `None`
    /// for a valid record.
    pub problem: Option<String>,
}

/// Live counters of the journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub records_written: u64,
    pub syncs: u64,
    /// Commits that found their seq already durable (covered by another committer).
    pub coalesced_commits: u64,
    pub bytes_written: u64,
    pub used_sectors: u64,
    pub total_sectors: u64,
    pub last_appended_seq: u64,
    pub durable_seq: u64,
}

/// Entries appended but not yet written.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// End offset in `bytes` of each entry.
    ends: Vec<usize>,
    /// Seq of the first pending entry.
    first_seq: u64,
    /// Checkpoints among the pending entries: (seq, replay_from).
    checkpoints: Vec<(u64, u64)>,
}

/// A retained record.
#[derive(Debug, Clone, Copy)]
struct RecordLoc {
    last_seq: u64,
    sector: u64,
    sectors: u64,
    /// Sectors skipped at the region end before this record (it wrapped to 0).
    waste_before: u64,
}

/// The on-disk ring, guarded by the commit lock.
#[derive(Debug)]
struct Ring {
    region_sectors: u64,
    records: VecDeque<RecordLoc>,
    tail: u64,
    used_sectors: u64,
    /// Link for the next record: (last seq, sector) of the last written record; (0, 0) at start.
    prev: (u64, u64),
    /// Newest durable checkpoint: (entry seq, replay_from).
    durable_checkpoint: Option<(u64, u64)>,
    stats: JournalStats,
}

/// Where a record of `len` sectors goes, given the tail and the oldest retained record's sector.
/// Returns (position, sectors wasted at the region end).
fn place(region_sectors: u64, tail: u64, head: Option<u64>, len: u64) -> Option<(u64, u64)> {
    if len > region_sectors {
        return None;
    }
    match head {
        None => {
            if tail + len <= region_sectors {
                Some((tail, 0))
            } else {
                Some((0, 0))
            }
        }
        Some(h) if tail > h => {
            if tail + len <= region_sectors {
                Some((tail, 0))
            } else if len <= h {
                Some((0, region_sectors - tail))
            } else {
                None
            }
        }
        Some(h) if tail < h => (tail + len <= h).then_some((tail, 0)),
        // tail == head with records retained: the ring is full.
        Some(_) => None,
    }
}

/// A journal over one region of a cache device. Thread-safe.
pub struct Journal {
    dev: Arc<dyn BlockDev>,
    region: Region,
    set_uuid: Uuid,
    cfg: JournalConfig,
    max_record_sectors: u64,
    /// Appends take only this lock, so they never wait for I/O.
    pending: Mutex<Pending>,
    /// The commit lock: one committer writes at a time; others queue here and usually find
    /// their seq already durable when they get it.
    ring: Mutex<Ring>,
    durable_seq: AtomicU64,
    /// Copy of the ring's used sectors, so fill checks never wait for a commit's I/O.
    used_sectors_hint: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("region", &self.region)
            .field("set_uuid", &self.set_uuid)
            .field("durable_seq", &self.durable_seq.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

const SCAN_CHUNK_BYTES: u64 = 1 << 20;
/// 1/8 of the ring is kept for commits that carry a checkpoint: when the journal is nearly full,
/// the checkpoint that lets it release space must still fit.
const CHECKPOINT_RESERVE_DIVISOR: u64 = 8;
/// Pending entries are bounded to 1/32 of the ring, so that the largest pending batch plus a
/// checkpoint, plus the gap a wrap can waste in front of it, fits in the checkpoint reserve.
const PENDING_LIMIT_DIVISOR: u64 = 32;

impl Journal {
    fn new_empty(
        dev: Arc<dyn BlockDev>,
        region: Region,
        set_uuid: Uuid,
        cfg: JournalConfig,
    ) -> JournalResult<Self> {
        if region.offset_bytes % SECTOR_SIZE != 0
            || region.len_bytes % SECTOR_SIZE != 0
            || region.len_bytes < 16 * 1024
        {
            return Err(JournalError::Invalid(format!(
                "journal region {region:?} must be sector aligned and >= 16 KiB"
            )));
        }
        DevError::check_range("journal region", region.offset_bytes, region.len_bytes, dev.len())?;
        if !(cfg.checkpoint_fraction > 0.0 && cfg.checkpoint_fraction <= 1.0) {
            return Err(JournalError::Invalid(format!("checkpoint fraction {}", cfg.checkpoint_fraction)));
        }
        let region_sectors = region.len_bytes / SECTOR_SIZE;
        let max_record_sectors = (cfg.max_record_bytes / SECTOR_SIZE)
            .clamp(8, (region_sectors / 4).max(8))
            .min(format::MAX_RECORD_BYTES / SECTOR_SIZE);
        Ok(Self {
            dev,
            region,
            set_uuid,
            cfg,
            max_record_sectors,
            pending: Mutex::new(Pending { first_seq: 1, ..Pending::default() }),
            ring: Mutex::new(Ring {
                region_sectors,
                records: VecDeque::new(),
                tail: 0,
                used_sectors: 0,
                prev: (0, 0),
                durable_checkpoint: None,
                stats: JournalStats { total_sectors: region_sectors, ..JournalStats::default() },
            }),
            durable_seq: AtomicU64::new(0),
            used_sectors_hint: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        })
    }

    /// A journal for a freshly formatted cache: zeroes the region (so no record of an earlier
    /// use of the device can be mistaken for ours) and syncs. The first entry gets seq 1.
    pub fn create(
        dev: Arc<dyn BlockDev>,
        region: Region,
        set_uuid: Uuid,
        cfg: JournalConfig,
    ) -> JournalResult<Self> {
        let j = Self::new_empty(dev, region, set_uuid, cfg)?;
        j.dev.write_zeroes(region.offset_bytes, region.len_bytes, false)?;
        j.dev.sync()?;
        Ok(j)
    }

    /// Opens an existing journal: scans and replays it (see the module doc) and positions the
    /// ring after the last valid record.
    pub fn open(
        dev: Arc<dyn BlockDev>,
        region: Region,
        set_uuid: Uuid,
        cfg: JournalConfig,
    ) -> JournalResult<(Self, Replay)> {
        let j = Self::new_empty(dev, region, set_uuid, cfg)?;
        let replay = j.replay()?;
        Ok((j, replay))
    }

    /// Sectors a record with these entry bytes takes.
    fn record_sectors(entries_len: usize) -> u64 {
        RecordHeader::sectors_for(entries_len)
    }

    /// Largest entry bytes per record.
    fn max_entries_bytes(&self) -> usize {
        (self.max_record_sectors * SECTOR_SIZE) as usize - RECORD_HEADER_LEN - format::RECORD_TRAILER_LEN
    }

    /// Appends entries to the pending buffer and returns the seq of the last one (or the last
    /// seq appended so far, if `entries` is empty). Nothing is written: call [`Journal::commit`].
    /// Fails with `Full` when the pending entries would exceed 1/32 of the ring (commit first:
    /// this bound keeps any pending batch plus a checkpoint inside the checkpoint reserve), and
    /// with `Failed` after an earlier I/O failure. A refused append leaves nothing pending. A
    /// batch with a checkpoint entry, or one appended when nothing is pending, is never refused
    /// for size.
    pub fn append(&self, entries: &[JournalEntry]) -> JournalResult<u64> {
        self.check_failed()?;
        let limit = (self.region.len_bytes / PENDING_LIMIT_DIVISOR) as usize;
        let mut p = self.pending.lock();
        let before_len = p.bytes.len();
        let before_ends = p.ends.len();
        let before_cps = p.checkpoints.len();
        for e in entries {
            let seq = p.first_seq + p.ends.len() as u64;
            if let Err(err) = e.encode(&mut p.bytes) {
                p.bytes.truncate(before_len);
                p.ends.truncate(before_ends);
                p.checkpoints.truncate(before_cps);
                return Err(err.into());
            }
            let end = p.bytes.len();
            p.ends.push(end);
            if let JournalEntry::Checkpoint(c) = e {
                if c.replay_from > seq {
                    p.bytes.truncate(before_len);
                    p.ends.truncate(before_ends);
                    p.checkpoints.truncate(before_cps);
                    return Err(JournalError::Invalid(format!(
                        "checkpoint at seq {seq} with replay_from {} in the future",
                        c.replay_from
                    )));
                }
                p.checkpoints.push((seq, c.replay_from));
            }
        }
        // A batch carrying a checkpoint is always accepted: it is what lets the journal free
        // space, and the reserve leaves room for it (one entry beyond the limit).
        // A batch appended to an empty buffer is accepted whatever its size (commit splits it
        // into records), so a caller that commits and retries always makes progress.
        let has_checkpoint = p.checkpoints.len() > before_cps;
        if p.bytes.len() > limit && !has_checkpoint && before_len > 0 {
            let needed = p.bytes.len() as u64;
            p.bytes.truncate(before_len);
            p.ends.truncate(before_ends);
            p.checkpoints.truncate(before_cps);
            return Err(JournalError::Full {
                needed_sectors: needed / SECTOR_SIZE,
                free_sectors: limit as u64 / SECTOR_SIZE,
                total_sectors: self.region.len_bytes / SECTOR_SIZE,
            });
        }
        Ok(p.first_seq + p.ends.len() as u64 - 1)
    }

    /// Seq of the last appended entry (0 if none).
    #[must_use]
    pub fn last_appended_seq(&self) -> u64 {
        let p = self.pending.lock();
        p.first_seq + p.ends.len() as u64 - 1
    }

    /// Every entry with seq <= this is durable.
    #[must_use]
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    fn check_failed(&self) -> JournalResult<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(JournalError::Failed(self.failure.lock().clone().unwrap_or_default()));
        }
        Ok(())
    }

    fn fail(&self, why: &JournalError) {
        *self.failure.lock() = Some(why.to_string());
        self.failed.store(true, Ordering::Release);
    }

    /// Commits everything appended so far.
    pub fn commit_all(&self) -> JournalResult<()> {
        let upto = self.last_appended_seq();
        self.commit(upto)
    }

    /// Makes every entry with seq <= `upto` durable: writes all pending entries (also those
    /// appended after `upto`, so concurrent committers coalesce) as one record and syncs once.
    /// A caller whose seq was covered by another caller's commit returns without any I/O.
    /// The caller must already have synced the data the entries reference (module doc).
    pub fn commit(&self, upto: u64) -> JournalResult<()> {
        self.commit_entries(upto, false)
    }

    /// Makes every entry with seq <= `upto` durable, writing *only* those (entries appended
    /// after `upto` stay pending). For committers that do not hold off appends while they
    /// commit: an entry appended after the caller synced the data its entries reference may
    /// reference data not yet synced, and must not slip into the record.
    pub fn commit_through(&self, upto: u64) -> JournalResult<()> {
        self.commit_entries(upto, true)
    }

    fn commit_entries(&self, upto: u64, only_through_upto: bool) -> JournalResult<()> {
        self.check_failed()?;
        if self.durable_seq() >= upto {
            return Ok(());
        }
        let mut ring = self.ring.lock();
        // Another committer may have covered us while we waited for the lock.
        if self.durable_seq() >= upto {
            ring.stats.coalesced_commits += 1;
            return Ok(());
        }
        self.check_failed()?;
        // Plan the records under the pending lock (appends wait only for this planning), then
        // take the entries and release the lock before any I/O.
        let (bytes, ends, first_seq, checkpoints, plan) = {
            let mut p = self.pending.lock();
            let last_appended = p.first_seq + p.ends.len() as u64 - 1;
            if upto > last_appended {
                return Err(JournalError::Invalid(format!(
                    "commit up to seq {upto}, but only {last_appended} were appended"
                )));
            }
            // Every entry before `upto` that is not durable is still pending: entries leave
            // `pending` only here, under the ring lock, and become durable before it is released.
            let take = if only_through_upto {
                usize::try_from((upto + 1).saturating_sub(p.first_seq))
                    .unwrap_or(usize::MAX)
                    .min(p.ends.len())
            } else {
                p.ends.len()
            };
            if take == 0 {
                return Ok(());
            }
            let last_taken = p.first_seq + take as u64 - 1;
            let taken_has_checkpoint = p.checkpoints.iter().any(|&(seq, _)| seq <= last_taken);
            // Space held back so that a checkpoint (what frees the journal) always fits.
            let reserve =
                if taken_has_checkpoint { 0 } else { ring.region_sectors / CHECKPOINT_RESERVE_DIVISOR };
            let plan = self.plan_records(&ring, &p.ends[..take], reserve)?;
            let first_seq = p.first_seq;
            p.first_seq += take as u64;
            if take == p.ends.len() {
                (
                    std::mem::take(&mut p.bytes),
                    std::mem::take(&mut p.ends),
                    first_seq,
                    std::mem::take(&mut p.checkpoints),
                    plan,
                )
            } else {
                let byte_end = p.ends[take - 1];
                let bytes: Vec<u8> = p.bytes.drain(..byte_end).collect();
                let ends: Vec<usize> = p.ends.drain(..take).collect();
                for end in &mut p.ends {
                    *end -= byte_end;
                }
                let (taken, kept): (Vec<_>, Vec<_>) =
                    p.checkpoints.iter().partition(|&&(seq, _)| seq <= last_taken);
                p.checkpoints = kept;
                (bytes, ends, first_seq, taken, plan)
            }
        };
        let mut entry_idx = 0usize;
        let mut byte_start = 0usize;
        for (pos, waste, n_entries) in plan {
            let end_idx = entry_idx + n_entries;
            let byte_end = ends[end_idx - 1];
            let rec_first = first_seq + entry_idx as u64;
            let rec_last = rec_first + n_entries as u64 - 1;
            let entries_bytes = &bytes[byte_start..byte_end];
            let header = RecordHeader {
                entry_count: n_entries as u32,
                first_seq: rec_first,
                prev_seq: ring.prev.0,
                sector: pos,
                prev_sector: ring.prev.1,
                set_uuid: self.set_uuid,
                entries_len: entries_bytes.len() as u32,
                record_sectors: Self::record_sectors(entries_bytes.len()) as u32,
            };
            let written = format::encode_record(&header, entries_bytes).map_err(JournalError::from).and_then(
                |record| {
                    self.dev.write_at(&record, self.region.offset_bytes + pos * SECTOR_SIZE)?;
                    self.dev.sync()?;
                    Ok(record.len())
                },
            );
            let record_len = match written {
                Ok(len) => len,
                Err(err) => {
                    // The entries of this and later records are gone from memory and their
                    // durability is unknown: fail the journal so nobody is told they are durable.
                    self.fail(&err);
                    return Err(err);
                }
            };
            let sectors = u64::from(header.record_sectors);
            let waste_before = if ring.records.is_empty() { 0 } else { waste };
            ring.records.push_back(RecordLoc { last_seq: rec_last, sector: pos, sectors, waste_before });
            ring.used_sectors += sectors + waste_before;
            self.used_sectors_hint.store(ring.used_sectors, Ordering::Release);
            ring.tail = (pos + sectors) % ring.region_sectors;
            ring.prev = (rec_last, pos);
            ring.stats.records_written += 1;
            ring.stats.syncs += 1;
            ring.stats.bytes_written += record_len as u64;
            if let Some(&(cp_seq, replay_from)) =
                checkpoints.iter().rev().find(|(s, _)| *s >= rec_first && *s <= rec_last)
            {
                ring.durable_checkpoint = Some((cp_seq, replay_from));
            }
            self.durable_seq.store(rec_last, Ordering::Release);
            entry_idx = end_idx;
            byte_start = byte_end;
        }
        Ok(())
    }

    /// Splits pending entries into records and places them in the ring; `Full` if they do not
    /// all fit. Returns (sector, waste, entry count) per record.
    fn plan_records(
        &self,
        ring: &Ring,
        ends: &[usize],
        reserve: u64,
    ) -> JournalResult<Vec<(u64, u64, usize)>> {
        let max_bytes = self.max_entries_bytes();
        let mut plan = Vec::new();
        let mut tail = ring.tail;
        let mut head = ring.records.front().map(|r| r.sector);
        let mut start_byte = 0usize;
        let mut i = 0usize;
        let mut planned = 0u64;
        while i < ends.len() {
            let mut j = i;
            while j < ends.len() && ends[j] - start_byte <= max_bytes {
                j += 1;
            }
            if j == i {
                return Err(JournalError::Invalid("journal entry larger than a record".into()));
            }
            let len = Self::record_sectors(ends[j - 1] - start_byte);
            let placed = place(ring.region_sectors, tail, head, len).filter(|(_, waste)| {
                ring.used_sectors + planned + waste + len + reserve <= ring.region_sectors
            });
            let Some((pos, waste)) = placed else {
                return Err(JournalError::Full {
                    needed_sectors: len,
                    free_sectors: ring.region_sectors - ring.used_sectors,
                    total_sectors: ring.region_sectors,
                });
            };
            if head.is_none() {
                head = Some(pos);
            }
            tail = (pos + len) % ring.region_sectors;
            planned += waste + len;
            plan.push((pos, waste, j - i));
            start_byte = ends[j - 1];
            i = j;
        }
        Ok(plan)
    }

    /// Lets the ring reuse the space of records whose entries all have seq < `seq`. Allowed only
    /// up to the `replay_from` of the newest durable checkpoint (releasing more would make the
    /// journal unreplayable).
    pub fn release_before(&self, seq: u64) -> JournalResult<()> {
        let mut ring = self.ring.lock();
        let allowed = ring.durable_checkpoint.map_or(0, |(_, replay_from)| replay_from);
        if seq > allowed {
            return Err(JournalError::Invalid(format!(
                "release before seq {seq}, but the newest durable checkpoint only allows {allowed}"
            )));
        }
        while let Some(front) = ring.records.front().copied() {
            if front.last_seq >= seq {
                break;
            }
            ring.records.pop_front();
            ring.used_sectors -= front.sectors + front.waste_before;
        }
        if let Some(front) = ring.records.front_mut() {
            // The new oldest record's wrap gap is now free space.
            let waste = front.waste_before;
            front.waste_before = 0;
            ring.used_sectors -= waste;
        }
        self.used_sectors_hint.store(ring.used_sectors, Ordering::Release);
        Ok(())
    }

    /// Fraction of the ring holding retained records.
    #[must_use]
    pub fn fill_fraction(&self) -> f64 {
        let region_sectors = self.region.len_bytes / SECTOR_SIZE;
        self.used_sectors_hint.load(Ordering::Acquire) as f64 / region_sectors as f64
    }

    /// Whether the engine should checkpoint now (the ring is past the configured fill).
    #[must_use]
    pub fn needs_checkpoint(&self) -> bool {
        self.fill_fraction() >= self.cfg.checkpoint_fraction
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> JournalStats {
        let ring = self.ring.lock();
        let mut s = ring.stats;
        s.used_sectors = ring.used_sectors;
        s.last_appended_seq = self.last_appended_seq();
        s.durable_seq = self.durable_seq();
        s
    }

    fn read_region(&self, sector: u64, buf: &mut [u8]) -> JournalResult<()> {
        self.dev.read_at(buf, self.region.offset_bytes + sector * SECTOR_SIZE)?;
        Ok(())
    }

    /// Reads and fully decodes the record at `sector` (header already known valid).
    fn read_record(&self, h: &RecordHeader) -> JournalResult<Vec<JournalEntry>> {
        let mut buf = vec![0u8; h.record_bytes() as usize];
        self.read_region(h.sector, &mut buf)?;
        let (_, entries) = format::decode_record(&buf, h.sector, self.set_uuid)?;
        Ok(entries)
    }

    /// Lists every sector of the region that starts with the journal magic, in position order,
    /// with what it holds: for `ubcache show`/`check` style tools. Reads only.
    pub fn inspect(dev: &dyn BlockDev, region: Region, set_uuid: Uuid) -> JournalResult<Vec<RecordSummary>> {
        if region.offset_bytes % SECTOR_SIZE != 0 || region.len_bytes % SECTOR_SIZE != 0 {
            return Err(JournalError::Invalid(format!("journal region {region:?} is not sector aligned")));
        }
        DevError::check_range("journal region", region.offset_bytes, region.len_bytes, dev.len())?;
        let region_sectors = region.len_bytes / SECTOR_SIZE;
        let mut out = Vec::new();
        let mut chunk = vec![0u8; SCAN_CHUNK_BYTES.min(region.len_bytes) as usize];
        let mut chunk_start = 0u64;
        while chunk_start < region_sectors {
            let n = ((region_sectors - chunk_start) * SECTOR_SIZE).min(chunk.len() as u64) as usize;
            dev.read_at(&mut chunk[..n], region.offset_bytes + chunk_start * SECTOR_SIZE)?;
            for (i, sector_bytes) in chunk[..n].chunks_exact(SECTOR_SIZE as usize).enumerate() {
                if sector_bytes[..8] != JOURNAL_MAGIC {
                    continue;
                }
                let sector = chunk_start + i as u64;
                let summary = match RecordHeader::decode(sector_bytes) {
                    Err(e) => RecordSummary { sector, header: None, problem: Some(e.to_string()) },
                    Ok(h) => {
                        let len = h.record_bytes().min((region_sectors - sector) * SECTOR_SIZE) as usize;
                        let mut buf = vec![0u8; len];
                        dev.read_at(&mut buf, region.offset_bytes + sector * SECTOR_SIZE)?;
                        let problem =
                            format::decode_record(&buf, sector, set_uuid).err().map(|e| e.to_string());
                        RecordSummary { sector, header: Some(h), problem }
                    }
                };
                out.push(summary);
            }
            chunk_start += n as u64 / SECTOR_SIZE;
        }
        Ok(out)
    }

    /// Scan + chain walk + ring positioning (see the module doc).
    fn replay(&self) -> JournalResult<Replay> {
        let region_sectors = self.region.len_bytes / SECTOR_SIZE;
        let mut stats = ReplayStats::default();
        // 1. Scan for candidate headers.
        let mut candidates: Vec<RecordHeader> = Vec::new();
        let mut damaged: HashMap<u64, Option<RecordHeader>> = HashMap::new();
        let mut chunk = vec![0u8; SCAN_CHUNK_BYTES.min(self.region.len_bytes) as usize];
        let mut chunk_start = 0u64;
        while chunk_start < region_sectors {
            let n = ((region_sectors - chunk_start) * SECTOR_SIZE).min(chunk.len() as u64) as usize;
            self.read_region(chunk_start, &mut chunk[..n])?;
            stats.bytes_scanned += n as u64;
            for (i, sector_bytes) in chunk[..n].chunks_exact(SECTOR_SIZE as usize).enumerate() {
                if sector_bytes[..8] != JOURNAL_MAGIC {
                    continue;
                }
                let sector = chunk_start + i as u64;
                match RecordHeader::decode(sector_bytes) {
                    Ok(h)
                        if h.sector == sector
                            && h.set_uuid == self.set_uuid
                            && sector + u64::from(h.record_sectors) <= region_sectors =>
                    {
                        candidates.push(h);
                    }
                    Ok(h) if h.set_uuid != self.set_uuid => {} // another format's leftover
                    Ok(h) => {
                        damaged.insert(sector, Some(h));
                    }
                    Err(_) => {
                        damaged.insert(sector, None);
                    }
                }
            }
            chunk_start += n as u64 / SECTOR_SIZE;
        }
        // 2. Verify candidates' crc.
        let mut valid: HashMap<u64, RecordHeader> = HashMap::new();
        for h in candidates {
            let mut buf = vec![0u8; h.record_bytes() as usize];
            self.read_region(h.sector, &mut buf)?;
            stats.bytes_scanned += buf.len() as u64;
            match format::decode_record(&buf, h.sector, self.set_uuid) {
                Ok(_) => {
                    valid.insert(h.sector, h);
                }
                Err(_) => {
                    damaged.insert(h.sector, Some(h));
                }
            }
        }
        stats.valid_records = valid.len() as u64;
        stats.damaged_records = damaged.len() as u64;

        let Some(newest) = valid.values().max_by_key(|h| h.last_seq()).copied() else {
            // Nothing valid: a fresh journal, or one whose only record was torn.
            stats.torn_tail = damaged.values().any(|h| h.is_some_and(|h| h.prev_seq == 0));
            if stats.torn_tail && self.cfg.recovery_mode == RecoveryMode::AbsoluteConsistency {
                return Err(JournalError::Corrupted(
                    "the only journal record is damaged (torn write)".into(),
                ));
            }
            if damaged.values().any(|h| h.is_some_and(|h| h.prev_seq != 0)) {
                return Err(JournalError::Corrupted(format!(
                    "no valid journal record, but {} damaged records of this cache set that are not the first",
                    damaged.len()
                )));
            }
            return Ok(Replay { checkpoint: None, entries: Vec::new(), stats });
        };

        // 3. Walk back from the newest record, decoding, until the needed start is reached.
        let mut chain: Vec<(RecordHeader, Vec<JournalEntry>)> = Vec::new();
        let mut checkpoint: Option<(u64, CheckpointEntry)> = None;
        let mut cur = newest;
        loop {
            let entries = self.read_record(&cur)?;
            if checkpoint.is_none() {
                for (i, e) in entries.iter().enumerate().rev() {
                    if let JournalEntry::Checkpoint(c) = e {
                        checkpoint = Some((cur.first_seq + i as u64, c.clone()));
                        break;
                    }
                }
            }
            let (prev_seq, prev_sector, first_seq) = (cur.prev_seq, cur.prev_sector, cur.first_seq);
            chain.push((cur, entries));
            let needed_from = checkpoint.as_ref().map_or(1, |(_, c)| c.replay_from);
            if first_seq <= needed_from || prev_seq == 0 {
                break;
            }
            if chain.len() > valid.len() {
                return Err(JournalError::Corrupted("journal chain loops".into()));
            }
            match valid.get(&prev_sector) {
                Some(p) if p.last_seq() == prev_seq => cur = *p,
                _ => {
                    let what = if damaged.contains_key(&prev_sector) { "is damaged" } else { "is missing" };
                    return Err(JournalError::Corrupted(format!(
                        "journal record at sector {prev_sector} (entries up to seq {prev_seq}) {what}, \
                         but newer records up to seq {} exist and entries from seq {needed_from} are needed \
                         (corruption in the middle of the journal)",
                        newest.last_seq()
                    )));
                }
            }
        }
        chain.reverse();
        let replay_from = checkpoint.as_ref().map_or(1, |(_, c)| c.replay_from);
        if let Some((cp_seq, c)) = &checkpoint
            && c.replay_from > *cp_seq
        {
            return Err(JournalError::Corrupted(format!(
                "checkpoint at seq {cp_seq} claims replay from later seq {}",
                c.replay_from
            )));
        }
        if chain.first().is_some_and(|(h, _)| h.first_seq > replay_from) {
            return Err(JournalError::Corrupted(format!(
                "journal starts at seq {} but replay must start at {replay_from}",
                chain[0].0.first_seq
            )));
        }

        // 4. Torn tail: a damaged record where the next one would be.
        let newest_end = newest.sector + u64::from(newest.record_sectors);
        // Right after the newest record, a damaged header that links to it, or an unreadable
        // header (the header sector itself torn); at sector 0 (the successor wrapped) only a
        // header that links to the newest record counts, since old damaged records lie there.
        let links_to_newest = |h: &Option<RecordHeader>| {
            h.is_some_and(|h| h.prev_seq == newest.last_seq() && h.prev_sector == newest.sector)
        };
        let at_end = newest_end < region_sectors
            && damaged.get(&newest_end).is_some_and(|h| h.is_none() || links_to_newest(h));
        let at_start = newest_end != 0 && damaged.get(&0).is_some_and(links_to_newest);
        stats.torn_tail = at_end || at_start;
        if stats.torn_tail && self.cfg.recovery_mode == RecoveryMode::AbsoluteConsistency {
            return Err(JournalError::Corrupted(format!(
                "damaged journal record after seq {} (torn tail; AbsoluteConsistency refuses it)",
                newest.last_seq()
            )));
        }

        // 5. Collect entries and position the ring.
        let mut entries = Vec::new();
        let mut ring = self.ring.lock();
        let mut prev_end: Option<u64> = None;
        for (h, es) in &chain {
            for (i, e) in es.iter().enumerate() {
                let seq = h.first_seq + i as u64;
                if seq >= replay_from && !matches!(e, JournalEntry::Checkpoint(_)) {
                    entries.push((seq, e.clone()));
                }
            }
            if h.last_seq() >= replay_from {
                let sectors = u64::from(h.record_sectors);
                let waste_before = match prev_end {
                    Some(end) if h.sector == 0 && end != 0 && end < region_sectors => region_sectors - end,
                    _ => 0,
                };
                ring.records.push_back(RecordLoc {
                    last_seq: h.last_seq(),
                    sector: h.sector,
                    sectors,
                    waste_before,
                });
                ring.used_sectors += sectors + waste_before;
                prev_end = Some(h.sector + sectors);
            }
        }
        ring.tail = newest_end % region_sectors;
        ring.prev = (newest.last_seq(), newest.sector);
        ring.durable_checkpoint = checkpoint.as_ref().map(|(s, c)| (*s, c.replay_from));
        self.used_sectors_hint.store(ring.used_sectors, Ordering::Release);
        drop(ring);
        // New seqs continue after every seq seen in any valid record, so even a stale record can
        // never share a seq with a new one.
        let max_seen = valid.values().map(RecordHeader::last_seq).max().unwrap_or(0);
        self.pending.lock().first_seq = max_seen + 1;
        self.durable_seq.store(newest.last_seq(), Ordering::Release);
        stats.chain_records = chain.len() as u64;
        stats.replayed_entries = entries.len() as u64;
        stats.first_seq = if entries.is_empty() { 0 } else { replay_from };
        stats.last_seq = newest.last_seq();
        Ok(Replay { checkpoint, entries, stats })
    }
}
