//! Runs the `flush` verb - a writeback drain: every dirty byte written home; not the NBD FLUSH,
//! the durability barrier - on a background thread and reports progress, so
//! an engine's [`super::ControlTarget::start_flush`], `flush_progress` and `cancel_flush` are
//! three one-line delegations.
//!
//! The engine supplies the work as a step function: each call writes some dirty data home
//! (the engine's own writeback step, with its ordering rules: write backing, sync backing,
//! journal the key clean) and returns how many bytes it wrote; `Ok(0)` means nothing dirty is
//! left. The runner loops until then, or until cancelled or a step fails, and computes the rate
//! as bytes done over elapsed time on an injected [`Clock`].

use super::stats::Clock;
use super::{CtlError, FlushProgress, FlushState};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

#[derive(Debug)]
struct Shared {
    state: FlushState,
    bytes_done: u64,
    started: Duration,
    finished: Option<Duration>,
    last_error: Option<String>,
}

/// Runs at most one flush at a time. Dropping it cancels and joins a running flush.
pub struct FlushRunner {
    clock: Arc<dyn Clock>,
    shared: Arc<Mutex<Shared>>,
    cancel: Arc<AtomicBool>,
    /// Reads the engine's dirty byte count for progress.
    dirty_bytes: Box<dyn Fn() -> u64 + Send + Sync>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for FlushRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushRunner").field("shared", &*self.shared.lock()).finish_non_exhaustive()
    }
}

impl FlushRunner {
    /// A runner with no flush started; `dirty_bytes` reads the engine's dirty byte count.
    #[must_use]
    pub fn new(clock: Arc<dyn Clock>, dirty_bytes: Box<dyn Fn() -> u64 + Send + Sync>) -> FlushRunner {
        let now = clock.now();
        FlushRunner {
            clock,
            shared: Arc::new(Mutex::new(Shared {
                state: FlushState::Idle,
                bytes_done: 0,
                started: now,
                finished: None,
                last_error: None,
            })),
            cancel: Arc::new(AtomicBool::new(false)),
            dirty_bytes,
            thread: Mutex::new(None),
        }
    }

    /// Starts flushing on a new thread, calling `step` until it returns `Ok(0)` (done), an
    /// error (failed) or the flush is cancelled; returns at once.
    ///
    /// # Errors
    /// [`CtlError::Busy`] if a flush is running; [`CtlError::Io`] if the thread cannot start.
    pub fn start(
        &self,
        mut step: impl FnMut() -> Result<u64, String> + Send + 'static,
    ) -> Result<(), CtlError> {
        let mut thread_slot = self.thread.lock();
        if thread_slot.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(CtlError::Busy("a flush is already running".to_owned()));
        }
        if let Some(old) = thread_slot.take() {
            if old.join().is_err() {
                log::error!("previous flush thread panicked");
            }
        }
        self.cancel.store(false, Ordering::SeqCst);
        {
            let mut s = self.shared.lock();
            s.state = FlushState::Running;
            s.bytes_done = 0;
            s.started = self.clock.now();
            s.finished = None;
            s.last_error = None;
        }
        let shared = Arc::clone(&self.shared);
        let cancel = Arc::clone(&self.cancel);
        let clock = Arc::clone(&self.clock);
        let handle = thread::Builder::new()
            .name("ubcache-flush".to_owned())
            .spawn(move || {
                let end = loop {
                    if cancel.load(Ordering::SeqCst) {
                        break FlushState::Cancelled;
                    }
                    match step() {
                        Ok(0) => break FlushState::Done,
                        Ok(bytes) => {
                            let mut s = shared.lock();
                            s.bytes_done = s.bytes_done.saturating_add(bytes);
                        }
                        Err(e) => {
                            log::error!("flush failed: {e}");
                            shared.lock().last_error = Some(e);
                            break FlushState::Failed;
                        }
                    }
                };
                let mut s = shared.lock();
                s.state = end;
                s.finished = Some(clock.now());
            })
            .map_err(|e| {
                self.shared.lock().state = FlushState::Failed;
                CtlError::io("spawn flush thread", e)
            })?;
        *thread_slot = Some(handle);
        Ok(())
    }

    /// Where the flush stands; dirty bytes are the engine's count now.
    #[must_use]
    pub fn progress(&self) -> FlushProgress {
        let dirty = (self.dirty_bytes)();
        let s = self.shared.lock();
        let end = s.finished.unwrap_or_else(|| self.clock.now());
        let elapsed = end.saturating_sub(s.started).as_secs_f64();
        let rate = if s.state == FlushState::Idle || elapsed <= 0.0 {
            0
        } else {
            (s.bytes_done as f64 / elapsed) as u64
        };
        FlushProgress {
            state: s.state,
            // Always the count now: after a Done flush new writes may have dirtied data again.
            dirty_bytes_left: dirty,
            bytes_done: s.bytes_done,
            rate_bytes_per_sec: rate,
        }
    }

    /// Asks a running flush to stop after its current step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Waits for the running flush (if any) to end and returns the final progress.
    pub fn wait(&self) -> FlushProgress {
        if let Some(handle) = self.thread.lock().take() {
            if handle.join().is_err() {
                log::error!("flush thread panicked");
                let mut s = self.shared.lock();
                s.state = FlushState::Failed;
                s.last_error = Some("flush thread panicked".to_owned());
            }
        }
        self.progress()
    }

    /// The error that ended the last failed flush.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.shared.lock().last_error.clone()
    }
}

impl Drop for FlushRunner {
    fn drop(&mut self) {
        self.cancel();
        let _ = self.wait();
    }
}
