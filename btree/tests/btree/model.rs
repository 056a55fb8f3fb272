//! Model-based test: random inserts (overlapping, adjacent, nested), replaces, invalidations,
//! lookups, scans, flushes and reopens against a per-sector reference map, with a tiny node size
//! so splits, merges, compactions and evictions happen constantly.
//!
//! Every flush also proves the persistence model: the previous checkpoint's root, opened on the
//! store as it is after the new flush (before the new root is "journaled" and its freed slots
//! reused), still reads back exactly the previous model state.

use proptest::prelude::*;
use std::collections::BTreeMap;
use ubcache_btree::{Checkpoint, Key, MemStore, NodePtr, Pos, Ptr, Segment, Tree, TreeConfig};

/// Per-sector reference: (dev, sector) -> (cache sector, generation, dirty).
type Model = BTreeMap<(u32, u64), (u64, u8, bool)>;

const SPACE: u64 = 400;

// Keep in sync with the strategies above: sectors stay well below u32 sizes.

#[derive(Clone, Debug)]
enum Op {
    Insert {
        dev: u32,
        start: u64,
        size: u32,
        cache: u64,
        generation: u8,
        dirty: bool,
    },
    /// Replace expecting "not cached".
    Fill {
        dev: u32,
        start: u64,
        size: u32,
        cache: u64,
    },
    /// Replace expecting the key currently mapping sector `at` (writeback marking it clean), or
    /// a slightly wrong expectation when `wrong` is set.
    MarkClean {
        dev: u32,
        at: u64,
        wrong: bool,
    },
    Invalidate {
        dev: u32,
        start: u64,
        len: u64,
    },
    Lookup {
        dev: u32,
        start: u64,
        len: u64,
    },
    Scan {
        from_dev: u32,
        from: u64,
        max: usize,
        dirty_only: bool,
    },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let dev = 0u32..3;
    prop_oneof![
        8 => (dev.clone(), 0..SPACE, 1u32..48, 0u64..1_000_000, any::<u8>(), any::<bool>()).prop_map(
            |(dev, start, size, cache, generation, dirty)| Op::Insert { dev, start, size, cache, generation, dirty }
        ),
        2 => (dev.clone(), 0..SPACE, 1u32..64, 0u64..1_000_000).prop_map(|(dev, start, size, cache)| Op::Fill { dev, start, size, cache }),
        2 => (dev.clone(), 0..SPACE, any::<bool>()).prop_map(|(dev, at, wrong)| Op::MarkClean { dev, at, wrong }),
        2 => (dev.clone(), 0..SPACE, 1u64..80).prop_map(|(dev, start, len)| Op::Invalidate { dev, start, len }),
        3 => (dev, 0..SPACE, 1u64..120).prop_map(|(dev, start, len)| Op::Lookup { dev, start, len }),
        1 => (0u32..3, 0..SPACE, 1usize..20, any::<bool>()).prop_map(|(from_dev, from, max, dirty_only)| Op::Scan { from_dev, from, max, dirty_only }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn cfg() -> TreeConfig {
    TreeConfig { max_cached_nodes: 32, bset_align: 16 }
}

fn model_insert(model: &mut Model, k: &Key) {
    for s in k.start()..k.end {
        model.insert((k.dev, s), (k.ptr.offset + (s - k.start()), k.ptr.generation, k.dirty));
    }
}

/// Checks the displaced pieces are exactly the sectors of `[start, end)` the model had.
fn check_displaced(model: &Model, dev: u32, start: u64, end: u64, displaced: &[Key]) {
    let mut got: Model = BTreeMap::new();
    for k in displaced {
        assert_eq!(k.dev, dev);
        model_insert(&mut got, k);
    }
    let want: Model = model.range((dev, start)..(dev, end)).map(|(a, b)| (*a, *b)).collect();
    assert_eq!(got, want, "displaced pieces");
}

fn check_lookup(t: &mut Tree<MemStore>, model: &Model, dev: u32, start: u64, end: u64) {
    let segs = t.lookup(dev, start, end).unwrap();
    let mut at = start;
    for seg in &segs {
        assert_eq!(seg.start(), at, "segments contiguous: {segs:?}");
        assert!(seg.end() > seg.start());
        match seg {
            Segment::Cached(k) => {
                for s in k.start()..k.end {
                    assert_eq!(
                        model.get(&(dev, s)),
                        Some(&(k.ptr.offset + (s - k.start()), k.ptr.generation, k.dirty)),
                        "sector {dev}:{s} in {k}"
                    );
                }
            }
            Segment::Hole { start, end } => {
                assert_eq!(
                    model.range((dev, *start)..(dev, *end)).next(),
                    None,
                    "hole {start}..{end} of dev {dev}"
                );
            }
        }
        at = seg.end();
    }
    assert_eq!(at, end, "segments cover the range");
}

/// Compares the whole tree (scanned in order) with the model.
fn check_all(t: &mut Tree<MemStore>, model: &Model) {
    let mut keys = Vec::new();
    assert_eq!(t.scan(Pos::MIN, &|_| true, usize::MAX, &mut keys).unwrap(), None);
    assert!(
        keys.windows(2)
            .all(|w| w[0].pos() < w[1].pos() && (w[0].dev != w[1].dev || w[0].end <= w[1].start()))
    );
    let mut got = BTreeMap::new();
    for k in &keys {
        model_insert(&mut got, k);
    }
    assert_eq!(&got, model, "tree content");
    let dirty = model.values().filter(|v| v.2).count() as u64;
    let stats = t.stats();
    assert_eq!(stats.dirty_sectors, dirty);
    assert_eq!(stats.keys, keys.len() as u64);
    let problems = t.check().unwrap();
    assert!(problems.is_empty(), "check: {problems:?}");
}

fn flush(t: &mut Tree<MemStore>, model: &Model, prev: &mut Option<(NodePtr, Model)>) -> Checkpoint {
    let cp = t.write_out().unwrap();
    // A freed slot must never be one the new tree still uses (the allocator would reuse it).
    let live: std::collections::HashSet<_> = t.node_addrs().unwrap().into_iter().collect();
    assert!(cp.freed.iter().all(|a| !live.contains(a)), "freed {:?} overlaps live {live:?}", cp.freed);
    let mut freed = cp.freed.clone();
    freed.sort_unstable();
    freed.dedup();
    assert_eq!(freed.len(), cp.freed.len(), "a slot freed twice");
    if let Some((root, old_model)) = prev.take() {
        // Crash before the new root was journaled: the old root must still be whole.
        let mut old = Tree::open(t.store().clone(), root, cfg()).unwrap();
        check_all(&mut old, &old_model);
    }
    // "Journal" the new root, then let the allocator reuse the freed slots.
    t.store_mut().release(&cp.freed);
    *prev = Some((cp.root, model.clone()));
    cp
}

fn run(ops: &[Op]) -> (ubcache_btree::TreeStats, u64) {
    let mut t = Tree::create(MemStore::new(512), cfg()).unwrap();
    let mut model: Model = BTreeMap::new();
    let mut prev: Option<(NodePtr, Model)> = None;
    for op in ops {
        match *op {
            Op::Insert { dev, start, size, cache, generation, dirty } => {
                let k = Key::new(dev, start, size, Ptr { offset: cache, generation }, dirty);
                let out = t.insert(k).unwrap();
                check_displaced(&model, dev, k.start(), k.end, &out.displaced);
                model_insert(&mut model, &k);
            }
            Op::Fill { dev, start, size, cache } => {
                let k = Key::new(dev, start, size, Ptr { offset: cache, generation: 7 }, false);
                let out = t.replace(k, None).unwrap();
                let mut inserted = 0;
                for s in k.start()..k.end {
                    if let std::collections::btree_map::Entry::Vacant(e) = model.entry((dev, s)) {
                        e.insert((cache + (s - start), 7, false));
                        inserted += 1;
                    }
                }
                assert!(out.displaced.is_empty());
                assert_eq!(
                    (out.inserted_sectors, out.collision_sectors),
                    (inserted, u64::from(size) - inserted)
                );
            }
            Op::MarkClean { dev, at, wrong } => {
                let segs = t.lookup(dev, at, at + 1).unwrap();
                let Some(Segment::Cached(piece)) = segs.first().copied() else { continue };
                // Expect the whole current key around `at` (as writeback would hold it).
                let mut keys = Vec::new();
                t.scan(Pos::new(dev, at), &|_| true, 1, &mut keys).unwrap();
                let mut expected = keys[0];
                assert!(expected.start() <= at && at < expected.end && expected.same_mapping(&piece));
                if wrong {
                    expected.ptr.generation = expected.ptr.generation.wrapping_add(1);
                }
                let clean = Key { dirty: false, ..expected };
                let out = t.replace(clean, Some(&expected)).unwrap();
                let mut inserted = 0;
                for s in clean.start()..clean.end {
                    let want = (
                        expected.ptr.offset + (s - expected.start()),
                        expected.ptr.generation,
                        expected.dirty,
                    );
                    if model.get(&(dev, s)) == Some(&want) {
                        model.insert((dev, s), (want.0, want.1, false));
                        inserted += 1;
                    }
                }
                assert_eq!(out.inserted_sectors, inserted);
                assert_eq!(out.collision_sectors, u64::from(clean.size) - inserted);
                if wrong {
                    assert_eq!(inserted, 0);
                }
            }
            Op::Invalidate { dev, start, len } => {
                let out = t.invalidate(dev, start, start + len).unwrap();
                check_displaced(&model, dev, start, start + len, &out.displaced);
                let gone: Vec<_> = model.range((dev, start)..(dev, start + len)).map(|(k, _)| *k).collect();
                for g in gone {
                    model.remove(&g);
                }
            }
            Op::Lookup { dev, start, len } => check_lookup(&mut t, &model, dev, start, start + len),
            Op::Scan { from_dev, from, max, dirty_only } => {
                let mut out = Vec::new();
                let next = if dirty_only {
                    t.scan(Pos::new(from_dev, from), &|k| k.dirty, max, &mut out).unwrap()
                } else {
                    t.scan(Pos::new(from_dev, from), &|_| true, max, &mut out).unwrap()
                };
                assert!(out.len() <= max);
                assert!(out.windows(2).all(|w| w[0].pos() < w[1].pos()));
                for k in &out {
                    assert!(k.pos() > Pos::new(from_dev, from));
                    assert!(!dirty_only || k.dirty);
                    for s in k.start()..k.end {
                        assert_eq!(
                            model.get(&(k.dev, s)),
                            Some(&(k.ptr.offset + (s - k.start()), k.ptr.generation, k.dirty))
                        );
                    }
                }
                match next {
                    Some(p) => assert_eq!(Some(p), out.last().map(Key::pos)),
                    None => assert!(out.len() < max || out.is_empty() || max == out.len()),
                }
            }
            Op::Flush => {
                flush(&mut t, &model, &mut prev);
                check_all(&mut t, &model);
            }
            Op::Reopen => {
                let cp = flush(&mut t, &model, &mut prev);
                let store = t.into_store();
                t = Tree::open(store, cp.root, cfg()).unwrap();
                check_all(&mut t, &model);
            }
        }
    }
    check_all(&mut t, &model);
    let cp = flush(&mut t, &model, &mut prev);
    let store = t.into_store();
    let mut reopened = Tree::open(store, cp.root, cfg()).unwrap();
    check_all(&mut reopened, &model);
    // Every slot the tree uses is distinct, and no live slot was handed back as freed.
    let addrs = reopened.node_addrs().unwrap();
    let mut sorted = addrs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), addrs.len());
    assert_eq!(reopened.stats().nodes, addrs.len() as u64);
    (reopened.stats(), reopened.store().appends())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn tree_matches_sector_model(ops in proptest::collection::vec(op(), 1..250)) {
        let _ = run(&ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]
    /// Soak run (minutes): `cargo test -p ubcache-btree --test btree model -- --ignored`.
    #[test]
    #[ignore = "soak run; see the doc comment"]
    fn tree_matches_sector_model_soak(ops in proptest::collection::vec(op(), 1..600)) {
        let _ = run(&ops);
    }
}

/// A long deterministic run that fills the tree enough for several levels.
#[test]
fn deep_tree_matches_model() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut ops = Vec::new();
    for i in 0..3000u64 {
        let r: u32 = rng.gen_range(0..100);
        ops.push(match r {
            0..=69 => Op::Insert {
                dev: rng.gen_range(0..2),
                start: rng.gen_range(0..4000),
                size: rng.gen_range(1..16),
                cache: i * 16,
                generation: (i % 251) as u8,
                dirty: rng.gen_bool(0.5),
            },
            70..=79 => Op::Invalidate {
                dev: rng.gen_range(0..2),
                start: rng.gen_range(0..4000),
                len: rng.gen_range(1..300),
            },
            80..=89 => Op::MarkClean {
                dev: rng.gen_range(0..2),
                at: rng.gen_range(0..4000),
                wrong: rng.gen_bool(0.2),
            },
            90..=97 => Op::Lookup {
                dev: rng.gen_range(0..2),
                start: rng.gen_range(0..4000),
                len: rng.gen_range(1..200),
            },
            98 => Op::Flush,
            _ => Op::Reopen,
        });
    }
    let (stats, appends) = run(&ops);
    // The run must have exercised what it claims to: several levels and appended delta bsets.
    assert!(stats.depth >= 3, "{stats:?}");
    assert!(appends > 50, "appends: {appends}");
}
