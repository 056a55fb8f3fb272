//! criterion benches of the btree on a tree of 1M 4 KiB keys (256 KiB nodes, in a `MemStore`),
//! with every invariant check on (they are always on): sequential and random inserts, random
//! lookups, and a full writeback-style dirty scan. Prints the measured heap bytes per key.
//!
//! Run: `cargo bench -p ubcache-btree` (element/s = operations per second).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use ubcache_btree::{Key, MemStore, Pos, Tree};
use workload::{SLOTS, XorShift, key4k, random_tree};

mod workload;

/// Counts live heap bytes, to report memory per key.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A tree of 1M keys at random slots (plus the measured heap bytes it uses).
fn build_random_tree() -> (Tree<MemStore>, isize) {
    let before = LIVE.load(Ordering::Relaxed);
    let t = random_tree();
    let after = LIVE.load(Ordering::Relaxed);
    (t, after - before)
}

/// CPU time this thread has run, in ns (first field of `/proc/thread-self/schedstat`), so the
/// report can separate the cost of an operation from the share of a loaded machine it got.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Runs `op` `n` times and prints operations per wall second and per CPU second.
fn report(name: &str, n: u64, mut op: impl FnMut()) {
    let (wall, cpu) = (std::time::Instant::now(), cpu_ns());
    for _ in 0..n {
        op();
    }
    let wall = wall.elapsed().as_secs_f64();
    let per_cpu = match (cpu, cpu_ns()) {
        (Some(a), Some(b)) if b > a => format!("{:.0}", n as f64 / ((b - a) as f64 / 1e9)),
        _ => "?".into(),
    };
    eprintln!("{name}: {:.0} ops/s wall, {per_cpu} ops/s of CPU time ({n} ops)", n as f64 / wall);
}

fn cpu_reports(tree: &mut Tree<MemStore>) {
    let mut rng = XorShift(0x0bad_cafe);
    let mut displaced = Vec::with_capacity(16);
    report("random_insert_4k", 500_000, || {
        displaced.clear();
        let slot = rng.next() % SLOTS;
        tree.insert_into(key4k(slot, slot % 2 == 0), &mut displaced).unwrap();
    });
    let mut segs = Vec::with_capacity(8);
    report("random_lookup_4k", 1_000_000, || {
        let slot = rng.next() % SLOTS;
        tree.lookup_into(1, slot * 8, slot * 8 + 8, &mut segs).unwrap();
        black_box(segs.len());
    });
    let mut buf = Vec::with_capacity(1024);
    let keys = tree.stats().keys;
    report(&format!("full_dirty_scan (x{keys} keys)"), 1, || {
        let mut from = Pos::MIN;
        loop {
            buf.clear();
            match tree.scan(from, &|k| k.dirty, 1024, &mut buf).unwrap() {
                Some(p) => from = p,
                None => break,
            }
        }
    });
    let mut next = 4 * SLOTS;
    report("sequential_insert_4k", 500_000, || {
        displaced.clear();
        tree.insert_into(key4k(next, true), &mut displaced).unwrap();
        next += 1;
    });
    tree.invalidate(1, 4 * SLOTS * 8, u64::MAX).unwrap();
    tree.write_out().unwrap();
}

fn benches(c: &mut Criterion) {
    let (mut tree, heap) = build_random_tree();
    let stats = tree.stats();
    eprintln!(
        "tree: {} keys, {} nodes, depth {}, heap {} bytes = {:.1} bytes/key (estimate from structure sizes: {:.1})",
        stats.keys,
        stats.nodes,
        stats.depth,
        heap,
        heap as f64 / stats.keys as f64,
        stats.cached_bytes as f64 / stats.keys as f64
    );
    let cp = tree.write_out().unwrap();
    let store_bytes = tree.store().bytes_written();
    eprintln!("flush of the 1M-key tree: {} bytes written, root {:?}", store_bytes, cp.root);
    cpu_reports(&mut tree);

    let mut g = c.benchmark_group("btree_1M");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(std::time::Duration::from_secs(4));
    g.warm_up_time(std::time::Duration::from_secs(1));

    let mut rng = XorShift(0xdead_beef);
    let mut displaced = Vec::with_capacity(16);
    g.bench_function("random_insert_4k", |b| {
        b.iter(|| {
            displaced.clear();
            let slot = rng.next() % SLOTS;
            tree.insert_into(black_box(key4k(slot, slot % 2 == 0)), &mut displaced).unwrap();
        });
    });

    let mut segs = Vec::with_capacity(8);
    g.bench_function("random_lookup_4k", |b| {
        b.iter(|| {
            let slot = rng.next() % SLOTS;
            tree.lookup_into(1, slot * 8, slot * 8 + 8, &mut segs).unwrap();
            black_box(segs.len());
        });
    });

    g.finish();

    // Calibration on a loaded machine: one std BTreeMap of the same 1M keys (no tree, no checks).
    let mut flat = std::collections::BTreeMap::new();
    let mut all = Vec::new();
    tree.scan(Pos::MIN, &|_| true, usize::MAX, &mut all).unwrap();
    for k in &all {
        flat.insert(k.pos(), (k.size, k.ptr.offset));
    }
    drop(all);
    let mut g = c.benchmark_group("calibration");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(std::time::Duration::from_secs(3));
    g.bench_function("std_btreemap_1M_range_first", |b| {
        b.iter(|| {
            let slot = rng.next() % SLOTS;
            let p = Pos::new(1, slot * 8);
            black_box(flat.range((std::ops::Bound::Excluded(p), std::ops::Bound::Unbounded)).next());
        });
    });
    // The alternative leaf layout: the same keys as 257 sorted Vecs (one per node) found by
    // binary search, then a binary search in the Vec.
    let entries: Vec<(Pos, (u32, u64))> = flat.iter().map(|(p, v)| (*p, *v)).collect();
    let chunks: Vec<Vec<(Pos, (u32, u64))>> =
        entries.chunks(entries.len() / 257 + 1).map(<[_]>::to_vec).collect();
    drop(entries);
    let maxes: Vec<Pos> = chunks.iter().map(|c| c.last().unwrap().0).collect();
    g.bench_function("sorted_vecs_1M_first_after", |b| {
        b.iter(|| {
            let slot = rng.next() % SLOTS;
            let p = Pos::new(1, slot * 8);
            let ci = maxes.partition_point(|m| *m <= p).min(chunks.len() - 1);
            let c = &chunks[ci];
            black_box(c.get(c.partition_point(|e| e.0 <= p)));
        });
    });
    g.finish();
    drop(flat);

    let mut g = c.benchmark_group("btree_1M_scan");
    let keys = tree.stats().keys;
    g.throughput(Throughput::Elements(keys));
    g.sample_size(10);
    g.bench_function("full_dirty_scan", |b| {
        b.iter_batched(
            || Vec::with_capacity(1024),
            |mut buf: Vec<Key>| {
                let mut from = Pos::MIN;
                let mut n = 0usize;
                loop {
                    buf.clear();
                    let r = tree.scan(from, &|k| k.dirty, 1024, &mut buf).unwrap();
                    n += buf.len();
                    match r {
                        Some(p) => from = p,
                        None => break,
                    }
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();

    // Last, because it grows the tree: sequential inserts append past the random region, as a
    // streaming writer would.
    let mut g = c.benchmark_group("btree_1M_seq");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(std::time::Duration::from_secs(3));
    g.warm_up_time(std::time::Duration::from_secs(1));
    let mut next = SLOTS;
    g.bench_function("sequential_insert_4k", |b| {
        b.iter(|| {
            displaced.clear();
            tree.insert_into(black_box(key4k(next, true)), &mut displaced).unwrap();
            next += 1;
        });
    });
    g.finish();
}

criterion_group!(btree_benches, benches);
criterion_main!(btree_benches);
