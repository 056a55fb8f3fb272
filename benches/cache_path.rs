//! Request-path benchmarks of the cache engine on in-memory devices (no device latency, so this
//! measures the engine's own cost: btree lookup/insert, allocation, journal appends, locking).
//! Run: `cargo bench --bench cache_path`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, MemDev};

const CACHE_BYTES: u64 = 256 << 20;
const EXPORT_BYTES: u64 = 1 << 30;
const WORKING_SET: u64 = 64 << 20;

fn setup(mode: CacheMode) -> CacheSet {
    let cache: Arc<dyn BlockDev> = Arc::new(MemDev::new(CACHE_BYTES));
    let backing: Arc<dyn BlockDev> = Arc::new(MemDev::new(EXPORT_BYTES + 8192));
    let opts = FormatOptions { bucket_bytes: 512 * 1024, node_bytes: 64 * 1024 };
    ubcache::cache::format(&cache, std::slice::from_ref(&backing), opts).unwrap();
    let cfg = CacheConfig { mode, sequential_cutoff: 0, ..CacheConfig::default() };
    CacheSet::open(cache, std::slice::from_ref(&backing), cfg).unwrap()
}

/// A fixed pseudo-random sequence of 4 KiB-aligned offsets inside the working set.
fn offsets(n: usize) -> Vec<u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (WORKING_SET / 4096)) * 4096
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let offs = offsets(1 << 16);
    let mut g = c.benchmark_group("cache_4k");
    g.throughput(Throughput::Bytes(4096));
    g.sample_size(20);

    for mode in [CacheMode::Writeback, CacheMode::Writethrough, CacheMode::Writearound] {
        let set = setup(mode);
        let dev = set.device(0).unwrap();
        let buf = vec![0x5au8; 4096];
        let mut i = 0usize;
        g.bench_function(format!("random_write_{mode}"), |b| {
            b.iter(|| {
                dev.write_at(black_box(&buf), offs[i % offs.len()]).unwrap();
                i += 1;
            });
        });
    }

    let set = setup(CacheMode::Writeback);
    let dev = set.device(0).unwrap();
    let fill = vec![1u8; 1 << 20];
    for off in (0..WORKING_SET).step_by(1 << 20) {
        dev.write_at(&fill, off).unwrap();
    }
    dev.sync().unwrap();
    let mut buf = vec![0u8; 4096];
    let mut i = 0usize;
    g.bench_function("random_read_hit", |b| {
        b.iter(|| {
            dev.read_at(black_box(&mut buf), offs[i % offs.len()]).unwrap();
            i += 1;
        });
    });

    let set = setup(CacheMode::Writethrough);
    let dev = set.device(0).unwrap();
    let mut j = 0u64;
    g.bench_function("read_miss_and_fill", |b| {
        b.iter(|| {
            // Always a new block: every read misses and inserts.
            dev.read_at(black_box(&mut buf), (j * 4096 * 7) % (EXPORT_BYTES - 4096)).unwrap();
            j += 1;
        });
    });

    let set = setup(CacheMode::Writeback);
    let dev = set.device(0).unwrap();
    let data = vec![3u8; 4096];
    let mut k = 0usize;
    g.bench_function("write_fua_writeback", |b| {
        b.iter(|| {
            dev.write_at_fua(black_box(&data), offs[k % offs.len()]).unwrap();
            k += 1;
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
