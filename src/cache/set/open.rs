//! Format, open with crash recovery, and the load path: the one producer of the recovered
//! state. [`load`] replays the journal in memory onto the last checkpointed btree without
//! writing anything; [`CacheSet::open`] verifies the result, rebuilds the allocator from it
//! ([`Loaded::rebuild_allocator`]) and makes it durable with a checkpoint, while the offline
//! fsck ([`crate::check::check`]) consumes the very same result to check it.

use super::{
    Backing, BackingSb, BackingSyncState, CacheConfig, CacheSet, FormatOptions, Meta, RecoveryReport, Shared,
};
use crate::alloc::{AllocConfig, AllocError, Allocator, LiveExtent};
use crate::cache::error::{CacheError, CacheResult, Metadata};
use crate::cache::inflight::{FillTracker, RangeLocks};
use crate::cache::policy::{CacheMode, CongestionTracker, SequentialDetector};
use crate::cache::stats::Stats;
use crate::cache::store::CacheStore;
use crate::cache::verify::{self, Problem, ProblemKind};
use crate::dev::{BlockDev, SECTOR_SIZE};
use crate::format::{
    self, BackingEntry, BackingState, BackingSuperblock, CacheSuperblock, CheckpointEntry, Geometry,
    JournalEntry, StoredCacheMode, TableSlot, Uuid,
};
use crate::journal::Journal;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use ubcache_btree::{Key, Pos, Tree};

fn cache_mode(m: StoredCacheMode) -> CacheMode {
    match m {
        StoredCacheMode::Writethrough => CacheMode::Writethrough,
        StoredCacheMode::Writeback => CacheMode::Writeback,
        StoredCacheMode::Writearound => CacheMode::Writearound,
        StoredCacheMode::None => CacheMode::None,
    }
}

/// How a backing device relates to the set, by its superblock: what [`CacheSet::open`] serves
/// it as, and what the offline fsck checks it against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binding {
    /// Bound to this set (Clean or Dirty), under the dev id the cache superblock lists.
    Attached(u32),
    /// Bound to no cache set (state Detached): served alone until [`CacheSet::attach`].
    /// `listed` is the dev id the cache superblock still lists for its uuid, if any: left by a
    /// crash between the two superblock writes of an attach or a detach.
    Detached { listed: Option<u32> },
}

impl Binding {
    /// The binding, or why the device cannot be served by this set (open refuses it, fsck
    /// reports it).
    pub(crate) fn of(sb: &CacheSuperblock, bsb: &BackingSuperblock) -> Result<Binding, Problem> {
        let unbound = |detail: String| Problem { kind: ProblemKind::BackingUnbound, detail };
        let listed = sb.backing.iter().find(|e| e.uuid == bsb.uuid).map(|e| e.dev_id);
        if bsb.set_uuid == sb.set_uuid {
            return listed.map(Binding::Attached).ok_or_else(|| {
                unbound(format!("backing device {} is not registered in the cache superblock", bsb.uuid))
            });
        }
        if bsb.set_uuid != Uuid::NIL {
            // Serving it here would have to re-bind it, and its own cache may hold data the
            // device lacks: that is for the operator to decide (detach it there first).
            return Err(unbound(format!(
                "backing device {} belongs to cache set {}, not {} (this cache): detach it from \
                 its cache set first",
                bsb.uuid, bsb.set_uuid, sb.set_uuid
            )));
        }
        if bsb.state != BackingState::Detached {
            return Err(unbound(format!(
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
                if let Some(problem) = verify::detached_with_dirty(bsb.uuid, dirty) {
                    return Err(CacheError::Invalid(format!(
                        "{problem} (dev id {id}); refusing to serve it (run `ubcache check`)"
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
        let read = format::read_cache_superblock(cache.as_ref())
            .map_err(|e| CacheError::reading(Metadata::Superblock, e))?;
        let sb = read.sb;
        let geometry = sb.geometry;
        let mut given: Vec<(Arc<dyn BlockDev>, BackingSuperblock, Binding)> = Vec::new();
        for b in backings {
            let Some(bsb) = format::read_backing_superblock(b.as_ref())
                .map_err(|e| CacheError::reading(Metadata::Superblock, e))?
            else {
                return Err(CacheError::Invalid(
                    "backing device has no ubcache superblock (raw image)".into(),
                ));
            };
            if given.iter().any(|(_, other, _)| other.uuid == bsb.uuid) {
                return Err(CacheError::Invalid(format!("backing device {} given twice", bsb.uuid)));
            }
            let binding = Binding::of(&sb, &bsb).map_err(|p| CacheError::Invalid(p.detail))?;
            given.push((Arc::clone(b), bsb, binding));
        }

        let mut loaded = load(&cache, &sb, &cfg)?;
        let problems = loaded.tree.check()?;
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().take(20).map(ToString::to_string).collect();
            return Err(CacheError::corrupted(
                Metadata::Btree,
                format!("btree check found {} problems: {}", problems.len(), list.join("; ")),
            ));
        }
        let keys = all_keys(&mut loaded.tree)?;
        let tree_nodes = loaded.tree.node_addrs()?;
        let nodes = loaded.node_slots(tree_nodes);
        let alloc = loaded.rebuild_allocator(&keys, &nodes, cfg.alloc).map_err(|e| {
            CacheError::corrupted_by(Metadata::BucketAccounting, None, "rebuilding the allocator", e)
        })?;
        let Loaded { journal, replay, mut tree, checkpoint, .. } = loaded;
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
        return Err(CacheError::corrupted(
            Metadata::Journal,
            "journal holds no checkpoint (not formatted by ubcache?)",
        ));
    };
    let mut table = format::read_bucket_table(
        cache.as_ref(),
        &geometry,
        sb.set_uuid,
        checkpoint.table_slot,
        checkpoint.table_seq,
    )
    .map_err(|e| CacheError::reading(Metadata::BucketTable, e))?;
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
                        return Err(CacheError::corrupted(
                            Metadata::Journal,
                            format!("journal entry {seq}: generation of bucket {bucket} outside the device"),
                        ));
                    }
                }
                Ok(())
            }
            JournalEntry::Checkpoint(_) => Ok(()),
        };
        applied.map_err(|e| replay_error(*seq, entry, e))?;
    }
    Ok(Loaded { journal, replay, table, tree, checkpoint, checkpoint_nodes })
}

/// A journal entry that does not apply: an entry the btree refuses is a damaged journal; a
/// node that does not read back is a damaged node; a device failure stays a device failure.
fn replay_error(seq: u64, entry: &JournalEntry, e: ubcache_btree::BtreeError) -> CacheError {
    let context = format!("replaying journal entry {seq} ({entry:?})");
    match e {
        ubcache_btree::BtreeError::Invalid(_) => {
            CacheError::corrupted_by(Metadata::Journal, None, &context, e)
        }
        other => match CacheError::from(other) {
            CacheError::Corrupted(mut c) => {
                c.detail = format!("{context}: {}", c.detail);
                CacheError::Corrupted(c)
            }
            CacheError::Invalid(detail) => {
                CacheError::corrupted(Metadata::Journal, format!("{context}: {detail}"))
            }
            other => other,
        },
    }
}

impl Loaded {
    /// Every node slot in use on disk: `tree_nodes` (the replayed tree's) and the checkpointed
    /// tree's, sorted, each once.
    pub(crate) fn node_slots(&self, mut tree_nodes: Vec<u64>) -> Vec<u64> {
        tree_nodes.extend_from_slice(&self.checkpoint_nodes);
        tree_nodes.sort_unstable();
        tree_nodes.dedup();
        tree_nodes
    }

    /// The allocator recovery installs: generations from the bucket table (with the replayed
    /// changes), live and dirty counts from `keys`, btree buckets from `slots`
    /// ([`Loaded::node_slots`]). fsck rebuilds the same one to check it.
    pub(crate) fn rebuild_allocator(
        &self,
        keys: &[Key],
        slots: &[u64],
        cfg: AllocConfig,
    ) -> Result<Allocator, AllocError> {
        let live = keys.iter().map(|k| LiveExtent {
            offset: k.ptr.offset,
            sectors: k.size,
            generation: k.ptr.generation,
            dirty: k.dirty,
        });
        Allocator::rebuild(&self.tree.store().geometry, &self.table, live, slots.iter().copied(), cfg)
    }
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
