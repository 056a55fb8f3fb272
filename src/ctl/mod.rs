//! Control plane: the control socket, statistics and Prometheus metrics.
//!
//! Apart from [`CacheMode`] (the engine's type, re-exported) and [`engine`] none of this knows
//! the cache engine's types. The engine is reached through [`ControlTarget`], which [`engine`]
//! implements over a [`crate::cache::CacheSet`] (ctl sits above the engine; nothing below ctl
//! imports it); the
//! [`server`] answers JSON requests on a Unix socket by calling it, the [`metrics`] responder
//! renders its [`StatsSnapshot`] for Prometheus, and the [`client`] is what `ubcache stats`,
//! `set-mode`, `set`, `flush`, `detach` and `attach` call.
//!
//! - [`protocol`]: request/reply types and the dispatcher (one JSON object per line; see
//!   `docs/control.md`).
//! - [`server`]: the Unix socket server (a std thread, bounded clients, stop + join).
//! - [`client`]: one request per call, and the CLI's text renderers (flush progress bar).
//! - [`flush`]: runs the `flush` verb (a writeback drain: every dirty byte home) on a background
//!   thread with progress and cancel.
//! - [`engine`]: the cache engine behind the socket ([`engine::control_target`]).
//! - [`knobs`]: knob and cache-mode parsing with bounds, as pure functions.
//! - [`stats`]: atomic counters with exact rolling windows (5 min, 1 h, 1 day).
//! - [`metrics`]: Prometheus text format 0.0.4 and a tiny HTTP responder.

pub mod client;
pub mod engine;
pub mod flush;
pub mod knobs;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod stats;

pub use client::{CtlArgs, render_flush_progress, render_stats, request, run_ctl_command, wait_for_flush};
pub use flush::FlushRunner;
pub use knobs::{CacheMode, KnobError, KnobSetting, Knobs, ReplacementPolicy, parse_mode};
pub use metrics::{MetricsServer, render_prometheus};
pub use protocol::{Request, dispatch, handle_line, parse_request};
pub use server::{CtlServer, CtlServerConfig};
pub use stats::{Clock, Counter, Gauge, ManualClock, MonotonicClock, Stats, StatsSnapshot};

use serde::{Deserialize, Serialize};
use std::io;

/// File name of the control socket, created next to the cache data (`<data-dir>/ubcache.ctl`).
pub const SOCKET_FILE_NAME: &str = "ubcache.ctl";

/// The control socket path for a cache whose data lives in `data_dir`.
#[must_use]
pub fn socket_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join(SOCKET_FILE_NAME)
}

/// Errors of the control plane. The kind travels over the socket (`"kind"` in an error reply),
/// so a client can tell a refused value from a broken connection.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Socket or network I/O failed.
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// A request or reply is not valid protocol (malformed JSON, unknown verb, missing field).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An argument was refused (bad knob value, unknown mode, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// No such export.
    #[error("not found: {0}")]
    NotFound(String),
    /// The engine cannot do this now (flush already running, too many clients, ...).
    #[error("busy: {0}")]
    Busy(String),
    /// The engine tried and failed (I/O error during flush, mode switch refused, ...).
    #[error("failed: {0}")]
    Failed(String),
    /// The engine does not support this request.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl CtlError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> CtlError {
        CtlError::Io { context: context.into(), source }
    }

    /// The short kind name sent in error replies.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            CtlError::Io { .. } => "io",
            CtlError::Protocol(_) => "protocol",
            CtlError::Invalid(_) => "invalid",
            CtlError::NotFound(_) => "not-found",
            CtlError::Busy(_) => "busy",
            CtlError::Failed(_) => "failed",
            CtlError::Unsupported(_) => "unsupported",
        }
    }

    /// Rebuilds an error from a reply's kind and message (the client side of [`CtlError::kind`]).
    #[must_use]
    pub fn from_kind(kind: &str, message: String) -> CtlError {
        match kind {
            "io" => CtlError::Io { context: "server".to_owned(), source: io::Error::other(message) },
            "invalid" => CtlError::Invalid(message),
            "not-found" => CtlError::NotFound(message),
            "busy" => CtlError::Busy(message),
            "failed" => CtlError::Failed(message),
            "unsupported" => CtlError::Unsupported(message),
            _ => CtlError::Protocol(message),
        }
    }

    /// The message without the kind prefix, as sent in `"error"`.
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            CtlError::Io { context, source } => format!("{context}: {source}"),
            CtlError::Protocol(m)
            | CtlError::Invalid(m)
            | CtlError::NotFound(m)
            | CtlError::Busy(m)
            | CtlError::Failed(m)
            | CtlError::Unsupported(m) => m.clone(),
        }
    }
}

impl From<KnobError> for CtlError {
    fn from(e: KnobError) -> Self {
        CtlError::Invalid(e.to_string())
    }
}

/// Whether an export is served through its cache set or, detached, straight from its backing
/// device (after `detach`, or detached before the server started, until `attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportState {
    Attached,
    Detached,
}

/// Where a flush of all dirty data stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlushState {
    /// No flush was asked for since start (writeback may still run at its controlled rate).
    Idle,
    /// A flush is writing dirty data home.
    Running,
    /// The last flush finished: no dirty data was left when it ended.
    Done,
    /// The last flush stopped on an error (see the engine's log; dirty data is kept).
    Failed,
    /// The last flush was cancelled; dirty data not yet written home stays dirty.
    Cancelled,
}

/// Progress of a flush (writeback of every dirty byte), for `flush-progress` and the CLI bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushProgress {
    pub state: FlushState,
    /// Dirty bytes still in the cache.
    pub dirty_bytes_left: u64,
    /// Bytes written home since this flush started.
    pub bytes_done: u64,
    /// Current writeback rate, bytes per second (0 when unknown).
    pub rate_bytes_per_sec: u64,
}

impl FlushProgress {
    /// Fraction done in [0, 1]: done / (done + left); 1 when nothing was ever dirty.
    #[must_use]
    pub fn fraction_done(&self) -> f64 {
        // In f64: the sum of two u64 may not fit in u64.
        let total = self.bytes_done as f64 + self.dirty_bytes_left as f64;
        if total == 0.0 { 1.0 } else { self.bytes_done as f64 / total }
    }

    /// Seconds left at the current rate; `None` when the rate is 0 and bytes remain.
    #[must_use]
    pub fn eta_secs(&self) -> Option<u64> {
        if self.dirty_bytes_left == 0 {
            Some(0)
        } else if self.rate_bytes_per_sec == 0 {
            None
        } else {
            Some(self.dirty_bytes_left.div_ceil(self.rate_bytes_per_sec))
        }
    }
}

/// What the control plane needs from the cache engine. Every method is called from a control
/// client's thread, so it may block (a mode switch with `flush_first` waits for the flush), but
/// it must not hold engine locks the data path needs for long.
///
/// `export: None` means every export of the set.
pub trait ControlTarget: Send + Sync {
    /// Counters and gauges now.
    fn stats(&self) -> StatsSnapshot;
    /// Switches the cache mode; with `flush_first`, all dirty data is written home before the
    /// switch takes effect (needed to leave writeback without keeping dirty data).
    ///
    /// # Errors
    /// [`CtlError::NotFound`] for an unknown export, [`CtlError::Failed`] if the flush failed.
    fn set_mode(&self, export: Option<&str>, mode: CacheMode, flush_first: bool) -> Result<(), CtlError>;
    /// The current mode of each export, as (export, mode).
    fn modes(&self) -> Vec<(String, CacheMode)>;
    /// Whether each export is attached or detached, as (export, state). The default says every
    /// export of [`ControlTarget::modes`] is attached (for targets that cannot detach).
    fn export_states(&self) -> Vec<(String, ExportState)> {
        self.modes().into_iter().map(|(export, _)| (export, ExportState::Attached)).collect()
    }
    /// Applies one validated knob setting.
    ///
    /// # Errors
    /// [`CtlError::Invalid`] when it conflicts with the engine's state, [`CtlError::NotFound`].
    fn set_knob(&self, export: Option<&str>, setting: KnobSetting) -> Result<(), CtlError>;
    /// Every knob's current value as (name, value text).
    ///
    /// # Errors
    /// [`CtlError::NotFound`] for an unknown export.
    fn knobs(&self, export: Option<&str>) -> Result<Vec<(String, String)>, CtlError>;
    /// Starts writing back all dirty data, in the background; returns at once.
    ///
    /// # Errors
    /// [`CtlError::Busy`] if a flush already runs; [`CtlError::Failed`] if it cannot start.
    fn start_flush(&self) -> Result<(), CtlError>;
    /// Where the current (or last) flush stands.
    fn flush_progress(&self) -> FlushProgress;
    /// Stops a running flush after the write in progress; dirty data left stays dirty.
    fn cancel_flush(&self);
    /// Writes back the export's dirty data and detaches it from the cache set.
    ///
    /// # Errors
    /// [`CtlError::NotFound`], [`CtlError::Failed`].
    fn detach(&self, export: &str) -> Result<(), CtlError>;
    /// Attaches the export (a backing device known to the set) to the cache again.
    ///
    /// # Errors
    /// [`CtlError::NotFound`], [`CtlError::Failed`].
    fn attach(&self, export: &str) -> Result<(), CtlError>;
    /// Puts the mark `name` in the recording log of `export` (every recorded export when
    /// `None`) and returns (export, entry number) for each mark placed. The default: no
    /// recording in this serve.
    ///
    /// # Errors
    /// [`CtlError::Unsupported`] when nothing is recorded, [`CtlError::NotFound`] for an unknown
    /// export, [`CtlError::Invalid`] for an export that is not recorded or a bad name,
    /// [`CtlError::Failed`] when the log cannot be written.
    fn mark(&self, export: Option<&str>, name: &str) -> Result<Vec<(String, u64)>, CtlError> {
        let _ = (export, name);
        Err(CtlError::Unsupported(RECORDING_OFF.to_owned()))
    }
}

/// The error text of `mark` on a server that records nothing.
pub const RECORDING_OFF: &str = "recording is off: start `ubcache serve` with --record LOG to place marks";
