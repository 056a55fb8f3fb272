//! Writeback benchmarks, in-process on files in a temporary directory:
//! 1. foreground 4 KiB random-read latency (p50/p99/max) on cached data, with the writeback
//!    thread idle and then while it writes back at full speed;
//! 2. flush throughput (random 4 KiB dirty extents written home by `FlushStep`) next to the
//!    backing file's own sequential write speed (1 MiB writes + fsync).
//!
//! Run: `cargo run --release --example wb_latency [-- DIRTY_MIB [READS]]` (defaults 64, 20000).
//! The directory is `$TMPDIR` (files on tmpfs measure memory, not a disk).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, FileDev, FileDevOptions};
use ubcache::writeback::{FlushStep, WritebackConfig, WritebackThread};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const READ_REGION: u64 = 64 * MIB;

fn file(dir: &std::path::Path, name: &str, size: u64) -> Result<Arc<dyn BlockDev>, Box<dyn Error>> {
    let opts = FileDevOptions { create_with_size: Some(size), ..FileDevOptions::default() };
    Ok(Arc::new(FileDev::open(&dir.join(name), &opts)?))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(label: &str, mut lat: Vec<Duration>) {
    lat.sort_unstable();
    println!(
        "{label:<28} reads {:>6}  p50 {:>8.1} us  p99 {:>8.1} us  max {:>8.1} us",
        lat.len(),
        percentile(&lat, 0.50).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
    );
}

/// 4 KiB random reads in the cached region until `reads` are done or `until` says stop.
fn random_reads(
    dev: &dyn BlockDev,
    reads: usize,
    rng: &mut StdRng,
    until: &dyn Fn() -> bool,
) -> Vec<Duration> {
    let mut buf = vec![0u8; BLOCK as usize];
    let mut lat = Vec::with_capacity(reads.min(1 << 20));
    while lat.len() < reads && !until() {
        let at = rng.gen_range(0..READ_REGION / BLOCK) * BLOCK;
        let t = Instant::now();
        dev.read_at(&mut buf, at).unwrap();
        lat.push(t.elapsed());
    }
    lat
}

fn dirty_random(dev: &dyn BlockDev, mib: u64, rng: &mut StdRng) {
    let buf = vec![0x5au8; BLOCK as usize];
    // Dirty data lives above the read region.
    for _ in 0..mib * MIB / BLOCK {
        let at = READ_REGION + rng.gen_range(0..(2 * mib * MIB) / BLOCK) * BLOCK;
        dev.write_at(&buf, at).unwrap();
    }
    dev.sync().unwrap();
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dirty_mib: u64 = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let reads: usize = args.get(2).map_or(Ok(20_000), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let cache_bytes = 4 * dirty_mib * MIB + 2 * READ_REGION;
    let backing_bytes = 8192 + READ_REGION + 4 * dirty_mib * MIB;
    let cache = file(dir.path(), "cache", cache_bytes)?;
    let backing = file(dir.path(), "backing", backing_bytes)?;
    ubcache::cache::format(&cache, std::slice::from_ref(&backing), FormatOptions::default())?;
    let cfg = CacheConfig { mode: CacheMode::Writethrough, sequential_cutoff: 0, ..CacheConfig::default() };
    let set = Arc::new(CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), cfg)?);
    let dev = set.devices().remove(0);
    println!(
        "files in {} (cache {} MiB, backing {} MiB)",
        dir.path().display(),
        cache_bytes / MIB,
        backing_bytes / MIB
    );

    // The read region cached clean (writethrough).
    let chunk = vec![0xa5u8; MIB as usize];
    for i in 0..READ_REGION / MIB {
        dev.write_at(&chunk, i * MIB)?;
    }
    dev.sync()?;
    dev.set_mode(CacheMode::Writeback, false)?;
    let mut rng = StdRng::seed_from_u64(1);
    dirty_random(&dev, dirty_mib, &mut rng);
    println!("dirty: {} MiB in random 4 KiB extents", set.stats().dirty_bytes / MIB);

    // 1. Read latency, writeback idle (dirty data present, no thread).
    let _ = random_reads(&dev, 2000, &mut rng, &|| false); // warm-up
    report("writeback idle", random_reads(&dev, reads, &mut rng, &|| false));

    // 1b. The same reads while the thread writes back at full speed.
    let thread = WritebackThread::start(
        Arc::clone(&set),
        WritebackConfig { writeback_delay: Duration::ZERO, ..WritebackConfig::default() },
    );
    thread.request_flush();
    let busy_set = Arc::clone(&set);
    let started = Instant::now();
    // Reads go on for as long as writeback runs.
    let lat = random_reads(&dev, usize::MAX, &mut rng, &move || busy_set.stats().dirty_bytes == 0);
    let during = started.elapsed();
    let status = thread.status();
    report("writeback running", lat);
    println!(
        "  (reads ran for {:.2} s while writeback wrote {:.1} MiB in {} backing writes)",
        during.as_secs_f64(),
        status.bytes_written as f64 / MIB as f64,
        status.backing_writes
    );
    while set.stats().dirty_bytes > 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    thread.stop()?;

    // 2. Flush throughput vs backing sequential write speed.
    for batch_keys in [32usize, 512] {
        dirty_random(&dev, dirty_mib, &mut rng);
        let dirty = set.stats().dirty_bytes;
        let t = Instant::now();
        let cfg = WritebackConfig { batch_keys, ..WritebackConfig::for_flush() };
        let written = FlushStep::new(Arc::clone(&set), cfg).run_to_end()?;
        let flush_secs = t.elapsed().as_secs_f64();
        println!(
            "flush ({batch_keys:>3} keys/batch): {:.1} MiB dirty (random 4 KiB extents) home in {:.2} s = {:.1} MiB/s",
            dirty as f64 / MIB as f64,
            flush_secs,
            written as f64 / MIB as f64 / flush_secs
        );
    }
    let seq = file(dir.path(), "seq", dirty_mib * MIB)?;
    let t = Instant::now();
    for i in 0..dirty_mib {
        seq.write_at(&chunk, i * MIB)?;
    }
    seq.sync()?;
    let seq_secs = t.elapsed().as_secs_f64();
    println!(
        "backing sequential write: {dirty_mib} MiB in 1 MiB writes + fsync in {seq_secs:.2} s = {:.1} MiB/s",
        dirty_mib as f64 / seq_secs
    );
    Ok(())
}
