//! Prometheus metrics: a [`StatsSnapshot`] in text exposition format 0.0.4, and a tiny HTTP/1.1
//! responder that serves it on `GET /metrics`.
//!
//! The responder is an acceptor thread plus one short-lived thread per connection, at most
//! [`MAX_CONNECTIONS`] at once (more get `503` at once). Each connection is bounded in size
//! ([`MAX_REQUEST_BYTES`]) and time ([`REQUEST_DEADLINE`]), so a slow or silent client holds a
//! slot for at most that long and does not delay other scrapes. It binds loopback by default;
//! exposing it wider is the operator's explicit choice.

use super::server::wait_readable;
use super::stats::{Counter, CounterValues, Gauge, StatsSnapshot};
use super::{ControlTarget, CtlError};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Default listen address: loopback only.
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9477));

/// Default largest request head; a longer one gets `431`.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Default time a client has to send its request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// Connections served at once by default.
pub const MAX_CONNECTIONS: usize = 4;

/// Limits of the metrics responder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Connections served at once; more get `503`.
    pub max_connections: usize,
    /// Largest request head; a longer one gets `431`.
    pub max_request_bytes: usize,
    /// Time a client has to send its request head (and to take the response).
    pub request_deadline: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            max_request_bytes: MAX_REQUEST_BYTES,
            request_deadline: REQUEST_DEADLINE,
        }
    }
}

/// How often the accept loop looks at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Content type of text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Metric name prefix.
const PREFIX: &str = "ubcache";

/// The `reason` label values of `ubcache_bypassed_total` and the counter each one reports.
pub const BYPASS_REASONS: [(&str, Counter); 4] = [
    ("mode", Counter::BypassMode),
    ("sequential", Counter::BypassSequential),
    ("congestion", Counter::BypassCongestion),
    ("full", Counter::BypassFull),
];

/// Escapes a HELP text as the format requires (backslash and newline).
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_float(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "NaN".to_owned(),
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders `stats` in Prometheus text format 0.0.4: each counter as `ubcache_<name>_total`,
/// the bypass counters also as `ubcache_bypassed_total{reason=...}`, each gauge as
/// `ubcache_<name>`, the hit ratio per window, journal fill and uptime.
#[must_use]
pub fn render_prometheus(stats: &StatsSnapshot) -> String {
    let mut out = String::with_capacity(4096);
    for &counter in Counter::ALL {
        let name = format!("{PREFIX}_{}_total", counter.name());
        header(&mut out, &name, counter.help(), "counter");
        let _ = writeln!(out, "{name} {}", stats.total.get(counter));
    }
    // The bypass counters again as one family with a `reason` label, so a dashboard can sum
    // or stack them (`sum by (reason) (rate(ubcache_bypassed_total[5m]))`).
    let name = format!("{PREFIX}_bypassed_total");
    header(
        &mut out,
        &name,
        "Requests that bypassed the cache, by reason (mode, sequential, congestion, full).",
        "counter",
    );
    for (reason, counter) in BYPASS_REASONS {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", stats.total.get(counter));
    }
    for &gauge in Gauge::ALL {
        let name = format!("{PREFIX}_{}", gauge.name());
        header(&mut out, &name, gauge.help(), "gauge");
        let _ = writeln!(out, "{name} {}", stats.gauges.get(gauge));
    }
    let name = format!("{PREFIX}_read_hit_ratio");
    header(&mut out, &name, "Read hits / (hits + misses) over a window; NaN without reads.", "gauge");
    let windows: [(&str, &CounterValues); 4] = [
        ("total", &stats.total),
        ("five_minute", &stats.five_minute),
        ("hour", &stats.hour),
        ("day", &stats.day),
    ];
    for (window, values) in windows {
        let _ = writeln!(out, "{name}{{window=\"{window}\"}} {}", format_float(values.hit_ratio));
    }
    let name = format!("{PREFIX}_journal_fill_ratio");
    header(&mut out, &name, "Journal used bytes / capacity; NaN without a journal.", "gauge");
    let _ = writeln!(out, "{name} {}", format_float(stats.gauges.journal_fill));
    let name = format!("{PREFIX}_uptime_seconds");
    header(&mut out, &name, "Seconds since the statistics started.", "gauge");
    let _ = writeln!(out, "{name} {}", stats.uptime_secs);
    out
}

/// A running metrics responder. Stops (and joins) on [`MetricsServer::stop`] or drop.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port) and serves `target`'s statistics with the
    /// default limits.
    ///
    /// # Errors
    /// [`CtlError::Io`] when binding fails.
    pub fn start(addr: SocketAddr, target: Arc<dyn ControlTarget>) -> Result<MetricsServer, CtlError> {
        MetricsServer::start_with(addr, target, MetricsConfig::default())
    }

    /// As [`MetricsServer::start`] with explicit limits.
    ///
    /// # Errors
    /// [`CtlError::Io`] when binding fails.
    pub fn start_with(
        addr: SocketAddr,
        target: Arc<dyn ControlTarget>,
        config: MetricsConfig,
    ) -> Result<MetricsServer, CtlError> {
        let listener =
            TcpListener::bind(addr).map_err(|e| CtlError::io(format!("bind metrics on {addr}"), e))?;
        let addr = listener.local_addr().map_err(|e| CtlError::io("metrics local address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("ubcache-metrics".to_owned())
                .spawn(move || serve(&listener, &target, &stop, config))
                .map_err(|e| CtlError::io("spawn metrics thread", e))?
        };
        Ok(MetricsServer { addr, stop, thread: Some(thread) })
    }

    /// The address actually bound.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("metrics thread panicked");
            }
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Decrements the active-connection count when a connection thread ends, however it ends.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(listener: &TcpListener, target: &Arc<dyn ControlTarget>, stop: &AtomicBool, config: MetricsConfig) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match wait_readable(listener, POLL_INTERVAL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                log::error!("metrics poll failed: {e}");
                thread::sleep(POLL_INTERVAL);
                continue;
            }
        }
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("metrics accept failed: {e}");
                continue;
            }
        };
        connections.retain(|c| !c.is_finished());
        if active.load(Ordering::SeqCst) >= config.max_connections {
            let _ = respond(stream, config, "503 Service Unavailable", "", "too many connections\n", false);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let slot = ConnectionSlot(Arc::clone(&active));
        let target = Arc::clone(target);
        let spawned = thread::Builder::new().name("ubcache-metrics-conn".to_owned()).spawn(move || {
            let _slot = slot;
            if let Err(e) = answer(stream, target.as_ref(), config) {
                log::debug!("metrics client {peer}: {e}");
            }
        });
        match spawned {
            Ok(handle) => connections.push(handle),
            // The closure (slot and stream with it) was dropped: nothing leaks.
            Err(e) => log::error!("cannot spawn metrics connection thread: {e}"),
        }
    }
    // Each connection ends within the request deadline plus one write timeout.
    for connection in connections {
        if connection.join().is_err() {
            log::error!("metrics connection thread panicked");
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes a request head (everything before the blank line).
fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else { return Route::BadRequest };
    let request_line = text.split(['\r', '\n']).next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || target.is_empty() {
        return Route::BadRequest;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" { Route::Metrics { head_only } } else { Route::NotFound }
}

/// Reads the request head (bounded in bytes and time); `None` if it is too large.
fn read_head(stream: &mut TcpStream, config: MetricsConfig) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + config.request_deadline;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 1024];
    loop {
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > config.max_request_bytes {
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request head not complete in time"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            // EOF before a blank line: treat what came as the whole head (a bare request line).
            return Ok(Some(head));
        }
        head.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn answer(mut stream: TcpStream, target: &dyn ControlTarget, config: MetricsConfig) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    match read_head(&mut stream, config)? {
        None => respond(
            stream,
            config,
            "431 Request Header Fields Too Large",
            "",
            "request head too large\n",
            false,
        ),
        Some(head) => match route(&head) {
            Route::Metrics { head_only } => {
                respond(stream, config, "200 OK", "", &render_prometheus(&target.stats()), head_only)
            }
            Route::NotFound => {
                respond(stream, config, "404 Not Found", "", "not found; metrics are at /metrics\n", false)
            }
            Route::MethodNotAllowed => respond(
                stream,
                config,
                "405 Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "method not allowed\n",
                false,
            ),
            Route::BadRequest => respond(stream, config, "400 Bad Request", "", "bad request\n", false),
        },
    }
}

/// Writes one response and closes. `extra_headers` are complete `Name: value\r\n` lines.
fn respond(
    mut stream: TcpStream,
    config: MetricsConfig,
    status: &str,
    extra_headers: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    stream.set_write_timeout(Some(config.request_deadline))?;
    let content_type = if status.starts_with("200") { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_only_get_and_head_of_metrics() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x"), Route::Metrics { head_only: false });
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0"), Route::Metrics { head_only: false });
        assert_eq!(route(b"HEAD /metrics HTTP/1.1"), Route::Metrics { head_only: true });
        assert_eq!(route(b"GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"GET /metricsx HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
        assert_eq!(route(b"GET /metrics"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3"), Route::BadRequest);
        assert_eq!(route(b"GET  /metrics HTTP/1.1"), Route::BadRequest);
        assert_eq!(route(&[0xff, 0x00]), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
    }

    #[test]
    fn help_escapes_backslash_and_newline() {
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }
}
