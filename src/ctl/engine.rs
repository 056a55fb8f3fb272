//! The cache engine behind the control socket: [`control_target`] maps each
//! [`ctl::ControlTarget`] request onto a [`CacheSet`] and its exports.
//!
//! - **stats**: the engine's counters are copied into a [`ctl::Stats`] (deltas, by a sampler
//!   thread once a second and on every `stats` request), so the rolling windows work; an event
//!   is attributed to the second in which it was sampled. Mapping (engine → ctl):
//!   `read_hits`/`read_misses` count *sectors* (the engine counts sectors, not requests);
//!   `write_cached`; `bypass_mode`, `bypass_sequential`, `bypass_congestion`, `bypass_full`
//!   map one to one from the engine's per-reason counters (requests; each bypassing request
//!   under exactly one reason, see [`crate::cache::StatsSnapshot`]); `readaheads` (NBD CACHE
//!   prefetches that filled the cache); `miss_collisions`, `written_back_bytes`, `buckets_reclaimed`,
//!   `journal_commits`, `checkpoints` map one to one. Gauges come from [`CacheSet::usage`] and
//!   the writeback rate from the set's [`WritebackTuning`].
//! - **set-mode**: leaving writeback with `flush_first` switches first (new writes stop adding
//!   dirty data), then writes every dirty byte home; without it dirty data stays cached.
//! - **knobs**: `sequential_cutoff` acts on the engine at once; `writeback_percent`,
//!   `writeback_delay`, `writeback_rate_min/max` act on the set's writeback thread (through
//!   the shared [`WritebackTuning`]; they are kept and apply when a thread runs).
//!   `replacement_policy` acts on the next reclaim and is stored in the cache superblock;
//!   `congested_read_threshold_us` / `congested_write_threshold_us` act at once on the
//!   engine's congestion bypass. Knobs are per cache set: an `export` argument is checked and
//!   the value applies to the set.
//! - **flush** (the verb; a writeback drain): a [`ctl::FlushRunner`] over [`DrainStep`]
//!   (coalesced batches at full speed).
//! - **detach**: writes the dirty data home, then [`CacheSet::detach`].
//! - **attach**: [`CacheSet::attach`] of a detached export, detached at runtime or before the
//!   server started (empty cache for it).
//! - **export states** (in `stats` and `modes`): [`CachedDev::is_detached`] of each export.

use crate::cache::writeback::{DrainStep, WritebackConfig, WritebackTuning};
use crate::cache::{CacheMode, CacheSet, CachedDev, StatsSnapshot as EngineStats};
use crate::ctl::{
    self, ControlTarget, Counter, CtlError, ExportState, FlushProgress, FlushRunner, Gauge, KnobSetting,
    Knobs, MonotonicClock,
};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the sampler copies engine counters into the rolling windows.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The control target of `set` serving `exports` (name, device).
#[must_use]
pub fn control_target(set: Arc<CacheSet>, exports: Vec<(String, Arc<CachedDev>)>) -> Arc<dyn ControlTarget> {
    Arc::new(EngineControl::new(set, exports))
}

/// Engine counters copied into ctl statistics.
struct Sampler {
    set: Arc<CacheSet>,
    stats: ctl::Stats,
    tuning: Arc<WritebackTuning>,
    /// Engine counters at the last sample.
    last: Mutex<EngineStats>,
}

impl Sampler {
    /// Adds what the engine counted since the last sample and refreshes the gauges.
    fn sample(&self) {
        let now = self.set.stats();
        {
            let mut last = self.last.lock();
            let d = |a: u64, b: u64| a.saturating_sub(b);
            let deltas = [
                (Counter::ReadHits, d(now.read_hits, last.read_hits)),
                (Counter::ReadMisses, d(now.read_misses, last.read_misses)),
                (Counter::WriteCached, d(now.write_cached, last.write_cached)),
                (Counter::BypassMode, d(now.bypass_mode, last.bypass_mode)),
                (Counter::BypassSequential, d(now.bypass_sequential, last.bypass_sequential)),
                (Counter::BypassCongestion, d(now.bypass_congestion, last.bypass_congestion)),
                (Counter::BypassFull, d(now.bypass_full, last.bypass_full)),
                (Counter::Readaheads, d(now.readaheads, last.readaheads)),
                (Counter::MissCollisions, d(now.collisions, last.collisions)),
                (Counter::WrittenBackBytes, d(now.written_back_bytes, last.written_back_bytes)),
                (Counter::BucketsReclaimed, d(now.buckets_reclaimed, last.buckets_reclaimed)),
                (Counter::JournalCommits, d(now.journal_commits, last.journal_commits)),
                (Counter::Checkpoints, d(now.checkpoints, last.checkpoints)),
            ];
            for (c, n) in deltas {
                if n > 0 {
                    self.stats.add(c, n);
                }
            }
            *last = now;
        }
        match self.set.usage() {
            Ok(u) => {
                let s = &self.stats;
                s.set_gauge(Gauge::DirtyBytes, u.dirty_bytes);
                s.set_gauge(Gauge::BucketsFree, u.buckets_free);
                s.set_gauge(Gauge::BucketsClean, u.buckets_clean);
                s.set_gauge(Gauge::BucketsDirty, u.buckets_dirty);
                s.set_gauge(Gauge::BucketsMetadata, u.buckets_metadata);
                s.set_gauge(Gauge::BucketBytes, u.bucket_bytes);
                s.set_gauge(Gauge::JournalUsedBytes, u.journal_used_bytes);
                s.set_gauge(Gauge::JournalCapacityBytes, u.journal_capacity_bytes);
            }
            Err(e) => log::warn!("stats: cannot read cache usage: {e}"),
        }
        self.stats.set_gauge(Gauge::WritebackRate, self.tuning.rate());
    }
}

#[derive(Default)]
struct StopFlag {
    stop: Mutex<bool>,
    wake: Condvar,
}

struct EngineControl {
    set: Arc<CacheSet>,
    exports: Vec<(String, Arc<CachedDev>)>,
    knobs: Mutex<Knobs>,
    tuning: Arc<WritebackTuning>,
    sampler: Arc<Sampler>,
    flush: FlushRunner,
    stop: Arc<StopFlag>,
    sampler_thread: Option<JoinHandle<()>>,
}

fn failed(e: impl std::fmt::Display) -> CtlError {
    CtlError::Failed(e.to_string())
}

impl EngineControl {
    fn new(set: Arc<CacheSet>, exports: Vec<(String, Arc<CachedDev>)>) -> Self {
        let tuning = Arc::clone(set.writeback_tuning());
        let v = tuning.values();
        let knobs = Knobs {
            sequential_cutoff: set.sequential_cutoff(),
            writeback_percent: v.writeback_percent,
            writeback_delay_secs: v.writeback_delay.as_secs(),
            writeback_rate_min: v.min_rate,
            writeback_rate_max: v.max_rate,
            replacement_policy: set.replacement_policy(),
            congested_read_threshold_us: set.congestion().read_threshold_us,
            congested_write_threshold_us: set.congestion().write_threshold_us,
        };
        let sampler = Arc::new(Sampler {
            set: Arc::clone(&set),
            stats: ctl::Stats::new(),
            tuning: Arc::clone(&tuning),
            last: Mutex::new(EngineStats::default()),
        });
        sampler.sample();
        let dirty_set = Arc::clone(&set);
        let flush = FlushRunner::new(
            Arc::new(MonotonicClock::new()),
            Box::new(move || dirty_set.usage().map(|u| u.attached_dirty_bytes).unwrap_or(0)),
        );
        let stop = Arc::new(StopFlag::default());
        let thread_stop = Arc::clone(&stop);
        let thread_sampler = Arc::clone(&sampler);
        let sampler_thread = std::thread::Builder::new()
            .name("ubcache-ctl-stats".into())
            .spawn(move || {
                loop {
                    let mut stop = thread_stop.stop.lock();
                    if *stop {
                        return;
                    }
                    thread_stop.wake.wait_for(&mut stop, SAMPLE_INTERVAL);
                    if *stop {
                        return;
                    }
                    drop(stop);
                    thread_sampler.sample();
                }
            })
            .map_err(|e| log::warn!("stats sampler thread not started ({e}): windows update on `stats` only"))
            .ok();
        EngineControl { set, exports, knobs: Mutex::new(knobs), tuning, sampler, flush, stop, sampler_thread }
    }

    /// The exports a request names: one by name, or all for `None`.
    fn select(&self, export: Option<&str>) -> Result<Vec<&(String, Arc<CachedDev>)>, CtlError> {
        match export {
            None => Ok(self.exports.iter().collect()),
            Some(name) => match self.exports.iter().find(|(n, _)| n == name) {
                Some(e) => Ok(vec![e]),
                None => Err(CtlError::NotFound(format!("no export named {name:?}"))),
            },
        }
    }

    /// Writeback drain: writes every dirty byte home (coalesced batches, full speed), then marks
    /// the backing devices Clean.
    fn drain(&self) -> Result<(), CtlError> {
        DrainStep::new(Arc::clone(&self.set), WritebackConfig::for_drain())
            .run_to_end()
            .map(drop)
            .map_err(failed)
    }
}

impl Drop for EngineControl {
    fn drop(&mut self) {
        *self.stop.stop.lock() = true;
        self.stop.wake.notify_all();
        if let Some(h) = self.sampler_thread.take() {
            if h.join().is_err() {
                log::error!("stats sampler thread panicked");
            }
        }
    }
}

impl ControlTarget for EngineControl {
    fn stats(&self) -> ctl::StatsSnapshot {
        self.sampler.sample();
        self.sampler.stats.snapshot()
    }

    fn set_mode(&self, export: Option<&str>, mode: CacheMode, flush_first: bool) -> Result<(), CtlError> {
        let targets = self.select(export)?;
        let mut leaving_writeback = false;
        for (name, dev) in &targets {
            if dev.is_detached() {
                return Err(CtlError::Invalid(format!("export {name:?} is detached")));
            }
        }
        for (name, dev) in &targets {
            leaving_writeback |= dev.mode() == CacheMode::Writeback && mode != CacheMode::Writeback;
            // The mode first, without draining: writes arriving during the drain below no
            // longer add dirty data, so it ends even under a steady write load.
            dev.set_mode(mode, false).map_err(|e| CtlError::Failed(format!("export {name:?}: {e}")))?;
        }
        if flush_first && leaving_writeback {
            self.drain()?;
        }
        Ok(())
    }

    fn modes(&self) -> Vec<(String, CacheMode)> {
        self.exports.iter().map(|(n, d)| (n.clone(), d.mode())).collect()
    }

    fn export_states(&self) -> Vec<(String, ExportState)> {
        self.exports
            .iter()
            .map(|(n, d)| {
                (n.clone(), if d.is_detached() { ExportState::Detached } else { ExportState::Attached })
            })
            .collect()
    }

    fn set_knob(&self, export: Option<&str>, setting: KnobSetting) -> Result<(), CtlError> {
        self.select(export)?;
        let mut knobs = self.knobs.lock();
        // Cross-knob rules (rate min <= max) before anything acts.
        let mut next = *knobs;
        next.apply(setting)?;
        match setting {
            KnobSetting::SequentialCutoff(v) => self.set.set_sequential_cutoff(v),
            KnobSetting::WritebackPercent(v) => self.tuning.update(|t| t.writeback_percent = v),
            KnobSetting::WritebackDelay(v) => {
                self.tuning.update(|t| t.writeback_delay = Duration::from_secs(v));
            }
            KnobSetting::WritebackRateMin(v) => self.tuning.update(|t| t.min_rate = v),
            KnobSetting::WritebackRateMax(v) => self.tuning.update(|t| t.max_rate = v),
            KnobSetting::ReplacementPolicy(p) => {
                self.set.set_replacement_policy(p).map_err(|e| failed(format!("replacement_policy: {e}")))?;
            }
            KnobSetting::CongestedReadThresholdUs(v) => self.set.set_congestion_thresholds(Some(v), None),
            KnobSetting::CongestedWriteThresholdUs(v) => self.set.set_congestion_thresholds(None, Some(v)),
        }
        *knobs = next;
        Ok(())
    }

    fn knobs(&self, export: Option<&str>) -> Result<Vec<(String, String)>, CtlError> {
        self.select(export)?;
        let mut knobs = *self.knobs.lock();
        // What acts now, in case a writeback thread started later with its own config.
        knobs.sequential_cutoff = self.set.sequential_cutoff();
        let v = self.tuning.values();
        knobs.writeback_percent = v.writeback_percent;
        knobs.writeback_delay_secs = v.writeback_delay.as_secs();
        knobs.writeback_rate_min = v.min_rate;
        knobs.writeback_rate_max = v.max_rate;
        knobs.replacement_policy = self.set.replacement_policy();
        let congestion = self.set.congestion();
        knobs.congested_read_threshold_us = congestion.read_threshold_us;
        knobs.congested_write_threshold_us = congestion.write_threshold_us;
        Ok(knobs.list())
    }

    fn start_flush(&self) -> Result<(), CtlError> {
        let mut step = DrainStep::new(Arc::clone(&self.set), WritebackConfig::for_drain());
        self.flush.start(move || step.step().map_err(|e| e.to_string()))
    }

    fn flush_progress(&self) -> FlushProgress {
        self.flush.progress()
    }

    fn cancel_flush(&self) {
        self.flush.cancel();
    }

    fn detach(&self, export: &str) -> Result<(), CtlError> {
        let (name, dev) = self.select(Some(export))?[0];
        if dev.is_detached() {
            return Err(CtlError::Invalid(format!("export {name:?} is already detached")));
        }
        // Most dirty data goes home here with coalesced writes while the export still serves;
        // `detach` then holds new requests, writes back whatever arrived meanwhile, and from
        // then on the export is served straight from the backing device.
        self.drain()?;
        self.set.detach(dev.dev_id()).map_err(|e| CtlError::Failed(format!("detach {name:?}: {e}")))
    }

    /// Attaches a detached export (detached at runtime, or already detached when the server
    /// started): its backing superblock names this cache set and it is served through the
    /// cache, starting with an empty cache for it.
    fn attach(&self, export: &str) -> Result<(), CtlError> {
        let (name, dev) = self.select(Some(export))?[0];
        if !dev.is_detached() {
            return Err(CtlError::Invalid(format!("export {name:?} is attached")));
        }
        self.set.attach(dev.dev_id()).map_err(|e| CtlError::Failed(format!("attach {name:?}: {e}")))
    }
}
