//! `ubcache mark` on the control socket: a [`ControlTarget`] that places marks in the recording
//! logs and hands every other request to the cache engine's target, or, for a passthrough
//! serve (no cache), answers them as "no cache here".

use std::sync::Arc;

use super::format::{MAX_NAME_LEN, Record};
use super::writer::LogWriter;
use crate::ctl::{
    CacheMode, ControlTarget, CtlError, ExportState, FlushProgress, FlushState, KnobSetting, StatsSnapshot,
};

/// Every export of a serve with its recording log, `None` when it is not recorded.
pub type RecordedExports = Vec<(String, Option<Arc<LogWriter>>)>;

/// The control target of a serve that records at least one export.
pub struct RecordingTarget {
    /// The cache engine's target; `None` for a passthrough serve.
    engine: Option<Arc<dyn ControlTarget>>,
    /// Every export of the serve, with its log when it is recorded.
    exports: RecordedExports,
}

impl std::fmt::Debug for RecordingTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingTarget")
            .field("engine", &self.engine.is_some())
            .field("exports", &self.exports)
            .finish()
    }
}

const NO_CACHE: &str = "this serve has no cache (a passthrough): only `mark` works on its control socket";

impl RecordingTarget {
    /// `exports` lists every served export, recorded (`Some(log)`) or not.
    #[must_use]
    pub fn new(engine: Option<Arc<dyn ControlTarget>>, exports: RecordedExports) -> Self {
        RecordingTarget { engine, exports }
    }

    fn engine(&self) -> Result<&Arc<dyn ControlTarget>, CtlError> {
        self.engine.as_ref().ok_or_else(|| CtlError::Unsupported(NO_CACHE.to_owned()))
    }

    fn recorded(&self) -> impl Iterator<Item = (&String, &Arc<LogWriter>)> {
        self.exports.iter().filter_map(|(name, log)| log.as_ref().map(|log| (name, log)))
    }
}

/// Places a mark and syncs the log, so the mark is on disk when `ubcache mark` returns.
fn place_mark(log: &LogWriter, name: &str) -> Result<u64, CtlError> {
    let failed = |e: crate::dev::DevError| CtlError::Failed(format!("cannot write the mark: {e}"));
    let (entry, pos) = log.append(&Record::Mark { name: name.to_owned() }).map_err(failed)?;
    log.sync_to(pos).map_err(failed)?;
    Ok(entry)
}

impl ControlTarget for RecordingTarget {
    fn stats(&self) -> StatsSnapshot {
        self.engine.as_ref().map(|e| e.stats()).unwrap_or_default()
    }

    fn set_mode(&self, export: Option<&str>, mode: CacheMode, flush_first: bool) -> Result<(), CtlError> {
        self.engine()?.set_mode(export, mode, flush_first)
    }

    fn modes(&self) -> Vec<(String, CacheMode)> {
        match &self.engine {
            Some(e) => e.modes(),
            None => self.exports.iter().map(|(name, _)| (name.clone(), CacheMode::None)).collect(),
        }
    }

    fn export_states(&self) -> Vec<(String, ExportState)> {
        match &self.engine {
            Some(e) => e.export_states(),
            None => self.exports.iter().map(|(name, _)| (name.clone(), ExportState::Detached)).collect(),
        }
    }

    fn set_knob(&self, export: Option<&str>, setting: KnobSetting) -> Result<(), CtlError> {
        self.engine()?.set_knob(export, setting)
    }

    fn knobs(&self, export: Option<&str>) -> Result<Vec<(String, String)>, CtlError> {
        self.engine()?.knobs(export)
    }

    fn start_flush(&self) -> Result<(), CtlError> {
        self.engine()?.start_flush()
    }

    fn flush_progress(&self) -> FlushProgress {
        match &self.engine {
            Some(e) => e.flush_progress(),
            None => FlushProgress {
                state: FlushState::Idle,
                dirty_bytes_left: 0,
                bytes_done: 0,
                rate_bytes_per_sec: 0,
            },
        }
    }

    fn cancel_flush(&self) {
        if let Some(e) = &self.engine {
            e.cancel_flush();
        }
    }

    fn detach(&self, export: &str) -> Result<(), CtlError> {
        self.engine()?.detach(export)
    }

    fn attach(&self, export: &str) -> Result<(), CtlError> {
        self.engine()?.attach(export)
    }

    fn mark(&self, export: Option<&str>, name: &str) -> Result<Vec<(String, u64)>, CtlError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(CtlError::Invalid(format!("a mark name has 1 to {MAX_NAME_LEN} bytes")));
        }
        match export {
            None => {
                self.recorded().map(|(export, log)| Ok((export.clone(), place_mark(log, name)?))).collect()
            }
            Some(wanted) => match self.exports.iter().find(|(n, _)| n == wanted) {
                None => Err(CtlError::NotFound(format!(
                    "no export named {wanted:?} (exports: {})",
                    self.exports.iter().map(|(n, _)| format!("{n:?}")).collect::<Vec<_>>().join(", ")
                ))),
                Some((_, None)) => Err(CtlError::Invalid(format!(
                    "recording is off for export {wanted:?} (recorded: {})",
                    self.recorded().map(|(n, _)| format!("{n:?}")).collect::<Vec<_>>().join(", ")
                ))),
                Some((export, Some(log))) => Ok(vec![(export.clone(), place_mark(log, name)?)]),
            },
        }
    }
}
