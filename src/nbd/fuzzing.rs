//! Entry points shared by the cargo-fuzz targets (`fuzz/fuzz_targets/nbd_*.rs`) and the
//! deterministic fuzz batch test (`tests/fuzz/nbd_batch.rs`). Each takes arbitrary bytes, must
//! never panic, and checks the invariants the server relies on.

use super::proto::{self, ExportParams, Request, RequestHeader};
use super::server::{Export, ServerConfig, serve_stream};
use crate::dev::MemDev;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Decodes a request header and checks it against export parameters taken from the input.
/// Asserts: an accepted request lies inside the export, carries no more than `MAX_PAYLOAD`
/// of data, is never zero-length, and never writes to a read-only export; encoding round-trips.
pub fn request_parse(data: &[u8]) {
    let Some(hdr) = data.get(..proto::REQUEST_HEADER_LEN) else { return };
    let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
    raw.copy_from_slice(hdr);
    // Half the inputs get a valid magic, so the checks behind it are reached.
    if data.get(proto::REQUEST_HEADER_LEN).is_some_and(|b| b & 1 == 1) {
        raw[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    }
    let Ok(header) = RequestHeader::decode(&raw) else { return };
    assert_eq!(header.encode(), raw, "request header does not round-trip");
    let extra = &data[proto::REQUEST_HEADER_LEN..];
    let mut size_bytes = [0u8; 8];
    for (d, s) in size_bytes.iter_mut().zip(extra.iter().skip(1)) {
        *d = *s;
    }
    let flags = extra.get(9).copied().unwrap_or(0);
    let export = ExportParams {
        size: u64::from_be_bytes(size_bytes),
        read_only: flags & 1 != 0,
        structured_replies: flags & 2 != 0,
        block_status: flags & 4 != 0,
    };
    match proto::check_request(&header, &export) {
        Err(rejection) => assert_ne!(rejection.errno, 0, "a rejection must carry an errno"),
        Ok(Request::Disc | Request::Flush) => {}
        Ok(
            Request::Read { offset, len, .. }
            | Request::Write { offset, len, .. }
            | Request::Trim { offset, len, .. }
            | Request::Cache { offset, len }
            | Request::WriteZeroes { offset, len, .. }
            | Request::BlockStatus { offset, len, .. },
        ) => {
            assert!(len > 0, "zero-length request accepted");
            let end = offset.checked_add(u64::from(len));
            assert!(end.is_some_and(|e| e <= export.size), "request beyond the export accepted");
            let request = proto::check_request(&header, &export);
            if let Ok(Request::Read { len, .. } | Request::Write { len, .. }) = request {
                assert!(len <= proto::MAX_PAYLOAD, "oversize payload accepted");
            }
            if export.read_only {
                assert!(
                    !matches!(
                        request,
                        Ok(Request::Write { .. } | Request::Trim { .. } | Request::WriteZeroes { .. })
                    ),
                    "write accepted on a read-only export"
                );
            }
        }
    }
}

/// Runs every option-level decoder over the input: option header, INFO/GO payload, strings,
/// option replies, info replies, reply starts, error chunks. None may panic; what is accepted
/// must re-encode to the same bytes.
pub fn option_parse(data: &[u8]) {
    if let Some(h) = data.get(..proto::OPTION_HEADER_LEN) {
        let mut raw = [0u8; proto::OPTION_HEADER_LEN];
        raw.copy_from_slice(h);
        if let Ok(header) = proto::OptionHeader::decode(&raw) {
            assert_eq!(header.encode(), raw);
        }
    }
    if let Ok(request) = proto::InfoRequest::parse(data) {
        assert_eq!(request.encode(), data, "INFO/GO payload does not round-trip");
        assert!(request.name.len() <= proto::MAX_STRING_LEN);
    }
    let _ = proto::parse_string(data);
    if let Some(h) = data.get(..proto::OPTION_REPLY_HEADER_LEN) {
        let mut raw = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        raw.copy_from_slice(h);
        if let Ok(header) = proto::OptionReplyHeader::decode(&raw) {
            assert_eq!(header.encode(), raw);
        }
    }
    let _ = proto::ExportInfo::default().apply_info_reply(data);
    if let Some(h) = data.get(..16) {
        let mut raw = [0u8; 16];
        raw.copy_from_slice(h);
        let _ = proto::decode_reply_start(&raw);
    }
    if let Ok((errno, message)) = proto::decode_error_chunk_payload(data) {
        assert!(message.chars().count() <= data.len(), "error message longer than its chunk");
        let _ = errno;
    }
}

/// Feeds `input` as everything a client sends on one connection to a server with two small
/// exports (one read-only), and returns what the server sent back (at most 1 MiB is kept).
/// Exercises the handshake and transmission code end to end; it must neither panic nor hang.
pub fn server_session(input: &[u8]) -> Vec<u8> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return Vec::new();
    };
    rt.block_on(async {
        let config = ServerConfig {
            exports: vec![
                Export::new("", Arc::new(MemDev::new(64 << 10))),
                Export {
                    description: "read-only".into(),
                    read_only: true,
                    ..Export::new("ro", Arc::new(MemDev::new(4096)))
                },
            ],
            handshake_timeout: Duration::from_secs(5),
            shutdown_drain_timeout: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        let (client, server_side) = tokio::io::duplex(256 << 10);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let server = tokio::spawn(serve_stream(config, server_side, std::future::pending()));
        let input = input.to_vec();
        let sender = tokio::spawn(async move {
            // The server may hang up early; the rest of the input is then simply not sent.
            let _ = to_server.write_all(&input).await;
            let _ = to_server.shutdown().await;
        });
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let collect = async {
            loop {
                match from_server.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.len() < (1 << 20) {
                            out.extend_from_slice(&buf[..n]);
                        }
                    }
                }
            }
        };
        // Everything is in memory: a session that takes this long is a hang, i.e. a bug.
        let finished = tokio::time::timeout(Duration::from_secs(20), collect).await;
        assert!(finished.is_ok(), "server session did not finish");
        let _ = sender.await;
        let result = server.await;
        assert!(matches!(result, Ok(Ok(()))), "server session failed: {result:?}");
        out
    })
}

/// A valid client byte stream that drives every part of the protocol, as a seed for mutation:
/// greeting flags, STRUCTURED_REPLY, INFO, LIST, an unknown option, GO, then one request of
/// each command (with a WRITE payload) and DISC.
#[must_use]
pub fn seed_session() -> Vec<u8> {
    use proto::{Command, cmd_flags, info, opt};
    let mut s = Vec::new();
    let option = |s: &mut Vec<u8>, option: u32, payload: &[u8]| {
        s.extend_from_slice(&proto::OptionHeader { option, len: payload.len() as u32 }.encode());
        s.extend_from_slice(payload);
    };
    s.extend_from_slice(
        &(proto::client_flags::FIXED_NEWSTYLE | proto::client_flags::NO_ZEROES).to_be_bytes(),
    );
    option(&mut s, opt::STRUCTURED_REPLY, &[]);
    let info_req = proto::InfoRequest {
        name: "ro".into(),
        requests: vec![info::NAME, info::DESCRIPTION, info::BLOCK_SIZE],
    };
    option(&mut s, opt::INFO, &info_req.encode());
    option(&mut s, opt::LIST, &[]);
    option(&mut s, 99, b"junk");
    option(&mut s, opt::GO, &proto::InfoRequest { name: String::new(), requests: vec![] }.encode());
    let mut handle = 0;
    let mut req = |s: &mut Vec<u8>, cmd: Command, flags: u16, offset: u64, length: u32| {
        handle += 1;
        s.extend_from_slice(
            &RequestHeader { flags, cmd_type: cmd.to_wire(), handle, offset, length }.encode(),
        );
    };
    req(&mut s, Command::Write, cmd_flags::FUA, 512, 8);
    s.extend_from_slice(b"ubcache!");
    req(&mut s, Command::Read, 0, 0, 4096);
    req(&mut s, Command::Read, cmd_flags::DF, 4096, 512);
    req(&mut s, Command::Flush, 0, 0, 0);
    req(&mut s, Command::Trim, 0, 0, 1024);
    req(&mut s, Command::WriteZeroes, cmd_flags::NO_HOLE, 1024, 1024);
    req(&mut s, Command::Cache, 0, 0, 4096);
    req(&mut s, Command::Read, 0, 1 << 40, 4096);
    req(&mut s, Command::Disc, 0, 0, 0);
    s
}

/// What the client reported for each request of [`client_session`]: READ 0+4096, READ
/// 4096+65536, FLUSH. A READ that succeeded is `Ok(its length)`.
pub type ClientOutcome = Vec<Result<usize, String>>;

/// The READs [`client_session`] sends (offset, length), with handles 1 and 2; FLUSH is handle 3.
pub const CLIENT_SESSION_READS: [(u64, u32); 2] = [(0, 4096), (4096, 65536)];

/// Plays a server whose bytes are `handshake` (everything up to the transmission phase) and then
/// `replies`, against the real client: it negotiates (structured replies, `NBD_OPT_GO`), sends
/// two READs and a FLUSH (handles 1, 2, 3, all registered before any reply is read), and returns
/// what each got; `Err` from the handshake gives an empty outcome. Must neither panic nor hang,
/// and a successful READ always has the requested length. Oversized chunks, sizes like 2^63 and
/// a server vanishing at any byte are all in reach of a fuzzer.
pub fn client_session(handshake: &[u8], replies: &[u8]) -> ClientOutcome {
    use super::client::{ClientOptions, NbdClient};
    use std::sync::atomic::{AtomicBool, Ordering};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return Vec::new();
    };
    rt.block_on(async {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel();
        let handshake_done = Arc::new(AtomicBool::new(false));
        let server = ScriptedServer {
            bytes: [handshake, replies].concat(),
            gate: handshake.len(),
            pos: 0,
            handshake_done: Arc::clone(&handshake_done),
            go: Some(go_rx),
        };
        let opts = ClientOptions::default();
        let session = async {
            let Ok(client) = NbdClient::handshake(Box::new(server), Box::new(tokio::io::sink()), &opts).await
            else {
                return Vec::new();
            };
            handshake_done.store(true, Ordering::Release);
            let [(o1, l1), (o2, l2)] = CLIENT_SESSION_READS;
            let feed = async {
                // Polled after the three requests registered their handles.
                let _ = go_tx.send(());
            };
            let (a, b, c, ()) = tokio::join!(client.read(o1, l1), client.read(o2, l2), client.flush(), feed);
            for (got, want) in [(&a, l1), (&b, l2)] {
                if let Ok(buf) = got {
                    assert_eq!(buf.len(), want as usize, "a READ returned a buffer of the wrong length");
                }
            }
            let text = |e: super::client::ClientError| e.to_string();
            vec![
                a.map(|b| b.len()).map_err(text),
                b.map(|b| b.len()).map_err(text),
                c.map(|_| 0).map_err(text),
            ]
        };
        // Everything is in memory: a session that takes this long is a hang, i.e. a bug.
        let outcome = tokio::time::timeout(Duration::from_secs(20), session).await;
        assert!(outcome.is_ok(), "client session did not finish");
        outcome.unwrap_or_default()
    })
}

/// The cargo-fuzz entry of [`client_session`]: the first two bytes (little endian) say how many
/// of the rest are the handshake; the remainder are the transmission-phase replies.
pub fn client_reply(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else { return };
    let split = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (handshake, replies) = rest.split_at(split);
    client_session(handshake, replies);
}

/// A [`client_reply`] input: a well-behaved server's whole session.
#[must_use]
pub fn seed_client_reply_input() -> Vec<u8> {
    let handshake = seed_client_handshake(1 << 20);
    let mut s = (handshake.len() as u16).to_le_bytes().to_vec();
    s.extend(handshake);
    s.extend(seed_client_replies());
    s
}

/// The server side of [`client_session`]: its bytes, then end of file (the server vanishes).
/// Once the handshake has completed, the transmission-phase bytes wait for `go`, so that the
/// client has registered its requests before their replies arrive; a handshake that wants more
/// than its bytes simply reads on into the rest, as it would from a real socket.
struct ScriptedServer {
    bytes: Vec<u8>,
    gate: usize,
    pos: usize,
    handshake_done: Arc<std::sync::atomic::AtomicBool>,
    go: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl tokio::io::AsyncRead for ScriptedServer {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let this = &mut *self;
        if this.pos >= this.gate
            && let Some(go) = this.go.as_mut()
        {
            if this.handshake_done.load(std::sync::atomic::Ordering::Acquire)
                && std::pin::Pin::new(go).poll(cx).is_pending()
            {
                return std::task::Poll::Pending;
            }
            this.go = None;
        }
        // Never hand out bytes past the gate while it is closed.
        let end = if this.go.is_some() { this.gate } else { this.bytes.len() };
        let n = buf.remaining().min(end - this.pos);
        buf.put_slice(&this.bytes[this.pos..this.pos + n]);
        this.pos += n;
        std::task::Poll::Ready(Ok(()))
    }
}

/// The bytes of a well-behaved server for [`client_session`]: the handshake (structured replies
/// acknowledged, an export of `size` bytes), and the transmission-phase replies.
#[must_use]
pub fn seed_client_handshake(size: u64) -> Vec<u8> {
    use proto::{handshake_flags, opt, rep};
    let mut s = proto::encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_vec();
    proto::encode_option_reply(&mut s, opt::STRUCTURED_REPLY, rep::ACK, &[]);
    proto::encode_option_reply(&mut s, opt::GO, rep::INFO, &proto::encode_info_export(size, 1));
    proto::encode_option_reply(&mut s, opt::GO, rep::INFO, &proto::encode_info_block_size(1, 4096, 1 << 25));
    proto::encode_option_reply(&mut s, opt::GO, rep::ACK, &[]);
    s
}

/// One structured reply chunk: `chunk_type` with `payload`, `done` setting `NBD_REPLY_FLAG_DONE`.
#[must_use]
pub fn encode_chunk(handle: u64, chunk_type: u16, done: bool, payload: &[u8]) -> Vec<u8> {
    let flags = if done { proto::chunk::FLAG_DONE } else { 0 };
    let mut out =
        proto::ChunkHeader { flags, chunk_type, handle, len: payload.len() as u32 }.encode().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A data chunk carrying `data` at `offset`.
#[must_use]
pub fn data_chunk(handle: u64, offset: u64, data: &[u8], done: bool) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(data);
    encode_chunk(handle, proto::chunk::TYPE_OFFSET_DATA, done, &payload)
}

/// A hole chunk of `len` bytes at `offset`.
#[must_use]
pub fn hole_chunk(handle: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(&len.to_be_bytes());
    encode_chunk(handle, proto::chunk::TYPE_OFFSET_HOLE, done, &payload)
}

/// Well-formed replies to [`client_session`]'s requests: READ 1 as data then a hole, READ 2 in
/// two data chunks out of order, FLUSH as a simple reply.
#[must_use]
pub fn seed_client_replies() -> Vec<u8> {
    let mut s = data_chunk(1, 0, &[0xa5; 1024], false);
    s.extend(hole_chunk(1, 1024, 3072, true));
    s.extend(data_chunk(2, 4096 + 32768, &[0x5a; 32768], false));
    s.extend(data_chunk(2, 4096, &[0x3c; 32768], true));
    s.extend(proto::SimpleReply { errno: 0, handle: 3 }.encode());
    s
}
