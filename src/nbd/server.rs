//! The NBD server: fixed newstyle handshake, then many requests in flight per connection.
//!
//! # Threading and the request path
//! The server runs on the caller's tokio runtime; [`build_runtime`] makes the one we recommend: a
//! multi-thread runtime with one worker per core. Each connection has
//! - a *reader* (the connection task) that parses requests out of a buffered reader, validates
//!   them ([`proto::check_request`]), reads WRITE payloads into pooled buffers and starts each
//!   request;
//! - request tasks that call the synchronous [`BlockDev`] method directly on the runtime worker:
//!   a page-cache hit costs one `pread` and no hand-off to a blocking pool (a `spawn_blocking`
//!   per request costs more CPU than the read itself). Because each request is a task, a slow
//!   request does not hold up the ones behind it, and replies go out in completion order;
//! - no writer task: whoever finishes a request queues its reply and, if no one else is
//!   writing, writes every queued reply and flushes once (`ReplySink`), so a burst of replies
//!   costs one `write` system call and an uncontended reply costs no task hand-off.
//!
//! Non-FUA WRITEs to a device whose writes are copies into memory
//! ([`crate::dev::DevCaps::cheap_writes`]: a buffered file, where a write lands in the page cache) run
//! in the reader itself, straight from the read buffer: no task, no payload copy, no wake-up of
//! another worker. The reader defers their replies and writes them all at once when it is about
//! to wait for the client (or has `MAX_DEFERRED_REPLIES` of them), so a burst of writes costs
//! one `read` and one `write` system call besides its `pwrite`s. At 4 KiB random writes, queue
//! depth 32, on a 2-core VM, this cut the server's CPU per write by 15-35% (to 5-7 µs, most of
//! it the kernel's `pwrite`) and its context switches per write from about 0.5 to 0.1. Only when the reader falls behind
//! (`READER_BEHIND_BYTES` of later requests already buffered) do writes go to tasks again, so
//! that idle workers share the backlog. A write that blocks (the kernel throttling a writer
//! with too many dirty pages) holds up this connection's later requests, not other connections.
//!
//! When a READ, WRITE or CACHE is the only request in flight and no further request is already
//! buffered (a client at queue depth 1), the reader runs it itself and writes the reply: no task
//! spawn, no wake-up of another worker. The price: a request that arrives while that call runs
//! waits for it, which costs little for page-cache hits; with a slow device use the pool.
//!
//! Requests that wait for the disk never run on the workers, whatever [`DeviceCalls`] says:
//! FLUSH, and TRIM or WRITE_ZEROES with FUA, await a sync that runs on the blocking pool and is
//! shared by all flushes that queued behind a running one (see `nbd/flush.rs` for why a flush
//! never takes a sync that was already running); a FUA WRITE runs its `write_at_fua` on the
//! blocking pool.
//!
//! Where the other device calls run is [`DeviceCalls`]: on the workers (the default, measured
//! fastest for page-cache hits: about 5 µs of server CPU per 4 KiB read, on par with `nbdkit
//! file`), on tokio's blocking pool (about 20 µs per I/O, but a device call that waits for a disk
//! never holds a worker, so use it for slow devices), or inline in the reader (lowest CPU, but
//! requests of one connection no longer overlap). With calls on the workers, a call that blocks
//! for long (a disk miss) holds its worker, and tasks queued behind it on that worker wait too:
//! give the runtime more workers or use the blocking pool when misses are common.
//!
//! With structured replies, a READ of at least [`ServerConfig::min_hole_query_len`] bytes asks the
//! device for known zero ranges and sends them as hole chunks; shorter reads are sent as data.
//!
//! In-flight work per connection is bounded twice: by a request count and by payload bytes (both
//! in [`ServerConfig`]); the reader stops reading the socket while either is exhausted, so a
//! client that sends without reading replies cannot make the server buffer without bound. Request
//! sizes are checked before any buffer is allocated.
//!
//! # Multiple connections
//! Every export advertises `NBD_FLAG_CAN_MULTI_CONN`: all connections to an export share one
//! `Arc<dyn BlockDev>`, and the BlockDev contract makes `sync` cover *every* completed write of
//! that device whatever connection issued it, and `write_at_fua` durable before it returns. So a
//! FLUSH or FUA reply on one connection covers writes acknowledged on all of them, which is what
//! the flag promises. A device that ever keeps per-connection state (a write cache private to a
//! connection) would break this and must not be served with the flag; the cache engine keeps
//! one state per device, so the flag stays on.
//!
//! # Shutdown
//! [`Server::run`] stops accepting when its shutdown future resolves, stops reading new requests,
//! lets in-flight requests finish and their replies go out, closes the connections, then syncs
//! every export's device.

use super::flush::SyncCoalescer;
use super::proto::{
    self, ExportParams, OptionHeader, Request, RequestHeader, errno, handshake_flags, info, opt, rep,
    transmission_flags as tf,
};
use crate::dev::{BlockDev, DevError};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

/// One named export.
#[derive(Debug, Clone)]
pub struct Export {
    /// The export name; `""` is the default export.
    pub name: String,
    /// Free text shown by clients (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// The device served: a `FileDev` for passthrough, later the cached device.
    pub dev: Arc<dyn BlockDev>,
    /// Refuse writes (also implied when the device itself is read-only).
    pub read_only: bool,
}

impl Export {
    /// A writable export with no description.
    pub fn new(name: impl Into<String>, dev: Arc<dyn BlockDev>) -> Self {
        Self { name: name.into(), description: String::new(), dev, read_only: false }
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Server settings. `Default` gives sane limits and no exports.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub exports: Vec<Export>,
    /// Requests one connection may have in flight (parsed but not yet answered).
    pub max_in_flight_per_conn: usize,
    /// Payload bytes (READ data to send, WRITE data received) one connection may hold in flight.
    /// At least [`proto::MAX_PAYLOAD`], so that every valid request can make progress.
    pub max_buffer_bytes_per_conn: usize,
    /// Connections served at once; further connections are accepted and closed at once.
    pub max_connections: usize,
    /// A client must finish the handshake within this time.
    pub handshake_timeout: Duration,
    /// On shutdown, how long to wait for a connection's replies to drain to a client that does
    /// not read them before dropping the connection.
    pub shutdown_drain_timeout: Duration,
    /// Where the synchronous device calls run.
    pub device_calls: DeviceCalls,
    /// With structured replies, READs of at least this many bytes ask the device for known
    /// zero ranges and send them as hole chunks. Shorter reads are sent as data: the query costs
    /// a system call per read on a file (`SEEK_DATA`, which also takes the inode lock that
    /// writes take), more than sending a few KiB of zeros saves.
    pub min_hole_query_len: u32,
}

/// Where a request's synchronous [`BlockDev`] call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceCalls {
    /// On the runtime worker, in the request's own task: cheapest when calls are short (page
    /// cache hits, memory), because there is no thread hand-off. A call that blocks for long
    /// holds a worker, so slow devices want more workers or [`DeviceCalls::BlockingPool`].
    #[default]
    OnWorkers,
    /// On tokio's blocking pool (`spawn_blocking`): costs a thread hand-off per request, but a
    /// slow device (disk misses) never stalls the runtime's workers.
    BlockingPool,
    /// READ, WRITE and CACHE run in the connection's reader itself (no task per request);
    /// TRIM and WRITE_ZEROES as their own tasks. (Syncs and FUA writes never run on the workers,
    /// see the module docs.)
    Inline,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            exports: Vec::new(),
            max_in_flight_per_conn: 128,
            max_buffer_bytes_per_conn: 64 << 20,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(30),
            shutdown_drain_timeout: Duration::from_secs(30),
            device_calls: DeviceCalls::OnWorkers,
            min_hole_query_len: 64 << 10,
        }
    }
}

/// Errors of the server as a whole (a misbehaving client only ends its own connection).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no exports configured")]
    NoExports,
    #[error("export name {0:?} is used twice")]
    DuplicateExport(String),
    #[error("export name {name:?} is invalid: {reason}")]
    BadExportName { name: String, reason: &'static str },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("no listen address given")]
    NoListeners,
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: ListenAddr, source: io::Error },
    #[error("syncing export {name:?} at shutdown failed: {source}")]
    Sync { name: String, source: DevError },
}

/// Builds the runtime the server is meant to run on: multi-thread, `worker_threads` workers (the
/// number of cores when `None`). More workers than cores only add context switches, because
/// request tasks run their device call on the worker itself.
pub fn build_runtime(worker_threads: Option<usize>) -> io::Result<tokio::runtime::Runtime> {
    let workers = worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(2))
        .max(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("ubcache-nbd")
        .enable_all()
        .build()
}

/// An export with its negotiated facts precomputed.
#[derive(Debug)]
struct ExportState {
    export: Export,
    size: u64,
    read_only: bool,
    /// FLUSH and FUA trims/zeroings share syncs through this (all connections to the export).
    syncer: Arc<SyncCoalescer>,
}

impl ExportState {
    /// Transmission flags. DF is offered only with structured replies, as the spec requires.
    fn flags(&self, structured: bool) -> u16 {
        let mut flags = tf::HAS_FLAGS
            | tf::SEND_FLUSH
            | tf::SEND_FUA
            | tf::SEND_CACHE
            // See the module docs: one shared device whose sync covers all completed writes.
            | tf::CAN_MULTI_CONN;
        if self.read_only {
            flags |= tf::READ_ONLY;
        } else {
            flags |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO;
        }
        if structured {
            flags |= tf::SEND_DF;
        }
        flags
    }
}

#[derive(Debug)]
struct Shared {
    exports: Vec<Arc<ExportState>>,
    max_in_flight: usize,
    max_buffer_bytes: usize,
    handshake_timeout: Duration,
    shutdown_drain_timeout: Duration,
    device_calls: DeviceCalls,
    min_hole_query_len: u32,
    connections: Arc<Semaphore>,
}

impl Shared {
    fn new(config: ServerConfig) -> Result<Self, ServerError> {
        if config.exports.is_empty() {
            return Err(ServerError::NoExports);
        }
        // At most u32::MAX: a closing connection waits for all its slots with one acquire_many.
        if config.max_in_flight_per_conn == 0 || config.max_in_flight_per_conn > u32::MAX as usize {
            return Err(ServerError::Config(format!(
                "max_in_flight_per_conn must be between 1 and {}",
                u32::MAX
            )));
        }
        if config.max_buffer_bytes_per_conn < proto::MAX_PAYLOAD as usize
            || config.max_buffer_bytes_per_conn > u32::MAX as usize
        {
            return Err(ServerError::Config(format!(
                "max_buffer_bytes_per_conn must be between {} and {}",
                proto::MAX_PAYLOAD,
                u32::MAX
            )));
        }
        if config.max_connections == 0 {
            return Err(ServerError::Config("max_connections must be at least 1".into()));
        }
        let mut exports: Vec<Arc<ExportState>> = Vec::new();
        for export in config.exports {
            if let Err(e) = proto::parse_string(export.name.as_bytes()) {
                let proto::OptionParseError::Invalid(reason) = e;
                return Err(ServerError::BadExportName { name: export.name, reason });
            }
            if exports.iter().any(|e| e.export.name == export.name) {
                return Err(ServerError::DuplicateExport(export.name));
            }
            let size = export.dev.len();
            let read_only = export.read_only || export.dev.capabilities().read_only;
            exports.push(Arc::new(ExportState { export, size, read_only, syncer: Arc::default() }));
        }
        Ok(Self {
            exports,
            max_in_flight: config.max_in_flight_per_conn,
            max_buffer_bytes: config.max_buffer_bytes_per_conn,
            handshake_timeout: config.handshake_timeout,
            shutdown_drain_timeout: config.shutdown_drain_timeout,
            device_calls: config.device_calls,
            min_hole_query_len: config.min_hole_query_len,
            connections: Arc::new(Semaphore::new(config.max_connections.min(Semaphore::MAX_PERMITS))),
        })
    }

    /// The export a name selects. `""` selects the export named `""`, or else the first export,
    /// so a client that names nothing gets something useful.
    fn find(&self, name: &str) -> Option<&Arc<ExportState>> {
        self.exports
            .iter()
            .find(|e| e.export.name == name)
            .or_else(|| if name.is_empty() { self.exports.first() } else { None })
    }
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound NBD server; [`Server::run`] serves it.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
}

impl Server {
    /// Validates the configuration and binds every listener.
    pub async fn bind(config: ServerConfig, listen: &[ListenAddr]) -> Result<Server, ServerError> {
        let shared = Arc::new(Shared::new(config)?);
        if listen.is_empty() {
            return Err(ServerError::NoListeners);
        }
        let mut listeners = Vec::new();
        for addr in listen {
            let bind_err = |source| ServerError::Bind { addr: addr.clone(), source };
            let listener = match addr {
                ListenAddr::Tcp(sa) => Listener::Tcp(TcpListener::bind(sa).await.map_err(bind_err)?),
                ListenAddr::Unix(path) => {
                    remove_stale_socket(path).await.map_err(bind_err)?;
                    Listener::Unix(UnixListener::bind(path).map_err(bind_err)?, path.clone())
                }
            };
            listeners.push(listener);
        }
        Ok(Server { shared, listeners })
    }

    /// The addresses actually bound (with the real port where port 0 was asked for).
    #[must_use]
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Tcp(t) => t.local_addr().ok().map(ListenAddr::Tcp),
                Listener::Unix(_, p) => Some(ListenAddr::Unix(p.clone())),
            })
            .collect()
    }

    /// One URI per listener and export (`nbd://127.0.0.1:10809/name`,
    /// `nbd+unix:///name?socket=/path`); the default export `""` has an empty path
    /// (`nbd://127.0.0.1:10809`, `nbd+unix:///?socket=/path`).
    #[must_use]
    pub fn uris(&self) -> Vec<String> {
        let mut out = Vec::new();
        for addr in self.local_addrs() {
            for e in &self.shared.exports {
                out.push(super::uri::export_uri(&addr, &e.export.name));
            }
        }
        out
    }

    /// Serves until `shutdown` resolves; then stops accepting, finishes in-flight requests, syncs
    /// every export's device, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut accepters = JoinSet::new();
        for listener in self.listeners {
            accepters.spawn(accept_loop(listener, self.shared.clone(), stop_rx.clone()));
        }
        shutdown.await;
        log::info!("nbd: shutting down: finishing in-flight requests");
        // Receivers live in every accept loop and connection; a send error only means none is left.
        let _ = stop_tx.send(true);
        while accepters.join_next().await.is_some() {}
        // Every connection has ended: no request is running, so this sync covers every write
        // that was ever acknowledged.
        let mut first_err = None;
        for e in &self.shared.exports {
            if e.read_only {
                continue;
            }
            if let Err(source) = e.export.dev.sync() {
                log::error!("nbd: sync of export {:?} failed at shutdown: {source}", e.export.name);
                first_err.get_or_insert(ServerError::Sync { name: e.export.name.clone(), source });
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Serves one already connected stream (socket activation, tests, fuzzing) until the client
/// leaves; `shutdown` ends it like [`Server::run`]'s. Devices are not synced at the end.
pub async fn serve_stream<S>(
    config: ServerConfig,
    stream: S,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let shared = Arc::new(Shared::new(config)?);
    let permit = shared
        .connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| ServerError::Config("no connection slot".into()))?;
    let (r, w) = tokio::io::split(stream);
    let (stop_tx, stop_rx) = watch::channel(false);
    let conn = serve_connection(Box::new(r), Box::new(w), shared, stop_rx, permit, "stream".into());
    tokio::pin!(conn);
    tokio::select! {
        () = &mut conn => return Ok(()),
        () = shutdown => {}
    }
    let _ = stop_tx.send(true);
    conn.await;
    Ok(())
}

/// Removes a leftover socket file of a dead server, so a restart can bind; refuses to touch a
/// live socket or anything that is not a socket.
async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "path exists and is not a socket"));
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(io::Error::new(io::ErrorKind::AddrInUse, "another server is listening on this socket")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = accept(&listener) => a,
        };
        let (reader, writer, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("nbd: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            log::warn!("nbd: too many connections; refusing {peer}");
            continue;
        };
        log::debug!("nbd: connection from {peer}");
        conns.spawn(serve_connection(reader, writer, shared.clone(), stop.clone(), permit, peer));
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

async fn accept(listener: &Listener) -> io::Result<(BoxRead, BoxWrite, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            // Replies are small and latency-bound; the writer already batches them.
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), peer.to_string()))
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w), format!("unix:{}", path.display())))
        }
    }
}

/// Why a connection ended early. Only logged: it never affects other connections.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("{0}")]
    Refused(&'static str),
}

/// Longest option payload the server skips to keep the handshake going; longer ones end it.
const MAX_OPTION_DISCARD: u32 = 1 << 20;

const READ_BUFFER: usize = 256 << 10;
const WRITE_BUFFER: usize = 256 << 10;

async fn serve_connection(
    reader: BoxRead,
    mut writer: BoxWrite,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
    peer: String,
) {
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let negotiated = tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        r = tokio::time::timeout(shared.handshake_timeout, handshake(&mut reader, &mut writer, &shared)) => r,
    };
    let session = match negotiated {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            log::debug!("nbd: {peer}: handshake ended: {e}");
            return;
        }
        Err(_) => {
            log::debug!("nbd: {peer}: handshake timed out");
            return;
        }
    };
    if let Err(e) = transmission(reader, writer, &shared, session, stop).await {
        log::debug!("nbd: {peer}: connection closed: {e}");
    }
}

struct Session {
    export: Arc<ExportState>,
    structured: bool,
    /// `base:allocation` was selected for this export: BLOCK_STATUS is allowed.
    block_status: bool,
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Runs option haggling. `Ok(None)` means the client aborted cleanly.
async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    shared: &Shared,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer
        .write_all(&proto::encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES))
        .await?;
    writer.flush().await?;
    let mut flag_bytes = [0u8; 4];
    reader.read_exact(&mut flag_bytes).await?;
    let client_flags = proto::decode_client_flags(flag_bytes)?;
    let fixed = client_flags & proto::client_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & proto::client_flags::NO_ZEROES != 0;
    let mut structured = false;
    // The export `base:allocation` was selected for (NBD_OPT_SET_META_CONTEXT); it counts only
    // if the client then opens that same export.
    let mut meta_context: Option<String> = None;
    let mut out = Vec::with_capacity(512);
    let mut payload = Vec::new();
    loop {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        reader.read_exact(&mut hdr).await?;
        let header = OptionHeader::decode(&hdr)?;
        let option = header.option;
        if !fixed && option != opt::EXPORT_NAME {
            // Plain newstyle knows no option replies: the spec says hang up.
            return Err(ConnError::Refused(
                "non-fixed newstyle client sent an option other than EXPORT_NAME",
            ));
        }
        if header.len > proto::MAX_OPTION_PAYLOAD {
            if option == opt::EXPORT_NAME {
                return Err(ConnError::Refused("EXPORT_NAME payload too long"));
            }
            // Say why, then skip the payload without storing it. A payload no real option could
            // need is not worth reading at all: the connection ends (the spec allows a hard
            // disconnect for a client that looks like a denial of service).
            out.clear();
            proto::encode_option_reply(&mut out, option, rep::ERR_TOO_BIG, b"option payload too large");
            writer.write_all(&out).await?;
            writer.flush().await?;
            if header.len > MAX_OPTION_DISCARD {
                return Err(ConnError::Refused("option payload of gigantic length"));
            }
            discard(reader, u64::from(header.len)).await?;
            continue;
        }
        payload.clear();
        payload.resize(header.len as usize, 0);
        reader.read_exact(&mut payload).await?;
        out.clear();
        match option {
            opt::EXPORT_NAME => {
                let name =
                    proto::parse_string(&payload).map_err(|_| ConnError::Refused("bad export name"))?;
                let Some(export) = shared.find(name).cloned() else {
                    // EXPORT_NAME cannot carry an error: the spec says terminate the session.
                    return Err(ConnError::Refused("EXPORT_NAME for an unknown export"));
                };
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.flags(structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; proto::EXPORT_NAME_PADDING]);
                }
                writer.write_all(&out).await?;
                writer.flush().await?;
                let block_status = selected_for(&meta_context, &export);
                return Ok(Some(Session { export, structured, block_status }));
            }
            opt::ABORT => {
                proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                // The client may already have closed; that is fine.
                let _ = writer.write_all(&out).await;
                let _ = writer.flush().await;
                return Ok(None);
            }
            opt::LIST => {
                if payload.is_empty() {
                    for e in &shared.exports {
                        proto::encode_option_reply(
                            &mut out,
                            option,
                            rep::SERVER,
                            &proto::encode_rep_server(&e.export.name, &e.export.description),
                        );
                    }
                    proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                } else {
                    proto::encode_option_reply(&mut out, option, rep::ERR_INVALID, b"LIST takes no data");
                }
            }
            opt::INFO | opt::GO => match proto::InfoRequest::parse(&payload) {
                Err(proto::OptionParseError::Invalid(why)) => {
                    proto::encode_option_reply(&mut out, option, rep::ERR_INVALID, why.as_bytes());
                }
                Ok(request) => match shared.find(&request.name).cloned() {
                    None => {
                        proto::encode_option_reply(&mut out, option, rep::ERR_UNKNOWN, b"no such export");
                    }
                    Some(export) => {
                        encode_info_replies(&mut out, option, &export, &request, structured);
                        proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                        if option == opt::GO {
                            writer.write_all(&out).await?;
                            writer.flush().await?;
                            let block_status = selected_for(&meta_context, &export);
                            return Ok(Some(Session { export, structured, block_status }));
                        }
                    }
                },
            },
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                match proto::MetaContextRequest::parse(&payload) {
                    Err(proto::OptionParseError::Invalid(why)) => {
                        proto::encode_option_reply(&mut out, option, rep::ERR_INVALID, why.as_bytes());
                    }
                    // The spec: SET needs structured replies, which carry the block status chunks.
                    Ok(_) if set && !structured => proto::encode_option_reply(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        b"SET_META_CONTEXT needs structured replies first",
                    ),
                    Ok(request) => match shared.find(&request.export_name) {
                        None => {
                            proto::encode_option_reply(&mut out, option, rep::ERR_UNKNOWN, b"no such export");
                        }
                        Some(export) => {
                            // LIST with no query lists every context; "base:" lists the base ones.
                            let matches = |q: &String| q == proto::BASE_ALLOCATION || (!set && q == "base:");
                            let selected =
                                (!set && request.queries.is_empty()) || request.queries.iter().any(matches);
                            if selected {
                                let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
                                let payload = proto::encode_rep_meta_context(id, proto::BASE_ALLOCATION);
                                proto::encode_option_reply(&mut out, option, rep::META_CONTEXT, &payload);
                            }
                            if set {
                                // Each SET replaces the previous selection.
                                meta_context = selected.then(|| export.export.name.clone());
                            }
                            proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                        }
                    },
                }
            }
            opt::STRUCTURED_REPLY => {
                if payload.is_empty() {
                    structured = true;
                    proto::encode_option_reply(&mut out, option, rep::ACK, &[]);
                } else {
                    proto::encode_option_reply(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    );
                }
            }
            _ => proto::encode_option_reply(&mut out, option, rep::ERR_UNSUP, b"option not supported"),
        }
        writer.write_all(&out).await?;
        writer.flush().await?;
    }
}

/// Whether `base:allocation` was selected for `export`.
fn selected_for(meta_context: &Option<String>, export: &ExportState) -> bool {
    meta_context.as_deref() == Some(export.export.name.as_str())
}

fn encode_info_replies(
    out: &mut Vec<u8>,
    option: u32,
    export: &ExportState,
    request: &proto::InfoRequest,
    structured: bool,
) {
    // NBD_INFO_EXPORT is always sent; the others when asked for.
    let flags = export.flags(structured);
    proto::encode_option_reply(out, option, rep::INFO, &proto::encode_info_export(export.size, flags));
    let asked = |t| request.requests.contains(&t);
    if asked(info::NAME) {
        let payload = proto::encode_info_string(info::NAME, &export.export.name);
        proto::encode_option_reply(out, option, rep::INFO, &payload);
    }
    if asked(info::DESCRIPTION) {
        let desc = proto::truncate_to_char_boundary(&export.export.description, proto::MAX_STRING_LEN);
        proto::encode_option_reply(
            out,
            option,
            rep::INFO,
            &proto::encode_info_string(info::DESCRIPTION, desc),
        );
    }
    if asked(info::BLOCK_SIZE) {
        // Any byte offset and length works (the devices handle partial sectors); one page is
        // the efficient size; one request carries at most MAX_PAYLOAD.
        let payload = proto::encode_info_block_size(1, proto::PREFERRED_BLOCK_SIZE, proto::MAX_PAYLOAD);
        proto::encode_option_reply(out, option, rep::INFO, &payload);
    }
}

/// Reads and drops `n` bytes through a small fixed buffer.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// A small per-connection pool of payload buffers, so steady-state I/O allocates nothing.
#[derive(Debug, Default)]
struct BufPool {
    bufs: parking_lot::Mutex<Vec<Vec<u8>>>,
}

/// Buffers above this size are freed rather than pooled, so an idle connection holds little.
const POOLED_BUF_MAX: usize = 1 << 20;
const POOL_MAX_BUFS: usize = 64;

impl BufPool {
    /// A buffer of exactly `len` bytes. Bytes left from an earlier request are not cleared: every
    /// user overwrites the whole buffer (a payload read, a device read) before sending any of
    /// it, and a failed read sends no data, so stale bytes never reach a client.
    fn get(&self, len: usize) -> Vec<u8> {
        let mut buf = self.bufs.lock().pop().unwrap_or_default();
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() <= POOLED_BUF_MAX {
            let mut bufs = self.bufs.lock();
            if bufs.len() < POOL_MAX_BUFS {
                bufs.push(buf);
            }
        }
    }
}

/// What goes out for one request. The permits ride along so in-flight limits are released only
/// once the reply has been written.
struct Reply {
    handle: u64,
    body: ReplyBody,
    _permits: Option<Permits>,
}

/// A request's in-flight slot and, for READ/WRITE, its payload bytes.
type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

enum ReplyBody {
    /// A simple reply without data (success or error of any command but a structured READ).
    Status { errno: u32 },
    /// READ data as a simple reply.
    SimpleData { buf: Vec<u8> },
    /// READ data as structured chunks: data chunks, hole chunks for `holes`, the last one DONE.
    StructuredRead { offset: u64, buf: Vec<u8>, holes: Vec<Range<u64>> },
    /// A structured error chunk (a failed READ when structured replies are on).
    StructuredError { errno: u32, message: String },
    /// `base:allocation` extents (length, flags) as one block status chunk.
    BlockStatus { extents: Vec<(u32, u32)> },
}

/// One BLOCK_STATUS reply describes at most this much of the export (clients ask again for the
/// rest), so one request cannot make the device walk a huge range.
const MAX_BLOCK_STATUS_LEN: u32 = 1 << 30;
/// And at most this many extents (8 bytes each on the wire).
const MAX_BLOCK_STATUS_EXTENTS: usize = 4096;

/// The reply side of a connection. Whoever finishes a request (a request task, or the reader
/// itself on the fast path) queues its reply and then tries to become the writer: the one that
/// gets the lock writes every queued reply into the buffered writer and flushes once the queue
/// is empty, so a burst of replies costs one system call; the others return at once. There is
/// no writer task, so an uncontended reply goes out without a task hand-off.
///
/// No reply is stranded: a reply is queued *before* its sender tries the lock, and the writer
/// looks at the queue again *after* releasing the lock, so either the sender gets the lock or
/// the writer sees the reply.
struct ReplySink {
    queue: parking_lot::Mutex<Vec<Reply>>,
    writer: tokio::sync::Mutex<WriterState>,
    pool: Arc<BufPool>,
    /// Set at shutdown when the client did not read its replies in time: a writer stuck on a
    /// full socket gives up, and the connection is dropped.
    kill: watch::Receiver<bool>,
}

struct WriterState {
    /// `None` once writing failed (the client is gone) or the connection was killed; replies
    /// are then dropped, which still releases their permits.
    out: Option<BufWriter<BoxWrite>>,
    /// The queue's storage is swapped with this one, so draining allocates nothing.
    spare: Vec<Reply>,
}

impl ReplySink {
    /// Queues a reply and writes it (and whatever else is queued) unless another writer is
    /// already at work, which will then write it.
    async fn send(&self, reply: Reply) {
        self.defer(reply);
        self.write_queued_replies().await;
    }

    /// Queues a reply without writing it. Whoever defers must call
    /// [`ReplySink::write_queued_replies`] before it waits for anything: the reply holds an
    /// in-flight slot, and the client may be waiting for it before it sends more.
    fn defer(&self, reply: Reply) {
        self.queue.lock().push(reply);
    }

    /// Writes every queued reply unless another writer is already at work, which will then
    /// write them (it looks at the queue again after it lets go of the lock).
    async fn write_queued_replies(&self) {
        loop {
            let Ok(mut writer) = self.writer.try_lock() else { return };
            let mut kill = self.kill.clone();
            let written = tokio::select! {
                biased;
                r = self.write_queued(&mut writer) => r,
                _ = kill.wait_for(|k| *k) => Err(io::Error::other("replies not read before the shutdown deadline")),
            };
            if let Err(e) = written {
                log::debug!("nbd: writing replies failed: {e}");
                writer.out = None;
            }
            drop(writer);
            // A reply queued while we held the lock saw it taken and left its writing to us.
            if self.queue.lock().is_empty() {
                return;
            }
        }
    }

    async fn write_queued(&self, writer: &mut WriterState) -> io::Result<()> {
        let mut batch = std::mem::take(&mut writer.spare);
        loop {
            std::mem::swap(&mut batch, &mut *self.queue.lock());
            if batch.is_empty() {
                break;
            }
            let Some(out) = writer.out.as_mut() else {
                batch.clear();
                continue;
            };
            for reply in batch.drain(..) {
                write_reply(out, reply, &self.pool).await?;
            }
        }
        writer.spare = batch;
        match writer.out.as_mut() {
            Some(out) => out.flush().await,
            None => Ok(()),
        }
    }
}

async fn transmission(
    mut reader: BufReader<BoxRead>,
    writer: BoxWrite,
    shared: &Shared,
    session: Session,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let Session { export, structured, block_status } = session;
    let pool = Arc::new(BufPool::default());
    let (kill_tx, kill_rx) = watch::channel(false);
    let sink = Arc::new(ReplySink {
        queue: parking_lot::Mutex::new(Vec::new()),
        writer: tokio::sync::Mutex::new(WriterState {
            out: Some(BufWriter::with_capacity(WRITE_BUFFER, writer)),
            spare: Vec::new(),
        }),
        pool: pool.clone(),
        kill: kill_rx,
    });
    let slots = Arc::new(Semaphore::new(shared.max_in_flight));
    let bytes = Arc::new(Semaphore::new(shared.max_buffer_bytes));
    let params = ExportParams {
        size: export.size,
        read_only: export.read_only,
        structured_replies: structured,
        block_status,
    };
    let conn = Conn {
        export: export.clone(),
        params,
        sink: sink.clone(),
        slots: slots.clone(),
        bytes,
        pool,
        max_in_flight: shared.max_in_flight,
        device_calls: shared.device_calls,
        min_hole_query_len: shared.min_hole_query_len,
        cheap_writes: shared.device_calls != DeviceCalls::BlockingPool
            && export.export.dev.capabilities().cheap_writes,
    };
    // The reader checks for shutdown between requests. A client that stops reading replies
    // can keep it waiting for an in-flight slot or in the middle of a payload, so shutdown also
    // gets a hard deadline here.
    let mut stop_deadline = stop.clone();
    let result = tokio::select! {
        r = conn.read_requests(&mut reader, &mut stop) => r,
        () = async {
            let _ = stop_deadline.wait_for(|s| *s).await;
            tokio::time::sleep(shared.shutdown_drain_timeout).await;
        } => Err(ConnError::Refused("shutdown deadline passed while reading a request")),
    };
    // Every request still running holds its slot until its reply is written: once all slots
    // are back, every reply has gone out.
    // Checked at configuration to fit a u32.
    let all_slots = u32::try_from(shared.max_in_flight).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(shared.shutdown_drain_timeout, async {
        // Replies the reader deferred, should the deadline have cut it short.
        sink.write_queued_replies().await;
        slots.acquire_many(all_slots).await
    })
    .await;
    if drained.is_err() {
        log::warn!("nbd: client did not read its replies in time; dropping the connection");
        let _ = kill_tx.send(true);
    }
    // A writer finishes its flush before it lets go of the lock.
    let mut writer = sink.writer.lock().await;
    if let (Some(mut out), Ok(_)) = (writer.out.take(), drained) {
        match tokio::time::timeout(shared.shutdown_drain_timeout, out.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::debug!("nbd: closing the connection: {e}"),
            Err(_) => log::debug!("nbd: closing the connection timed out"),
        }
    }
    result
}

/// What every request of one connection needs.
struct Conn {
    export: Arc<ExportState>,
    params: ExportParams,
    sink: Arc<ReplySink>,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    pool: Arc<BufPool>,
    max_in_flight: usize,
    device_calls: DeviceCalls,
    min_hole_query_len: u32,
    /// Non-FUA WRITEs run in the reader itself: the device says a write is a copy into memory
    /// ([`crate::dev::DevCaps::cheap_writes`]) and device calls are not meant for the blocking pool.
    /// A task per write would cost a spawn, a wake-up of another worker and a copy of the
    /// payload, more than the `pwrite` into the page cache itself.
    cheap_writes: bool,
}

/// The reader writes the replies of requests it ran itself when it is about to wait for the
/// client, so a burst of requests costs one `write` for all its replies. It does not hold more
/// than this many, so a long burst still gives the client replies to work on early.
const MAX_DEFERRED_REPLIES: usize = 16;

/// When more than this many bytes of later requests wait in the read buffer, the reader is
/// behind (its thread gets little CPU, or the client sends more than one thread can write):
/// writes then go to tasks like any other request, so idle workers take a share instead of
/// everything waiting for the one reader. A server that keeps up holds a request or two.
/// The value is a trade-off, measured on 2 cores, 4 KiB random writes at QD32 (IOPS on an idle
/// machine / with six CPU hogs running): 128 KiB (a QD32 backlog of 4 KiB writes never reaches
/// it) 174-180k / 51k; 64 KiB 148k / 80k (half the queue goes to tasks even when idle); a task
/// per write 132k / 64k. An idle server is the case to serve well; on a machine starved of CPU
/// one thread gets one share, which is why 128 KiB loses there.
const READER_BEHIND_BYTES: usize = 128 << 10;

impl Conn {
    /// Reads and starts requests until the client leaves or shutdown; then writes the replies
    /// the reader deferred (they hold in-flight slots the connection's drain waits for).
    async fn read_requests(
        &self,
        reader: &mut BufReader<BoxRead>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        let result = self.read_requests_until_done(reader, stop).await;
        self.sink.write_queued_replies().await;
        result
    }

    async fn read_requests_until_done(
        &self,
        reader: &mut BufReader<BoxRead>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        let mut hdr = [0u8; proto::REQUEST_HEADER_LEN];
        // Replies of requests the reader ran itself, queued but not written yet (see
        // `MAX_DEFERRED_REPLIES`).
        let mut deferred = 0usize;
        loop {
            if deferred > 0 && (reader.buffer().len() < hdr.len() || deferred >= MAX_DEFERRED_REPLIES) {
                // About to wait for the client (or enough replies piled up): send what we have.
                // (Replies of tasks are written by the tasks.)
                self.sink.write_queued_replies().await;
                deferred = 0;
            }
            // Only a whole header is a request; a client that vanishes mid-header or mid-payload
            // just ends its connection.
            let read = if reader.buffer().len() >= hdr.len() && !*stop.borrow() {
                // Already buffered (the common case under load): no need to watch for shutdown.
                reader.read_exact(&mut hdr).await
            } else {
                tokio::select! {
                    biased;
                    r = reader.read_exact(&mut hdr) => r,
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let header = RequestHeader::decode(&hdr)?;
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    // Every slot is taken; some may be held by replies only we would write.
                    self.sink.write_queued_replies().await;
                    deferred = 0;
                    let Ok(slot) = self.slots.clone().acquire_owned().await else { return Ok(()) };
                    slot
                }
            };
            let request = match proto::check_request(&header, &self.params) {
                Ok(r) => r,
                Err(rejection) => {
                    log::debug!("nbd: rejecting request {header:?}: {}", rejection.reason);
                    // The rest of a payload may take a while to come.
                    self.sink.write_queued_replies().await;
                    discard(reader, u64::from(header.payload_len())).await?;
                    // READ and BLOCK_STATUS answer in chunks once structured replies are on.
                    let chunked = [proto::Command::Read, proto::Command::BlockStatus]
                        .iter()
                        .any(|c| header.cmd_type == c.to_wire());
                    let body = if chunked && self.params.structured_replies {
                        ReplyBody::StructuredError {
                            errno: rejection.errno,
                            message: rejection.reason.to_owned(),
                        }
                    } else {
                        ReplyBody::Status { errno: rejection.errno }
                    };
                    self.sink.send(Reply { handle: header.handle, body, _permits: Some((slot, None)) }).await;
                    deferred = 0;
                    continue;
                }
            };
            if let Request::Write { offset, len, fua: false } = request
                && self.cheap_writes
                && reader.buffer().len().saturating_sub(len as usize) < READER_BEHIND_BYTES
            {
                let errno = self.write_in_reader(reader, offset, len as usize).await?;
                let body = ReplyBody::Status { errno };
                self.sink.defer(Reply { handle: header.handle, body, _permits: Some((slot, None)) });
                deferred += 1;
                continue;
            }
            let data_len = match request {
                Request::Disc => return Ok(()),
                Request::Read { len, .. } | Request::Write { len, .. } => len,
                _ => 0,
            };
            let mem = if data_len > 0 {
                // data_len <= MAX_PAYLOAD <= the semaphore's capacity, so this always completes.
                Some(self.acquire_bytes(data_len).await?)
            } else {
                None
            };
            let payload = if let Request::Write { len, .. } = request {
                let mut buf = self.pool.get(len as usize);
                if reader.buffer().len() < buf.len() {
                    // The rest of the payload may take a while to come.
                    self.sink.write_queued_replies().await;
                    deferred = 0;
                }
                read_payload(reader, &mut buf).await?;
                Some(buf)
            } else {
                None
            };
            let job = Job {
                export: self.export.clone(),
                handle: header.handle,
                request,
                payload,
                structured: self.params.structured_replies,
                min_hole_query_len: self.min_hole_query_len,
                permits: (slot, mem),
                pool: self.pool.clone(),
            };
            if self.dispatch(job, reader.buffer().len()).await {
                deferred += 1;
            }
        }
    }

    /// Payload-byte permits for a request, writing deferred replies first if it has to wait.
    async fn acquire_bytes(&self, len: u32) -> Result<OwnedSemaphorePermit, ConnError> {
        if let Ok(p) = self.bytes.clone().try_acquire_many_owned(len) {
            return Ok(p);
        }
        self.sink.write_queued_replies().await;
        self.bytes
            .clone()
            .acquire_many_owned(len)
            .await
            .map_err(|_| ConnError::Refused("payload semaphore closed"))
    }

    /// Runs a non-FUA WRITE of `len` payload bytes in the reader (see `cheap_writes`): straight
    /// from the read buffer when the whole payload is there (no copy, no buffer), otherwise
    /// through a pooled buffer. Returns the reply's errno.
    async fn write_in_reader(
        &self,
        reader: &mut BufReader<BoxRead>,
        offset: u64,
        len: usize,
    ) -> Result<u32, ConnError> {
        let dev = &*self.export.export.dev;
        let result = if reader.buffer().len() >= len {
            let result = dev.write_at(&reader.buffer()[..len], offset);
            std::pin::Pin::new(&mut *reader).consume(len);
            result
        } else {
            // `len` <= MAX_PAYLOAD, checked by `check_request`.
            let _mem = self.acquire_bytes(len as u32).await?;
            let mut buf = self.pool.get(len);
            // The rest of the payload may take a while to come.
            self.sink.write_queued_replies().await;
            read_payload(reader, &mut buf).await?;
            let result = dev.write_at(&buf, offset);
            self.pool.put(buf);
            result
        };
        Ok(result.map_or_else(|e| dev_errno(&e), |()| 0))
    }

    /// Runs a request where it costs least (see [`DeviceCalls`]); `buffered` is how many bytes
    /// of later requests the reader already holds. Returns whether the reply was deferred (the
    /// request ran in the reader and its reply waits in the queue for the reader to write it).
    async fn dispatch(&self, job: Job, buffered: usize) -> bool {
        let sink = self.sink.clone();
        match job.kind() {
            JobKind::Syncing => {
                // Waits for a sync without holding a worker (see `flush`).
                drop(tokio::spawn(async move { sink.send(job.run_syncing().await).await }));
            }
            JobKind::Durable => {
                // A FUA write waits for the disk inside the device call: on the blocking pool.
                drop(tokio::spawn(async move { sink.send(job.run_blocking().await).await }));
            }
            JobKind::Quick => match self.device_calls {
                DeviceCalls::Inline => {
                    sink.defer(job.run());
                    return true;
                }
                // The only request in flight, and no other one already received: run it here.
                // A task would cost a spawn and a wake-up of another worker, and nothing could
                // overlap with it anyway (QD1 latency). The reply goes out before the reader
                // waits for the next request.
                DeviceCalls::OnWorkers
                    if buffered < proto::REQUEST_HEADER_LEN
                        && self.slots.available_permits() + 1 >= self.max_in_flight =>
                {
                    sink.defer(job.run());
                    return true;
                }
                DeviceCalls::OnWorkers => drop(tokio::spawn(async move { sink.send(job.run()).await })),
                DeviceCalls::BlockingPool => {
                    drop(tokio::spawn(async move { sink.send(job.run_blocking().await).await }));
                }
            },
            JobKind::Other => match self.device_calls {
                DeviceCalls::BlockingPool => {
                    drop(tokio::spawn(async move { sink.send(job.run_blocking().await).await }));
                }
                DeviceCalls::OnWorkers | DeviceCalls::Inline => {
                    drop(tokio::spawn(async move { sink.send(job.run()).await }));
                }
            },
        }
        false
    }
}

/// A WRITE payload at least this long goes from the socket straight into its buffer, past the
/// reader's buffer: one copy less (128 KiB writes), at the cost of not reading the next request
/// ahead in the same system call, which matters only for small payloads.
const DIRECT_PAYLOAD_MIN: usize = 64 << 10;

/// Fills `buf` with the next bytes of the stream: first whatever the reader already buffered,
/// then, for a large rest, directly from the socket.
async fn read_payload(reader: &mut BufReader<BoxRead>, buf: &mut [u8]) -> io::Result<()> {
    let buffered = reader.buffer();
    if buffered.len() >= buf.len() || buf.len() - buffered.len() < DIRECT_PAYLOAD_MIN {
        reader.read_exact(buf).await?;
        return Ok(());
    }
    let n = buffered.len();
    buf[..n].copy_from_slice(buffered);
    std::pin::Pin::new(&mut *reader).consume(n);
    reader.get_mut().read_exact(&mut buf[n..]).await?;
    Ok(())
}

/// How a request runs (see [`Conn::dispatch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    /// READ, non-FUA WRITE, CACHE: a short device call (for page-cache hits).
    Quick,
    /// A FUA WRITE: the device call itself waits for the disk.
    Durable,
    /// FLUSH, and TRIM or WRITE_ZEROES with FUA: need a device sync.
    Syncing,
    /// TRIM and WRITE_ZEROES without FUA.
    Other,
}

struct Job {
    export: Arc<ExportState>,
    handle: u64,
    request: Request,
    payload: Option<Vec<u8>>,
    structured: bool,
    min_hole_query_len: u32,
    permits: Permits,
    pool: Arc<BufPool>,
}

impl Job {
    fn kind(&self) -> JobKind {
        match self.request {
            Request::Read { .. } | Request::Cache { .. } | Request::Write { fua: false, .. } => {
                JobKind::Quick
            }
            Request::Write { fua: true, .. } => JobKind::Durable,
            Request::Flush | Request::Trim { fua: true, .. } | Request::WriteZeroes { fua: true, .. } => {
                JobKind::Syncing
            }
            Request::Trim { .. }
            | Request::WriteZeroes { .. }
            | Request::BlockStatus { .. }
            | Request::Disc => JobKind::Other,
        }
    }

    /// Runs the device call on tokio's blocking pool. Should the device panic, the request is
    /// answered with EIO (its permits went down with the call).
    async fn run_blocking(self) -> Reply {
        let handle = self.handle;
        tokio::task::spawn_blocking(move || self.run()).await.unwrap_or_else(|e| {
            log::error!("nbd: device call failed: {e}");
            Reply { handle, body: ReplyBody::Status { errno: errno::EIO }, _permits: None }
        })
    }

    /// FLUSH, or TRIM/WRITE_ZEROES followed by a sync (FUA): the sync is shared with concurrent
    /// flushes of the export and runs off the workers.
    async fn run_syncing(mut self) -> Reply {
        let export = self.export.clone();
        let dev = &export.export.dev;
        let done = match self.request {
            Request::Flush => Ok(()),
            // Trim and zeroing are quick (hole punching) or bounded like a write.
            _ => match self.run_without_sync() {
                ReplyBody::Status { errno: 0 } => Ok(()),
                ReplyBody::Status { errno } => Err(errno),
                _ => Err(errno::EIO),
            },
        };
        // Only after the trim or zeroing has returned, so the sync covers it.
        let errno = match done {
            Ok(()) => export.syncer.sync(dev).await.err().unwrap_or(0),
            Err(errno) => errno,
        };
        Reply { handle: self.handle, body: ReplyBody::Status { errno }, _permits: Some(self.permits) }
    }

    /// Runs the device call synchronously and builds the reply.
    fn run(mut self) -> Reply {
        let body = match self.request {
            Request::Flush => {
                let dev = &*self.export.export.dev;
                ReplyBody::Status { errno: dev.sync().map_or_else(|e| dev_errno(&e), |()| 0) }
            }
            Request::Trim { fua: true, .. } | Request::WriteZeroes { fua: true, .. } => {
                match self.run_without_sync() {
                    ReplyBody::Status { errno: 0 } => {
                        let dev = &*self.export.export.dev;
                        ReplyBody::Status { errno: dev.sync().map_or_else(|e| dev_errno(&e), |()| 0) }
                    }
                    other => other,
                }
            }
            _ => self.run_without_sync(),
        };
        Reply { handle: self.handle, body, _permits: Some(self.permits) }
    }

    /// The device call of the request, without the sync a FUA trim or zeroing also needs.
    fn run_without_sync(&mut self) -> ReplyBody {
        let dev = &*self.export.export.dev;
        let status =
            |r: Result<(), DevError>| ReplyBody::Status { errno: r.map_or_else(|e| dev_errno(&e), |()| 0) };
        match self.request {
            Request::Read { offset, len, df } => self.read(dev, offset, len, df),
            Request::Write { offset, fua, .. } => {
                let buf = self.payload.take().unwrap_or_default();
                let r = if fua { dev.write_at_fua(&buf, offset) } else { dev.write_at(&buf, offset) };
                self.pool.put(buf);
                status(r)
            }
            Request::Flush => ReplyBody::Status { errno: 0 },
            Request::Trim { offset, len, .. } => status(dev.discard(offset, u64::from(len))),
            Request::Cache { offset, len } => status(dev.prefetch(offset, u64::from(len))),
            Request::WriteZeroes { offset, len, no_hole, fast_zero, .. } => {
                if fast_zero && !dev.capabilities().fast_zero {
                    // The client asked to fail rather than be slow.
                    ReplyBody::Status { errno: errno::ENOTSUP }
                } else {
                    status(dev.write_zeroes(offset, u64::from(len), !no_hole))
                }
            }
            Request::BlockStatus { offset, len, req_one } => self.block_status(dev, offset, len, req_one),
            // Handled by the reader; answered with EINVAL should it ever get here.
            Request::Disc => ReplyBody::Status { errno: errno::EINVAL },
        }
    }

    /// `base:allocation` extents from the device's known zero ranges: holes are HOLE|ZERO, the
    /// rest is reported as data (always correct). The reply may cover only a prefix of the
    /// range, as the spec allows, so the work per request stays bounded.
    fn block_status(&self, dev: &dyn BlockDev, offset: u64, len: u32, req_one: bool) -> ReplyBody {
        let len = len.min(MAX_BLOCK_STATUS_LEN);
        let end = offset + u64::from(len);
        let holes = match dev.known_zero_ranges(offset, u64::from(len)) {
            Ok(h) => sanitize_holes(h, offset..end),
            Err(e) => return ReplyBody::StructuredError { errno: dev_errno(&e), message: e.to_string() },
        };
        let hole_flags = proto::alloc_state::HOLE | proto::alloc_state::ZERO;
        let mut extents: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        for h in holes.iter().chain(std::iter::once(&(end..end))) {
            // Extent lengths are bounded by `len`, a u32.
            if h.start > pos {
                extents.push(((h.start - pos) as u32, 0));
            }
            if h.end > h.start {
                extents.push(((h.end - h.start) as u32, hole_flags));
            }
            pos = h.end;
            if extents.len() >= MAX_BLOCK_STATUS_EXTENTS {
                break;
            }
        }
        extents.truncate(if req_one { 1 } else { MAX_BLOCK_STATUS_EXTENTS });
        ReplyBody::BlockStatus { extents }
    }

    fn read(&self, dev: &dyn BlockDev, offset: u64, len: u32, df: bool) -> ReplyBody {
        let mut buf = self.pool.get(len as usize);
        let fail = |e: &DevError, buf: Vec<u8>| {
            self.pool.put(buf);
            if self.structured {
                ReplyBody::StructuredError { errno: dev_errno(e), message: e.to_string() }
            } else {
                ReplyBody::Status { errno: dev_errno(e) }
            }
        };
        let end = offset + u64::from(len);
        let holes = if self.structured && !df && len >= self.min_hole_query_len {
            match dev.known_zero_ranges(offset, u64::from(len)) {
                Ok(h) => sanitize_holes(h, offset..end),
                Err(e) => return fail(&e, buf),
            }
        } else {
            Vec::new()
        };
        // Read only the parts that are not known zeros.
        let mut pos = offset;
        for gap in holes.iter().map(|h| h.start..h.end).chain(std::iter::once(end..end)) {
            if gap.start > pos {
                let (a, b) = ((pos - offset) as usize, (gap.start - offset) as usize);
                if let Err(e) = dev.read_at(&mut buf[a..b], pos) {
                    return fail(&e, buf);
                }
            }
            pos = gap.end;
        }
        if self.structured {
            ReplyBody::StructuredRead { offset, buf, holes }
        } else {
            ReplyBody::SimpleData { buf }
        }
    }
}

/// Keeps only well-formed holes: within `bounds`, sorted, non-overlapping, non-empty. A device
/// that reports nonsense gets its data read instead of trusted.
fn sanitize_holes(holes: Vec<Range<u64>>, bounds: Range<u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(holes.len());
    for h in holes {
        let start = h.start.max(bounds.start);
        let end = h.end.min(bounds.end);
        if start >= end {
            continue;
        }
        if out.last().is_some_and(|last| start < last.end) {
            return Vec::new();
        }
        out.push(start..end);
    }
    out
}

fn dev_errno(e: &DevError) -> u32 {
    e.nbd_errno()
}

async fn write_reply<W: AsyncWrite + Unpin>(out: &mut W, reply: Reply, pool: &BufPool) -> io::Result<()> {
    let handle = reply.handle;
    match reply.body {
        ReplyBody::Status { errno } => {
            out.write_all(&proto::SimpleReply { errno, handle }.encode()).await?;
        }
        ReplyBody::SimpleData { buf } => {
            out.write_all(&proto::SimpleReply { errno: 0, handle }.encode()).await?;
            out.write_all(&buf).await?;
            pool.put(buf);
        }
        ReplyBody::StructuredRead { offset, buf, holes } => {
            write_structured_read(out, handle, offset, &buf, &holes).await?;
            pool.put(buf);
        }
        ReplyBody::StructuredError { errno, message } => {
            let payload = proto::encode_error_chunk_payload(errno, &message);
            let header = proto::ChunkHeader {
                flags: proto::chunk::FLAG_DONE,
                chunk_type: proto::chunk::TYPE_ERROR,
                handle,
                len: payload.len() as u32,
            };
            out.write_all(&header.encode()).await?;
            out.write_all(&payload).await?;
        }
        ReplyBody::BlockStatus { extents } => {
            let payload = proto::encode_block_status(proto::BASE_ALLOCATION_ID, &extents);
            let header = proto::ChunkHeader {
                flags: proto::chunk::FLAG_DONE,
                chunk_type: proto::chunk::TYPE_BLOCK_STATUS,
                handle,
                // At most 4 + 8 * MAX_BLOCK_STATUS_EXTENTS bytes.
                len: payload.len() as u32,
            };
            out.write_all(&header.encode()).await?;
            out.write_all(&payload).await?;
        }
    }
    Ok(())
}

/// Data and hole chunks in offset order; the last chunk carries DONE.
async fn write_structured_read<W: AsyncWrite + Unpin>(
    out: &mut W,
    handle: u64,
    offset: u64,
    buf: &[u8],
    holes: &[Range<u64>],
) -> io::Result<()> {
    let end = offset + buf.len() as u64;
    // Segments: (start, end, is_hole), covering offset..end.
    let mut segments: Vec<(u64, u64, bool)> = Vec::with_capacity(2 * holes.len() + 1);
    let mut pos = offset;
    for h in holes {
        if h.start > pos {
            segments.push((pos, h.start, false));
        }
        segments.push((h.start, h.end, true));
        pos = h.end;
    }
    if pos < end {
        segments.push((pos, end, false));
    }
    let last = segments.len().saturating_sub(1);
    for (i, &(start, stop, hole)) in segments.iter().enumerate() {
        let flags = if i == last { proto::chunk::FLAG_DONE } else { 0 };
        // Segment lengths are bounded by the request length (<= MAX_PAYLOAD).
        let seg_len = (stop - start) as u32;
        if hole {
            let header =
                proto::ChunkHeader { flags, chunk_type: proto::chunk::TYPE_OFFSET_HOLE, handle, len: 12 };
            out.write_all(&header.encode()).await?;
            out.write_all(&start.to_be_bytes()).await?;
            out.write_all(&seg_len.to_be_bytes()).await?;
        } else {
            let header = proto::ChunkHeader {
                flags,
                chunk_type: proto::chunk::TYPE_OFFSET_DATA,
                handle,
                len: 8 + seg_len,
            };
            out.write_all(&header.encode()).await?;
            out.write_all(&start.to_be_bytes()).await?;
            let (a, b) = ((start - offset) as usize, (stop - offset) as usize);
            out.write_all(&buf[a..b]).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_clipped_and_nonsense_is_ignored() {
        assert_eq!(sanitize_holes(vec![0..10, 20..200], 5..100), vec![5..10, 20..100]);
        assert_eq!(sanitize_holes(vec![0..5, 100..200, 50..50], 5..100), Vec::<Range<u64>>::new());
        // Overlapping or unsorted ranges mean the device is confused: read everything instead.
        assert_eq!(sanitize_holes(vec![10..30, 20..40], 0..100), Vec::<Range<u64>>::new());
        assert_eq!(sanitize_holes(vec![50..60, 10..20], 0..100), Vec::<Range<u64>>::new());
    }

    #[test]
    fn transmission_flags_follow_the_export() {
        let dev: Arc<dyn BlockDev> = Arc::new(crate::dev::MemDev::new(4096));
        let rw = ExportState {
            export: Export::new("", dev.clone()),
            size: 4096,
            read_only: false,
            syncer: Arc::default(),
        };
        let ro =
            ExportState { export: Export::new("", dev), size: 4096, read_only: true, syncer: Arc::default() };
        let f = rw.flags(false);
        assert_eq!(f & tf::SEND_DF, 0);
        assert_ne!(rw.flags(true) & tf::SEND_DF, 0);
        for flag in [tf::HAS_FLAGS, tf::SEND_FLUSH, tf::SEND_FUA, tf::SEND_TRIM, tf::SEND_WRITE_ZEROES] {
            assert_ne!(f & flag, 0);
        }
        assert_ne!(f & tf::CAN_MULTI_CONN, 0);
        assert_eq!(f & tf::READ_ONLY, 0);
        let f = ro.flags(false);
        assert_ne!(f & tf::READ_ONLY, 0);
        assert_eq!(f & (tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO), 0);
    }

    #[test]
    fn config_limits_are_validated() {
        let dev: Arc<dyn BlockDev> = Arc::new(crate::dev::MemDev::new(4096));
        let base = || ServerConfig { exports: vec![Export::new("", dev.clone())], ..Default::default() };
        assert!(Shared::new(base()).is_ok());
        for bad in [0, u32::MAX as usize + 1] {
            assert!(matches!(
                Shared::new(ServerConfig { max_in_flight_per_conn: bad, ..base() }),
                Err(ServerError::Config(_))
            ));
        }
        let small = ServerConfig { max_buffer_bytes_per_conn: 1 << 20, ..base() };
        assert!(matches!(Shared::new(small), Err(ServerError::Config(_))));
        assert!(matches!(
            Shared::new(ServerConfig { max_connections: 0, ..base() }),
            Err(ServerError::Config(_))
        ));
        let bad_name = ServerConfig { exports: vec![Export::new("a\0b", dev.clone())], ..base() };
        assert!(matches!(Shared::new(bad_name), Err(ServerError::BadExportName { .. })));
    }
}
