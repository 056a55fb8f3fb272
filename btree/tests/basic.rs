//! Basic behaviour of the public API: insert, overlap fixup, replace, invalidate, lookup, scan,
//! flush and reopen through a `MemStore`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
    let cp = t.flush().unwrap();
    assert!(t.check().unwrap().is_empty());
    let before = t.lookup(1, 0, 5000).unwrap();
    let store = t.into_store();
    let mut t2 = Tree::open(store, cp.root, TreeConfig { max_cached_nodes: 64, bset_align: 64 }).unwrap();
    assert_eq!(t2.lookup(1, 0, 5000).unwrap(), before);
    assert_eq!(t2.stats().dirty_sectors, expected_dirty);
    assert!(t2.check().unwrap().is_empty());
}
