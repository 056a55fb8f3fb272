//! The background writeback thread: copies dirty data home in offset order, at a rate steered
//! toward a dirty target, while foreground I/O keeps priority.
//!
//! - **Key buffer** ([`DirtyKeyBuf`], bcache's keybuf): a bounded buffer of dirty keys refilled
//!   from the btree in (device, offset) order, continuing where the last refill stopped and
//!   wrapping to the start at the end of the tree (a *pass*). Keys in the buffer may go stale
//!   (overwritten, written back by someone else); the engine re-checks each key under the
//!   writeback range lock before it writes it ([`CacheSet::write_back_scanned`]). The buffer
//!   remembers the journal seq of its scan, so the engine commits the journal before a batch
//!   only when the scanned keys are not durable yet (once per refill, not once per batch).
//! - **Coalescing**: the keys of one batch that are contiguous on backing are written with one
//!   backing write ([`crate::wbpolicy::coalesce`]), up to `max_io_bytes`.
//! - **Ordering** (crash rules 4 and 6, kept by the engine): commit (if the keys are not durable
//!   yet), read cache, write backing,
//!   sync backing, then journal the keys clean with replace semantics.
//! - **Rate**: a PI controller on the dirty bytes ([`crate::wbpolicy::RateController`], target
//!   `writeback_percent` of the cache). A batch of `n` bytes at rate `r` is followed by the
//!   next one `n / r` (at most [`MAX_PAUSE`]) after the batch *started*, so the batch's own
//!   I/O time counts toward its share and the rate is met; a batch is at most what the rate
//!   allows in [`RATE_SLICE`], so a low rate writes small batches rather than one big burst.
//! - **Delay**: when dirty data appears in a cache that was clean, writeback waits
//!   `writeback_delay` before it starts (overwrites in that window cost no backing I/O).
//! - **Full speed** — no rate pauses, no delay — while a flush is requested
//!   ([`WritebackThread::request_flush`]), while the share of data buckets holding dirty data is
//!   at or above `urgent_percent`, or right after a write fell back to backing because the cache
//!   was full.
//! - **Foreground priority**: the thread yields between batches; it holds the metadata lock
//!   only to scan, validate and mark keys clean (a chunk of 32 keys per hold, see
//!   `cache/wb_io.rs`), and to commit the journal after syncing the cache
//!   outside the lock, never during data I/O.
//! - **Knobs at runtime**: the thread reads its tuning ([`WritebackTuning`], shared per cache
//!   set through [`tuning_for`]) before each decision; the control socket changes it.
//! - **Shutdown**: [`WritebackThread::stop`] (or drop) signals and joins the thread.
//!
//! An I/O error does not end the thread: it is logged and kept ([`WritebackStatus::last_error`]),
//! and the thread backs off (doubling from 100 ms to 10 s) and tries again: a backing device
//! that comes back is written to again, and dirty data is never dropped.

use crate::cache::{CacheError, CacheResult, CacheSet};
use crate::dev::SECTOR_SIZE;
use crate::format::Uuid;
use crate::wbpolicy::{CoalesceLimits, RateConfig, RateController};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ubcache_btree::{Key, Pos};

/// Longest pause after one batch (bcache caps its writeback delay at 2.5 s).
pub const MAX_PAUSE: Duration = Duration::from_millis(2500);
/// A batch holds at most the bytes the current rate allows in this slice of time.
pub const RATE_SLICE: Duration = Duration::from_millis(100);
/// Back-off after a failed batch: first and longest.
const ERROR_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Tuning of the writeback thread. Defaults follow bcache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackConfig {
    /// Dirty data aimed for, percent of the cache's data capacity (default 10).
    pub writeback_percent: u8,
    /// Wait before writing back dirty data that appeared in a clean cache (default 30 s).
    pub writeback_delay: Duration,
    /// Lowest rate, bytes/s: below the target writeback trickles at this rate (default 4 KiB/s).
    pub min_rate: u64,
    /// Highest rate, bytes/s (default 1 GiB/s).
    pub max_rate: u64,
    /// PI controller gains as inverses (bcache: 40 and 10000); see [`RateConfig`].
    pub p_term_inverse: u64,
    pub i_term_inverse: u64,
    /// How often the rate is recomputed (bcache: 5 s; default 1 s).
    pub rate_update_interval: Duration,
    /// Share of data buckets holding dirty data (percent) at which writeback goes full speed
    /// (default 70).
    pub urgent_percent: u8,
    /// Keys written per batch at most (default 256; a rate-paced batch is also bounded by
    /// what the rate allows in [`RATE_SLICE`]).
    pub batch_keys: usize,
    /// Largest coalesced backing write, bytes (default 1 MiB).
    pub max_io_bytes: u64,
    /// Keys the key buffer holds (bcache: 500).
    pub keybuf_keys: usize,
    /// How often an idle thread looks for new dirty data (default 100 ms).
    pub idle_poll: Duration,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        Self {
            writeback_percent: 10,
            writeback_delay: Duration::from_secs(30),
            min_rate: 4096,
            max_rate: 1 << 30,
            p_term_inverse: 40,
            i_term_inverse: 10_000,
            rate_update_interval: Duration::from_secs(1),
            urgent_percent: 70,
            batch_keys: 256,
            max_io_bytes: 1 << 20,
            keybuf_keys: 500,
            idle_poll: Duration::from_millis(100),
        }
    }
}

/// Most bytes one flush batch holds range locks for.
const FLUSH_BATCH_MAX_BYTES: u64 = 64 << 20;
/// Most runs (range locks, backing writes) in one flush batch: the range locks are a list that
/// every locker scans, so thousands of held ranges would cost foreground writers and the flush
/// itself quadratic time.
const FLUSH_BATCH_MAX_RUNS: usize = 1024;

impl WritebackConfig {
    /// Tuning for a full flush: large batches (up to 16384 keys, at most 64 MiB and, in
    /// `FlushStep`, 1024 separate runs), so the one backing sync per batch is spread over many
    /// keys. With 512 keys per batch a flush of contiguous 4 KiB extents (2 MiB batches) ran at
    /// a sixth of the backing file's sequential write speed, with 4096 (16 MiB) at about a
    /// third; with 16384, the in-kernel copy, early writeout, one clean entry per run and the
    /// writer thread it runs at 80-100% (`examples/wb_latency.rs`, `docs/writeback.md`). The
    /// range locks of a batch are held until it is synced, so a writethrough or bypass write
    /// into a range being flushed waits up to one batch (a writeback-mode write never does).
    #[must_use]
    pub fn for_flush() -> Self {
        Self { batch_keys: 16384, keybuf_keys: 16384, ..Self::default() }
    }

    fn limits(&self) -> CoalesceLimits {
        CoalesceLimits {
            max_io_len: (self.max_io_bytes / SECTOR_SIZE).max(1),
            max_extents: self.batch_keys.max(1),
        }
    }
}

/// The part of the configuration the control socket changes at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TuningValues {
    pub writeback_percent: u8,
    pub writeback_delay: Duration,
    pub min_rate: u64,
    pub max_rate: u64,
}

impl From<&WritebackConfig> for TuningValues {
    fn from(c: &WritebackConfig) -> Self {
        Self {
            writeback_percent: c.writeback_percent,
            writeback_delay: c.writeback_delay,
            min_rate: c.min_rate,
            max_rate: c.max_rate,
        }
    }
}

/// Runtime tuning and gauges shared by a cache set's writeback thread and its control target.
#[derive(Debug)]
pub struct WritebackTuning {
    values: Mutex<TuningValues>,
    /// Rate of the last controller update, bytes/s (0: no thread, or nothing dirty).
    rate: AtomicU64,
    flush_requested: AtomicBool,
    /// Whether a writeback thread runs for the set.
    running: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<()>,
}

impl WritebackTuning {
    fn new(values: TuningValues) -> Self {
        Self {
            values: Mutex::new(values),
            rate: AtomicU64::new(0),
            flush_requested: AtomicBool::new(false),
            running: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
        }
    }

    /// The values now.
    #[must_use]
    pub fn values(&self) -> TuningValues {
        *self.values.lock()
    }

    /// Changes the values (the caller validated them) and wakes the thread.
    pub fn update(&self, f: impl FnOnce(&mut TuningValues)) {
        f(&mut self.values.lock());
        self.notify();
    }

    /// The current writeback rate, bytes/s (0 when no thread runs or nothing is dirty).
    #[must_use]
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Whether a writeback thread runs for the set.
    #[must_use]
    pub fn thread_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    fn notify(&self) {
        let _g = self.wake_lock.lock();
        self.wake.notify_all();
    }
}

/// Tunings by cache-set uuid. Weak: an entry lives as long as a thread or control target of
/// that set holds it.
static TUNINGS: Mutex<Vec<(Uuid, Weak<WritebackTuning>)>> = Mutex::new(Vec::new());

/// The tuning shared by every writeback thread and control target of `set` (created with
/// [`WritebackConfig::default`] values if none exists). This is how `ubcache set
/// writeback_percent 20` reaches a running thread without either knowing the other.
#[must_use]
pub fn tuning_for(set: &CacheSet) -> Arc<WritebackTuning> {
    let mut all = TUNINGS.lock();
    all.retain(|(_, w)| w.strong_count() > 0);
    let uuid = set.uuid();
    if let Some(t) = all.iter().find(|(u, _)| *u == uuid).and_then(|(_, w)| w.upgrade()) {
        return t;
    }
    let t = Arc::new(WritebackTuning::new(TuningValues::from(&WritebackConfig::default())));
    all.push((uuid, Arc::downgrade(&t)));
    t
}

/// Dirty keys found per scan call of a refill (one hold of the metadata lock each).
const SCAN_CHUNK_KEYS: usize = 64;

/// A bounded buffer of dirty keys, refilled from the btree in offset order (bcache's keybuf).
#[derive(Debug)]
pub struct DirtyKeyBuf {
    keys: VecDeque<Key>,
    /// Where the next refill starts.
    next: Pos,
    capacity: usize,
    passes: u64,
    /// The newest [`crate::cache::DirtyScan::journal_seq`] of the scans that filled the buffer.
    scanned_seq: u64,
}

impl DirtyKeyBuf {
    /// An empty buffer of `capacity` keys, starting at the beginning of the tree.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self { keys: VecDeque::new(), next: Pos::MIN, capacity: capacity.max(1), passes: 0, scanned_seq: 0 }
    }

    /// A journal seq at or after the journalling of every key the buffer has handed out: what
    /// [`CacheSet::write_back_scanned`] needs durable before it writes them.
    #[must_use]
    pub fn scanned_seq(&self) -> u64 {
        self.scanned_seq
    }

    /// Completed passes over the whole tree.
    #[must_use]
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// Takes up to `max_keys` keys (at least one if any is dirty) whose total size stays within
    /// `max_bytes`, refilling from the btree when empty. Empty: nothing dirty was found in a
    /// whole pass.
    pub fn take(&mut self, set: &CacheSet, max_keys: usize, max_bytes: u64) -> CacheResult<Vec<Key>> {
        self.take_runs(set, max_keys, max_bytes, usize::MAX)
    }

    /// [`DirtyKeyBuf::take`], also stopping before a key that would start run number
    /// `max_runs + 1` (a run: keys contiguous on one device, written with one backing write
    /// under one range lock). Bounds the range locks a batch of scattered keys holds.
    pub fn take_runs(
        &mut self,
        set: &CacheSet,
        max_keys: usize,
        max_bytes: u64,
        max_runs: usize,
    ) -> CacheResult<Vec<Key>> {
        if self.keys.is_empty() {
            self.refill(set)?;
        }
        let mut out: Vec<Key> = Vec::new();
        let mut bytes = 0u64;
        let mut runs = 0usize;
        while let Some(k) = self.keys.front() {
            let size = u64::from(k.size) * SECTOR_SIZE;
            let new_run = out.last().is_none_or(|p| p.dev != k.dev || p.end != k.start());
            if out.len() >= max_keys.max(1)
                || (!out.is_empty() && bytes + size > max_bytes)
                || (new_run && !out.is_empty() && runs >= max_runs.max(1))
            {
                break;
            }
            bytes += size;
            runs += usize::from(new_run);
            out.extend(self.keys.pop_front());
        }
        Ok(out)
    }

    fn refill(&mut self, set: &CacheSet) -> CacheResult<()> {
        // Scans of at most SCAN_CHUNK_KEYS keys (each holds the metadata lock foreground reads
        // need) up to the capacity or the end of the tree; if the rest of this pass held
        // nothing, one new pass from the start.
        let mut wrapped = false;
        while self.keys.len() < self.capacity {
            let from = self.next;
            let want = (self.capacity - self.keys.len()).min(SCAN_CHUNK_KEYS);
            let scan = set.scan_dirty(from, want)?;
            self.scanned_seq = self.scanned_seq.max(scan.journal_seq);
            self.keys.extend(scan.keys);
            match scan.next {
                Some(p) => self.next = p,
                None => {
                    self.next = Pos::MIN;
                    self.passes += 1;
                    if !self.keys.is_empty() || from == Pos::MIN || wrapped {
                        break;
                    }
                    wrapped = true;
                }
            }
        }
        Ok(())
    }
}

/// Counters of a running thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WritebackStatus {
    /// Batches written (calls into the engine that found keys).
    pub batches: u64,
    pub keys_written: u64,
    pub keys_skipped: u64,
    pub bytes_written: u64,
    /// Backing writes issued; fewer than `keys_written` when extents were coalesced.
    pub backing_writes: u64,
    /// Full passes over the dirty keys.
    pub passes: u64,
    /// Batches run at full speed (flush requested or cache nearly full).
    pub urgent_batches: u64,
    /// The rate of the last controller update, bytes/s.
    pub rate: u64,
    /// The last error, if the latest batch failed.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Signal {
    stop: AtomicBool,
}

/// A running writeback thread. [`WritebackThread::stop`] (or dropping it) stops and joins it.
#[derive(Debug)]
pub struct WritebackThread {
    signal: Arc<Signal>,
    tuning: Arc<WritebackTuning>,
    status: Arc<Mutex<WritebackStatus>>,
    handle: Option<JoinHandle<()>>,
    /// The thread could not be started (reported by `stop` and `status`).
    start_error: Option<String>,
}

impl WritebackThread {
    /// Starts writing back the dirty data of `set` in the background. `config` sets the
    /// set's shared tuning ([`tuning_for`]); the control socket may change it afterwards.
    /// If the OS refuses a thread, the error is logged and kept in [`WritebackStatus::last_error`]
    /// and [`WritebackThread::stop`] returns it.
    #[must_use]
    pub fn start(set: Arc<CacheSet>, config: WritebackConfig) -> WritebackThread {
        let tuning = tuning_for(&set);
        tuning.update(|v| *v = TuningValues::from(&config));
        let signal = Arc::new(Signal::default());
        let status = Arc::new(Mutex::new(WritebackStatus::default()));
        let worker = Worker {
            set,
            config,
            tuning: Arc::clone(&tuning),
            signal: Arc::clone(&signal),
            status: Arc::clone(&status),
        };
        tuning.running.store(true, Ordering::Release);
        let spawned =
            std::thread::Builder::new().name("ubcache-writeback".into()).spawn(move || worker.run());
        match spawned {
            Ok(handle) => WritebackThread { signal, tuning, status, handle: Some(handle), start_error: None },
            Err(e) => {
                tuning.running.store(false, Ordering::Release);
                let msg = format!("cannot start the writeback thread: {e}");
                log::error!("{msg}");
                status.lock().last_error = Some(msg.clone());
                WritebackThread { signal, tuning, status, handle: None, start_error: Some(msg) }
            }
        }
    }

    /// Writes back at full speed until no dirty data is left (then the request clears itself).
    pub fn request_flush(&self) {
        self.tuning.flush_requested.store(true, Ordering::Release);
        self.tuning.notify();
    }

    /// The thread's counters.
    #[must_use]
    pub fn status(&self) -> WritebackStatus {
        self.status.lock().clone()
    }

    /// The shared tuning of this thread's cache set.
    #[must_use]
    pub fn tuning(&self) -> &Arc<WritebackTuning> {
        &self.tuning
    }

    /// Signals the thread to stop after its current batch and waits for it. Returns the last
    /// error if the latest batch failed (dirty data is kept), or the thread did not start.
    pub fn stop(mut self) -> CacheResult<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> CacheResult<()> {
        self.signal.stop.store(true, Ordering::Release);
        self.tuning.notify();
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                self.tuning.running.store(false, Ordering::Release);
                return Err(CacheError::Failed("writeback thread panicked".into()));
            }
        }
        if let Some(e) = &self.start_error {
            return Err(CacheError::Failed(e.clone()));
        }
        match self.status.lock().last_error.clone() {
            Some(e) => Err(CacheError::Failed(format!("writeback: {e}"))),
            None => Ok(()),
        }
    }
}

impl Drop for WritebackThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::warn!("writeback thread ended with an error: {e}");
        }
    }
}

struct Worker {
    set: Arc<CacheSet>,
    config: WritebackConfig,
    tuning: Arc<WritebackTuning>,
    signal: Arc<Signal>,
    status: Arc<Mutex<WritebackStatus>>,
}

impl Worker {
    fn stopping(&self) -> bool {
        self.signal.stop.load(Ordering::Acquire)
    }

    /// Waits up to `d`, waking early on stop, a flush request or a knob change.
    fn pause(&self, d: Duration) {
        if d.is_zero() {
            return;
        }
        let mut g = self.tuning.wake_lock.lock();
        if self.stopping() {
            return;
        }
        self.tuning.wake.wait_for(&mut g, d);
    }

    fn rate_config(&self, v: &TuningValues, cache_bytes: u64) -> RateConfig {
        let min_rate = v.min_rate.max(1);
        RateConfig {
            cache_bytes,
            writeback_percent: v.writeback_percent.min(100),
            min_rate,
            max_rate: v.max_rate.max(min_rate),
            p_term_inverse: self.config.p_term_inverse.max(1),
            i_term_inverse: self.config.i_term_inverse.max(1),
        }
    }

    fn run(self) {
        let origin = Instant::now();
        let mut keybuf = DirtyKeyBuf::new(self.config.keybuf_keys);
        let mut controller: Option<RateController> = None;
        let mut last_rate_update: Option<Instant> = None;
        // When the thread first saw dirty data after the cache was clean.
        let mut dirty_since: Option<Instant> = None;
        let mut was_dirty = false;
        let mut next_allowed = Instant::now();
        let mut last_fallbacks = self.set.stats().full_fallbacks;
        let mut backoff = ERROR_BACKOFF_MIN;
        let limits = self.config.limits();
        while !self.stopping() {
            let usage = match self.set.usage() {
                Ok(u) => u,
                Err(e) => {
                    self.note_error(&e);
                    self.pause(backoff);
                    backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                    continue;
                }
            };
            let dirty = usage.attached_dirty_bytes;
            if dirty == 0 {
                self.tuning.flush_requested.store(false, Ordering::Release);
                self.tuning.rate.store(0, Ordering::Relaxed);
                if was_dirty {
                    // Everything is home: make the clean keys durable and mark the backing
                    // devices Clean, so a crash now needs no writeback at all.
                    if let Err(e) = self.set.finish_flush() {
                        self.note_error(&e);
                    }
                    was_dirty = false;
                }
                dirty_since = None;
                self.pause(self.config.idle_poll);
                continue;
            }
            was_dirty = true;
            let now = Instant::now();
            let since = *dirty_since.get_or_insert(now);
            let values = self.tuning.values();
            let fallbacks = self.set.stats().full_fallbacks;
            let data_buckets = usage.buckets_dirty + usage.buckets_clean + usage.buckets_free;
            let nearly_full = data_buckets > 0
                && usage.buckets_dirty * 100 >= data_buckets * u64::from(self.config.urgent_percent.min(100));
            let urgent = self.tuning.flush_requested.load(Ordering::Acquire)
                || nearly_full
                || fallbacks > last_fallbacks;
            last_fallbacks = fallbacks;
            if !urgent && now.duration_since(since) < values.writeback_delay {
                let left = values.writeback_delay - now.duration_since(since);
                self.pause(left.min(self.config.idle_poll));
                continue;
            }
            // Rate controller update.
            let rc = self.rate_config(&values, usage.data_capacity_bytes);
            let due =
                last_rate_update.is_none_or(|t| now.duration_since(t) >= self.config.rate_update_interval);
            let ctl = match controller.as_mut() {
                Some(c) => {
                    if c.config() != rc && c.set_config(rc).is_err() {
                        log::warn!("writeback: refused rate configuration {rc:?}");
                    }
                    c
                }
                None => match RateController::new(rc) {
                    Ok(c) => controller.insert(c),
                    Err(e) => {
                        log::error!("writeback: bad rate configuration {rc:?}: {e}");
                        self.pause(self.config.idle_poll);
                        continue;
                    }
                },
            };
            if due {
                ctl.update(dirty, now.duration_since(origin));
                last_rate_update = Some(now);
            }
            let rate = ctl.rate().max(1);
            self.tuning.rate.store(rate, Ordering::Relaxed);
            if !urgent && now < next_allowed {
                self.pause((next_allowed - now).min(self.config.idle_poll));
                continue;
            }
            let budget = if urgent {
                self.config.max_io_bytes.saturating_mul(self.config.batch_keys as u64).max(1)
            } else {
                ((rate as f64 * RATE_SLICE.as_secs_f64()) as u64).max(SECTOR_SIZE)
            };
            let batch_started = Instant::now();
            let result = keybuf.take(&self.set, self.config.batch_keys, budget).and_then(|keys| {
                self.set.write_back_scanned(&keys, keybuf.scanned_seq(), limits).map(|r| (keys.len(), r))
            });
            match result {
                Ok((taken, report)) => {
                    backoff = ERROR_BACKOFF_MIN;
                    let mut s = self.status.lock();
                    s.last_error = None;
                    s.passes = keybuf.passes();
                    s.rate = rate;
                    if taken > 0 {
                        s.batches += 1;
                        s.keys_written += report.keys_written as u64;
                        s.keys_skipped += report.keys_skipped as u64;
                        s.bytes_written += report.bytes_written;
                        s.backing_writes += report.backing_writes as u64;
                        if urgent {
                            s.urgent_batches += 1;
                        }
                    }
                    drop(s);
                    if !urgent {
                        // From the batch's start: its own I/O time is part of its share.
                        let pause = Duration::from_secs_f64(report.bytes_written as f64 / rate as f64);
                        next_allowed = batch_started + pause.min(MAX_PAUSE);
                    }
                    if taken == 0 {
                        // Dirty data counted but none found in a whole pass (it is being
                        // overwritten or written back by someone else right now).
                        self.pause(self.config.idle_poll);
                    }
                }
                Err(e) => {
                    self.note_error(&e);
                    self.pause(backoff);
                    backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                }
            }
            // Foreground I/O first.
            std::thread::yield_now();
        }
        self.tuning.rate.store(0, Ordering::Relaxed);
        self.tuning.running.store(false, Ordering::Release);
    }

    fn note_error(&self, e: &CacheError) {
        log::error!("writeback of cache set {}: {e}", self.set.uuid());
        self.status.lock().last_error = Some(e.to_string());
    }
}

/// One step of a full flush for [`crate::ctl::FlushRunner`]: writes back one batch at full
/// speed and returns the bytes written; `Ok(0)` only when no dirty data of an attached device
/// is left (the backing devices are then marked Clean).
#[derive(Debug)]
pub struct FlushStep {
    set: Arc<CacheSet>,
    keybuf: DirtyKeyBuf,
    config: WritebackConfig,
}

impl FlushStep {
    #[must_use]
    pub fn new(set: Arc<CacheSet>, config: WritebackConfig) -> Self {
        Self { set, keybuf: DirtyKeyBuf::new(config.keybuf_keys), config }
    }

    /// Writes back one batch; see the type doc.
    pub fn step(&mut self) -> CacheResult<u64> {
        // Keys skipped because they changed under us, or dirty data appearing faster than it
        // is written, can make a batch write nothing: retry a bounded number of times, so a
        // flush that cannot progress fails instead of spinning or claiming it is done.
        let mut last_dirty = u64::MAX;
        let mut stalls = 0;
        loop {
            let dirty = self.set.usage()?.attached_dirty_bytes;
            if dirty == 0 {
                self.set.finish_flush()?;
                return Ok(0);
            }
            let budget = self
                .config
                .max_io_bytes
                .saturating_mul(self.config.batch_keys as u64)
                .clamp(1, FLUSH_BATCH_MAX_BYTES);
            let keys =
                self.keybuf.take_runs(&self.set, self.config.batch_keys, budget, FLUSH_BATCH_MAX_RUNS)?;
            let report =
                self.set.write_back_scanned(&keys, self.keybuf.scanned_seq(), self.config.limits())?;
            if report.bytes_written > 0 {
                return Ok(report.bytes_written);
            }
            if dirty < last_dirty {
                stalls = 0;
            } else {
                stalls += 1;
                if stalls > 1000 {
                    return Err(CacheError::Failed(format!(
                        "flush made no progress with {dirty} dirty bytes left"
                    )));
                }
            }
            last_dirty = dirty;
            std::thread::yield_now();
        }
    }

    /// Runs steps until nothing dirty is left.
    pub fn run_to_end(&mut self) -> CacheResult<u64> {
        let mut total = 0u64;
        loop {
            match self.step()? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }
}
