//! The control socket end to end: a real Unix socket, the server thread, the client functions,
//! and a fake engine. Covers the socket's mode, every verb, bad input on a live connection,
//! the line-length and client limits, and a clean stop.

use crate::fake_engine;

use fake_engine::FakeEngine;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use ubcache::ctl::client::{DEFAULT_REQUEST_TIMEOUT, fetch_stats, request, wait_for_flush};
use ubcache::ctl::{
    CacheMode, Counter, CtlArgs, CtlError, CtlServer, CtlServerConfig, FlushState, Request, SOCKET_FILE_NAME,
    run_ctl_command,
};

fn test_config() -> CtlServerConfig {
    CtlServerConfig { poll_interval: Duration::from_millis(20), ..CtlServerConfig::default() }
}

fn start(engine: &Arc<FakeEngine>, config: CtlServerConfig) -> (tempfile::TempDir, PathBuf, CtlServer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SOCKET_FILE_NAME);
    let server = CtlServer::start(&path, engine.clone(), config).unwrap();
    (dir, path, server)
}

/// A raw connection that sends lines and reads reply lines.
struct Raw {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn reply(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "reply line not terminated: {line:?}");
        serde_json::from_str(&line).unwrap()
    }

    fn call(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes());
        self.reply()
    }
}

#[test]
fn socket_file_is_created_with_mode_0600() {
    let engine = FakeEngine::new(&["disk0"], 0);
    let (_dir, path, server) = start(&engine, test_config());
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "mode {:o}", meta.permissions().mode());
    server.stop();
}

#[test]
fn every_verb_works_through_the_socket() {
    let engine = FakeEngine::new(&["disk0", "disk1"], 3 << 20);
    let (_dir, path, server) = start(&engine, test_config());
    let run = |args: CtlArgs| run_ctl_command(&path, &args);

    assert!(run(CtlArgs::Ping).unwrap().contains("control protocol 1"));

    engine.stats.add(Counter::ReadHits, 3);
    engine.stats.add(Counter::ReadMisses, 1);
    let stats = fetch_stats(&path).unwrap();
    assert_eq!(stats.total.read_hits, 3);
    assert_eq!(stats.total.hit_ratio, Some(0.75));
    assert!(run(CtlArgs::Stats { json: false }).unwrap().contains("75.0%"));
    let json: Value = serde_json::from_str(&run(CtlArgs::Stats { json: true }).unwrap()).unwrap();
    assert_eq!(json["total"]["read_misses"], json!(1));

    let out = run(CtlArgs::SetMode {
        mode: CacheMode::Writeback,
        flush_first: false,
        export: Some("disk1".into()),
    });
    assert_eq!(out.unwrap(), "disk1: mode writeback");
    assert_eq!(run(CtlArgs::Modes).unwrap(), "disk0\twritethrough\ndisk1\twriteback\n", "only disk1 changed");
    run(CtlArgs::SetMode { mode: CacheMode::Writearound, flush_first: true, export: None }).unwrap();
    assert_eq!(engine.mode_calls.lock().last().unwrap(), &(None, CacheMode::Writearound, true));

    assert_eq!(
        run(CtlArgs::Set { knob: "sequential-cutoff".into(), value: "8192k".into(), export: None }).unwrap(),
        "sequential_cutoff = 8M"
    );
    assert_eq!(engine.knobs.lock().sequential_cutoff, 8 << 20);
    let knobs = run(CtlArgs::Knobs { export: None }).unwrap();
    assert!(knobs.contains("sequential_cutoff = 8M\n"), "{knobs}");
    assert!(knobs.contains("replacement_policy = lru\n"), "{knobs}");

    assert_eq!(run(CtlArgs::Flush).unwrap(), "flush started");
    let err = run(CtlArgs::Flush).unwrap_err();
    assert!(matches!(err, CtlError::Busy(_)), "second flush while running: {err:?}");
    let mut seen = Vec::new();
    let last = wait_for_flush(&path, Duration::from_millis(1), &mut |p| seen.push(*p)).unwrap();
    assert_eq!(last.state, FlushState::Done);
    assert_eq!((last.bytes_done, last.dirty_bytes_left), (3 << 20, 0));
    assert!(seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done), "progress went backwards");
    assert!(run(CtlArgs::FlushProgress).unwrap().contains("100.0%"));

    assert_eq!(run(CtlArgs::Detach { export: "disk0".into() }).unwrap(), "disk0: detached");
    assert!(matches!(run(CtlArgs::Detach { export: "disk0".into() }), Err(CtlError::Invalid(_))));
    assert!(matches!(run(CtlArgs::Detach { export: "nope".into() }), Err(CtlError::NotFound(_))));
    assert_eq!(run(CtlArgs::Attach { export: "disk0".into() }).unwrap(), "disk0: attached");
    assert_eq!(run(CtlArgs::CancelFlush).unwrap(), "flush cancelled");
    server.stop();
}

#[test]
fn bad_values_are_refused_with_clear_errors_and_change_nothing() {
    let engine = FakeEngine::new(&["disk0"], 0);
    let (_dir, path, server) = start(&engine, test_config());
    let set = |knob: &str, value: &str| {
        run_ctl_command(&path, &CtlArgs::Set { knob: knob.into(), value: value.into(), export: None })
    };
    let cases = [
        ("writeback_percent", "101", "out of range (0..=100)"),
        ("writeback_percent", "ten", "expected a non-negative whole number"),
        ("sequential_cutoff", "8Q", "unknown size suffix"),
        ("sequential_cutoff", "5G", "out of range"),
        ("replacement_policy", "mru", "expected lru, fifo or random"),
        ("congested_read_threshold_us", "-1", "non-negative"),
        ("writeback_rate_min", "2G", "would exceed writeback_rate_max"),
        ("bogus_knob", "1", "unknown knob \"bogus_knob\""),
    ];
    let before = *engine.knobs.lock();
    for (knob, value, want) in cases {
        let err = set(knob, value).unwrap_err();
        assert!(matches!(err, CtlError::Invalid(_)), "{knob}={value}: {err:?}");
        assert!(err.to_string().contains(want), "{knob}={value}: {err}");
    }
    assert_eq!(*engine.knobs.lock(), before);
    // A JSON number is accepted as a value too.
    let reply = request(
        &path,
        &Request::Set { knob: "writeback_percent".into(), value: json!(40), export: None },
        DEFAULT_REQUEST_TIMEOUT,
    )
    .unwrap();
    assert_eq!(reply["value"], json!("40"));
    assert_eq!(engine.knobs.lock().writeback_percent, 40);
    let err = request(
        &path,
        &Request::Set { knob: "writeback_percent".into(), value: json!([1]), export: None },
        DEFAULT_REQUEST_TIMEOUT,
    )
    .unwrap_err();
    assert!(err.to_string().contains("must be a string or a number"), "{err}");
    let err = run_ctl_command(&path, &CtlArgs::Knobs { export: Some("nope".into()) }).unwrap_err();
    assert!(matches!(err, CtlError::NotFound(_)));
    server.stop();
}

#[test]
fn malformed_requests_get_errors_and_the_connection_keeps_working() {
    let engine = FakeEngine::new(&["disk0"], 0);
    let (_dir, path, server) = start(&engine, test_config());
    let mut raw = Raw::connect(&path);
    let cases = [
        ("{\"cmd\":\"stats\"", "malformed JSON"),
        ("\"stats\"", "must be a JSON object"),
        ("{\"cmd\":\"reboot\"}", "unknown command"),
        ("{\"cmd\":\"set-mode\",\"mode\":\"turbo\"}", "unknown variant"),
        ("{\"cmd\":\"set\",\"knob\":\"writeback_percent\"}", "missing field `value`"),
        ("   ", "empty request"),
    ];
    for (line, want) in cases {
        let reply = raw.call(line);
        assert_eq!(reply["ok"], json!(false), "{line}");
        assert_eq!(reply["kind"], json!("protocol"), "{line}");
        assert!(reply["error"].as_str().unwrap().contains(want), "{line}: {reply}");
        // The same connection still answers a good request.
        assert_eq!(raw.call("{\"cmd\":\"ping\"}")["ok"], json!(true));
    }
    // Invalid UTF-8 and a NUL byte.
    raw.send(b"\xff\xfe\x00\n");
    assert!(raw.reply()["error"].as_str().unwrap().contains("UTF-8"));
    // Two requests in one write are answered in order.
    raw.send(b"{\"cmd\":\"ping\"}\n{\"cmd\":\"modes\"}\n");
    assert!(raw.reply().get("protocol").is_some());
    assert_eq!(raw.reply()["modes"][0]["export"], json!("disk0"));
    server.stop();
}

#[test]
fn an_overlong_line_is_refused_without_being_stored_and_the_connection_recovers() {
    let engine = FakeEngine::new(&["disk0"], 0);
    let config = CtlServerConfig { max_line_bytes: 1024, ..test_config() };
    let (_dir, path, server) = start(&engine, config);
    let mut raw = Raw::connect(&path);
    // 1 MiB without a newline, in pieces, then the newline.
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..16 {
        raw.send(&chunk);
    }
    raw.send(b"\n");
    let reply = raw.reply();
    assert_eq!(reply["ok"], json!(false));
    assert!(reply["error"].as_str().unwrap().contains("longer than 1024 bytes"), "{reply}");
    assert_eq!(raw.call("{\"cmd\":\"ping\"}")["ok"], json!(true));
    // A line of exactly the limit is accepted (padding with spaces is valid JSON whitespace).
    let mut line = String::from("{\"cmd\":\"ping\"}");
    line.push_str(&" ".repeat(1024 - line.len()));
    assert_eq!(raw.call(&line)["ok"], json!(true));
    line.push(' ');
    assert_eq!(raw.call(&line)["ok"], json!(false));
    server.stop();
}

#[test]
fn clients_past_the_limit_are_refused_busy_and_slots_are_freed() {
    let engine = FakeEngine::new(&["disk0"], 0);
    let config = CtlServerConfig { max_clients: 2, ..test_config() };
    let (_dir, path, server) = start(&engine, config);
    let mut first = Raw::connect(&path);
    let mut second = Raw::connect(&path);
    // Both are being served (their threads answered).
    assert_eq!(first.call("{\"cmd\":\"ping\"}")["ok"], json!(true));
    assert_eq!(second.call("{\"cmd\":\"ping\"}")["ok"], json!(true));
    let mut third = Raw::connect(&path);
    let reply = third.reply();
    assert_eq!(reply["kind"], json!("busy"), "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("limit 2"));
    drop(first);
    // The slot frees when the first client's thread sees EOF; retry for a bounded time.
    let mut served = false;
    for _ in 0..1000 {
        if let Ok(reply) = request(&path, &Request::Ping, Duration::from_secs(5)) {
            assert_eq!(reply["ok"], json!(true));
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(served, "a freed slot was never reused");
    assert_eq!(second.call("{\"cmd\":\"ping\"}")["ok"], json!(true));
    server.stop();
}

#[test]
fn stop_joins_with_clients_connected_and_removes_the_socket() {
    let engine = FakeEngine::new(&["disk0"], 0);
    let (_dir, path, server) = start(&engine, test_config());
    let mut idle = Raw::connect(&path);
    assert_eq!(idle.call("{\"cmd\":\"ping\"}")["ok"], json!(true));
    let _half_line = {
        let mut c = Raw::connect(&path);
        c.send(b"{\"cmd\":");
        c
    };
    let (done_tx, done_rx) = mpsc::channel();
    let stopper = std::thread::spawn(move || {
        server.stop();
        done_tx.send(()).unwrap();
    });
    done_rx.recv_timeout(Duration::from_secs(10)).expect("stop did not return with idle clients connected");
    stopper.join().unwrap();
    assert!(!path.exists(), "socket file left behind");
    assert!(UnixStream::connect(&path).is_err());
    // The idle client sees the connection closed (EOF), not a hang.
    let mut line = String::new();
    assert_eq!(idle.reader.read_line(&mut line).unwrap(), 0);
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_or_a_regular_file_is_not() {
    let engine = FakeEngine::new(&["disk0"], 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SOCKET_FILE_NAME);
    // Stale: bound by a listener that is gone.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = CtlServer::start(&path, engine.clone(), test_config()).unwrap();
    assert!(request(&path, &Request::Ping, Duration::from_secs(5)).is_ok());
    // Live: a second server on the same path is refused and the first keeps working.
    let err = CtlServer::start(&path, engine.clone(), test_config()).unwrap_err();
    assert!(matches!(err, CtlError::Busy(_)), "{err:?}");
    assert!(request(&path, &Request::Ping, Duration::from_secs(5)).is_ok());
    server.stop();
    // A regular file is never removed.
    std::fs::write(&path, b"precious").unwrap();
    let err = CtlServer::start(&path, engine.clone(), test_config()).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // A path too long for sockaddr_un is a clear error.
    let long = dir.path().join("x".repeat(200));
    let err = CtlServer::start(&long, engine, test_config()).unwrap_err();
    assert!(matches!(err, CtlError::Invalid(_)), "{err:?}");
}

#[test]
fn a_slow_request_on_one_client_does_not_block_another() {
    let engine = FakeEngine::new(&["disk0"], 0);
    *engine.hold_set_mode.lock() = true;
    let (_dir, path, server) = start(&engine, test_config());
    let slow_path = path.clone();
    let slow = std::thread::spawn(move || {
        run_ctl_command(
            &slow_path,
            &CtlArgs::SetMode { mode: CacheMode::None, flush_first: true, export: None },
        )
    });
    let mut entered = false;
    for _ in 0..500 {
        if engine.set_mode_entered.load(std::sync::atomic::Ordering::SeqCst) {
            entered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(entered, "set-mode never reached the engine");
    // set-mode is held inside the engine; other clients are still answered.
    for _ in 0..3 {
        assert_eq!(request(&path, &Request::Ping, Duration::from_secs(5)).unwrap()["ok"], json!(true));
        assert_eq!(run_ctl_command(&path, &CtlArgs::Modes).unwrap(), "disk0\twritethrough\n");
    }
    assert!(engine.mode_calls.lock().is_empty());
    engine.release_set_mode();
    assert_eq!(slow.join().unwrap().unwrap(), "mode none");
    assert_eq!(run_ctl_command(&path, &CtlArgs::Modes).unwrap(), "disk0\tnone\n");
    server.stop();
}

/// The request/reply examples in docs/control.md are exactly what the server says.
#[test]
fn documented_examples_match_the_server() {
    let doc = include_str!("../../docs/control.md");
    let engine = FakeEngine::new(&["disk0"], 0);
    let (_dir, path, server) = start(&engine, test_config());
    let mut raw = Raw::connect(&path);
    let mut checked = 0;
    let mut lines = doc.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(request) = line.strip_prefix("> ") {
            let want =
                lines.next().and_then(|l| l.strip_prefix("< ")).expect("a > line is followed by a < line");
            let got = raw.call(request);
            assert_eq!(got, serde_json::from_str::<Value>(want).unwrap(), "for {request}");
            checked += 1;
        }
    }
    assert!(checked >= 3, "examples not found in the doc");
    server.stop();
}
