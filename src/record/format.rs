//! The recording log: every byte of its format, its encoder and its decoder.
//!
//! A log is one append-only file: a header, then records back to back, little-endian throughout.
//! `docs/record-format.md` draws the same layout for tools outside the project.
//!
//! ```text
//! header  { magic "UBCRLOG1" | version u32 | header_len u32 | export_size u64 | sector_size u32
//!         | flags u32 | uuid [16] | created_unix_ns u64 | name_len u16 | export name | crc32c }
//! record  { kind u8 | flags u8 | reserved u16 | payload_len u32 | seq u64 | head_crc u32 }
//!         { payload [payload_len] | crc32c }
//! ```
//!
//! Every record carries its sequence number (the entry number: 0 for the first record, then one
//! more per record) and two checksums: `head_crc` over the 16 bytes before it, so that a damaged
//! length is caught before it is trusted, and a crc32c over the head and the payload.
//!
//! The decoder accepts any input and never panics: lengths are checked against the format's
//! bounds before anything is allocated, and the payload is read incrementally so that memory
//! follows the bytes really present. A record cut short by the end of the file, a last record
//! whose checksum fails (followed by nothing or by zeros only), or a zero-filled tail (a file
//! extended ahead of its data: the writer reserves zeros ahead of the log) is a *torn tail*: reading stops there and reports it, without an error. Anything else that
//! fails a check is an error naming the entry number and byte offset; the entries before it were
//! already returned and stay usable.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;

use crate::format::Uuid;

/// First bytes of every log file.
pub const MAGIC: [u8; 8] = *b"UBCRLOG1";

/// Version 1: the first format (records WRITE, TRIM, WRITE_ZEROES, FLUSH, MARK).
pub const VERSION_1: u32 = 1;
/// The version this code writes.
pub const CURRENT_VERSION: u32 = VERSION_1;

// Header offsets, each chained from the one before.
const H_MAGIC: usize = 0;
const H_VERSION: usize = H_MAGIC + 8;
const H_HEADER_LEN: usize = H_VERSION + 4;
const H_EXPORT_SIZE: usize = H_HEADER_LEN + 4;
const H_SECTOR_SIZE: usize = H_EXPORT_SIZE + 8;
const H_FLAGS: usize = H_SECTOR_SIZE + 4;
const H_UUID: usize = H_FLAGS + 4;
const H_CREATED: usize = H_UUID + 16;
const H_NAME_LEN: usize = H_CREATED + 8;
/// Where the export name starts; the header crc32c follows the name.
const H_NAME: usize = H_NAME_LEN + 2;
/// The smallest header: no export name.
pub const MIN_HEADER_LEN: usize = H_NAME + 4;

/// Longest export name or mark name, in bytes: the NBD limit on export names (4096) is what a
/// name can be at most; a mark shares the bound so that one rule covers every name in the log.
pub const MAX_NAME_LEN: usize = 4096;

/// Largest data payload of one WRITE record. NBD requests are at most 32 MiB in this server;
/// twice that leaves room for other front ends, and a writer splits anything larger. The
/// bound is what keeps a corrupt length from asking the decoder for gigabytes.
pub const MAX_WRITE_DATA: usize = 64 << 20;

// Record head offsets.
const R_KIND: usize = 0;
const R_FLAGS: usize = R_KIND + 1;
const R_RESERVED: usize = R_FLAGS + 1;
const R_PAYLOAD_LEN: usize = R_RESERVED + 2;
const R_SEQ: usize = R_PAYLOAD_LEN + 4;
const R_HEAD_CRC: usize = R_SEQ + 8;
/// Bytes before a record's payload.
pub const RECORD_HEAD_LEN: usize = R_HEAD_CRC + 4;
/// Bytes of a record besides its payload (the head and the trailing crc32c).
pub const RECORD_OVERHEAD: usize = RECORD_HEAD_LEN + 4;

/// The largest payload any record kind may have (a WRITE with the largest data).
const MAX_PAYLOAD: usize = 8 + MAX_WRITE_DATA;

/// Record kinds. Zero is not a kind, so a zero-filled tail never decodes as a record.
const KIND_WRITE: u8 = 1;
const KIND_TRIM: u8 = 2;
const KIND_WRITE_ZEROES: u8 = 3;
const KIND_FLUSH: u8 = 4;
const KIND_MARK: u8 = 5;

/// WRITE, TRIM, WRITE_ZEROES: the request carried FUA (durable at its reply).
pub const FLAG_FUA: u8 = 0x01;
/// WRITE: every byte of the data was zero; the payload holds the length instead of the data.
pub const FLAG_ZERO_DATA: u8 = 0x02;
/// WRITE_ZEROES: the client asked to keep the range allocated (NBD's NO_HOLE).
pub const FLAG_NO_HOLE: u8 = 0x04;

/// The data of a WRITE record.
#[derive(Clone, PartialEq, Eq)]
pub enum WriteData {
    /// The bytes written.
    Bytes(Vec<u8>),
    /// A write of this many zero bytes: the log keeps the length, not the zeros.
    Zeros(u64),
}

impl WriteData {
    /// Length of the write in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        match self {
            WriteData::Bytes(b) => b.len() as u64,
            WriteData::Zeros(n) => *n,
        }
    }

    /// True for a write of no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for WriteData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteData::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            WriteData::Zeros(n) => write!(f, "Zeros({n})"),
        }
    }
}

/// One thing the client did, in the order the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A completed WRITE. With `fua` it was durable at its reply.
    Write { offset: u64, data: WriteData, fua: bool },
    /// A completed TRIM: the range may read as zeros afterwards (a replay makes it zeros).
    Trim { offset: u64, len: u64, fua: bool },
    /// A completed WRITE_ZEROES: the range reads as zeros.
    WriteZeroes { offset: u64, len: u64, fua: bool, no_hole: bool },
    /// The device was synced: every record before this one is durable. Numbered from 1.
    Flush { number: u64 },
    /// A user's named mark (`ubcache mark NAME`).
    Mark { name: String },
}

/// One decoded record with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry number (the record's sequence number): 0 for the first record.
    pub seq: u64,
    /// Byte offset of the record in the log file.
    pub offset: u64,
    /// Bytes the record takes in the log (head, payload and crc).
    pub size: u64,
    pub record: Record,
}

/// The log header: what was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHeader {
    pub version: u32,
    /// Size of the export in bytes; every record lies within it.
    pub export_size: u64,
    /// Sector size the export advertised (informational: records are byte-addressed).
    pub sector_size: u32,
    /// Identifies this recording.
    pub uuid: Uuid,
    /// When recording started (nanoseconds since the Unix epoch).
    pub created_unix_ns: u64,
    /// The NBD export the log records.
    pub export_name: String,
}

impl LogHeader {
    /// A new header for a recording starting now.
    #[must_use]
    pub fn new(export_name: &str, export_size: u64, sector_size: u32) -> LogHeader {
        let created_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        LogHeader {
            version: CURRENT_VERSION,
            export_size,
            sector_size,
            uuid: Uuid::random(),
            created_unix_ns,
            export_name: export_name.to_owned(),
        }
    }

    /// Encodes the header. Fails only for a name longer than [`MAX_NAME_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, LogError> {
        let name = self.export_name.as_bytes();
        if name.len() > MAX_NAME_LEN {
            return Err(LogError::Invalid(format!(
                "export name of {} bytes (at most {MAX_NAME_LEN})",
                name.len()
            )));
        }
        let header_len = MIN_HEADER_LEN + name.len();
        let mut out = Vec::with_capacity(header_len);
        // Format: { magic | version | header_len | export_size | sector_size | flags | uuid
        //         | created_unix_ns | name_len | name | crc32c }
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
        out.extend_from_slice(&self.export_size.to_le_bytes());
        out.extend_from_slice(&self.sector_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.uuid.0);
        out.extend_from_slice(&self.created_unix_ns.to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len(), header_len);
        Ok(out)
    }

    /// Reads and checks a header from the start of a log.
    fn decode(r: &mut impl Read) -> Result<LogHeader, LogError> {
        let bad = |reason: String| LogError::BadHeader { reason };
        let mut fixed = [0u8; H_NAME];
        read_full(r, &mut fixed)
            .map_err(LogError::Read)?
            .then_some(())
            .ok_or_else(|| bad(format!("file is shorter than a log header ({MIN_HEADER_LEN} bytes)")))?;
        if fixed[H_MAGIC..H_VERSION] != MAGIC {
            return Err(bad("not a ubcache recording (bad magic)".into()));
        }
        let version = le_u32(&fixed, H_VERSION);
        if version != VERSION_1 {
            return Err(bad(format!(
                "log format version {version} is not supported (this build reads {VERSION_1})"
            )));
        }
        let header_len = le_u32(&fixed, H_HEADER_LEN) as usize;
        let name_len = usize::from(le_u16(&fixed, H_NAME_LEN));
        if name_len > MAX_NAME_LEN || header_len != MIN_HEADER_LEN + name_len {
            return Err(bad(format!(
                "header length {header_len} does not fit an export name of {name_len} bytes"
            )));
        }
        let mut rest = vec![0u8; name_len + 4];
        if !read_full(r, &mut rest).map_err(LogError::Read)? {
            return Err(bad("file ends inside the header".into()));
        }
        let stored = le_u32(&rest, name_len);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed), &rest[..name_len]);
        if crc != stored {
            return Err(bad(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )));
        }
        if le_u32(&fixed, H_FLAGS) != 0 {
            return Err(bad("unknown header flags".into()));
        }
        let export_name = String::from_utf8(rest[..name_len].to_vec())
            .map_err(|_| bad("export name is not UTF-8".into()))?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&fixed[H_UUID..H_CREATED]);
        Ok(LogHeader {
            version,
            export_size: le_u64(&fixed, H_EXPORT_SIZE),
            sector_size: le_u32(&fixed, H_SECTOR_SIZE),
            uuid: Uuid(uuid),
            created_unix_ns: le_u64(&fixed, H_CREATED),
            export_name,
        })
    }
}

/// What is wrong with a record that is not at the tail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("record head checksum mismatch")]
    HeadChecksum,
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("sequence number {found} where {expected} was due")]
    Sequence { expected: u64, found: u64 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("flags {flags:#04x} are not valid for record kind {kind}")]
    Flags { kind: u8, flags: u8 },
    #[error("payload of {len} bytes does not fit record kind {kind}")]
    PayloadLength { kind: u8, len: u64 },
    #[error("range {offset}+{len} lies beyond the export size {size}")]
    Range { offset: u64, len: u64, size: u64 },
    #[error("flush number {found} where {expected} was due")]
    FlushNumber { expected: u64, found: u64 },
    #[error("mark name is empty, too long or not UTF-8")]
    MarkName,
    #[error("reserved bytes are not zero")]
    Reserved,
}

/// Why reading a log failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file could not be opened.
    #[error("cannot open recording log {path}: {source}")]
    Open { path: String, source: io::Error },
    /// Reading failed (the OS, not the content).
    #[error("reading the recording log: {0}")]
    Read(#[source] io::Error),
    /// The file is not a log this build reads (foreign, truncated header, newer version).
    #[error("bad recording log header: {reason}")]
    BadHeader { reason: String },
    /// A record before the tail is damaged. Entries before `entry` were read and are usable.
    #[error("corrupt recording log at entry {entry}, offset {offset}: {what}")]
    Corrupt { entry: u64, offset: u64, what: Corruption },
    /// Something the encoder refuses (a name too long, a write too large).
    #[error("invalid record: {0}")]
    Invalid(String),
}

/// How a log that was read without error ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEnd {
    /// At a record boundary.
    Clean,
    /// An incomplete or damaged last record: what a crash while appending leaves.
    Torn(TornTail),
}

/// Where a torn tail starts and why it counts as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The entry number the torn record would have had.
    pub entry: u64,
    /// Its byte offset in the log; bytes from here on are ignored.
    pub offset: u64,
    pub reason: &'static str,
}

impl fmt::Display for TornTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "torn tail at entry {}, offset {} ({})", self.entry, self.offset, self.reason)
    }
}

impl Record {
    /// The record kind byte, for messages.
    #[must_use]
    pub fn kind_name(&self) -> &'static str {
        match self {
            Record::Write { .. } => "write",
            Record::Trim { .. } => "trim",
            Record::WriteZeroes { .. } => "write-zeroes",
            Record::Flush { .. } => "flush",
            Record::Mark { .. } => "mark",
        }
    }

    /// Appends this record with sequence number `seq` to `out`, exactly as given (a
    /// `WriteData::Bytes` of zeros stays bytes; [`encode_write`] is what compacts).
    pub fn encode(&self, seq: u64, out: &mut Vec<u8>) -> Result<(), LogError> {
        match self {
            Record::Write { offset, data: WriteData::Bytes(data), fua } => {
                encode_write_bytes(out, seq, *offset, data, *fua)
            }
            Record::Write { offset, data: WriteData::Zeros(len), fua } => {
                let flags = FLAG_ZERO_DATA | if *fua { FLAG_FUA } else { 0 };
                encode_range(out, KIND_WRITE, flags, seq, *offset, *len);
                Ok(())
            }
            Record::Trim { offset, len, fua } => {
                encode_range(out, KIND_TRIM, if *fua { FLAG_FUA } else { 0 }, seq, *offset, *len);
                Ok(())
            }
            Record::WriteZeroes { offset, len, fua, no_hole } => {
                let flags = if *fua { FLAG_FUA } else { 0 } | if *no_hole { FLAG_NO_HOLE } else { 0 };
                encode_range(out, KIND_WRITE_ZEROES, flags, seq, *offset, *len);
                Ok(())
            }
            Record::Flush { number } => {
                // Format: { head(kind=FLUSH) | flush_number u64 | crc32c }
                let start = begin(out, KIND_FLUSH, 0, seq, 8);
                out.extend_from_slice(&number.to_le_bytes());
                finish(out, start);
                Ok(())
            }
            Record::Mark { name } => {
                let name = name.as_bytes();
                if name.is_empty() || name.len() > MAX_NAME_LEN {
                    return Err(LogError::Invalid(format!(
                        "mark name of {} bytes (1 to {MAX_NAME_LEN})",
                        name.len()
                    )));
                }
                // Format: { head(kind=MARK) | name [payload_len] (UTF-8) | crc32c }
                let start = begin(out, KIND_MARK, 0, seq, name.len());
                out.extend_from_slice(name);
                finish(out, start);
                Ok(())
            }
        }
    }
}

/// Appends a WRITE record: data that is all zeros is stored as its length only.
pub fn encode_write(
    out: &mut Vec<u8>,
    seq: u64,
    offset: u64,
    data: &[u8],
    fua: bool,
) -> Result<(), LogError> {
    if is_all_zero(data) {
        let flags = FLAG_ZERO_DATA | if fua { FLAG_FUA } else { 0 };
        encode_range(out, KIND_WRITE, flags, seq, offset, data.len() as u64);
        Ok(())
    } else {
        encode_write_bytes(out, seq, offset, data, fua)
    }
}

fn encode_write_bytes(
    out: &mut Vec<u8>,
    seq: u64,
    offset: u64,
    data: &[u8],
    fua: bool,
) -> Result<(), LogError> {
    if data.len() > MAX_WRITE_DATA {
        return Err(LogError::Invalid(format!(
            "write of {} bytes (at most {MAX_WRITE_DATA} per record)",
            data.len()
        )));
    }
    // Format: { head(kind=WRITE, flags=[FUA]) | offset u64 | data [payload_len - 8] | crc32c }
    let start = begin(out, KIND_WRITE, if fua { FLAG_FUA } else { 0 }, seq, 8 + data.len());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(data);
    finish(out, start);
    Ok(())
}

/// Format: { head(kind, flags) | offset u64 | len u64 | crc32c }: TRIM, WRITE_ZEROES and a
/// zero-data WRITE.
fn encode_range(out: &mut Vec<u8>, kind: u8, flags: u8, seq: u64, offset: u64, len: u64) {
    let start = begin(out, kind, flags, seq, 16);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    finish(out, start);
}

/// Format: { kind u8 | flags u8 | reserved u16 = 0 | payload_len u32 | seq u64 | head_crc u32 }
/// where head_crc is the crc32c of the 16 bytes before it. Returns where the record starts.
fn begin(out: &mut Vec<u8>, kind: u8, flags: u8, seq: u64, payload_len: usize) -> usize {
    let start = out.len();
    out.reserve(RECORD_OVERHEAD + payload_len);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let head_crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&head_crc.to_le_bytes());
    start
}

/// Appends the record's crc32c over its head and payload.
fn finish(out: &mut Vec<u8>, start: usize) {
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Whether every byte is zero (word at a time: the check runs on every recorded write).
fn is_all_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns, and align_to only reinterprets the aligned
        // middle of the slice; the unaligned ends come back as bytes.
        unsafe { data.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Fills `buf` from `r`. Ok(false) when the input ends first (after a partial fill).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads up to `buf.len()` bytes, fewer only at the end of input. Returns how many.
fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Whether the rest of the input holds only zero bytes.
fn rest_is_zero(r: &mut impl Read) -> io::Result<bool> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = read_some(r, &mut buf)?;
        if !buf[..n].iter().all(|&b| b == 0) {
            return Ok(false);
        }
        if n < buf.len() {
            return Ok(true);
        }
    }
}

/// Reads a log one entry at a time: the header when opened, then an iterator of entries.
///
/// The iterator ends at the end of the log or at a torn tail ([`LogReader::end`] says which),
/// and yields at most one error, after which it ends.
#[derive(Debug)]
pub struct LogReader<R> {
    input: R,
    header: LogHeader,
    /// Entry number of the next record.
    next_seq: u64,
    /// Byte offset of the next record.
    pos: u64,
    /// Number of the last FLUSH read (0 before the first).
    last_flush: u64,
    end: Option<LogEnd>,
    failed: bool,
}

impl LogReader<io::BufReader<std::fs::File>> {
    /// Opens a log file and reads its header.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = std::fs::File::open(path)
            .map_err(|source| LogError::Open { path: path.display().to_string(), source })?;
        LogReader::new(io::BufReader::with_capacity(1 << 20, file))
    }
}

impl<R: Read> LogReader<R> {
    /// Reads the header from `input`, which must be at the start of a log.
    pub fn new(mut input: R) -> Result<Self, LogError> {
        let header = LogHeader::decode(&mut input)?;
        let pos = (MIN_HEADER_LEN + header.export_name.len()) as u64;
        Ok(LogReader { input, header, next_seq: 0, pos, last_flush: 0, end: None, failed: false })
    }

    #[must_use]
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// How the log ended: `None` until the iterator has returned its last entry (or after it
    /// returned an error).
    #[must_use]
    pub fn end(&self) -> Option<&LogEnd> {
        self.end.as_ref()
    }

    /// Byte offset just past the last entry read.
    #[must_use]
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn torn(&mut self, reason: &'static str) -> Option<Result<Entry, LogError>> {
        self.end = Some(LogEnd::Torn(TornTail { entry: self.next_seq, offset: self.pos, reason }));
        None
    }

    fn corrupt(&mut self, what: Corruption) -> Option<Result<Entry, LogError>> {
        self.failed = true;
        Some(Err(LogError::Corrupt { entry: self.next_seq, offset: self.pos, what }))
    }

    fn read_error(&mut self, e: io::Error) -> Option<Result<Entry, LogError>> {
        self.failed = true;
        Some(Err(LogError::Read(e)))
    }

    /// Reads the next record; the checks run in an order that never trusts an unchecked field.
    fn next_entry(&mut self) -> Option<Result<Entry, LogError>> {
        let mut head = [0u8; RECORD_HEAD_LEN];
        let got = match read_some(&mut self.input, &mut head) {
            Ok(n) => n,
            Err(e) => return self.read_error(e),
        };
        if got == 0 {
            self.end = Some(LogEnd::Clean);
            return None;
        }
        if got < RECORD_HEAD_LEN {
            return self.torn("the file ends inside a record head");
        }
        let head_crc = crc32c::crc32c(&head[..R_HEAD_CRC]);
        if head_crc != le_u32(&head, R_HEAD_CRC) {
            // A crash can leave the file extended over blocks whose data never landed: they
            // read as zeros. Only that is a torn tail; damaged bytes followed by more are not.
            return match rest_is_zero(&mut self.input) {
                Ok(true) if head.iter().all(|&b| b == 0) => self.torn("zero-filled tail"),
                Ok(true) => self.torn("damaged last record head, followed only by zeros"),
                Ok(false) => self.corrupt(Corruption::HeadChecksum),
                Err(e) => self.read_error(e),
            };
        }
        let (kind, flags) = (head[R_KIND], head[R_FLAGS]);
        let payload_len = le_u32(&head, R_PAYLOAD_LEN) as usize;
        let seq = le_u64(&head, R_SEQ);
        if le_u16(&head, R_RESERVED) != 0 {
            return self.corrupt(Corruption::Reserved);
        }
        if seq != self.next_seq {
            return self.corrupt(Corruption::Sequence { expected: self.next_seq, found: seq });
        }
        if let Err(what) = check_shape(kind, flags, payload_len) {
            return self.corrupt(what);
        }
        // Read the payload and crc through `take`, so memory grows with the bytes present.
        let want = payload_len + 4;
        let mut body = Vec::with_capacity(want.min(1 << 20));
        match (&mut self.input).take(want as u64).read_to_end(&mut body) {
            Ok(n) if n < want => return self.torn("the file ends inside a record"),
            Ok(_) => {}
            Err(e) => return self.read_error(e),
        }
        let stored = le_u32(&body, payload_len);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&head), &body[..payload_len]);
        if stored != computed {
            // The last record of the file with a bad checksum (only zeros, or nothing, after
            // it): an append cut short by a crash, in a file that may have grown ahead of it.
            return match rest_is_zero(&mut self.input) {
                Ok(true) => self.torn("checksum mismatch on the last record"),
                Ok(false) => self.corrupt(Corruption::Checksum { stored, computed }),
                Err(e) => self.read_error(e),
            };
        }
        body.truncate(payload_len);
        let record = match self.decode_payload(kind, flags, body) {
            Ok(r) => r,
            Err(what) => return self.corrupt(what),
        };
        let size = (RECORD_OVERHEAD + payload_len) as u64;
        let entry = Entry { seq, offset: self.pos, size, record };
        self.next_seq += 1;
        self.pos += size;
        Some(Ok(entry))
    }

    /// Builds the record from a checksummed payload, checking what the checksum cannot (ranges
    /// within the export, flush numbering, names).
    fn decode_payload(&mut self, kind: u8, flags: u8, mut body: Vec<u8>) -> Result<Record, Corruption> {
        let fua = flags & FLAG_FUA != 0;
        let size = self.header.export_size;
        let in_export = |offset: u64, len: u64| match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Corruption::Range { offset, len, size }),
        };
        match kind {
            KIND_WRITE if flags & FLAG_ZERO_DATA != 0 => {
                let (offset, len) = (le_u64(&body, 0), le_u64(&body, 8));
                in_export(offset, len)?;
                Ok(Record::Write { offset, data: WriteData::Zeros(len), fua })
            }
            KIND_WRITE => {
                let offset = le_u64(&body, 0);
                in_export(offset, (body.len() - 8) as u64)?;
                body.drain(..8);
                Ok(Record::Write { offset, data: WriteData::Bytes(body), fua })
            }
            KIND_TRIM | KIND_WRITE_ZEROES => {
                let (offset, len) = (le_u64(&body, 0), le_u64(&body, 8));
                in_export(offset, len)?;
                Ok(if kind == KIND_TRIM {
                    Record::Trim { offset, len, fua }
                } else {
                    Record::WriteZeroes { offset, len, fua, no_hole: flags & FLAG_NO_HOLE != 0 }
                })
            }
            KIND_FLUSH => {
                let number = le_u64(&body, 0);
                let expected = self.last_flush + 1;
                if number != expected {
                    return Err(Corruption::FlushNumber { expected, found: number });
                }
                self.last_flush = number;
                Ok(Record::Flush { number })
            }
            KIND_MARK => {
                String::from_utf8(body).map(|name| Record::Mark { name }).map_err(|_| Corruption::MarkName)
            }
            other => Err(Corruption::UnknownKind(other)),
        }
    }
}

/// Checks kind, flags and payload length together, before the payload is read.
fn check_shape(kind: u8, flags: u8, payload_len: usize) -> Result<(), Corruption> {
    let (allowed, len_ok) = match kind {
        KIND_WRITE if flags & FLAG_ZERO_DATA != 0 => (FLAG_FUA | FLAG_ZERO_DATA, payload_len == 16),
        KIND_WRITE => (FLAG_FUA, (8..=MAX_PAYLOAD).contains(&payload_len)),
        KIND_TRIM => (FLAG_FUA, payload_len == 16),
        KIND_WRITE_ZEROES => (FLAG_FUA | FLAG_NO_HOLE, payload_len == 16),
        KIND_FLUSH => (0, payload_len == 8),
        KIND_MARK => (0, (1..=MAX_NAME_LEN).contains(&payload_len)),
        other => return Err(Corruption::UnknownKind(other)),
    };
    if flags & !allowed != 0 {
        return Err(Corruption::Flags { kind, flags });
    }
    if !len_ok {
        return Err(Corruption::PayloadLength { kind, len: payload_len as u64 });
    }
    Ok(())
}

impl<R: Read> Iterator for LogReader<R> {
    type Item = Result<Entry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.end.is_some() {
            return None;
        }
        self.next_entry()
    }
}

/// A whole log decoded: its header, every entry before the first error, and either how it
/// ended or that error.
pub type Decoded = (LogHeader, Vec<Entry>, Result<LogEnd, LogError>);

/// Decodes a whole log held in memory: its header, every entry before the first error, and
/// either how it ended or the error. For tests and fuzzing; tools stream with [`LogReader`].
pub fn decode_all(bytes: &[u8]) -> Result<Decoded, LogError> {
    let mut reader = LogReader::new(bytes)?;
    let mut entries = Vec::new();
    for item in reader.by_ref() {
        match item {
            Ok(e) => entries.push(e),
            Err(e) => {
                let header = reader.header.clone();
                return Ok((header, entries, Err(e)));
            }
        }
    }
    let end = reader.end.clone().unwrap_or(LogEnd::Clean);
    Ok((reader.header, entries, Ok(end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(records: &[Record]) -> Vec<u8> {
        let mut out = LogHeader::new("disk", 1 << 20, 512).encode().unwrap();
        for (seq, r) in records.iter().enumerate() {
            r.encode(seq as u64, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn a_log_round_trips() {
        let records = vec![
            Record::Write { offset: 4096, data: WriteData::Bytes(vec![7; 4096]), fua: false },
            Record::Write { offset: 0, data: WriteData::Zeros(512), fua: true },
            Record::Trim { offset: 8192, len: 4096, fua: false },
            Record::WriteZeroes { offset: 0, len: 1 << 20, fua: true, no_hole: true },
            Record::Flush { number: 1 },
            Record::Mark { name: "after mkfs".into() },
        ];
        let (header, entries, end) = decode_all(&log_of(&records)).unwrap();
        assert_eq!(header.export_name, "disk");
        assert_eq!(entries.into_iter().map(|e| e.record).collect::<Vec<_>>(), records);
        assert_eq!(end.unwrap(), LogEnd::Clean);
    }

    #[test]
    fn an_all_zero_write_is_stored_as_its_length() {
        let mut out = Vec::new();
        encode_write(&mut out, 0, 0, &[0; 4096], false).unwrap();
        assert_eq!(out.len(), RECORD_OVERHEAD + 16);
    }

    #[test]
    fn a_record_cut_anywhere_is_a_torn_tail() {
        let log = log_of(&[Record::Flush { number: 1 }, Record::Mark { name: "m".into() }]);
        let second = log.len() - (RECORD_OVERHEAD + 1);
        for cut in second + 1..log.len() {
            let (_, entries, end) = decode_all(&log[..cut]).unwrap();
            assert_eq!(entries.len(), 1);
            assert!(matches!(end, Ok(LogEnd::Torn(TornTail { entry: 1, .. }))), "cut {cut}: {end:?}");
        }
    }
}
