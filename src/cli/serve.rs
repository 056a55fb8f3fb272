//! `ubcache serve`: builds the exports, starts the control plane next to a cached set, and runs
//! the NBD server until SIGINT or SIGTERM asks it to stop.

use super::defaults::DEFAULT_CACHE_FILE;
use super::{ServeError, ServeOptions, build_exports, listen_addrs};
use crate::cache::writeback::{WritebackConfig, WritebackThread};
use crate::cache::{CacheSet, CachedDev};
use crate::ctl::metrics::MetricsServer;
use crate::ctl::server::{CtlServer, CtlServerConfig};
use crate::nbd::uri::export_uri;
use crate::nbd::{ListenAddr, Server, ServerConfig, build_runtime};
use std::sync::Arc;

/// The line printed on stdout for every URI once the server listens. Scripts and tests wait for
/// it, so its wording is stable: `ubcache: serving export "NAME" at URI`.
#[must_use]
pub fn ready_line(export_name: &str, uri: &str) -> String {
    format!("ubcache: serving export {export_name:?} at {uri}")
}

/// Runs `ubcache serve`: validates, opens the backing file, binds, prints the URIs, and serves
/// until SIGINT or SIGTERM. On the first signal the server stops accepting, finishes in-flight
/// requests and syncs every export; a second signal exits at once.
pub fn run(opts: &ServeOptions) -> Result<(), ServeError> {
    let record_plans = if opts.record.is_empty() {
        Vec::new()
    } else {
        super::record::plan(&opts.record, &super::export_specs(opts)?)?
    };
    let mut prepared = build_exports(opts)?;
    let cached = std::mem::take(&mut prepared.cached);
    let (mut exports, _locks, cache_set) = prepared.into_parts();
    let logs = match super::record::start(&record_plans, &mut exports) {
        Ok(logs) => logs,
        Err(e) => {
            if let Some(set) = cache_set
                && let Err(close) = set.close()
            {
                log::error!("closing the cache set after a failed start: {close}");
            }
            return Err(e);
        }
    };
    let recording = if record_plans.is_empty() { None } else { Some(logs) };
    let listen = listen_addrs(opts);
    // A passthrough has no control plane, except for `ubcache mark` when it records.
    let mark_only = match (&cache_set, &recording) {
        (None, Some(logs)) => Some(start_mark_socket(opts, logs.clone())?),
        _ => None,
    };
    let plane = match &cache_set {
        Some(set) => match ControlPlane::start(opts, set, cached, recording) {
            Ok(plane) => Some(plane),
            Err(e) => {
                // Nothing was served: close the set so the next start replays nothing.
                if let Err(close) = set.clone().close() {
                    log::error!("closing the cache set after a failed start: {close}");
                }
                return Err(e);
            }
        },
        None => None,
    };
    let served = build_runtime(opts.threads).map_err(ServeError::Runtime).and_then(|runtime| {
        let config = ServerConfig { exports, device_calls: opts.device_calls, ..ServerConfig::default() };
        runtime.block_on(serve_until_signal(config, &listen))
    });
    if let Some(plane) = plane {
        plane.stop();
    }
    if let Some(ctl) = mark_only {
        ctl.stop();
    }
    if let Some(set) = cache_set {
        let path = opts.cache.clone().unwrap_or_else(|| opts.data_dir.join(DEFAULT_CACHE_FILE));
        let dirty = set.stats().dirty_bytes;
        set.close().map_err(|source| ServeError::Cache { path, source })?;
        log::info!(
            "cache set closed cleanly (checkpointed, nothing to replay); {dirty} dirty bytes stay cached"
        );
    }
    served
}

/// What runs next to a cached export: the writeback thread, the control socket and, if asked,
/// the metrics endpoint.
struct ControlPlane {
    writeback: WritebackThread,
    ctl: CtlServer,
    metrics: Option<MetricsServer>,
}

impl ControlPlane {
    fn start(
        opts: &ServeOptions,
        set: &CacheSet,
        cached: Vec<(String, Arc<CachedDev>)>,
        recording: Option<crate::record::RecordedExports>,
    ) -> Result<Self, ServeError> {
        let set = Arc::new(set.clone());
        // The writeback thread runs whenever there is a cache: it idles while nothing is dirty,
        // and writes back dirty data left by an earlier run in writeback mode whatever the mode
        // is now (or after `ubcache set-mode`).
        let writeback = WritebackThread::start(Arc::clone(&set), WritebackConfig::default());
        let mut target = crate::ctl::engine::control_target(set, cached);
        if let Some(logs) = recording {
            target = Arc::new(crate::record::RecordingTarget::new(Some(target), logs));
        }
        let socket = ctl_socket_path(opts)?;
        let ctl = CtlServer::start(&socket, Arc::clone(&target), CtlServerConfig::default())?;
        log::info!(
            "control socket at {} (ubcache stats|set-mode|set|knobs|flush|detach|attach|mark)",
            socket.display()
        );
        let metrics = match opts.metrics {
            Some(addr) => {
                let server = MetricsServer::start(addr, target)?;
                log::info!("metrics at http://{}/metrics", server.local_addr());
                Some(server)
            }
            None => None,
        };
        Ok(Self { writeback, ctl, metrics })
    }

    /// Stops the control plane, then writeback (before the set is closed: close checkpoints,
    /// and a writeback step racing it would only redo work).
    fn stop(self) {
        self.ctl.stop();
        if let Some(m) = self.metrics {
            m.stop();
        }
        if let Err(e) = self.writeback.stop() {
            log::error!("the writeback thread stopped with an error: {e}");
        }
    }
}

async fn serve_until_signal(config: ServerConfig, listen: &[ListenAddr]) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Install the handlers before binding, so a signal that arrives as soon as the URI is
    // printed is a clean shutdown rather than the default (immediate) termination.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Runtime)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Runtime)?;

    let names: Vec<String> = config.exports.iter().map(|e| e.name.clone()).collect();
    let server = Server::bind(config, listen).await?;
    for addr in server.local_addrs() {
        for name in &names {
            let uri = export_uri(&addr, name);
            log::info!("serving export {name:?} at {uri}");
            print_ready_line(&ready_line(name, &uri));
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        log::info!("{name}: shutting down (finishing in-flight requests, then syncing)");
        let _ = stop_tx.send(());
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        log::warn!("second signal: exiting at once, without waiting for in-flight requests or syncing");
        std::process::exit(130);
    });
    // A dropped sender (the task ended) also stops the server: nothing could signal it anymore.
    server
        .run(async move {
            let _ = stop_rx.await;
        })
        .await?;
    log::info!("stopped cleanly; every export was synced");
    Ok(())
}

fn print_ready_line(line: &str) {
    use std::io::Write;
    // Not `println!`: it panics when stdout is a closed pipe (`ubcache serve | head -1`), and a
    // reader that went away must not take the server down. Stdout is line-buffered, so the line
    // is flushed at once even into a pipe; the explicit flush makes that independent of it.
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        log::debug!("cannot print the ready line on stdout: {e}");
    }
}

/// The control socket path (`--ctl-socket`, else in the data directory), its directory created.
fn ctl_socket_path(opts: &ServeOptions) -> Result<std::path::PathBuf, ServeError> {
    let socket = opts.ctl_socket.clone().unwrap_or_else(|| crate::ctl::socket_path(&opts.data_dir));
    if let Some(dir) = socket.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|source| ServeError::DataDir { path: dir.to_path_buf(), source })?;
    }
    Ok(socket)
}

/// The control socket of a recording passthrough: `mark` works, cache verbs say there is no cache.
fn start_mark_socket(
    opts: &ServeOptions,
    logs: crate::record::RecordedExports,
) -> Result<CtlServer, ServeError> {
    let target = Arc::new(crate::record::RecordingTarget::new(None, logs));
    let socket = ctl_socket_path(opts)?;
    let ctl = CtlServer::start(&socket, target, CtlServerConfig::default())?;
    log::info!("control socket at {} (ubcache mark)", socket.display());
    Ok(ctl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_is_stable() {
        assert_eq!(
            ready_line("", "nbd://127.0.0.1:10809"),
            "ubcache: serving export \"\" at nbd://127.0.0.1:10809"
        );
        assert_eq!(
            ready_line("disk", "nbd+unix:///disk?socket=/s"),
            "ubcache: serving export \"disk\" at nbd+unix:///disk?socket=/s"
        );
    }
}
