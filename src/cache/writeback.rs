//! Background writeback: a thread that copies dirty data home toward a dirty target, with a stop
//! signal and a join (nothing is left running on shutdown).
//!
//! The pace is a pure function of the dirty amount ([`writeback_pace`]), like bcache's
//! `writeback_percent` controller reduced to its proportional part: above the target it writes
//! back as fast as it can, below it it trickles (so an idle cache still drains slowly and a
//! crash leaves little dirty data), at zero dirty it sleeps.

use super::error::CacheResult;
use super::set::CacheSet;
use crate::dev::SECTOR_SIZE;
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Tuning of the writeback thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackConfig {
    /// Dirty data the thread lets stand, as a percentage of the cache's data capacity (bcache's
    /// `writeback_percent`, default 10).
    pub target_percent: u8,
    /// Keys written back per step when above the target.
    pub burst_keys: usize,
    /// Keys per step when below the target.
    pub trickle_keys: usize,
    /// Pause between trickle steps, and the idle poll interval.
    pub interval: Duration,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        Self { target_percent: 10, burst_keys: 64, trickle_keys: 4, interval: Duration::from_millis(100) }
    }
}

/// What the thread does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Keys to write back now (0: none).
    pub keys: usize,
    /// How long to wait before the next decision.
    pub pause: Duration,
}

/// The writeback pace for `dirty_bytes` of dirty data against `target_bytes`. Pure.
#[must_use]
pub fn writeback_pace(dirty_bytes: u64, target_bytes: u64, cfg: &WritebackConfig) -> Pace {
    if dirty_bytes == 0 {
        Pace { keys: 0, pause: cfg.interval }
    } else if dirty_bytes > target_bytes {
        Pace { keys: cfg.burst_keys.max(1), pause: Duration::ZERO }
    } else {
        Pace { keys: cfg.trickle_keys.max(1), pause: cfg.interval }
    }
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
    pub fn start(set: &CacheSet, cfg: WritebackConfig) -> std::io::Result<WritebackThread> {
        let signal = Arc::new(StopSignal::default());
        let set = set.clone();
        let sig = Arc::clone(&signal);
        let capacity = set.data_capacity_bytes();
        let target = capacity / 100 * u64::from(cfg.target_percent.min(100));
        let handle = std::thread::Builder::new().name("ubcache-writeback".into()).spawn(move || {
            loop {
                if *sig.stop.lock() {
                    return Ok(());
                }
                let dirty = set.stats().dirty_bytes;
                let pace = writeback_pace(dirty, target, &cfg);
                if pace.keys > 0 {
                    // An error (e.g. the backing device fails) ends the thread; `stop` returns it.
                    set.writeback_step(pace.keys)?;
                }
                if !pace.pause.is_zero() {
                    let mut stop = sig.stop.lock();
                    if !*stop {
                        sig.wake.wait_for(&mut stop, pace.pause);
                    }
                }
            }
        })?;
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
            Some(Err(_)) => Err(super::CacheError::Failed("writeback thread panicked".into())),
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
    fn pace_bursts_above_target_trickles_below_and_idles_when_clean() {
        let cfg = WritebackConfig::default();
        assert_eq!(writeback_pace(0, 100, &cfg), Pace { keys: 0, pause: cfg.interval });
        assert_eq!(writeback_pace(101, 100, &cfg), Pace { keys: cfg.burst_keys, pause: Duration::ZERO });
        assert_eq!(writeback_pace(50, 100, &cfg), Pace { keys: cfg.trickle_keys, pause: cfg.interval });
        let zero = WritebackConfig { burst_keys: 0, trickle_keys: 0, ..cfg };
        assert_eq!(writeback_pace(5, 0, &zero).keys, 1, "never a step of zero keys while dirty");
    }
}
