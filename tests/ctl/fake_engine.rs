//! A fake engine behind the control plane, for the `ctl_*` tests: it keeps knobs, modes and a
//! flush that advances one step per progress query, and records what it was asked.

use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use ubcache::ctl::{
    CacheMode, ControlTarget, CtlError, FlushProgress, FlushState, KnobSetting, Knobs, ManualClock, Stats,
    StatsSnapshot,
};

#[derive(Debug)]
pub struct FakeFlush {
    pub state: FlushState,
    pub left: u64,
    pub done: u64,
}

#[derive(Debug)]
pub struct FakeEngine {
    /// Stats on a clock that never moves, so rates and windows are deterministic.
    pub stats: Stats,
    pub knobs: Mutex<Knobs>,
    pub modes: Mutex<BTreeMap<String, CacheMode>>,
    pub attached: Mutex<BTreeMap<String, bool>>,
    pub flush: Mutex<FakeFlush>,
    /// Bytes one progress query writes back.
    pub flush_step: u64,
    /// When set, a running flush ends in this state at the next progress query.
    pub end_flush_as: Mutex<Option<FlushState>>,
    /// Every set-mode call: (export, mode, flush_first).
    pub mode_calls: Mutex<Vec<(Option<String>, CacheMode, bool)>>,
    /// While true, set-mode blocks (holding its client thread) until `release_set_mode`.
    pub hold_set_mode: Mutex<bool>,
    pub set_mode_released: Condvar,
    /// A set-mode call has entered the engine.
    pub set_mode_entered: AtomicBool,
}

impl FakeEngine {
    pub fn new(exports: &[&str], dirty: u64) -> Arc<FakeEngine> {
        Arc::new(FakeEngine {
            stats: Stats::with_clock(Arc::new(ManualClock::new(Duration::ZERO))),
            knobs: Mutex::new(Knobs::default()),
            modes: Mutex::new(exports.iter().map(|e| ((*e).to_owned(), CacheMode::Writethrough)).collect()),
            attached: Mutex::new(exports.iter().map(|e| ((*e).to_owned(), true)).collect()),
            flush: Mutex::new(FakeFlush { state: FlushState::Idle, left: dirty, done: 0 }),
            flush_step: 1 << 20,
            end_flush_as: Mutex::new(None),
            mode_calls: Mutex::new(Vec::new()),
            hold_set_mode: Mutex::new(false),
            set_mode_released: Condvar::new(),
            set_mode_entered: AtomicBool::new(false),
        })
    }

    pub fn release_set_mode(&self) {
        *self.hold_set_mode.lock() = false;
        self.set_mode_released.notify_all();
    }

    fn check_export(&self, export: Option<&str>) -> Result<(), CtlError> {
        match export {
            Some(e) if !self.modes.lock().contains_key(e) => {
                Err(CtlError::NotFound(format!("no export {e:?}")))
            }
            _ => Ok(()),
        }
    }
}

impl ControlTarget for FakeEngine {
    fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    fn set_mode(&self, export: Option<&str>, mode: CacheMode, flush_first: bool) -> Result<(), CtlError> {
        self.check_export(export)?;
        self.set_mode_entered.store(true, Ordering::SeqCst);
        {
            let mut hold = self.hold_set_mode.lock();
            // Bounded: a test that forgets to release fails instead of hanging.
            let deadline = Instant::now() + Duration::from_secs(30);
            while *hold && Instant::now() < deadline {
                self.set_mode_released.wait_until(&mut hold, deadline);
            }
        }
        self.mode_calls.lock().push((export.map(str::to_owned), mode, flush_first));
        let mut modes = self.modes.lock();
        for (name, m) in modes.iter_mut() {
            if export.is_none_or(|e| e == name) {
                *m = mode;
            }
        }
        Ok(())
    }

    fn modes(&self) -> Vec<(String, CacheMode)> {
        self.modes.lock().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn set_knob(&self, export: Option<&str>, setting: KnobSetting) -> Result<(), CtlError> {
        self.check_export(export)?;
        self.knobs.lock().apply(setting)?;
        Ok(())
    }

    fn knobs(&self, export: Option<&str>) -> Result<Vec<(String, String)>, CtlError> {
        self.check_export(export)?;
        Ok(self.knobs.lock().list())
    }

    fn start_flush(&self) -> Result<(), CtlError> {
        let mut f = self.flush.lock();
        if f.state == FlushState::Running {
            return Err(CtlError::Busy("a flush is already running".to_owned()));
        }
        f.state = if f.left == 0 { FlushState::Done } else { FlushState::Running };
        f.done = 0;
        Ok(())
    }

    fn flush_progress(&self) -> FlushProgress {
        let mut f = self.flush.lock();
        if let (FlushState::Running, Some(end)) = (f.state, *self.end_flush_as.lock()) {
            f.state = end;
        }
        if f.state == FlushState::Running {
            let step = f.left.min(self.flush_step);
            f.left -= step;
            f.done += step;
            if f.left == 0 {
                f.state = FlushState::Done;
            }
        }
        FlushProgress {
            state: f.state,
            dirty_bytes_left: f.left,
            bytes_done: f.done,
            rate_bytes_per_sec: self.flush_step,
        }
    }

    fn cancel_flush(&self) {
        let mut f = self.flush.lock();
        if f.state == FlushState::Running {
            f.state = FlushState::Cancelled;
        }
    }

    fn detach(&self, export: &str) -> Result<(), CtlError> {
        match self.attached.lock().get_mut(export) {
            None => Err(CtlError::NotFound(format!("no export {export:?}"))),
            Some(false) => Err(CtlError::Invalid(format!("{export} is already detached"))),
            Some(a) => {
                *a = false;
                Ok(())
            }
        }
    }

    fn attach(&self, export: &str) -> Result<(), CtlError> {
        match self.attached.lock().get_mut(export) {
            None => Err(CtlError::NotFound(format!("no export {export:?}"))),
            Some(true) => Err(CtlError::Invalid(format!("{export} is already attached"))),
            Some(a) => {
                *a = true;
                Ok(())
            }
        }
    }
}
