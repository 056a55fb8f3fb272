//! The cross-checks of fsck, as pure functions over what the btree, the bucket generations and
//! the allocator say: no I/O and no cache-set state of their own. Two callers run them:
//! [`crate::check::check`] (offline, on what the recovery load path rebuilt in memory) and
//! [`super::CacheSet::check`] (online, under the metadata lock). Recovery itself refuses to
//! open on `detached_with_dirty`, the one check it shares with fsck.
//!
//! Every problem has a [`ProblemKind`], so callers (and tests) act on the kind; its
//! [`Problem::detail`] is the readable sentence the CLI prints.

use crate::alloc::{Allocator, BucketState, OpenKind};
use crate::format::{BackingState, Geometry, Uuid};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use ubcache_btree::Key;

/// What fsck found. `problems` empty means healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Every inconsistency found.
    pub problems: Vec<Problem>,
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

    /// Whether some problem is of this kind.
    #[must_use]
    pub fn has(&self, kind: ProblemKind) -> bool {
        self.problems.iter().any(|p| p.kind == kind)
    }

    pub(crate) fn push(&mut self, kind: ProblemKind, detail: String) {
        self.problems.push(Problem { kind, detail });
    }
}

/// One inconsistency: its kind, and a readable sentence saying where and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The kinds of inconsistency fsck reports (snake_case in the JSON report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The journal, the checkpointed btree or the bucket table cannot be loaded at all.
    MetadataUnloadable,
    /// The btree walk found a broken invariant (order, bounds, checksums, overlap).
    BtreeInvariant,
    /// The btree could not be walked to the end (a node does not read back).
    BtreeUnreadable,
    /// A node slot is used twice, misaligned, outside the device or in fixed metadata.
    NodeSlotMisplaced,
    /// A key's data does not lie inside one data bucket of the device.
    KeyMisplaced,
    /// A dirty key whose bucket was reused: data only the cache held is lost.
    DirtyDataLost,
    /// Two valid keys, or a key and a btree node, share cache sectors.
    SectorsShared,
    /// A bucket holds more than fits, or both btree nodes and data.
    BucketOverfull,
    /// The allocator's own invariants, or its per-bucket counts against the btree.
    AllocatorMismatch,
    /// The allocator cannot be rebuilt from the btree (what recovery would do).
    AllocatorUnrebuildable,
    /// A backing device this set cannot claim: no ubcache superblock, an unreadable one, not
    /// registered in the cache superblock, or bound to another set.
    BackingUnbound,
    /// A backing device the cache holds dirty data of does not say Dirty (or says Detached).
    BackingStateMismatch,
}

/// Per-bucket counts recomputed from the btree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Expected {
    pub(crate) live: u64,
    pub(crate) dirty: u64,
    pub(crate) nodes: u64,
}

/// Reports the problems of a btree walk (`Tree::check`).
pub(crate) fn btree_invariants<P: std::fmt::Display>(problems: &[P], report: &mut Report) {
    for p in problems {
        report.push(ProblemKind::BtreeInvariant, format!("btree: {p}"));
    }
}

/// Reports the allocator's own invariants (`Allocator::check`).
pub(crate) fn allocator_invariants(alloc: &Allocator, report: &mut Report) {
    for p in alloc.check() {
        report.push(ProblemKind::AllocatorMismatch, format!("allocator: {p}"));
    }
}

/// Checks keys and node slots against the geometry and generations; returns per-bucket counts.
pub(crate) fn keys_and_nodes(
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
    let mut seen_nodes = BTreeSet::new();
    for &addr in nodes {
        let node_sectors = u64::from(geometry.node_sectors);
        let b = addr / bucket_sectors;
        if !seen_nodes.insert(addr) {
            report.push(ProblemKind::NodeSlotMisplaced, format!("btree node slot {addr} is used twice"));
            continue;
        }
        if addr % node_sectors != 0 || b >= geometry.nbuckets || geometry.is_fixed_metadata(b) {
            report.push(
                ProblemKind::NodeSlotMisplaced,
                format!("btree node slot {addr} is misaligned, outside the device or in fixed metadata"),
            );
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
            report.push(
                ProblemKind::KeyMisplaced,
                format!("key {k} does not lie inside one bucket of the device"),
            );
            continue;
        }
        if geometry.is_fixed_metadata(b) {
            report.push(ProblemKind::KeyMisplaced, format!("key {k} points into fixed metadata bucket {b}"));
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
                report.push(
                    ProblemKind::DirtyDataLost,
                    format!(
                        "dirty key {k} is stale (bucket {b} is at generation {:?}): its data was lost",
                        gens.get(b as usize)
                    ),
                );
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
            report.push(ProblemKind::SectorsShared, format!("{} and {} share cache sectors", w[0].2, w[1].2));
        }
    }
    for (b, e) in per_bucket.iter().enumerate() {
        if e.nodes > 0 && e.live > 0 {
            report.push(
                ProblemKind::BucketOverfull,
                format!("bucket {b} holds both btree nodes and {} live data sectors", e.live),
            );
        }
        if e.live + e.nodes * u64::from(geometry.node_sectors) > bucket_sectors {
            report
                .push(ProblemKind::BucketOverfull, format!("bucket {b} has more live sectors than it holds"));
        }
    }
    per_bucket
}

/// Compares a live allocator's per-bucket counts with what the btree says (`expected`, from
/// [`keys_and_nodes`]), after its own invariants.
pub(crate) fn allocator_counts(
    geometry: &Geometry,
    alloc: &Allocator,
    expected: &[Expected],
    report: &mut Report,
) {
    allocator_invariants(alloc, report);
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
                    report.push(
                        ProblemKind::AllocatorMismatch,
                        format!(
                            "bucket {b} ({:?}): allocator counts {} live / {} dirty sectors, the btree {} / {}",
                            k.state, k.live_sectors, k.dirty_sectors, e.live, e.dirty
                        ),
                    );
                }
                if e.nodes > 0 {
                    report.push(
                        ProblemKind::AllocatorMismatch,
                        format!("bucket {b} ({:?}) holds btree nodes", k.state),
                    );
                }
            }
            BucketState::Btree | BucketState::Open(OpenKind::Btree) => {
                // Slots freed since the last checkpoint are still counted until it is durable.
                if u64::from(k.live_sectors) < e.nodes * u64::from(geometry.node_sectors) || e.live > 0 {
                    report.push(
                        ProblemKind::AllocatorMismatch,
                        format!(
                            "btree bucket {b}: allocator counts {} live sectors for {} nodes and {} data sectors",
                            k.live_sectors, e.nodes, e.live
                        ),
                    );
                }
            }
            BucketState::Reserved | BucketState::Journal => {
                if e.live > 0 || e.nodes > 0 {
                    report.push(
                        ProblemKind::AllocatorMismatch,
                        format!("metadata bucket {b} holds keys or nodes"),
                    );
                }
            }
        }
    }
}

/// A bound backing device the cache holds `dirty` sectors of must say Dirty: a crash would
/// otherwise let it be used alone without them.
pub(crate) fn backing_state(uuid: Uuid, state: BackingState, dirty: u64) -> Option<Problem> {
    (dirty > 0 && state != BackingState::Dirty).then(|| Problem {
        kind: ProblemKind::BackingStateMismatch,
        detail: format!(
            "backing device {uuid} has {dirty} dirty sectors in the cache but its superblock says {state:?}"
        ),
    })
}

/// A backing device that says Detached while the cache holds `dirty` sectors of its dev id:
/// detach writes every dirty sector home before the device says so, so the two disagree, and
/// serving the device alone would lose that data.
pub(crate) fn detached_with_dirty(uuid: Uuid, dirty: u64) -> Option<Problem> {
    (dirty > 0).then(|| Problem {
        kind: ProblemKind::BackingStateMismatch,
        detail: format!(
            "backing device {uuid} says Detached but the cache holds {dirty} dirty sectors of it"
        ),
    })
}
