//! The NBD server against raw sockets and the crate's client: spec'd answers to good and bad
//! input, and the server keeps serving other clients whatever one client sends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use ubcache::dev::{BlockDev, DevResult, MemDev};
use ubcache::nbd::client::{self, ClientOptions, NbdClient};
use ubcache::nbd::proto::{self, Command, cmd_flags, errno, opt, rep, transmission_flags as tf};
use ubcache::nbd::{Export, ListenAddr, Server, ServerConfig};

/// Every network step of a test is bounded, so a hung server fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

async fn timed<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

struct TestServer {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ubcache::nbd::ServerError>>>,
    _dir: Option<tempfile::TempDir>,
    unix: std::path::PathBuf,
}

impl TestServer {
    async fn start(exports: Vec<Export>) -> Self {
        Self::start_with(ServerConfig { exports, ..Default::default() }).await
    }

    async fn start_with(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let listen = [ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), ListenAddr::Unix(sock.clone())];
        let server = Server::bind(config, &listen).await.unwrap();
        let addr = match server.local_addrs()[0] {
            ListenAddr::Tcp(a) => a,
            ListenAddr::Unix(_) => unreachable!(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self { addr, stop: Some(stop), task: Some(task), _dir: Some(dir), unix: sock }
    }

    async fn client(&self) -> NbdClient {
        timed(NbdClient::connect_tcp(self.addr, &ClientOptions::default())).await.unwrap()
    }

    async fn client_with(&self, opts: &ClientOptions) -> Result<NbdClient, client::ClientError> {
        timed(NbdClient::connect_tcp(self.addr, opts)).await
    }

    async fn raw(&self) -> TcpStream {
        timed(TcpStream::connect(self.addr)).await.unwrap()
    }

    /// Asserts the server still serves a fresh client correctly.
    async fn assert_still_serving(&self) {
        let c = self.client().await;
        let data = vec![0x5au8; 512];
        timed(c.write(0, &data, false)).await.unwrap();
        assert_eq!(timed(c.read(0, 512)).await.unwrap(), data);
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        timed(self.task.take().unwrap()).await.unwrap().unwrap();
    }
}

fn mem_export(name: &str, len: u64) -> (Export, Arc<MemDev>) {
    let dev = Arc::new(MemDev::new(len));
    (Export::new(name, dev.clone()), dev)
}

/// A memory device with knobs: slow reads at chosen offsets, reported zero ranges, no fast
/// zeroing, and counters of the calls the server makes.
#[derive(Debug)]
struct TestDev {
    inner: MemDev,
    /// Reads starting at these offsets sleep this long first (in the device call).
    slow_reads: Mutex<Vec<(u64, Duration)>>,
    zero_ranges: Mutex<Vec<Range<u64>>>,
    syncs: AtomicUsize,
    prefetches: AtomicUsize,
    fua_writes: AtomicUsize,
}

impl TestDev {
    fn new(len: u64) -> Self {
        Self {
            inner: MemDev::new(len),
            slow_reads: Mutex::new(Vec::new()),
            zero_ranges: Mutex::new(Vec::new()),
            syncs: AtomicUsize::new(0),
            prefetches: AtomicUsize::new(0),
            fua_writes: AtomicUsize::new(0),
        }
    }
}

impl BlockDev for TestDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let delay = self.slow_reads.lock().unwrap().iter().find(|(o, _)| *o == offset).map(|(_, d)| *d);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.fua_writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> DevResult<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn fast_zero(&self) -> bool {
        false
    }
    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        let end = offset + len;
        Ok(self
            .zero_ranges
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.start < end && r.end > offset)
            .map(|r| r.start.max(offset)..r.end.min(end))
            .collect())
    }
    fn prefetch(&self, _offset: u64, _len: u64) -> DevResult<()> {
        self.prefetches.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Raw protocol helpers

/// Does the fixed newstyle greeting; returns the stream after client flags were sent.
async fn raw_greet(s: &mut TcpStream, client_flags: u32) {
    let mut greeting = [0u8; proto::GREETING_LEN];
    timed(s.read_exact(&mut greeting)).await.unwrap();
    let flags = proto::decode_greeting(&greeting).unwrap();
    assert_eq!(flags, proto::handshake_flags::FIXED_NEWSTYLE | proto::handshake_flags::NO_ZEROES);
    s.write_all(&client_flags.to_be_bytes()).await.unwrap();
}

async fn raw_option(s: &mut TcpStream, option: u32, payload: &[u8]) {
    let header = proto::OptionHeader { option, len: payload.len() as u32 };
    s.write_all(&header.encode()).await.unwrap();
    s.write_all(payload).await.unwrap();
}

async fn raw_option_reply(s: &mut TcpStream) -> (proto::OptionReplyHeader, Vec<u8>) {
    let mut hdr = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    timed(s.read_exact(&mut hdr)).await.unwrap();
    let header = proto::OptionReplyHeader::decode(&hdr).unwrap();
    let mut payload = vec![0u8; header.len as usize];
    timed(s.read_exact(&mut payload)).await.unwrap();
    (header, payload)
}

/// Negotiates with GO (optionally structured replies) on a raw socket and returns the flags.
async fn raw_go(s: &mut TcpStream, name: &str, structured: bool) -> (u64, u16) {
    raw_greet(s, proto::client_flags::FIXED_NEWSTYLE | proto::client_flags::NO_ZEROES).await;
    if structured {
        raw_option(s, opt::STRUCTURED_REPLY, &[]).await;
        assert_eq!(raw_option_reply(s).await.0.reply_type, rep::ACK);
    }
    let req = proto::InfoRequest { name: name.into(), requests: vec![] };
    raw_option(s, opt::GO, &req.encode()).await;
    let mut info = proto::ExportInfo::default();
    loop {
        let (h, p) = raw_option_reply(s).await;
        match h.reply_type {
            rep::INFO => info.apply_info_reply(&p).unwrap(),
            rep::ACK => return (info.size, info.flags),
            t => panic!("unexpected reply {t:#x}"),
        }
    }
}

async fn raw_request(s: &mut TcpStream, cmd: u16, flags: u16, handle: u64, offset: u64, length: u32) {
    let h = proto::RequestHeader { flags, cmd_type: cmd, handle, offset, length };
    s.write_all(&h.encode()).await.unwrap();
}

/// Reads one simple reply; returns (errno, handle).
async fn raw_simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut b = [0u8; 16];
    timed(s.read_exact(&mut b)).await.unwrap();
    match proto::decode_reply_start(&b).unwrap() {
        proto::ReplyStart::Simple(r) => (r.errno, r.handle),
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

/// Asserts the server closed the connection (EOF or reset) without sending anything more.
async fn assert_closed(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    match timed(s.read(&mut b)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected the server to close, got {n} more bytes"),
    }
}

// ---------------------------------------------------------------------------------------------
// Happy paths

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_round_trips_every_command() {
    let dev = Arc::new(TestDev::new(1 << 20));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let c = server.client().await;
    assert_eq!(c.size(), 1 << 20);
    assert!(c.structured_replies());
    let f = c.flags();
    for flag in
        [tf::HAS_FLAGS, tf::SEND_FLUSH, tf::SEND_FUA, tf::SEND_TRIM, tf::SEND_WRITE_ZEROES, tf::SEND_CACHE]
    {
        assert_ne!(f & flag, 0, "flag {flag:#x} missing from {f:#x}");
    }
    assert_eq!(f & tf::READ_ONLY, 0);

    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    timed(c.write(4096, &data, false)).await.unwrap();
    timed(c.write(65536, &data, true)).await.unwrap();
    assert_eq!(timed(c.read(4096, 8192)).await.unwrap(), data);
    assert_eq!(timed(c.read_flags(65536, 8192, cmd_flags::DF)).await.unwrap(), data);
    assert_eq!(dev.fua_writes.load(Ordering::SeqCst), 1);
    let syncs = dev.syncs.load(Ordering::SeqCst);
    timed(c.flush()).await.unwrap();
    assert_eq!(dev.syncs.load(Ordering::SeqCst), syncs + 1);
    timed(c.write_zeroes(4096, 4096, cmd_flags::NO_HOLE)).await.unwrap();
    assert_eq!(timed(c.read(4096, 4096)).await.unwrap(), vec![0u8; 4096]);
    timed(c.write_zeroes(8192, 4096, cmd_flags::FUA)).await.unwrap();
    // Zeroes and trim with FUA are each followed by a sync.
    assert_eq!(dev.syncs.load(Ordering::SeqCst), syncs + 2);
    timed(c.trim(65536, 4096, true)).await.unwrap();
    assert_eq!(dev.syncs.load(Ordering::SeqCst), syncs + 3);
    timed(c.cache(0, 1 << 20)).await.unwrap();
    assert_eq!(dev.prefetches.load(Ordering::SeqCst), 1);
    // TestDev cannot zero fast, so FAST_ZERO must fail at once with ENOTSUP and change nothing.
    let e = timed(c.write_zeroes(65536, 4096, cmd_flags::FAST_ZERO)).await.unwrap_err();
    assert_eq!(e.errno(), Some(errno::ENOTSUP));
    let snapshot = dev.inner.snapshot();
    assert_eq!(&snapshot[65536..69632], &data[..4096]);
    assert_eq!(&snapshot[4096..12288], &[0u8; 8192][..]);
    assert_eq!(&snapshot[69632..73728], &data[4096..]);
    timed(c.disconnect()).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_export_name_and_simple_replies_work() {
    let (export, _dev) = mem_export("disk", 1 << 20);
    let server = TestServer::start(vec![export]).await;
    let opts = ClientOptions { export_name: "disk".into(), structured_replies: false, use_go: false };
    let c = server.client_with(&opts).await.unwrap();
    assert!(!c.structured_replies());
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.flags() & tf::SEND_DF, 0, "DF must not be offered without structured replies");
    timed(c.write(512, &[7u8; 1024], false)).await.unwrap();
    assert_eq!(timed(c.read(512, 1024)).await.unwrap(), vec![7u8; 1024]);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bad requests in transmission: each gets its spec'd errno and the connection goes on

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_spec_errnos_and_the_connection_goes_on() {
    const SIZE: u64 = 1 << 20;
    let (export, dev) = mem_export("", SIZE);
    let server = TestServer::start(vec![export]).await;
    let mut s = server.raw().await;
    let (size, _) = raw_go(&mut s, "", false).await;
    assert_eq!(size, SIZE);
    let read = Command::Read.to_wire();
    let write = Command::Write.to_wire();
    let zeroes = Command::WriteZeroes.to_wire();
    let trim = Command::Trim.to_wire();
    let cases: Vec<(&str, u16, u16, u64, u32, u32)> = vec![
        ("read past the end", read, 0, SIZE - 512, 1024, errno::EINVAL),
        ("read with overflowing offset", read, 0, u64::MAX - 100, 4096, errno::EINVAL),
        ("read at offset = size", read, 0, SIZE, 1, errno::EINVAL),
        ("zero-length read", read, 0, 0, 0, errno::EINVAL),
        ("read larger than 32 MiB", read, 0, 0, proto::MAX_PAYLOAD + 1, errno::EOVERFLOW),
        ("read of 4 GiB - 1", read, 0, 0, u32::MAX, errno::EOVERFLOW),
        ("unknown command", 99, 0, 0, 512, errno::EINVAL),
        ("BLOCK_STATUS without a context", Command::BlockStatus.to_wire(), 0, 0, 512, errno::EINVAL),
        ("unknown flag", read, 1 << 9, 0, 512, errno::EINVAL),
        ("DF without structured replies", read, cmd_flags::DF, 0, 512, errno::EINVAL),
        ("NO_HOLE on read", read, cmd_flags::NO_HOLE, 0, 512, errno::EINVAL),
        ("FAST_ZERO on trim", trim, cmd_flags::FAST_ZERO, 0, 512, errno::EINVAL),
        ("zeroes past the end", zeroes, 0, SIZE, 512, errno::ENOSPC),
        ("zeroes overflowing", zeroes, 0, u64::MAX, u32::MAX, errno::ENOSPC),
        ("trim past the end", trim, 0, SIZE - 1, 2, errno::EINVAL),
        ("zero-length trim", trim, 0, 0, 0, errno::EINVAL),
        ("flush with a length", Command::Flush.to_wire(), 0, 0, 512, errno::EINVAL),
        ("cache past the end", Command::Cache.to_wire(), 0, SIZE, 512, errno::EINVAL),
    ];
    for (i, (what, cmd, flags, offset, len, want)) in cases.into_iter().enumerate() {
        let handle = 1000 + i as u64;
        raw_request(&mut s, cmd, flags, handle, offset, len).await;
        let (got, h) = raw_simple_reply(&mut s).await;
        assert_eq!((got, h), (want, handle), "{what}");
    }
    // A WRITE that is refused still has its payload skipped, so the stream stays in sync.
    let writes: Vec<(&str, u64, u32, u32)> = vec![
        ("write past the end", SIZE - 100, 512, errno::ENOSPC),
        ("write with overflowing offset", u64::MAX - 10, 512, errno::ENOSPC),
        ("zero-length write", 0, 0, errno::EINVAL),
    ];
    for (i, (what, offset, len, want)) in writes.into_iter().enumerate() {
        let handle = 2000 + i as u64;
        raw_request(&mut s, write, 0, handle, offset, len).await;
        s.write_all(&vec![0xeeu8; len as usize]).await.unwrap();
        assert_eq!(raw_simple_reply(&mut s).await, (want, handle), "{what}");
    }
    // An oversize WRITE gets EOVERFLOW; its payload is skipped without being stored.
    let big = proto::MAX_PAYLOAD + 4096;
    raw_request(&mut s, write, 0, 3000, 0, big).await;
    let chunk = vec![0xeeu8; 1 << 20];
    let mut left = big as usize;
    while left > 0 {
        let n = left.min(chunk.len());
        timed(s.write_all(&chunk[..n])).await.unwrap();
        left -= n;
    }
    assert_eq!(raw_simple_reply(&mut s).await, (errno::EOVERFLOW, 3000));
    assert!(dev.snapshot().iter().all(|&b| b == 0), "a refused write changed the device");
    // The same connection still serves valid requests.
    raw_request(&mut s, write, cmd_flags::FUA, 4000, 512, 4).await;
    s.write_all(b"abcd").await.unwrap();
    assert_eq!(raw_simple_reply(&mut s).await, (0, 4000));
    raw_request(&mut s, read, 0, 4001, 512, 4).await;
    assert_eq!(raw_simple_reply(&mut s).await, (0, 4001));
    let mut data = [0u8; 4];
    timed(s.read_exact(&mut data)).await.unwrap();
    assert_eq!(&data, b"abcd");
    raw_request(&mut s, Command::Disc.to_wire(), 0, 4002, 0, 0).await;
    assert_closed(&mut s).await;
    server.assert_still_serving().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_only_that_connection() {
    let (export, _dev) = mem_export("", 1 << 20);
    let server = TestServer::start(vec![export]).await;
    let other = server.client().await;
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    let mut bad = proto::RequestHeader { flags: 0, cmd_type: 0, handle: 1, offset: 0, length: 512 }.encode();
    bad[0] ^= 0xff;
    s.write_all(&bad).await.unwrap();
    assert_closed(&mut s).await;
    // The already connected client and new clients are unaffected.
    timed(other.write(0, &[1u8; 512], false)).await.unwrap();
    assert_eq!(timed(other.read(0, 512)).await.unwrap(), vec![1u8; 512]);
    server.assert_still_serving().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener_serves_and_uri_connects() {
    let (export, _dev) = mem_export("", 1 << 20);
    let server = TestServer::start(vec![export]).await;
    let c = timed(NbdClient::connect_unix(&server.unix, &ClientOptions::default())).await.unwrap();
    timed(c.write(4096, &[9u8; 4096], false)).await.unwrap();
    let uri = format!("nbd+unix:///?socket={}", server.unix.display());
    let c2 = timed(NbdClient::connect_uri(&uri, &ClientOptions::default())).await.unwrap();
    assert_eq!(timed(c2.read(4096, 4096)).await.unwrap(), vec![9u8; 4096]);
    let tcp_uri = format!("nbd://{}/", server.addr);
    let c3 = timed(NbdClient::connect_uri(&tcp_uri, &ClientOptions::default())).await.unwrap();
    assert_eq!(timed(c3.read(4096, 4096)).await.unwrap(), vec![9u8; 4096]);
    server.stop().await;
}
