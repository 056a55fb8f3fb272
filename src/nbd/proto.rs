//! NBD wire types: constants, message layouts, and pure encode/decode/validate functions.
//!
//! Nothing here does I/O, so every decoder is fuzzable and unit-testable on byte slices. All
//! integers on the wire are big-endian (network order), as the NBD specification
//! (NetworkBlockDevice/nbd `doc/proto.md`) requires.
//!
//! Message layouts (sizes in bytes):
//! ```text
//! server greeting   { "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16 }            18
//! client flags      { flags u32 }                                                         4
//! option            { "IHAVEOPT" u64 | option u32 | length u32 } + length bytes          16
//! option reply      { 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 }   20
//! request           { 0x25609513 u32 | flags u16 | type u16 | handle u64 | offset u64 | length u32 }  28
//! simple reply      { 0x67446698 u32 | error u32 | handle u64 }                          16
//! structured chunk  { 0x668e33ef u32 | flags u16 | type u16 | handle u64 | length u32 }  20
//! ```

use std::fmt;

/// First word of the server greeting: ASCII "NBDMAGIC".
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second word of the newstyle greeting and prefix of every option: ASCII "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every (compact) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option header (magic, option, payload length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless the client negotiated NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Largest READ/WRITE payload the server accepts: 32 MiB, the value most clients (qemu, libnbd,
/// the Linux kernel) already stay under; larger requests get EOVERFLOW without any allocation.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest string (export name, description) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload the server reads into memory: a maximal name, its length, and a few
/// hundred info requests. Anything longer is skipped without being stored.
pub const MAX_OPTION_PAYLOAD: u32 = 8192;
/// Preferred block size announced in `NBD_INFO_BLOCK_SIZE`: one page.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Handshake flags (server to client, 16 bits).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client to server, 32 bits). Any other bit makes the server hang up.
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (per export, 16 bits).
pub mod transmission_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types. Errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR + 1;
    pub const ERR_POLICY: u32 = ERR + 2;
    pub const ERR_INVALID: u32 = ERR + 3;
    pub const ERR_PLATFORM: u32 = ERR + 4;
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    pub const ERR_TOO_BIG: u32 = ERR + 9;

    /// Whether a reply type is an error.
    #[must_use]
    pub fn is_error(reply_type: u32) -> bool {
        reply_type & ERR != 0
    }
}

/// `NBD_INFO_*` types carried in `NBD_REP_INFO` replies and requested by INFO/GO.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags (16 bits in every request).
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk flags and types.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const TYPE_NONE: u16 = 0;
    pub const TYPE_OFFSET_DATA: u16 = 1;
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    pub const TYPE_ERROR: u16 = (1 << 15) + 1;
    pub const TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

    /// Whether a chunk type is an error chunk.
    #[must_use]
    pub fn is_error(chunk_type: u16) -> bool {
        chunk_type & (1 << 15) != 0
    }
}

/// NBD error values. They equal the Linux errnos, but the protocol fixes them, so they are spelt
/// out rather than taken from the host's libc.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Command types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    /// The command for a wire value, `None` for values this implementation does not know.
    #[must_use]
    pub fn from_wire(value: u16) -> Option<Self> {
        Some(match value {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            _ => return None,
        })
    }

    /// The wire value.
    #[must_use]
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Disc => 2,
            Self::Flush => 3,
            Self::Trim => 4,
            Self::Cache => 5,
            Self::WriteZeroes => 6,
            Self::BlockStatus => 7,
        }
    }
}

/// A violation that ends the connection: the byte stream can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("unknown client flags {0:#010x}")]
    UnknownClientFlags(u32),
    #[error("bad reply magic {0:#010x}")]
    BadReplyMagic(u32),
    #[error("bad option reply magic {0:#018x}")]
    BadOptionReplyMagic(u64),
    #[error("bad server greeting")]
    BadGreeting,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// The server greeting for fixed newstyle negotiation.
#[must_use]
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Decodes the server greeting, returning the handshake flags.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, ProtoError> {
    if be_u64(b, 0) != NBD_MAGIC || be_u64(b, 8) != IHAVEOPT {
        return Err(ProtoError::BadGreeting);
    }
    Ok(be_u16(b, 16))
}

/// Validates the client flags against what this server offers.
pub fn decode_client_flags(b: [u8; 4]) -> Result<u32, ProtoError> {
    let flags = u32::from_be_bytes(b);
    if flags & !client_flags::KNOWN != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(flags)
}

/// Header of one option sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    /// Decodes an option header; a wrong magic is a protocol violation.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadOptionMagic(magic));
        }
        Ok(Self { option: be_u32(b, 8), len: be_u32(b, 12) })
    }

    #[must_use]
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    #[must_use]
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut out = [0u8; OPTION_REPLY_HEADER_LEN];
        out[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.reply_type.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadOptionReplyMagic(magic));
        }
        Ok(Self { option: be_u32(b, 8), reply_type: be_u32(b, 12), len: be_u32(b, 16) })
    }
}

/// Appends a complete option reply (header and payload) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    // Payloads built by this server are bounded by MAX_STRING_LEN plus small fixed parts.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&OptionReplyHeader { option, reply_type, len }.encode());
    out.extend_from_slice(payload);
}

/// Why an option payload was refused; each maps to an option error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionParseError {
    #[error("option payload is malformed: {0}")]
    Invalid(&'static str),
}

/// Validates an NBD string (export name, description): at most 4096 bytes, UTF-8, no NUL.
pub fn parse_string(bytes: &[u8]) -> Result<&str, OptionParseError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionParseError::Invalid("string longer than 4096 bytes"));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| OptionParseError::Invalid("string is not UTF-8"))?;
    if s.contains('\0') {
        return Err(OptionParseError::Invalid("string contains NUL"));
    }
    Ok(s)
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
///
/// Format: `{ name length u32 | name | request count u16 | [info type u16] }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses an INFO/GO payload. Every length is checked against the bytes actually present
    /// before it is used, and the total must match exactly.
    pub fn parse(payload: &[u8]) -> Result<Self, OptionParseError> {
        if payload.len() < 6 {
            return Err(OptionParseError::Invalid("INFO/GO payload shorter than 6 bytes"));
        }
        let name_len = be_u32(payload, 0) as usize;
        let rest = payload.len() - 4;
        if name_len > rest.saturating_sub(2) {
            return Err(OptionParseError::Invalid("INFO/GO name length exceeds payload"));
        }
        let name = parse_string(&payload[4..4 + name_len])?.to_owned();
        let count_at = 4 + name_len;
        let count = be_u16(payload, count_at) as usize;
        let reqs = &payload[count_at + 2..];
        if reqs.len() != count * 2 {
            return Err(OptionParseError::Invalid("INFO/GO request count does not match payload"));
        }
        let requests = reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        Ok(Self { name, requests })
    }

    /// Encodes the payload (client side).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }
}

/// Payload of `NBD_REP_INFO` with `NBD_INFO_EXPORT`: `{ type u16 = 0 | size u64 | flags u16 }`.
#[must_use]
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Payload of `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`:
/// `{ type u16 = 3 | minimum u32 | preferred u32 | maximum u32 }`.
#[must_use]
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&min.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&max.to_be_bytes());
    out
}

/// Payload of `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`):
/// `{ type u16 | string }`.
#[must_use]
pub fn encode_info_string(info_type: u16, s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + s.len());
    out.extend_from_slice(&info_type.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

/// One export as `NBD_OPT_LIST` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedExport {
    pub name: String,
    /// Free text for humans (may be empty).
    pub description: String,
}

/// Payload of `NBD_REP_SERVER`: `{ name length u32 | name | description }`. The spec leaves the
/// bytes after the name for "details suitable for direct display to a human"; clients (libnbd's
/// `nbdinfo --list`) show them as the export's description. Both strings are cut at
/// [`MAX_STRING_LEN`] bytes (on a character boundary).
#[must_use]
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let name = truncate_to_char_boundary(name, MAX_STRING_LEN);
    let description = truncate_to_char_boundary(description, MAX_STRING_LEN);
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// Decodes an `NBD_REP_SERVER` payload (client side); the name length is checked against the
/// payload before it is used.
pub fn decode_rep_server(payload: &[u8]) -> Result<ListedExport, ProtoError> {
    if payload.len() < 4 {
        return Err(ProtoError::Malformed("NBD_REP_SERVER shorter than 4 bytes"));
    }
    let name_len = be_u32(payload, 0) as usize;
    let rest = &payload[4..];
    if name_len > rest.len() {
        return Err(ProtoError::Malformed("NBD_REP_SERVER name length exceeds the reply"));
    }
    let (name, description) = rest.split_at(name_len);
    Ok(ListedExport {
        name: String::from_utf8_lossy(name).into_owned(),
        description: String::from_utf8_lossy(description).into_owned(),
    })
}

/// The one metadata context this server knows: which ranges are holes that read as zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id the server gives `base:allocation` in `NBD_REP_META_CONTEXT` for SET (LIST uses 0).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Status flags of `base:allocation` extents.
pub mod alloc_state {
    /// Unallocated (a hole); clear means allocated or unknown.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeros; clear means it may hold data.
    pub const ZERO: u32 = 1 << 1;
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
///
/// Format: `{ export name length u32 | name | query count u32 | [ query length u32 | query ] }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export_name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses the payload; every length is checked against the bytes left before it is used, and
    /// the queries must end exactly at the end of the payload.
    pub fn parse(payload: &[u8]) -> Result<Self, OptionParseError> {
        let mut rest = payload;
        let export_name = take_string(&mut rest)?.to_owned();
        if rest.len() < 4 {
            return Err(OptionParseError::Invalid("meta context payload lacks the query count"));
        }
        let count = be_u32(rest, 0) as usize;
        rest = &rest[4..];
        // Each query takes at least its 4-byte length: a count beyond that is a lie.
        if count > rest.len() / 4 {
            return Err(OptionParseError::Invalid("meta context query count exceeds the payload"));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            queries.push(take_string(&mut rest)?.to_owned());
        }
        if !rest.is_empty() {
            return Err(OptionParseError::Invalid("meta context payload has trailing bytes"));
        }
        Ok(Self { export_name, queries })
    }

    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.export_name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.export_name.as_bytes());
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            out.extend_from_slice(&(q.len() as u32).to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
        out
    }
}

/// Takes a `{ length u32 | string }` off the front of `rest`.
fn take_string<'a>(rest: &mut &'a [u8]) -> Result<&'a str, OptionParseError> {
    if rest.len() < 4 {
        return Err(OptionParseError::Invalid("string length missing"));
    }
    let len = be_u32(rest, 0) as usize;
    if len > rest.len() - 4 {
        return Err(OptionParseError::Invalid("string length exceeds the payload"));
    }
    let s = parse_string(&rest[4..4 + len])?;
    *rest = &rest[4 + len..];
    Ok(s)
}

/// Payload of `NBD_REP_META_CONTEXT`: `{ context id u32 | name }`.
#[must_use]
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk:
/// `{ context id u32 | [ extent length u32 | status flags u32 ] }`.
#[must_use]
pub fn encode_block_status(context_id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * extents.len());
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
#[must_use]
pub fn truncate_to_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Export information as a client learns it from `NBD_REP_INFO` / the EXPORT_NAME reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub name: Option<String>,
    pub description: Option<String>,
    /// (minimum, preferred, maximum)
    pub block_size: Option<(u32, u32, u32)>,
}

impl ExportInfo {
    /// Folds one `NBD_REP_INFO` payload into `self`. Unknown info types are ignored, as the spec
    /// asks of clients.
    pub fn apply_info_reply(&mut self, payload: &[u8]) -> Result<(), ProtoError> {
        if payload.len() < 2 {
            return Err(ProtoError::Malformed("NBD_REP_INFO shorter than 2 bytes"));
        }
        match be_u16(payload, 0) {
            info::EXPORT => {
                if payload.len() != 12 {
                    return Err(ProtoError::Malformed("NBD_INFO_EXPORT has wrong length"));
                }
                self.size = be_u64(payload, 2);
                self.flags = be_u16(payload, 10);
            }
            info::NAME => {
                self.name = Some(String::from_utf8_lossy(&payload[2..]).into_owned());
            }
            info::DESCRIPTION => {
                self.description = Some(String::from_utf8_lossy(&payload[2..]).into_owned());
            }
            info::BLOCK_SIZE => {
                if payload.len() != 14 {
                    return Err(ProtoError::Malformed("NBD_INFO_BLOCK_SIZE has wrong length"));
                }
                self.block_size = Some((be_u32(payload, 2), be_u32(payload, 6), be_u32(payload, 10)));
            }
            _ => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// A request header exactly as received; [`check_request`] turns it into a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub cmd_type: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Decodes a request header; a wrong magic is a protocol violation.
    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadRequestMagic(magic));
        }
        Ok(Self {
            flags: be_u16(b, 4),
            cmd_type: be_u16(b, 6),
            handle: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        })
    }

    #[must_use]
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.cmd_type.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header on the wire, whatever the server decides about
    /// the request: only WRITE carries a payload in the compact request format.
    #[must_use]
    pub fn payload_len(&self) -> u32 {
        if self.cmd_type == Command::Write.to_wire() { self.length } else { 0 }
    }
}

/// What the server knows about the export when it checks a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportParams {
    pub size: u64,
    pub read_only: bool,
    pub structured_replies: bool,
    /// The client selected `base:allocation` for this export (`NBD_OPT_SET_META_CONTEXT`), so
    /// `NBD_CMD_BLOCK_STATUS` is allowed.
    pub block_status: bool,
}

/// A validated request: every field is in range for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
        fast_zero: bool,
    },
    /// `req_one`: the client wants only the first extent.
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// A request the server answers with an error (the connection goes on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub reason: &'static str,
}

fn reject(errno: u32, reason: &'static str) -> Rejection {
    Rejection { errno, reason }
}

/// Checks a request against the spec and the export, in the order the errors matter most:
/// unknown command and flags (EINVAL), payload size (EOVERFLOW), length zero (EINVAL), range
/// (EINVAL for reads, ENOSPC for writes, as the spec and nbdkit answer), read-only (EPERM).
///
/// The caller discards `header.payload_len()` bytes when it rejects a WRITE.
pub fn check_request(h: &RequestHeader, export: &ExportParams) -> Result<Request, Rejection> {
    use cmd_flags::{DF, FAST_ZERO, FUA, NO_HOLE, REQ_ONE};
    let Some(cmd) = Command::from_wire(h.cmd_type) else {
        return Err(reject(errno::EINVAL, "unknown command"));
    };
    // FUA is valid on every command (ignored where nothing is written); the others only where the
    // spec documents them. DF needs structured replies.
    let allowed = match cmd {
        Command::Read if export.structured_replies => FUA | DF,
        Command::WriteZeroes => FUA | NO_HOLE | FAST_ZERO,
        Command::BlockStatus => FUA | REQ_ONE,
        _ => FUA,
    };
    if h.flags & !allowed != 0 {
        return Err(reject(errno::EINVAL, "command flag not valid for this command"));
    }
    let fua = h.flags & FUA != 0;
    let (offset, len) = (h.offset, h.length);
    match cmd {
        Command::Disc => return Ok(Request::Disc),
        Command::Flush => {
            if offset != 0 || len != 0 {
                return Err(reject(errno::EINVAL, "FLUSH with nonzero offset or length"));
            }
            return Ok(Request::Flush);
        }
        Command::BlockStatus if !export.block_status => {
            return Err(reject(errno::EINVAL, "BLOCK_STATUS without a metadata context"));
        }
        _ => {}
    }
    if matches!(cmd, Command::Read | Command::Write) && len > MAX_PAYLOAD {
        return Err(reject(errno::EOVERFLOW, "payload larger than 32 MiB"));
    }
    if len == 0 {
        return Err(reject(errno::EINVAL, "zero-length request"));
    }
    let writes = matches!(cmd, Command::Write | Command::WriteZeroes | Command::Trim);
    match offset.checked_add(u64::from(len)) {
        Some(end) if end <= export.size => {}
        _ => {
            let errno = if matches!(cmd, Command::Write | Command::WriteZeroes) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return Err(reject(errno, "request beyond the end of the export"));
        }
    }
    if writes && export.read_only {
        return Err(reject(errno::EPERM, "export is read-only"));
    }
    Ok(match cmd {
        Command::Read => Request::Read { offset, len, df: h.flags & DF != 0 },
        Command::Write => Request::Write { offset, len, fua },
        Command::Trim => Request::Trim { offset, len, fua },
        Command::Cache => Request::Cache { offset, len },
        Command::BlockStatus => Request::BlockStatus { offset, len, req_one: h.flags & REQ_ONE != 0 },
        // Only WriteZeroes is left: the other commands returned above.
        _ => Request::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: h.flags & NO_HOLE != 0,
            fast_zero: h.flags & FAST_ZERO != 0,
        },
    })
}

/// A simple reply: `{ magic | error | handle }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub errno: u32,
    pub handle: u64,
}

impl SimpleReply {
    #[must_use]
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.errno.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub handle: u64,
    pub len: u32,
}

impl ChunkHeader {
    #[must_use]
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.chunk_type.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// The first 16 bytes of any reply, enough to tell a simple reply from a structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStart {
    /// A complete simple reply.
    Simple(SimpleReply),
    /// A chunk header whose last 4 bytes (the payload length) are still to be read.
    Chunk { flags: u16, chunk_type: u16, handle: u64 },
}

/// Decodes the first 16 bytes of a reply (client side).
pub fn decode_reply_start(b: &[u8; 16]) -> Result<ReplyStart, ProtoError> {
    match be_u32(b, 0) {
        SIMPLE_REPLY_MAGIC => {
            Ok(ReplyStart::Simple(SimpleReply { errno: be_u32(b, 4), handle: be_u64(b, 8) }))
        }
        STRUCTURED_REPLY_MAGIC => {
            Ok(ReplyStart::Chunk { flags: be_u16(b, 4), chunk_type: be_u16(b, 6), handle: be_u64(b, 8) })
        }
        other => Err(ProtoError::BadReplyMagic(other)),
    }
}

/// The error chunk payload: `{ error u32 | message length u16 | message }`.
#[must_use]
pub fn encode_error_chunk_payload(errno: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    let mut out = Vec::with_capacity(6 + msg.len());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A decoded error chunk payload.
pub fn decode_error_chunk_payload(payload: &[u8]) -> Result<(u32, String), ProtoError> {
    if payload.len() < 6 {
        return Err(ProtoError::Malformed("error chunk shorter than 6 bytes"));
    }
    let msg_len = be_u16(payload, 4) as usize;
    if msg_len > payload.len() - 6 {
        return Err(ProtoError::Malformed("error chunk message length exceeds chunk"));
    }
    Ok((be_u32(payload, 0), String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned()))
}

/// Display helper for an errno in messages.
#[derive(Debug, Clone, Copy)]
pub struct Errno(pub u32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            errno::EPERM => "EPERM",
            errno::EIO => "EIO",
            errno::ENOMEM => "ENOMEM",
            errno::EINVAL => "EINVAL",
            errno::ENOSPC => "ENOSPC",
            errno::EOVERFLOW => "EOVERFLOW",
            errno::ENOTSUP => "ENOTSUP",
            errno::ESHUTDOWN => "ESHUTDOWN",
            _ => return write!(f, "errno {}", self.0),
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(size: u64) -> ExportParams {
        ExportParams { size, read_only: false, structured_replies: false, block_status: false }
    }

    fn header(cmd: Command, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, cmd_type: cmd.to_wire(), handle: 0x0102_0304_0506_0708, offset, length }
    }

    #[test]
    fn magics_spell_what_the_spec_says() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(encode_greeting(3)[..16], *b"NBDMAGICIHAVEOPT");
        assert_eq!(decode_greeting(&encode_greeting(3)), Ok(3));
        let mut bad = encode_greeting(3);
        bad[0] = b'X';
        assert_eq!(decode_greeting(&bad), Err(ProtoError::BadGreeting));
    }

    #[test]
    fn request_header_layout_is_big_endian_and_round_trips() {
        let h = header(Command::Write, cmd_flags::FUA, 0x1122_3344_5566_7788, 0x99aa_bbcc);
        let b = h.encode();
        assert_eq!(b[..4], [0x25, 0x60, 0x95, 0x13]);
        assert_eq!(b[4..6], [0, 1]);
        assert_eq!(b[6..8], [0, 1]);
        assert_eq!(b[8..16], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(b[16..24], [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        assert_eq!(b[24..28], [0x99, 0xaa, 0xbb, 0xcc]);
        assert_eq!(RequestHeader::decode(&b), Ok(h));
        assert_eq!(h.payload_len(), 0x99aa_bbcc);
        assert_eq!(header(Command::Read, 0, 0, 4096).payload_len(), 0);
        let mut bad = b;
        bad[3] ^= 1;
        assert_eq!(RequestHeader::decode(&bad), Err(ProtoError::BadRequestMagic(0x2560_9512)));
    }

    #[test]
    fn replies_encode_to_the_spec_layout() {
        let r = SimpleReply { errno: errno::EIO, handle: 9 }.encode();
        assert_eq!(r[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(r[4..8], [0, 0, 0, 5]);
        assert_eq!(decode_reply_start(&r), Ok(ReplyStart::Simple(SimpleReply { errno: 5, handle: 9 })));
        let c =
            ChunkHeader { flags: chunk::FLAG_DONE, chunk_type: chunk::TYPE_OFFSET_HOLE, handle: 3, len: 12 };
        let b = c.encode();
        let mut start = [0u8; 16];
        start.copy_from_slice(&b[..16]);
        assert_eq!(
            decode_reply_start(&start),
            Ok(ReplyStart::Chunk { flags: chunk::FLAG_DONE, chunk_type: chunk::TYPE_OFFSET_HOLE, handle: 3 })
        );
        assert_eq!(b[16..20], [0, 0, 0, 12]);
        start[0] = 0;
        assert!(matches!(decode_reply_start(&start), Err(ProtoError::BadReplyMagic(_))));
        let mut out = Vec::new();
        encode_option_reply(&mut out, opt::GO, rep::ERR_UNKNOWN, b"no");
        assert_eq!(out.len(), OPTION_REPLY_HEADER_LEN + 2);
        let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
        hdr.copy_from_slice(&out[..OPTION_REPLY_HEADER_LEN]);
        let decoded = OptionReplyHeader::decode(&hdr).unwrap();
        assert_eq!(decoded, OptionReplyHeader { option: opt::GO, reply_type: rep::ERR_UNKNOWN, len: 2 });
        assert!(rep::is_error(decoded.reply_type) && !rep::is_error(rep::ACK));
        assert_eq!(rep::ERR_UNSUP, 0x8000_0001);
    }

    #[test]
    fn error_chunk_payload_round_trips_and_rejects_bad_lengths() {
        let p = encode_error_chunk_payload(errno::ENOSPC, "full");
        assert_eq!(decode_error_chunk_payload(&p), Ok((errno::ENOSPC, "full".to_owned())));
        assert!(decode_error_chunk_payload(&p[..5]).is_err());
        let mut long = p;
        long[5] = 200; // message length beyond the chunk
        assert!(decode_error_chunk_payload(&long).is_err());
    }

    #[test]
    fn info_request_parses_exactly_and_refuses_inconsistent_lengths() {
        let req = InfoRequest { name: "disk".into(), requests: vec![info::NAME, info::BLOCK_SIZE] };
        let enc = req.encode();
        assert_eq!(enc, [0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 2, 0, 1, 0, 3]);
        assert_eq!(InfoRequest::parse(&enc), Ok(req));
        assert!(InfoRequest::parse(&enc[..enc.len() - 1]).is_err(), "truncated request list");
        let mut extra = enc;
        extra.push(0);
        assert!(InfoRequest::parse(&extra).is_err(), "trailing byte");
        assert!(InfoRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err(), "huge name length");
        assert!(InfoRequest::parse(&[0, 0, 0, 1, b'x', 0]).is_err(), "name eats the count");
        assert!(InfoRequest::parse(&[0, 0, 0, 1, 0, 0, 0]).is_err(), "NUL in name");
        assert!(InfoRequest::parse(&[0, 0, 0, 1, 0xff, 0, 0]).is_err(), "invalid UTF-8");
        assert_eq!(
            InfoRequest::parse(&[0, 0, 0, 0, 0, 0]),
            Ok(InfoRequest { name: String::new(), requests: vec![] })
        );
        let long = "x".repeat(MAX_STRING_LEN + 1);
        assert!(InfoRequest::parse(&InfoRequest { name: long, requests: vec![] }.encode()).is_err());
    }

    #[test]
    fn info_replies_fold_into_export_info() {
        let mut info = ExportInfo::default();
        info.apply_info_reply(&encode_info_export(1 << 30, 0x1234)).unwrap();
        info.apply_info_reply(&encode_info_block_size(512, 4096, 1 << 25)).unwrap();
        info.apply_info_reply(&encode_info_string(info::NAME, "n")).unwrap();
        info.apply_info_reply(&encode_info_string(info::DESCRIPTION, "d")).unwrap();
        info.apply_info_reply(&[0, 99, 1, 2, 3]).unwrap(); // unknown types are ignored
        assert_eq!((info.size, info.flags), (1 << 30, 0x1234));
        assert_eq!(info.block_size, Some((512, 4096, 1 << 25)));
        assert_eq!((info.name.as_deref(), info.description.as_deref()), (Some("n"), Some("d")));
        assert!(info.apply_info_reply(&encode_info_export(1, 1)[..11]).is_err());
        assert!(info.apply_info_reply(&[0]).is_err());
    }

    #[test]
    fn rep_server_carries_name_then_description_and_rejects_bad_lengths() {
        let p = encode_rep_server("disk", "a file");
        assert_eq!(p, [&[0, 0, 0, 4][..], b"disk", b"a file"].concat());
        let listed = decode_rep_server(&p).unwrap();
        assert_eq!(listed, ListedExport { name: "disk".into(), description: "a file".into() });
        assert_eq!(decode_rep_server(&encode_rep_server("", "")).unwrap().name, "");
        assert!(decode_rep_server(&[0, 0, 0]).is_err(), "shorter than the length field");
        assert!(decode_rep_server(&[0, 0, 0, 5, b'a']).is_err(), "name longer than the reply");
        assert!(decode_rep_server(&[0xff, 0xff, 0xff, 0xff]).is_err(), "huge name length");
        // Overlong strings are cut to the spec's limit on a character boundary.
        let long = "é".repeat(MAX_STRING_LEN);
        let listed = decode_rep_server(&encode_rep_server(&long, &long)).unwrap();
        assert_eq!((listed.name.len(), listed.description.len()), (MAX_STRING_LEN, MAX_STRING_LEN));
        assert_eq!(truncate_to_char_boundary("aé", 2), "a");
    }

    #[test]
    fn meta_context_requests_parse_exactly_and_refuse_bad_lengths() {
        let req = MetaContextRequest { export_name: "d".into(), queries: vec!["base:allocation".into()] };
        let enc = req.encode();
        assert_eq!(enc[..9], [0, 0, 0, 1, b'd', 0, 0, 0, 1]);
        assert_eq!(MetaContextRequest::parse(&enc), Ok(req));
        assert!(MetaContextRequest::parse(&enc[..enc.len() - 1]).is_err(), "truncated query");
        let mut extra = enc;
        extra.push(0);
        assert!(MetaContextRequest::parse(&extra).is_err(), "trailing byte");
        assert!(MetaContextRequest::parse(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err(), "huge count");
        assert!(MetaContextRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0]).is_err(), "huge query");
        assert!(MetaContextRequest::parse(&[0, 0, 0]).is_err());
        let none = MetaContextRequest { export_name: String::new(), queries: vec![] };
        assert_eq!(MetaContextRequest::parse(&none.encode()), Ok(none));
        assert_eq!(encode_rep_meta_context(1, "base:allocation")[..4], [0, 0, 0, 1]);
        assert_eq!(encode_block_status(1, &[(4096, 3)]), [0, 0, 0, 1, 0, 0, 16, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn block_status_needs_a_negotiated_context() {
        let h = header(Command::BlockStatus, cmd_flags::REQ_ONE, 0, 4096);
        let mut p = params(1 << 20);
        assert_eq!(check_request(&h, &p).map_err(|r| r.errno), Err(errno::EINVAL));
        p.block_status = true;
        assert_eq!(check_request(&h, &p), Ok(Request::BlockStatus { offset: 0, len: 4096, req_one: true }));
        let past_end = header(Command::BlockStatus, 0, 1 << 20, 1);
        assert_eq!(check_request(&past_end, &p).map_err(|r| r.errno), Err(errno::EINVAL));
        let empty = header(Command::BlockStatus, 0, 0, 0);
        assert_eq!(check_request(&empty, &p).map_err(|r| r.errno), Err(errno::EINVAL));
    }

    #[test]
    fn client_flags_outside_the_known_set_are_refused() {
        assert_eq!(decode_client_flags([0, 0, 0, 3]), Ok(3));
        assert_eq!(decode_client_flags([0, 0, 0, 4]), Err(ProtoError::UnknownClientFlags(4)));
        assert_eq!(decode_client_flags([0x80, 0, 0, 1]), Err(ProtoError::UnknownClientFlags(0x8000_0001)));
    }

    #[test]
    fn check_request_accepts_valid_requests() {
        let p = params(1 << 20);
        assert_eq!(
            check_request(&header(Command::Read, 0, 0, 4096), &p),
            Ok(Request::Read { offset: 0, len: 4096, df: false })
        );
        assert_eq!(
            check_request(&header(Command::Write, cmd_flags::FUA, (1 << 20) - 1, 1), &p),
            Ok(Request::Write { offset: (1 << 20) - 1, len: 1, fua: true })
        );
        assert_eq!(check_request(&header(Command::Flush, cmd_flags::FUA, 0, 0), &p), Ok(Request::Flush));
        assert_eq!(check_request(&header(Command::Disc, 0, 123, 456), &p), Ok(Request::Disc));
        let all = cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO;
        assert_eq!(
            check_request(&header(Command::WriteZeroes, all, 0, 512), &p),
            Ok(Request::WriteZeroes { offset: 0, len: 512, fua: true, no_hole: true, fast_zero: true })
        );
        // Trim, cache and zeroes are not bounded by the payload limit: nothing is transferred.
        let big = params(u64::MAX);
        assert!(matches!(
            check_request(&header(Command::Trim, 0, 0, u32::MAX), &big),
            Ok(Request::Trim { .. })
        ));
        assert!(matches!(
            check_request(&header(Command::Cache, 0, 0, u32::MAX), &big),
            Ok(Request::Cache { .. })
        ));
        let structured = ExportParams { structured_replies: true, ..p };
        assert_eq!(
            check_request(&header(Command::Read, cmd_flags::DF, 0, 1), &structured),
            Ok(Request::Read { offset: 0, len: 1, df: true })
        );
        let ro = ExportParams { read_only: true, ..p };
        assert!(matches!(check_request(&header(Command::Read, 0, 0, 1), &ro), Ok(Request::Read { .. })));
        assert!(matches!(check_request(&header(Command::Cache, 0, 0, 1), &ro), Ok(Request::Cache { .. })));
    }

    #[test]
    fn check_request_answers_each_violation_with_its_errno() {
        let p = params(1 << 20);
        let ro = ExportParams { read_only: true, ..p };
        let errno_of = |h: RequestHeader, p: &ExportParams| check_request(&h, p).err().map(|r| r.errno);
        let raw = |cmd_type: u16| RequestHeader { flags: 0, cmd_type, handle: 1, offset: 0, length: 1 };
        assert_eq!(errno_of(raw(8), &p), Some(errno::EINVAL), "RESIZE is unknown here");
        assert_eq!(errno_of(raw(0xffff), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::BlockStatus, 0, 0, 1), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Read, 1 << 15, 0, 1), &p), Some(errno::EINVAL), "unknown flag");
        assert_eq!(
            errno_of(header(Command::Read, cmd_flags::DF, 0, 1), &p),
            Some(errno::EINVAL),
            "DF unnegotiated"
        );
        assert_eq!(errno_of(header(Command::Write, cmd_flags::NO_HOLE, 0, 1), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Trim, cmd_flags::FAST_ZERO, 0, 1), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Read, cmd_flags::REQ_ONE, 0, 1), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Write, cmd_flags::PAYLOAD_LEN, 0, 1), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Flush, 0, 1, 0), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Read, 0, 0, MAX_PAYLOAD + 1), &p), Some(errno::EOVERFLOW));
        assert_eq!(errno_of(header(Command::Write, 0, 0, u32::MAX), &p), Some(errno::EOVERFLOW));
        for cmd in [Command::Read, Command::Write, Command::Trim, Command::Cache, Command::WriteZeroes] {
            assert_eq!(errno_of(header(cmd, 0, 0, 0), &p), Some(errno::EINVAL), "{cmd:?} of length 0");
        }
        assert_eq!(errno_of(header(Command::Read, 0, 1 << 20, 1), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Read, 0, u64::MAX, 1), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Cache, 0, (1 << 20) - 1, 2), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Trim, 0, (1 << 20) - 1, 2), &p), Some(errno::EINVAL));
        assert_eq!(errno_of(header(Command::Write, 0, (1 << 20) - 1, 2), &p), Some(errno::ENOSPC));
        assert_eq!(errno_of(header(Command::Write, 0, u64::MAX - 1, 2), &p), Some(errno::ENOSPC));
        assert_eq!(errno_of(header(Command::WriteZeroes, 0, 1 << 20, 1), &p), Some(errno::ENOSPC));
        for cmd in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(errno_of(header(cmd, 0, 0, 1), &ro), Some(errno::EPERM), "{cmd:?} on read-only");
        }
    }

    #[test]
    fn command_wire_values_round_trip() {
        for v in 0..=7u16 {
            assert_eq!(Command::from_wire(v).map(Command::to_wire), Some(v));
        }
        assert_eq!(Command::from_wire(8), None);
    }
}
