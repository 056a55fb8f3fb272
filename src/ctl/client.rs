//! The client side of the control socket, and the text the CLI prints.
//!
//! `ubcache stats|set-mode|set|knobs|flush|detach|attach` build a [`CtlArgs`] and call
//! [`run_ctl_command`], which sends one request and renders the reply as text. The renderers
//! ([`render_stats`], [`render_flush_progress`]) are pure functions.

use super::knobs::CacheMode;
use super::protocol::{Request, parse_reply};
use super::stats::{Counter, CounterValues, Gauge, StatsSnapshot};
use super::{CtlError, FlushProgress, FlushState};
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long one request may take before the client gives up. Generous: `set-mode` with
/// `flush_first` and `detach` wait for a whole flush on the server side.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Longest reply line the client accepts (a stats reply is a few KiB).
pub const MAX_REPLY_BYTES: u64 = 1 << 20;

/// Sends one request and returns the `ok:true` reply object.
///
/// # Errors
/// [`CtlError::Io`] when the socket cannot be reached or times out, the server's error for an
/// `ok:false` reply, [`CtlError::Protocol`] for a reply that is not valid.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> Result<Map<String, Value>, CtlError> {
    let context = |what: &str| format!("{what} control socket {}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(|e| CtlError::io(context("connect to"), e))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| CtlError::io(context("configure"), e))?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| CtlError::io(context("configure"), e))?;
    let line = serde_json::to_string(request)
        .map_err(|e| CtlError::Protocol(format!("cannot encode request: {e}")))?;
    stream.write_all(format!("{line}\n").as_bytes()).map_err(|e| CtlError::io(context("write to"), e))?;
    let mut reply = Vec::new();
    BufReader::new(stream.take(MAX_REPLY_BYTES + 1))
        .read_until(b'\n', &mut reply)
        .map_err(|e| CtlError::io(context("read from"), e))?;
    if reply.len() as u64 > MAX_REPLY_BYTES {
        return Err(CtlError::Protocol(format!("reply longer than {MAX_REPLY_BYTES} bytes")));
    }
    if reply.is_empty() {
        return Err(CtlError::Protocol("server closed the connection without a reply".to_owned()));
    }
    let text =
        std::str::from_utf8(&reply).map_err(|_| CtlError::Protocol("reply is not UTF-8".to_owned()))?;
    parse_reply(text)
}

fn decode<T: serde::de::DeserializeOwned>(reply: &Map<String, Value>, field: &str) -> Result<T, CtlError> {
    let value = reply.get(field).ok_or_else(|| CtlError::Protocol(format!("reply has no {field:?}")))?;
    serde_json::from_value(value.clone())
        .map_err(|e| CtlError::Protocol(format!("bad {field:?} in reply: {e}")))
}

/// Fetches the statistics.
///
/// # Errors
/// As [`request`].
pub fn fetch_stats(socket: &Path) -> Result<StatsSnapshot, CtlError> {
    decode(&request(socket, &Request::Stats, DEFAULT_REQUEST_TIMEOUT)?, "stats")
}

/// Fetches the flush progress.
///
/// # Errors
/// As [`request`].
pub fn fetch_flush_progress(socket: &Path) -> Result<FlushProgress, CtlError> {
    decode(&request(socket, &Request::FlushProgress, DEFAULT_REQUEST_TIMEOUT)?, "progress")
}

/// Polls the flush progress every `poll` until the flush is no longer running, calling
/// `on_progress` with each reading; returns the last one (state `Done`, `Failed`, `Cancelled`,
/// or `Idle` if no flush was started).
///
/// # Errors
/// As [`request`].
pub fn wait_for_flush(
    socket: &Path,
    poll: Duration,
    on_progress: &mut dyn FnMut(&FlushProgress),
) -> Result<FlushProgress, CtlError> {
    loop {
        let progress = fetch_flush_progress(socket)?;
        on_progress(&progress);
        if progress.state != FlushState::Running {
            return Ok(progress);
        }
        std::thread::sleep(poll);
    }
}

/// A control command as the CLI parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtlArgs {
    /// Protocol version check.
    Ping,
    /// Statistics, as a table or as the raw JSON.
    Stats { json: bool },
    /// The mode of each export.
    Modes,
    /// Switch the cache mode.
    SetMode { mode: CacheMode, flush_first: bool, export: Option<String> },
    /// Set a knob.
    Set { knob: String, value: String, export: Option<String> },
    /// List knobs.
    Knobs { export: Option<String> },
    /// Start a flush (the CLI then follows it with [`wait_for_flush`] unless asked not to).
    Flush,
    /// Show flush progress once.
    FlushProgress,
    /// Cancel a running flush.
    CancelFlush,
    /// Detach an export (flushes first).
    Detach { export: String },
    /// Attach an export.
    Attach { export: String },
    /// Put a named mark in the recording log.
    Mark { name: String, export: Option<String> },
}

impl CtlArgs {
    /// The request this command sends.
    #[must_use]
    pub fn to_request(&self) -> Request {
        match self {
            CtlArgs::Ping => Request::Ping,
            CtlArgs::Stats { .. } => Request::Stats,
            CtlArgs::Modes => Request::Modes,
            CtlArgs::SetMode { mode, flush_first, export } => {
                Request::SetMode { mode: *mode, flush_first: *flush_first, export: export.clone() }
            }
            CtlArgs::Set { knob, value, export } => Request::Set {
                knob: knob.clone(),
                value: Value::String(value.clone()),
                export: export.clone(),
            },
            CtlArgs::Knobs { export } => Request::Knobs { export: export.clone() },
            CtlArgs::Flush => Request::Flush,
            CtlArgs::FlushProgress => Request::FlushProgress,
            CtlArgs::CancelFlush => Request::CancelFlush,
            CtlArgs::Detach { export } => Request::Detach { export: export.clone() },
            CtlArgs::Attach { export } => Request::Attach { export: export.clone() },
            CtlArgs::Mark { name, export } => Request::Mark { name: name.clone(), export: export.clone() },
        }
    }
}

/// Runs one control command and returns what the CLI prints.
///
/// # Errors
/// As [`request`]; the server's refusals come back as their [`CtlError`] kind.
pub fn run_ctl_command(socket: &Path, args: &CtlArgs) -> Result<String, CtlError> {
    let reply = request(socket, &args.to_request(), DEFAULT_REQUEST_TIMEOUT)?;
    Ok(match args {
        CtlArgs::Ping => format!(
            "ubcache {} (control protocol {})",
            reply.get("version").and_then(Value::as_str).unwrap_or("?"),
            reply.get("protocol").and_then(Value::as_u64).unwrap_or(0)
        ),
        CtlArgs::Stats { json: true } => serde_json::to_string_pretty(
            reply.get("stats").ok_or_else(|| CtlError::Protocol("reply has no \"stats\"".to_owned()))?,
        )
        .map_err(|e| CtlError::Protocol(e.to_string()))?,
        CtlArgs::Stats { json: false } => {
            let mut out = render_stats(&decode(&reply, "stats")?);
            // Servers before the export list sent none: print what there is.
            let exports: Vec<Value> = decode(&reply, "exports").unwrap_or_default();
            for e in exports {
                let text = |key: &str| e.get(key).and_then(Value::as_str).unwrap_or("?").to_owned();
                let _ =
                    writeln!(out, "export {:?}: mode {}, {}", text("export"), text("mode"), text("state"));
            }
            out
        }
        CtlArgs::Modes => {
            let modes: Vec<Value> = decode(&reply, "modes")?;
            let mut out = String::new();
            for m in modes {
                let export = m.get("export").and_then(Value::as_str).unwrap_or("?");
                let mode = m.get("mode").and_then(Value::as_str).unwrap_or("?");
                // `NAME<tab>MODE` as before for an attached export; a detached one says so.
                match m.get("state").and_then(Value::as_str) {
                    Some("detached") => {
                        let _ = writeln!(out, "{export}\t{mode}\tdetached");
                    }
                    _ => {
                        let _ = writeln!(out, "{export}\t{mode}");
                    }
                }
            }
            out
        }
        CtlArgs::SetMode { mode, export, .. } => match export {
            Some(export) => format!("{export}: mode {mode}"),
            None => format!("mode {mode}"),
        },
        CtlArgs::Set { .. } => format!(
            "{} = {}",
            reply.get("knob").and_then(Value::as_str).unwrap_or("?"),
            reply.get("value").and_then(Value::as_str).unwrap_or("?")
        ),
        CtlArgs::Knobs { .. } => {
            let knobs: Map<String, Value> = decode(&reply, "knobs")?;
            let mut out = String::new();
            for (name, value) in knobs {
                let _ = writeln!(out, "{name} = {}", value.as_str().unwrap_or("?"));
            }
            out
        }
        CtlArgs::Flush => "flush started".to_owned(),
        CtlArgs::FlushProgress => render_flush_progress(&decode(&reply, "progress")?, 30),
        CtlArgs::CancelFlush => "flush cancelled".to_owned(),
        CtlArgs::Detach { export } => format!("{export}: detached"),
        CtlArgs::Attach { export } => format!("{export}: attached"),
        CtlArgs::Mark { name, .. } => {
            let marks: Vec<Value> = decode(&reply, "marks")?;
            marks
                .iter()
                .map(|m| {
                    let export = m.get("export").and_then(Value::as_str).unwrap_or_default();
                    let entry = m.get("entry").and_then(Value::as_u64).unwrap_or_default();
                    format!("mark {name:?} in the log of export {export:?} at entry {entry}")
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    })
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `2.0 GiB`.
#[must_use]
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Seconds as `H:MM:SS`.
#[must_use]
pub fn format_eta(secs: u64) -> String {
    format!("{}:{:02}:{:02}", secs / 3600, (secs / 60) % 60, secs % 60)
}

/// One line of flush progress: a bar `width` cells wide, percent, bytes, rate, ETA, state.
///
/// `[###############...............]  50.0%  1.0 GiB of 2.0 GiB  10.0 MiB/s  ETA 0:01:43  running`
#[must_use]
pub fn render_flush_progress(progress: &FlushProgress, width: usize) -> String {
    let fraction = progress.fraction_done().clamp(0.0, 1.0);
    // Truncating: the bar is full only when the flush is complete.
    let filled = ((fraction * width as f64) as usize).min(width);
    let total = progress.bytes_done.saturating_add(progress.dirty_bytes_left);
    let eta = match (progress.state, progress.eta_secs()) {
        (FlushState::Running, Some(secs)) => format_eta(secs),
        (FlushState::Running, None) => "-:--:--".to_owned(),
        _ => format_eta(0),
    };
    let state = match progress.state {
        FlushState::Idle => "idle",
        FlushState::Running => "running",
        FlushState::Done => "done",
        FlushState::Failed => "FAILED",
        FlushState::Cancelled => "cancelled",
    };
    format!(
        "[{}{}] {:5.1}%  {} of {}  {}/s  ETA {eta}  {state}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        fraction * 100.0,
        human_bytes(progress.bytes_done),
        human_bytes(total),
        human_bytes(progress.rate_bytes_per_sec),
    )
}

fn ratio_text(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

/// The `ubcache stats` table: counters over each window, then gauges.
#[must_use]
pub fn render_stats(stats: &StatsSnapshot) -> String {
    let spans: [(&str, &CounterValues); 4] =
        [("total", &stats.total), ("5min", &stats.five_minute), ("1hour", &stats.hour), ("1day", &stats.day)];
    let mut out = String::new();
    let _ = writeln!(out, "uptime: {}", format_eta(stats.uptime_secs));
    let _ = write!(out, "{:<20}", "counter");
    for (name, _) in spans {
        let _ = write!(out, " {name:>14}");
    }
    out.push('\n');
    for &counter in Counter::ALL {
        let _ = write!(out, "{:<20}", counter.name());
        for (_, values) in spans {
            let _ = write!(out, " {:>14}", values.get(counter));
        }
        out.push('\n');
    }
    let _ = write!(out, "{:<20}", "hit_ratio");
    for (_, values) in spans {
        let _ = write!(out, " {:>14}", ratio_text(values.hit_ratio));
    }
    out.push('\n');
    out.push('\n');
    for &gauge in Gauge::ALL {
        let value = stats.gauges.get(gauge);
        let shown = if gauge.name().ends_with("bytes") || gauge.name().ends_with("bytes_per_sec") {
            format!("{value} ({})", human_bytes(value))
        } else {
            value.to_string()
        };
        let _ = writeln!(out, "{:<30} {shown}", gauge.name());
    }
    let _ = writeln!(out, "{:<30} {}", "journal_fill", ratio_text(stats.gauges.journal_fill));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(2 << 30), "2.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn eta_formats_hours_minutes_seconds() {
        assert_eq!(format_eta(0), "0:00:00");
        assert_eq!(format_eta(103), "0:01:43");
        assert_eq!(format_eta(3 * 3600 + 5), "3:00:05");
    }
}
