//! `Tree::open` of multi-node trees whose nodes are each valid (checksums, order, their own
//! range) but do not fit together: a child whose range is not the bound its parent gives it,
//! overlapping siblings, wrong levels, a node pointing at an older version of its own slot,
//! chains deeper than the maximum. Each crafted tree is refused with the typed error; then a
//! bounded batch of generated trees (`ubcache_btree::fuzzing::tree_open`, which the cargo-fuzz
//! target `btree_tree_open` runs too) must open clean or be refused, never panic.
// A refusal that did not happen is reported with what was accepted.
#![allow(clippy::panic)]

use std::time::{Duration, Instant};
use ubcache_btree::format::{self, ChildEntry, NodeHeader};
use ubcache_btree::fuzzing::{self, TREE_NODE_SIZE};
use ubcache_btree::{
    CorruptionKind, Key, MAX_DEPTH, MemStore, NodePtr, NodeStore, Pos, Ptr, Tree, TreeConfig,
};

fn key(start: u64, size: u32) -> Key {
    Key::new(1, start, size, Ptr { offset: 100 + start, generation: 1 }, false)
}

fn p(sector: u64) -> Pos {
    Pos::new(1, sector)
}

/// Writes crafted node images into a store.
struct Images {
    store: MemStore,
    seq: u64,
}

impl Images {
    fn new() -> Images {
        Images { store: MemStore::new(TREE_NODE_SIZE), seq: 1 }
    }

    fn header(&mut self, level: u8, lo: Pos, hi: Pos) -> NodeHeader {
        let addr = self.store.alloc().unwrap();
        self.seq += 1;
        NodeHeader { level, align_shift: 4, addr, seq: self.seq, lo, hi }
    }

    fn leaf(&mut self, lo: Pos, hi: Pos, keys: &[Key]) -> NodePtr {
        let h = self.header(0, lo, hi);
        format::write_leaf_node(&mut self.store, &h, keys).unwrap()
    }

    fn interior(
        &mut self,
        level: u8,
        lo: Pos,
        hi: Pos,
        children: &[(Pos, NodePtr)],
    ) -> (NodeHeader, NodePtr) {
        let h = self.header(level, lo, hi);
        let mut buf = Vec::new();
        let ptr = format::encode_interior_node(&h, &entries(children), TREE_NODE_SIZE, &mut buf).unwrap();
        self.store.write(h.addr, 0, &buf).unwrap();
        (h, ptr)
    }

    /// Appends a child list as bset 1 of the one-bset interior node `h`/`old`.
    fn append_children(&mut self, h: &NodeHeader, old: NodePtr, children: &[(Pos, NodePtr)]) -> NodePtr {
        let mut buf = Vec::new();
        format::encode_interior_bset(
            1,
            &entries(children),
            h.lo,
            h.hi,
            TREE_NODE_SIZE,
            Some(h.addr),
            &mut buf,
        )
        .unwrap();
        format::pad_to(&mut buf, h.align());
        self.store.write(h.addr, old.len as usize, &buf).unwrap();
        let len = old.len as usize + buf.len();
        let mut image = vec![0; len];
        self.store.read(h.addr, 0, &mut image).unwrap();
        NodePtr { len: len as u32, csum: format::image_checksum(&image), ..old }
    }

    fn open(self, root: NodePtr) -> Result<Tree<MemStore>, ubcache_btree::BtreeError> {
        Tree::open(self.store, root, TreeConfig { max_cached_nodes: 64, bset_align: 16 })
    }
}

fn entries(children: &[(Pos, NodePtr)]) -> Vec<ChildEntry> {
    children.iter().map(|&(hi, ptr)| ChildEntry { hi, ptr }).collect()
}

fn refused(img: Images, root: NodePtr) -> CorruptionKind {
    match img.open(root) {
        Ok(_) => panic!("open accepted an inconsistent tree"),
        Err(e) => e.corruption_kind().unwrap_or_else(|| panic!("untyped error: {e}")),
    }
}

#[test]
fn a_consistent_two_level_tree_opens_and_checks_clean() {
    let mut img = Images::new();
    let a = img.leaf(Pos::MIN, p(64), &[key(0, 8), key(56, 8)]);
    let b = img.leaf(p(64), Pos::MAX, &[key(64, 8)]);
    let (_, root) = img.interior(1, Pos::MIN, Pos::MAX, &[(p(64), a), (Pos::MAX, b)]);
    let mut t = img.open(root).unwrap();
    assert_eq!(t.stats().keys, 3);
    assert!(t.check().unwrap().is_empty());
}

/// The range check of `load_node`: the child's own range is narrower than its bound, its keys
/// inside both; nothing but the comparison of the two ranges can tell.
#[test]
fn child_range_inside_but_not_equal_to_the_parent_bound_is_refused() {
    let mut img = Images::new();
    let a = img.leaf(p(8), p(56), &[key(8, 8)]);
    let b = img.leaf(p(64), Pos::MAX, &[key(64, 8)]);
    let (_, root) = img.interior(1, Pos::MIN, Pos::MAX, &[(p(64), a), (Pos::MAX, b)]);
    assert_eq!(refused(img, root), CorruptionKind::OutOfNodeRange);
}

/// Siblings whose own ranges overlap (the second claims the first's sectors too).
#[test]
fn overlapping_siblings_are_refused() {
    let mut img = Images::new();
    let a = img.leaf(Pos::MIN, p(64), &[key(0, 8)]);
    let b = img.leaf(Pos::MIN, Pos::MAX, &[key(64, 8)]);
    let (_, root) = img.interior(1, Pos::MIN, Pos::MAX, &[(p(64), a), (Pos::MAX, b)]);
    assert_eq!(refused(img, root), CorruptionKind::OutOfNodeRange);
}

/// A child range sticking out of the parent's bound.
#[test]
fn child_range_outside_the_parent_bound_is_refused() {
    let mut img = Images::new();
    let a = img.leaf(Pos::MIN, p(128), &[key(0, 8)]);
    let b = img.leaf(p(64), Pos::MAX, &[key(64, 8)]);
    let (_, root) = img.interior(1, Pos::MIN, Pos::MAX, &[(p(64), a), (Pos::MAX, b)]);
    assert_eq!(refused(img, root), CorruptionKind::OutOfNodeRange);
}

/// A root that does not cover the whole key space.
#[test]
fn root_with_a_partial_range_is_refused() {
    let mut img = Images::new();
    let root = img.leaf(Pos::MIN, p(64), &[key(0, 8)]);
    assert_eq!(refused(img, root), CorruptionKind::OutOfNodeRange);
}

/// The level check of `load_node`: a level-2 root over leaves with exactly the right ranges.
#[test]
fn child_at_the_wrong_level_is_refused() {
    let mut img = Images::new();
    let a = img.leaf(Pos::MIN, p(64), &[key(0, 8)]);
    let b = img.leaf(p(64), Pos::MAX, &[key(64, 8)]);
    let (_, root) = img.interior(2, Pos::MIN, Pos::MAX, &[(p(64), a), (Pos::MAX, b)]);
    assert_eq!(refused(img, root), CorruptionKind::BadLevel);
}

/// A node whose newest child list points at its own slot (the older version, which checksums
/// cannot tell from a real child): same range, same level, so only the level check stops it.
#[test]
fn node_pointing_at_its_own_older_version_is_refused() {
    let mut img = Images::new();
    let leaf = img.leaf(Pos::MIN, Pos::MAX, &[key(0, 8)]);
    let (h, v1) = img.interior(1, Pos::MIN, Pos::MAX, &[(Pos::MAX, leaf)]);
    let v2 = img.append_children(&h, v1, &[(Pos::MAX, v1)]);
    assert_eq!(v1.addr, v2.addr);
    assert_eq!(refused(img, v2), CorruptionKind::BadLevel);
}

/// A chain of single-child nodes longer than the maximum depth, every node claiming the same
/// top level: refused (by level or depth), without recursing without bound.
#[test]
fn chain_deeper_than_the_maximum_is_refused() {
    let top = u8::try_from(MAX_DEPTH - 1).unwrap();
    let mut img = Images::new();
    let mut ptr = img.leaf(Pos::MIN, Pos::MAX, &[key(0, 8)]);
    for _ in 0..MAX_DEPTH + 2 {
        ptr = img.interior(top, Pos::MIN, Pos::MAX, &[(Pos::MAX, ptr)]).1;
    }
    let kind = refused(img, ptr);
    assert!(matches!(kind, CorruptionKind::BadLevel | CorruptionKind::TooDeep), "{kind:?}");
}

/// A chain as deep as the levels allow opens: the depth bound does not refuse a legal tree.
#[test]
fn chain_of_the_maximum_depth_opens() {
    let mut img = Images::new();
    let mut ptr = img.leaf(Pos::MIN, Pos::MAX, &[key(0, 8)]);
    for level in 1..MAX_DEPTH {
        ptr = img.interior(u8::try_from(level).unwrap(), Pos::MIN, Pos::MAX, &[(Pos::MAX, ptr)]).1;
    }
    let mut t = img.open(ptr).unwrap();
    assert!(t.check().unwrap().is_empty());
}

/// Inputs of `fuzzing::build_tree` that build trees which open (see its opcodes): a lone leaf
/// root; two leaves under a level-1 root; the same plus a bset appended to the first leaf and a
/// new root over the new version. Mutating them reaches the near misses random bytes rarely do.
const SEEDS: [&[u8]; 3] = [
    &[0, 0, 255, 2, 0, 1],
    &[0, 0, 16, 1, 0, 0, 16, 255, 1, 0, 1, 0, 0, 255, 1, 0, 16, 1],
    &[0, 0, 16, 1, 0, 0, 16, 255, 1, 0, 2, 0, 1, 1, 1, 0, 0, 255, 1, 3, 16, 1],
];

#[test]
fn seed_inputs_build_trees_that_open() {
    for seed in SEEDS {
        let (store, root) = fuzzing::build_tree(seed).unwrap();
        let mut t = Tree::open(store, root, TreeConfig { max_cached_nodes: 64, bset_align: 16 })
            .unwrap_or_else(|e| panic!("seed {seed:?}: {e}"));
        assert!(t.check().unwrap().is_empty());
    }
}

/// Generated trees: each input builds individually valid nodes wired together as its bytes say
/// (see `fuzzing::build_tree`): random bytes, and the seeds with a few bytes changed. Opening
/// must refuse or give a tree that checks clean. Bounded in count and time so the batch stays a
/// few seconds on a slow machine.
#[test]
fn generated_trees_open_clean_or_are_refused() {
    let started = Instant::now();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut runs, mut opened) = (0u32, 0u32);
    while runs < 20_000 && started.elapsed() < Duration::from_secs(3) {
        let data: Vec<u8> = if runs % 2 == 0 {
            let len = 8 + (next() % 120) as usize;
            (0..len).map(|_| next() as u8).collect()
        } else {
            let mut d = SEEDS[(next() % SEEDS.len() as u64) as usize].to_vec();
            for _ in 0..1 + next() % 3 {
                let at = (next() % d.len() as u64) as usize;
                d[at] = next() as u8;
            }
            d
        };
        if let Some((store, root)) = fuzzing::build_tree(&data) {
            let opens = Tree::open(store.clone(), root, TreeConfig { max_cached_nodes: 64, bset_align: 16 });
            opened += u32::from(opens.is_ok());
            fuzzing::open_checked(store, root);
        }
        runs += 1;
    }
    assert!(runs >= 200, "only {runs} inputs in the time bound");
    assert!(opened >= 10, "only {opened} of {runs} generated trees opened: the batch only tests refusals");
}
