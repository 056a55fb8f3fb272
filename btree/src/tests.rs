//! Unit tests that need the in-memory corruption hook.

use crate::{BtreeError, CorruptionKind, Key, MemStore, Pos, Ptr, Tree, TreeConfig};

fn key(dev: u32, start: u64, size: u32) -> Key {
    Key::new(dev, start, size, Ptr { offset: start + 10_000, generation: 3 }, true)
}

fn tree_with_leaves() -> Tree<MemStore> {
    let mut t =
        Tree::create(MemStore::new(512), TreeConfig { max_cached_nodes: 64, bset_align: 16 }).unwrap();
    for i in 0..200 {
        t.insert(key(1, i * 8, 8)).unwrap();
    }
    assert!(t.stats().nodes > 3, "the test needs several leaves");
    t
}

/// A key sitting in a later leaf but sorting before keys of an earlier leaf (what a corrupted
/// search key, as with bcache's `PRECEDING_KEY()`, leads to) makes the scan fail with
/// `KeySkippedBackwards` instead of returning keys out of order, and the bad node is never
/// written.
#[test]
fn scan_reports_key_skipped_backwards() {
    let mut t = tree_with_leaves();
    t.write_out().unwrap();
    // Into the leaf holding positions after sector 1200, put a key at sector 4..5.
    t.debug_insert_raw(Pos::new(1, 1200), key(1, 4, 1)).unwrap();
    let mut out = Vec::new();
    let err = t.scan(Pos::new(1, 0), &|_| true, usize::MAX, &mut out).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::KeySkippedBackwards), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("previous:") && msg.contains("dev 1 [4, 5)"), "dump of neighbouring keys: {msg}");
    // Everything returned before the error is in order.
    assert!(out.windows(2).all(|w| w[0].pos() < w[1].pos()));
    let check = t.check().unwrap();
    assert!(check.iter().any(|p| p.kind == Some(CorruptionKind::KeySkippedBackwards)), "{check:?}");
}

/// A node whose in-memory keys overlap is refused at write-out: the store never receives it.
#[test]
fn corrupt_cached_node_is_never_written() {
    let mut t = tree_with_leaves();
    t.write_out().unwrap();
    let writes = t.store().writes();
    t.debug_insert_raw(Pos::new(1, 100), key(1, 102, 8)).unwrap();
    let err = t.write_out().unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::OverlappingKeys), "{err}");
    assert_eq!(t.store().writes(), writes, "nothing may be written");
    // The tree refuses further changes until reopened.
    assert!(matches!(t.insert(key(1, 9000, 8)), Err(BtreeError::Poisoned)));
}

/// `lookup` walks with the same checked cursor as `scan`: a key in a later leaf that sorts
/// before keys already returned is `KeySkippedBackwards`, with the dump of both keys.
#[test]
fn lookup_reports_key_skipped_backwards_across_leaves() {
    let mut t = tree_with_leaves();
    t.write_out().unwrap();
    t.debug_insert_raw(Pos::new(1, 1200), key(1, 4, 1)).unwrap();
    let err = t.lookup(1, 0, 1600).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::KeySkippedBackwards), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("previous:") && msg.contains("dev 1 [4, 5)"), "dump of neighbouring keys: {msg}");
    // A lookup that stays before the bad leaf still works.
    assert_eq!(t.lookup(1, 0, 16).unwrap().len(), 2);
}

/// Inside a leaf of many blocks (16 KiB nodes), a key overlapping its predecessor is found by
/// the per-step check of `lookup` and `scan`, whichever block it sits in.
#[test]
fn overlap_inside_a_multi_block_leaf_is_reported_by_lookup_and_scan() {
    let mut t =
        Tree::create(MemStore::new(16 * 1024), TreeConfig { max_cached_nodes: 64, bset_align: 512 }).unwrap();
    for i in 0..300 {
        t.insert(key(1, i * 8, 8)).unwrap();
    }
    assert_eq!(t.stats().nodes, 1, "one leaf of 300 keys (about ten blocks)");
    for at in [100u64, 1001, 2330] {
        let mut t2 =
            Tree::create(MemStore::new(16 * 1024), TreeConfig { max_cached_nodes: 64, bset_align: 512 })
                .unwrap();
        for i in 0..300 {
            t2.insert(key(1, i * 8, 8)).unwrap();
        }
        t2.debug_insert_raw(Pos::MIN, key(1, at, 3)).unwrap();
        let err = t2.lookup(1, 0, 2400).unwrap_err();
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::OverlappingKeys), "at {at}: {err}");
        let mut out = Vec::new();
        let err = t2.scan(Pos::MIN, &|_| true, usize::MAX, &mut out).unwrap_err();
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::OverlappingKeys), "at {at}: {err}");
        assert!(out.iter().all(|k| k.end <= at + 3), "keys before the bad one only");
    }
    assert_eq!(t.lookup(1, 0, 2400).unwrap().len(), 300);
}
