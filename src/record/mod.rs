//! Recording (issue 11): an append-only log of every WRITE, TRIM, WRITE_ZEROES, FLUSH and FUA an
//! export's client sent, in completion order, with user marks, so that a replay can rebuild the
//! disk as it was at any flush point (dm-log-writes semantics, without root).
//!
//! - [`format`]: every byte of the log, its encoder and a decoder that accepts any input.
//! - [`writer`]: appending with a buffer, group-committed syncs and a sticky failure.
//! - [`dev`]: [`RecordingDev`], the `BlockDev` wrapper that records an export's requests.
//! - [`control`]: `ubcache mark` on the control socket ([`RecordingTarget`]).
//! - [`replay`]: `ubcache replay`: list a log, rebuild the export at any point, crash states, the
//!   check loop.

pub mod control;
pub mod dev;
pub mod format;
pub mod replay;
pub mod writer;

pub use control::{RecordedExports, RecordingTarget};
pub use dev::RecordingDev;
pub use format::{Entry, LogEnd, LogError, LogHeader, LogReader, Record, TornTail, WriteData};
pub use writer::{Existing, LogPos, LogSink, LogWriter};
