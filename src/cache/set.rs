//! The cache set: one cache device, its superblock, journal, bucket allocator and btree, shared by
//! the backing devices attached to it.
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
//! # Crash ordering (CACHE_DESIGN.md rules 1-6), where each is kept
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

use super::error::{CacheError, CacheResult};
use super::inflight::{DevRange, FillTracker, RangeLocks};
use super::policy::{CacheMode, CongestionTracker, DEFAULT_SEQUENTIAL_CUTOFF, SequentialDetector};
use super::stats::{Stats, StatsSnapshot};
use super::store::CacheStore;
use crate::alloc::{
    AllocConfig, AllocError, Allocator, LiveExtent, OpenKind, ReplacementPolicy, SectorAlloc,
};
use crate::dev::{BlockDev, SECTOR_SIZE};
use crate::failpoints;
use crate::format::{
    self, BackingEntry, BackingState, BackingSuperblock, CacheSuperblock, CheckpointEntry, Geometry,
    JournalEntry, StoredCacheMode, TableSlot, Uuid,
};
use crate::journal::{Journal, JournalConfig};
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use ubcache_btree::{Key, Pos, Tree, TreeConfig};

/// Priority every bucket loses per bucket's worth of data written into the cache (LRU aging, as
/// bcache decays priorities by I/O volume): a bucket neither written nor read while 4096
/// buckets of data were written reaches 0 from the initial priority (32768). A read hit resets
/// its bucket to the initial priority, so LRU takes the buckets unused for the longest.
const PRIO_DECAY_PER_BUCKET_WRITTEN: u16 = 8;

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
    pub(crate) writeback_tuning: Arc<super::writeback::WritebackTuning>,
    pub(crate) recovery: RecoveryReport,
    failed: AtomicBool,
    last_commit_seq: AtomicU64,
}

/// A cache set: open it with [`CacheSet::open`], get one [`super::CachedDev`] per backing device.
#[derive(Debug, Clone)]
pub struct CacheSet {
    pub(crate) shared: Arc<Shared>,
}

fn cache_mode(m: StoredCacheMode) -> CacheMode {
    match m {
        StoredCacheMode::Writethrough => CacheMode::Writethrough,
        StoredCacheMode::Writeback => CacheMode::Writeback,
        StoredCacheMode::Writearound => CacheMode::Writearound,
        StoredCacheMode::None => CacheMode::None,
    }
}

/// Default seed of the random replacement policy: any fixed value gives a reproducible victim
/// order.
const DEFAULT_RECLAIM_SEED: u64 = 0x5eed_ca57_e5e7_0001;

fn stored_mode(m: CacheMode) -> StoredCacheMode {
    match m {
        CacheMode::Writethrough => StoredCacheMode::Writethrough,
        CacheMode::Writeback => StoredCacheMode::Writeback,
        CacheMode::Writearound => StoredCacheMode::Writearound,
        CacheMode::None => StoredCacheMode::None,
    }
}

/// How a backing device given to [`CacheSet::open`] relates to the set, by its superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binding {
    /// Bound to this set (Clean or Dirty), under the dev id the cache superblock lists.
    Attached(u32),
    /// Bound to no cache set (state Detached): served alone until [`CacheSet::attach`].
    /// `listed` is the dev id the cache superblock still lists for its uuid, if any: left by a
    /// crash between the two superblock writes of an attach or a detach.
    Detached { listed: Option<u32> },
}

impl Binding {
    fn of(sb: &CacheSuperblock, bsb: &BackingSuperblock) -> CacheResult<Binding> {
        let listed = sb.backing.iter().find(|e| e.uuid == bsb.uuid).map(|e| e.dev_id);
        if bsb.set_uuid == sb.set_uuid {
            return listed.map(Binding::Attached).ok_or_else(|| {
                CacheError::Invalid(format!(
                    "backing device {} is not registered in the cache superblock",
                    bsb.uuid
                ))
            });
        }
        if bsb.set_uuid != Uuid::NIL {
            // Serving it here would have to re-bind it, and its own cache may hold data the
            // device lacks: that is for the operator to decide (detach it there first).
            return Err(CacheError::Invalid(format!(
                "backing device {} belongs to cache set {}, not {} (this cache): detach it from \
                 its cache set first",
                bsb.uuid, bsb.set_uuid, sb.set_uuid
            )));
        }
        if bsb.state != BackingState::Detached {
            return Err(CacheError::Invalid(format!(
                "backing device {} says {:?} but names no cache set (damaged superblock?)",
                bsb.uuid, bsb.state
            )));
        }
        Ok(Binding::Detached { listed })
    }
}

/// The dev id of a detached device the cache superblock does not list: the lowest id that no
/// listed device, no key in the btree and no other device of this open uses.
///
/// Keys carry only a dev id, so an id still listed (a registered device that is absent now)
/// or still carrying keys would make the cache serve another device's data for this one once
/// it is attached. The lowest free id keeps the id the same on every restart with the same
/// command line while the device is detached; [`CacheSet::attach`] then records it in the cache
/// superblock, and from there on it is fixed. Fewer than `u32::MAX` ids are ever in use (at
/// most [`format::MAX_BACKING_DEVS`] listed, one per key, one per given device), so one is free.
fn detached_dev_id(taken: &std::collections::BTreeSet<u32>) -> CacheResult<u32> {
    (0..=u32::MAX)
        .find(|id| !taken.contains(id))
        .ok_or_else(|| CacheError::Invalid("no free backing dev id".into()))
}

/// Builds the [`Backing`] of every given device, in the order given: attached ones under their
/// listed dev id, detached ones served alone (see [`detached_dev_id`]). `keys` are every key of
/// the recovered btree.
fn bind_backings(
    sb: &CacheSuperblock,
    given: Vec<(Arc<dyn BlockDev>, BackingSuperblock, Binding)>,
    keys: &[Key],
    dirty_by_dev: &std::collections::BTreeMap<u32, u64>,
    cfg: &CacheConfig,
) -> CacheResult<Vec<Arc<Backing>>> {
    let mut taken: std::collections::BTreeSet<u32> = sb.backing.iter().map(|e| e.dev_id).collect();
    taken.extend(keys.iter().map(|k| k.dev));
    let mut out: Vec<Arc<Backing>> = Vec::with_capacity(given.len());
    for (dev, bsb, binding) in given {
        let (dev_id, detached) = match binding {
            Binding::Attached(id) => (id, false),
            Binding::Detached { listed: Some(id) } => {
                // Detach writes every dirty sector home and drops the keys before the device
                // says Detached, so dirty data here means the two disagree: serving the device
                // alone would lose that data, attaching it would drop it.
                let dirty = dirty_by_dev.get(&id).copied().unwrap_or(0);
                if dirty > 0 {
                    return Err(CacheError::Invalid(format!(
                        "backing device {} says Detached but the cache holds {dirty} dirty sectors \
                         of its dev id {id}; refusing to serve it (run `ubcache check`)",
                        bsb.uuid
                    )));
                }
                (id, true)
            }
            Binding::Detached { listed: None } => {
                let id = detached_dev_id(&taken)?;
                taken.insert(id);
                (id, true)
            }
        };
        if out.iter().any(|a| a.dev_id == dev_id) {
            return Err(CacheError::Invalid(format!("backing device {} given twice", bsb.uuid)));
        }
        if detached {
            log::info!(
                "backing device {} is detached: served straight from the device (dev id {dev_id}) \
                 until `ubcache attach`",
                bsb.uuid
            );
        }
        let export_len = (bsb.export_bytes() / SECTOR_SIZE) * SECTOR_SIZE;
        let mode = if cfg.stored_mode { cache_mode(bsb.cache_mode) } else { cfg.mode };
        out.push(Arc::new(Backing {
            dev_id,
            dev,
            data_offset: bsb.data_offset_bytes,
            export_len,
            mode: AtomicU8::new(mode.to_u8()),
            sync_state: BackingSyncState::default(),
            sb: Mutex::new(BackingSb { sb: bsb, dirty_writers: 0 }),
            detached: AtomicBool::new(detached),
            passthrough_gate: parking_lot::RwLock::new(()),
            rmw_locks: RangeLocks::default(),
        }));
    }
    Ok(out)
}

/// Formats `cache` as a new cache set and attaches every device of `backings` (in order: dev id
/// 0, 1, ...), writing a backing superblock (state Clean) at the start of each. Returns the
/// cache-set uuid. Order: backing superblocks, journal (zeroed), empty btree, bucket table A,
/// first checkpoint, and the cache superblock last, so a crash during format leaves a device that
/// does not open rather than a half-made one that does.
pub fn format(
    cache: &Arc<dyn BlockDev>,
    backings: &[Arc<dyn BlockDev>],
    opts: FormatOptions,
) -> CacheResult<Uuid> {
    let geometry = Geometry::compute(cache.len(), opts.bucket_bytes, opts.node_bytes)?;
    if backings.len() > format::MAX_BACKING_DEVS {
        return Err(CacheError::Invalid(format!(
            "{} backing devices, at most {}",
            backings.len(),
            format::MAX_BACKING_DEVS
        )));
    }
    let set_uuid = Uuid::random();
    let mut sb = CacheSuperblock::new(geometry, set_uuid, Uuid::random());
    for (i, b) in backings.iter().enumerate() {
        let mut bsb = BackingSuperblock::new(Uuid::random(), b.len())?;
        bsb.state = BackingState::Clean;
        bsb.set_uuid = set_uuid;
        format::write_backing_superblock(b.as_ref(), &bsb)?;
        sb.backing.push(BackingEntry {
            uuid: bsb.uuid,
            dev_id: i as u32,
            size_bytes: bsb.size_bytes,
            data_offset_bytes: bsb.data_offset_bytes,
        });
    }
    let cfg = CacheConfig::default();
    let journal = Journal::create(Arc::clone(cache), geometry.journal_region(), set_uuid, cfg.journal)?;
    let store = CacheStore::new(Arc::clone(cache), geometry, Allocator::new(&geometry, cfg.alloc));
    let mut tree = Tree::create(store, cfg.tree)?;
    let cp = tree.write_out()?;
    cache.sync()?;
    let table = tree.store().alloc.table(1);
    format::write_bucket_table(cache.as_ref(), &geometry, set_uuid, TableSlot::A, &table)?;
    journal.append(&[JournalEntry::Checkpoint(CheckpointEntry {
        root: cp.root,
        table_slot: TableSlot::A,
        table_seq: 1,
        replay_from: 1,
    })])?;
    journal.commit_all()?;
    format::write_cache_superblock(cache.as_ref(), &sb)?;
    Ok(set_uuid)
}

impl CacheSet {
    /// Opens a formatted cache set, recovering from an unclean stop: journal replay onto the
    /// last checkpointed btree, allocator rebuilt from a walk of the btree, btree invariants
    /// verified, then a fresh checkpoint so recovery itself is durable. `backings` are matched to
    /// the set by the uuid in their backing superblocks; registered devices that are missing stay
    /// detached (their keys are kept).
    ///
    /// A given device whose superblock says Detached (no cache set: detached before a restart,
    /// or never attached) becomes a *detached export* of this set, as bcache serves a detached
    /// backing device: requests go straight to it, its superblock is not written, and
    /// [`CacheSet::attach`] binds it. Its dev id is the one the cache superblock still lists for
    /// its uuid, else the lowest id no listed device and no key uses (so it never picks up
    /// another device's cached data). A device bound to another cache set is refused, never
    /// re-bound. The returned devices keep the order of `backings`.
    pub fn open(
        cache: Arc<dyn BlockDev>,
        backings: &[Arc<dyn BlockDev>],
        cfg: CacheConfig,
    ) -> CacheResult<CacheSet> {
        let read = format::read_cache_superblock(cache.as_ref())?;
        let sb = read.sb;
        let geometry = sb.geometry;
        let mut given: Vec<(Arc<dyn BlockDev>, BackingSuperblock, Binding)> = Vec::new();
        for b in backings {
            let Some(bsb) = format::read_backing_superblock(b.as_ref())? else {
                return Err(CacheError::Invalid(
                    "backing device has no ubcache superblock (raw image)".into(),
                ));
            };
            if given.iter().any(|(_, other, _)| other.uuid == bsb.uuid) {
                return Err(CacheError::Invalid(format!("backing device {} given twice", bsb.uuid)));
            }
            let binding = Binding::of(&sb, &bsb)?;
            given.push((Arc::clone(b), bsb, binding));
        }

        let Loaded { journal, replay, table, mut tree, checkpoint, checkpoint_nodes } =
            load(&cache, &sb, &cfg)?;
        let problems = tree.check()?;
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().take(20).map(ToString::to_string).collect();
            return Err(CacheError::Corrupted(format!(
                "btree check found {} problems: {}",
                problems.len(),
                list.join("; ")
            )));
        }
        let keys = all_keys(&mut tree)?;
        let mut nodes = tree.node_addrs()?;
        nodes.extend(checkpoint_nodes);
        nodes.sort_unstable();
        nodes.dedup();
        let alloc = Allocator::rebuild(
            &geometry,
            &table,
            keys.iter().map(live_extent),
            nodes.iter().copied(),
            cfg.alloc,
        )
        .map_err(|e| CacheError::Corrupted(format!("rebuilding the allocator: {e}")))?;
        tree.store_mut().alloc = alloc;
        let stats = tree.stats();
        let attached = bind_backings(&sb, given, &keys, &stats.dirty_sectors_by_dev, &cfg)?;
        let recovery = RecoveryReport {
            replayed_entries: replay.entries.len() as u64,
            torn_tail: replay.stats.torn_tail,
            keys: keys.len() as u64,
            dirty_sectors: keys.iter().filter(|k| k.dirty).map(|k| u64::from(k.size)).sum(),
            nodes: nodes.len() as u64,
        };
        debug_assert_eq!(stats.dirty_sectors, recovery.dirty_sectors);
        if recovery.replayed_entries > 0 || recovery.torn_tail {
            log::info!(
                "cache set {}: recovered {} journal entries (torn tail dropped: {}), {} keys, {} dirty sectors",
                sb.set_uuid,
                recovery.replayed_entries,
                recovery.torn_tail,
                recovery.keys,
                recovery.dirty_sectors
            );
        }
        let seq = SequentialDetector::new(cfg.sequential_cutoff);
        // A policy chosen at runtime (stored in the superblock) wins over the configured one.
        let reclaim_policy = sb.replacement_policy().unwrap_or(cfg.reclaim_policy);
        let congestion =
            CongestionTracker::new(cfg.congested_read_threshold_us, cfg.congested_write_threshold_us);
        let shared = Arc::new(Shared {
            cache,
            sb_current: Mutex::new(sb.clone()),
            sb,
            geometry,
            journal,
            meta: Mutex::new(Meta {
                tree,
                fills: FillTracker::default(),
                table_slot: checkpoint.table_slot,
                table_seq: checkpoint.table_seq,
                wb_cursor: Pos::MIN,
                in_checkpoint: false,
                checkpoint_from: 0,
                sectors_since_decay: 0,
            }),
            wb_locks: RangeLocks::default(),
            stats: Stats::default(),
            backings: attached,
            seq: Mutex::new(seq),
            congestion,
            reclaim_policy: Mutex::new(reclaim_policy),
            writeback_pass: Mutex::new(()),
            writeback_tuning: Arc::default(),
            recovery,
            failed: AtomicBool::new(false),
            last_commit_seq: AtomicU64::new(0),
            cfg,
        });
        // Make the recovered state the new base: a crash from here on replays from this
        // checkpoint. Until it is durable the old checkpoint and journal stay authoritative.
        {
            let mut m = shared.meta.lock();
            shared.checkpoint_locked(&mut m)?;
        }
        // A backing device with dirty keys must say Dirty (it may have been marked Clean just
        // before a crash that lost the journalled clean keys). The write also stores the mode
        // the device opened in (an explicit mode is remembered for the next open).
        for b in &shared.backings {
            if b.detached.load(Ordering::Acquire) {
                // Not bound to this set until `attach`: its superblock is left as it is.
                continue;
            }
            let dirty =
                shared.meta.lock().tree.stats().dirty_sectors_by_dev.get(&b.dev_id).copied().unwrap_or(0);
            let state = if dirty > 0 { BackingState::Dirty } else { b.sb.lock().sb.state };
            shared.set_backing_state(b, state)?;
        }
        Ok(CacheSet { shared })
    }

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
    pub fn check(&self) -> CacheResult<crate::check::Report> {
        let mut report = crate::check::Report::default();
        let mut m = self.shared.lock_meta()?;
        report.problems.extend(m.tree.check()?.iter().map(|p| format!("btree: {p}")));
        let keys = all_keys(&mut m.tree)?;
        let nodes = m.tree.node_addrs()?;
        let alloc = &m.tree.store().alloc;
        let gens: Vec<u8> = alloc.buckets().iter().map(|b| b.generation).collect();
        let expected =
            crate::check::check_keys_and_nodes(&self.shared.geometry, &gens, &keys, &nodes, &mut report);
        crate::check::compare_allocator(&self.shared.geometry, alloc, &expected, &mut report);
        drop(m);
        for b in &self.shared.backings {
            let dirty = report.dirty_sectors_by_dev.get(&b.dev_id).copied().unwrap_or(0);
            let state = b.sb.lock().sb.state;
            if dirty > 0 && state != BackingState::Dirty {
                report.problems.push(format!(
                    "backing dev {} has {dirty} dirty sectors but its superblock says {state:?}",
                    b.dev_id
                ));
            }
        }
        Ok(report)
    }

    /// Detaches a backing device: writes all its dirty data home, drops its keys, marks its
    /// superblock Detached (it can then be used alone) and removes it from the cache
    /// superblock. Its [`super::CachedDev`] handles go on serving, straight from the device
    /// (as bcache's detached devices do); requests that arrive during the detach wait for it.
    /// If writing home fails, the device stays attached and the error is returned.
    pub fn detach(&self, dev_id: u32) -> CacheResult<()> {
        let sh = &self.shared;
        let Some(b) = sh.backings.iter().find(|b| b.dev_id == dev_id) else {
            return Err(CacheError::Invalid(format!("no attached backing device with id {dev_id}")));
        };
        // New requests wait at the gate (they see `detached`) until the device is clean and
        // unbound, so none reaches it directly while dirty data of it is still cached.
        let _gate = b.passthrough_gate.write();
        if b.detached.swap(true, Ordering::AcqRel) {
            return Err(CacheError::Invalid(format!("backing device {dev_id} is already detached")));
        }
        let written_home = sh.write_back_all().and_then(|()| {
            let mut m = sh.lock_meta()?;
            let dirty = m.tree.stats().dirty_sectors_by_dev.get(&dev_id).copied().unwrap_or(0);
            if dirty > 0 {
                return Err(CacheError::Invalid(format!("{dirty} dirty sectors of dev {dev_id} remain")));
            }
            sh.invalidate_locked(&mut m, dev_id, 0, u64::MAX)?;
            sh.commit_locked(&mut m)
        });
        if let Err(e) = written_home {
            // Dirty data may still be cached: the device must go on being served through it.
            b.detached.store(false, Ordering::Release);
            return Err(e);
        }
        // From here on no key of the device is left, so serving it alone is right even if a
        // superblock write below fails (the device then stays detached for this run).
        {
            let mut g = b.sb.lock();
            let mut next = g.sb.clone();
            next.state = BackingState::Detached;
            next.set_uuid = Uuid::NIL;
            next.seq += 1;
            format::write_backing_superblock(b.dev.as_ref(), &next)?;
            g.sb = next;
        }
        let mut sb = sh.sb_current.lock();
        let mut next = sb.clone();
        next.backing.retain(|e| e.dev_id != dev_id);
        next.seq += 1;
        format::write_cache_superblock(sh.cache.as_ref(), &next)?;
        *sb = next;
        Ok(())
    }

    /// Attaches a detached backing device: one detached at runtime ([`CacheSet::detach`]) or
    /// one whose superblock already said Detached when the set was opened (detached before a
    /// restart, see [`CacheSet::open`]). Binds its superblock to this set (state Clean, this
    /// set's uuid), registers it in the cache superblock under its dev id, and serves it
    /// through the cache, starting with an empty cache for it (whatever was written to it
    /// meanwhile is read from backing).
    ///
    /// Crash ordering, so a crash at any point leaves it detached or attached, each consistent:
    /// 1. Every key of the device is invalidated and the journal committed. Detach already did
    ///    this; doing it again costs one lookup and guards against keys that could otherwise
    ///    serve data older than what was written to the device while it was detached.
    /// 2. The cache superblock lists the device (both copies, synced). A crash here: the
    ///    backing superblock still says Detached with no set, so the device is complete alone,
    ///    and `open` serves it as a detached export under the listed dev id; the list entry
    ///    has no keys and is harmless (attach again rewrites it).
    /// 3. The backing superblock says Clean and names this set (both copies, synced). From
    ///    here on `open` attaches it; it has no keys, so no stale data can be served.
    /// 4. Only then do requests flow through the cache.
    ///
    /// Before step 1 the device is synced: writes it took while detached are durable before a
    /// FLUSH through the cache (which syncs backing only after cache-path writes) can be acked.
    pub fn attach(&self, dev_id: u32) -> CacheResult<()> {
        let sh = &self.shared;
        let Some(b) = sh.backings.iter().find(|b| b.dev_id == dev_id) else {
            return Err(CacheError::Invalid(format!("no backing device with id {dev_id} in this cache set")));
        };
        // Requests served straight from the device finish first; new ones wait, then see it
        // attached and go through the cache.
        let _gate = b.passthrough_gate.write();
        if !b.detached.load(Ordering::Acquire) {
            return Err(CacheError::Invalid(format!("backing device {dev_id} is attached")));
        }
        // The device may have been written while detached (used alone): its old superblock in
        // memory may be stale too, so read it back.
        let Some(current) = format::read_backing_superblock(b.dev.as_ref())? else {
            return Err(CacheError::Invalid(format!(
                "backing device {dev_id} no longer has a ubcache superblock (reformatted?)"
            )));
        };
        if current.set_uuid != Uuid::NIL && current.set_uuid != sh.sb.set_uuid {
            return Err(CacheError::Invalid(format!(
                "backing device {dev_id} is bound to cache set {}; detach it there first",
                current.set_uuid
            )));
        }
        // Writes the device took while detached were acknowledged without a sync; once it is
        // attached a FLUSH syncs it only if a write through the cache touched it, so make them
        // durable now (the superblock write below syncs too, but that is not its job).
        b.dev.sync()?;
        {
            let mut m = sh.lock_meta()?;
            sh.invalidate_locked(&mut m, dev_id, 0, u64::MAX)?;
            sh.commit_locked(&mut m)?;
        }
        {
            let mut sb = sh.sb_current.lock();
            // Never unregister another device: its cached data would be orphaned (open picks
            // a detached device's id among the ids no listed device uses, so this cannot
            // happen unless the superblocks were changed behind our back).
            if let Some(other) = sb.backing.iter().find(|e| e.dev_id == dev_id && e.uuid != current.uuid) {
                return Err(CacheError::Invalid(format!(
                    "dev id {dev_id} is registered to backing device {} in the cache superblock",
                    other.uuid
                )));
            }
            let mut next = sb.clone();
            next.backing.retain(|e| e.uuid != current.uuid);
            next.backing.push(BackingEntry {
                uuid: current.uuid,
                dev_id,
                size_bytes: current.size_bytes,
                data_offset_bytes: current.data_offset_bytes,
            });
            next.backing.sort_by_key(|e| e.dev_id);
            next.seq += 1;
            format::write_cache_superblock(sh.cache.as_ref(), &next)?;
            *sb = next;
        }
        {
            let mut g = b.sb.lock();
            let mut next = current;
            next.state = BackingState::Clean;
            next.set_uuid = sh.sb.set_uuid;
            next.cache_mode = stored_mode(b.mode());
            next.seq = next.seq.max(g.sb.seq) + 1;
            format::write_backing_superblock(b.dev.as_ref(), &next)?;
            g.sb = next;
        }
        b.detached.store(false, Ordering::Release);
        Ok(())
    }

    /// Stops the set cleanly: commits and checkpoints so the next open replays nothing.
    pub fn close(self) -> CacheResult<()> {
        let mut m = self.shared.lock_meta()?;
        self.shared.commit_locked(&mut m)?;
        self.shared.checkpoint_locked(&mut m)
    }
}

/// The cache state as recovery sees it, before anything is written: journal scanned, btree of
/// the last checkpoint opened and the journal replayed onto it in memory, bucket generations
/// from the checkpointed table plus replayed generation changes. Shared by
/// [`CacheSet::open`] and the read-only [`crate::check::check`].
pub(crate) struct Loaded {
    pub(crate) journal: Journal,
    pub(crate) replay: crate::journal::Replay,
    pub(crate) table: format::BucketTable,
    pub(crate) tree: Tree<CacheStore>,
    pub(crate) checkpoint: CheckpointEntry,
    /// Node slots of the checkpointed tree (still in use on disk until the next checkpoint).
    pub(crate) checkpoint_nodes: Vec<u64>,
}

pub(crate) fn load(
    cache: &Arc<dyn BlockDev>,
    sb: &CacheSuperblock,
    cfg: &CacheConfig,
) -> CacheResult<Loaded> {
    let geometry = sb.geometry;
    let (journal, replay) =
        Journal::open(Arc::clone(cache), geometry.journal_region(), sb.set_uuid, cfg.journal)?;
    let Some((_, checkpoint)) = replay.checkpoint.clone() else {
        return Err(CacheError::Corrupted("journal holds no checkpoint (not formatted by ubcache?)".into()));
    };
    let mut table = format::read_bucket_table(
        cache.as_ref(),
        &geometry,
        sb.set_uuid,
        checkpoint.table_slot,
        checkpoint.table_seq,
    )?;
    let root = checkpoint.root;
    // The placeholder allocator is never asked for a node slot: the btree allocates only
    // in its node write-out, which runs after the real allocator is rebuilt below.
    let store = CacheStore::new(Arc::clone(cache), geometry, Allocator::new(&geometry, cfg.alloc));
    let mut tree = Tree::open(store, root, cfg.tree.clone())?;
    // Node slots of the checkpointed tree: replay may merge nodes away, but their slots stay
    // in use on disk until the next checkpoint frees them, so they are counted now.
    let checkpoint_nodes = tree.node_addrs()?;
    for (seq, entry) in &replay.entries {
        let applied = match entry {
            JournalEntry::KeyInsert(k) => tree.insert(*k).map(drop),
            JournalEntry::KeyReplace { key, expected } => tree.replace(*key, expected.as_ref()).map(drop),
            JournalEntry::Invalidate { dev, start, end } => tree.invalidate(*dev, *start, *end).map(drop),
            JournalEntry::BucketGen { bucket, generation } => {
                match table.gens.get_mut(*bucket as usize) {
                    Some(g) => *g = *generation,
                    None => {
                        return Err(CacheError::Corrupted(format!(
                            "journal entry {seq}: generation of bucket {bucket} outside the device"
                        )));
                    }
                }
                Ok(())
            }
            JournalEntry::Checkpoint(_) => Ok(()),
        };
        applied
            .map_err(|e| CacheError::Corrupted(format!("replaying journal entry {seq} ({entry:?}): {e}")))?;
    }
    Ok(Loaded { journal, replay, table, tree, checkpoint, checkpoint_nodes })
}

fn live_extent(k: &Key) -> LiveExtent {
    LiveExtent { offset: k.ptr.offset, sectors: k.size, generation: k.ptr.generation, dirty: k.dirty }
}

/// Every key of the tree, in order.
pub(crate) fn all_keys(tree: &mut Tree<CacheStore>) -> CacheResult<Vec<Key>> {
    let mut out = Vec::new();
    let mut from = Some(Pos::MIN);
    while let Some(pos) = from {
        from = tree.scan(pos, &|_| true, 4096, &mut out)?;
    }
    Ok(out)
}

impl Shared {
    pub(crate) fn lock_meta(&self) -> CacheResult<parking_lot::MutexGuard<'_, Meta>> {
        if self.failed.load(Ordering::Acquire) {
            return Err(CacheError::Failed("an earlier metadata update failed half-way".into()));
        }
        Ok(self.meta.lock())
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
        let alloc = &mut m.tree.store_mut().alloc;
        for k in displaced {
            alloc.remove_live(k.ptr.offset, k.size, k.ptr.generation, k.dirty)?;
        }
        Ok(())
    }

    /// Inserts a key (overwrite), journals it and counts it.
    pub(crate) fn insert_locked(&self, m: &mut Meta, key: Key) -> CacheResult<()> {
        let out = m.tree.insert(key)?;
        Self::uncount(m, &out.displaced)?;
        m.tree.store_mut().alloc.add_live(key.ptr.offset, key.size, key.ptr.generation, key.dirty)?;
        self.append_locked(m, &[JournalEntry::KeyInsert(key)])?;
        Ok(())
    }

    /// Replace-inserts a key; returns the collided sectors.
    pub(crate) fn replace_locked(&self, m: &mut Meta, key: Key, expected: Option<&Key>) -> CacheResult<u64> {
        let out = m.tree.replace(key, expected)?;
        if out.inserted_sectors > 0 {
            Self::uncount(m, &out.displaced)?;
            m.tree.store_mut().alloc.add_live(
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
        if m.tree.store().alloc.wants_gc() {
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
        while m.tree.store().alloc.free_buckets() < needed {
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
        let table = m.tree.store().alloc.table(table_seq);
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
        let snapshot = m.tree.store().alloc.gc_begin();
        let keys = all_keys(&mut m.tree)?;
        for k in keys {
            let b = self.bucket_of(k.ptr.offset);
            let current = m.tree.store().alloc.bucket(b).map(|x| x.generation);
            if current != Some(k.ptr.generation) {
                self.invalidate_locked(m, k.dev, k.start(), k.end)?;
            }
        }
        m.tree.store_mut().alloc.gc_finish(&snapshot);
        Ok(())
    }

    /// Invalidates up to `reclaim_batch` clean buckets for reuse (crash rule 2: the generation
    /// bumps are journalled and committed before the buckets become allocatable). Returns how
    /// many buckets were freed.
    pub(crate) fn reclaim_locked(&self, m: &mut Meta) -> CacheResult<usize> {
        if m.tree.store().alloc.wants_gc() {
            self.gc_locked(m)?;
        }
        let policy = *self.reclaim_policy.lock();
        let changes = m.tree.store_mut().alloc.reclaim(policy, self.cfg.reclaim_seed, self.cfg.reclaim_batch);
        let Some(last) = changes.last().map(|c| c.token) else {
            return Ok(0);
        };
        let entries: Vec<JournalEntry> = changes.iter().map(crate::alloc::GenChange::entry).collect();
        self.append_locked(m, &entries)?;
        if !failpoints::returns(failpoints::RECLAIM_SKIP_GEN_COMMIT) {
            self.commit_locked(m)?;
        }
        let freed = m.tree.store_mut().alloc.mark_gens_durable(last);
        Stats::add(&self.stats.buckets_reclaimed, freed as u64);
        Ok(freed)
    }

    /// Allocates up to `sectors` data sectors (pinned), reclaiming clean buckets if needed.
    /// `None`: nothing can be freed without writeback.
    pub(crate) fn alloc_data_locked(&self, m: &mut Meta, sectors: u32) -> CacheResult<Option<SectorAlloc>> {
        for _ in 0..4 {
            match m.tree.store_mut().alloc.alloc_sectors(OpenKind::Data, sectors) {
                Ok(a) => {
                    m.sectors_since_decay += u64::from(a.sectors);
                    let bucket_sectors = u64::from(self.geometry.bucket_sectors).max(1);
                    if m.sectors_since_decay >= bucket_sectors {
                        m.sectors_since_decay -= bucket_sectors;
                        m.tree.store_mut().alloc.decay_prios(PRIO_DECAY_PER_BUCKET_WRITTEN);
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
                    for a in &got {
                        m.tree.store_mut().alloc.unpin(a.bucket)?;
                    }
                    return Ok(None);
                }
            }
        }
        Ok(Some(got))
    }

    /// Writes the backing superblock with a new state (and the current mode), synced.
    pub(crate) fn set_backing_state(&self, b: &Backing, state: BackingState) -> CacheResult<()> {
        let mut g = b.sb.lock();
        Self::write_backing_state(b, &mut g, state)
    }

    pub(crate) fn write_backing_state(
        b: &Backing,
        g: &mut BackingSb,
        state: BackingState,
    ) -> CacheResult<()> {
        let mode = stored_mode(b.mode());
        if g.sb.state == state && g.sb.cache_mode == mode {
            return Ok(());
        }
        let mut next = g.sb.clone();
        next.state = state;
        next.cache_mode = mode;
        next.seq += 1;
        format::write_backing_superblock(b.dev.as_ref(), &next)?;
        g.sb = next;
        Ok(())
    }

    /// Enters a write that may add dirty keys: the backing superblock says Dirty (durably)
    /// before the write is acknowledged, and writeback cannot mark it Clean until
    /// [`Shared::end_dirty_write`].
    pub(crate) fn begin_dirty_write(&self, b: &Backing) -> CacheResult<()> {
        let mut g = b.sb.lock();
        Self::write_backing_state(b, &mut g, BackingState::Dirty)?;
        g.dirty_writers += 1;
        Ok(())
    }

    pub(crate) fn end_dirty_write(&self, b: &Backing) {
        let mut g = b.sb.lock();
        g.dirty_writers = g.dirty_writers.saturating_sub(1);
    }

    /// Changes the mode of one backing device. Leaving writeback with `write_back_first` writes
    /// all dirty data home first (a writeback drain).
    pub(crate) fn set_mode(&self, b: &Backing, mode: CacheMode, write_back_first: bool) -> CacheResult<()> {
        let old = b.mode();
        // The new mode first: writes arriving during the drain no longer add dirty data, so
        // the drain ends even under a steady write load.
        b.mode.store(mode.to_u8(), Ordering::Release);
        if old == CacheMode::Writeback && mode != CacheMode::Writeback && write_back_first {
            self.write_back_all()?;
        }
        let mut g = b.sb.lock();
        let state = g.sb.state;
        Self::write_backing_state(b, &mut g, state)
    }
}
