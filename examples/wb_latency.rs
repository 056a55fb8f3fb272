//! Writeback benchmarks for issue #5, in-process on files in `$TMPDIR` (page cache on, as
//! `ubcache serve` opens its files by default). Each repetition measures:
//!
//! 1. **Foreground 4 KiB random-read latency** (one thread, back to back, like fio with
//!    `iodepth=1`) on cached clean data while random 4 KiB dirty extents sit in the cache:
//!    - `idle`: no writeback thread;
//!    - `rate PI`: the writeback thread at its target, i.e. the normal rate-controlled thread
//!      (PI controller toward `writeback_percent`, default tuning, no delay) for a fixed window;
//!    - `rate fixed`: the thread paced at a fixed rate (`min_rate = max_rate`), so the paced
//!      path is measured while it writes a meaningful amount;
//!    - `full speed`: a requested flush (no pacing) until nothing is dirty.
//! 2. **Drain throughput** (`DrainStep` with `WritebackConfig::for_drain`, what `ubcache flush`
//!    runs) of contiguous dirty extents (sequential 4 KiB writes in writeback mode: adjacent
//!    keys, coalesced into large backing writes; and the same with 64 KiB writes) and of random
//!    4 KiB extents, next to the backing
//!    file system's own sequential write speed measured the same way: a file in the same
//!    directory written with writes of the flush's largest backing write (`max_io_bytes`), then
//!    fsync.
//!
//! Every figure is printed per repetition and as a median. Because p99 latency on a small shared
//! machine is mostly scheduling noise, each phase also reports CPU time: the reader thread's own
//! run time and its run-queue wait (from `/proc/thread-self/schedstat`: wait is time it was
//! runnable but another task had the CPU), and the whole process's CPU time.
//!
//! Run: `cargo run --release --example wb_latency [-- DIRTY_MIB [READS [REPS]]]`
//! (defaults 64, 20000, 5; `READS` 0 runs the flush measurements only).
//!
//! `WB_BACKING` chooses what the backing device (and the sequential-write reference written the
//! same way) is, since "the backing device's sequential write speed" depends on it:
//! - `buffered` (default): a file through the page cache, as `ubcache serve` opens it. Here the
//!   reference is a memory copy plus writeback; the flush copies in the kernel
//!   (`copy_file_range`) and starts each run's writeout at once, so it can beat the reference,
//!   which writes everything before its one sync;
//! - `direct`: a file opened with `O_DIRECT` (`ubcache serve --direct`): the device itself;
//! - `hdd`: a page-cache file behind a `SlowDev` modelling one spindle (150 MB/s, 5-8 ms seeks,
//!   2 ms cache flush, real sleeps), the SSD-in-front-of-a-disk case the cache is built for.
//!   Run it with `READS` 0: random extents (and the read phases' writeback of them) cost a seek
//!   each, minutes per run, so the random flush is skipped;
//! - `nbd`: a remote volume, `nbdkit memory` on a Unix socket reached with `NbdDev` (needs
//!   nbdkit); `WB_NBD_DELAY=1ms` adds nbdkit's delay filter to every write, as for a distant one.
//!
//! The backing files are written whole before the run: a real device has no holes, and writes
//! into holes of a sparse file allocate blocks, which the file system serializes.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubcache::cache::writeback::{DrainStep, WritebackConfig, WritebackThread};
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, CachedDev, FormatOptions};
use ubcache::dev::{BlockDev, FileDev, FileDevOptions, SlowDev, SlowDevConfig};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const READ_REGION: u64 = 64 * MIB;
/// How long the rate-controlled phases read.
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// The pace of the `rate fixed` phase, bytes/s.
const FIXED_RATE: u64 = 16 * MIB;

fn file(dir: &std::path::Path, name: &str, size: u64) -> Result<Arc<dyn BlockDev>, Box<dyn Error>> {
    let opts = FileDevOptions { create_with_size: Some(size), ..FileDevOptions::default() };
    Ok(Arc::new(FileDev::open(&dir.join(name), &opts)?))
}

/// The backing device kind (`WB_BACKING`, module doc).
fn backing_file(dir: &std::path::Path, name: &str, size: u64) -> Result<Arc<dyn BlockDev>, Box<dyn Error>> {
    let kind = std::env::var("WB_BACKING").unwrap_or_else(|_| "buffered".into());
    match kind.as_str() {
        "nbd" => return nbd_backing(dir, name, size),
        "buffered" | "direct" | "hdd" => {}
        other => return Err(format!("WB_BACKING={other}: expected buffered, direct, hdd or nbd").into()),
    }
    let opts = FileDevOptions {
        create_with_size: Some(size),
        direct: kind == "direct",
        ..FileDevOptions::default()
    };
    let dev = FileDev::open(&dir.join(name), &opts)?;
    fill_with_zeros(&dev, size)?;
    match kind.as_str() {
        "buffered" => Ok(Arc::new(dev)),
        "direct" if dev.is_direct() => Ok(Arc::new(dev)),
        "direct" => Err(format!("O_DIRECT is not available for files in {}", dir.display()).into()),
        _ => Ok(Arc::new(SlowDev::new(dev, SlowDevConfig::hdd()))),
    }
}

/// Writes the whole file once: a backing device has no holes, and a first write into a hole of
/// a sparse file allocates blocks, which the file system serializes (on this VM, 4 concurrent
/// `O_DIRECT` 4 KiB writes into holes ran at 10.7k IOPS against 12.8k for one writer, while
/// into written blocks 4 ran at 38k against 16k).
fn fill_with_zeros(dev: &FileDev, size: u64) -> Result<(), Box<dyn Error>> {
    let chunk = vec![0u8; (8 * MIB) as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(8 * MIB);
        dev.write_at(&chunk[..n as usize], at)?;
        at += n;
    }
    dev.sync()?;
    Ok(())
}

/// `WB_BACKING=nbd`: a remote volume, modelled by `nbdkit memory` on a Unix socket in `dir`
/// (the server is left to exit with the benchmark: `--exit-with-parent`).
fn nbd_backing(dir: &std::path::Path, name: &str, size: u64) -> Result<Arc<dyn BlockDev>, Box<dyn Error>> {
    let sock = dir.join(format!("{name}.sock"));
    // `WB_NBD_DELAY=1ms`: every write waits that long, as on a distant volume.
    let delay = std::env::var("WB_NBD_DELAY").ok();
    std::process::Command::new("nbdkit")
        .args(["--exit-with-parent", "--unix"])
        .arg(&sock)
        .args(delay.iter().map(|_| "--filter=delay"))
        .args(["memory", &format!("size={size}")])
        .args(delay.iter().map(|d| format!("wdelay={d}")))
        .spawn()
        .map_err(|e| format!("WB_BACKING=nbd needs nbdkit: {e}"))?;
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    Ok(Arc::new(ubcache::nbd::NbdDev::connect(&uri)?))
}

/// (run ns, run-queue wait ns) of the calling thread.
fn thread_schedstat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// CPU ns of the live threads of the process (ns resolution, unlike `/proc/self/stat`); the
/// phases stop their writeback thread only after reading this.
fn process_cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()))
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Figures by name, one value per repetition, printed as medians at the end.
#[derive(Default)]
struct Figures(BTreeMap<String, Vec<f64>>);

impl Figures {
    fn add(&mut self, name: &str, v: f64) {
        self.0.entry(name.to_string()).or_default().push(v);
    }
}

/// What one read phase saw.
struct ReadPhase {
    lat: Vec<Duration>,
    wall: Duration,
    reader_run: Duration,
    reader_wait: Duration,
    process_cpu: Duration,
}

impl ReadPhase {
    fn record(mut self, label: &str, figs: &mut Figures) {
        self.lat.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let (p50, p99, max) = (
            percentile(&self.lat, 0.50),
            percentile(&self.lat, 0.99),
            self.lat.last().copied().unwrap_or_default(),
        );
        println!(
            "  {label:<11} reads {:>8}  p50 {:>6.1} us  p99 {:>7.1} us  max {:>8.1} us | wall {:>5.2} s  reader run {:>5.2} s wait {:>5.3} s  process cpu {:>5.2} s",
            self.lat.len(),
            us(p50),
            us(p99),
            us(max),
            self.wall.as_secs_f64(),
            self.reader_run.as_secs_f64(),
            self.reader_wait.as_secs_f64(),
            self.process_cpu.as_secs_f64(),
        );
        figs.add(&format!("read p50 us, {label}"), us(p50));
        figs.add(&format!("read p99 us, {label}"), us(p99));
        figs.add(&format!("read max us, {label}"), us(max));
        figs.add(&format!("reader run-queue wait ms, {label}"), self.reader_wait.as_secs_f64() * 1e3);
        figs.add(&format!("process cpu s, {label}"), self.process_cpu.as_secs_f64());
        // Everything but the reader: the writeback thread's CPU.
        figs.add(
            &format!("other threads cpu s, {label}"),
            self.process_cpu.saturating_sub(self.reader_run).as_secs_f64(),
        );
    }
}

/// 4 KiB random reads in the cached region until `reads` are done or `until` says stop.
fn random_reads(dev: &dyn BlockDev, reads: usize, rng: &mut StdRng, until: &dyn Fn() -> bool) -> ReadPhase {
    let mut buf = vec![0u8; BLOCK as usize];
    let mut lat = Vec::with_capacity(reads.min(1 << 22));
    let (run0, wait0) = thread_schedstat();
    let cpu0 = process_cpu_ns();
    let started = Instant::now();
    while lat.len() < reads && !until() {
        let at = rng.gen_range(0..READ_REGION / BLOCK) * BLOCK;
        let t = Instant::now();
        dev.read_at(&mut buf, at).unwrap();
        lat.push(t.elapsed());
    }
    let wall = started.elapsed();
    let (run1, wait1) = thread_schedstat();
    let cpu1 = process_cpu_ns();
    ReadPhase {
        lat,
        wall,
        reader_run: Duration::from_nanos(run1.saturating_sub(run0)),
        reader_wait: Duration::from_nanos(wait1.saturating_sub(wait0)),
        process_cpu: Duration::from_nanos(cpu1.saturating_sub(cpu0)),
    }
}

/// Random 4 KiB writes of `mib` MiB into `[base, base + 2 * mib)`, synced.
fn dirty_random(dev: &dyn BlockDev, base: u64, mib: u64, rng: &mut StdRng) {
    let buf = vec![0x5au8; BLOCK as usize];
    for _ in 0..mib * MIB / BLOCK {
        let at = base + rng.gen_range(0..(2 * mib * MIB) / BLOCK) * BLOCK;
        dev.write_at(&buf, at).unwrap();
    }
    dev.sync().unwrap();
}

/// Sequential writes of `write_bytes` each, `mib` MiB from `base`, synced: adjacent dirty keys
/// of that size.
fn dirty_contiguous(dev: &dyn BlockDev, base: u64, mib: u64, write_bytes: u64) {
    let buf = vec![0x3cu8; write_bytes as usize];
    for i in 0..mib * MIB / write_bytes {
        dev.write_at(&buf, base + i * write_bytes).unwrap();
    }
    dev.sync().unwrap();
}

/// Flushes everything dirty with `DrainStep` (what `ubcache flush` runs); MiB/s and CPU s/GiB.
fn timed_flush(set: &Arc<CacheSet>) -> Result<(f64, f64, f64, u64), Box<dyn Error>> {
    let dirty = set.stats().dirty_bytes;
    let cpu0 = process_cpu_ns();
    let t = Instant::now();
    let written = DrainStep::new(Arc::clone(set), flush_config()).run_to_end()?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = (process_cpu_ns().saturating_sub(cpu0)) as f64 / 1e9;
    let mib = written as f64 / MIB as f64;
    Ok((mib / secs, cpu / (mib / 1024.0), secs, dirty))
}

/// `WritebackConfig::for_drain`, with its batch size overridden by `WB_FLUSH_BATCH_KEYS` (to
/// explore the trade-off; the default is what `ubcache flush` uses).
fn flush_config() -> WritebackConfig {
    let base = WritebackConfig::for_drain();
    match std::env::var("WB_FLUSH_BATCH_KEYS").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(keys) => WritebackConfig { batch_keys: keys, keybuf_keys: keys, ..base },
        None => base,
    }
}

fn wait_clean(set: &CacheSet) {
    while set.stats().dirty_bytes > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Bench {
    set: Arc<CacheSet>,
    dev: CachedDev,
    dirty_mib: u64,
    reads: usize,
    rng: StdRng,
}

impl Bench {
    fn random_base(&self) -> u64 {
        READ_REGION
    }

    fn contiguous_base(&self) -> u64 {
        READ_REGION + 2 * self.dirty_mib * MIB
    }

    /// Read latency with the thread in a given state; the thread is stopped afterwards.
    fn latency_phases(&mut self, figs: &mut Figures) -> Result<(), Box<dyn Error>> {
        dirty_random(&self.dev, self.random_base(), self.dirty_mib, &mut self.rng);
        println!(
            "  dirty: {:.1} MiB in random 4 KiB extents",
            self.set.stats().dirty_bytes as f64 / MIB as f64
        );
        let _ = random_reads(&self.dev, 2000, &mut self.rng, &|| false); // warm-up
        random_reads(&self.dev, self.reads, &mut self.rng, &|| false).record("idle", figs);

        for (label, config) in [
            ("rate PI", WritebackConfig { writeback_delay: Duration::ZERO, ..WritebackConfig::default() }),
            (
                "rate fixed",
                WritebackConfig {
                    writeback_delay: Duration::ZERO,
                    writeback_percent: 0,
                    min_rate: FIXED_RATE,
                    max_rate: FIXED_RATE,
                    ..WritebackConfig::default()
                },
            ),
        ] {
            let before = self.set.stats().written_back_bytes;
            let thread = WritebackThread::start(Arc::clone(&self.set), config);
            let until = Instant::now() + RATE_WINDOW;
            let clean_set = Arc::clone(&self.set);
            let phase = random_reads(&self.dev, usize::MAX, &mut self.rng, &move || {
                Instant::now() >= until || clean_set.stats().dirty_bytes == 0
            });
            let status = thread.status();
            thread.stop()?;
            let wrote = self.set.stats().written_back_bytes - before;
            let secs = phase.wall.as_secs_f64();
            phase.record(label, figs);
            println!(
                "  {:<11} thread rate {:.2} MiB/s, wrote {:.2} MiB = {:.2} MiB/s in {} batches ({} urgent)",
                "",
                status.rate as f64 / MIB as f64,
                wrote as f64 / MIB as f64,
                wrote as f64 / MIB as f64 / secs,
                status.batches,
                status.urgent_batches
            );
            figs.add(&format!("writeback MiB/s during reads, {label}"), wrote as f64 / MIB as f64 / secs);
        }

        let dirty_left = self.set.stats().dirty_bytes;
        let thread = WritebackThread::start(
            Arc::clone(&self.set),
            WritebackConfig { writeback_delay: Duration::ZERO, ..WritebackConfig::default() },
        );
        thread.request_drain();
        let busy_set = Arc::clone(&self.set);
        let phase =
            random_reads(&self.dev, usize::MAX, &mut self.rng, &move || busy_set.stats().dirty_bytes == 0);
        let secs = phase.wall.as_secs_f64();
        phase.record("full speed", figs);
        wait_clean(&self.set);
        let status = thread.status();
        thread.stop()?;
        println!(
            "  {:<11} flushed {:.1} MiB in {secs:.2} s while reading ({} backing writes)",
            "",
            dirty_left as f64 / MIB as f64,
            status.backing_writes
        );
        Ok(())
    }

    fn flush_phases(&mut self, seq: &dyn BlockDev, figs: &mut Figures) -> Result<(), Box<dyn Error>> {
        for (write_bytes, label) in [(BLOCK, "contiguous extents"), (16 * BLOCK, "contiguous 64 KiB extents")]
        {
            dirty_contiguous(&self.dev, self.contiguous_base(), self.dirty_mib, write_bytes);
            let (mibs, cpu_per_gib, secs, dirty) = timed_flush(&self.set)?;
            println!(
                "  flush contiguous: {:.1} MiB (sequential {} KiB writes) in {secs:.2} s = {mibs:.1} MiB/s, cpu {cpu_per_gib:.2} s/GiB",
                dirty as f64 / MIB as f64,
                write_bytes / 1024
            );
            figs.add(&format!("flush MiB/s, {label}"), mibs);
            figs.add(&format!("flush cpu s/GiB, {label}"), cpu_per_gib);
        }

        if std::env::var("WB_BACKING").is_ok_and(|k| k == "hdd") {
            // Random extents on a modelled spindle are a seek each (minutes per run): skipped.
            return self.sequential_reference(seq, figs);
        }
        dirty_random(&self.dev, self.random_base(), self.dirty_mib, &mut self.rng);
        let (mibs, cpu_per_gib, secs, dirty) = timed_flush(&self.set)?;
        println!(
            "  flush random:     {:.1} MiB (random 4 KiB extents) in {secs:.2} s = {mibs:.1} MiB/s, cpu {cpu_per_gib:.2} s/GiB",
            dirty as f64 / MIB as f64
        );
        figs.add("flush MiB/s, random 4 KiB extents", mibs);
        figs.add("flush cpu s/GiB, random 4 KiB extents", cpu_per_gib);
        self.sequential_reference(seq, figs)
    }

    /// The backing device's own sequential write speed, written the way the flush writes.
    fn sequential_reference(&mut self, seq: &dyn BlockDev, figs: &mut Figures) -> Result<(), Box<dyn Error>> {
        let io = flush_config().max_io_bytes;
        let chunk = vec![0xc3u8; io as usize];
        let t = Instant::now();
        for i in 0..self.dirty_mib * MIB / io {
            seq.write_at(&chunk, i * io)?;
        }
        seq.sync()?;
        let secs = t.elapsed().as_secs_f64();
        let mibs = self.dirty_mib as f64 / secs;
        println!(
            "  backing file system sequential write: {} MiB in {} KiB writes + fsync in {secs:.2} s = {mibs:.1} MiB/s",
            self.dirty_mib,
            io / 1024
        );
        figs.add("backing sequential write MiB/s", mibs);
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dirty_mib: u64 = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let reads: usize = args.get(2).map_or(Ok(20_000), |s| s.parse())?;
    let reps: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;
    if dirty_mib == 0 || reps == 0 {
        return Err("DIRTY_MIB and REPS must be > 0".into());
    }
    let dir = tempfile::tempdir()?;
    let cache_bytes = 4 * dirty_mib * MIB + 2 * READ_REGION;
    let backing_bytes = 8192 + READ_REGION + 4 * dirty_mib * MIB;
    let cache = file(dir.path(), "cache", cache_bytes)?;
    let backing = backing_file(dir.path(), "backing", backing_bytes)?;
    let seq = backing_file(dir.path(), "seq", dirty_mib * MIB)?;
    ubcache::cache::format(&cache, std::slice::from_ref(&backing), FormatOptions::default())?;
    let cfg = CacheConfig { mode: CacheMode::Writethrough, sequential_cutoff: 0, ..CacheConfig::default() };
    let set = Arc::new(CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), cfg)?);
    let dev = set.devices().remove(0);
    println!(
        "files in {} (cache {} MiB, backing {} MiB, {}); dirty {dirty_mib} MiB, {reads} idle reads, {reps} repetitions, flush batches of {} keys",
        dir.path().display(),
        cache_bytes / MIB,
        backing_bytes / MIB,
        std::env::var("WB_BACKING").unwrap_or_else(|_| "buffered".into()),
        flush_config().batch_keys
    );

    // The read region cached clean (writethrough).
    let chunk = vec![0xa5u8; MIB as usize];
    for i in 0..READ_REGION / MIB {
        dev.write_at(&chunk, i * MIB)?;
    }
    dev.sync()?;
    dev.set_mode(CacheMode::Writeback, false)?;
    let mut bench = Bench { set, dev, dirty_mib, reads, rng: StdRng::seed_from_u64(1) };
    let mut figs = Figures::default();
    for rep in 1..=reps {
        println!("repetition {rep}/{reps}");
        if reads > 0 {
            bench.latency_phases(&mut figs)?;
        }
        bench.flush_phases(seq.as_ref(), &mut figs)?;
    }

    println!("\nmedians over {reps} repetitions:");
    for (name, values) in &figs.0 {
        let all: Vec<String> = values.iter().map(|v| format!("{v:.1}")).collect();
        println!("  {name:<45} {:>9.2}   [{}]", median(values), all.join(", "));
    }
    let m = |k: &str| median(figs.0.get(k).map_or(&[][..], Vec::as_slice));
    let idle = m("read p99 us, idle");
    for label in ["rate PI", "rate fixed", "full speed"].into_iter().filter(|_| reads > 0) {
        println!(
            "  read p99 {label} / idle: {:.2}x (target < 2x applies to writeback at its target rate)",
            m(&format!("read p99 us, {label}")) / idle
        );
    }
    let seq = m("backing sequential write MiB/s");
    let random = m("flush MiB/s, random 4 KiB extents");
    println!(
        "  flush / backing sequential: contiguous 4 KiB extents {:.0}% (target >= 80%), contiguous 64 KiB extents {:.0}%, random 4 KiB extents {}",
        100.0 * m("flush MiB/s, contiguous extents") / seq,
        100.0 * m("flush MiB/s, contiguous 64 KiB extents") / seq,
        if random > 0.0 { format!("{:.0}%", 100.0 * random / seq) } else { "not run".into() }
    );
    Ok(())
}
