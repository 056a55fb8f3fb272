//! [`RecordingDev`]: a [`BlockDev`] that records what reaches the device it wraps.
//!
//! It wraps an export's device (a passthrough file, a cached device in any mode, a remote
//! volume), so recording needs nothing from the NBD server: the server calls `write_at`,
//! `write_at_fua`, `sync`, `discard` and `write_zeroes`, and each call returns only once its
//! record is in the log (and the log synced where the call promises durability).
//!
//! # Ordering (dm-log-writes semantics)
//! - A WRITE, TRIM or WRITE_ZEROES is appended after the inner device completed it and before
//!   the call returns, so before the server sends the reply: the log holds completion order,
//!   and a write is never acknowledged without its record. Two overlapping writes in flight at
//!   once may land on the device in one order and complete in the other; NBD leaves their
//!   outcome undefined, and the log keeps the completion order.
//! - A sync (the server's FLUSH) appends its FLUSH record *first*, then syncs the inner device,
//!   then the log. Every record before the marker completed before the sync began, so the
//!   device sync covers it: "the disk after flush N" is everything before FLUSH N. A write that
//!   completes while the inner sync runs is appended after the marker, where it belongs: that
//!   sync may or may not have covered it, so it counts as unflushed until the next FLUSH. (The
//!   other order, marker after the inner sync, would put such writes before the marker and
//!   claim them durable.) Client FLUSHes the server folds into one sync get one marker.
//! - The log is synced up to the marker before the sync returns (in parallel with the device
//!   sync), so a FLUSH reply means the log holds every write that flush made durable, even if
//!   the process is killed right after.
//! - A FUA write is appended, then the log is synced up to it, then the call returns.
//!
//! # Failures
//! A log that cannot be written fails the request (ENOSPC for a full disk, EIO otherwise), and
//! every later write and sync of the export with it: the client is never told a write succeeded
//! that the log lacks. The inner device may already hold such a write; it was not
//! acknowledged, which the NBD contract allows to be either there or not. A failed inner sync
//! leaves its FLUSH record in the log; a MARK naming the failure follows it and the recording
//! stops there (see `docs/record-format.md`).

use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Arc, Weak};

use super::format::Record;
use super::writer::{LogPos, LogWriter};
use crate::dev::{BlockDev, DevCaps, DevError, DevResult};

/// An export's device with every completed change recorded to a log.
#[derive(Debug)]
pub struct RecordingDev {
    inner: Arc<dyn BlockDev>,
    log: Arc<LogWriter>,
    /// The thread that syncs the log while `sync` syncs the device (`None` if it could not be
    /// started: the log then syncs after the device, on the caller's thread).
    log_syncer: Option<mpsc::Sender<LogSyncJob>>,
}

/// A log sync for the syncer thread: up to where, and where to send the outcome.
type LogSyncJob = (LogPos, mpsc::SyncSender<DevResult<()>>);

impl RecordingDev {
    #[must_use]
    pub fn new(inner: Arc<dyn BlockDev>, log: Arc<LogWriter>) -> RecordingDev {
        let log_syncer = spawn_log_syncer(Arc::downgrade(&log));
        RecordingDev { inner, log, log_syncer }
    }

    /// Syncs the log up to `pos` while `device_sync` runs on this thread; returns both outcomes.
    fn sync_both(
        &self,
        pos: LogPos,
        device_sync: impl FnOnce() -> DevResult<()>,
    ) -> (DevResult<()>, DevResult<()>) {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let sent = self.log_syncer.as_ref().is_some_and(|tx| tx.send((pos, reply_tx)).is_ok());
        let synced = device_sync();
        let logged = if sent {
            reply_rx.recv().unwrap_or_else(|_| {
                Err(DevError::Io {
                    op: "record log sync",
                    offset: 0,
                    len: 0,
                    source: std::io::Error::other("log sync thread gone"),
                })
            })
        } else {
            self.log.sync_to(pos)
        };
        (synced, logged)
    }

    /// The log this device appends to (for marks).
    #[must_use]
    pub fn log(&self) -> &Arc<LogWriter> {
        &self.log
    }
}

impl BlockDev for RecordingDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.inner.write_at(buf, offset)?;
        self.log.append_write(offset, buf, false).map(drop)
    }

    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.inner.write_at_fua(buf, offset)?;
        let pos = self.log.append_write(offset, buf, true)?;
        self.log.sync_to(pos)
    }

    fn sync(&self) -> DevResult<()> {
        // Marker first: see the module doc for why this order and not the other.
        let (number, pos) = self.log.append_flush()?;
        // The device and the log sync at the same time: a FLUSH then waits for the slower of
        // the two instead of their sum. Nothing orders them: the marker is already placed, and
        // the reply waits for both.
        let (synced, logged) = self.sync_both(pos, || self.inner.sync());
        if let Err(e) = synced {
            // The marker is already in the log; what follows it says the sync failed, and the
            // recording ends there (a device whose sync failed may have lost any write since
            // the last good one, which no later record could describe).
            self.log.stop(&format!("flush {number} failed: device sync error: {e}"));
            return Err(e);
        }
        logged
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.inner.discard(offset, len)?;
        self.log.append(&Record::Trim { offset, len, fua: false }).map(drop)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        self.inner.write_zeroes(offset, len, may_unmap)?;
        self.log.append(&Record::WriteZeroes { offset, len, fua: false, no_hole: !may_unmap }).map(drop)
    }

    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        self.inner.known_zero_ranges(offset, len)
    }

    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        self.inner.prefetch(offset, len)
    }

    fn capabilities(&self) -> DevCaps<'_> {
        // No bulk-copy extension: a copy straight into the inner file would bypass the log.
        // Appending to the log buffer is a copy into memory too, so cheap writes stay cheap.
        DevCaps { bulk: None, ..self.inner.capabilities() }
    }
}

/// Starts the thread that runs log syncs for [`RecordingDev::sync`]: one long-lived thread
/// instead of one spawned per FLUSH (a spawn costs more than a sync of a page-cache device).
/// It holds the log weakly, and ends once the device (its job sender) is dropped.
fn spawn_log_syncer(log: Weak<LogWriter>) -> Option<mpsc::Sender<LogSyncJob>> {
    let (tx, rx) = mpsc::channel::<LogSyncJob>();
    let spawned = std::thread::Builder::new().name("record-log-sync".into()).spawn(move || {
        for (pos, reply) in rx {
            let result = match log.upgrade() {
                Some(log) => log.sync_to(pos),
                None => Ok(()),
            };
            // The caller waits for this; it cannot have gone away, but a failed send is harmless.
            drop(reply.send(result));
        }
    });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            log::warn!("recording: cannot start the log sync thread ({e}); the log syncs after the device");
            None
        }
    }
}
