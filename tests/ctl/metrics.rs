//! Prometheus exposition: the text format's structure and values, and the HTTP responder
//! driven by a raw TCP client on 127.0.0.1.

use crate::fake_engine;

use fake_engine::FakeEngine;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;
use ubcache::ctl::metrics::{CONTENT_TYPE, MAX_REQUEST_BYTES, MetricsConfig};
use ubcache::ctl::stats::{Counter, Gauge};
use ubcache::ctl::{MetricsServer, render_prometheus};

/// Parses exposition text into samples, checking the format's rules on the way: every sample's
/// metric has a HELP and a TYPE line before it, TYPE is counter or gauge, counters end in
/// `_total`, and every value parses as a float.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut helped = HashMap::new();
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.is_empty());
            assert!(helped.insert(name.to_owned(), ()).is_none(), "HELP twice for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(kind == "counter" || kind == "gauge", "{line}");
            assert!(helped.contains_key(name), "TYPE before HELP for {name}");
            typed.insert(name.to_owned(), kind.to_owned());
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{name}");
            let kind = typed.get(name).unwrap_or_else(|| panic!("sample {name} without TYPE"));
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name} is a {kind}");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
            samples.insert(series.to_owned(), value);
        }
    }
    samples
}

#[test]
fn exposition_carries_every_counter_and_gauge_with_its_value() {
    let engine = FakeEngine::new(&["disk0"], 0);
    for (i, &c) in Counter::ALL.iter().enumerate() {
        engine.stats.add(c, 10 + i as u64);
    }
    for (i, &g) in Gauge::ALL.iter().enumerate() {
        engine.stats.set_gauge(g, 1000 + i as u64);
    }
    engine.stats.set_gauge(Gauge::JournalUsedBytes, 1);
    engine.stats.set_gauge(Gauge::JournalCapacityBytes, 4);
    let text = render_prometheus(&engine.stats.snapshot());
    let samples = parse_exposition(&text);
    for (i, &c) in Counter::ALL.iter().enumerate() {
        assert_eq!(samples[&format!("ubcache_{}_total", c.name())], (10 + i) as f64, "{}", c.name());
    }
    for &g in Gauge::ALL {
        assert!(samples.contains_key(&format!("ubcache_{}", g.name())), "{}", g.name());
    }
    assert_eq!(samples["ubcache_dirty_bytes"], 1000.0);
    assert_eq!(samples["ubcache_journal_fill_ratio"], 0.25);
    let hits = 10.0;
    let misses = 11.0;
    assert_eq!(samples["ubcache_read_hit_ratio{window=\"total\"}"], hits / (hits + misses));
    assert_eq!(samples["ubcache_read_hit_ratio{window=\"five_minute\"}"], hits / (hits + misses));
}

#[test]
fn undefined_ratios_are_nan_not_missing() {
    let engine = FakeEngine::new(&["disk0"], 0);
    let samples = parse_exposition(&render_prometheus(&engine.stats.snapshot()));
    assert!(samples["ubcache_read_hit_ratio{window=\"day\"}"].is_nan());
    assert!(samples["ubcache_journal_fill_ratio"].is_nan());
}

/// Sends raw bytes and returns (status line, headers, body) of the response.
fn http(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (431) and close before reading everything: ignore write errors.
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {text:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

#[test]
fn http_responder_serves_metrics_and_refuses_everything_else() {
    let engine = FakeEngine::new(&["disk0"], 0);
    engine.stats.add(Counter::ReadHits, 42);
    let server = MetricsServer::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), engine.clone()).unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    let (status, headers, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains(&format!("Content-Type: {CONTENT_TYPE}")), "{headers}");
    assert!(headers.contains(&format!("Content-Length: {}", body.len())), "{headers}");
    assert_eq!(parse_exposition(&body)["ubcache_read_hits_total"], 42.0);

    // Fresh values on each scrape.
    engine.stats.add(Counter::ReadHits, 1);
    let (_, _, body) = http(addr, b"GET /metrics?debug=1 HTTP/1.0\r\n\r\n");
    assert_eq!(parse_exposition(&body)["ubcache_read_hits_total"], 43.0);

    let (status, headers, body) = http(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.is_empty() && !headers.contains("Content-Length: 0"));

    let (status, _, _) = http(addr, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, headers, _) = http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("Allow: GET, HEAD"));
    let (status, _, _) = http(addr, b"\x16\x03\x01 garbage\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 4 * MAX_REQUEST_BYTES));
    huge.extend_from_slice(b"\r\n\r\n");
    let (status, _, _) = http(addr, &huge);
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");

    server.stop();
    assert!(TcpStream::connect(addr).is_err(), "still listening after stop");
}

#[test]
fn silent_clients_hold_at_most_the_connection_limit_and_stop_still_joins() {
    let engine = FakeEngine::new(&["disk0"], 0);
    // A long deadline so the silent clients surely still hold their slots below.
    let config = MetricsConfig {
        max_connections: 2,
        request_deadline: Duration::from_secs(60),
        ..MetricsConfig::default()
    };
    let server =
        MetricsServer::start_with(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), engine, config).unwrap();
    let addr = server.local_addr();
    let silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let (status, _, _) = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    drop(silent);
    // The silent clients' threads see EOF and free their slots; retry for a bounded time.
    let mut served = false;
    for _ in 0..1000 {
        if http(addr, b"GET /metrics HTTP/1.1\r\n\r\n").0 == "HTTP/1.1 200 OK" {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(served, "slots were never freed");
    // A client mid-request when stop is called: stop waits for its thread, bounded by the
    // deadline; here the client hangs up first.
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /met").unwrap();
    let stopper = std::thread::spawn(move || server.stop());
    std::thread::sleep(Duration::from_millis(50));
    drop(half);
    stopper.join().unwrap();
    assert!(TcpStream::connect(addr).is_err());
}
