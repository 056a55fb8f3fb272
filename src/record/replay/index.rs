//! One pass over a log: what each entry is, its numbers, and where and how the log ends.
//!
//! The index keeps no data, only a few words per entry, so a log of any size can be resolved
//! (where is mark X, which writes follow flush N) before the image is touched.

use super::ReplayError;
use super::crash::WindowWrite;
use super::source::{self, LogHeader};
use std::path::Path;

/// What an entry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A write of `len` bytes at `offset`; `fua`: durable at its reply.
    Write { offset: u64, len: u64, fua: bool },
    /// A TRIM: reads back as zeros after the replay.
    Trim { offset: u64, len: u64, fua: bool },
    /// A WRITE_ZEROES.
    Zero { offset: u64, len: u64, fua: bool },
    /// A FLUSH: every write before it in the log is durable.
    Flush,
    /// A user mark.
    Mark { name: String },
}

impl Op {
    /// The byte range of the export it changes, if it changes data.
    pub fn range(&self) -> Option<std::ops::Range<u64>> {
        match *self {
            Op::Write { offset, len, .. } | Op::Trim { offset, len, .. } | Op::Zero { offset, len, .. } => {
                Some(offset..offset.saturating_add(len))
            }
            Op::Flush | Op::Mark { .. } => None,
        }
    }

    /// Durable at its reply (a FUA point).
    pub fn is_fua(&self) -> bool {
        matches!(self, Op::Write { fua: true, .. } | Op::Trim { fua: true, .. } | Op::Zero { fua: true, .. })
    }

    /// The name `--list` prints.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Write { fua: false, .. } => "write",
            Op::Write { fua: true, .. } => "fua-write",
            Op::Trim { fua: false, .. } => "trim",
            Op::Trim { fua: true, .. } => "fua-trim",
            Op::Zero { fua: false, .. } => "zero",
            Op::Zero { fua: true, .. } => "fua-zero",
            Op::Flush => "flush",
            Op::Mark { .. } => "mark",
        }
    }
}

/// One entry of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// Entry number, as the log numbers it.
    pub number: u64,
    /// Byte offset of its record in the log file.
    pub log_offset: u64,
    /// What it does.
    pub op: Op,
    /// For a FLUSH: its flush number (1 for the first).
    pub flush: Option<u64>,
    /// For a FUA write (or FUA trim or zeroing): its FUA number (1 for the first).
    pub fua: Option<u64>,
}

impl EntryInfo {
    /// This entry as a crash-window member, if it changes data.
    pub fn window_write(&self) -> Option<WindowWrite> {
        let range = self.op.range()?;
        Some(WindowWrite { entry: self.number, range, fua: self.op.is_fua() })
    }
}

/// How the log ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LogEnd {
    /// After its last record, with nothing left over.
    #[default]
    Clean,
    /// With an incomplete last record (the recorder was killed while appending it): normal after
    /// a crash of the server, and nothing acknowledged as durable is lost.
    TornTail { entry: u64, offset: u64, detail: String },
    /// With damage before the end: everything before `entry` is intact, nothing after is read.
    Corrupt { entry: u64, offset: u64, detail: String },
}

impl LogEnd {
    /// One line about how the log ends.
    pub fn describe(&self) -> String {
        match self {
            LogEnd::Clean => "the log ends cleanly".to_string(),
            LogEnd::TornTail { entry, offset, detail } => {
                format!("torn tail at entry {entry}, byte offset {offset}: {detail} (ignored)")
            }
            LogEnd::Corrupt { entry, offset, detail } => {
                format!("corrupt at entry {entry}, byte offset {offset}: {detail}")
            }
        }
    }
}

/// Counts over a log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub entries: u64,
    /// Writes, FUA or not.
    pub writes: u64,
    /// FUA points: writes, trims and zeroings with FUA.
    pub fua_points: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub flushes: u64,
    pub marks: u64,
    /// Bytes written by writes (FUA or not).
    pub bytes_written: u64,
    /// Bytes trimmed or zeroed.
    pub bytes_zeroed: u64,
}

/// The index of a whole log.
#[derive(Debug, Clone)]
pub struct LogIndex {
    pub header: LogHeader,
    pub entries: Vec<EntryInfo>,
    pub end: LogEnd,
}

impl LogIndex {
    /// Reads the whole log once. A damaged or torn log still gives an index of what precedes the
    /// damage; only a file that is not a log at all (or cannot be read) is an error.
    pub fn scan(path: &Path) -> Result<Self, ReplayError> {
        let mut reader = source::LogSource::open(path)?;
        let header = reader.header().clone();
        let mut entries = Vec::new();
        let (mut flushes, mut fuas) = (0, 0);
        while let Some(entry) = reader.next_entry()? {
            let flush = matches!(entry.op, Op::Flush).then(|| {
                flushes += 1;
                flushes
            });
            let fua = entry.op.is_fua().then(|| {
                fuas += 1;
                fuas
            });
            entries.push(EntryInfo {
                number: entry.number,
                log_offset: entry.log_offset,
                op: entry.op,
                flush,
                fua,
            });
        }
        Ok(Self { header, entries, end: reader.end().clone() })
    }

    /// Counts of every kind of entry and of the bytes they touch.
    pub fn totals(&self) -> Totals {
        let mut t = Totals { entries: self.entries.len() as u64, ..Totals::default() };
        for e in &self.entries {
            t.fua_points += u64::from(e.op.is_fua());
            match e.op {
                Op::Write { len, .. } => {
                    t.writes += 1;
                    t.bytes_written += len;
                }
                Op::Trim { len, .. } => {
                    t.trims += 1;
                    t.bytes_zeroed += len;
                }
                Op::Zero { len, .. } => {
                    t.zeroes += 1;
                    t.bytes_zeroed += len;
                }
                Op::Flush => t.flushes += 1,
                Op::Mark { .. } => t.marks += 1,
            }
        }
        t
    }

    /// Every mark: its entry number and name, in log order.
    pub fn marks(&self) -> impl Iterator<Item = (u64, &str)> {
        self.entries.iter().filter_map(|e| match &e.op {
            Op::Mark { name } => Some((e.number, name.as_str())),
            _ => None,
        })
    }
}
