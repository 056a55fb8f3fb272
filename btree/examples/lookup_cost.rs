//! The random-lookup loop of `benches/btree_ops.rs` as a plain program, for cache simulators and
//! profilers that need a deterministic run without criterion around it:
//!
//! ```text
//! cargo build --release -p ubcache-btree --example lookup_cost
//! valgrind --tool=callgrind --cache-sim=yes --LL=2097152,16,64 --collect-atstart=no \
//!     --toggle-collect='*lookup_into*' target/release/examples/lookup_cost 200000
//! ```
//!
//! Builds the same 1M-key tree (256 KiB nodes, same random keys), then runs the given number of
//! random 4 KiB lookups (default 1M) and prints the tree shape.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::hint::black_box;
use ubcache_btree::{Key, MemStore, Ptr, Tree, TreeConfig};

const KEYS: u64 = 1_000_000;
const SLOTS: u64 = 2 * KEYS;

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn key4k(slot: u64, dirty: bool) -> Key {
    Key::new(1, slot * 8, 8, Ptr { offset: slot * 8, generation: 1 }, dirty)
}

fn main() {
    let lookups: u64 = std::env::args().nth(1).map_or(1_000_000, |a| a.parse().expect("lookup count"));
    let cfg = TreeConfig { max_cached_nodes: 4096, bset_align: 512 };
    let mut t = Tree::create(MemStore::new(256 * 1024), cfg).unwrap();
    let mut rng = XorShift(0x1234_5678);
    let mut displaced = Vec::new();
    while t.stats().keys < KEYS {
        for _ in 0..1024 {
            displaced.clear();
            let slot = rng.next() % SLOTS;
            t.insert_into(key4k(slot, slot % 2 == 0), &mut displaced).unwrap();
        }
    }
    let mut segs = Vec::with_capacity(8);
    let mut cached = 0usize;
    for _ in 0..lookups {
        let slot = rng.next() % SLOTS;
        t.lookup_into(1, slot * 8, slot * 8 + 8, &mut segs).unwrap();
        cached += black_box(segs.len());
    }
    let s = t.stats();
    println!("{} keys, {} nodes, depth {}; {lookups} lookups, {cached} segments", s.keys, s.nodes, s.depth);
}
