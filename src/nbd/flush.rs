//! Coalesced device syncs for FLUSH (and FUA trims and zeroings), off the runtime's workers.
//!
//! An `fdatasync` takes milliseconds. Run in a request task it holds one of the few runtime
//! workers for that long, and flushes queue behind each other. Here a sync runs on tokio's
//! blocking pool, one at a time per export, and the request that asked for it merely awaits it.
//!
//! # Correctness: which sync may answer which FLUSH
//! A FLUSH must be answered only after a sync that *started after* every write that completed
//! before the FLUSH was received: a sync that was already running may have missed such a write.
//! Syncs are numbered in the order they start. A flush takes the ticket `started + 1` (the number
//! of the next sync that has not started yet) under the state lock, after all the writes it
//! covers have returned from the device, and waits until a sync numbered `ticket` or higher has
//! completed. Every flush that arrives while sync `n` runs gets ticket `n + 1`, so all of them
//! share that one next sync: under a flush-heavy load the device sees at most one sync running
//! and one queued, however many flushes wait.
//!
//! One sync at a time, not several in parallel: on Linux a writeback error is reported to only
//! one of the concurrent `fsync` calls on a file, so a sync running beside a failing one could
//! return success for writes whose pages the failure dropped. Run in order, a sync after a failed
//! one fails too (the device makes sync failures sticky, as `FileDev` does).
//!
//! # Errors
//! A flush fails when any sync numbered `ticket` or later up to the one it observes failed: a
//! device may have dropped dirty data on the failed sync (Linux does after a failed `fsync`), so
//! a later success proves nothing about the earlier writes.

use super::proto::errno;
use crate::dev::BlockDev;
use std::sync::Arc;
use tokio::sync::watch;

/// One export's sync sequencer. Shared by every connection to the export: a sync covers every
/// completed write of the device, whichever connection sent it (see MULTI_CONN in the server).
#[derive(Debug)]
pub(crate) struct SyncCoalescer {
    state: parking_lot::Mutex<SyncState>,
    done: watch::Sender<SyncDone>,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Syncs started so far; the running one, if any, is number `started`.
    started: u64,
    /// The highest ticket anyone waits for; the driver runs syncs until `started` reaches it.
    wanted: u64,
    /// Whether a driver is running (or about to) on the blocking pool.
    driver_running: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct SyncDone {
    /// The number of the last sync that completed (syncs complete in order).
    completed: u64,
    /// The number of the last sync that failed, 0 if none did.
    last_failed: u64,
    /// The NBD errno of that failure.
    last_errno: u32,
}

impl Default for SyncCoalescer {
    fn default() -> Self {
        Self {
            state: parking_lot::Mutex::new(SyncState::default()),
            done: watch::Sender::new(SyncDone::default()),
        }
    }
}

impl SyncCoalescer {
    /// Returns once a sync of `dev` that started after this call has completed: `Ok`, or the
    /// NBD errno of a failed sync. `dev` must be the device this coalescer belongs to.
    pub(crate) async fn sync(self: &Arc<Self>, dev: &Arc<dyn BlockDev>) -> Result<(), u32> {
        // Subscribed before the ticket is taken, so no completion can be missed.
        let mut done_rx = self.done.subscribe();
        let ticket = {
            let mut state = self.state.lock();
            let ticket = state.started + 1;
            state.wanted = state.wanted.max(ticket);
            if !state.driver_running {
                state.driver_running = true;
                let (this, dev) = (self.clone(), dev.clone());
                drop(tokio::task::spawn_blocking(move || this.drive(&*dev)));
            }
            ticket
        };
        // The sender lives in `self`, so the channel cannot close while we wait.
        let done = match done_rx.wait_for(|d| d.completed >= ticket).await {
            Ok(d) => *d,
            Err(_) => return Err(errno::EIO),
        };
        if done.last_failed >= ticket { Err(done.last_errno) } else { Ok(()) }
    }

    /// Runs syncs one after the other until nobody waits for a later one.
    fn drive(&self, dev: &dyn BlockDev) {
        // Should the device panic, the guard still answers the waiters (with EIO) and lets a
        // later flush start a new driver, instead of leaving every flush waiting forever.
        let mut guard = DriverGuard { coalescer: self, running: None };
        loop {
            let number = {
                let mut state = self.state.lock();
                if state.started >= state.wanted {
                    state.driver_running = false;
                    return;
                }
                state.started += 1;
                state.started
            };
            guard.running = Some(number);
            let result = dev.sync();
            guard.running = None;
            if let Err(e) = &result {
                log::error!("nbd: device sync failed: {e}");
            }
            self.finish(number, result.err().map(|e| e.nbd_errno()));
        }
    }

    fn finish(&self, number: u64, failure: Option<u32>) {
        self.done.send_modify(|d| {
            d.completed = number;
            if let Some(errno) = failure {
                d.last_failed = number;
                d.last_errno = errno;
            }
        });
    }
}

/// Cleans up after a device `sync` that panicked (see [`SyncCoalescer::drive`]).
struct DriverGuard<'a> {
    coalescer: &'a SyncCoalescer,
    running: Option<u64>,
}

impl Drop for DriverGuard<'_> {
    fn drop(&mut self) {
        if let Some(number) = self.running {
            self.coalescer.finish(number, Some(errno::EIO));
            self.coalescer.state.lock().driver_running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{DevError, DevResult, MemDev};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    /// Records, on one clock, when each write returned and when each sync started; syncs are
    /// slow so that flushes pile up behind a running one.
    #[derive(Debug, Default)]
    struct Recorder {
        clock: AtomicU64,
        sync_starts: parking_lot::Mutex<Vec<u64>>,
        fail_syncs: AtomicBool,
    }

    impl BlockDev for Recorder {
        fn len(&self) -> u64 {
            4096
        }
        fn read_at(&self, _buf: &mut [u8], _offset: u64) -> DevResult<()> {
            Ok(())
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> DevResult<()> {
            Ok(())
        }
        fn capabilities(&self) -> crate::dev::DevCaps<'_> {
            crate::dev::DevCaps::default()
        }
        fn sync(&self) -> DevResult<()> {
            let now = self.clock.fetch_add(1, Ordering::SeqCst);
            self.sync_starts.lock().push(now);
            std::thread::sleep(Duration::from_millis(5));
            if self.fail_syncs.load(Ordering::SeqCst) {
                return Err(DevError::Io {
                    op: "sync",
                    offset: 0,
                    len: 0,
                    source: std::io::Error::other("x"),
                });
            }
            Ok(())
        }
    }

    /// Guards against a flush being answered by a sync that was already running when the
    /// flush's writes completed (which would acknowledge data that is not durable).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_flush_waits_for_a_sync_that_started_after_its_writes() {
        let rec = Arc::new(Recorder::default());
        let dev: Arc<dyn BlockDev> = rec.clone();
        let coalescer = Arc::new(SyncCoalescer::default());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let (rec, dev, coalescer) = (rec.clone(), dev.clone(), coalescer.clone());
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_micros(300 * (i % 16))).await;
                // The "write" completes here, then the flush asks for a sync.
                let write_done = rec.clock.fetch_add(1, Ordering::SeqCst);
                coalescer.sync(&dev).await.unwrap();
                let replied = rec.clock.fetch_add(1, Ordering::SeqCst);
                (write_done, replied)
            });
        }
        let mut results = Vec::new();
        while let Some(r) = tasks.join_next().await {
            results.push(r.unwrap());
        }
        let starts = rec.sync_starts.lock().clone();
        for (write_done, replied) in results {
            assert!(
                starts.iter().any(|&s| s > write_done && s < replied),
                "flush after write at {write_done} answered at {replied} without a sync started in between: {starts:?}"
            );
        }
        // 64 flushes over ~5 ms of arrivals against 5 ms syncs: they must have been shared.
        assert!(starts.len() < 32, "{} syncs for 64 flushes: not coalesced", starts.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_fails_the_flushes_waiting_for_it_and_later_ones_recover() {
        let rec = Arc::new(Recorder::default());
        let dev: Arc<dyn BlockDev> = rec.clone();
        let coalescer = Arc::new(SyncCoalescer::default());
        rec.fail_syncs.store(true, Ordering::SeqCst);
        assert_eq!(coalescer.sync(&dev).await, Err(errno::EIO));
        rec.fail_syncs.store(false, Ordering::SeqCst);
        assert_eq!(coalescer.sync(&dev).await, Ok(()));
        // A real device: the coalescer works with any BlockDev.
        let mem: Arc<dyn BlockDev> = Arc::new(MemDev::new(4096));
        assert_eq!(Arc::new(SyncCoalescer::default()).sync(&mem).await, Ok(()));
    }
}
