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
//! # Files
//! `listen.rs` binds the sockets and runs the accept loop ([`Server`], [`serve_stream`]);
//! `handshake.rs` haggles options until an export is chosen; `connection.rs` reads requests and
//! runs them; `reply.rs` queues and encodes replies. This file holds the configuration and the
//! state every connection shares.
//!
//! # Shutdown
//! [`Server::run`] stops accepting when its shutdown future resolves, stops reading new requests,
//! lets in-flight requests finish and their replies go out, closes the connections, then syncs
//! every export's device.

mod connection;
mod handshake;
mod listen;
mod reply;

pub use listen::{Server, serve_stream};

use super::flush::SyncCoalescer;
use super::proto::{self, transmission_flags as tf};
use crate::dev::{BlockDev, DevError};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

/// The two halves of an accepted stream (TCP or Unix socket), boxed so one connection loop
/// serves both.
pub(super) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(super) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Why a connection ended early. Only logged: it never affects other connections.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("{0}")]
    Refused(&'static str),
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
