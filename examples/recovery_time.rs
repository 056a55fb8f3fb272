//! How long does a cache set take to come back after a crash with a lot of dirty data?
//!
//! Formats a cache file (default 2 GiB) over a sparse backing file, writes `--dirty` bytes
//! (default 1 GiB) in writeback mode through `CachedDev` as random `--block`-sized writes from
//! several threads, sends one FLUSH, and then "crashes": the set is dropped without `close()`,
//! so no final checkpoint is written and everything since the last automatic checkpoint must be
//! replayed from the journal. Because the FLUSH completed, the files hold exactly what a power
//! loss right after that FLUSH would leave. The cache file's pages are then evicted from the
//! page cache (`posix_fadvise(DONTNEED)`, clean after the FLUSH) so recovery reads from the disk
//! as it would after a reboot, and `CacheSet::open` is timed: journal scan and replay onto the
//! checkpointed btree, allocator rebuild from a walk of every key, btree verification, and the
//! closing checkpoint that makes recovery durable. Finally a sample of the written blocks is read
//! back through the recovered set and compared.
//!
//! The journal is checkpointed when it is `--checkpoint-fraction` full (engine default 0.5), so
//! the replay is bounded by that fraction of the journal, whatever the amount of dirty data; run
//! with `--checkpoint-fraction 0.95` to measure the worst case of a (nearly) full journal.
//!
//! ```text
//! cargo run --release --example recovery_time -- [--dir DIR] [--cache-size 2G] [--dirty 1G]
//!     [--block 4096] [--threads 4] [--checkpoint-fraction 0.5]
//! ```

#![allow(clippy::print_stdout, reason = "an example that reports its measurements on stdout")]

use std::error::Error;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, FileDev, FileDevOptions};
use ubcache::journal::JournalConfig;

struct Args {
    dir: Option<PathBuf>,
    cache_size: u64,
    dirty: u64,
    block: u64,
    threads: u64,
    checkpoint_fraction: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        dir: None,
        cache_size: 2 << 30,
        dirty: 1 << 30,
        block: 4096,
        threads: 4,
        checkpoint_fraction: JournalConfig::default().checkpoint_fraction,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => a.dir = Some(PathBuf::from(value()?)),
            "--cache-size" => a.cache_size = ubcache::cli::parse_size(&value()?)?,
            "--dirty" => a.dirty = ubcache::cli::parse_size(&value()?)?,
            "--block" => a.block = ubcache::cli::parse_size(&value()?)?,
            "--threads" => a.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--checkpoint-fraction" => {
                a.checkpoint_fraction =
                    value()?.parse().map_err(|e| format!("--checkpoint-fraction: {e}"))?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.block == 0 || a.block % 512 != 0 || a.dirty % a.block != 0 {
        return Err("--block must be a multiple of 512 dividing --dirty".into());
    }
    if a.threads == 0 || !(0.05..=0.99).contains(&a.checkpoint_fraction) {
        return Err("--threads must be >= 1 and --checkpoint-fraction in [0.05, 0.99]".into());
    }
    Ok(a)
}

fn config(checkpoint_fraction: f64) -> CacheConfig {
    CacheConfig {
        mode: CacheMode::Writeback,
        // Random 4 KiB writes are never sequential, but keep every write cached regardless.
        sequential_cutoff: 0,
        journal: JournalConfig { checkpoint_fraction, ..JournalConfig::default() },
        ..CacheConfig::default()
    }
}

fn open_file(path: &Path, size: u64) -> Result<Arc<dyn BlockDev>, Box<dyn Error>> {
    let opts = FileDevOptions { create_with_size: Some(size), ..FileDevOptions::default() };
    Ok(Arc::new(FileDev::open(path, &opts)?))
}

/// The block's contents: its index in every 8-byte word, so a misplaced block is caught.
fn block_data(index: u64, len: u64) -> Vec<u8> {
    (0..len / 8).flat_map(|w| (index.wrapping_mul(0x9e37_79b9) ^ w).to_le_bytes()).collect()
}

/// A fixed permutation of `0..n` (multiplicative step coprime with `n`), so writes are random
/// over the device yet each block is written exactly once.
fn scattered(i: u64, n: u64) -> u64 {
    let mut step = 2_654_435_761 % n.max(1);
    while gcd(step, n) != 1 {
        step += 1;
    }
    (i * step + 12_345) % n
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Drops the file's pages from the page cache (they are clean after the FLUSH), so the timed
/// open reads the disk as after a reboot.
fn evict_page_cache(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: a plain syscall on a file descriptor we own for the duration of the call.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(rc)) }
}

/// CPU time (user + system) this process used so far: the open runs alone (the writer threads
/// have ended), so the difference around it is its CPU cost, which a loaded machine does not
/// inflate the way it inflates wall time.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32).saturating_mul(1000));
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args =
        parse_args().map_err(|e| format!("{e}\nusage: see the doc comment of examples/recovery_time.rs"))?;
    let dir = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let cache_path = dir.path().join("cache.img");
    let backing_path = dir.path().join("backing.img");
    // Backing: the dirty data plus room for its superblock, sparse.
    let backing_size = args.dirty + (1 << 20);
    let blocks = args.dirty / args.block;

    let cache = open_file(&cache_path, args.cache_size)?;
    let backing = open_file(&backing_path, backing_size)?;
    let fmt = FormatOptions::default();
    ubcache::cache::format(&cache, std::slice::from_ref(&backing), fmt)?;
    let geometry = ubcache::format::Geometry::compute(args.cache_size, fmt.bucket_bytes, fmt.node_bytes)?;
    let journal_bytes = geometry.journal_region().len_bytes;
    println!(
        "cache {} MiB ({} buckets of {} KiB), journal {} MiB ({} buckets), checkpoint at {:.0}% journal fill",
        args.cache_size >> 20,
        geometry.nbuckets,
        fmt.bucket_bytes >> 10,
        journal_bytes >> 20,
        geometry.journal.count,
        args.checkpoint_fraction * 100.0
    );

    let set =
        CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), config(args.checkpoint_fraction))?;
    let dev = set.device(0).ok_or("backing device 0 not attached")?;
    let started = Instant::now();
    std::thread::scope(|s| -> Result<(), Box<dyn Error + Send + Sync>> {
        let workers: Vec<_> = (0..args.threads)
            .map(|t| {
                let dev = &dev;
                s.spawn(move || -> Result<(), Box<dyn Error + Send + Sync>> {
                    let mut i = t;
                    while i < blocks {
                        let b = scattered(i, blocks);
                        dev.write_at(&block_data(b, args.block), b * args.block)?;
                        i += args.threads;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "writer thread panicked")??;
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    // The FLUSH: every write above is durable (data, then journal) when this returns.
    dev.sync()?;
    let write_secs = started.elapsed().as_secs_f64();
    let before = set.stats();
    println!(
        "wrote {} MiB dirty as {} x {} B writes in {:.1} s ({:.0} IOPS); dirty {} MiB, {} journal commits, {} checkpoints",
        args.dirty >> 20,
        blocks,
        args.block,
        write_secs,
        blocks as f64 / write_secs,
        before.dirty_bytes >> 20,
        before.journal_commits,
        before.checkpoints
    );

    // The crash: no close(), no checkpoint, no writeback. Dropping only frees memory.
    drop(dev);
    drop(set);
    drop(cache);
    drop(backing);
    evict_page_cache(&cache_path)?;
    evict_page_cache(&backing_path)?;

    let cache = open_file(&cache_path, args.cache_size)?;
    let backing = open_file(&backing_path, backing_size)?;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let set = CacheSet::open(cache, std::slice::from_ref(&backing), config(args.checkpoint_fraction))?;
    let open_time = t0.elapsed();
    let open_cpu = cpu_time().saturating_sub(cpu0);
    let r = set.recovery().clone();
    println!(
        "RECOVERY: CacheSet::open took {:.3} s ({:.3} s CPU): replayed {} journal entries (torn tail dropped: {}), {} keys, {} MiB dirty, {} btree nodes",
        open_time.as_secs_f64(),
        open_cpu.as_secs_f64(),
        r.replayed_entries,
        r.torn_tail,
        r.keys,
        (r.dirty_sectors * 512) >> 20,
        r.nodes
    );
    if r.dirty_sectors * 512 != args.dirty {
        return Err(
            format!("recovered {} dirty bytes, expected {}", r.dirty_sectors * 512, args.dirty).into()
        );
    }

    // Every 97th block must read back exactly (from the cache: backing never saw it).
    let dev = set.device(0).ok_or("backing device 0 not attached after recovery")?;
    let mut buf = vec![0u8; args.block as usize];
    let mut checked = 0u64;
    for b in (0..blocks).step_by(97) {
        dev.read_at(&mut buf, b * args.block)?;
        if buf != block_data(b, args.block) {
            return Err(format!("block {b} reads back wrong after recovery").into());
        }
        checked += 1;
    }
    println!("verified {checked} sampled blocks after recovery");
    let target = Duration::from_secs(2);
    println!(
        "target: under {:.0} s: {}",
        target.as_secs_f64(),
        if open_time < target { "MET" } else { "MISSED" }
    );
    set.close()?;
    Ok(())
}
