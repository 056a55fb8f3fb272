//! Engine hooks for the background writeback thread ([`crate::writeback`]) and the control
//! target ([`crate::engine_ctl`]): a dirty-key scan for a key buffer, a coalescing writeback of
//! a batch of keys, and a usage report. The engine's own writeback (`Shared::writeback_step`,
//! for `write_back_all`, `detach`, flush-first mode switches and a full cache) runs the same
//! writeback path.
//!
//! # Crash ordering of [`CacheSet::write_back_keys`] (rules 4 and 6)
//! 1. The dirty keys (and with them the removal of the older clean keys they replaced) are
//!    durable before their data reaches backing. Otherwise a durable older clean key could
//!    survive a crash over backing that already holds newer data, and the sector's value would
//!    change later by itself, on eviction. [`CacheSet::write_back_scanned`] commits only when
//!    the journal is not yet durable up to the scan the keys came from
//!    ([`DirtyScan::journal_seq`]): a key still in the tree exactly as scanned was journalled
//!    at or before that seq (a new write gets new sectors, so an identical key is the same
//!    insertion). [`CacheSet::write_back_keys`] does not know the scan and commits everything.
//! 2. Take the writeback range lock of every coalesced write of the call (in (device, offset)
//!    order), *then* check under the metadata lock that every key is still in the tree exactly
//!    as scanned (and pin its bucket). The keys come from a key buffer filled earlier; a
//!    writethrough or bypass write may have written newer data to backing since. Such a write
//!    holds the range lock from its backing write to its tree update, so once we hold the lock
//!    and still find the key, no newer backing write of the range exists or can start until we
//!    are done: a stale copy can never land on backing after newer data. All keys are locked
//!    and checked before any data moves, so the copies can run back to back (`wb_copy.rs`);
//!    a writethrough write into the call's ranges waits for the whole call.
//! 3. Copy the cached data to backing (in the kernel between buffered files, else through a
//!    buffer, with the backing writes on a second thread), sync every backing device written.
//! 4. Only then journal the keys clean with replace semantics: a key overwritten meanwhile (a
//!    writeback-mode write does not take the range lock) stays dirty and is written back later.
//!    Keys adjacent on backing and in one cache bucket are marked clean by one replace of the
//!    whole run (replace works sector by sector, so this is exactly one replace per key, with
//!    one journal entry instead of many, and leaves one clean key). The clean entries need no
//!    commit of their own: until one is durable the key is dirty after a crash and is written
//!    back again, which is harmless (backing already holds that data, and no newer backing
//!    write of the range can have happened while the key stayed in the tree, rule 2).
//!
//! # Foreground priority
//! Foreground reads need the metadata lock for their lookup, so writeback holds it only for
//! bounded chunks of CPU work ([`META_CHUNK_KEYS`] keys or runs at a time) and never across
//! data I/O or a journal commit (`Shared::commit_through` runs without it, see `set.rs`).

use super::CachedDev;
use super::error::{CacheError, CacheResult};
use super::inflight::DevRange;
use super::set::{CacheSet, Shared};
use super::stats::Stats;
use super::wb_copy::{CopyRun, Pins, copy_runs};
use crate::alloc::{AllocError, BucketState, OpenKind};
use crate::dev::SECTOR_SIZE;
use crate::wbpolicy::{CoalesceLimits, DirtyExtent, coalesce};
use std::sync::atomic::Ordering;
use ubcache_btree::{Key, Pos, Segment};

/// Keys validated or marked clean per hold of the metadata lock: a foreground read waits for
/// at most this much writeback bookkeeping (about a microsecond per key).
pub(crate) const META_CHUNK_KEYS: usize = 32;

/// Dirty keys found by [`CacheSet::scan_dirty`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyScan {
    /// Dirty keys of attached devices, in (device, offset) order.
    pub keys: Vec<Key>,
    /// Where the next scan continues; `None` at the end of the tree (a full pass is done).
    pub next: Option<Pos>,
    /// The last journal seq appended when the scan ran: every key of the scan was journalled
    /// at or before it (pass it to [`CacheSet::write_back_scanned`]).
    pub journal_seq: u64,
}

/// What one [`CacheSet::write_back_keys`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WritebackReport {
    /// Keys written home and journalled clean (a key overwritten after its backing write is
    /// counted here too; it stays dirty in the tree).
    pub keys_written: usize,
    /// Keys skipped: overwritten, invalidated or reclaimed since the scan, not dirty, of a
    /// device not in this set, or overlapping an earlier key of the same call.
    pub keys_skipped: usize,
    /// Bytes written to backing.
    pub bytes_written: u64,
    /// Backing writes issued (contiguous keys are coalesced into one write).
    pub backing_writes: usize,
}

/// Space use of the cache device and the journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    pub bucket_bytes: u64,
    pub buckets_total: u64,
    /// Allocatable now or once a generation bump is durable.
    pub buckets_free: u64,
    /// Data buckets (sealed or open) without dirty sectors.
    pub buckets_clean: u64,
    /// Data buckets (sealed or open) holding dirty sectors.
    pub buckets_dirty: u64,
    /// Btree nodes, journal, superblocks and bucket tables.
    pub buckets_metadata: u64,
    /// Buckets pinned now by an in-flight read or writeback copy (they cannot be reused until
    /// it ends): 0 whenever the set is idle.
    pub buckets_pinned: u64,
    /// Dirty bytes in the whole tree (including devices not attached now).
    pub dirty_bytes: u64,
    /// Dirty bytes of attached devices: what writeback can write home now.
    pub attached_dirty_bytes: u64,
    /// Bytes of the cache that can hold data.
    pub data_capacity_bytes: u64,
    pub journal_used_bytes: u64,
    pub journal_capacity_bytes: u64,
}

impl CacheSet {
    /// Up to `max` dirty keys of attached devices sorting after `from`, in offset order (the
    /// refill of a writeback key buffer).
    pub fn scan_dirty(&self, from: Pos, max: usize) -> CacheResult<DirtyScan> {
        let attached: Vec<u32> = self
            .shared
            .backings
            .iter()
            .filter(|b| !b.detached.load(Ordering::Acquire))
            .map(|b| b.dev_id)
            .collect();
        let wanted = |k: &Key| k.dirty && attached.contains(&k.dev);
        let mut keys = Vec::new();
        let mut m = self.shared.lock_meta()?;
        let next = m.tree.scan(from, &wanted, max.max(1), &mut keys)?;
        // Read under the metadata lock: entries are appended under it, so every key seen was
        // appended at or before this seq.
        let journal_seq = self.shared.journal.last_appended_seq();
        drop(m);
        Ok(DirtyScan { keys, next, journal_seq })
    }

    /// Writes `keys` home (see the module doc for the ordering): contiguous keys of one device
    /// are coalesced into one backing write within `limits` (in sectors). Keys no longer in the
    /// tree as given are skipped, so a key buffer filled earlier is safe to pass. Commits every
    /// pending journal entry first; [`CacheSet::write_back_scanned`] commits only when needed.
    pub fn write_back_keys(&self, keys: &[Key], limits: CoalesceLimits) -> CacheResult<WritebackReport> {
        self.shared.write_back_scanned(keys, u64::MAX, limits)
    }

    /// [`CacheSet::write_back_keys`] for keys that all come from scans whose
    /// [`DirtyScan::journal_seq`] is at most `scanned_seq`: the journal is committed first only
    /// if it is not yet durable through `scanned_seq` (rule 1 of the module doc). Passing a
    /// lower seq than the scan's breaks crash safety.
    pub fn write_back_scanned(
        &self,
        keys: &[Key],
        scanned_seq: u64,
        limits: CoalesceLimits,
    ) -> CacheResult<WritebackReport> {
        self.shared.write_back_scanned(keys, scanned_seq, limits)
    }
}

impl Shared {
    /// Whether `dev` is one of this set's devices and not detached.
    pub(crate) fn is_attached(&self, dev: u32) -> bool {
        self.backings.iter().any(|b| b.dev_id == dev && !b.detached.load(Ordering::Acquire))
    }

    /// [`CacheSet::write_back_scanned`].
    pub(crate) fn write_back_scanned(
        &self,
        keys: &[Key],
        scanned_seq: u64,
        limits: CoalesceLimits,
    ) -> CacheResult<WritebackReport> {
        let sh = self;
        let mut report = WritebackReport::default();
        let mut wanted: Vec<Key> = keys
            .iter()
            .filter(|k| k.dirty && self.backings.iter().any(|b| b.dev_id == k.dev))
            .copied()
            .collect();
        report.keys_skipped += keys.len() - wanted.len();
        wanted.sort_by_key(|k| (k.dev, k.start()));
        // Keys of one scan never overlap; keys from two scans might. Keep the first of any
        // overlap (the other is re-read from the tree by a later scan).
        let mut sorted: Vec<Key> = Vec::with_capacity(wanted.len());
        for k in wanted {
            match sorted.last() {
                Some(p) if p.dev == k.dev && k.start() < p.end => report.keys_skipped += 1,
                _ => sorted.push(k),
            }
        }
        if sorted.is_empty() {
            return Ok(report);
        }
        // Rule (1) of the module doc.
        self.commit_through(scanned_seq)?;
        let extents: Vec<DirtyExtent> =
            sorted.iter().map(|k| (k.dev, k.start(), u64::from(k.size))).collect();
        let batches =
            coalesce(&extents, limits).map_err(|e| CacheError::Invalid(format!("writeback batch: {e}")))?;
        // Locks are taken in (device, offset) order; every other holder of several range locks
        // does the same, and foreground writers hold one at a time, so they cannot deadlock.
        let mut guards = Vec::with_capacity(batches.len());
        let mut segments = Vec::with_capacity(2 * META_CHUNK_KEYS);
        // The keys validated and pinned, and the contiguous runs they form (one backing write
        // each), in (device, offset) order.
        let mut valid: Vec<Key> = Vec::new();
        let mut runs: Vec<CopyRun> = Vec::new();
        let mut pins = Pins::default();
        for batch in batches {
            let Some(backing) = sh.backings.iter().position(|b| b.dev_id == batch.dev) else {
                report.keys_skipped += batch.extents.len();
                continue;
            };
            guards.push(sh.wb_locks.lock(DevRange {
                dev: batch.dev,
                start: batch.start,
                end: batch.start + batch.len,
            }));
            // Runs never span two batches: a batch is one range lock and at most one write.
            let first_run_of_batch = runs.len();
            // Rule (2): validate and pin under the lock, a chunk of keys per hold (a key
            // validated earlier stays pinned, and one overwritten meanwhile by a writeback-mode
            // write stays dirty by replace semantics in step 4).
            for chunk in sorted[batch.extents.clone()].chunks(META_CHUNK_KEYS) {
                let mut m = sh.lock_meta()?;
                // One lookup over the chunk's span (its keys are sorted, non-overlapping and of
                // one device): a key is still there exactly as scanned iff the segment that
                // starts where it starts is that key, as a lookup of the key's own range would
                // say (a new write gets new cache sectors, so the pointer tells insertions apart).
                let (Some(lo), Some(hi)) = (chunk.first(), chunk.last()) else { continue };
                m.tree.lookup_into(batch.dev, lo.start(), hi.end, &mut segments)?;
                let mut seg = 0;
                for k in chunk {
                    while segments.get(seg).is_some_and(|s| s.start() < k.start()) {
                        seg += 1;
                    }
                    if segments.get(seg) != Some(&Segment::Cached(*k)) {
                        report.keys_skipped += 1;
                        continue;
                    }
                    let extends =
                        runs.len() > first_run_of_batch && valid.last().is_some_and(|p| p.end == k.start());
                    // One pin per bucket and generation in a row: pins are all released
                    // after the last copy, so the pin an earlier key took covers this one.
                    if !pins.covers(sh.bucket_of(k.ptr.offset), k.ptr.generation) {
                        match m.alloc_mut().pin(k.ptr.offset, k.ptr.generation) {
                            Ok(b) => pins.push(b, k.ptr.generation),
                            Err(AllocError::Stale { .. }) => {
                                report.keys_skipped += 1;
                                continue;
                            }
                            Err(e) => {
                                pins.release(&mut m)?;
                                return sh.fail(e.into());
                            }
                        }
                    }
                    match runs.last_mut() {
                        Some(run) if extends => run.keys.end += 1,
                        _ => runs.push(CopyRun { backing, keys: valid.len()..valid.len() + 1 }),
                    }
                    valid.push(*k);
                }
            }
        }
        // Rule (3), first half: copy every run home. The pins keep the cached data where it is
        // until the copies are done, whatever happens.
        let copied = copy_runs(self, &runs, &valid);
        pins.release(&mut sh.meta.lock())?;
        copied?;
        let mut touched: Vec<usize> = runs.iter().map(|r| r.backing).collect();
        touched.dedup();
        report.backing_writes = runs.len();
        report.bytes_written = valid.iter().map(|k| u64::from(k.size) * SECTOR_SIZE).sum();
        let done = valid;
        // Rule (3): backing durable before any key is journalled clean.
        for &b in &touched {
            sh.backings[b].dev.sync()?;
        }
        // Rule (4), a chunk of runs per hold of the metadata lock. Keys that were written one
        // after another sit side by side on backing and in one cache bucket: such a run is
        // marked clean by one replace of the whole run, expecting the run's mapping. Replace
        // works sector by sector (a sector is replaced iff it is still mapped as expected), so
        // this does exactly what one replace per key does, with one lookup, one tree update
        // and one journal entry instead of one per key, and the run ends up as one clean key.
        let runs = self.clean_runs(&done);
        for chunk in runs.chunks(META_CHUNK_KEYS) {
            let mut m = sh.lock_meta()?;
            for dirty in chunk {
                let clean = Key { dirty: false, ..*dirty };
                if let Err(e) = sh.replace_locked(&mut m, clean, Some(dirty)) {
                    return sh.fail(e);
                }
                Stats::add(&sh.stats.written_back_bytes, u64::from(dirty.size) * SECTOR_SIZE);
            }
        }
        // The clean entries are committed when enough are pending (bounding the journal
        // buffer), without the metadata lock.
        if sh.wants_commit() {
            sh.commit()?;
        }
        drop(guards);
        report.keys_written = done.len();
        Ok(report)
    }

    /// `keys` (sorted, non-overlapping, dirty) merged into the fewest keys with the same
    /// sector-by-sector mapping: adjacent on one device, adjacent in the cache, of one
    /// generation and within one bucket (a key never spans buckets: buckets are reused one by
    /// one, and the allocator counts a key's sectors in the bucket its pointer names).
    fn clean_runs(&self, keys: &[Key]) -> Vec<Key> {
        let mut runs: Vec<Key> = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(run) = runs.last_mut()
                && run.dev == k.dev
                && run.end == k.start()
                && run.ptr.generation == k.ptr.generation
                && run.ptr.offset + u64::from(run.size) == k.ptr.offset
                && self.bucket_of(run.ptr.offset) == self.bucket_of(k.ptr.offset + u64::from(k.size) - 1)
                && let Some(size) = run.size.checked_add(k.size)
            {
                run.end = k.end;
                run.size = size;
                continue;
            }
            runs.push(*k);
        }
        runs
    }
}

impl CacheSet {
    /// Ends a flush: commits, and marks every attached backing device without dirty data (and
    /// no dirty write in flight) Clean in its superblock.
    pub fn finish_flush(&self) -> CacheResult<()> {
        {
            let mut m = self.shared.lock_meta()?;
            self.shared.commit_locked(&mut m)?;
        }
        self.shared.mark_clean_if_no_dirty()
    }

    /// Bucket, dirty and journal usage now.
    pub fn usage(&self) -> CacheResult<CacheUsage> {
        let sh = &self.shared;
        let g = &sh.geometry;
        let mut u = CacheUsage {
            bucket_bytes: g.bucket_bytes(),
            buckets_total: g.nbuckets,
            data_capacity_bytes: self.data_capacity_bytes(),
            journal_capacity_bytes: g.journal_region().len_bytes,
            ..CacheUsage::default()
        };
        u.journal_used_bytes = sh.journal.stats().used_sectors * SECTOR_SIZE;
        let m = sh.lock_meta()?;
        for b in m.alloc().buckets() {
            u.buckets_pinned += u64::from(b.pins > 0);
            match b.state {
                BucketState::Free | BucketState::FreePending { .. } => u.buckets_free += 1,
                BucketState::Data | BucketState::Open(OpenKind::Data) if b.dirty_sectors > 0 => {
                    u.buckets_dirty += 1;
                }
                BucketState::Data | BucketState::Open(OpenKind::Data) => u.buckets_clean += 1,
                BucketState::Btree
                | BucketState::Open(OpenKind::Btree)
                | BucketState::Journal
                | BucketState::Reserved => {
                    u.buckets_metadata += 1;
                }
            }
        }
        let stats = m.tree.stats();
        drop(m);
        u.dirty_bytes = stats.dirty_sectors * SECTOR_SIZE;
        u.attached_dirty_bytes = stats
            .dirty_sectors_by_dev
            .iter()
            .filter(|(dev, _)| sh.is_attached(**dev))
            .map(|(_, s)| s * SECTOR_SIZE)
            .sum();
        Ok(u)
    }

    /// The sequential cutoff in force (bytes; 0: never bypass).
    #[must_use]
    pub fn sequential_cutoff(&self) -> u64 {
        self.shared.seq.lock().cutoff()
    }
}

impl CachedDev {
    /// Whether the device was detached from its cache set (requests then go straight to it).
    #[must_use]
    pub fn is_detached(&self) -> bool {
        self.backing.detached.load(Ordering::Acquire)
    }
}

impl CacheSet {
    /// Bytes of the cache device that can hold data (buckets outside the fixed metadata): the
    /// cache size the writeback rate controller's dirty target is a percentage of.
    #[must_use]
    pub fn data_capacity_bytes(&self) -> u64 {
        let g = &self.shared.geometry;
        g.nbuckets.saturating_sub(g.first_free_bucket()) * u64::from(g.bucket_sectors) * SECTOR_SIZE
    }
}
