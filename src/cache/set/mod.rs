//! The cache set: one cache device, its superblock, journal, bucket allocator and btree, shared by
//! the backing devices attached to it.
//!
//! Where each responsibility lives:
//! - this file: the state ([`CacheSet`], `Shared`, `Meta` under the metadata lock, `Backing`),
//!   the journalled key updates the data path and writeback make, and the small public API;
//! - `open.rs`: format, open with crash recovery, and the load path recovery and fsck share;
//! - `commit.rs`: commits (FLUSH), checkpoints, GC, reclaim and data allocation;
//! - `attach.rs`: attach, detach, cache mode, and the backing superblock state;
//! - writeback lives in [`super::writeback`], the cross-checks of fsck in [`super::verify`].
//!
//! # Locking
//! All metadata (btree, allocator, fill tracker) sits behind one mutex, `Shared::meta`. Data I/O
//! never runs under it: a request takes the lock to build its read mapping or allocate space,
//! drops it for the data transfer, and takes it again to insert keys. The commits of FLUSH, FUA
//! writes, writeback and full journal buffers (`Shared::commit`) run *outside* the lock, so
//! reads go on during their syncs: such a commit notes the last entry appended, syncs the
//! devices, and writes only the entries up to that one (`Journal::commit_through`), so an
//! entry appended meanwhile, whose data may not be synced yet, cannot slip into the record
//! (crash rule 1). Commits inside a larger locked step (reclaim, checkpoint, invalidation
//! before a backing write, attach/detach) still run under the lock (`Shared::commit_locked`),
//! where no entry can be appended meanwhile.
//!
//! # Crash ordering (rules 1-6 of docs/design.md), where each is kept
//! 1. Data before metadata: `Shared::commit` and `Shared::commit_locked` sync the backing
//!    devices that took writes (`BackingSyncState`) and the cache device *before* the journal
//!    commit. Entries are appended only after their data writes completed.
//! 2. Bucket reuse: `Shared::reclaim_locked` journals the generation bumps and commits before
//!    `mark_gens_durable` makes the buckets allocatable.
//! 3. Btree nodes: `Shared::checkpoint_locked` writes out the changed tree nodes, syncs, writes the bucket table
//!    (synced) to the slot the last checkpoint does not use, journals the checkpoint, commits,
//!    and only then releases journal space and frees the old node slots.
//! 4. Writeback: read cache, write backing, sync backing, then journal the key clean (replace).
//! 5. Reads pin buckets in the allocator from lookup to copy; fills register in the fill tracker.
//! 6. Backing writes hold the writeback range lock of their range.

mod attach;
mod commit;
mod open;

pub(crate) use commit::BackingSyncState;
pub use open::format;
pub(crate) use open::{Binding, all_keys, load};

use super::error::{CacheError, CacheResult};
use super::inflight::{DevRange, FillTracker, RangeLocks};
use super::policy::{CacheMode, CongestionTracker, DEFAULT_SEQUENTIAL_CUTOFF, SequentialDetector};
use super::stats::{Stats, StatsSnapshot};
use super::store::CacheStore;
use super::verify::{self, Report};
use super::writeback::tuning::WritebackTuning;
use crate::alloc::{AllocConfig, AllocError, Allocator, ReplacementPolicy, SectorAlloc};
use crate::dev::{BlockDev, SECTOR_SIZE};
use crate::format::{self, BackingSuperblock, CacheSuperblock, Geometry, JournalEntry, TableSlot, Uuid};
use crate::journal::{Journal, JournalConfig};
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use ubcache_btree::{Key, Pos, Tree, TreeConfig};

/// Default seed of the random replacement policy: any fixed value gives a reproducible victim
/// order.
const DEFAULT_RECLAIM_SEED: u64 = 0x5eed_ca57_e5e7_0001;

/// Tuning of a cache set (nothing here is part of the on-disk format).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub journal: JournalConfig,
    pub alloc: AllocConfig,
    pub tree: TreeConfig,
    /// Sequential streams longer than this bypass the cache (0: never).
    pub sequential_cutoff: u64,
    pub reclaim_policy: ReplacementPolicy,
    /// Seed of the random replacement policy (reproducible victim order); unused by the others.
    pub reclaim_seed: u64,
    /// Buckets invalidated per reclaim round.
    pub reclaim_batch: usize,
    /// Journal entries that may stay uncommitted before an update commits on its own, bounding
    /// the pending journal buffer in writeback mode without FLUSHes.
    pub max_uncommitted_entries: u64,
    /// Mode of every backing device when the set is opened (stored in each backing
    /// superblock), unless `stored_mode` is set.
    pub mode: CacheMode,
    /// Open each backing device in the mode its superblock stores (the last `set-mode`), and
    /// ignore `mode`.
    pub stored_mode: bool,
    /// Cache read latency (µs) over which read misses stop filling the cache; 0: never.
    pub congested_read_threshold_us: u64,
    /// Cache write latency (µs) over which writes bypass the cache; 0: never.
    pub congested_write_threshold_us: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            journal: JournalConfig::default(),
            alloc: AllocConfig::default(),
            tree: TreeConfig::default(),
            sequential_cutoff: DEFAULT_SEQUENTIAL_CUTOFF,
            reclaim_policy: ReplacementPolicy::Lru,
            reclaim_seed: DEFAULT_RECLAIM_SEED,
            reclaim_batch: 4,
            max_uncommitted_entries: 1024,
            mode: CacheMode::Writethrough,
            stored_mode: false,
            // Off in the library default, so a scheduling hiccup cannot change what a test
            // caches; `ubcache serve` turns on bcache's defaults (2 ms read, 20 ms write).
            congested_read_threshold_us: 0,
            congested_write_threshold_us: 0,
        }
    }
}

/// Geometry asked for at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatOptions {
    pub bucket_bytes: u64,
    pub node_bytes: u64,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self { bucket_bytes: format::DEFAULT_BUCKET_BYTES, node_bytes: 256 * 1024 }
    }
}

/// What recovery found when the set was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// Journal entries re-applied on top of the last checkpoint.
    pub replayed_entries: u64,
    /// A torn last journal record was dropped (its commit never returned).
    pub torn_tail: bool,
    /// Keys in the btree after replay.
    pub keys: u64,
    /// Dirty sectors found (data only the cache holds).
    pub dirty_sectors: u64,
    /// Btree nodes in use.
    pub nodes: u64,
}

/// Congestion state: latency averages of the cache device and the thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Congestion {
    pub read_latency_us: u64,
    pub write_latency_us: u64,
    pub read_threshold_us: u64,
    pub write_threshold_us: u64,
}

/// A backing device attached to the set.
#[derive(Debug)]
pub(crate) struct Backing {
    pub(crate) dev_id: u32,
    pub(crate) dev: Arc<dyn BlockDev>,
    pub(crate) data_offset: u64,
    /// Exported bytes (whole sectors).
    pub(crate) export_len: u64,
    pub(crate) mode: AtomicU8,
    /// Which completed writes of this device a sync has covered: the next commit/FLUSH syncs
    /// it if any has not been.
    pub(crate) sync_state: BackingSyncState,
    /// The backing superblock, and the dirty-write gate: writers that add dirty keys hold
    /// `dirty_writers` > 0 so writeback never marks the device Clean under them.
    pub(crate) sb: Mutex<BackingSb>,
    /// Detached from the set: requests go straight to the device (see `CachedDev::route`).
    pub(crate) detached: AtomicBool,
    /// Held (write) by `detach` and `attach` while they change `detached` and the superblocks,
    /// and (read) by every request that found the device detached, so a request never goes
    /// straight to backing while dirty data of it may still be in the cache, nor while attach
    /// is making the cache serve it again.
    pub(crate) passthrough_gate: parking_lot::RwLock<()>,
    /// Held by every write over its sector range, so a read-modify-write of a partial sector
    /// never interleaves with another write to that sector.
    pub(crate) rmw_locks: RangeLocks,
}

#[derive(Debug)]
pub(crate) struct BackingSb {
    pub(crate) sb: BackingSuperblock,
    pub(crate) dirty_writers: u64,
}

impl Backing {
    pub(crate) fn mode(&self) -> CacheMode {
        CacheMode::from_u8(self.mode.load(Ordering::Acquire)).unwrap_or(CacheMode::None)
    }
}

/// Metadata under the lock.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) tree: Tree<CacheStore>,
    pub(crate) fills: FillTracker,
    /// Slot and seq of the bucket table of the last durable checkpoint.
    table_slot: TableSlot,
    table_seq: u64,
    /// Where the next writeback scan starts.
    pub(crate) wb_cursor: Pos,
    /// A checkpoint is running: commits inside it must not start another one.
    in_checkpoint: bool,
    /// `replay_from` of the last checkpoint: entries since then bound how many nodes changed.
    checkpoint_from: u64,
    /// Data sectors allocated since the last priority decay.
    sectors_since_decay: u64,
}

impl Meta {
    /// The bucket allocator. It is kept inside the btree's node store because the btree takes
    /// node slots from it while it writes nodes out (`Tree::flush`); everything else names it
    /// here.
    pub(crate) fn alloc(&self) -> &Allocator {
        &self.tree.store().alloc
    }

    /// The bucket allocator, to change it (see [`Meta::alloc`]).
    pub(crate) fn alloc_mut(&mut self) -> &mut Allocator {
        &mut self.tree.store_mut().alloc
    }

    /// Releases the pins of data sectors that were allocated for a write.
    pub(crate) fn unpin_allocs(&mut self, allocs: &[SectorAlloc]) -> Result<(), AllocError> {
        for a in allocs {
            self.alloc_mut().unpin(a.bucket)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cache: Arc<dyn BlockDev>,
    pub(crate) sb: CacheSuperblock,
    /// The superblock as last written (its backing list and seq change on detach).
    sb_current: Mutex<CacheSuperblock>,
    pub(crate) geometry: Geometry,
    pub(crate) cfg: CacheConfig,
    pub(crate) journal: Journal,
    pub(crate) meta: Mutex<Meta>,
    pub(crate) wb_locks: RangeLocks,
    pub(crate) stats: Stats,
    pub(crate) backings: Vec<Arc<Backing>>,
    pub(crate) seq: Mutex<SequentialDetector>,
    /// Cache-device latency and the congestion thresholds.
    pub(crate) congestion: CongestionTracker,
    /// The replacement policy reclaim uses now (a runtime knob; stored in the superblock).
    reclaim_policy: Mutex<ReplacementPolicy>,
    /// Serializes whole-set writeback passes (two passes would write the same keys twice).
    pub(crate) writeback_pass: Mutex<()>,
    /// Writeback knobs and gauges, shared by the set's writeback thread and control target.
    pub(crate) writeback_tuning: Arc<WritebackTuning>,
    pub(crate) recovery: RecoveryReport,
    failed: AtomicBool,
    last_commit_seq: AtomicU64,
}

/// A cache set: open it with [`CacheSet::open`], get one [`super::CachedDev`] per backing device.
#[derive(Debug, Clone)]
pub struct CacheSet {
    pub(crate) shared: Arc<Shared>,
}

impl CacheSet {
    /// The cache-set uuid.
    #[must_use]
    pub fn uuid(&self) -> Uuid {
        self.shared.sb.set_uuid
    }

    /// What recovery found at open.
    #[must_use]
    pub fn recovery(&self) -> &RecoveryReport {
        &self.shared.recovery
    }

    /// The backing devices given to [`CacheSet::open`], in that order, as block devices served
    /// through the cache (or, while detached, straight from the device).
    #[must_use]
    pub fn devices(&self) -> Vec<super::CachedDev> {
        self.shared
            .backings
            .iter()
            .map(|b| super::CachedDev { shared: Arc::clone(&self.shared), backing: Arc::clone(b) })
            .collect()
    }

    /// The device with this dev id, if it was given to [`CacheSet::open`].
    #[must_use]
    pub fn device(&self, dev_id: u32) -> Option<super::CachedDev> {
        self.devices().into_iter().find(|d| d.dev_id() == dev_id)
    }

    /// Statistics counters, with the dirty-bytes gauge filled in.
    #[must_use]
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.shared.stats.snapshot();
        s.dirty_bytes = self.shared.meta.lock().tree.stats().dirty_sectors * SECTOR_SIZE;
        s
    }

    /// Changes the sequential cutoff at runtime (bytes; 0 disables bypassing).
    pub fn set_sequential_cutoff(&self, bytes: u64) {
        self.shared.seq.lock().set_cutoff(bytes);
    }

    /// Changes the congestion thresholds at runtime (microseconds; 0 disables either).
    pub fn set_congestion_thresholds(&self, read_us: Option<u64>, write_us: Option<u64>) {
        if let Some(us) = read_us {
            self.shared.congestion.set_read_threshold(us);
        }
        if let Some(us) = write_us {
            self.shared.congestion.set_write_threshold(us);
        }
    }

    /// Cache-device latency as the engine sees it and the thresholds it compares.
    #[must_use]
    pub fn congestion(&self) -> Congestion {
        let c = &self.shared.congestion;
        let (read_threshold_us, write_threshold_us) = c.thresholds();
        Congestion {
            read_latency_us: c.read.current_us(),
            write_latency_us: c.write.current_us(),
            read_threshold_us,
            write_threshold_us,
        }
    }

    /// The replacement policy reclaim uses now.
    #[must_use]
    pub fn replacement_policy(&self) -> ReplacementPolicy {
        *self.shared.reclaim_policy.lock()
    }

    /// Changes the replacement policy: the next reclaim picks its victims by it. Stored in the
    /// cache superblock (a compat feature bit, see `docs/format.md`), so it survives a restart;
    /// the superblock is written first, and the policy acts only once that succeeded.
    pub fn set_replacement_policy(&self, policy: ReplacementPolicy) -> CacheResult<()> {
        let sh = &self.shared;
        {
            let mut sb = sh.sb_current.lock();
            if sb.replacement_policy() != Some(policy) {
                let mut next = sb.clone();
                next.set_replacement_policy(policy);
                next.seq += 1;
                format::write_cache_superblock(sh.cache.as_ref(), &next)?;
                *sb = next;
            }
        }
        *sh.reclaim_policy.lock() = policy;
        Ok(())
    }

    /// FLUSH for the whole set: every acknowledged write durable.
    pub fn sync(&self) -> CacheResult<()> {
        self.shared.commit()
    }

    /// Checkpoints now (btree node write-out + bucket table + journal release).
    pub fn checkpoint(&self) -> CacheResult<()> {
        let mut m = self.shared.lock_meta()?;
        self.shared.checkpoint_locked(&mut m)
    }

    /// Online fsck: walks the btree (invariants), checks every key and node slot, and compares
    /// the allocator's per-bucket counts and the backing superblocks with what the btree says.
    /// Takes the metadata lock for the whole walk.
    pub fn check(&self) -> CacheResult<Report> {
        let mut report = Report::default();
        let mut m = self.shared.lock_meta()?;
        verify::btree_invariants(&m.tree.check()?, &mut report);
        let keys = all_keys(&mut m.tree)?;
        let nodes = m.tree.node_addrs()?;
        let alloc = m.alloc();
        let gens: Vec<u8> = alloc.buckets().iter().map(|b| b.generation).collect();
        let expected = verify::keys_and_nodes(&self.shared.geometry, &gens, &keys, &nodes, &mut report);
        verify::allocator_counts(&self.shared.geometry, alloc, &expected, &mut report);
        drop(m);
        for b in &self.shared.backings {
            let dirty = report.dirty_sectors_by_dev.get(&b.dev_id).copied().unwrap_or(0);
            let (uuid, state) = {
                let g = b.sb.lock();
                (g.sb.uuid, g.sb.state)
            };
            report.problems.extend(verify::backing_state(uuid, state, dirty));
        }
        Ok(report)
    }

    /// Stops the set cleanly: commits and checkpoints so the next open replays nothing.
    pub fn close(self) -> CacheResult<()> {
        let mut m = self.shared.lock_meta()?;
        self.shared.commit_locked(&mut m)?;
        self.shared.checkpoint_locked(&mut m)
    }
}

impl Shared {
    pub(crate) fn lock_meta(&self) -> CacheResult<parking_lot::MutexGuard<'_, Meta>> {
        if self.failed.load(Ordering::Acquire) {
            return Err(CacheError::Failed("an earlier metadata update failed half-way".into()));
        }
        Ok(self.meta.lock())
    }

    /// The metadata lock even after a failure: only to release what a request holds (pins,
    /// fill registrations), which must happen whether or not the set failed meanwhile.
    pub(crate) fn lock_meta_to_release(&self) -> parking_lot::MutexGuard<'_, Meta> {
        self.meta.lock()
    }

    /// Takes the writeback range lock of `range`: held by every write to backing (crash rule
    /// 6), so writeback of older cached data can never land over it.
    pub(crate) fn lock_backing_range(&self, range: DevRange) -> super::inflight::RangeGuard<'_> {
        self.wb_locks.lock(range)
    }

    /// Reads cached data at cache sector `sector`, timing it for the congestion tracker.
    pub(crate) fn read_cache(&self, buf: &mut [u8], sector: u64) -> crate::dev::DevResult<()> {
        let began = std::time::Instant::now();
        let r = self.cache.read_at(buf, sector * SECTOR_SIZE);
        self.congestion.read.record(began.elapsed());
        r
    }

    /// Writes data into the cache at cache sector `sector`, timing it for the congestion
    /// tracker.
    pub(crate) fn write_cache(&self, data: &[u8], sector: u64) -> crate::dev::DevResult<()> {
        let began = std::time::Instant::now();
        let r = self.cache.write_at(data, sector * SECTOR_SIZE);
        self.congestion.write.record(began.elapsed());
        r
    }

    /// Feeds a request to the sequential detector: the bytes of its stream so far, and whether
    /// the stream is past the sequential cutoff.
    pub(crate) fn observe_stream(&self, dev: u32, offset: u64, len: u64) -> (u64, bool) {
        let mut seq = self.seq.lock();
        let stream = seq.observe_stream(dev, offset, len);
        (stream, seq.past_cutoff(stream))
    }

    /// Whether a read miss of a stream of `stream_bytes` skips the fill (cache congested).
    pub(crate) fn read_congested(&self, stream_bytes: u64) -> bool {
        self.congestion.read_bypasses(stream_bytes)
    }

    /// Whether a write of a stream of `stream_bytes` bypasses the cache (cache congested).
    pub(crate) fn write_congested(&self, stream_bytes: u64) -> bool {
        self.congestion.write_bypasses(stream_bytes)
    }

    /// Marks the set failed after an error that may have left memory and disk disagreeing.
    pub(crate) fn fail<T>(&self, e: CacheError) -> CacheResult<T> {
        if !matches!(e, CacheError::Invalid(_) | CacheError::NoSpace(_)) {
            log::error!("cache set {} failed: {e}", self.sb.set_uuid);
            self.failed.store(true, Ordering::Release);
        }
        Err(e)
    }

    pub(crate) fn bucket_of(&self, sector: u64) -> u64 {
        sector / u64::from(self.geometry.bucket_sectors)
    }

    /// Appends entries; commits first if the pending buffer is too big.
    pub(crate) fn append_locked(&self, m: &mut Meta, entries: &[JournalEntry]) -> CacheResult<u64> {
        match self.journal.append(entries) {
            Ok(seq) => Ok(seq),
            Err(crate::journal::JournalError::Full { .. }) => {
                self.commit_locked(m)?;
                Ok(self.journal.append(entries)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Uncounts displaced key pieces from their buckets.
    pub(crate) fn uncount(m: &mut Meta, displaced: &[Key]) -> CacheResult<()> {
        let alloc = m.alloc_mut();
        for k in displaced {
            alloc.remove_live(k.ptr.offset, k.size, k.ptr.generation, k.dirty)?;
        }
        Ok(())
    }

    /// Inserts a key (overwrite), journals it and counts it.
    pub(crate) fn insert_locked(&self, m: &mut Meta, key: Key) -> CacheResult<()> {
        let out = m.tree.insert(key)?;
        Self::uncount(m, &out.displaced)?;
        m.alloc_mut().add_live(key.ptr.offset, key.size, key.ptr.generation, key.dirty)?;
        self.append_locked(m, &[JournalEntry::KeyInsert(key)])?;
        Ok(())
    }

    /// Replace-inserts a key; returns the collided sectors.
    pub(crate) fn replace_locked(&self, m: &mut Meta, key: Key, expected: Option<&Key>) -> CacheResult<u64> {
        let out = m.tree.replace(key, expected)?;
        if out.inserted_sectors > 0 {
            Self::uncount(m, &out.displaced)?;
            m.alloc_mut().add_live(
                key.ptr.offset,
                out.inserted_sectors as u32,
                key.ptr.generation,
                key.dirty,
            )?;
            self.append_locked(m, &[JournalEntry::KeyReplace { key, expected: expected.copied() }])?;
        }
        Ok(out.collision_sectors)
    }

    /// Drops every cached piece of the range (journalled), and marks overlapping fills collided.
    pub(crate) fn invalidate_locked(&self, m: &mut Meta, dev: u32, start: u64, end: u64) -> CacheResult<()> {
        m.fills.collide(DevRange { dev, start, end });
        let out = m.tree.invalidate(dev, start, end)?;
        if !out.displaced.is_empty() {
            Self::uncount(m, &out.displaced)?;
            self.append_locked(m, &[JournalEntry::Invalidate { dev, start, end }])?;
        }
        Ok(())
    }
}

impl CacheSet {
    /// The writeback tuning of this set, shared by its writeback thread and control target.
    #[must_use]
    pub fn writeback_tuning(&self) -> &Arc<WritebackTuning> {
        &self.shared.writeback_tuning
    }
}
