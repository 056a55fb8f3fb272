//! The log as the replay reads it: the recording format's reader, with each record turned into
//! an [`Op`] plus its data, and the way the log ends (clean, torn, corrupt) kept as a value
//! instead of an error, so that what precedes damage stays listable and replayable.

use super::ReplayError;
use super::index::{LogEnd, Op};
pub use crate::record::format::LogHeader;
use crate::record::format::{LogError, LogReader, Record, WriteData};
use std::path::{Path, PathBuf};

/// One entry with what the replay needs to apply it.
#[derive(Debug)]
pub struct SourceEntry {
    pub number: u64,
    pub log_offset: u64,
    pub op: Op,
    /// A write's bytes; `None` for a write of zeros (and every other kind).
    pub data: Option<Vec<u8>>,
}

/// Streams a log's entries.
#[derive(Debug)]
pub struct LogSource {
    path: PathBuf,
    reader: LogReader<std::io::BufReader<std::fs::File>>,
    end: Option<LogEnd>,
}

impl LogSource {
    /// Opens `path` and reads its header. A file that is not a log is an error here.
    pub fn open(path: &Path) -> Result<Self, ReplayError> {
        let reader = LogReader::open(path).map_err(|e| log_error(path, e))?;
        Ok(Self { path: path.to_path_buf(), reader, end: None })
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        self.reader.header()
    }

    /// The next entry; `None` at the end of the readable part (see [`Self::end`]). Only a failed
    /// read of the file itself is an error.
    pub fn next_entry(&mut self) -> Result<Option<SourceEntry>, ReplayError> {
        if self.end.is_some() {
            return Ok(None);
        }
        match self.reader.next() {
            Some(Ok(entry)) => {
                let (op, data) = match entry.record {
                    Record::Write { offset, data: WriteData::Bytes(bytes), fua } => {
                        (Op::Write { offset, len: bytes.len() as u64, fua }, Some(bytes))
                    }
                    Record::Write { offset, data: WriteData::Zeros(len), fua } => {
                        (Op::Write { offset, len, fua }, None)
                    }
                    Record::Trim { offset, len, fua } => (Op::Trim { offset, len, fua }, None),
                    Record::WriteZeroes { offset, len, fua, .. } => (Op::Zero { offset, len, fua }, None),
                    Record::Flush { .. } => (Op::Flush, None),
                    Record::Mark { name } => (Op::Mark { name }, None),
                };
                Ok(Some(SourceEntry { number: entry.seq, log_offset: entry.offset, op, data }))
            }
            Some(Err(LogError::Corrupt { entry, offset, what })) => {
                self.end = Some(LogEnd::Corrupt { entry, offset, detail: what.to_string() });
                Ok(None)
            }
            Some(Err(e)) => Err(log_error(&self.path, e)),
            None => {
                self.end = Some(match self.reader.end() {
                    Some(crate::record::format::LogEnd::Torn(t)) => {
                        LogEnd::TornTail { entry: t.entry, offset: t.offset, detail: t.reason.to_string() }
                    }
                    _ => LogEnd::Clean,
                });
                Ok(None)
            }
        }
    }

    /// How the log ended, once [`Self::next_entry`] returned `None`.
    pub fn end(&self) -> &LogEnd {
        self.end.as_ref().unwrap_or(&LogEnd::Clean)
    }
}

fn log_error(path: &Path, e: LogError) -> ReplayError {
    match e {
        LogError::Open { source, .. } | LogError::Read(source) => {
            ReplayError::LogIo { path: path.to_path_buf(), source }
        }
        LogError::Corrupt { entry, offset, what } => {
            ReplayError::Corrupt { path: path.to_path_buf(), entry, offset, detail: what.to_string() }
        }
        LogError::BadHeader { reason } | LogError::Invalid(reason) => {
            ReplayError::NotALog { path: path.to_path_buf(), reason }
        }
    }
}
