//! The background writeback thread: copies dirty data home in offset order, at a rate steered
//! toward a dirty target, while foreground I/O keeps priority.
//!
//! - **Key buffer** ([`DirtyKeyBuf`], see [`super::scan`]): dirty keys in (device, offset)
//!   order, re-checked under the writeback range lock before they are written.
//! - **Coalescing**: the keys of one batch that are contiguous on backing are written with one
//!   backing write ([`super::policy::coalesce`]), up to `max_io_bytes`.
//! - **Ordering** (crash rules 4 and 6, kept by [`super::copy`]): commit (if the keys are not
//!   durable yet), read cache, write backing, sync backing, then journal the keys clean with
//!   replace semantics.
//! - **Rate**: a PI controller on the dirty bytes ([`super::policy::RateController`], target
//!   `writeback_percent` of the cache). A batch of `n` bytes at rate `r` is followed by the
//!   next one `n / r` (at most [`MAX_PAUSE`]) after the batch *started*, so the batch's own
//!   I/O time counts toward its share and the rate is met; a batch is at most what the rate
//!   allows in [`RATE_SLICE`], so a low rate writes small batches rather than one big burst.
//! - **Delay**: when dirty data appears in a cache that was clean, writeback waits
//!   `writeback_delay` before it starts (overwrites in that window cost no backing I/O).
//! - **Full speed** — no rate pauses, no delay — while a writeback drain is requested
//!   ([`WritebackThread::request_drain`]), while the share of data buckets holding dirty data is
//!   at or above `urgent_percent`, or right after a write fell back to backing because the cache
//!   was full.
//! - **Foreground priority**: the thread yields between batches; it holds the metadata lock
//!   only to scan, validate and mark keys clean (a chunk of 32 keys per hold, see
//!   [`super::copy`]), and to commit the journal after syncing the cache outside the lock,
//!   never during data I/O.
//! - **Knobs at runtime**: the thread reads its set's tuning ([`WritebackTuning`], a field of
//!   the set: [`CacheSet::writeback_tuning`]) before each decision; the control socket
//!   changes it.
//! - **Shutdown**: [`WritebackThread::stop`] (or drop) signals and joins the thread.
//!
//! An I/O error does not end the thread: it is logged and kept ([`WritebackStatus::last_error`]),
//! and the thread backs off (doubling from 100 ms to 10 s) and tries again: a backing device
//! that comes back is written to again, and dirty data is never dropped.

use super::policy::{RateConfig, RateController};
use super::scan::DirtyKeyBuf;
use super::tuning::{TuningValues, WritebackConfig, WritebackTuning};
use crate::cache::{CacheError, CacheResult, CacheSet};
use crate::dev::SECTOR_SIZE;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest pause after one batch (bcache caps its writeback delay at 2.5 s).
pub const MAX_PAUSE: Duration = Duration::from_millis(2500);
/// A batch holds at most the bytes the current rate allows in this slice of time.
pub const RATE_SLICE: Duration = Duration::from_millis(100);
/// Back-off after a failed batch: first and longest.
const ERROR_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(10);

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
    /// Batches run at full speed (drain requested or cache nearly full).
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
    /// set's tuning ([`CacheSet::writeback_tuning`]); the control socket may change it
    /// afterwards.
    /// If the OS refuses a thread, the error is logged and kept in [`WritebackStatus::last_error`]
    /// and [`WritebackThread::stop`] returns it.
    #[must_use]
    pub fn start(set: Arc<CacheSet>, config: WritebackConfig) -> WritebackThread {
        let tuning = Arc::clone(set.writeback_tuning());
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

    /// Asks for a writeback drain: writes back at full speed until no dirty data is left (then
    /// the request clears itself).
    pub fn request_drain(&self) {
        self.tuning.drain_requested.store(true, Ordering::Release);
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

    /// Waits up to `d`, waking early on stop, a drain request or a knob change.
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
                self.tuning.drain_requested.store(false, Ordering::Release);
                self.tuning.rate.store(0, Ordering::Relaxed);
                if was_dirty {
                    // Everything is home: make the clean keys durable and mark the backing
                    // devices Clean, so a crash now needs no writeback at all.
                    if let Err(e) = self.set.finish_drain() {
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
            let urgent = self.tuning.drain_requested.load(Ordering::Acquire)
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
