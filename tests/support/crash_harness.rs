//! The crash simulation harness (tests in `tests/engine/crash_sim.rs`, its mutation tests in
//! `tests/mutations/`): a workload runs on SimDev cache and backing devices; power is cut at every
//! sync and at sampled writes of either device, unsynced writes are dropped, kept or torn (each
//! device independently), recovery runs (and is itself crashed at sampled syncs), and then the
//! durability contract is checked sector by sector:
//! - a write acknowledged before a completed FLUSH, or with FUA, reads back exactly;
//! - no read returns data never written to that sector (every sector carries its write id and
//!   sector number, so garbage, another sector's data and torn data are all caught);
//! - stale data never comes back: a value older than the last FLUSH/FUA of the sector is not
//!   accepted, and after writing all dirty data home the same values read back;
//! - the cache set opens, and `check` finds nothing wrong.
//!
//! A campaign can run with a [`Mutation`]: a fail point (`ubcache::failpoints`) armed during the
//! workload only, which breaks the engine on purpose; the mutation tests require the harness to
//! find violations then.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use ubcache::alloc::ReplacementPolicy;
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, CrashMode, SimDev};
use ubcache::journal::JournalConfig;
use ubcache_btree::TreeConfig;

const SECTOR: usize = 512;
const EXPORT_SECTORS: u64 = 512;
const BACKING_HEADER: u64 = 8192;
/// 64 buckets of 4 KiB: about 32 data buckets (128 KiB) for a 256 KiB export, so reclaim and
/// writeback-when-full happen within a short workload; the 32 KiB journal wraps often.
const CACHE_BYTES: u64 = 256 * 1024;
const GEOMETRY: FormatOptions = FormatOptions { bucket_bytes: 4096, node_bytes: 2048 };
/// Write id of the backing device's initial contents; 0 means "all zeros".
const INITIAL_ID: u64 = 1;

fn config(mode: CacheMode) -> CacheConfig {
    CacheConfig {
        journal: JournalConfig {
            max_record_bytes: 4096,
            checkpoint_fraction: 0.5,
            ..JournalConfig::default()
        },
        tree: TreeConfig { max_cached_nodes: 32, bset_align: 512 },
        sequential_cutoff: 48 * 1024,
        reclaim_policy: ReplacementPolicy::Fifo,
        reclaim_batch: 2,
        max_uncommitted_entries: 16,
        mode,
        ..CacheConfig::default()
    }
}

/// The contents of `sector` as written by write `id`: id and sector up front, then a pattern
/// derived from both, so any mix-up is detectable.
fn sector_data(id: u64, sector: u64, out: &mut [u8]) {
    if id == 0 {
        out.fill(0);
        return;
    }
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sector.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for chunk in out[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Which write a sector's bytes came from; `None` for bytes no write produced for this sector.
fn decode(sector: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(data[..8].try_into().unwrap());
    let mut want = vec![0u8; SECTOR];
    sector_data(id, sector, &mut want);
    (want == data).then_some(id)
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        fua: bool,
    },
    Zeroes {
        sector: u64,
        sectors: u64,
    },
    Trim {
        sector: u64,
        sectors: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Flush,
    WritebackStep,
    /// Switch the cache mode (leaving writeback with or without writing dirty data home).
    SetMode {
        mode: CacheMode,
        flush_first: bool,
    },
}

fn workload(seed: u64, len: usize, mode_switches: bool) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            let sector = rng.gen_range(0..EXPORT_SECTORS);
            let sectors = if rng.gen_bool(0.85) { rng.gen_range(1..9) } else { rng.gen_range(9..120) };
            let sectors = sectors.min(EXPORT_SECTORS - sector);
            match rng.gen_range(0..100) {
                0..55 => Op::Write { sector, sectors, fua: rng.gen_bool(0.15) },
                55..60 => Op::Zeroes { sector, sectors },
                60..65 => Op::Trim { sector, sectors },
                65..77 => Op::Read { sector, sectors },
                77..91 => Op::Flush,
                91..94 => Op::WritebackStep,
                _ if mode_switches => {
                    Op::SetMode { mode: CacheMode::ALL[rng.gen_range(0..4)], flush_first: rng.gen_bool(0.5) }
                }
                _ => Op::WritebackStep,
            }
        })
        .collect()
}

/// Per sector: values a live read may return, and values a read after a crash may return.
struct Model {
    live: Vec<BTreeSet<u64>>,
    crash_ok: Vec<BTreeSet<u64>>,
}

impl Model {
    fn new() -> Self {
        let one = BTreeSet::from([INITIAL_ID]);
        Self {
            live: vec![one.clone(); EXPORT_SECTORS as usize],
            crash_ok: vec![one; EXPORT_SECTORS as usize],
        }
    }
    fn write(&mut self, sector: u64, sectors: u64, id: u64, durable: bool) {
        for s in sector..sector + sectors {
            let s = s as usize;
            self.live[s] = BTreeSet::from([id]);
            if durable {
                self.crash_ok[s] = BTreeSet::from([id]);
            } else {
                self.crash_ok[s].insert(id);
            }
        }
    }
    /// A request that failed (power cut): its effect may or may not have landed.
    fn maybe(&mut self, sector: u64, sectors: u64, id: u64) {
        for s in sector..sector + sectors {
            self.crash_ok[s as usize].insert(id);
        }
    }
    fn trim(&mut self, sector: u64, sectors: u64) {
        for s in sector..sector + sectors {
            self.live[s as usize].insert(0);
            self.crash_ok[s as usize].insert(0);
        }
    }
    fn flush(&mut self) {
        self.crash_ok.clone_from(&self.live);
    }
    /// A FLUSH by one of several threads: it covers at least that thread's own acknowledged
    /// writes (its sectors `lo..hi`).
    fn flush_range(&mut self, lo: u64, hi: u64) {
        for s in lo as usize..hi as usize {
            self.crash_ok[s].clone_from(&self.live[s]);
        }
    }
}

/// Where power is cut.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Never,
    CacheSync(u64),
    CacheWrite(u64),
    BackingSync(u64),
    BackingWrite(u64),
}

#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) states: u64,
    pub(crate) violations: u64,
    pub(crate) recovery_crashes: u64,
    pub(crate) first: Vec<String>,
}

impl Tally {
    fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.first.len() < 8 {
            self.first.push(what);
        }
    }
}

fn initial_backing() -> Vec<u8> {
    let mut img = vec![0u8; (BACKING_HEADER + EXPORT_SECTORS * SECTOR as u64) as usize];
    for s in 0..EXPORT_SECTORS {
        let at = (BACKING_HEADER as usize) + s as usize * SECTOR;
        sector_data(INITIAL_ID, s, &mut img[at..at + SECTOR]);
    }
    img
}

/// The cache device starts full of junk, so a key that points at data never written is caught.
fn initial_cache() -> Vec<u8> {
    (0..CACHE_BYTES as usize).map(|i| (i as u8).wrapping_mul(97) ^ 0x5a).collect()
}

struct Run {
    cache: Arc<SimDev>,
    backing: Arc<SimDev>,
    model: Model,
}

fn dynd(d: &Arc<SimDev>) -> Arc<dyn BlockDev> {
    Arc::clone(d) as Arc<dyn BlockDev>
}

/// A fail point that breaks the engine, or none.
pub(crate) type Mutation = Option<&'static str>;

/// Keeps fail point `name` armed (action `return`) until dropped.
struct Armed(&'static str);

impl Armed {
    fn new(mutation: Mutation) -> Option<Armed> {
        let name = mutation?;
        fail::cfg(name, "return").unwrap();
        Some(Armed(name))
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        fail::remove(self.0);
    }
}

/// Formats, runs the workload until done or until power is cut, then cuts power on both devices.
/// `mutation` is armed for the workload only (recovery and checks run the real engine).
fn run_workload(ops: &[Op], mode: CacheMode, mutation: Mutation, cut: Cut) -> Run {
    let _armed = Armed::new(mutation);
    let cache = Arc::new(SimDev::from_image(initial_cache()));
    let backing = Arc::new(SimDev::from_image(initial_backing()));
    ubcache::cache::format(&dynd(&cache), &[dynd(&backing)], GEOMETRY).unwrap();
    let mut model = Model::new();
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], config(mode)).unwrap();
    let dev = set.device(0).unwrap();
    match cut {
        Cut::Never => {}
        Cut::CacheSync(n) => cache.set_crash_at_sync(n),
        Cut::CacheWrite(n) => cache.set_crash_after_writes(n),
        Cut::BackingSync(n) => backing.set_crash_at_sync(n),
        Cut::BackingWrite(n) => backing.set_crash_after_writes(n),
    }
    let mut buf = vec![0u8; 128 * SECTOR];
    for (i, op) in ops.iter().enumerate() {
        let id = i as u64 + 2;
        let ok = match *op {
            Op::Write { sector, sectors, fua } => {
                let data = &mut buf[..sectors as usize * SECTOR];
                for (k, chunk) in data.chunks_mut(SECTOR).enumerate() {
                    sector_data(id, sector + k as u64, chunk);
                }
                let off = sector * SECTOR as u64;
                let r = if fua { dev.write_at_fua(data, off) } else { dev.write_at(data, off) };
                match r {
                    Ok(()) => model.write(sector, sectors, id, fua),
                    Err(_) => model.maybe(sector, sectors, id),
                }
                r.is_ok()
            }
            Op::Zeroes { sector, sectors } => {
                let r = dev.write_zeroes(sector * SECTOR as u64, sectors * SECTOR as u64, true);
                match r {
                    Ok(()) => model.write(sector, sectors, 0, false),
                    Err(_) => model.maybe(sector, sectors, 0),
                }
                r.is_ok()
            }
            Op::Trim { sector, sectors } => {
                // Whether or not it completes, the sectors may read as zeros afterwards.
                model.trim(sector, sectors);
                dev.discard(sector * SECTOR as u64, sectors * SECTOR as u64).is_ok()
            }
            Op::Read { sector, sectors } => {
                let data = &mut buf[..sectors as usize * SECTOR];
                match dev.read_at(data, sector * SECTOR as u64) {
                    Ok(()) => {
                        for (k, chunk) in data.chunks(SECTOR).enumerate() {
                            let s = sector + k as u64;
                            let got = decode(s, chunk);
                            assert!(
                                got.is_some_and(|v| model.live[s as usize].contains(&v)),
                                "live read of sector {s} returned {got:?}, expected one of {:?} (op {i})",
                                model.live[s as usize]
                            );
                        }
                        true
                    }
                    Err(_) => false,
                }
            }
            Op::Flush => {
                let r = dev.sync();
                if r.is_ok() {
                    model.flush();
                }
                r.is_ok()
            }
            Op::WritebackStep => set.writeback_step(4).is_ok(),
            Op::SetMode { mode, flush_first } => dev.set_mode(mode, flush_first).is_ok(),
        };
        if !ok {
            break;
        }
    }
    // Power fails for both devices at the same moment.
    cache.crash_now();
    backing.crash_now();
    drop(dev);
    drop(set);
    Run { cache, backing, model }
}

fn crash_mode(rng: &mut StdRng) -> CrashMode {
    match rng.gen_range(0..4) {
        0 => CrashMode::DropAll,
        1 => CrashMode::KeepAll,
        2 => CrashMode::Random { seed: rng.r#gen() },
        _ => CrashMode::TornRandom { seed: rng.r#gen() },
    }
}

/// Recovers from one crash state (possibly crashing again during recovery) and checks the
/// contract. `stability` additionally writes everything home and re-reads.
fn verify(run: &Run, mode: CacheMode, rng: &mut StdRng, tally: &mut Tally, label: &str, stability: bool) {
    let mut cache = SimDev::from_image(run.cache.crash_image(&crash_mode(rng)));
    let mut backing = SimDev::from_image(run.backing.crash_image(&crash_mode(rng)));
    tally.states += 1;
    // Crash during recovery at a sampled sync, then recover from that.
    if rng.gen_bool(0.25) {
        let c = Arc::new(cache);
        let b = Arc::new(backing);
        c.set_crash_at_sync(rng.gen_range(1..6));
        let opened = CacheSet::open(dynd(&c), &[dynd(&b)], config(mode));
        c.crash_now();
        b.crash_now();
        drop(opened);
        tally.recovery_crashes += 1;
        cache = SimDev::from_image(c.crash_image(&crash_mode(rng)));
        backing = SimDev::from_image(b.crash_image(&crash_mode(rng)));
    }
    let cache: Arc<dyn BlockDev> = Arc::new(cache);
    let backing: Arc<dyn BlockDev> = Arc::new(backing);
    // The offline fsck reads the crash image as it is (replaying in memory, writing nothing).
    if stability {
        match ubcache::check::check(&cache, std::slice::from_ref(&backing)) {
            Ok(r) if r.is_clean() => {}
            Ok(r) => tally.violation(format!("{label}: offline check of the crash image: {:?}", r.problems)),
            Err(e) => tally.violation(format!("{label}: offline check of the crash image failed: {e}")),
        }
    }
    let set = match CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), config(mode)) {
        Ok(s) => s,
        Err(e) => {
            // The backing superblock is rewritten crash-atomically (two single-sector copies),
            // so an unreadable one after a crash is a violation like any other failed recovery.
            tally.violation(format!("{label}: recovery failed: {e}"));
            return;
        }
    };
    // Offline fsck of the crash image would replay the same journal; the online check also
    // compares the rebuilt allocator with the btree.
    match set.check() {
        Ok(r) if r.is_clean() => {}
        Ok(r) => tally.violation(format!("{label}: check after recovery: {:?}", r.problems)),
        Err(e) => tally.violation(format!("{label}: check after recovery failed: {e}")),
    }
    let dev = set.device(0).unwrap();
    let mut all = vec![0u8; EXPORT_SECTORS as usize * SECTOR];
    if let Err(e) = dev.read_at(&mut all, 0) {
        tally.violation(format!("{label}: read after recovery failed: {e}"));
        return;
    }
    let mut ids = Vec::with_capacity(EXPORT_SECTORS as usize);
    for (s, chunk) in all.chunks(SECTOR).enumerate() {
        let got = decode(s as u64, chunk);
        ids.push(got);
        if !got.is_some_and(|v| run.model.crash_ok[s].contains(&v)) {
            tally.violation(format!(
                "{label}: sector {s} reads {got:?} after recovery, allowed {:?}",
                run.model.crash_ok[s]
            ));
            return;
        }
    }
    if stability {
        // Writing everything home must not change a single value, nor may the backing device
        // alone disagree afterwards (stale data resurrected by writeback or eviction).
        if let Err(e) = set.write_back_all() {
            tally.violation(format!("{label}: write_back_all after recovery failed: {e}"));
            return;
        }
        let mut again = vec![0u8; all.len()];
        dev.read_at(&mut again, 0).unwrap();
        let mut raw = vec![0u8; all.len()];
        backing.read_at(&mut raw, BACKING_HEADER).unwrap();
        for s in 0..EXPORT_SECTORS as usize {
            let a = decode(s as u64, &again[s * SECTOR..(s + 1) * SECTOR]);
            let r = decode(s as u64, &raw[s * SECTOR..(s + 1) * SECTOR]);
            if a != ids[s] || r != ids[s] {
                tally.violation(format!(
                    "{label}: sector {s} read {:?} after recovery, {a:?} after writeback, backing has {r:?}",
                    ids[s]
                ));
                return;
            }
        }
    }
}

/// Crash points: every sync of both devices, and sampled writes of both.
fn cut_points(ops: &[Op], mode: CacheMode, mutation: Mutation, write_stride: u64) -> Vec<Cut> {
    let dry = run_workload(ops, mode, mutation, Cut::Never);
    let (c, b) = (dry.cache.stats(), dry.backing.stats());
    let mut cuts = Vec::new();
    cuts.extend((1..=c.syncs).map(Cut::CacheSync));
    cuts.extend((1..=b.syncs).map(Cut::BackingSync));
    cuts.extend((1..=c.writes).step_by(write_stride as usize).map(Cut::CacheWrite));
    cuts.extend((1..=b.writes).step_by(write_stride as usize).map(Cut::BackingWrite));
    cuts.push(Cut::Never);
    cuts
}

pub(crate) fn campaign(
    mode: CacheMode,
    mutation: Mutation,
    seeds: std::ops::Range<u64>,
    ops_len: usize,
    images_per_cut: usize,
    mode_switches: bool,
) -> Tally {
    let mut tally = Tally::default();
    let mut rng = StdRng::seed_from_u64(seeds.start ^ 0xC0FFEE);
    for seed in seeds {
        let ops = workload(seed, ops_len, mode_switches);
        for cut in cut_points(&ops, mode, mutation, 3) {
            let run = run_workload(&ops, mode, mutation, cut);
            for k in 0..images_per_cut {
                let label = format!("{mode} seed {seed} {cut:?} image {k}");
                verify(&run, mode, &mut rng, &mut tally, &label, k == 0);
            }
        }
    }
    tally
}

pub(crate) fn report(name: &str, t: &Tally, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{name}: {} crash states ({} with a crash during recovery), {} violations, {:.1} s, {:.0} states/s",
        t.states,
        t.recovery_crashes,
        t.violations,
        secs,
        t.states as f64 / secs
    );
    for v in &t.first {
        eprintln!("  {v}");
    }
}

pub(crate) fn concurrent_campaign(mutation: Mutation, rounds: u64) -> Tally {
    const THREADS: u64 = 3;
    let mut tally = Tally::default();
    let mut rng = StdRng::seed_from_u64(0xFEED);
    for round in 0..rounds {
        let mode =
            [CacheMode::Writeback, CacheMode::Writethrough, CacheMode::Writearound][round as usize % 3];
        let cache = Arc::new(SimDev::from_image(initial_cache()));
        let backing = Arc::new(SimDev::from_image(initial_backing()));
        ubcache::cache::format(&dynd(&cache), &[dynd(&backing)], GEOMETRY).unwrap();
        // Armed for the workload; disarmed (dropped) before recovery below.
        let armed = Armed::new(mutation);
        let set = Arc::new(CacheSet::open(dynd(&cache), &[dynd(&backing)], config(mode)).unwrap());
        let model = Arc::new(parking_lot::Mutex::new(Model::new()));
        let n = rng.gen_range(5..400);
        if rng.gen_bool(0.5) {
            cache.set_crash_after_writes(n);
        } else {
            backing.set_crash_after_writes(n / 4 + 1);
        }
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let set = Arc::clone(&set);
                let model = Arc::clone(&model);
                let seed = round * 100 + t;
                std::thread::spawn(move || {
                    let dev = set.device(0).unwrap();
                    let mut rng = StdRng::seed_from_u64(seed);
                    let span = EXPORT_SECTORS / THREADS;
                    let (lo, hi) = (t * span, (t + 1) * span);
                    let mut buf = vec![0u8; 16 * SECTOR];
                    for i in 0..200u64 {
                        let id = (t + 1) * 1_000_000 + i;
                        let sector = rng.gen_range(lo..hi);
                        let sectors = rng.gen_range(1..=16u64).min(hi - sector);
                        let ok = match rng.gen_range(0..10) {
                            0..6 => {
                                let fua = rng.gen_bool(0.2);
                                let data = &mut buf[..sectors as usize * SECTOR];
                                for (k, chunk) in data.chunks_mut(SECTOR).enumerate() {
                                    sector_data(id, sector + k as u64, chunk);
                                }
                                let off = sector * SECTOR as u64;
                                let r =
                                    if fua { dev.write_at_fua(data, off) } else { dev.write_at(data, off) };
                                let mut m = model.lock();
                                match r {
                                    Ok(()) => m.write(sector, sectors, id, fua),
                                    Err(_) => m.maybe(sector, sectors, id),
                                }
                                r.is_ok()
                            }
                            6..8 => {
                                let r = dev.sync();
                                if r.is_ok() {
                                    model.lock().flush_range(lo, hi);
                                }
                                r.is_ok()
                            }
                            _ => {
                                let data = &mut buf[..sectors as usize * SECTOR];
                                let r = dev.read_at(data, sector * SECTOR as u64);
                                if r.is_ok() {
                                    let m = model.lock();
                                    for (k, chunk) in data.chunks(SECTOR).enumerate() {
                                        let s = sector + k as u64;
                                        let got = decode(s, chunk);
                                        assert!(
                                            got.is_some_and(|v| m.live[s as usize].contains(&v)),
                                            "live read of sector {s}: {got:?}, expected {:?}",
                                            m.live[s as usize]
                                        );
                                    }
                                }
                                r.is_ok()
                            }
                        };
                        if !ok {
                            break;
                        }
                    }
                })
            })
            .collect();
        for h in threads {
            h.join().unwrap();
        }
        cache.crash_now();
        backing.crash_now();
        drop(set);
        drop(armed);
        let model = Arc::try_unwrap(model).ok().unwrap().into_inner();
        let run = Run { cache, backing, model };
        for k in 0..4 {
            verify(&run, mode, &mut rng, &mut tally, &format!("concurrent round {round} image {k}"), k == 0);
        }
    }
    tally
}
