//! [`NbdDev`]: a [`BlockDev`] over a remote NBD export, so a cache set can sit in front of a slow
//! or distant disk served by any NBD server (nbdkit, qemu-nbd, another ubcache).
//!
//! The NBD client ([`crate::nbd::client::NbdClient`]) is async; `BlockDev` is synchronous and is
//! called from anywhere, including the NBD server's own tokio worker threads. Calling
//! `block_on` there would panic (or deadlock a current-thread runtime), so the device owns a
//! private single-threaded runtime on a dedicated thread. Each call spawns its request onto that
//! runtime through a [`tokio::runtime::Handle`] and waits for the answer on a plain std channel,
//! which blocks only the calling thread. Many calls may be in flight at once: the client
//! multiplexes them on the one connection by handle.
//!
//! Every request has a bounded time (`NbdDevOptions::request_timeout`). A request that times
//! out may have left half a request on the wire, so the connection is then marked broken and
//! every later call fails at once with an I/O error: a dead server gives errors, never a hang.
//! There is no reconnect.

use super::client::{ClientError, ClientOptions, NbdClient};
use super::proto::{self, cmd_flags, transmission_flags as tf};
use crate::dev::{BlockDev, DevCaps, DevError, DevResult, write_zeroes_by_writing};
use parking_lot::Mutex;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest TRIM / WRITE_ZEROES / CACHE request sent in one piece (lengths are 32-bit on the
/// wire; 1 GiB keeps every piece aligned to any sane minimum block size).
const MAX_RANGE_REQUEST: u64 = 1 << 30;

/// How an [`NbdDev`] connects and how long it waits.
#[derive(Debug, Clone)]
pub struct NbdDevOptions {
    /// Connecting plus the handshake must finish within this time.
    pub connect_timeout: Duration,
    /// Each request (one NBD command) must be answered within this time; after a timeout the
    /// connection is considered broken.
    pub request_timeout: Duration,
    /// Ask for structured replies (sparse reads come back as hole chunks).
    pub structured_replies: bool,
    /// Largest READ/WRITE payload per NBD command; bigger calls are split into concurrent
    /// commands. Also capped by the server's maximum block size and the protocol limit.
    pub max_request_bytes: u32,
}

impl Default for NbdDevOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            structured_replies: true,
            max_request_bytes: proto::MAX_PAYLOAD,
        }
    }
}

/// A remote NBD export as a block device. See the module docs for the threading model.
pub struct NbdDev {
    uri: String,
    /// Always `Some` until drop hands it to the runtime thread for a polite disconnect.
    client: Option<Arc<NbdClient>>,
    handle: tokio::runtime::Handle,
    size: u64,
    flags: u16,
    /// Largest READ/WRITE payload sent in one request.
    max_payload: u64,
    request_timeout: Duration,
    /// Why the connection is no longer usable (a request timed out), if it is not.
    broken: Arc<Mutex<Option<String>>>,
    /// Tells the runtime thread to disconnect (the client it carries) and stop; taken on drop.
    stop: Option<tokio::sync::oneshot::Sender<Option<Arc<NbdClient>>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDev")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .field("flags", &format_args!("{:#x}", self.flags))
            .finish_non_exhaustive()
    }
}

/// Turns a client error into the device error callers act on.
fn map_client_error(op: &'static str, offset: u64, len: u64, size: u64, e: ClientError) -> DevError {
    let io_err = |kind: io::ErrorKind, msg: String| DevError::Io {
        op,
        offset,
        len,
        source: io::Error::new(kind, msg),
    };
    match e {
        ClientError::Server { errno, message } => {
            let errno_i = errno as i32;
            match errno_i {
                libc::EPERM => DevError::ReadOnly,
                libc::EINVAL => {
                    DevError::Invalid(format!("{op} at {offset} length {len}: server says EINVAL {message}"))
                }
                libc::ENOSPC => {
                    if offset.checked_add(len).is_none_or(|end| end > size) {
                        DevError::OutOfRange { op, offset, len, size }
                    } else {
                        DevError::NoSpace(format!("NBD server: {op} at {offset} length {len}: {message}"))
                    }
                }
                libc::ENOTSUP => DevError::Unsupported(op),
                libc::EOVERFLOW => {
                    DevError::Invalid(format!("{op} at {offset} length {len} too large for the server"))
                }
                // EIO, ENOMEM, ESHUTDOWN and anything unknown: the medium (or server) failed.
                _ => DevError::Io { op, offset, len, source: io::Error::from_raw_os_error(errno_i) },
            }
        }
        ClientError::Io(source) => DevError::Io { op, offset, len, source },
        ClientError::Disconnected(reason) => {
            io_err(io::ErrorKind::ConnectionAborted, format!("NBD connection lost: {reason}"))
        }
        ClientError::TooLarge(n) => DevError::Invalid(format!("{op}: request of {n} bytes too large")),
        other => io_err(io::ErrorKind::InvalidData, format!("NBD protocol: {other}")),
    }
}

fn connect_error(uri: &str, e: impl std::fmt::Display) -> DevError {
    DevError::Io {
        op: "connect",
        offset: 0,
        len: 0,
        source: io::Error::new(io::ErrorKind::ConnectionRefused, format!("NBD {uri}: {e}")),
    }
}

/// One request spawned on the runtime; [`NbdDev::wait`] blocks the caller for its answer.
struct Pending<T> {
    rx: mpsc::Receiver<Result<T, ClientError>>,
}

impl NbdDev {
    /// Connects to `nbd://host[:port][/export]` or `nbd+unix:///export?socket=PATH` with the
    /// default options.
    pub fn connect(uri: &str) -> DevResult<NbdDev> {
        Self::connect_with(uri, &NbdDevOptions::default())
    }

    /// Connects with explicit options.
    pub fn connect_with(uri: &str, opts: &NbdDevOptions) -> DevResult<NbdDev> {
        // Parse first so a bad URI is an `Invalid` error, not a connection failure.
        super::client::parse_uri(uri).map_err(|e| DevError::Invalid(e.to_string()))?;
        let (handle_tx, handle_rx) = mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<Arc<NbdClient>>>();
        // The runtime is built, run and dropped on its own thread: dropping a runtime inside an
        // async context panics, and the caller may well be inside one.
        let thread = std::thread::Builder::new()
            .name("ubcache-nbd-dev".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async move {
                    // Runs until the device is dropped (or connect failed and the sender went).
                    // Say goodbye politely if no request still holds the client.
                    if let Ok(Some(client)) = stop_rx.await
                        && let Ok(client) = Arc::try_unwrap(client)
                    {
                        let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
                    }
                });
                // Dropping `rt` here cancels whatever is left (the client's reader task).
            })
            .map_err(|e| connect_error(uri, e))?;
        let handle = match handle_rx.recv() {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(connect_error(uri, e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(connect_error(uri, "runtime thread died"));
            }
        };
        let client_opts =
            ClientOptions { structured_replies: opts.structured_replies, ..ClientOptions::default() };
        let uri_owned = uri.to_owned();
        let connect_timeout = opts.connect_timeout;
        let (tx, rx) = mpsc::sync_channel(1);
        handle.spawn(async move {
            let r =
                tokio::time::timeout(connect_timeout, NbdClient::connect_uri(&uri_owned, &client_opts)).await;
            let _ = tx.send(r);
        });
        let stop_and_join = |stop: tokio::sync::oneshot::Sender<Option<Arc<NbdClient>>>,
                             thread: JoinHandle<()>| {
            let _ = stop.send(None);
            let _ = thread.join();
        };
        let client = match rx.recv_timeout(connect_timeout + Duration::from_secs(1)) {
            Ok(Ok(Ok(c))) => c,
            Ok(Ok(Err(e))) => {
                stop_and_join(stop_tx, thread);
                return Err(connect_error(uri, e));
            }
            Ok(Err(_)) | Err(_) => {
                stop_and_join(stop_tx, thread);
                return Err(connect_error(uri, format!("no handshake within {connect_timeout:?}")));
            }
        };
        let info = client.info().clone();
        let client = Arc::new(client);
        let server_max = match info.block_size {
            Some((_, _, max)) if max > 0 => max,
            _ => proto::MAX_PAYLOAD,
        };
        let max_payload = u64::from(server_max.min(opts.max_request_bytes).clamp(1, proto::MAX_PAYLOAD));
        Ok(NbdDev {
            uri: uri.to_owned(),
            client: Some(client),
            handle,
            size: info.size,
            flags: info.flags,
            max_payload,
            request_timeout: opts.request_timeout,
            broken: Arc::new(Mutex::new(None)),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The URI this device is connected to.
    #[must_use]
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The export's transmission flags (`proto::transmission_flags`).
    #[must_use]
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Spawns one request on the device's runtime. The request gets `request_timeout`; a
    /// timeout marks the connection broken (see the module docs).
    fn submit<T, F, Fut>(&self, op: &'static str, f: F) -> Result<Pending<T>, ClientError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<NbdClient>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ClientError>> + Send + 'static,
    {
        if let Some(reason) = self.broken.lock().clone() {
            return Err(ClientError::Disconnected(reason));
        }
        let client = self.client.clone().ok_or_else(|| ClientError::Disconnected("device closed".into()))?;
        let (tx, rx) = mpsc::sync_channel(1);
        let timeout = self.request_timeout;
        let broken = Arc::clone(&self.broken);
        self.handle.spawn(async move {
            let result = match tokio::time::timeout(timeout, f(client)).await {
                Ok(r) => r,
                Err(_) => {
                    let reason = format!("{op} got no reply within {timeout:?}; connection abandoned");
                    broken.lock().get_or_insert_with(|| reason.clone());
                    Err(ClientError::Disconnected(reason))
                }
            };
            // The caller may have given up already; nothing else to do then.
            let _ = tx.send(result);
        });
        Ok(Pending { rx })
    }

    /// Waits for a submitted request. The margin over the request timeout covers a runtime
    /// that stopped (the task never ran): the caller still gets an answer.
    fn wait<T>(&self, p: Pending<T>) -> Result<T, ClientError> {
        let Pending { rx } = p;
        match rx.recv_timeout(self.request_timeout + Duration::from_secs(5)) {
            Ok(r) => r,
            Err(_) => {
                let reason = "the NBD runtime did not answer; connection abandoned".to_owned();
                self.broken.lock().get_or_insert_with(|| reason.clone());
                Err(ClientError::Disconnected(reason))
            }
        }
    }

    /// Submits every piece first, then waits for all of them, so a large request becomes many
    /// concurrent NBD commands. Returns the first error (all pieces are still waited for, so no
    /// request is left running when the call returns).
    fn run_all<T>(&self, pieces: Vec<Result<Pending<T>, ClientError>>) -> Result<Vec<T>, ClientError> {
        let mut out = Vec::with_capacity(pieces.len());
        let mut first_err = None;
        for p in pieces {
            match p.and_then(|p| self.wait(p)) {
                Ok(v) => out.push(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(out), Err)
    }

    fn check_writable(&self, op: &'static str, offset: u64, len: u64) -> DevResult<()> {
        DevError::check_range(op, offset, len, self.size)?;
        if self.has(tf::READ_ONLY) {
            return Err(DevError::ReadOnly);
        }
        Ok(())
    }

    /// Splits `offset..offset+len` into pieces of at most `max` bytes.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        let max = max.max(1);
        (0..len.div_ceil(max)).map(move |i| {
            let start = i * max;
            (offset + start, max.min(len - start))
        })
    }

    fn write_flags(&self, buf: &[u8], offset: u64, fua: bool) -> DevResult<()> {
        let op = if fua { "write_fua" } else { "write" };
        self.check_writable(op, offset, buf.len() as u64)?;
        let pieces = Self::pieces(offset, buf.len() as u64, self.max_payload)
            .map(|(off, n)| {
                let start = (off - offset) as usize;
                let data = buf[start..start + n as usize].to_vec();
                self.submit(op, move |c| async move { c.write(off, &data, fua).await })
            })
            .collect();
        self.run_all(pieces)
            .map(drop)
            .map_err(|e| map_client_error(op, offset, buf.len() as u64, self.size, e))
    }

    /// Sends a length-only command (TRIM, WRITE_ZEROES, CACHE) in pieces.
    fn range_command(
        &self,
        op: &'static str,
        cmd: proto::Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> DevResult<()> {
        let wire = cmd.to_wire();
        let pieces = Self::pieces(offset, len, MAX_RANGE_REQUEST)
            .map(|(off, n)| {
                self.submit(
                    op,
                    move |c| async move { c.request(wire, flags, off, n as u32, &[]).await.map(drop) },
                )
            })
            .collect();
        self.run_all(pieces).map(drop).map_err(|e| map_client_error(op, offset, len, self.size, e))
    }
}

impl BlockDev for NbdDev {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let len = buf.len() as u64;
        DevError::check_range("read", offset, len, self.size)?;
        let pieces = Self::pieces(offset, len, self.max_payload)
            .map(|(off, n)| self.submit("read", move |c| async move { c.read(off, n as u32).await }))
            .collect();
        let datas = self.run_all(pieces).map_err(|e| map_client_error("read", offset, len, self.size, e))?;
        let mut at = 0usize;
        for data in datas {
            let end = at + data.len();
            if end > buf.len() {
                return Err(map_client_error(
                    "read",
                    offset,
                    len,
                    self.size,
                    ClientError::Proto(proto::ProtoError::Malformed("read reply longer than asked")),
                ));
            }
            buf[at..end].copy_from_slice(&data);
            at = end;
        }
        if at != buf.len() {
            return Err(map_client_error(
                "read",
                offset,
                len,
                self.size,
                ClientError::Proto(proto::ProtoError::Malformed("read reply shorter than asked")),
            ));
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.write_flags(buf, offset, false)
    }

    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        if self.has(tf::SEND_FUA) {
            self.write_flags(buf, offset, true)
        } else {
            // No FUA on this server: a write then a full FLUSH gives the same guarantee.
            self.write_flags(buf, offset, false)?;
            self.sync()
        }
    }

    fn sync(&self) -> DevResult<()> {
        if !self.has(tf::SEND_FLUSH) {
            // The server does not take FLUSH: by the spec it has no write cache to flush.
            return Ok(());
        }
        let p = self.submit("flush", |c| async move { c.flush().await });
        p.and_then(|p| self.wait(p)).map_err(|e| map_client_error("flush", 0, 0, self.size, e))
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.check_writable("discard", offset, len)?;
        if len == 0 || !self.has(tf::SEND_TRIM) {
            // TRIM is advisory: doing nothing is a correct discard.
            return Ok(());
        }
        self.range_command("discard", proto::Command::Trim, 0, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        self.check_writable("write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.has(tf::SEND_WRITE_ZEROES) {
            return write_zeroes_by_writing(self, offset, len);
        }
        let flags = if may_unmap { 0 } else { cmd_flags::NO_HOLE };
        self.range_command("write_zeroes", proto::Command::WriteZeroes, flags, offset, len)
    }

    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        DevError::check_range("prefetch", offset, len, self.size)?;
        if len == 0 || !self.has(tf::SEND_CACHE) {
            return Ok(());
        }
        self.range_command("prefetch", proto::Command::Cache, 0, offset, len)
    }

    /// Every request is a round trip to the server, and the connection carries many at once:
    /// parallel writes help. Read-only as the server says.
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps { read_only: self.has(tf::READ_ONLY), parallel_writes: true, ..DevCaps::default() }
    }
}

impl Drop for NbdDev {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(self.client.take());
        }
        if let Some(thread) = self.thread.take() {
            // The runtime thread only awaits a 1 s bounded disconnect, then exits.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_err(errno: i32) -> ClientError {
        ClientError::Server { errno: errno as u32, message: String::new() }
    }

    #[test]
    fn server_errnos_map_to_the_error_kinds_callers_act_on() {
        let map = |errno, offset, len| map_client_error("write", offset, len, 4096, server_err(errno));
        assert!(matches!(map(libc::EIO, 0, 512), DevError::Io { .. }));
        assert!(matches!(map(libc::EPERM, 0, 512), DevError::ReadOnly));
        assert!(matches!(map(libc::EINVAL, 0, 512), DevError::Invalid(_)));
        assert!(matches!(map(libc::ENOSPC, 0, 512), DevError::NoSpace(_)));
        // ENOSPC for a request past the end is the range error, not a full disk.
        assert!(matches!(map(libc::ENOSPC, 4096, 512), DevError::OutOfRange { size: 4096, .. }));
        assert!(matches!(map(libc::ENOSPC, u64::MAX, 512), DevError::OutOfRange { .. }));
        assert!(matches!(map(libc::ENOTSUP, 0, 512), DevError::Unsupported("write")));
        assert!(matches!(map(libc::ESHUTDOWN, 0, 512), DevError::Io { .. }));
        let lost = map_client_error("read", 0, 1, 4096, ClientError::Disconnected("gone".into()));
        assert!(
            matches!(&lost, DevError::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionAborted)
        );
    }

    #[test]
    fn pieces_cover_the_range_exactly() {
        let p: Vec<_> = NbdDev::pieces(100, 1000, 300).collect();
        assert_eq!(p, vec![(100, 300), (400, 300), (700, 300), (1000, 100)]);
        assert_eq!(NbdDev::pieces(0, 0, 300).count(), 0);
        assert_eq!(NbdDev::pieces(7, 5, 0).collect::<Vec<_>>().len(), 5);
    }
}
