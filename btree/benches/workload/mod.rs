//! The 1M-key workload shared by `benches/btree_ops.rs` and `examples/lookup_cost.rs`, so the
//! example profiles exactly the tree the bench measures.
#![allow(dead_code)]

use ubcache_btree::{Key, MemStore, Ptr, Tree, TreeConfig};

pub const KEYS: u64 = 1_000_000;
/// Random keys land on 4 KiB slots of a 2M-slot (8 GiB) region: about half are occupied.
pub const SLOTS: u64 = 2 * KEYS;
pub const NODE_SIZE: usize = 256 * 1024;

pub struct XorShift(pub u64);
impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn key4k(slot: u64, dirty: bool) -> Key {
    Key::new(1, slot * 8, 8, Ptr { offset: slot * 8, generation: 1 }, dirty)
}

pub fn cfg() -> TreeConfig {
    TreeConfig { max_cached_nodes: 4096, bset_align: 512 }
}

/// A tree of [`KEYS`] keys at random slots (half of them dirty), always from the same seed.
pub fn random_tree() -> Tree<MemStore> {
    let mut t = Tree::create(MemStore::new(NODE_SIZE), cfg()).expect("create");
    let mut rng = XorShift(0x1234_5678);
    let mut displaced = Vec::new();
    while t.stats().keys < KEYS {
        for _ in 0..1024 {
            displaced.clear();
            let slot = rng.next() % SLOTS;
            t.insert_into(key4k(slot, slot % 2 == 0), &mut displaced).expect("insert");
        }
    }
    t
}
