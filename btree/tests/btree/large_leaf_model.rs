//! Model test with leaves of hundreds of keys: the in-memory leaf is a list of small blocks, and
//! the proptest model (`model.rs`, 512-byte nodes) keeps every leaf inside one block. Here
//! 16 KiB nodes hold ~440 keys per leaf, so inserts, cuts, invalidations, lookups and scans cross
//! block boundaries, blocks split and merge, and leaves split and merge by moving blocks — all
//! checked against a per-sector reference map, with flushes, reopens and `check()` on the way.

use std::collections::BTreeMap;
use ubcache_btree::{Key, MemStore, Pos, Ptr, Segment, Tree, TreeConfig};

/// Per-sector reference: (dev, sector) -> (cache sector, generation, dirty).
type Model = BTreeMap<(u32, u64), (u64, u8, bool)>;

const DEVS: u32 = 3;
const SPACE: u64 = 24_000;
const NODE_SIZE: usize = 16 * 1024;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn cfg() -> TreeConfig {
    TreeConfig { max_cached_nodes: 64, bset_align: 512 }
}

fn sectors_of(segments: &[Segment], dev: u32, start: u64, end: u64) -> Vec<Option<(u64, u8, bool)>> {
    let mut out = Vec::new();
    let mut at = start;
    for s in segments {
        assert_eq!(s.start(), at, "segments must be contiguous: {segments:?}");
        match s {
            Segment::Hole { start, end } => out.extend((*start..*end).map(|_| None)),
            Segment::Cached(k) => {
                assert_eq!(k.dev, dev);
                for (i, _) in (k.start()..k.end).enumerate() {
                    out.push(Some((k.ptr.offset + i as u64, k.ptr.generation, k.dirty)));
                }
            }
        }
        at = s.end();
    }
    assert_eq!(at, end, "segments must end at the range end");
    out
}

fn check_lookup(t: &mut Tree<MemStore>, m: &Model, dev: u32, start: u64, end: u64) {
    let segs = t.lookup(dev, start, end).unwrap();
    let got = sectors_of(&segs, dev, start, end);
    let want: Vec<_> = (start..end).map(|s| m.get(&(dev, s)).copied()).collect();
    assert_eq!(got, want, "lookup dev {dev} [{start}, {end})");
}

/// A full scan in small resumable batches equals the model, sector by sector.
fn check_scan(t: &mut Tree<MemStore>, m: &Model, batch: usize) {
    let mut keys: Vec<Key> = Vec::new();
    let mut from = Pos::MIN;
    loop {
        let mut buf = Vec::new();
        let next = t.scan(from, &|_| true, batch, &mut buf).unwrap();
        keys.extend(buf);
        match next {
            Some(p) => from = p,
            None => break,
        }
    }
    assert!(
        keys.windows(2)
            .all(|w| w[0].pos() < w[1].pos() && (w[0].dev != w[1].dev || w[0].end <= w[1].start()))
    );
    let mut flat = Model::new();
    for k in &keys {
        for (i, s) in (k.start()..k.end).enumerate() {
            flat.insert((k.dev, s), (k.ptr.offset + i as u64, k.ptr.generation, k.dirty));
        }
    }
    assert!(flat == *m, "scan differs from the model ({} vs {} sectors)", flat.len(), m.len());
}

#[test]
fn multi_block_leaves_match_the_model() {
    let mut t = Tree::create(MemStore::new(NODE_SIZE), cfg()).unwrap();
    let mut m = Model::new();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut max_keys = 0;
    for step in 0..12_000u64 {
        let dev = rng.below(u64::from(DEVS)) as u32;
        let start = rng.below(SPACE);
        match rng.below(10) {
            0..=5 => {
                // Mostly small extents, some long ones that cut many keys (and leaves).
                let size = if rng.below(20) == 0 { 1 + rng.below(600) } else { 1 + rng.below(24) } as u32;
                let (cache, generation, dirty) =
                    (rng.below(1 << 40), rng.below(256) as u8, rng.below(2) == 0);
                let key = Key::new(dev, start, size, Ptr { offset: cache, generation }, dirty);
                let out = t.insert(key).unwrap();
                let displaced: u64 = out.displaced.iter().map(|k| u64::from(k.size)).sum();
                let covered = (start..key.end).filter(|s| m.contains_key(&(dev, *s))).count() as u64;
                assert_eq!(displaced, covered, "displaced sectors at step {step}");
                for (i, s) in (start..key.end).enumerate() {
                    m.insert((dev, s), (cache + i as u64, generation, dirty));
                }
            }
            6 => {
                let len = 1 + rng.below(300);
                t.invalidate(dev, start, start + len).unwrap();
                for s in start..start + len {
                    m.remove(&(dev, s));
                }
            }
            _ => check_lookup(&mut t, &m, dev, start, start + 1 + rng.below(200)),
        }
        max_keys = max_keys.max(t.stats().keys);
        if step % 1500 == 1499 {
            check_scan(&mut t, &m, 1 + rng.below(700) as usize);
            assert_eq!(t.check().unwrap(), vec![]);
            let cp = t.write_out().unwrap();
            if step % 3000 == 2999 {
                let store = t.into_store();
                t = Tree::open(store, cp.root, cfg()).unwrap();
                check_scan(&mut t, &m, usize::MAX);
            }
        }
    }
    let stats = t.stats();
    assert!(stats.nodes >= 8, "the test needs several leaves: {stats:?}");
    assert!(max_keys >= 2000, "the test needs leaves of hundreds of keys: {max_keys}");
    // Empty most of the tree: leaves and blocks merge down again.
    for dev in 0..DEVS {
        t.invalidate(dev, 0, SPACE * 9 / 10).unwrap();
        m.retain(|(d, s), _| *d != dev || *s >= SPACE * 9 / 10);
    }
    check_scan(&mut t, &m, 97);
    for dev in 0..DEVS {
        check_lookup(&mut t, &m, dev, SPACE * 9 / 10 - 50, SPACE + 700);
    }
    assert_eq!(t.check().unwrap(), vec![]);
    let cp = t.write_out().unwrap();
    let mut t = Tree::open(t.into_store(), cp.root, cfg()).unwrap();
    check_scan(&mut t, &m, 5);
}
