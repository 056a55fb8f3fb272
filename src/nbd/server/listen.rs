//! Listening sockets, the accept loop and the [`Server`] that owns them.

use super::connection::serve_connection;
use super::{BoxRead, BoxWrite, ListenAddr, ServerConfig, ServerError, Shared};
use crate::dev::BlockDev;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

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
                out.push(crate::nbd::uri::export_uri(&addr, &e.export.name));
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
