//! The NBD server against raw sockets and the crate's client: spec'd answers to good and bad
//! input, and the server keeps serving other clients whatever one client sends.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use ubcache::dev::{BlockDev, DevResult, MemDev};
use ubcache::nbd::client::{self, ClientOptions, NbdClient};
use ubcache::nbd::proto::{self, Command, cmd_flags, errno, opt, rep, transmission_flags as tf};
use ubcache::nbd::{DeviceCalls, Export, ListenAddr, Server, ServerConfig};

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
        self.assert_still_serving_export("").await;
    }

    async fn assert_still_serving_export(&self, name: &str) {
        let c = self
            .client_with(&ClientOptions { export_name: name.into(), ..Default::default() })
            .await
            .unwrap();
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
    /// Reads fail with EIO while set.
    fail_reads: std::sync::atomic::AtomicBool,
    /// Writes (not FUA) fail with EIO while set.
    fail_writes: std::sync::atomic::AtomicBool,
    /// What `DevCaps::cheap_writes` says: true makes the server run writes in the connection's reader.
    cheap_writes: bool,
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
            fail_reads: std::sync::atomic::AtomicBool::new(false),
            fail_writes: std::sync::atomic::AtomicBool::new(false),
            cheap_writes: false,
            zero_ranges: Mutex::new(Vec::new()),
            syncs: AtomicUsize::new(0),
            prefetches: AtomicUsize::new(0),
            fua_writes: AtomicUsize::new(0),
        }
    }

    /// A device whose writes the server runs in the connection's reader.
    fn with_cheap_writes(len: u64) -> Self {
        Self { cheap_writes: true, ..Self::new(len) }
    }
}

/// The error a `TestDev` returns when a failure is switched on.
fn injected(op: &'static str, offset: u64, len: usize) -> ubcache::dev::DevError {
    ubcache::dev::DevError::Io { op, offset, len: len as u64, source: std::io::Error::other("injected") }
}

impl BlockDev for TestDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps { cheap_writes: self.cheap_writes, ..Default::default() }
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let delay = self.slow_reads.lock().unwrap().iter().find(|(o, _)| *o == offset).map(|(_, d)| *d);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(injected("read", offset, buf.len()));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(injected("write", offset, buf.len()));
        }
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
    let tcp_uri = format!("nbd://{}", server.addr);
    let c3 = timed(NbdClient::connect_uri(&tcp_uri, &ClientOptions::default())).await.unwrap();
    assert_eq!(timed(c3.read(4096, 4096)).await.unwrap(), vec![9u8; 4096]);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Handshake: options, errors, garbage

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_get_their_spec_replies_and_haggling_goes_on() {
    let (a, _) = mem_export("alpha", 1 << 20);
    let (b, _) = mem_export("beta", 2 << 20);
    let b = Export { description: "the second one".into(), ..b };
    let server = TestServer::start(vec![a, b]).await;
    let mut s = server.raw().await;
    raw_greet(&mut s, proto::client_flags::FIXED_NEWSTYLE).await;

    // Unknown and unsupported options: ERR_UNSUP, and the handshake goes on.
    for option in [99, opt::STARTTLS, opt::EXTENDED_HEADERS] {
        raw_option(&mut s, option, b"whatever").await;
        let (h, _) = raw_option_reply(&mut s).await;
        assert_eq!((h.option, h.reply_type), (option, rep::ERR_UNSUP));
    }
    // Meta context options are supported: a malformed payload is invalid, not fatal.
    for option in [opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
        raw_option(&mut s, option, b"whatever").await;
        let (h, _) = raw_option_reply(&mut s).await;
        assert_eq!((h.option, h.reply_type), (option, rep::ERR_INVALID));
    }
    // LIST returns every export, then ACK; with a payload it is invalid.
    raw_option(&mut s, opt::LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (h, p) = raw_option_reply(&mut s).await;
        if h.reply_type == rep::ACK {
            break;
        }
        assert_eq!(h.reply_type, rep::SERVER);
        let n = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(p[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["alpha", "beta"]);
    raw_option(&mut s, opt::LIST, b"x").await;
    assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ERR_INVALID);
    // STRUCTURED_REPLY takes no data.
    raw_option(&mut s, opt::STRUCTURED_REPLY, b"x").await;
    assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ERR_INVALID);
    // INFO with every info type.
    let req = proto::InfoRequest {
        name: "beta".into(),
        requests: vec![proto::info::NAME, proto::info::DESCRIPTION, proto::info::BLOCK_SIZE],
    };
    raw_option(&mut s, opt::INFO, &req.encode()).await;
    let mut info = proto::ExportInfo::default();
    loop {
        let (h, p) = raw_option_reply(&mut s).await;
        if h.reply_type == rep::ACK {
            break;
        }
        assert_eq!(h.reply_type, rep::INFO);
        info.apply_info_reply(&p).unwrap();
    }
    assert_eq!(info.size, 2 << 20);
    assert_eq!(info.name.as_deref(), Some("beta"));
    assert_eq!(info.description.as_deref(), Some("the second one"));
    assert_eq!(info.block_size, Some((1, 4096, proto::MAX_PAYLOAD)));
    assert_ne!(info.flags & tf::CAN_MULTI_CONN, 0);
    // Unknown export: ERR_UNKNOWN for INFO and GO, and haggling continues.
    for option in [opt::INFO, opt::GO] {
        let req = proto::InfoRequest { name: "gamma".into(), requests: vec![] };
        raw_option(&mut s, option, &req.encode()).await;
        assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ERR_UNKNOWN);
    }
    // Malformed INFO payloads: ERR_INVALID.
    let mut bad_len = req.encode();
    bad_len[3] = 200; // name length beyond the payload
    let mut bad_count = req.encode();
    bad_count.push(0); // odd trailing byte
    for payload in [vec![], vec![0, 0, 0], bad_len, bad_count, vec![0, 0, 0, 1, 0, 0, 0]] {
        raw_option(&mut s, opt::GO, &payload).await;
        assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ERR_INVALID, "payload {payload:?}");
    }
    // A too-long payload for a known option is skipped: ERR_TOO_BIG, then haggling continues.
    raw_option(&mut s, opt::INFO, &vec![0u8; 100_000]).await;
    assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ERR_TOO_BIG);
    // And GO still works after all that.
    let (size, flags) = {
        let req = proto::InfoRequest { name: "alpha".into(), requests: vec![] };
        raw_option(&mut s, opt::GO, &req.encode()).await;
        let mut info = proto::ExportInfo::default();
        loop {
            let (h, p) = raw_option_reply(&mut s).await;
            if h.reply_type == rep::ACK {
                break (info.size, info.flags);
            }
            info.apply_info_reply(&p).unwrap();
        }
    };
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & tf::SEND_DF, 0);
    raw_request(&mut s, Command::Flush.to_wire(), 0, 5, 0, 0).await;
    assert_eq!(raw_simple_reply(&mut s).await, (0, 5));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_replies_with_or_without_zero_padding() {
    let (export, _) = mem_export("disk", 12345 * 512);
    let server = TestServer::start(vec![export]).await;
    for (client_flags, padding) in
        [(proto::client_flags::FIXED_NEWSTYLE, 124usize), (proto::client_flags::FIXED_NEWSTYLE | 2, 0)]
    {
        let mut s = server.raw().await;
        raw_greet(&mut s, client_flags).await;
        raw_option(&mut s, opt::EXPORT_NAME, b"disk").await;
        let mut reply = vec![0u8; 10 + padding];
        timed(s.read_exact(&mut reply)).await.unwrap();
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 12345 * 512);
        assert!(reply[10..].iter().all(|&b| b == 0));
        raw_request(&mut s, Command::Read.to_wire(), 0, 1, 0, 4).await;
        assert_eq!(raw_simple_reply(&mut s).await, (0, 1));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_violations_close_only_that_connection() {
    let (export, _) = mem_export("disk", 1 << 20);
    let server = TestServer::start(vec![export]).await;
    let go = proto::InfoRequest { name: "disk".into(), requests: vec![] }.encode();
    // Unknown client flag bits.
    let mut s = server.raw().await;
    raw_greet(&mut s, 1 << 7).await;
    assert_closed(&mut s).await;
    // Bad option magic.
    let mut s = server.raw().await;
    raw_greet(&mut s, 1).await;
    let mut bad = proto::OptionHeader { option: opt::GO, len: go.len() as u32 }.encode();
    bad[0] = b'X';
    s.write_all(&bad).await.unwrap();
    s.write_all(&go).await.unwrap();
    assert_closed(&mut s).await;
    // EXPORT_NAME for an unknown export cannot be answered with an error: the server hangs up.
    let mut s = server.raw().await;
    raw_greet(&mut s, 1).await;
    raw_option(&mut s, opt::EXPORT_NAME, b"nope").await;
    assert_closed(&mut s).await;
    // EXPORT_NAME with a name that is not a valid string (NUL inside).
    let mut s = server.raw().await;
    raw_greet(&mut s, 1).await;
    raw_option(&mut s, opt::EXPORT_NAME, b"di\0sk").await;
    assert_closed(&mut s).await;
    // A gigantic option length: ERR_TOO_BIG and the connection ends without reading 4 GiB.
    let mut s = server.raw().await;
    raw_greet(&mut s, 1).await;
    s.write_all(&proto::OptionHeader { option: opt::INFO, len: u32::MAX }.encode()).await.unwrap();
    assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ERR_TOO_BIG);
    assert_closed(&mut s).await;
    // A non-fixed newstyle client may only send EXPORT_NAME.
    let mut s = server.raw().await;
    raw_greet(&mut s, 0).await;
    raw_option(&mut s, opt::LIST, &[]).await;
    assert_closed(&mut s).await;
    let mut s = server.raw().await;
    raw_greet(&mut s, 0).await;
    raw_option(&mut s, opt::EXPORT_NAME, b"disk").await;
    let mut reply = [0u8; 134];
    timed(s.read_exact(&mut reply)).await.unwrap();
    // ABORT: ACK, then the server closes.
    let mut s = server.raw().await;
    raw_greet(&mut s, 1).await;
    raw_option(&mut s, opt::ABORT, &[]).await;
    assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ACK);
    assert_closed(&mut s).await;
    // Pure garbage from the first byte.
    let mut s = server.raw().await;
    let mut greeting = [0u8; proto::GREETING_LEN];
    timed(s.read_exact(&mut greeting)).await.unwrap();
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
        .await
        .unwrap();
    assert_closed(&mut s).await;
    // A client that vanishes in the middle of an option.
    let mut s = server.raw().await;
    raw_greet(&mut s, 1).await;
    s.write_all(&proto::OptionHeader { option: opt::GO, len: 100 }.encode()).await.unwrap();
    s.write_all(&[0u8; 10]).await.unwrap();
    drop(s);
    server.assert_still_serving_export("disk").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let (export, _) = mem_export("", 1 << 20);
    let config = ServerConfig {
        exports: vec![export],
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let server = TestServer::start_with(config).await;
    let mut s = server.raw().await;
    let mut greeting = [0u8; proto::GREETING_LEN];
    timed(s.read_exact(&mut greeting)).await.unwrap();
    // Send nothing: the server must give up on its own.
    assert_closed(&mut s).await;
    server.assert_still_serving().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Transmission: exports, structured replies, errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm() {
    let dev = Arc::new(MemDev::from_bytes(vec![3u8; 1 << 16]));
    let export = Export { read_only: true, ..Export::new("ro", dev.clone()) };
    let (rw, _) = mem_export("rw", 1 << 16);
    let server = TestServer::start(vec![export, rw]).await;
    let opts = ClientOptions { export_name: "ro".into(), ..Default::default() };
    let c = server.client_with(&opts).await.unwrap();
    assert!(c.is_read_only());
    assert_eq!(c.flags() & (tf::SEND_TRIM | tf::SEND_WRITE_ZEROES), 0);
    assert_eq!(timed(c.read(0, 16)).await.unwrap(), vec![3u8; 16]);
    assert_eq!(timed(c.write(0, &[1u8; 16], false)).await.unwrap_err().errno(), Some(errno::EPERM));
    assert_eq!(timed(c.write(0, &[1u8; 16], true)).await.unwrap_err().errno(), Some(errno::EPERM));
    assert_eq!(timed(c.trim(0, 512, false)).await.unwrap_err().errno(), Some(errno::EPERM));
    assert_eq!(timed(c.write_zeroes(0, 512, 0)).await.unwrap_err().errno(), Some(errno::EPERM));
    timed(c.flush()).await.unwrap();
    assert!(dev.snapshot().iter().all(|&b| b == 3), "a read-only export was written");
    // The writable export next to it is unaffected.
    let opts = ClientOptions { export_name: "rw".into(), ..Default::default() };
    let c = server.client_with(&opts).await.unwrap();
    timed(c.write(0, &[1u8; 16], false)).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_exports_are_separate_devices() {
    let (a, dev_a) = mem_export("a", 1 << 16);
    let (b, dev_b) = mem_export("b", 1 << 17);
    let server = TestServer::start(vec![a, b]).await;
    let ca =
        server.client_with(&ClientOptions { export_name: "a".into(), ..Default::default() }).await.unwrap();
    let cb =
        server.client_with(&ClientOptions { export_name: "b".into(), ..Default::default() }).await.unwrap();
    assert_eq!((ca.size(), cb.size()), (1 << 16, 1 << 17));
    timed(ca.write(0, b"aaaa", false)).await.unwrap();
    timed(cb.write(0, b"bbbb", false)).await.unwrap();
    assert_eq!(&dev_a.snapshot()[..4], b"aaaa");
    assert_eq!(&dev_b.snapshot()[..4], b"bbbb");
    // An unknown name through GO is refused with ERR_UNKNOWN.
    let err = server
        .client_with(&ClientOptions { export_name: "c".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(
        matches!(err, client::ClientError::OptionRefused { reply_type: rep::ERR_UNKNOWN, .. }),
        "unexpected {err:?}"
    );
    // The default name selects the first export when none is called "".
    let c = server.client().await;
    assert_eq!(timed(c.read(0, 4)).await.unwrap(), b"aaaa");
    server.stop().await;
}

/// Reads one structured chunk: (flags, type, handle, payload).
async fn raw_chunk(s: &mut TcpStream) -> (u16, u16, u64, Vec<u8>) {
    let mut b = [0u8; proto::CHUNK_HEADER_LEN];
    timed(s.read_exact(&mut b)).await.unwrap();
    assert_eq!(u32::from_be_bytes(b[..4].try_into().unwrap()), proto::STRUCTURED_REPLY_MAGIC);
    let flags = u16::from_be_bytes([b[4], b[5]]);
    let kind = u16::from_be_bytes([b[6], b[7]]);
    let handle = u64::from_be_bytes(b[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(b[16..20].try_into().unwrap());
    assert!(len <= proto::MAX_PAYLOAD + 8);
    let mut payload = vec![0u8; len as usize];
    timed(s.read_exact(&mut payload)).await.unwrap();
    (flags, kind, handle, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_reads_send_hole_chunks_for_known_zeros() {
    use proto::chunk;
    let dev = Arc::new(TestDev::new(1 << 20));
    dev.inner.write_at(&[0xaau8; 8192], 0).unwrap();
    *dev.zero_ranges.lock().unwrap() = vec![4096..8192, 12288..16384];
    // The zero ranges the device reports must really read as zeros.
    dev.inner.write_zeroes(4096, 4096, true).unwrap();
    let config = ServerConfig {
        exports: vec![Export::new("", dev.clone())],
        min_hole_query_len: 16384,
        ..Default::default()
    };
    let server = TestServer::start_with(config).await;
    let mut s = server.raw().await;
    let (_, flags) = raw_go(&mut s, "", true).await;
    assert_ne!(flags & tf::SEND_DF, 0);
    // Below min_hole_query_len the device is not asked: one data chunk, zeros included.
    raw_request(&mut s, Command::Read.to_wire(), 0, 76, 0, 8192).await;
    let (flags, kind, handle, payload) = raw_chunk(&mut s).await;
    assert_eq!((flags, kind, handle, payload.len()), (chunk::FLAG_DONE, chunk::TYPE_OFFSET_DATA, 76, 8200));
    assert!(payload[8..4104].iter().all(|&b| b == 0xaa) && payload[4104..].iter().all(|&b| b == 0));
    raw_request(&mut s, Command::Read.to_wire(), 0, 77, 0, 16384).await;
    let mut chunks = Vec::new();
    loop {
        let (flags, kind, handle, payload) = raw_chunk(&mut s).await;
        assert_eq!(handle, 77);
        let offset = u64::from_be_bytes(payload[..8].try_into().unwrap());
        let len = if kind == chunk::TYPE_OFFSET_HOLE {
            u64::from(u32::from_be_bytes(payload[8..12].try_into().unwrap()))
        } else {
            assert_eq!(kind, chunk::TYPE_OFFSET_DATA);
            (payload.len() - 8) as u64
        };
        chunks.push((kind, offset, len));
        if flags & chunk::FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(
        chunks,
        vec![
            (chunk::TYPE_OFFSET_DATA, 0, 4096),
            (chunk::TYPE_OFFSET_HOLE, 4096, 4096),
            (chunk::TYPE_OFFSET_DATA, 8192, 4096),
            (chunk::TYPE_OFFSET_HOLE, 12288, 4096),
        ]
    );
    // With DF the whole read comes as one data chunk.
    raw_request(&mut s, Command::Read.to_wire(), proto::cmd_flags::DF, 78, 0, 16384).await;
    let (flags, kind, handle, payload) = raw_chunk(&mut s).await;
    assert_eq!((flags, kind, handle, payload.len()), (chunk::FLAG_DONE, chunk::TYPE_OFFSET_DATA, 78, 16392));
    // A refused READ is answered with an error chunk, not a simple reply.
    raw_request(&mut s, Command::Read.to_wire(), 0, 79, 1 << 20, 512).await;
    let (flags, kind, handle, payload) = raw_chunk(&mut s).await;
    assert_eq!((flags, kind, handle), (chunk::FLAG_DONE, chunk::TYPE_ERROR, 79));
    assert_eq!(proto::decode_error_chunk_payload(&payload).unwrap().0, errno::EINVAL);
    // The client assembles holes and data into the right bytes.
    let c = server.client().await;
    let data = timed(c.read(0, 16384)).await.unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0xaa) && data[4096..].iter().all(|&b| b == 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_errors_reach_the_client_as_eio() {
    let dev = Arc::new(TestDev::new(1 << 20));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    dev.fail_reads.store(true, Ordering::SeqCst);
    // Structured (error chunk with message) and simple replies.
    let c = server.client().await;
    let e = timed(c.read(0, 4096)).await.unwrap_err();
    assert!(
        matches!(&e, client::ClientError::Server { errno: errno::EIO, message } if message.contains("injected"))
    );
    let opts = ClientOptions { structured_replies: false, ..Default::default() };
    let c2 = server.client_with(&opts).await.unwrap();
    assert_eq!(timed(c2.read(0, 4096)).await.unwrap_err().errno(), Some(errno::EIO));
    // The connections stay usable once the device recovers.
    dev.fail_reads.store(false, Ordering::SeqCst);
    assert_eq!(timed(c.read(0, 4096)).await.unwrap(), vec![0u8; 4096]);
    assert_eq!(timed(c2.read(0, 4096)).await.unwrap(), vec![0u8; 4096]);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Concurrency: many requests in flight, out-of-order replies, vanishing clients, shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_read_is_overtaken_by_later_requests() {
    let dev = Arc::new(TestDev::new(1 << 20));
    dev.inner.write_at(&[1u8; 512], 0).unwrap();
    dev.inner.write_at(&[2u8; 512], 4096).unwrap();
    dev.slow_reads.lock().unwrap().push((0, Duration::from_millis(300)));
    // Device calls on the blocking pool: a slow call then holds neither a runtime worker nor
    // the I/O driver, so later requests are read, served and answered while it sleeps.
    let config = ServerConfig {
        exports: vec![Export::new("", dev.clone())],
        device_calls: DeviceCalls::BlockingPool,
        ..Default::default()
    };
    let server = TestServer::start_with(config).await;
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    raw_request(&mut s, Command::Read.to_wire(), 0, 1, 0, 512).await;
    raw_request(&mut s, Command::Read.to_wire(), 0, 2, 4096, 512).await;
    raw_request(&mut s, Command::Flush.to_wire(), 0, 3, 0, 0).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let (err, handle) = raw_simple_reply(&mut s).await;
        assert_eq!(err, 0);
        if handle != 3 {
            let mut data = [0u8; 512];
            timed(s.read_exact(&mut data)).await.unwrap();
            assert_eq!(data, [handle as u8; 512], "data of handle {handle}");
        }
        order.push(handle);
    }
    assert_eq!(order.last(), Some(&1), "the slow read must be answered last, got {order:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_in_flight_requests_from_one_client_keep_their_data() {
    for mode in [DeviceCalls::OnWorkers, DeviceCalls::BlockingPool, DeviceCalls::Inline] {
        for cheap_writes in [false, true] {
            many_in_flight(mode, cheap_writes).await;
        }
    }
}

async fn many_in_flight(device_calls: DeviceCalls, cheap_writes: bool) {
    const BLOCK: usize = 4096;
    const BLOCKS: u64 = 256;
    let dev = Arc::new(TestDev { cheap_writes, ..TestDev::new(BLOCKS * BLOCK as u64) });
    // Every 7th block reads slowly, so replies come back out of order.
    for b in (0..BLOCKS).step_by(7) {
        dev.slow_reads.lock().unwrap().push((b * BLOCK as u64, Duration::from_millis(20)));
    }
    let config = ServerConfig {
        exports: vec![Export::new("", dev.clone())],
        max_in_flight_per_conn: 16,
        device_calls,
        ..Default::default()
    };
    let server = TestServer::start_with(config).await;
    let c = Arc::new(server.client().await);
    let pattern = |b: u64| -> Vec<u8> { (0..BLOCK).map(|i| (b as usize * 31 + i) as u8).collect() };
    let mut tasks = tokio::task::JoinSet::new();
    for b in 0..BLOCKS {
        let c = c.clone();
        tasks.spawn(async move { c.write(b * BLOCK as u64, &pattern(b), b % 5 == 0).await });
    }
    while let Some(r) = timed(tasks.join_next()).await {
        r.unwrap().unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for b in 0..BLOCKS {
        let c = c.clone();
        tasks.spawn(async move { (b, c.read(b * BLOCK as u64, BLOCK as u32).await) });
    }
    while let Some(r) = timed(tasks.join_next()).await {
        let (b, data) = r.unwrap();
        assert_eq!(data.unwrap(), pattern(b), "block {b}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_does_not_read_replies_is_throttled_not_buffered() {
    let (export, _) = mem_export("", 1 << 20);
    let config = ServerConfig { exports: vec![export], max_in_flight_per_conn: 8, ..Default::default() };
    let server = TestServer::start_with(config).await;
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    // 64 MiB of replies requested without reading any; the server must stop reading requests
    // rather than queue them all, and then answer every one once we read.
    const N: u64 = 1024;
    let (mut rd, mut wr) = s.into_split();
    let sender = tokio::spawn(async move {
        for h in 0..N {
            let hdr = proto::RequestHeader { flags: 0, cmd_type: 0, handle: h, offset: 0, length: 65536 };
            wr.write_all(&hdr.encode()).await.unwrap();
        }
        wr
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut seen = vec![false; N as usize];
    let mut data = vec![0u8; 65536];
    for _ in 0..N {
        let mut b = [0u8; 16];
        timed(rd.read_exact(&mut b)).await.unwrap();
        let proto::ReplyStart::Simple(r) = proto::decode_reply_start(&b).unwrap() else {
            panic!("not simple")
        };
        assert_eq!(r.errno, 0);
        timed(rd.read_exact(&mut data)).await.unwrap();
        assert!(!seen[r.handle as usize], "handle {} answered twice", r.handle);
        seen[r.handle as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    drop(timed(sender).await.unwrap());
    server.assert_still_serving().await;
    server.stop().await;
}

/// Guards against a deadlock of writes run in the reader: their replies wait in a queue and hold
/// in-flight slots, so a reader that waited for a slot without writing that queue first would
/// wait forever. A client that sends far more writes than the in-flight limit, and reads no
/// reply until it has sent them all, must get every one answered once, with its data applied.
/// First in small groups (more requests than slots, but few bytes), so that the reader is never
/// far enough behind to hand writes to tasks; then all at once, so that it is, and writes run
/// both in the reader and in tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_run_in_the_reader_are_all_answered_past_the_in_flight_limit() {
    writes_past_the_in_flight_limit(12).await;
    writes_past_the_in_flight_limit(u64::MAX).await;
}

/// Sends 768 writes of 1 KiB, pausing after every `group` of them.
async fn writes_past_the_in_flight_limit(group: u64) {
    const N: u64 = 768;
    const BLOCK: usize = 1024;
    let dev = Arc::new(TestDev::with_cheap_writes(N * BLOCK as u64));
    let config = ServerConfig {
        exports: vec![Export::new("", dev.clone())],
        max_in_flight_per_conn: 8,
        ..Default::default()
    };
    let server = TestServer::start_with(config).await;
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    let (mut rd, mut wr) = s.into_split();
    let sender = tokio::spawn(async move {
        for h in 0..N {
            let hdr = proto::RequestHeader {
                flags: 0,
                cmd_type: Command::Write.to_wire(),
                handle: h,
                offset: h * BLOCK as u64,
                length: BLOCK as u32,
            };
            wr.write_all(&hdr.encode()).await.unwrap();
            wr.write_all(&[h as u8 | 1; BLOCK]).await.unwrap();
            if h % group == group - 1 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        wr
    });
    let wr = timed(sender).await.unwrap();
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let mut b = [0u8; 16];
        timed(rd.read_exact(&mut b)).await.unwrap();
        let proto::ReplyStart::Simple(r) = proto::decode_reply_start(&b).unwrap() else {
            panic!("not simple")
        };
        assert_eq!(r.errno, 0);
        assert!(!seen[r.handle as usize], "handle {} answered twice", r.handle);
        seen[r.handle as usize] = true;
    }
    let image = dev.inner.snapshot();
    for h in 0..N as usize {
        assert!(image[h * BLOCK..(h + 1) * BLOCK].iter().all(|&b| b == h as u8 | 1), "block {h}");
    }
    drop((rd, wr));
    server.assert_still_serving().await;
    server.stop().await;
}

/// A write run in the reader whose payload arrives in pieces is applied whole, only once all of
/// it is there; and the reply of an earlier write goes out while the reader waits for the rest
/// (a client may wait for that reply before it sends more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_in_the_reader_waits_for_its_whole_payload_and_answers_earlier_ones_meanwhile() {
    let dev = Arc::new(TestDev::with_cheap_writes(1 << 20));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    let write = |handle, offset| {
        proto::RequestHeader { flags: 0, cmd_type: Command::Write.to_wire(), handle, offset, length: 8192 }
            .encode()
    };
    let mut first = write(1, 0).to_vec();
    first.extend_from_slice(&[7u8; 8192]);
    first.extend_from_slice(&write(2, 65536));
    first.extend_from_slice(&[9u8; 1000]);
    s.write_all(&first).await.unwrap();
    assert_eq!(raw_simple_reply(&mut s).await, (0, 1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let image = dev.inner.snapshot();
    assert!(image[..8192].iter().all(|&b| b == 7));
    assert!(image[65536..65536 + 8192].iter().all(|&b| b == 0), "a partly received write was applied");
    s.write_all(&[9u8; 8192 - 1000]).await.unwrap();
    assert_eq!(raw_simple_reply(&mut s).await, (0, 2));
    assert!(dev.inner.snapshot()[65536..65536 + 8192].iter().all(|&b| b == 9));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_in_the_reader_reach_the_client_as_eio() {
    let dev = Arc::new(TestDev::with_cheap_writes(1 << 20));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let c = server.client().await;
    dev.fail_writes.store(true, Ordering::SeqCst);
    let e = timed(c.write(4096, &[1u8; 4096], false)).await.unwrap_err();
    assert_eq!(e.errno(), Some(errno::EIO), "{e}");
    dev.fail_writes.store(false, Ordering::SeqCst);
    timed(c.write(4096, &[2u8; 4096], false)).await.unwrap();
    assert_eq!(timed(c.read(4096, 4096)).await.unwrap(), vec![2u8; 4096]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_vanishing_mid_request_do_not_disturb_others() {
    let dev = Arc::new(TestDev::new(1 << 20));
    dev.slow_reads.lock().unwrap().push((8192, Duration::from_millis(100)));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let steady = server.client().await;
    // Half a request header.
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    let hdr = proto::RequestHeader { flags: 0, cmd_type: 1, handle: 1, offset: 0, length: 4096 }.encode();
    s.write_all(&hdr[..13]).await.unwrap();
    drop(s);
    // A WRITE header and half its payload: nothing may be written.
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    s.write_all(&hdr).await.unwrap();
    s.write_all(&[0xffu8; 2048]).await.unwrap();
    drop(s);
    // Requests in flight (one slow) and the client gone before any reply.
    let mut s = server.raw().await;
    raw_go(&mut s, "", true).await;
    for h in 0..32 {
        raw_request(&mut s, Command::Read.to_wire(), 0, h, 8192 * (h % 2), 4096).await;
    }
    drop(s);
    timed(steady.write(65536, &[4u8; 4096], false)).await.unwrap();
    assert_eq!(timed(steady.read(65536, 4096)).await.unwrap(), vec![4u8; 4096]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(dev.inner.snapshot()[..4096].iter().all(|&b| b == 0), "a half-received write was applied");
    server.assert_still_serving().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests_then_syncs() {
    let dev = Arc::new(TestDev::new(1 << 20));
    dev.inner.write_at(&[6u8; 4096], 0).unwrap();
    dev.slow_reads.lock().unwrap().push((0, Duration::from_millis(300)));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let unix = server.unix.clone();
    let addr = server.addr;
    let c = Arc::new(server.client().await);
    timed(c.write(8192, &[1u8; 512], false)).await.unwrap();
    let syncs_before = dev.syncs.load(Ordering::SeqCst);
    let reader = {
        let c = c.clone();
        tokio::spawn(async move { c.read(0, 4096).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.stop().await;
    // The slow read that was in flight when shutdown began was answered.
    assert_eq!(timed(reader).await.unwrap().unwrap(), vec![6u8; 4096]);
    assert!(dev.syncs.load(Ordering::SeqCst) > syncs_before, "no sync at shutdown");
    // The connection is closed and nothing listens any more.
    assert!(timed(c.read(0, 512)).await.is_err());
    assert!(TcpStream::connect(addr).await.is_err());
    assert!(!unix.exists(), "the Unix socket file was left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_reports_clear_errors() {
    let (export, _) = mem_export("", 4096);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = ServerConfig { exports: vec![export.clone()], ..Default::default() };
    let err = Server::bind(config, &[ListenAddr::Tcp(addr)]).await.unwrap_err();
    assert!(matches!(&err, ubcache::nbd::ServerError::Bind { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    let config = ServerConfig { exports: vec![export.clone()], ..Default::default() };
    let err = Server::bind(config, &[ListenAddr::Unix(file.clone())]).await.unwrap_err();
    assert!(matches!(err, ubcache::nbd::ServerError::Bind { .. }));
    assert!(file.exists(), "bind removed a file that is not a socket");
    let err = Server::bind(ServerConfig::default(), &[ListenAddr::Unix(file.clone())]).await.unwrap_err();
    assert!(matches!(err, ubcache::nbd::ServerError::NoExports));
    let config = ServerConfig { exports: vec![export.clone(), export.clone()], ..Default::default() };
    let err = Server::bind(config, &[ListenAddr::Unix(file)]).await.unwrap_err();
    assert!(matches!(err, ubcache::nbd::ServerError::DuplicateExport(_)));
    // A stale socket file of a dead server is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let config = ServerConfig { exports: vec![export], ..Default::default() };
    let server = Server::bind(config, &[ListenAddr::Unix(stale.clone())]).await.unwrap();
    assert_eq!(server.uris(), vec![format!("nbd+unix:///?socket={}", stale.display())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_a_client_never_reads_replies() {
    let (export, _) = mem_export("", 1 << 20);
    let config = ServerConfig {
        exports: vec![export],
        max_in_flight_per_conn: 4,
        shutdown_drain_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let server = TestServer::start_with(config).await;
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    // Far more replies than the socket buffers hold; the server ends up blocked writing them and
    // its reader blocked waiting for in-flight slots.
    let (_rd, mut wr) = s.into_split();
    let flood = tokio::spawn(async move {
        for h in 0..4096u64 {
            let hdr = proto::RequestHeader { flags: 0, cmd_type: 0, handle: h, offset: 0, length: 1 << 20 };
            if wr.write_all(&hdr.encode()).await.is_err() {
                break;
            }
        }
        wr
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
    flood.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uris_carry_the_real_port_and_escaped_export_names() {
    let (default, _) = mem_export("", 4096);
    let (named, named_dev) = mem_export("my disk", 8192);
    let config = ServerConfig { exports: vec![default, named], ..Default::default() };
    let server = Server::bind(config, &[ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())]).await.unwrap();
    let ListenAddr::Tcp(addr) = server.local_addrs()[0].clone() else { panic!("not tcp") };
    assert_ne!(addr.port(), 0);
    let uris = server.uris();
    assert_eq!(uris, vec![format!("nbd://{addr}"), format!("nbd://{addr}/my%20disk")]);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let c = timed(NbdClient::connect_uri(&uris[1], &ClientOptions::default())).await.unwrap();
    assert_eq!(c.size(), 8192);
    timed(c.write(0, b"named", true)).await.unwrap();
    assert_eq!(&named_dev.snapshot()[..5], b"named");
    let _ = stop.send(());
    timed(task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_lists_exports_and_queries_info() {
    let (a, _) = mem_export("a", 4096);
    let (b, _) = mem_export("b", 8192);
    let b = Export { description: "bee".into(), read_only: true, ..b };
    let server = TestServer::start(vec![a, b]).await;
    let listed = timed(client::list_exports(server.raw().await)).await.unwrap();
    let listed: Vec<_> = listed.iter().map(|e| (e.name.as_str(), e.description.as_str())).collect();
    assert_eq!(listed, [("a", ""), ("b", "bee")], "NBD_REP_SERVER carries each export's description");
    let info = timed(client::query_info(server.raw().await, "b")).await.unwrap();
    assert_eq!(
        (info.size, info.name.as_deref(), info.description.as_deref()),
        (8192, Some("b"), Some("bee"))
    );
    assert_ne!(info.flags & tf::READ_ONLY, 0);
    let err = timed(client::query_info(server.raw().await, "zz")).await.unwrap_err();
    assert!(
        matches!(err, client::ClientError::OptionRefused { reply_type: rep::ERR_UNKNOWN, .. }),
        "{err:?}"
    );
    server.assert_still_serving_export("a").await;
    server.stop().await;
}

/// CAN_MULTI_CONN promises that a FLUSH on one connection covers writes acknowledged on
/// another: all connections share the export's one device, whose sync covers every completed write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_share_one_device_so_flush_covers_all_of_them() {
    let dev = Arc::new(TestDev::new(1 << 20));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let a = server.client().await;
    let b = server.client().await;
    assert_ne!(a.flags() & tf::CAN_MULTI_CONN, 0);
    timed(a.write(4096, &[0x11u8; 4096], false)).await.unwrap();
    // Visible at once on the other connection.
    assert_eq!(timed(b.read(4096, 4096)).await.unwrap(), vec![0x11u8; 4096]);
    let syncs = dev.syncs.load(Ordering::SeqCst);
    timed(b.flush()).await.unwrap();
    assert_eq!(dev.syncs.load(Ordering::SeqCst), syncs + 1, "FLUSH on B must sync the shared device");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Syncs: coalesced, ordered after the writes they cover, and off the runtime's workers

/// Records on one clock when each write returned from the device and when each sync started.
/// Syncs are slow, so flushes arrive while one is running.
#[derive(Debug)]
struct OrderDev {
    inner: MemDev,
    clock: AtomicU64,
    /// (offset, clock when the write returned)
    writes_done: Mutex<Vec<(u64, u64)>>,
    sync_starts: Mutex<Vec<u64>>,
    sync_time: Duration,
}

impl OrderDev {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
}

impl BlockDev for OrderDev {
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
        self.inner.write_at(buf, offset)?;
        let done = self.tick();
        self.writes_done.lock().unwrap().push((offset, done));
        Ok(())
    }
    fn sync(&self) -> DevResult<()> {
        let start = self.tick();
        self.sync_starts.lock().unwrap().push(start);
        std::thread::sleep(self.sync_time);
        Ok(())
    }
}

/// Guards against coalescing that answers a FLUSH with a sync that was already running when a
/// write it must cover completed: such a sync may have missed that write, so the reply would
/// promise durability for data that is not durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_is_answered_only_after_a_sync_that_started_after_the_writes_it_covers() {
    let dev = Arc::new(OrderDev {
        inner: MemDev::new(1 << 20),
        clock: AtomicU64::new(0),
        writes_done: Mutex::new(Vec::new()),
        sync_starts: Mutex::new(Vec::new()),
        sync_time: Duration::from_millis(5),
    });
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    // Several connections (MULTI_CONN: a flush covers writes acknowledged on any of them), each
    // writing its own blocks and flushing, so flushes keep arriving while syncs run.
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..4u64 {
        let client = server.client().await;
        let dev = dev.clone();
        tasks.spawn(async move {
            let mut flushes = Vec::new();
            for i in 0..12u64 {
                let offset = (conn * 16 + i) * 4096;
                timed(client.write(offset, &[conn as u8 + 1; 4096], false)).await.unwrap();
                let sent = dev.tick();
                timed(client.flush()).await.unwrap();
                let replied = dev.tick();
                flushes.push((sent, replied));
            }
            flushes
        });
    }
    let mut flushes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        flushes.extend(r.unwrap());
    }
    let writes = dev.writes_done.lock().unwrap().clone();
    let syncs = dev.sync_starts.lock().unwrap().clone();
    for &(sent, replied) in &flushes {
        // Every write acknowledged before the flush was sent completed before it was sent.
        let must_cover = writes.iter().map(|&(_, done)| done).filter(|&done| done < sent).max();
        let Some(last_write) = must_cover else { continue };
        assert!(
            syncs.iter().any(|&s| s > last_write && s < replied),
            "flush sent at {sent}, answered at {replied}: no sync started after the write done at \
             {last_write} (syncs started at {syncs:?})"
        );
    }
    assert!(syncs.len() <= flushes.len(), "more syncs than flushes");
    server.stop().await;
}

/// A device whose `sync` and FUA writes block until the test opens the gate (or 20 s pass).
#[derive(Debug, Default)]
struct GateDev {
    inner: Option<MemDev>,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
    blocked: AtomicUsize,
    syncs: AtomicUsize,
}

impl GateDev {
    fn new(len: u64) -> Self {
        Self { inner: Some(MemDev::new(len)), ..Default::default() }
    }

    fn mem(&self) -> &MemDev {
        self.inner.as_ref().unwrap()
    }

    fn wait_for_gate(&self) {
        self.blocked.fetch_add(1, Ordering::SeqCst);
        let open = self.open.lock().unwrap();
        let _unused = self.opened.wait_timeout_while(open, Duration::from_secs(20), |open| !*open).unwrap();
        self.blocked.fetch_sub(1, Ordering::SeqCst);
    }

    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    /// Waits (bounded) until `n` device calls are blocked on the gate.
    async fn wait_blocked(&self, n: usize) {
        for _ in 0..1000 {
            if self.blocked.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("only {} device calls reached the gate, expected {n}", self.blocked.load(Ordering::SeqCst));
    }
}

impl BlockDev for GateDev {
    fn len(&self) -> u64 {
        self.mem().len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps::default()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.mem().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.mem().write_at(buf, offset)
    }
    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.mem().write_at(buf, offset)?;
        self.wait_for_gate();
        Ok(())
    }
    fn sync(&self) -> DevResult<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.wait_for_gate();
        Ok(())
    }
}

/// Guards against syncs occupying the runtime's workers: with FUA writes and a FLUSH all
/// waiting in the device (more of them than workers), reads must still be answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_answered_while_flushes_and_fua_writes_wait_for_the_disk() {
    let dev = Arc::new(GateDev::new(1 << 20));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let client = Arc::new(server.client().await);
    let mut waiting = tokio::task::JoinSet::new();
    for i in 0..4u64 {
        let client = client.clone();
        waiting.spawn(async move { client.write(i * 4096, &[7u8; 4096], true).await });
    }
    let flusher = client.clone();
    waiting.spawn(async move { flusher.flush().await });
    dev.wait_blocked(5).await;
    // Two workers, five blocked device calls: a read still gets through.
    assert_eq!(timed(client.read(0, 4096)).await.unwrap(), vec![7u8; 4096]);
    dev.open_gate();
    while let Some(r) = waiting.join_next().await {
        timed(async { r.unwrap() }).await.unwrap();
    }
    server.stop().await;
}

/// Flushes that arrive while a sync is running share the one next sync instead of running a
/// sync each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_queued_behind_a_running_sync_share_the_next_one() {
    let dev = Arc::new(GateDev::new(1 << 20));
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let client = Arc::new(server.client().await);
    let mut flushes = tokio::task::JoinSet::new();
    let first = client.clone();
    flushes.spawn(async move { first.flush().await });
    dev.wait_blocked(1).await;
    for _ in 0..15 {
        let client = client.clone();
        flushes.spawn(async move { client.flush().await });
    }
    // Let the server receive them while the first sync is still held (not a timing assertion:
    // a late flush would at worst start one more sync).
    tokio::time::sleep(Duration::from_millis(200)).await;
    dev.open_gate();
    while let Some(r) = flushes.join_next().await {
        timed(async { r.unwrap() }).await.unwrap();
    }
    let syncs = dev.syncs.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&syncs),
        "16 flushes caused {syncs} syncs; expected the running one and one shared"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// base:allocation and BLOCK_STATUS

/// Sends a LIST or SET_META_CONTEXT and returns the contexts replied before the ACK.
async fn raw_meta_context(
    s: &mut TcpStream,
    option: u32,
    export: &str,
    queries: &[&str],
) -> Vec<(u32, String)> {
    let req = proto::MetaContextRequest {
        export_name: export.into(),
        queries: queries.iter().map(|q| (*q).to_owned()).collect(),
    };
    raw_option(s, option, &req.encode()).await;
    let mut contexts = Vec::new();
    loop {
        let (h, p) = raw_option_reply(s).await;
        match h.reply_type {
            rep::META_CONTEXT => contexts.push((
                u32::from_be_bytes(p[..4].try_into().unwrap()),
                String::from_utf8(p[4..].to_vec()).unwrap(),
            )),
            rep::ACK => return contexts,
            t => panic!("unexpected reply {t:#x} to meta context option"),
        }
    }
}

/// Reads one block status chunk; returns (flags, context id, extents).
async fn raw_block_status(s: &mut TcpStream, handle: u64) -> (u16, u32, Vec<(u32, u32)>) {
    let (flags, kind, h, payload) = raw_chunk(s).await;
    assert_eq!((kind, h), (proto::chunk::TYPE_BLOCK_STATUS, handle));
    let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
    let extents = payload[4..]
        .chunks_exact(8)
        .map(|e| {
            (u32::from_be_bytes(e[..4].try_into().unwrap()), u32::from_be_bytes(e[4..].try_into().unwrap()))
        })
        .collect();
    (flags, id, extents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_reports_known_zero_ranges_as_holes() {
    let dev = Arc::new(TestDev::new(1 << 20));
    *dev.zero_ranges.lock().unwrap() = vec![4096..8192, 12288..16384];
    let server = TestServer::start(vec![Export::new("", dev.clone())]).await;
    let mut s = server.raw().await;
    raw_greet(&mut s, proto::client_flags::FIXED_NEWSTYLE | proto::client_flags::NO_ZEROES).await;
    // SET before structured replies is refused; LIST works and lists the one context.
    let req = proto::MetaContextRequest {
        export_name: String::new(),
        queries: vec![proto::BASE_ALLOCATION.into()],
    };
    raw_option(&mut s, opt::SET_META_CONTEXT, &req.encode()).await;
    assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ERR_INVALID);
    let all = raw_meta_context(&mut s, opt::LIST_META_CONTEXT, "", &[]).await;
    assert_eq!(all, [(0, proto::BASE_ALLOCATION.to_owned())]);
    assert_eq!(raw_meta_context(&mut s, opt::LIST_META_CONTEXT, "", &["base:"]).await.len(), 1);
    assert!(raw_meta_context(&mut s, opt::LIST_META_CONTEXT, "", &["qemu:dirty-bitmap:x"]).await.is_empty());
    raw_option(&mut s, opt::LIST_META_CONTEXT, &[0, 0, 0, 9]).await;
    assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ERR_INVALID, "truncated payload");
    raw_option(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw_option_reply(&mut s).await.0.reply_type, rep::ACK);
    let set =
        raw_meta_context(&mut s, opt::SET_META_CONTEXT, "", &["nbd:unknown", proto::BASE_ALLOCATION]).await;
    assert_eq!(set, [(proto::BASE_ALLOCATION_ID, proto::BASE_ALLOCATION.to_owned())]);
    raw_option(&mut s, opt::GO, &proto::InfoRequest { name: String::new(), requests: vec![] }.encode()).await;
    while raw_option_reply(&mut s).await.0.reply_type != rep::ACK {}

    let hole = proto::alloc_state::HOLE | proto::alloc_state::ZERO;
    raw_request(&mut s, Command::BlockStatus.to_wire(), 0, 1, 0, 20480).await;
    let (flags, id, extents) = raw_block_status(&mut s, 1).await;
    assert_eq!((flags, id), (proto::chunk::FLAG_DONE, proto::BASE_ALLOCATION_ID));
    assert_eq!(extents, [(4096, 0), (4096, hole), (4096, 0), (4096, hole), (4096, 0)]);
    // REQ_ONE: only the first extent; a range starting in a hole starts with the hole.
    raw_request(&mut s, Command::BlockStatus.to_wire(), proto::cmd_flags::REQ_ONE, 2, 6144, 10240).await;
    assert_eq!(raw_block_status(&mut s, 2).await.2, [(2048, hole)]);
    // Beyond the end: an error chunk, and the connection goes on.
    raw_request(&mut s, Command::BlockStatus.to_wire(), 0, 3, 1 << 20, 512).await;
    let (_, kind, handle, payload) = raw_chunk(&mut s).await;
    assert_eq!((kind, handle), (proto::chunk::TYPE_ERROR, 3));
    assert_eq!(proto::decode_error_chunk_payload(&payload).unwrap().0, errno::EINVAL);
    raw_request(&mut s, Command::BlockStatus.to_wire(), 0, 4, 0, 4096).await;
    assert_eq!(raw_block_status(&mut s, 4).await.2, [(4096, 0)]);

    // Without SET_META_CONTEXT, BLOCK_STATUS is refused.
    let mut plain = server.raw().await;
    raw_go(&mut plain, "", true).await;
    raw_request(&mut plain, Command::BlockStatus.to_wire(), 0, 5, 0, 4096).await;
    let (_, kind, handle, _) = raw_chunk(&mut plain).await;
    assert_eq!((kind, handle), (proto::chunk::TYPE_ERROR, 5));
    server.stop().await;
}

/// `nbdinfo --map` (libnbd, base:allocation) shows exactly the holes the device knows of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_the_holes_of_a_sparse_file() {
    if !crate::tools::require_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = ubcache::dev::FileDevOptions { create_with_size: Some(4 << 20), ..Default::default() };
    let file = Arc::new(ubcache::dev::FileDev::open(&dir.path().join("sparse.img"), &opts).unwrap());
    file.write_at(&[0xabu8; 65536], 0).unwrap();
    file.write_at(&[0xcdu8; 65536], 2 << 20).unwrap();
    let mut expected_holes = file.known_zero_ranges(0, 4 << 20).unwrap();
    let server = TestServer::start(vec![Export::new("", file.clone())]).await;
    let uri = format!("nbd://{}", server.addr);
    let output = timed(tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout").args(["60", "nbdinfo", "--map", &uri]).output().unwrap()
    }))
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "nbdinfo --map failed: {text} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Lines: offset length type description
    let mut covered = 0u64;
    let mut holes = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (offset, len, kind): (u64, u64, u32) =
            (fields[0].parse().unwrap(), fields[1].parse().unwrap(), fields[2].parse().unwrap());
        assert_eq!(offset, covered, "extents must be contiguous: {text}");
        covered += len;
        assert!(kind == 0 || kind == 3, "type {kind}: {text}");
        if kind == 3 {
            holes.push(offset..offset + len);
        }
    }
    assert_eq!(covered, 4 << 20, "{text}");
    // Adjacent hole ranges from the device show up merged or not; compare the covered bytes.
    expected_holes.sort_by_key(|r| r.start);
    let bytes = |v: &[Range<u64>]| v.iter().map(|r| r.end - r.start).sum::<u64>();
    assert_eq!(bytes(&holes), bytes(&expected_holes), "nbdinfo: {text}; device: {expected_holes:?}");
    for h in &holes {
        assert!(
            expected_holes.iter().any(|e| e.start <= h.start && h.end <= e.end),
            "{h:?} is no device hole"
        );
    }
    server.stop().await;
}

/// Large WRITE payloads bypass the reader's buffer: a payload split across partial socket
/// writes, followed at once by more requests, must still land intact and in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_write_payloads_arriving_in_pieces_keep_their_bytes() {
    let (export, dev) = mem_export("", 4 << 20);
    let server = TestServer::start(vec![export]).await;
    let mut s = server.raw().await;
    raw_go(&mut s, "", false).await;
    let big: Vec<u8> = (0..(1u32 << 20) + 4096).map(|i| (i % 251) as u8).collect();
    let len = big.len() as u32;
    let header = proto::RequestHeader {
        flags: 0,
        cmd_type: Command::Write.to_wire(),
        handle: 1,
        offset: 8192,
        length: len,
    };
    // Header plus a small head of the payload, then the rest in uneven pieces, with a second
    // request right behind the payload.
    let mut wire = header.encode().to_vec();
    wire.extend_from_slice(&big);
    let second = proto::RequestHeader {
        flags: 0,
        cmd_type: Command::Write.to_wire(),
        handle: 2,
        offset: 0,
        length: 512,
    };
    wire.extend_from_slice(&second.encode());
    wire.extend_from_slice(&[9u8; 512]);
    for piece in [100usize, 70_000, 300_000] {
        let (now, rest) = wire.split_at(piece.min(wire.len()));
        s.write_all(now).await.unwrap();
        wire = rest.to_vec();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.write_all(&wire).await.unwrap();
    let mut handles = vec![raw_simple_reply(&mut s).await, raw_simple_reply(&mut s).await];
    handles.sort_unstable();
    assert_eq!(handles, [(0, 1), (0, 2)]);
    let mut back = vec![0u8; big.len()];
    dev.read_at(&mut back, 8192).unwrap();
    assert!(back == big, "payload bytes changed on the way");
    let mut head = [0u8; 512];
    dev.read_at(&mut head, 0).unwrap();
    assert_eq!(head, [9u8; 512]);
    server.stop().await;
}
