//! A small, general async NBD client: fixed newstyle handshake with `NBD_OPT_GO` (or the old
//! `NBD_OPT_EXPORT_NAME`), optional structured replies, and every command with its flags.
//!
//! Any number of requests may be in flight: each call registers its handle, writes its request
//! under a short lock, and awaits its own reply; a reader task matches replies (in whatever order
//! they come) to handles. The client is `Sync`, so share it by reference or in an `Arc`.
//!
//! A READ reply must account for every byte: the chunks of a structured reply must lie inside
//! the request, must not overlap, and together must cover it exactly; a simple reply must not
//! follow chunks. Anything else is a broken or hostile server, and the bytes it left out would
//! otherwise reach the caller as zeros: the request fails and the connection is dropped.

use super::proto::{
    self, ChunkHeader, Command, ExportInfo, OptionHeader, OptionReplyHeader, ReplyStart, RequestHeader,
    chunk, client_flags, cmd_flags, handshake_flags, info, opt, rep,
};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::oneshot;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("server refused option {option}: reply type {reply_type:#x}: {message}")]
    OptionRefused { option: u32, reply_type: u32, message: String },
    #[error("server does not do fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("server answered {}: {message}", proto::Errno(*errno))]
    Server { errno: u32, message: String },
    #[error("connection closed: {0}")]
    Disconnected(String),
    #[error("request too large: {0} bytes")]
    TooLarge(usize),
    #[error("bad NBD URI {0:?}")]
    BadUri(String),
}

impl ClientError {
    /// The NBD errno of a server error reply, if this is one.
    #[must_use]
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// How to negotiate.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub export_name: String,
    /// Ask for structured replies (READ then may carry hole chunks).
    pub structured_replies: bool,
    /// Enter transmission with `NBD_OPT_GO` (true) or the legacy `NBD_OPT_EXPORT_NAME` (false).
    pub use_go: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self { export_name: String::new(), structured_replies: true, use_go: true }
    }
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// One request awaiting its reply.
struct Pending {
    /// For READ: the request's offset and the buffer being filled (zeros where holes are).
    read: Option<(u64, Vec<u8>)>,
    /// For READ: the parts of the buffer the chunks received so far cover.
    covered: Coverage,
    /// Whether a structured chunk arrived for this request (a simple reply may no longer).
    chunked: bool,
    /// The first error chunk of a structured reply.
    error: Option<(u32, String)>,
    done: oneshot::Sender<Result<Vec<u8>, ClientError>>,
}

/// At most this many disjoint covered islands per READ: chunks that arrive in order (or in
/// reverse) merge into one, so only a server scattering tiny chunks out of order gets near it,
/// and the table of a 32 MiB READ cannot grow to one entry per byte.
const MAX_COVERAGE_ISLANDS: usize = 4096;

/// The byte ranges (relative to the request) that a READ's chunks have filled, merged where
/// they touch: start -> end.
#[derive(Debug, Default)]
struct Coverage(BTreeMap<u64, u64>);

impl Coverage {
    /// Records `start..end` (non-empty); refuses a range that overlaps one already covered.
    fn claim(&mut self, start: u64, end: u64) -> Result<(), &'static str> {
        let (mut lo, mut hi) = (start, end);
        // Only the last range starting before `end` can overlap: ranges never overlap each
        // other, so every earlier one ends before its start.
        if let Some((&s, &e)) = self.0.range(..end).next_back() {
            if e > start {
                return Err("structured chunks overlap");
            }
            if e == start {
                self.0.remove(&s);
                lo = s;
            }
        }
        if let Some(e) = self.0.remove(&end) {
            hi = e;
        }
        self.0.insert(lo, hi);
        if self.0.len() > MAX_COVERAGE_ISLANDS {
            return Err("structured reply split into too many out-of-order chunks");
        }
        Ok(())
    }

    /// Whether the ranges cover `0..len` exactly.
    fn is_whole(&self, len: u64) -> bool {
        if len == 0 {
            return self.0.is_empty();
        }
        self.0.len() == 1 && self.0.get(&0) == Some(&len)
    }
}

#[derive(Default)]
struct PendingTable {
    map: HashMap<u64, Pending>,
    /// Set once the reader stopped; later requests fail at once with this reason.
    closed: Option<String>,
}

/// A connected client in the transmission phase.
pub struct NbdClient {
    info: ExportInfo,
    structured: bool,
    writer: tokio::sync::Mutex<BufWriter<BoxWrite>>,
    pending: Arc<parking_lot::Mutex<PendingTable>>,
    next_handle: AtomicU64,
    reader_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("info", &self.info).field("structured", &self.structured).finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader_task.abort();
    }
}

pub use super::uri::UriTarget;

/// Parses an NBD URI (see [`super::uri`]) into a target and an export name.
pub fn parse_uri(uri: &str) -> Result<(UriTarget, String), ClientError> {
    super::uri::parse(uri).ok_or_else(|| ClientError::BadUri(uri.to_owned()))
}

/// Sends one option.
async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    payload: &[u8],
) -> Result<(), ClientError> {
    let len = u32::try_from(payload.len()).map_err(|_| ClientError::TooLarge(payload.len()))?;
    w.write_all(&OptionHeader { option, len }.encode()).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

/// Longest option reply payload the client accepts (a reply carries at most a few strings).
const MAX_OPTION_REPLY: u32 = 64 << 10;

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut hdr = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    r.read_exact(&mut hdr).await?;
    let header = OptionReplyHeader::decode(&hdr)?;
    if header.option != option {
        return Err(proto::ProtoError::Malformed("option reply for a different option").into());
    }
    if header.len > MAX_OPTION_REPLY {
        return Err(proto::ProtoError::Malformed("option reply too long").into());
    }
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload).await?;
    Ok((header, payload))
}

fn refused(option: u32, header: &OptionReplyHeader, payload: &[u8]) -> ClientError {
    ClientError::OptionRefused {
        option,
        reply_type: header.reply_type,
        message: String::from_utf8_lossy(payload).into_owned(),
    }
}

/// Reads the greeting and sends client flags; returns whether NO_ZEROES was agreed.
async fn greet<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
) -> Result<bool, ClientError> {
    let mut greeting = [0u8; proto::GREETING_LEN];
    r.read_exact(&mut greeting).await?;
    let flags = proto::decode_greeting(&greeting)?;
    if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    let no_zeroes = flags & handshake_flags::NO_ZEROES != 0;
    let mut cflags = client_flags::FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= client_flags::NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

/// Lists the exports of a server (`NBD_OPT_LIST`) with their descriptions on a fresh stream,
/// then aborts.
pub async fn list_exports<S>(stream: S) -> Result<Vec<proto::ListedExport>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    greet(&mut r, &mut w).await?;
    send_option(&mut w, opt::LIST, &[]).await?;
    let mut names = Vec::new();
    loop {
        let (header, payload) = read_option_reply(&mut r, opt::LIST).await?;
        match header.reply_type {
            rep::ACK => break,
            rep::SERVER => names.push(proto::decode_rep_server(&payload)?),
            _ => return Err(refused(opt::LIST, &header, &payload)),
        }
    }
    send_option(&mut w, opt::ABORT, &[]).await?;
    Ok(names)
}

/// Queries an export with `NBD_OPT_INFO` (name, description, block size) on a fresh stream,
/// then aborts.
pub async fn query_info<S>(stream: S, export_name: &str) -> Result<ExportInfo, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    greet(&mut r, &mut w).await?;
    let info = negotiate_info(&mut r, &mut w, opt::INFO, export_name).await?;
    send_option(&mut w, opt::ABORT, &[]).await?;
    Ok(info)
}

async fn negotiate_info<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    option: u32,
    export_name: &str,
) -> Result<ExportInfo, ClientError> {
    let request = proto::InfoRequest {
        name: export_name.to_owned(),
        requests: vec![info::NAME, info::DESCRIPTION, info::BLOCK_SIZE],
    };
    send_option(w, option, &request.encode()).await?;
    let mut export = ExportInfo::default();
    let mut got_export = false;
    loop {
        let (header, payload) = read_option_reply(r, option).await?;
        match header.reply_type {
            rep::INFO => {
                export.apply_info_reply(&payload)?;
                got_export |= payload.get(..2) == Some(&info::EXPORT.to_be_bytes()[..]);
            }
            rep::ACK if got_export => return Ok(export),
            rep::ACK => return Err(proto::ProtoError::Malformed("ACK without NBD_INFO_EXPORT").into()),
            t if rep::is_error(t) => return Err(refused(option, &header, &payload)),
            // Unknown non-error replies are ignored, as the spec asks.
            _ => {}
        }
    }
}

impl NbdClient {
    /// Connects to an `nbd://` or `nbd+unix://` URI; the URI's export name wins over
    /// `opts.export_name`.
    pub async fn connect_uri(uri: &str, opts: &ClientOptions) -> Result<Self, ClientError> {
        let (target, name) = parse_uri(uri)?;
        let opts = ClientOptions { export_name: name, ..opts.clone() };
        match target {
            UriTarget::Tcp(addr) => Self::connect_tcp(addr.as_str(), &opts).await,
            UriTarget::Unix(path) => Self::connect_unix(&path, &opts).await,
        }
    }

    /// Connects over TCP (with TCP_NODELAY).
    pub async fn connect_tcp(
        addr: impl tokio::net::ToSocketAddrs,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Self::handshake(Box::new(r), Box::new(w), opts).await
    }

    /// Connects over a Unix socket.
    pub async fn connect_unix(path: &Path, opts: &ClientOptions) -> Result<Self, ClientError> {
        let stream = tokio::net::UnixStream::connect(path).await?;
        let (r, w) = stream.into_split();
        Self::handshake(Box::new(r), Box::new(w), opts).await
    }

    /// Negotiates on an already connected stream, split into its halves.
    pub async fn handshake(
        reader: BoxRead,
        writer: BoxWrite,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let mut r = BufReader::with_capacity(256 << 10, reader);
        let mut w = writer;
        let no_zeroes = greet(&mut r, &mut w).await?;
        let mut structured = false;
        if opts.structured_replies {
            send_option(&mut w, opt::STRUCTURED_REPLY, &[]).await?;
            let (header, _) = read_option_reply(&mut r, opt::STRUCTURED_REPLY).await?;
            structured = header.reply_type == rep::ACK;
        }
        let info = if opts.use_go {
            negotiate_info(&mut r, &mut w, opt::GO, &opts.export_name).await?
        } else {
            send_option(&mut w, opt::EXPORT_NAME, opts.export_name.as_bytes()).await?;
            let mut buf = [0u8; 10];
            r.read_exact(&mut buf).await?;
            if !no_zeroes {
                let mut zeros = [0u8; proto::EXPORT_NAME_PADDING];
                r.read_exact(&mut zeros).await?;
            }
            let mut size = [0u8; 8];
            size.copy_from_slice(&buf[..8]);
            ExportInfo {
                size: u64::from_be_bytes(size),
                flags: u16::from_be_bytes([buf[8], buf[9]]),
                ..ExportInfo::default()
            }
        };
        if info.size > i64::MAX as u64 {
            // No real device is that big, and offsets past it overflow signed arithmetic in
            // every layer that follows (the kernel's loff_t among them).
            return Err(proto::ProtoError::Malformed("export size beyond 2^63 - 1 bytes").into());
        }
        let pending = Arc::new(parking_lot::Mutex::new(PendingTable::default()));
        let reader_task = tokio::spawn(reply_reader(r, pending.clone()));
        Ok(Self {
            info,
            structured,
            writer: tokio::sync::Mutex::new(BufWriter::with_capacity(256 << 10, w)),
            pending,
            next_handle: AtomicU64::new(1),
            reader_task,
        })
    }

    /// Export size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Transmission flags of the export.
    #[must_use]
    pub fn flags(&self) -> u16 {
        self.info.flags
    }

    /// What the server told about the export.
    #[must_use]
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Whether structured replies were negotiated.
    #[must_use]
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Whether the export is read-only.
    #[must_use]
    pub fn is_read_only(&self) -> bool {
        self.info.flags & proto::transmission_flags::READ_ONLY != 0
    }

    /// Sends any request (even one the server will reject) and waits for its reply. For READ the
    /// reply data is returned (READ longer than `MAX_PAYLOAD` is refused here). `payload` is sent
    /// after the header as given (WRITE data).
    pub async fn request(
        &self,
        cmd_type: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        if cmd_type == Command::Read.to_wire() && length > proto::MAX_PAYLOAD {
            // The reply buffer is allocated up front; never allocate an unchecked size.
            return Err(ClientError::TooLarge(length as usize));
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        let read = (cmd_type == Command::Read.to_wire()).then(|| (offset, vec![0u8; length as usize]));
        {
            let mut table = self.pending.lock();
            if let Some(reason) = &table.closed {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            table.map.insert(
                handle,
                Pending { read, covered: Coverage::default(), chunked: false, error: None, done },
            );
        }
        let header = RequestHeader { flags, cmd_type, handle, offset, length };
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(&header.encode()).await?;
            w.write_all(payload).await?;
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            self.pending.lock().map.remove(&handle);
            return Err(e.into());
        }
        rx.await.unwrap_or_else(|_| Err(ClientError::Disconnected("reply reader stopped".into())))
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.read_flags(offset, len, 0).await
    }

    /// Reads with explicit command flags (`FUA`, `DF`).
    pub async fn read_flags(&self, offset: u64, len: u32, flags: u16) -> Result<Vec<u8>, ClientError> {
        if len > proto::MAX_PAYLOAD {
            return Err(ClientError::TooLarge(len as usize));
        }
        self.request(Command::Read.to_wire(), flags, offset, len, &[]).await
    }

    /// Writes `data` at `offset`; with `fua` the reply waits for the data to be durable.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len()).map_err(|_| ClientError::TooLarge(data.len()))?;
        let flags = if fua { cmd_flags::FUA } else { 0 };
        self.request(Command::Write.to_wire(), flags, offset, len, data).await.map(drop)
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(Command::Flush.to_wire(), 0, 0, 0, &[]).await.map(drop)
    }

    /// Discards a range.
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { cmd_flags::FUA } else { 0 };
        self.request(Command::Trim.to_wire(), flags, offset, len, &[]).await.map(drop)
    }

    /// Zeroes a range; `flags` may hold `FUA`, `NO_HOLE`, `FAST_ZERO`.
    pub async fn write_zeroes(&self, offset: u64, len: u32, flags: u16) -> Result<(), ClientError> {
        self.request(Command::WriteZeroes.to_wire(), flags, offset, len, &[]).await.map(drop)
    }

    /// Asks the server to prefetch a range.
    pub async fn cache(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(Command::Cache.to_wire(), 0, offset, len, &[]).await.map(drop)
    }

    /// Sends `NBD_CMD_DISC` (after the caller's requests have completed) and closes.
    pub async fn disconnect(self) -> Result<(), ClientError> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let header =
            RequestHeader { flags: 0, cmd_type: Command::Disc.to_wire(), handle, offset: 0, length: 0 };
        let mut w = self.writer.lock().await;
        w.write_all(&header.encode()).await?;
        w.flush().await?;
        w.shutdown().await?;
        Ok(())
    }
}

/// Largest structured chunk payload accepted: a full data chunk plus its offset.
const MAX_CHUNK_PAYLOAD: u32 = proto::MAX_PAYLOAD + 8;

async fn reply_reader(mut r: BufReader<BoxRead>, pending: Arc<parking_lot::Mutex<PendingTable>>) {
    let reason = match read_replies(&mut r, &pending).await {
        Ok(()) => "server closed the connection".to_owned(),
        Err(e) => e.to_string(),
    };
    let mut table = pending.lock();
    table.closed = Some(reason.clone());
    for (_, p) in table.map.drain() {
        let _ = p.done.send(Err(ClientError::Disconnected(reason.clone())));
    }
}

async fn read_replies(
    r: &mut BufReader<BoxRead>,
    pending: &parking_lot::Mutex<PendingTable>,
) -> Result<(), ClientError> {
    let mut start = [0u8; 16];
    loop {
        match r.read_exact(&mut start).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        match proto::decode_reply_start(&start)? {
            ReplyStart::Simple(reply) => {
                let Some(mut p) = pending.lock().map.remove(&reply.handle) else {
                    return Err(proto::ProtoError::Malformed("reply for an unknown handle").into());
                };
                if p.chunked {
                    // The chunks so far may have filled only part of the buffer.
                    return Err(fail_request(p, "a simple reply after structured chunks"));
                }
                let result = if reply.errno != 0 {
                    Err(ClientError::Server { errno: reply.errno, message: String::new() })
                } else if let Some((_, mut buf)) = p.read.take() {
                    // A simple reply to READ carries exactly the requested length.
                    r.read_exact(&mut buf).await?;
                    Ok(buf)
                } else {
                    Ok(Vec::new())
                };
                let _ = p.done.send(result);
            }
            ReplyStart::Chunk { flags, chunk_type, handle } => {
                let mut len_bytes = [0u8; 4];
                r.read_exact(&mut len_bytes).await?;
                let len = u32::from_be_bytes(len_bytes);
                if len > MAX_CHUNK_PAYLOAD {
                    return Err(proto::ProtoError::Malformed("structured chunk too long").into());
                }
                read_chunk(r, pending, ChunkHeader { flags, chunk_type, handle, len }).await?;
            }
        }
    }
}

/// Fails request `p` with the protocol violation `what`, and returns the error that stops the
/// reply reader (and so the connection).
fn fail_request(p: Pending, what: &'static str) -> ClientError {
    let _ = p.done.send(Err(ClientError::Disconnected(format!("protocol: {what}"))));
    ClientError::Proto(proto::ProtoError::Malformed(what))
}

async fn read_chunk(
    r: &mut BufReader<BoxRead>,
    pending: &parking_lot::Mutex<PendingTable>,
    h: ChunkHeader,
) -> Result<(), ClientError> {
    // Take the entry out while reading into it; it goes back unless this is the last chunk.
    let Some(mut p) = pending.lock().map.remove(&h.handle) else {
        return Err(ClientError::Proto(proto::ProtoError::Malformed("chunk for an unknown handle")));
    };
    p.chunked = true;
    match read_chunk_into(r, &mut p, h).await {
        Ok(()) => {}
        Err(ChunkError::Violation(what)) => return Err(fail_request(p, what)),
        Err(ChunkError::Client(e)) => {
            let _ = p.done.send(Err(ClientError::Disconnected(e.to_string())));
            return Err(e);
        }
    }
    if h.flags & chunk::FLAG_DONE != 0 {
        let result = match p.error.take() {
            Some((errno, message)) => Err(ClientError::Server { errno, message }),
            None => match p.read.take() {
                Some((_, buf)) if !p.covered.is_whole(buf.len() as u64) => {
                    // Bytes no chunk carried would reach the caller as zeros.
                    return Err(fail_request(p, "structured reply does not cover the whole READ"));
                }
                Some((_, buf)) => Ok(buf),
                None => Ok(Vec::new()),
            },
        };
        let _ = p.done.send(result);
    } else {
        pending.lock().map.insert(h.handle, p);
    }
    Ok(())
}

/// Why a chunk could not be taken: the server broke the protocol, or reading failed.
enum ChunkError {
    Violation(&'static str),
    Client(ClientError),
}

impl From<io::Error> for ChunkError {
    fn from(e: io::Error) -> Self {
        ChunkError::Client(e.into())
    }
}

impl From<proto::ProtoError> for ChunkError {
    fn from(e: proto::ProtoError) -> Self {
        ChunkError::Client(e.into())
    }
}

/// Reads one chunk's payload into request `p`, checking that a READ's chunk lies inside the
/// request, is not empty and overlaps no earlier chunk.
async fn read_chunk_into(
    r: &mut BufReader<BoxRead>,
    p: &mut Pending,
    h: ChunkHeader,
) -> Result<(), ChunkError> {
    let malformed = ChunkError::Violation;
    match h.chunk_type {
        chunk::TYPE_OFFSET_DATA | chunk::TYPE_OFFSET_HOLE => {
            let Some((req_offset, buf)) = p.read.as_mut() else {
                return Err(malformed("data chunk for a request that is not READ"));
            };
            if h.len < 8 {
                return Err(malformed("offset chunk shorter than 8 bytes"));
            }
            let mut off = [0u8; 8];
            r.read_exact(&mut off).await?;
            let offset = u64::from_be_bytes(off);
            let extent_len = if h.chunk_type == chunk::TYPE_OFFSET_DATA {
                u64::from(h.len - 8)
            } else {
                if h.len != 12 {
                    return Err(malformed("hole chunk has wrong length"));
                }
                let mut n = [0u8; 4];
                r.read_exact(&mut n).await?;
                u64::from(u32::from_be_bytes(n))
            };
            let rel = offset.checked_sub(*req_offset).ok_or(malformed("chunk before the request"))?;
            let end = rel.checked_add(extent_len).ok_or(malformed("chunk overflows"))?;
            if end > buf.len() as u64 {
                return Err(malformed("chunk beyond the request"));
            }
            if extent_len == 0 {
                return Err(malformed("empty data or hole chunk"));
            }
            p.covered.claim(rel, end).map_err(malformed)?;
            let range = rel as usize..end as usize;
            if h.chunk_type == chunk::TYPE_OFFSET_DATA {
                r.read_exact(&mut buf[range]).await?;
            } else {
                buf[range].fill(0);
            }
        }
        t if chunk::is_error(t) => {
            let mut payload = vec![0u8; h.len as usize];
            r.read_exact(&mut payload).await?;
            let (errno, message) = proto::decode_error_chunk_payload(&payload)?;
            if errno == 0 {
                return Err(malformed("error chunk with error 0"));
            }
            p.error.get_or_insert((errno, message));
        }
        _ => {
            // NONE and unknown non-error chunk types carry nothing we use.
            let mut skip = (&mut *r).take(u64::from(h.len));
            tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_uri_is_a_client_error_naming_it() {
        assert!(matches!(parse_uri("nbd://"), Err(ClientError::BadUri(u)) if u == "nbd://"));
    }
}
