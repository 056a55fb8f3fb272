//! Read latency while another client FLUSHes: one thread reads cached clean 4 KiB blocks at
//! random, back to back (fio `iodepth=1`), while a second thread writes 4 KiB blocks in
//! writeback mode and FLUSHes after every `WRITES_PER_FLUSH` of them (a database's fsync loop).
//! A FLUSH syncs the cache and writes a journal record; reads should not wait for it.
//!
//! Run: `cargo run --release --example flush_read_latency [-- READS [WRITES_PER_FLUSH]]`
//! (defaults 200000 and 8). Prints read latency percentiles with the flusher running and
//! without it, and how many FLUSHes ran.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, CachedDev, FormatOptions};
use ubcache::dev::{BlockDev, FileDev, FileDevOptions};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const READ_REGION: u64 = 64 * MIB;
const WRITE_REGION: u64 = 64 * MIB;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn reads(dev: &CachedDev, n: usize, seed: u64) -> Vec<Duration> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; BLOCK as usize];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let at = rng.gen_range(0..READ_REGION / BLOCK) * BLOCK;
        let t = Instant::now();
        dev.read_at(&mut buf, at).unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

fn report(label: &str, lat: &[Duration]) {
    println!(
        "  {label:<22} p50 {:>7.2} us  p99 {:>7.2} us  p99.9 {:>8.2} us  max {:>9.2} us",
        percentile(lat, 0.5).as_secs_f64() * 1e6,
        percentile(lat, 0.99).as_secs_f64() * 1e6,
        percentile(lat, 0.999).as_secs_f64() * 1e6,
        lat[lat.len() - 1].as_secs_f64() * 1e6
    );
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(200_000), |s| s.parse())?;
    let per_flush: u64 = args.get(2).map_or(Ok(8), |s| s.parse())?;
    if n == 0 || per_flush == 0 {
        return Err("READS and WRITES_PER_FLUSH must be > 0".into());
    }
    let dir = tempfile::tempdir()?;
    let open = |name: &str, size: u64| -> Result<Arc<dyn BlockDev>, Box<dyn Error>> {
        let opts = FileDevOptions { create_with_size: Some(size), ..FileDevOptions::default() };
        Ok(Arc::new(FileDev::open(&dir.path().join(name), &opts)?))
    };
    let cache = open("cache", 4 * (READ_REGION + WRITE_REGION))?;
    let backing = open("backing", 8192 + READ_REGION + WRITE_REGION)?;
    ubcache::cache::format(&cache, std::slice::from_ref(&backing), FormatOptions::default())?;
    let cfg = CacheConfig { mode: CacheMode::Writethrough, sequential_cutoff: 0, ..CacheConfig::default() };
    let set = Arc::new(CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), cfg)?);
    let dev = set.devices().remove(0);
    let chunk = vec![0xa5u8; MIB as usize];
    for i in 0..READ_REGION / MIB {
        dev.write_at(&chunk, i * MIB)?;
    }
    dev.sync()?;
    dev.set_mode(CacheMode::Writeback, false)?;
    println!("files in {}; {n} reads per phase, a FLUSH every {per_flush} writes", dir.path().display());

    let idle = reads(&dev, n, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let flushes = Arc::new(AtomicU64::new(0));
    let flusher = {
        let (dev, stop, flushes) = (dev.clone(), Arc::clone(&stop), Arc::clone(&flushes));
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(2);
            let data = vec![0x5au8; BLOCK as usize];
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..per_flush {
                    let at = READ_REGION + rng.gen_range(0..WRITE_REGION / BLOCK) * BLOCK;
                    dev.write_at(&data, at).unwrap();
                }
                dev.sync().unwrap();
                flushes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let t = Instant::now();
    let busy = reads(&dev, n, 3);
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    flusher.join().map_err(|_| "flusher panicked")?;
    report("reads, no flusher", &idle);
    report("reads, flusher running", &busy);
    println!("  {:.0} FLUSHes/s during the reads", flushes.load(Ordering::Relaxed) as f64 / secs);
    Ok(())
}
