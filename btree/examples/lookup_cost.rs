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
use workload::{SLOTS, XorShift, random_tree};

#[path = "../benches/workload/mod.rs"]
mod workload;

fn main() {
    let lookups: u64 = std::env::args().nth(1).map_or(1_000_000, |a| a.parse().expect("lookup count"));
    let mut t = random_tree();
    // Random slots from the bench's generator (about half of them hold a key).
    let mut rng = XorShift(0x0bad_cafe);
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
