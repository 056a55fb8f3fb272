//! fsck for a cache set: cross-checks btree × allocator × journal and returns every problem
//! found, as a JSON-serializable [`Report`].
//!
//! Two entry points:
//! - [`check`]: offline and read-only. Reads the superblock, scans and replays the journal in
//!   memory onto the last checkpointed btree (exactly what recovery would do, without writing),
//!   then checks the result.
//! - [`crate::cache::CacheSet::check`]: online, on a running set; additionally compares the live
//!   allocator's per-bucket counts with what the btree says.
//!
//! What is checked:
//! - the btree's own invariants (`Tree::check`: order, bounds, checksums, no overlap);
//! - every key: its data lies inside one bucket, outside the fixed metadata regions, not in a
//!   bucket holding btree nodes; a key whose generation differs from its bucket's is stale (a
//!   miss), which is fine for clean keys and data loss for dirty ones;
//! - no two valid keys share a cache sector, and no valid key shares one with a btree node;
//! - node slots: aligned, inside non-metadata buckets, no duplicates;
//! - per-bucket live and dirty sector counts fit the bucket (and, online, equal the allocator's);
//! - dirty data per backing device vs the backing superblock state (Dirty required);
//! - journal: a checkpoint exists, the bucket table it names reads back, torn tail reported.

use crate::alloc::{Allocator, BucketState, LiveExtent, OpenKind};
use crate::cache::set::{CacheConfig, Loaded, all_keys, load};
use crate::cache::{CacheError, CacheResult};
use crate::dev::BlockDev;
use crate::format::{self, BackingState, Geometry};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use ubcache_btree::Key;

/// What [`check`] found. `problems` empty means healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Every inconsistency found (each one a readable sentence).
    pub problems: Vec<String>,
    /// Things worth knowing that are not errors (a torn journal tail, a bad superblock copy).
    pub warnings: Vec<String>,
    pub keys: u64,
    pub stale_keys: u64,
    pub dirty_keys: u64,
    pub dirty_sectors: u64,
    pub nodes: u64,
    pub journal_entries_replayed: u64,
    /// Dirty sectors per backing dev id.
    pub dirty_sectors_by_dev: BTreeMap<u32, u64>,
}

impl Report {
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Per-bucket counts recomputed from the btree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Expected {
    pub(crate) live: u64,
    pub(crate) dirty: u64,
    pub(crate) nodes: u64,
}

/// Checks keys and node slots against the geometry and generations; returns per-bucket counts.
pub(crate) fn check_keys_and_nodes(
    geometry: &Geometry,
    gens: &[u8],
    keys: &[Key],
    nodes: &[u64],
    report: &mut Report,
) -> Vec<Expected> {
    let bucket_sectors = u64::from(geometry.bucket_sectors);
    let mut per_bucket = vec![Expected::default(); geometry.nbuckets as usize];
    // (start, end, what) of every valid cache extent, to find overlaps.
    let mut extents: Vec<(u64, u64, String)> = Vec::new();
    let mut seen_nodes = std::collections::BTreeSet::new();
    for &addr in nodes {
        let node_sectors = u64::from(geometry.node_sectors);
        let b = addr / bucket_sectors;
        if !seen_nodes.insert(addr) {
            report.problems.push(format!("btree node slot {addr} is used twice"));
            continue;
        }
        if addr % node_sectors != 0 || b >= geometry.nbuckets || geometry.is_fixed_metadata(b) {
            report.problems.push(format!(
                "btree node slot {addr} is misaligned, outside the device or in fixed metadata"
            ));
            continue;
        }
        per_bucket[b as usize].nodes += 1;
        extents.push((addr, addr + node_sectors, format!("btree node {addr}")));
    }
    report.nodes = nodes.len() as u64;
    for k in keys {
        report.keys += 1;
        let start = k.ptr.offset;
        let end = start.saturating_add(u64::from(k.size));
        let b = start / bucket_sectors;
        if k.size == 0 || b >= geometry.nbuckets || (end - 1) / bucket_sectors != b {
            report.problems.push(format!("key {k} does not lie inside one bucket of the device"));
            continue;
        }
        if geometry.is_fixed_metadata(b) {
            report.problems.push(format!("key {k} points into fixed metadata bucket {b}"));
            continue;
        }
        if k.dirty {
            report.dirty_keys += 1;
            report.dirty_sectors += u64::from(k.size);
            *report.dirty_sectors_by_dev.entry(k.dev).or_default() += u64::from(k.size);
        }
        if gens.get(b as usize) != Some(&k.ptr.generation) {
            report.stale_keys += 1;
            if k.dirty {
                report.problems.push(format!(
                    "dirty key {k} is stale (bucket {b} is at generation {:?}): its data was lost",
                    gens.get(b as usize)
                ));
            }
            continue;
        }
        let e = &mut per_bucket[b as usize];
        e.live += u64::from(k.size);
        if k.dirty {
            e.dirty += u64::from(k.size);
        }
        extents.push((start, end, format!("key {k}")));
    }
    extents.sort_by_key(|x| (x.0, x.1));
    for w in extents.windows(2) {
        if w[1].0 < w[0].1 {
            report.problems.push(format!("{} and {} share cache sectors", w[0].2, w[1].2));
        }
    }
    for (b, e) in per_bucket.iter().enumerate() {
        if e.nodes > 0 && e.live > 0 {
            report
                .problems
                .push(format!("bucket {b} holds both btree nodes and {} live data sectors", e.live));
        }
        if e.live + e.nodes * u64::from(geometry.node_sectors) > bucket_sectors {
            report.problems.push(format!("bucket {b} has more live sectors than it holds"));
        }
    }
    per_bucket
}

/// Checks a cache set offline without writing anything. `backings`: the backing devices to
/// check against (their superblocks' set uuid and Clean/Dirty state); may be empty.
pub fn check(cache: &Arc<dyn BlockDev>, backings: &[Arc<dyn BlockDev>]) -> CacheResult<Report> {
    let mut report = Report::default();
    let read = format::read_cache_superblock(cache.as_ref())?;
    if let Some(e) = &read.other_copy_error {
        report.warnings.push(format!("one cache superblock copy is unusable: {e}"));
    }
    let sb = read.sb;
    let cfg = CacheConfig::default();
    let Loaded { replay, table, mut tree, checkpoint_nodes, .. } = match load(cache, &sb, &cfg) {
        Ok(l) => l,
        Err(e @ CacheError::Corrupted(_)) => {
            report.problems.push(format!("cannot load the cache metadata: {e}"));
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    report.journal_entries_replayed = replay.entries.len() as u64;
    if replay.stats.torn_tail {
        report
            .warnings
            .push("the last journal record is torn (a crash during its write); it is dropped".into());
    }
    match tree.check() {
        Ok(problems) => report.problems.extend(problems.iter().map(|p| format!("btree: {p}"))),
        Err(e) => {
            report.problems.push(format!("btree walk failed: {e}"));
            return Ok(report);
        }
    }
    let keys = match all_keys(&mut tree) {
        Ok(k) => k,
        Err(e) => {
            report.problems.push(format!("btree scan failed: {e}"));
            return Ok(report);
        }
    };
    let mut nodes = match tree.node_addrs() {
        Ok(n) => n,
        Err(e) => {
            report.problems.push(format!("btree node walk failed: {e}"));
            return Ok(report);
        }
    };
    check_keys_and_nodes(&sb.geometry, &table.gens, &keys, &nodes, &mut report);
    // The allocator must be rebuildable from exactly this state (what recovery will do).
    nodes.extend(checkpoint_nodes);
    nodes.sort_unstable();
    nodes.dedup();
    let live = keys.iter().map(|k| LiveExtent {
        offset: k.ptr.offset,
        sectors: k.size,
        generation: k.ptr.generation,
        dirty: k.dirty,
    });
    match Allocator::rebuild(&sb.geometry, &table, live, nodes.iter().copied(), cfg.alloc) {
        Ok(a) => report.problems.extend(a.check().into_iter().map(|p| format!("allocator: {p}"))),
        Err(e) => report.problems.push(format!("allocator cannot be rebuilt: {e}")),
    }
    for b in backings {
        match format::read_backing_superblock(b.as_ref()) {
            // Detached (no cache set): `ubcache serve` serves it alone until `ubcache attach`.
            // Only dirty data of its listed id would be wrong (detach writes it all home first).
            Ok(Some(bsb)) if bsb.state == BackingState::Detached && bsb.set_uuid == format::Uuid::NIL => {
                let entry = sb.backing.iter().find(|e| e.uuid == bsb.uuid);
                let dirty =
                    entry.and_then(|e| report.dirty_sectors_by_dev.get(&e.dev_id)).copied().unwrap_or(0);
                if dirty > 0 {
                    report.problems.push(format!(
                        "backing device {} says Detached but the cache holds {dirty} dirty sectors of it",
                        bsb.uuid
                    ));
                } else {
                    report.warnings.push(format!(
                        "backing device {} is detached (served alone until `ubcache attach`)",
                        bsb.uuid
                    ));
                }
            }
            Ok(Some(bsb)) => {
                let Some(entry) = sb.backing.iter().find(|e| e.uuid == bsb.uuid) else {
                    report
                        .problems
                        .push(format!("backing device {} is not registered in this cache set", bsb.uuid));
                    continue;
                };
                if bsb.set_uuid != sb.set_uuid {
                    report
                        .problems
                        .push(format!("backing device {} names cache set {}", bsb.uuid, bsb.set_uuid));
                }
                let dirty = report.dirty_sectors_by_dev.get(&entry.dev_id).copied().unwrap_or(0);
                if dirty > 0 && bsb.state != BackingState::Dirty {
                    report.problems.push(format!(
                        "backing device {} has {dirty} dirty sectors in the cache but its superblock says {:?}",
                        bsb.uuid, bsb.state
                    ));
                }
            }
            Ok(None) => report.problems.push("a backing device has no ubcache superblock".into()),
            Err(e) => report.problems.push(format!("backing superblock unreadable: {e}")),
        }
    }
    Ok(report)
}

/// Online part of [`crate::cache::CacheSet::check`]: compares the live allocator with the btree.
pub(crate) fn compare_allocator(
    geometry: &Geometry,
    alloc: &Allocator,
    expected: &[Expected],
    report: &mut Report,
) {
    report.problems.extend(alloc.check().into_iter().map(|p| format!("allocator: {p}")));
    for (b, e) in expected.iter().enumerate() {
        let Some(k) = alloc.bucket(b as u64) else { continue };
        match k.state {
            BucketState::Data
            | BucketState::Open(OpenKind::Data)
            | BucketState::FreePending { .. }
            | BucketState::Free => {
                let counted_live = if matches!(k.state, BucketState::FreePending { .. } | BucketState::Free) {
                    0
                } else {
                    u64::from(k.live_sectors)
                };
                if counted_live != e.live || (counted_live > 0 && u64::from(k.dirty_sectors) != e.dirty) {
                    report.problems.push(format!(
                        "bucket {b} ({:?}): allocator counts {} live / {} dirty sectors, the btree {} / {}",
                        k.state, k.live_sectors, k.dirty_sectors, e.live, e.dirty
                    ));
                }
                if e.nodes > 0 {
                    report.problems.push(format!("bucket {b} ({:?}) holds btree nodes", k.state));
                }
            }
            BucketState::Btree | BucketState::Open(OpenKind::Btree) => {
                // Slots freed since the last checkpoint are still counted until it is durable.
                if u64::from(k.live_sectors) < e.nodes * u64::from(geometry.node_sectors) || e.live > 0 {
                    report.problems.push(format!(
                        "btree bucket {b}: allocator counts {} live sectors for {} nodes and {} data sectors",
                        k.live_sectors, e.nodes, e.live
                    ));
                }
            }
            BucketState::Reserved | BucketState::Journal => {
                if e.live > 0 || e.nodes > 0 {
                    report.problems.push(format!("metadata bucket {b} holds keys or nodes"));
                }
            }
        }
    }
}
