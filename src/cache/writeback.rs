//! Background writeback: a thread that copies dirty data home at the rate the PI controller of
//! [`crate::wbpolicy::RateController`] (bcache's `writeback_percent` controller) asks for, with
//! a stop signal and a join (nothing is left running on shutdown).
//!
//! Every `interval` the thread updates the controller with the dirty byte count and writes back
//! `rate x interval` bytes (whole keys, in offset order, via [`CacheSet::writeback_step`]); at
//! zero dirty data it only sleeps.

use super::error::{CacheError, CacheResult};
use super::set::CacheSet;
use crate::dev::SECTOR_SIZE;
use crate::wbpolicy::{RateConfig, RateController};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Tuning of the writeback thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackConfig {
    /// Controller tuning; `cache_bytes` is filled in from the cache set when the thread starts.
    pub rate: RateConfig,
    /// Keys per [`CacheSet::writeback_step`] call.
    pub keys_per_step: usize,
    /// Controller update period (bcache updates every 5 s; shorter here so small budgets are
    /// spread out).
    pub interval: Duration,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        Self {
            rate: RateConfig::with_cache_bytes(0),
            keys_per_step: 16,
            interval: Duration::from_millis(100),
        }
    }
}

/// Bytes to write back in one tick of `interval` at `rate` bytes per second (at least one
/// sector, so a tiny rate still makes progress). Pure.
#[must_use]
pub fn tick_budget(rate: u64, interval: Duration) -> u64 {
    ((rate as f64 * interval.as_secs_f64()) as u64).max(SECTOR_SIZE)
}

#[derive(Debug, Default)]
struct StopSignal {
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A running writeback thread; [`WritebackThread::stop`] ends and joins it (dropping it does too).
#[derive(Debug)]
pub struct WritebackThread {
    signal: Arc<StopSignal>,
    handle: Option<JoinHandle<CacheResult<()>>>,
}

impl WritebackThread {
    /// Starts writing back dirty data of `set` in the background.
    pub fn start(set: &CacheSet, cfg: WritebackConfig) -> CacheResult<WritebackThread> {
        let rate_cfg = RateConfig { cache_bytes: set.data_capacity_bytes(), ..cfg.rate };
        let mut controller = RateController::new(rate_cfg).map_err(|e| CacheError::Invalid(e.to_string()))?;
        let signal = Arc::new(StopSignal::default());
        let set = set.clone();
        let sig = Arc::clone(&signal);
        let started = Instant::now();
        let handle = std::thread::Builder::new()
            .name("ubcache-writeback".into())
            .spawn(move || {
                loop {
                    let tick = Instant::now();
                    let dirty = set.stats().dirty_bytes;
                    let rate = controller.update(dirty, started.elapsed());
                    if dirty > 0 {
                        let budget = tick_budget(rate, cfg.interval);
                        let before = set.stats().written_back_bytes;
                        while set.stats().written_back_bytes - before < budget && !*sig.stop.lock() {
                            // An error (e.g. the backing device fails) ends the thread; `stop`
                            // returns it.
                            if set.writeback_step(cfg.keys_per_step.max(1))? == 0 {
                                break;
                            }
                        }
                    }
                    let mut stop = sig.stop.lock();
                    if *stop {
                        return Ok(());
                    }
                    let left = cfg.interval.saturating_sub(tick.elapsed());
                    if !left.is_zero() {
                        sig.wake.wait_for(&mut stop, left);
                    }
                    if *stop {
                        return Ok(());
                    }
                }
            })
            .map_err(|e| CacheError::Invalid(format!("cannot start the writeback thread: {e}")))?;
        Ok(WritebackThread { signal, handle: Some(handle) })
    }

    /// Signals the thread to stop, waits for it, and returns the error that ended it, if any.
    pub fn stop(mut self) -> CacheResult<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> CacheResult<()> {
        *self.signal.stop.lock() = true;
        self.signal.wake.notify_all();
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(CacheError::Failed("writeback thread panicked".into())),
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

impl CacheSet {
    /// Bytes of the cache device that can hold data (buckets outside the fixed metadata).
    #[must_use]
    pub fn data_capacity_bytes(&self) -> u64 {
        let g = &self.shared.geometry;
        g.nbuckets.saturating_sub(g.first_free_bucket()) * u64::from(g.bucket_sectors) * SECTOR_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_budget_scales_with_rate_and_never_stalls() {
        assert_eq!(tick_budget(1 << 20, Duration::from_millis(100)), 104_857);
        assert_eq!(tick_budget(0, Duration::from_millis(100)), SECTOR_SIZE);
        assert_eq!(tick_budget(4096, Duration::from_secs(5)), 20480);
    }
}
