//! Basic behaviour of the public API: insert, overlap fixup, replace, invalidate, lookup, scan,
//! flush and reopen through a `MemStore`.

use ubcache_btree::{Key, MemStore, Pos, Ptr, Segment, Tree, TreeConfig};

fn key(dev: u32, start: u64, size: u32, cache: u64, dirty: bool) -> Key {
    Key::new(dev, start, size, Ptr { offset: cache, generation: 1 }, dirty)
}

fn small_tree() -> Tree<MemStore> {
    Tree::create(MemStore::new(1024), TreeConfig { max_cached_nodes: 64, bset_align: 64 }).unwrap()
}

#[test]
fn insert_lookup_and_overlap_fixup() {
    let mut t = small_tree();
    t.insert(key(1, 0, 16, 1000, true)).unwrap();
    // Lands in the middle: splits the old key into front and back pieces.
    let out = t.insert(key(1, 4, 4, 5000, false)).unwrap();
    assert_eq!(out.displaced, vec![key(1, 4, 4, 1004, true)]);
    let segs = t.lookup(1, 0, 20).unwrap();
    assert_eq!(
        segs,
        vec![
            Segment::Cached(key(1, 0, 4, 1000, true)),
            Segment::Cached(key(1, 4, 4, 5000, false)),
            Segment::Cached(key(1, 8, 8, 1008, true)),
            Segment::Hole { start: 16, end: 20 },
        ]
    );
    assert_eq!(t.stats().dirty_sectors, 12);
    assert!(t.check().unwrap().is_empty());
}

#[test]
fn replace_inserts_only_where_expected() {
    let mut t = small_tree();
    let dirty = key(1, 8, 8, 100, true);
    t.insert(dirty).unwrap();
    // Writeback marks the key clean: matches.
    let clean = Key { dirty: false, ..dirty };
    let r = t.replace(clean, Some(&dirty)).unwrap();
    assert_eq!((r.inserted_sectors, r.collision_sectors), (8, 0));
    assert_eq!(t.stats().dirty_sectors, 0);
    // A read-miss fill over [0, 24) expecting nothing: only the holes are filled.
    let fill = key(1, 0, 24, 500, false);
    let r = t.replace(fill, None).unwrap();
    assert_eq!((r.inserted_sectors, r.collision_sectors), (16, 8));
    let segs = t.lookup(1, 0, 24).unwrap();
    assert_eq!(
        segs,
        vec![
            Segment::Cached(key(1, 0, 8, 500, false)),
            Segment::Cached(clean),
            Segment::Cached(key(1, 16, 8, 516, false)),
        ]
    );
}

#[test]
fn invalidate_scan_flush_reopen() {
    let mut t = small_tree();
    for i in 0..500u64 {
        t.insert(key((i % 3) as u32, i * 8, 8, i * 8, i % 2 == 0)).unwrap();
    }
    let out = t.invalidate(0, 0, 80).unwrap();
    assert_eq!(out.displaced.iter().map(|k| u64::from(k.size)).sum::<u64>(), 32);
    let mut dirty = Vec::new();
    let mut from = Pos::MIN;
    while let Some(p) = t.scan(from, &|k| k.dirty, 7, &mut dirty).unwrap() {
        from = p;
    }
    let expected_dirty = t.stats().dirty_sectors;
    assert_eq!(dirty.iter().map(|k| u64::from(k.size)).sum::<u64>(), expected_dirty);
    assert!(dirty.windows(2).all(|w| w[0].pos() < w[1].pos()));
    let cp = t.write_out().unwrap();
    assert!(t.check().unwrap().is_empty());
    let before = t.lookup(1, 0, 5000).unwrap();
    let store = t.into_store();
    let mut t2 = Tree::open(store, cp.root, TreeConfig { max_cached_nodes: 64, bset_align: 64 }).unwrap();
    assert_eq!(t2.lookup(1, 0, 5000).unwrap(), before);
    assert_eq!(t2.stats().dirty_sectors, expected_dirty);
    assert!(t2.check().unwrap().is_empty());
}

#[test]
fn tree_grows_and_shrinks_back_to_one_leaf() {
    let mut t = small_tree();
    for i in 0..3000u64 {
        t.insert(key(2, i * 4, 4, i * 4, i % 2 == 1)).unwrap();
    }
    let grown = t.stats();
    assert!(grown.depth >= 3 && grown.nodes > 50, "{grown:?}");
    assert_eq!(grown.dirty_sectors, 1500 * 4);
    assert_eq!(grown.dirty_sectors_by_dev.get(&2), Some(&6000));
    t.write_out().unwrap();
    // Remove everything in uneven chunks: leaves merge, levels collapse.
    let mut at = 0;
    while at < 12_000 {
        let out = t.invalidate(2, at, at + 1000).unwrap();
        assert_eq!(out.displaced.iter().map(|k| u64::from(k.size)).sum::<u64>(), 1000);
        at += 1000;
        assert!(t.check().unwrap().is_empty());
    }
    let shrunk = t.stats();
    assert_eq!((shrunk.keys, shrunk.depth, shrunk.nodes, shrunk.dirty_sectors), (0, 1, 1, 0), "{shrunk:?}");
    assert!(shrunk.dirty_sectors_by_dev.is_empty());
    let cp = t.write_out().unwrap();
    assert!(!cp.freed.is_empty(), "the old nodes are freed");
    let mut t =
        Tree::open(t.into_store(), cp.root, TreeConfig { max_cached_nodes: 64, bset_align: 64 }).unwrap();
    assert_eq!(t.lookup(2, 0, 12_000).unwrap(), vec![Segment::Hole { start: 0, end: 12_000 }]);
}

#[test]
fn a_key_spanning_many_leaves_reads_back_whole() {
    let mut t = small_tree();
    for i in 0..400u64 {
        t.insert(key(1, i * 8, 8, 0, false)).unwrap();
    }
    // One big dirty extent over many leaves.
    let big = key(1, 100, 2000, 50_000, true);
    let out = t.insert(big).unwrap();
    assert_eq!(out.displaced.iter().map(|k| u64::from(k.size)).sum::<u64>(), 2000);
    let segs = t.lookup(1, 100, 2100).unwrap();
    let mut at = 100;
    for s in &segs {
        let Segment::Cached(k) = s else { panic!("hole in {segs:?}") };
        assert_eq!((k.start(), k.ptr.offset, k.dirty), (at, 50_000 + at - 100, true));
        at = k.end;
    }
    assert_eq!(at, 2100);
    assert_eq!(t.stats().dirty_sectors, 2000);
    // Validation rejects malformed keys without touching the tree.
    let bad = Key { dev: 1, end: 4, size: 8, ptr: Ptr::default(), dirty: false };
    assert!(matches!(t.insert(bad), Err(ubcache_btree::BtreeError::Invalid(_))));
    assert!(matches!(t.insert(Key { size: 0, ..big }), Err(ubcache_btree::BtreeError::Invalid(_))));
    assert!(t.check().unwrap().is_empty());
}

/// The writeback pattern: scan dirty keys in batches from a cursor, mark each clean with a
/// replace that expects the dirty key, while new writes land ahead of and behind the cursor.
/// Keys written ahead are picked up in the same pass; keys rewritten after being scanned make the
/// replace a collision and stay dirty.
#[test]
fn writeback_pass_with_concurrent_writes() {
    let mut t = small_tree();
    for i in 0..400u64 {
        t.insert(key(1, i * 8, 8, i * 8, true)).unwrap();
    }
    let mut from = Pos::MIN;
    let mut cleaned = 0u64;
    let mut collided = 0u64;
    let mut round = 0u64;
    let mut rewritten = Vec::new();
    let mut last_ahead = key(1, 0, 1, 0, false);
    loop {
        let mut batch = Vec::new();
        let next = t.scan(from, &|k| k.dirty, 16, &mut batch).unwrap();
        // A write ahead of the cursor (picked up later in this pass) and one over the first key
        // of the batch, behind the cursor (its writeback now collides and it stays dirty).
        if let Some(first) = batch.first() {
            last_ahead = key(1, 4000 + round * 8, 8, 90_000 + round, true);
            t.insert(last_ahead).unwrap();
            let rewrite = key(1, first.start(), 8, 80_000 + round, true);
            t.insert(rewrite).unwrap();
            rewritten.push(rewrite);
            round += 1;
        }
        for k in &batch {
            let r = t.replace(Key { dirty: false, ..*k }, Some(k)).unwrap();
            cleaned += r.inserted_sectors;
            collided += r.collision_sectors;
        }
        match next {
            Some(p) => from = p,
            None => break,
        }
    }
    assert_eq!(collided, round * 8, "each rewritten first key collides");
    // Everything still dirty is exactly what was rewritten during the pass.
    let mut dirty = Vec::new();
    assert_eq!(t.scan(Pos::MIN, &|k| k.dirty, usize::MAX, &mut dirty).unwrap(), None);
    let dirty_sectors: u64 = dirty.iter().map(|k| u64::from(k.size)).sum();
    assert_eq!(dirty_sectors, t.stats().dirty_sectors);
    // Still dirty: every rewritten key (behind the cursor when written), and the last write
    // ahead of the cursor, made after the final scan call; nothing else.
    assert!(rewritten.iter().all(|r| dirty.contains(r)), "{dirty:?}");
    assert!(dirty.iter().all(|k| rewritten.contains(k) || *k == last_ahead), "{dirty:?}");
    assert!(dirty.contains(&last_ahead));
    assert!(cleaned >= 400 * 8 - collided);
    assert!(t.check().unwrap().is_empty());
}
