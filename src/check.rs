//! fsck for a cache set: cross-checks btree × allocator × journal and returns every problem
//! found, as a JSON-serializable [`Report`] of typed [`Problem`]s.
//!
//! Two entry points:
//! - [`check`]: offline and read-only. A one-way consumer of the recovery load path
//!   (`cache::set`'s `load`): the journal scanned and replayed in memory onto the last
//!   checkpointed btree, and the allocator rebuilt, exactly as `CacheSet::open` does, without
//!   writing; then the cross-checks run on the result.
//! - [`crate::cache::CacheSet::check`]: online, on a running set; additionally compares the live
//!   allocator's per-bucket counts with what the btree says.
//!
//! Both run the same cross-checks, which live below the cache set in `cache::verify` (pure
//! functions), so neither the set nor this module imports the other's internals.
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

use crate::cache::error::Metadata;
use crate::cache::set::{Binding, CacheConfig, all_keys, load};
use crate::cache::{CacheError, CacheResult, verify};
use crate::dev::BlockDev;
use crate::format;
use std::sync::Arc;

pub use crate::cache::verify::{Problem, ProblemKind, Report};

/// Checks a cache set offline without writing anything. `backings`: the backing devices to
/// check against (their superblocks' set uuid and Clean/Dirty state); may be empty.
pub fn check(cache: &Arc<dyn BlockDev>, backings: &[Arc<dyn BlockDev>]) -> CacheResult<Report> {
    let mut report = Report::default();
    let read = format::read_cache_superblock(cache.as_ref())
        .map_err(|e| CacheError::reading(Metadata::Superblock, e))?;
    if let Some(e) = &read.other_copy_error {
        report.warnings.push(format!("one cache superblock copy is unusable: {e}"));
    }
    let sb = read.sb;
    let cfg = CacheConfig::default();
    let mut loaded = match load(cache, &sb, &cfg) {
        Ok(l) => l,
        Err(e @ CacheError::Corrupted(_)) => {
            report.push(ProblemKind::MetadataUnloadable, format!("cannot load the cache metadata: {e}"));
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let replay = &loaded.replay;
    report.journal_entries_replayed = replay.entries.len() as u64;
    if replay.stats.torn_tail {
        report
            .warnings
            .push("the last journal record is torn (a crash during its write); it is dropped".into());
    }
    match loaded.tree.check() {
        Ok(problems) => verify::btree_invariants(&problems, &mut report),
        Err(e) => {
            report.push(ProblemKind::BtreeUnreadable, format!("btree walk failed: {e}"));
            return Ok(report);
        }
    }
    let keys = match all_keys(&mut loaded.tree) {
        Ok(k) => k,
        Err(e) => {
            report.push(ProblemKind::BtreeUnreadable, format!("btree scan failed: {e}"));
            return Ok(report);
        }
    };
    let nodes = match loaded.tree.node_addrs() {
        Ok(n) => n,
        Err(e) => {
            report.push(ProblemKind::BtreeUnreadable, format!("btree node walk failed: {e}"));
            return Ok(report);
        }
    };
    verify::keys_and_nodes(&sb.geometry, &loaded.table.gens, &keys, &nodes, &mut report);
    // The allocator must be rebuildable from exactly this state (what recovery will do).
    let slots = loaded.node_slots(nodes);
    match loaded.rebuild_allocator(&keys, &slots, cfg.alloc) {
        Ok(a) => verify::allocator_invariants(&a, &mut report),
        Err(e) => {
            report.push(ProblemKind::AllocatorUnrebuildable, format!("allocator cannot be rebuilt: {e}"));
        }
    }
    for b in backings {
        let bsb = match format::read_backing_superblock(b.as_ref()) {
            Ok(Some(bsb)) => bsb,
            Ok(None) => {
                report.push(ProblemKind::BackingUnbound, "a backing device has no ubcache superblock".into());
                continue;
            }
            Err(e) => {
                report.push(ProblemKind::BackingUnbound, format!("backing superblock unreadable: {e}"));
                continue;
            }
        };
        // The same judgement `CacheSet::open` makes before it serves the device.
        match Binding::of(&sb, &bsb) {
            Err(problem) => report.problems.push(problem),
            // Detached (no cache set): `ubcache serve` serves it alone until `ubcache attach`.
            // Only dirty data of its listed id would be wrong (detach writes it all home first).
            Ok(Binding::Detached { listed }) => {
                let dirty = listed.and_then(|id| report.dirty_sectors_by_dev.get(&id)).copied().unwrap_or(0);
                if let Some(problem) = verify::detached_with_dirty(bsb.uuid, dirty) {
                    report.problems.push(problem);
                } else {
                    report.warnings.push(format!(
                        "backing device {} is detached (served alone until `ubcache attach`)",
                        bsb.uuid
                    ));
                }
            }
            Ok(Binding::Attached(id)) => {
                let dirty = report.dirty_sectors_by_dev.get(&id).copied().unwrap_or(0);
                report.problems.extend(verify::backing_state(bsb.uuid, bsb.state, dirty));
            }
        }
    }
    Ok(report)
}
