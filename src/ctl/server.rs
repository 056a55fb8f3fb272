//! The control socket server: a Unix stream socket, one JSON request per line.
//!
//! One acceptor thread plus one thread per client, at most [`CtlServerConfig::max_clients`] at
//! once (a client past the limit gets a `busy` error reply and is closed). Independent of the
//! NBD server's tokio runtime on purpose: the control plane must answer even when the data
//! path is saturated.
//!
//! The socket is created with mode 0600 and no window in which another user could connect:
//! the file is bound, chmod-ed, and only then put into the listening state; before `listen()`
//! every `connect()` is refused, whatever the file's mode.
//!
//! [`CtlServer::stop`] (or drop) sets the stop flag, joins the acceptor and every client
//! thread (each polls the flag while waiting for input), and removes the socket file if it is
//! still the one this server created. A request already inside the engine (a mode switch
//! waiting for its flush, a detach) is finished first: stopping never abandons it half done.

use super::protocol::{error_reply, handle_line};
use super::{ControlTarget, CtlError};
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Limits of the control server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtlServerConfig {
    /// Clients served at once; more are refused with a `busy` reply.
    pub max_clients: usize,
    /// Longest request line in bytes; a longer line gets an error reply and is discarded
    /// without being stored (the connection stays usable).
    pub max_line_bytes: usize,
    /// A client that sends nothing for this long is disconnected, freeing its slot.
    pub idle_timeout: Duration,
    /// How often waiting threads look at the stop flag (bounds the time `stop` takes).
    pub poll_interval: Duration,
    /// A reply that cannot be written within this time drops the client.
    pub write_timeout: Duration,
}

impl Default for CtlServerConfig {
    fn default() -> Self {
        Self {
            max_clients: 8,
            // Requests are a few hundred bytes; 64 KiB leaves room and bounds memory per client.
            max_line_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_millis(100),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// A running control server. Stops (and joins its threads) on [`CtlServer::stop`] or drop.
#[derive(Debug)]
pub struct CtlServer {
    path: PathBuf,
    /// Device and inode of the socket file this server created: the file is removed on stop
    /// only if it is still this one (another server may have replaced a stale socket).
    identity: (u64, u64),
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl CtlServer {
    /// Creates the socket at `path` (mode 0600) and starts serving `target`.
    ///
    /// A stale socket file (nobody listening) is replaced; a live one is an error, as is any
    /// other kind of file at `path`.
    ///
    /// # Errors
    /// [`CtlError::Busy`] if another server listens at `path`, [`CtlError::Invalid`] for a path
    /// that is too long or not a socket, [`CtlError::Io`] when creating the socket fails.
    pub fn start(
        path: &Path,
        target: Arc<dyn ControlTarget>,
        config: CtlServerConfig,
    ) -> Result<CtlServer, CtlError> {
        let listener = bind_private(path)?;
        let meta = fs::metadata(path).map_err(|e| CtlError::io(format!("stat {}", path.display()), e))?;
        let identity = (meta.dev(), meta.ino());
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("ubcache-ctl".to_owned())
                .spawn(move || accept_loop(&listener, &target, &stop, config))
                .map_err(|e| CtlError::io("spawn control thread", e))?
        };
        Ok(CtlServer { path: path.to_owned(), identity, stop, acceptor: Some(acceptor) })
    }

    /// The socket path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, waits for every client thread to finish, removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            if acceptor.join().is_err() {
                log::error!("control socket acceptor thread panicked");
            }
            if let Ok(meta) = fs::symlink_metadata(&self.path) {
                if (meta.dev(), meta.ino()) == self.identity {
                    let _ = fs::remove_file(&self.path);
                }
            }
        }
    }
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates a listening Unix socket at `path` whose file has mode 0600 before anyone can connect.
fn bind_private(path: &Path) -> Result<UnixListener, CtlError> {
    remove_stale_socket(path)?;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is a plain C struct for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // sun_path must keep a terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(CtlError::Invalid(format!(
            "control socket path {} must be 1..{} bytes without NUL",
            path.display(),
            addr.sun_path.len()
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(CtlError::io("create control socket", io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let addr_len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is an initialised sockaddr_un and `addr_len` its size; `fd` is open.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast::<libc::sockaddr>(), addr_len) };
    if rc != 0 {
        return Err(CtlError::io(format!("bind {}", path.display()), io::Error::last_os_error()));
    }
    // Not listening yet: connect() to this file fails with ECONNREFUSED whatever its mode, so
    // tightening the mode now leaves no window for another user.
    if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        let _ = fs::remove_file(path);
        return Err(CtlError::io(format!("chmod 0600 {}", path.display()), e));
    }
    // SAFETY: `fd` is a bound stream socket.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 16) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let _ = fs::remove_file(path);
        return Err(CtlError::io(format!("listen on {}", path.display()), e));
    }
    Ok(UnixListener::from(fd))
}

/// Removes a socket file nobody listens on (left by a crash); refuses a live one or a non-socket.
fn remove_stale_socket(path: &Path) -> Result<(), CtlError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CtlError::io(format!("stat {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(CtlError::Invalid(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(CtlError::Busy(format!("another server is listening on {}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale control socket {}", path.display());
            fs::remove_file(path).map_err(|e| CtlError::io(format!("remove stale {}", path.display()), e))
        }
        Err(e) => Err(CtlError::io(format!("probe {}", path.display()), e)),
    }
}

/// Waits up to `timeout` for `fd` to become readable (a connection to accept).
pub(crate) fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and the count is 1.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(rc > 0)
}

/// Decrements the active-client count when a client thread ends, however it ends.
struct ClientSlot(Arc<AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: &UnixListener,
    target: &Arc<dyn ControlTarget>,
    stop: &AtomicBool,
    config: CtlServerConfig,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let stop_clients = Arc::new(AtomicBool::new(false));
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match wait_readable(listener, config.poll_interval) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                log::error!("control socket poll failed: {e}");
                thread::sleep(config.poll_interval);
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket accept failed: {e}");
                continue;
            }
        };
        clients.retain(|c| !c.is_finished());
        if active.load(Ordering::SeqCst) >= config.max_clients {
            refuse_busy(stream, config);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let slot = ClientSlot(Arc::clone(&active));
        let target = Arc::clone(target);
        let stop_clients = Arc::clone(&stop_clients);
        let spawned = thread::Builder::new().name("ubcache-ctl-client".to_owned()).spawn(move || {
            let _slot = slot;
            if let Err(e) = serve_client(stream, target.as_ref(), &stop_clients, config) {
                log::debug!("control client ended: {e}");
            }
        });
        match spawned {
            Ok(handle) => clients.push(handle),
            // The closure (and with it the slot and the stream) was dropped: nothing leaks.
            Err(e) => log::error!("cannot spawn control client thread: {e}"),
        }
    }
    stop_clients.store(true, Ordering::SeqCst);
    for client in clients {
        if client.join().is_err() {
            log::error!("control client thread panicked");
        }
    }
}

fn refuse_busy(mut stream: UnixStream, config: CtlServerConfig) {
    let reply =
        error_reply(&CtlError::Busy(format!("too many control clients (limit {})", config.max_clients)));
    let _ = stream.set_write_timeout(Some(config.write_timeout));
    let _ = writeln!(stream, "{reply}");
}

/// Serves one client: reads lines (bounded), answers each with one line.
fn serve_client(
    stream: UnixStream,
    target: &dyn ControlTarget,
    stop: &AtomicBool,
    config: CtlServerConfig,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(config.poll_interval))?;
    stream.set_write_timeout(Some(config.write_timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(8 * 1024, stream);
    let mut line: Vec<u8> = Vec::new();
    // The current line passed the limit: its bytes are discarded up to the next newline.
    let mut overlong = false;
    let mut last_input = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if last_input.elapsed() >= config.idle_timeout {
                    return Ok(());
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            // EOF: answer a last request sent without its newline, then end.
            if !line.is_empty() && !overlong {
                let reply = handle_line(target, &line);
                writer.write_all(format!("{reply}\n").as_bytes())?;
            }
            return Ok(());
        }
        last_input = Instant::now();
        let newline = buf.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(buf.len());
        if !overlong {
            if line.len() + take > config.max_line_bytes {
                overlong = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(&buf[..take]);
            }
        }
        reader.consume(newline.map_or(take, |i| i + 1));
        if newline.is_some() {
            let reply = if overlong {
                error_reply(&CtlError::Protocol(format!(
                    "request line longer than {} bytes; discarded",
                    config.max_line_bytes
                )))
                .to_string()
            } else {
                handle_line(target, &line)
            };
            writer.write_all(format!("{reply}\n").as_bytes())?;
            line.clear();
            overlong = false;
        }
    }
}
