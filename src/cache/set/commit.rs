//! Commits (FLUSH), checkpoints, GC, reclaim and data allocation: every step that makes
//! metadata durable or frees space, with the crash-ordering rule each keeps (rules 1-3 of the
//! module doc of [`super`]).

use super::{Meta, Shared, all_keys};
use crate::alloc::{AllocError, OpenKind, SectorAlloc};
use crate::cache::error::{CacheError, CacheResult};
use crate::cache::stats::Stats;
use crate::dev::BlockDev;
use crate::failpoints;
use crate::format::{self, CheckpointEntry, JournalEntry};
use std::sync::atomic::{AtomicU64, Ordering};

/// Priority every bucket loses per bucket's worth of data written into the cache (LRU aging, as
/// bcache decays priorities by I/O volume): a bucket neither written nor read while 4096
/// buckets of data were written reaches 0 from the initial priority (32768). A read hit resets
/// its bucket to the initial priority, so LRU takes the buckets unused for the longest.
const PRIO_DECAY_PER_BUCKET_WRITTEN: u16 = 8;

/// Completed writes of a backing device, and how many of them a completed sync covers. Counts,
/// not a flag: with commits running concurrently (they do not hold the metadata lock), a flag
/// cleared by one committer whose sync is still running would let another one journal entries
/// whose backing data no sync has covered yet.
#[derive(Debug, Default)]
pub(crate) struct BackingSyncState {
    written: AtomicU64,
    synced: AtomicU64,
}

impl BackingSyncState {
    /// A write to the device completed (call after it returns, before its journal entries).
    pub(crate) fn note_write(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }

    /// Makes every write that completed before this call durable, syncing only if some was not
    /// covered by a sync that already completed.
    pub(crate) fn sync(&self, dev: &dyn BlockDev) -> CacheResult<()> {
        let written = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= written {
            return Ok(());
        }
        dev.sync()?;
        self.synced.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }
}

impl Shared {
    /// Commits every appended journal entry, after making the data they reference durable:
    /// backing devices that took writes, then the cache device (crash rule 1). For steps that
    /// must commit in the middle of a locked update; everything else uses [`Shared::commit`].
    pub(crate) fn commit_locked(&self, m: &mut Meta) -> CacheResult<()> {
        // With the lock held nothing is appended meanwhile: every pending entry is committed.
        let last = self.journal.last_appended_seq();
        self.sync_and_commit_through(last)?;
        if self.journal.needs_checkpoint() && !m.in_checkpoint {
            self.checkpoint_locked(m)?;
        }
        Ok(())
    }

    /// Commits every entry appended so far *without* holding the metadata lock across the syncs
    /// and the journal write, so lookups (reads) and other updates go on meanwhile. This is
    /// FLUSH. Must not be called with the metadata lock held (a checkpoint it starts takes it).
    pub(crate) fn commit(&self) -> CacheResult<()> {
        self.commit_through(self.journal.last_appended_seq())
    }

    /// [`Shared::commit`] through entry `seq` (at most what was appended). Crash rule 1 holds
    /// without the lock: every entry up to `seq` was appended after its data writes completed
    /// (and its backing writes were counted, `BackingSyncState`); the backing devices and the
    /// cache are synced after that, and `Journal::commit_through` writes no entry appended
    /// later, whose data may not be synced.
    pub(crate) fn commit_through(&self, seq: u64) -> CacheResult<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(CacheError::Failed("an earlier metadata update failed half-way".into()));
        }
        self.sync_and_commit_through(seq.min(self.journal.last_appended_seq()))?;
        if self.journal.needs_checkpoint() {
            let mut m = self.lock_meta()?;
            if self.journal.needs_checkpoint() && !m.in_checkpoint {
                self.checkpoint_locked(&mut m)?;
            }
        }
        Ok(())
    }

    /// Syncs the backing devices that took writes, then, if entries up to `upto` are not all
    /// durable, the cache device, and commits them. The caller read `upto` before this call.
    fn sync_and_commit_through(&self, upto: u64) -> CacheResult<()> {
        // Backing writes need a sync even with no entry to commit (a write that went around
        // the cache journals nothing): FLUSH covers them too.
        for b in &self.backings {
            b.sync_state.sync(b.dev.as_ref())?;
        }
        if self.journal.durable_seq() >= upto {
            return Ok(());
        }
        // A failed cache sync may have dropped dirty pages (Linux fsync semantics): nothing
        // written since the last good sync can be trusted, so the set stops here.
        if !failpoints::returns(failpoints::COMMIT_SKIP_CACHE_SYNC)
            && let Err(e) = self.cache.sync()
        {
            return self.fail(e.into());
        }
        if let Err(e) = self.journal.commit_through(upto) {
            return self.fail(e.into());
        }
        self.last_commit_seq.fetch_max(upto, Ordering::AcqRel);
        Stats::add(&self.stats.journal_commits, 1);
        Ok(())
    }

    /// Ends a locked update: releases the metadata lock, then commits (without it, see
    /// [`Shared::commit`]) if `now` (FUA) or [`Shared::wants_commit`].
    pub(crate) fn unlock_and_commit(
        &self,
        m: parking_lot::MutexGuard<'_, Meta>,
        now: bool,
    ) -> CacheResult<()> {
        let commit = now || self.wants_commit();
        drop(m);
        if commit { self.commit() } else { Ok(()) }
    }

    /// Whether enough entries are pending (or the journal wants a checkpoint) that an update
    /// should commit on its own (bounds memory and record size); the caller then commits with
    /// [`Shared::commit`] after releasing the metadata lock.
    pub(crate) fn wants_commit(&self) -> bool {
        let pending = self.journal.last_appended_seq().saturating_sub(self.journal.durable_seq());
        pending >= self.cfg.max_uncommitted_entries || self.journal.needs_checkpoint()
    }

    /// Checkpoint (crash rule 3): write out the btree nodes, sync, write the bucket table to the slot the
    /// last durable checkpoint does not name (synced), journal the checkpoint and commit; only
    /// then release older journal records and free the node slots the old tree used.
    pub(crate) fn checkpoint_locked(&self, m: &mut Meta) -> CacheResult<()> {
        let result = self.checkpoint_inner(m);
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.fail(e),
        }
    }

    fn checkpoint_inner(&self, m: &mut Meta) -> CacheResult<()> {
        m.in_checkpoint = true;
        let r = self.checkpoint_steps(m);
        m.in_checkpoint = false;
        r
    }

    fn checkpoint_steps(&self, m: &mut Meta) -> CacheResult<()> {
        if m.alloc().wants_gc() {
            self.gc_locked(m)?;
        }
        // The node write-out puts every changed node in a fresh slot: make sure free buckets for them
        // exist (reclaiming clean data if needed), or the checkpoint - the very thing that frees
        // space - would fail for lack of space.
        //
        // How many nodes the write-out allocates is not known in advance (the btree reports no
        // count of changed nodes): every journal entry since the last checkpoint changed at most
        // one leaf plus a split up the tree, and no more nodes than are cached can change.
        let stats = m.tree.stats();
        let entries = self.journal.last_appended_seq().saturating_sub(m.checkpoint_from) + 1;
        let changed = (stats.cached_nodes as u64).min(entries.saturating_mul(u64::from(stats.depth.max(1))));
        let needed = (changed * self.geometry.node_bytes())
            .div_ceil(self.geometry.bucket_bytes())
            .min(self.geometry.nbuckets / 4)
            + 2;
        while m.alloc().free_buckets() < needed {
            if self.reclaim_locked(m)? == 0 {
                break;
            }
        }
        let cp = m.tree.write_out()?;
        // The new nodes (and every data write they reference) durable before the checkpoint
        // record can name them.
        self.cache.sync()?;
        let slot = m.table_slot.other();
        let table_seq = m.table_seq + 1;
        let table = m.alloc().table(table_seq);
        format::write_bucket_table(self.cache.as_ref(), &self.geometry, self.sb.set_uuid, slot, &table)?;
        let replay_from = self.journal.last_appended_seq() + 1;
        self.journal.append(&[JournalEntry::Checkpoint(CheckpointEntry {
            root: cp.root,
            table_slot: slot,
            table_seq,
            replay_from,
        })])?;
        for b in &self.backings {
            b.sync_state.sync(b.dev.as_ref())?;
        }
        self.journal.commit_all()?;
        m.table_slot = slot;
        m.table_seq = table_seq;
        m.checkpoint_from = replay_from;
        self.journal.release_before(replay_from)?;
        m.tree.store_mut().free_slots(&cp.freed)?;
        Stats::add(&self.stats.checkpoints, 1);
        Ok(())
    }

    /// Removes every stale pointer (generation behind its bucket) from the btree, so bucket
    /// generations may keep advancing without wrapping onto an old pointer.
    fn gc_locked(&self, m: &mut Meta) -> CacheResult<()> {
        let snapshot = m.alloc().gc_begin();
        let keys = all_keys(&mut m.tree)?;
        for k in keys {
            let b = self.bucket_of(k.ptr.offset);
            let current = m.alloc().bucket(b).map(|x| x.generation);
            if current != Some(k.ptr.generation) {
                self.invalidate_locked(m, k.dev, k.start(), k.end)?;
            }
        }
        m.alloc_mut().gc_finish(&snapshot);
        Ok(())
    }

    /// Invalidates up to `reclaim_batch` clean buckets for reuse (crash rule 2: the generation
    /// bumps are journalled and committed before the buckets become allocatable). Returns how
    /// many buckets were freed.
    pub(crate) fn reclaim_locked(&self, m: &mut Meta) -> CacheResult<usize> {
        if m.alloc().wants_gc() {
            self.gc_locked(m)?;
        }
        let policy = *self.reclaim_policy.lock();
        let changes = m.alloc_mut().reclaim(policy, self.cfg.reclaim_seed, self.cfg.reclaim_batch);
        let Some(last) = changes.last().map(|c| c.token) else {
            return Ok(0);
        };
        let entries: Vec<JournalEntry> = changes.iter().map(crate::alloc::GenChange::entry).collect();
        self.append_locked(m, &entries)?;
        if !failpoints::returns(failpoints::RECLAIM_SKIP_GEN_COMMIT) {
            self.commit_locked(m)?;
        }
        let freed = m.alloc_mut().mark_gens_durable(last);
        Stats::add(&self.stats.buckets_reclaimed, freed as u64);
        Ok(freed)
    }

    /// Allocates up to `sectors` data sectors (pinned), reclaiming clean buckets if needed.
    /// `None`: nothing can be freed without writeback.
    pub(crate) fn alloc_data_locked(&self, m: &mut Meta, sectors: u32) -> CacheResult<Option<SectorAlloc>> {
        for _ in 0..4 {
            match m.alloc_mut().alloc_sectors(OpenKind::Data, sectors) {
                Ok(a) => {
                    m.sectors_since_decay += u64::from(a.sectors);
                    let bucket_sectors = u64::from(self.geometry.bucket_sectors).max(1);
                    if m.sectors_since_decay >= bucket_sectors {
                        m.sectors_since_decay -= bucket_sectors;
                        m.alloc_mut().decay_prios(PRIO_DECAY_PER_BUCKET_WRITTEN);
                    }
                    return Ok(Some(a));
                }
                Err(AllocError::NoSpace { .. }) => {
                    if self.reclaim_locked(m)? == 0 {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Allocates `sectors` in as many pieces as needed; on failure unpins what it got.
    pub(crate) fn alloc_extents_locked(
        &self,
        m: &mut Meta,
        sectors: u64,
    ) -> CacheResult<Option<Vec<SectorAlloc>>> {
        let mut got: Vec<SectorAlloc> = Vec::new();
        let mut left = sectors;
        while left > 0 {
            let want = left.min(u64::from(self.geometry.bucket_sectors)) as u32;
            match self.alloc_data_locked(m, want)? {
                Some(a) => {
                    left -= u64::from(a.sectors);
                    got.push(a);
                }
                None => {
                    m.unpin_allocs(&got)?;
                    return Ok(None);
                }
            }
        }
        Ok(Some(got))
    }
}
