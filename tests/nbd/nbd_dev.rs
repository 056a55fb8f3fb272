//! `NbdDev`: a block device over a remote NBD export, against our own server (in-process, on
//! 127.0.0.1:0, over memory, crash-simulating and error-returning devices) and against
//! `nbdkit memory` (a foreign server). Covers round trips, requests split into concurrent
//! pieces, many threads at once, FUA and FLUSH reaching stable storage, error mapping, a dead or
//! stalled server (errors, never a hang), and sync calls from inside tokio runtime workers.

use crate::tools;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ubcache::dev::{BlockDev, DevError, DevResult, MemDev, SimDev, SlowDev, SlowDevConfig};
use ubcache::nbd::{Export, ListenAddr, NbdDev, NbdDevOptions, Server, ServerConfig, build_runtime};

/// Our own server on 127.0.0.1:0, run on its own runtime thread; stopped and joined on drop.
struct TestServer {
    uri: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(exports: Vec<Export>) -> TestServer {
        let (uri_tx, uri_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = build_runtime(Some(2)).unwrap();
            rt.block_on(async move {
                let config = ServerConfig {
                    exports,
                    shutdown_drain_timeout: Duration::from_secs(2),
                    ..ServerConfig::default()
                };
                let addr = ListenAddr::Tcp("127.0.0.1:0".parse().unwrap());
                let server = Server::bind(config, &[addr]).await.unwrap();
                uri_tx.send(server.uris()[0].clone()).unwrap();
                let _ = server
                    .run(async move {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        let uri = uri_rx.recv_timeout(Duration::from_secs(30)).expect("server did not start");
        TestServer { uri, stop: Some(stop_tx), thread: Some(thread) }
    }

    fn serving(dev: Arc<dyn BlockDev>) -> TestServer {
        Self::start(vec![Export::new("", dev)])
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn quick_opts() -> NbdDevOptions {
    NbdDevOptions {
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(20),
        ..NbdDevOptions::default()
    }
}

#[test]
fn round_trip_through_our_server_lands_on_the_served_device() {
    let mem = Arc::new(MemDev::new(4 << 20));
    let server = TestServer::serving(mem.clone());
    let dev = NbdDev::connect(&server.uri).unwrap();
    assert_eq!(dev.len(), 4 << 20);
    assert!(!dev.capabilities().read_only);

    let data = pattern(1, 64 << 10);
    dev.write_at(&data, 8192).unwrap();
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 8192).unwrap();
    assert_eq!(back, data);
    // The bytes really are on the served device, at the same offset.
    let mut direct = vec![0u8; data.len()];
    mem.read_at(&mut direct, 8192).unwrap();
    assert_eq!(direct, data);
    // Unwritten space reads as zeros; the last byte of the device is reachable.
    let mut tail = vec![0xffu8; 512];
    dev.read_at(&mut tail, (4 << 20) - 512).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    // Zero-length calls are no-ops, not errors.
    dev.read_at(&mut [], 0).unwrap();
    dev.write_at(&[], 4 << 20).unwrap();
}

#[test]
fn large_requests_are_split_into_pieces_and_reassembled_in_order() {
    let mem = Arc::new(MemDev::new(8 << 20));
    let server = TestServer::serving(mem.clone());
    let opts = NbdDevOptions { max_request_bytes: 4096, ..quick_opts() };
    let dev = NbdDev::connect_with(&server.uri, &opts).unwrap();
    // 1 MiB + 512 at an odd sector: 257 pieces, the last one short.
    let data = pattern(2, (1 << 20) + 512);
    dev.write_at(&data, 512 * 7).unwrap();
    let mut direct = vec![0u8; data.len()];
    mem.read_at(&mut direct, 512 * 7).unwrap();
    assert_eq!(direct, data);
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 512 * 7).unwrap();
    assert_eq!(back, data);
}

#[test]
fn many_threads_with_requests_in_flight_at_once() {
    let mem = Arc::new(MemDev::new(16 << 20));
    let server = TestServer::serving(mem.clone());
    let dev = Arc::new(NbdDev::connect(&server.uri).unwrap());
    const THREADS: u64 = 16;
    const OPS: u64 = 40;
    const BLOCK: usize = 16 << 10;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for i in 0..OPS {
                    let off = (t * OPS + i) * BLOCK as u64;
                    let data = pattern(t * 1000 + i, BLOCK);
                    dev.write_at(&data, off).unwrap();
                    let mut back = vec![0u8; BLOCK];
                    dev.read_at(&mut back, off).unwrap();
                    assert_eq!(back, data, "thread {t} op {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    dev.sync().unwrap();
    for t in 0..THREADS {
        for i in 0..OPS {
            let off = (t * OPS + i) * BLOCK as u64;
            let mut direct = vec![0u8; BLOCK];
            mem.read_at(&mut direct, off).unwrap();
            assert_eq!(direct, pattern(t * 1000 + i, BLOCK), "thread {t} op {i} on the device");
        }
    }
}

fn durable_at(sim: &SimDev, offset: usize, len: usize) -> Vec<u8> {
    sim.durable_image()[offset..offset + len].to_vec()
}

#[test]
fn fua_writes_and_flush_reach_stable_storage_plain_writes_do_not() {
    let sim = Arc::new(SimDev::new(1 << 20));
    let server = TestServer::serving(sim.clone());
    let dev = NbdDev::connect(&server.uri).unwrap();

    let plain = pattern(3, 4096);
    dev.write_at(&plain, 0).unwrap();
    // A plain write is acknowledged but not durable: a crash now would lose it.
    assert_eq!(durable_at(&sim, 0, 4096), vec![0u8; 4096]);
    assert_eq!(sim.live_image()[..4096], plain[..]);

    let fua = pattern(4, 4096);
    dev.write_at_fua(&fua, 65536).unwrap();
    assert_eq!(durable_at(&sim, 65536, 4096), fua, "a FUA write must be durable when acknowledged");

    dev.sync().unwrap();
    assert_eq!(durable_at(&sim, 0, 4096), plain, "FLUSH must make earlier writes durable");
}

#[test]
fn trim_write_zeroes_and_prefetch_reach_the_server() {
    let mem = Arc::new(MemDev::new(1 << 20));
    let server = TestServer::serving(mem);
    let dev = NbdDev::connect(&server.uri).unwrap();
    let data = pattern(5, 1 << 20);
    dev.write_at(&data, 0).unwrap();

    dev.write_zeroes(4096, 8192, false).unwrap();
    dev.write_zeroes(65536, 4096, true).unwrap();
    let mut back = vec![0u8; 1 << 20];
    dev.read_at(&mut back, 0).unwrap();
    let mut expected = data;
    expected[4096..4096 + 8192].fill(0);
    expected[65536..65536 + 4096].fill(0);
    assert_eq!(back, expected);

    // TRIM may leave old data or zeros; either way it must be accepted and leave the rest alone.
    dev.discard(131072, 4096).unwrap();
    dev.read_at(&mut back, 0).unwrap();
    assert_eq!(back[..131072], expected[..131072]);
    assert_eq!(back[131072 + 4096..], expected[131072 + 4096..]);
    let trimmed = &back[131072..131072 + 4096];
    assert!(trimmed == &expected[131072..131072 + 4096] || trimmed.iter().all(|&b| b == 0));

    dev.prefetch(0, 1 << 20).unwrap();
}

/// Records which `BlockDev` call the server made for each request.
#[derive(Debug)]
struct RecordingDev {
    inner: MemDev,
    calls: parking_lot::Mutex<Vec<String>>,
}

impl RecordingDev {
    fn new(len: u64) -> Self {
        Self { inner: MemDev::new(len), calls: parking_lot::Mutex::new(Vec::new()) }
    }
    fn record(&self, call: String) {
        self.calls.lock().push(call);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock())
    }
}

impl BlockDev for RecordingDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps::default()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.record(format!("write {offset} {}", buf.len()));
        self.inner.write_at(buf, offset)
    }
    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.record(format!("write_fua {offset} {}", buf.len()));
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> DevResult<()> {
        self.record("sync".into());
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.record(format!("discard {offset} {len}"));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        self.record(format!("write_zeroes {offset} {len} may_unmap={may_unmap}"));
        ubcache::dev::write_zeroes_by_writing(&self.inner, offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        self.record(format!("prefetch {offset} {len}"));
        Ok(())
    }
}

#[test]
fn each_call_reaches_the_server_as_its_own_command_and_flags() {
    let rec = Arc::new(RecordingDev::new(1 << 20));
    let server = TestServer::serving(rec.clone());
    let dev = NbdDev::connect(&server.uri).unwrap();
    let block = [3u8; 4096];
    dev.write_at(&block, 4096).unwrap();
    assert_eq!(rec.take(), ["write 4096 4096"]);
    dev.write_at_fua(&block, 8192).unwrap();
    assert_eq!(rec.take(), ["write_fua 8192 4096"], "FUA must travel as the FUA flag, not a FLUSH");
    dev.sync().unwrap();
    assert_eq!(rec.take(), ["sync"]);
    dev.discard(0, 65536).unwrap();
    assert_eq!(rec.take(), ["discard 0 65536"]);
    dev.write_zeroes(0, 8192, false).unwrap();
    assert_eq!(
        rec.take(),
        ["write_zeroes 0 8192 may_unmap=false"],
        "NO_HOLE when the range must stay allocated"
    );
    dev.write_zeroes(8192, 8192, true).unwrap();
    assert_eq!(rec.take(), ["write_zeroes 8192 8192 may_unmap=true"]);
    dev.prefetch(0, 1 << 20).unwrap();
    assert_eq!(rec.take(), ["prefetch 0 1048576"]);
}

/// A device that fails writes with a chosen error per 4 KiB block: the server turns each into
/// its NBD errno, and `NbdDev` must turn it back into the same kind.
#[derive(Debug)]
struct ErrDev {
    inner: MemDev,
}

impl BlockDev for ErrDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps::default()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        match offset / 4096 {
            0 => Err(DevError::Io {
                op: "write",
                offset,
                len: buf.len() as u64,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            }),
            1 => Err(DevError::NoSpace("full".into())),
            2 => Err(DevError::ReadOnly),
            3 => Err(DevError::Invalid("no".into())),
            _ => self.inner.write_at(buf, offset),
        }
    }
    fn sync(&self) -> DevResult<()> {
        self.inner.sync()
    }
}

#[test]
fn server_errors_map_back_to_the_device_error_kinds() {
    let server = TestServer::serving(Arc::new(ErrDev { inner: MemDev::new(1 << 20) }));
    let dev = NbdDev::connect(&server.uri).unwrap();
    let block = vec![7u8; 4096];
    assert!(matches!(dev.write_at(&block, 0), Err(DevError::Io { .. })));
    assert!(matches!(dev.write_at(&block, 4096), Err(DevError::NoSpace(_))));
    assert!(matches!(dev.write_at(&block, 8192), Err(DevError::ReadOnly)));
    assert!(matches!(dev.write_at(&block, 12288), Err(DevError::Invalid(_))));
    // An error fails only its own request: the connection still works.
    dev.write_at(&block, 16384).unwrap();
    let mut back = vec![0u8; 4096];
    dev.read_at(&mut back, 16384).unwrap();
    assert_eq!(back, block);
    // Past the end: refused before anything is sent, with the range error.
    assert!(matches!(dev.read_at(&mut back, (1 << 20) - 512), Err(DevError::OutOfRange { .. })));
    assert!(matches!(dev.write_at(&block, u64::MAX - 10), Err(DevError::OutOfRange { .. })));
}

#[test]
fn read_only_export_refuses_writes() {
    let mem = Arc::new(MemDev::new(1 << 20));
    let mut export = Export::new("ro", mem);
    export.read_only = true;
    let server = TestServer::start(vec![export]);
    let dev = NbdDev::connect(&server.uri).unwrap();
    assert!(server.uri.ends_with("/ro"), "{}", server.uri);
    assert!(dev.capabilities().read_only);
    assert!(matches!(dev.write_at(&[1u8; 512], 0), Err(DevError::ReadOnly)));
    assert!(matches!(dev.write_zeroes(0, 512, true), Err(DevError::ReadOnly)));
    let mut buf = [9u8; 512];
    dev.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 512]);
}

#[test]
fn bad_uris_and_unreachable_servers_fail_at_connect() {
    assert!(matches!(NbdDev::connect("http://example.invalid/x"), Err(DevError::Invalid(_))));
    assert!(matches!(NbdDev::connect("nbd+unix:///x"), Err(DevError::Invalid(_))));
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = Instant::now();
    assert!(matches!(NbdDev::connect(&format!("nbd://127.0.0.1:{port}")), Err(DevError::Io { .. })));
    assert!(started.elapsed() < Duration::from_secs(10));
    // An export name the server does not have.
    let server = TestServer::start(vec![Export::new("a", Arc::new(MemDev::new(4096)))]);
    let uri = server.uri.replace("/a", "/nope");
    assert!(matches!(NbdDev::connect(&uri), Err(DevError::Io { .. })));
}

#[test]
fn a_stopped_server_gives_errors_not_a_hang() {
    let mut server = TestServer::serving(Arc::new(MemDev::new(1 << 20)));
    let opts = NbdDevOptions { request_timeout: Duration::from_secs(5), ..quick_opts() };
    let dev = NbdDev::connect_with(&server.uri, &opts).unwrap();
    dev.write_at(&[1u8; 512], 0).unwrap();
    server.shutdown();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    assert!(matches!(dev.read_at(&mut buf, 0), Err(DevError::Io { .. })));
    assert!(matches!(dev.write_at(&buf, 0), Err(DevError::Io { .. })));
    assert!(matches!(dev.sync(), Err(DevError::Io { .. })));
    assert!(started.elapsed() < Duration::from_secs(12), "took {:?}", started.elapsed());
}

#[test]
fn a_stalled_server_times_out_and_the_connection_is_abandoned() {
    let slow = SlowDevConfig { per_op_latency: Duration::from_secs(3), ..SlowDevConfig::default() };
    let server = TestServer::serving(Arc::new(SlowDev::new(MemDev::new(1 << 20), slow)));
    let opts = NbdDevOptions { request_timeout: Duration::from_millis(300), ..quick_opts() };
    let dev = NbdDev::connect_with(&server.uri, &opts).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let err = dev.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(&err, DevError::Io { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    // The stream may hold half a request now: later calls fail at once instead of reusing it.
    let again = Instant::now();
    assert!(matches!(dev.write_at(&buf, 0), Err(DevError::Io { .. })));
    assert!(again.elapsed() < Duration::from_millis(200));
}

#[test]
fn sync_calls_from_inside_tokio_runtimes_do_not_deadlock() {
    let mem = Arc::new(MemDev::new(4 << 20));
    let server = TestServer::serving(mem);
    let dev = Arc::new(NbdDev::connect(&server.uri).unwrap());

    // Blocking calls from many tasks on a 2-worker runtime (more tasks than workers).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..8u64 {
            let dev = dev.clone();
            tasks.spawn(async move {
                for i in 0..10u64 {
                    let data = pattern(t * 100 + i, 4096);
                    let off = (t * 10 + i) * 4096;
                    dev.write_at(&data, off).unwrap();
                    let mut back = vec![0u8; 4096];
                    dev.read_at(&mut back, off).unwrap();
                    assert_eq!(back, data);
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    });
    // A current-thread runtime: the caller blocks the only thread of its runtime.
    let rt1 = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt1.block_on(async { dev.sync().unwrap() });
    // Connecting (and dropping) inside a runtime works too.
    let uri = server.uri.clone();
    rt1.block_on(async move {
        let inner = NbdDev::connect(&uri).unwrap();
        let mut buf = vec![0u8; 4096];
        inner.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, pattern(0, 4096));
        drop(inner);
    });
}

#[test]
fn nbd_dev_served_by_our_server_is_called_from_its_workers() {
    // The real deployment shape: `serve` exports a device whose backing is an NbdDev, so the
    // server's tokio workers make the blocking calls.
    let mem = Arc::new(MemDev::new(2 << 20));
    let far = TestServer::serving(mem.clone());
    let backing: Arc<dyn BlockDev> = Arc::new(NbdDev::connect(&far.uri).unwrap());
    let near = TestServer::serving(backing);
    let client = Arc::new(NbdDev::connect(&near.uri).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                for i in 0..8u64 {
                    let off = (t * 8 + i) * 8192;
                    client.write_at_fua(&pattern(t * 50 + i, 8192), off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    client.sync().unwrap();
    for t in 0..8u64 {
        for i in 0..8u64 {
            let off = (t * 8 + i) * 8192;
            let mut direct = vec![0u8; 8192];
            mem.read_at(&mut direct, off).unwrap();
            assert_eq!(direct, pattern(t * 50 + i, 8192));
        }
    }
}

/// `nbdkit` on a Unix socket in a temp dir; killed on drop.
struct Nbdkit {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nbdkit {
    /// Starts `nbdkit [filters] PLUGIN ARGS` or returns None (skip) when nbdkit is missing
    /// outside CI.
    fn start(args: &[&str]) -> Option<Nbdkit> {
        if !tools::require_tool("nbdkit") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbdkit.sock");
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let kit = Nbdkit { child, socket, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !kit.socket.exists() {
            assert!(Instant::now() < deadline, "nbdkit did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(kit)
    }

    fn uri(&self) -> String {
        uri_for_socket(&self.socket)
    }
}

fn uri_for_socket(path: &Path) -> String {
    format!("nbd+unix:///?socket={}", path.display())
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbdkit_memory_round_trips_flush_fua_trim_zeroes_and_threads() {
    let Some(kit) = Nbdkit::start(&["memory", "16M"]) else { return };
    let dev = Arc::new(NbdDev::connect(&kit.uri()).unwrap());
    assert_eq!(dev.len(), 16 << 20);

    let data = pattern(10, 1 << 20);
    dev.write_at(&data, 3 << 20).unwrap();
    dev.write_at_fua(&data[..4096], 0).unwrap();
    dev.sync().unwrap();
    let mut back = vec![0u8; 1 << 20];
    dev.read_at(&mut back, 3 << 20).unwrap();
    assert_eq!(back, data);
    let mut head = vec![0u8; 4096];
    dev.read_at(&mut head, 0).unwrap();
    assert_eq!(head, data[..4096]);

    dev.write_zeroes(3 << 20, 65536, false).unwrap();
    dev.write_zeroes((3 << 20) + 65536, 65536, true).unwrap();
    dev.discard(8 << 20, 1 << 20).unwrap();
    dev.prefetch(0, 1 << 20).unwrap();
    dev.read_at(&mut back, 3 << 20).unwrap();
    assert!(back[..131072].iter().all(|&b| b == 0));
    assert_eq!(back[131072..], data[131072..]);

    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    let off = (8 << 20) + (t * 16 + i) * 4096;
                    let d = pattern(t * 77 + i, 4096);
                    dev.write_at(&d, off).unwrap();
                    let mut b = vec![0u8; 4096];
                    dev.read_at(&mut b, off).unwrap();
                    assert_eq!(b, d);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(matches!(dev.read_at(&mut head, 16 << 20), Err(DevError::OutOfRange { .. })));
}

#[test]
fn nbdkit_error_filter_errnos_map_to_device_errors() {
    let Some(kit) = Nbdkit::start(&[
        "--filter=error",
        "memory",
        "1M",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        "error-pread=EIO",
        "error-pread-rate=100%",
    ]) else {
        return;
    };
    let dev = NbdDev::connect(&kit.uri()).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(dev.read_at(&mut buf, 0), Err(DevError::Io { .. })));
    assert!(matches!(dev.write_at(&buf, 0), Err(DevError::NoSpace(_))));
}
