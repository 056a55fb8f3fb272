//! Appending to a recording log: a memory buffer in completion order, group-committed syncs,
//! and a sticky failure so that nothing is acknowledged once the log cannot keep up.
//!
//! Two locks, always taken in this order when both are held: `io` (the file: the only place
//! that writes buffered bytes out, so buffers reach the file in the order they were filled),
//! then `state` (the buffer and the counters, held only to encode a record or to take the
//! buffer, never across a system call). Appending takes `state` alone, so writers do not wait
//! for a log write or an `fdatasync` in progress unless the buffer is full.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::format::{LogError, LogHeader, MAX_WRITE_DATA, Record, encode_write};
use crate::dev::{DevError, DevResult};

/// Buffered bytes at which an append writes the buffer out itself (without a sync): large
/// enough that a 4 KiB write costs no system call of its own, small enough that the memory
/// held for a client that never flushes stays bounded.
const WRITE_OUT_AT: usize = 1 << 20;

/// What a buffer is allocated with: room for a write-out's worth and the record that fills it.
const BUF_CAPACITY: usize = WRITE_OUT_AT + (64 << 10);

/// An append-only recording log being written.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    io: Mutex<Io>,
    state: Mutex<State>,
}

/// Where log bytes go: a file, or in tests a sink that fails on purpose.
pub trait LogSink: Send + std::fmt::Debug {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes what was written durable (`fdatasync` for a file).
    fn sync_data(&self) -> io::Result<()>;
    /// Cuts the sink back to `len` bytes (after a failed write, and at a clean end).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Readies `from..to` for the appends to come; the default does nothing.
    fn reserve(&self, from: u64, to: u64) -> io::Result<()> {
        let _ = (from, to);
        Ok(())
    }
}

/// How far ahead of the log's end a file is filled with zeros.
///
/// Why: `fdatasync` after an append that grows the file must commit the new size through the
/// file system's journal (several milliseconds on ext4), and a FLUSH waits for it. Overwriting
/// blocks the file already has needs no metadata, so the log writes zeros ahead of itself,
/// once per `RESERVE_AHEAD` bytes, and its syncs cost what a data sync costs. The zeros are
/// overwritten in the page cache within moments, so the disk rarely sees them twice. A crash
/// leaves a zero-filled tail, which the reader reports as a torn tail; a clean end cuts the
/// zeros off.
const RESERVE_AHEAD: u64 = 8 << 20;

impl LogSink for File {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn reserve(&self, from: u64, to: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK];
        let mut at = from;
        while at < to {
            let n = (to - at).min(CHUNK as u64) as usize;
            FileExt::write_all_at(self, &zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Io {
    file: Box<dyn LogSink>,
    /// Log bytes written to the file (all of them before `state.appended`'s buffer).
    written: u64,
    /// Log bytes known durable (`fdatasync` returned after they were written).
    synced: u64,
    /// Bytes the sink holds (the log, then zeros reserved ahead of it).
    reserved: u64,
    /// Set once reserving failed (a nearly full disk): appends then grow the file as they go.
    no_reserve: bool,
    /// An empty buffer to swap in for the one being written out (double buffering: the two
    /// take turns, so writing out allocates nothing).
    spare: Vec<u8>,
}

#[derive(Debug)]
struct State {
    /// Encoded records not yet written to the file.
    buf: Vec<u8>,
    /// Log bytes appended so far (header included): where the buffer ends in the file.
    appended: u64,
    /// Entry number of the next record.
    next_seq: u64,
    /// Number of the last FLUSH record.
    flushes: u64,
    /// Set once the log could not be written: every later append and sync fails with it.
    failed: Option<Failure>,
}

/// Why the log stopped, kept to fail every later request the same way.
#[derive(Debug, Clone)]
struct Failure {
    no_space: bool,
    message: String,
}

impl Failure {
    fn to_dev_error(&self) -> DevError {
        if self.no_space {
            DevError::NoSpace(self.message.clone())
        } else {
            DevError::Io { op: "record", offset: 0, len: 0, source: io::Error::other(self.message.clone()) }
        }
    }
}

/// Where an appended record ends in the log: what [`LogWriter::sync_to`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPos(u64);

/// Whether creating a log may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse: an existing log is a previous recording, kept unless asked otherwise.
    Refuse,
    /// Truncate and start over (`--force`).
    Replace,
}

impl LogWriter {
    /// Creates the log and writes and syncs its header, so that a log that exists is a log.
    pub fn create(path: &Path, header: &LogHeader, existing: Existing) -> Result<LogWriter, LogError> {
        let open_err = |source| LogError::Open { path: path.display().to_string(), source };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).read(true);
        match existing {
            Existing::Refuse => options.create_new(true),
            Existing::Replace => options.create(true).truncate(true),
        };
        let file = options.open(path).map_err(open_err)?;
        // sync_all for the file's size and directory entry too: the log must exist after a crash.
        let bytes = header.encode()?;
        FileExt::write_all_at(&file, &bytes, 0).and_then(|()| file.sync_all()).map_err(open_err)?;
        Ok(LogWriter::started(path, Box::new(file), bytes.len() as u64))
    }

    /// A log written to `sink`, whose header this writes and syncs; `name` stands for the sink
    /// in messages.
    pub fn with_sink(name: &Path, sink: Box<dyn LogSink>, header: &LogHeader) -> Result<LogWriter, LogError> {
        let bytes = header.encode()?;
        sink.write_all_at(&bytes, 0)
            .and_then(|()| sink.sync_data())
            .map_err(|source| LogError::Open { path: name.display().to_string(), source })?;
        Ok(LogWriter::started(name, sink, bytes.len() as u64))
    }

    fn started(path: &Path, file: Box<dyn LogSink>, len: u64) -> LogWriter {
        LogWriter {
            path: path.to_path_buf(),
            io: Mutex::new(Io {
                file,
                written: len,
                synced: len,
                reserved: len,
                no_reserve: false,
                spare: Vec::with_capacity(BUF_CAPACITY),
            }),
            state: Mutex::new(State {
                buf: Vec::with_capacity(BUF_CAPACITY),
                appended: len,
                next_seq: 0,
                flushes: 0,
                failed: None,
            }),
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a WRITE (split into several records above the format's limit).
    pub fn append_write(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<LogPos> {
        let (_, pos) = self.append_with(|st| {
            let mut at = offset;
            for chunk in data.chunks(MAX_WRITE_DATA) {
                encode_write(&mut st.buf, st.next_seq, at, chunk, fua).map_err(|e| invalid(&e))?;
                st.next_seq += 1;
                at += chunk.len() as u64;
            }
            if data.is_empty() {
                encode_write(&mut st.buf, st.next_seq, at, data, fua).map_err(|e| invalid(&e))?;
                st.next_seq += 1;
            }
            Ok(())
        })?;
        Ok(pos)
    }

    /// Appends a TRIM, WRITE_ZEROES or MARK record; returns its entry number and position.
    pub fn append(&self, record: &Record) -> DevResult<(u64, LogPos)> {
        self.append_with(|st| {
            record.encode(st.next_seq, &mut st.buf).map_err(|e| invalid(&e))?;
            st.next_seq += 1;
            Ok(())
        })
    }

    /// Appends the next FLUSH record and returns its number with its position.
    pub fn append_flush(&self) -> DevResult<(u64, LogPos)> {
        let mut number = 0;
        let (_, pos) = self.append_with(|st| {
            number = st.flushes + 1;
            Record::Flush { number }.encode(st.next_seq, &mut st.buf).map_err(|e| invalid(&e))?;
            st.flushes = number;
            st.next_seq += 1;
            Ok(())
        })?;
        Ok((number, pos))
    }

    /// Encodes records under the state lock; returns the first one's entry number and where
    /// the last one ends.
    fn append_with(&self, encode: impl FnOnce(&mut State) -> DevResult<()>) -> DevResult<(u64, LogPos)> {
        let (first, pos, full) = {
            let mut st = self.state.lock();
            if let Some(f) = &st.failed {
                return Err(f.to_dev_error());
            }
            let (before, first) = (st.buf.len(), st.next_seq);
            encode(&mut st)?;
            st.appended += (st.buf.len() - before) as u64;
            (first, LogPos(st.appended), st.buf.len() >= WRITE_OUT_AT)
        };
        if full {
            // The record is in the buffer either way; writing out here only bounds memory. If
            // it fails, this request fails too (its record may be among the lost bytes).
            self.write_out(&mut self.io.lock())?;
        }
        Ok((first, pos))
    }

    /// Makes the log durable up to `pos`: writes the buffer out and `fdatasync`s, unless a
    /// sync that started later than `pos` was appended already covered it (group commit: the
    /// callers that queued on `io` behind a running sync find their bytes synced by the next).
    pub fn sync_to(&self, pos: LogPos) -> DevResult<()> {
        let mut io = self.io.lock();
        if io.synced >= pos.0 {
            return self.check_failed();
        }
        self.write_out(&mut io)?;
        if let Err(e) = io.file.sync_data() {
            return Err(self.fail(&e, "fdatasync"));
        }
        io.synced = io.written;
        Ok(())
    }

    /// Writes the whole log out and syncs it.
    pub fn sync_all(&self) -> DevResult<()> {
        let pos = LogPos(self.state.lock().appended);
        self.sync_to(pos)
    }

    /// Ends the recording after a failure outside the log (a device sync that failed): appends
    /// a MARK saying why, writes the log out, and fails every later request.
    pub fn stop(&self, why: &str) {
        let name: String = why.chars().take(super::format::MAX_NAME_LEN / 4).collect();
        let written = self.append(&Record::Mark { name }).and_then(|_| self.sync_all());
        if let Err(e) = written {
            log::error!("recording log {}: cannot record that it stops ({why}): {e}", self.path.display());
        }
        let mut st = self.state.lock();
        if st.failed.is_none() {
            let message = format!("recording log {}: stopped: {why}", self.path.display());
            log::error!("{message}; the export now fails every write and flush");
            st.failed = Some(Failure { no_space: false, message });
        }
    }

    fn check_failed(&self) -> DevResult<()> {
        match &self.state.lock().failed {
            Some(f) => Err(f.to_dev_error()),
            None => Ok(()),
        }
    }

    /// Takes the buffer and writes it at the end of the file. `io` must be held.
    fn write_out(&self, io: &mut Io) -> DevResult<()> {
        let mut buf = {
            let mut st = self.state.lock();
            if let Some(f) = &st.failed {
                return Err(f.to_dev_error());
            }
            if st.buf.is_empty() {
                return Ok(());
            }
            // `spare` is empty: it is only ever put back cleared, below.
            std::mem::replace(&mut st.buf, std::mem::take(&mut io.spare))
        };
        let end = io.written + buf.len() as u64;
        if end > io.reserved && !io.no_reserve {
            let to = end.next_multiple_of(RESERVE_AHEAD) + RESERVE_AHEAD;
            if let Err(e) = io.file.reserve(io.reserved, to) {
                // Only a cost: the log still grows as it appends, with dearer syncs. Cut off
                // the zeros that did land, so that the file holds just the log and its reserve.
                log::warn!(
                    "recording log {}: cannot reserve space ahead ({e}); appending",
                    self.path.display()
                );
                io.no_reserve = true;
                if let Err(t) = io.file.set_len(io.reserved) {
                    return Err(self.fail(&t, "cut back the reserve"));
                }
            } else {
                io.reserved = to;
            }
        }
        if let Err(e) = io.file.write_all_at(&buf, io.written) {
            // Cut the file back to the last whole buffer so the log stays readable up to it.
            if let Err(t) = io.file.set_len(io.written) {
                log::warn!("recording log {}: cannot cut back a failed write: {t}", self.path.display());
            }
            return Err(self.fail(&e, "write"));
        }
        io.written = end;
        io.reserved = io.reserved.max(end);
        buf.clear();
        io.spare = buf;
        Ok(())
    }

    /// Makes the failure sticky, says so once in the server log, and returns it.
    fn fail(&self, e: &io::Error, op: &str) -> DevError {
        let no_space = matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
        let message = format!("recording log {}: {op} failed: {e}", self.path.display());
        let mut st = self.state.lock();
        let failure = st.failed.get_or_insert_with(|| {
            log::error!(
                "{message}; the export now fails every write and flush rather than acknowledge one the log \
                 does not hold"
            );
            Failure { no_space, message }
        });
        failure.to_dev_error()
    }
}

fn invalid(e: &LogError) -> DevError {
    DevError::Invalid(e.to_string())
}

impl Drop for LogWriter {
    /// A clean shutdown leaves the whole log on disk (the server syncs each export at the end,
    /// which already wrote it; this covers owners that did not).
    fn drop(&mut self) {
        if self.state.lock().failed.is_none()
            && let Err(e) = self.sync_all()
        {
            log::error!("recording log {}: final sync failed: {e}", self.path.display());
        }
        // Cut off the zeros reserved ahead, so that a log closed cleanly ends clean.
        let io = self.io.get_mut();
        if io.reserved > io.written
            && let Err(e) = io.file.set_len(io.written).and_then(|()| io.file.sync_data())
        {
            log::error!("recording log {}: cannot cut off the reserved tail: {e}", self.path.display());
        }
    }
}
