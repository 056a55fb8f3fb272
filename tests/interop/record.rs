//! Recording (`ubcache serve --record`): the log format round-trips and reports damage with its
//! entry and offset, a torn tail is not an error, `RecordingDev` logs in completion order with
//! each FLUSH marker where the sync began and fails a write rather than acknowledge it
//! unrecorded, and the real server's log survives a SIGKILL and matches the backing file after
//! qemu-io and fio (replayed with `ubcache replay`).

use crate::support as common;

use std::path::Path;
use std::sync::{Arc, Mutex as StdMutex, mpsc};
use std::time::Duration;

use crate::tools::require_tool;
use common::{UbcacheServer, make_file, require_root, run_bounded, s, ubcache};
use proptest::prelude::*;
use ubcache::dev::{BlockDev, DevCaps, DevError, DevResult, MemDev};
use ubcache::nbd::NbdDev;
use ubcache::record::format::{
    Corruption, Entry, LogEnd, LogError, LogHeader, LogReader, RECORD_OVERHEAD, Record, WriteData, decode_all,
};
use ubcache::record::{LogSink, LogWriter, RecordingDev};

const EXPORT: u64 = 1 << 20;

fn header() -> LogHeader {
    LogHeader::new("disk", EXPORT, 512)
}

fn encode_log(records: &[Record]) -> Vec<u8> {
    let mut out = header().encode().unwrap();
    for (seq, r) in records.iter().enumerate() {
        r.encode(seq as u64, &mut out).unwrap();
    }
    out
}

/// One of every record kind (and both WRITE forms, with and without FUA).
fn every_kind() -> Vec<Record> {
    vec![
        Record::Write {
            offset: 4096,
            data: WriteData::Bytes((0..=255).cycle().take(4096).collect()),
            fua: false,
        },
        Record::Write { offset: 512, data: WriteData::Bytes(vec![9; 512]), fua: true },
        Record::Write { offset: 8192, data: WriteData::Zeros(8192), fua: false },
        Record::Trim { offset: 65536, len: 4096, fua: false },
        Record::WriteZeroes { offset: 0, len: 1024, fua: false, no_hole: true },
        Record::Flush { number: 1 },
        Record::Mark { name: "after mkfs".into() },
    ]
}

/// The image a replay of `entries` gives: the tiny applier these tests use.
fn apply(image: &mut [u8], entries: &[Entry]) {
    for e in entries {
        match &e.record {
            Record::Write { offset, data: WriteData::Bytes(b), .. } => {
                image[*offset as usize..*offset as usize + b.len()].copy_from_slice(b);
            }
            Record::Write { offset, data: WriteData::Zeros(len), .. }
            | Record::Trim { offset, len, .. }
            | Record::WriteZeroes { offset, len, .. } => {
                image[*offset as usize..(*offset + *len) as usize].fill(0);
            }
            Record::Flush { .. } | Record::Mark { .. } => {}
        }
    }
}

fn read_log(path: &Path) -> (LogHeader, Vec<Entry>, LogEnd) {
    let mut reader = LogReader::open(path).unwrap();
    let entries: Vec<Entry> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    let end = reader.end().cloned().unwrap();
    (reader.header().clone(), entries, end)
}

fn record_strategy() -> impl Strategy<Value = Record> {
    let offset = 0..EXPORT - 8192;
    prop_oneof![
        (offset.clone(), prop::collection::vec(any::<u8>(), 0..3000), any::<bool>())
            .prop_map(|(offset, data, fua)| Record::Write { offset, data: WriteData::Bytes(data), fua }),
        (offset.clone(), 0..8192u64, any::<bool>()).prop_map(|(offset, len, fua)| Record::Write {
            offset,
            data: WriteData::Zeros(len),
            fua
        }),
        (offset.clone(), 0..8192u64, any::<bool>()).prop_map(|(offset, len, fua)| Record::Trim {
            offset,
            len,
            fua
        }),
        (offset, 0..8192u64, any::<bool>(), any::<bool>())
            .prop_map(|(offset, len, fua, no_hole)| Record::WriteZeroes { offset, len, fua, no_hole }),
        Just(Record::Flush { number: 0 }),
        "[a-z ]{1,40}".prop_map(|name| Record::Mark { name }),
    ]
}

/// Flush numbers count up from 1, as a writer numbers them.
fn number_flushes(mut records: Vec<Record>) -> Vec<Record> {
    let mut n = 0;
    for r in &mut records {
        if let Record::Flush { number } = r {
            n += 1;
            *number = n;
        }
    }
    records
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_record_sequence_round_trips(records in prop::collection::vec(record_strategy(), 0..30)) {
        let records = number_flushes(records);
        let (_, entries, end) = decode_all(&encode_log(&records)).unwrap();
        prop_assert_eq!(end.unwrap(), LogEnd::Clean);
        prop_assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), (0..records.len() as u64).collect::<Vec<_>>());
        prop_assert_eq!(entries.into_iter().map(|e| e.record).collect::<Vec<_>>(), records);
    }

    /// Any bytes after a valid header, and any bytes at all, decode without a panic.
    #[test]
    fn arbitrary_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512), raw in prop::collection::vec(any::<u8>(), 0..128)) {
        let mut log = header().encode().unwrap();
        log.extend_from_slice(&tail);
        let _ = decode_all(&log);
        let _ = decode_all(&raw);
    }
}

#[test]
fn a_bit_flip_in_any_record_is_an_error_naming_its_entry_and_offset() {
    // A FLUSH after every kind, so that no flipped record is the last one (that is a torn tail).
    let mut records = every_kind();
    records.push(Record::Flush { number: 2 });
    let log = encode_log(&records);
    let (_, entries, _) = decode_all(&log).unwrap();
    for target in &entries[..entries.len() - 1] {
        for byte in target.offset..target.offset + target.size {
            for bit in 0..8 {
                let mut damaged = log.clone();
                damaged[byte as usize] ^= 1 << bit;
                let (_, before, result) = decode_all(&damaged).unwrap();
                match result {
                    Err(LogError::Corrupt { entry, offset, .. }) => {
                        assert_eq!((entry, offset), (target.seq, target.offset), "byte {byte} bit {bit}");
                    }
                    other => panic!(
                        "{} entry {}: byte {byte} bit {bit} gave {other:?}",
                        target.record.kind_name(),
                        target.seq
                    ),
                }
                assert_eq!(before, entries[..target.seq as usize], "entries before the damage stay readable");
            }
        }
    }
}

/// Whole records that are intact but out of place (a block written twice, records swapped by a
/// faulty copy) carry the wrong sequence number: corruption, not a different history.
#[test]
fn a_repeated_or_missing_record_is_a_sequence_error() {
    let log = encode_log(&every_kind());
    let (_, entries, _) = decode_all(&log).unwrap();
    let (second, third) = (&entries[1], &entries[2]);
    let record = |e: &Entry| log[e.offset as usize..(e.offset + e.size) as usize].to_vec();
    let mut repeated = log[..(third.offset) as usize].to_vec();
    repeated.extend_from_slice(&record(second));
    repeated.extend_from_slice(&log[third.offset as usize..]);
    let mut missing = log[..second.offset as usize].to_vec();
    missing.extend_from_slice(&log[third.offset as usize..]);
    for (what, bytes, expected, found) in [("repeated", repeated, 2, 1), ("missing", missing, 1, 2)] {
        match decode_all(&bytes).unwrap().2 {
            Err(LogError::Corrupt {
                entry, what: Corruption::Sequence { expected: e, found: f }, ..
            }) => {
                assert_eq!((entry, e, f), (expected, expected, found), "{what}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn a_bit_flip_in_the_header_is_a_bad_header() {
    let log = encode_log(&every_kind());
    let header_len = header().encode().unwrap().len();
    for byte in 0..header_len {
        let mut damaged = log.clone();
        damaged[byte] ^= 0x10;
        assert!(matches!(decode_all(&damaged), Err(LogError::BadHeader { .. })), "byte {byte}");
    }
    assert!(matches!(
        decode_all(b"not a log at all, just some text......................"),
        Err(LogError::BadHeader { .. })
    ));
}

#[test]
fn a_log_cut_in_its_last_record_or_zero_filled_is_a_torn_tail_not_an_error() {
    let log = encode_log(&every_kind());
    let (_, entries, _) = decode_all(&log).unwrap();
    let last = entries.last().unwrap().clone();
    for cut in last.offset + 1..last.offset + last.size {
        let (_, before, end) = decode_all(&log[..cut as usize]).unwrap();
        assert_eq!(before, entries[..entries.len() - 1]);
        match end.unwrap() {
            LogEnd::Torn(t) => {
                assert_eq!((t.entry, t.offset), (last.seq, last.offset));
                assert!(
                    t.to_string()
                        .starts_with(&format!("torn tail at entry {}, offset {}", last.seq, last.offset))
                );
            }
            LogEnd::Clean => panic!("cut at {cut} read as a clean end"),
        }
    }
    // A bad checksum on the very last record.
    let mut damaged = log.clone();
    let at = damaged.len() - 6;
    damaged[at] ^= 1;
    assert!(matches!(decode_all(&damaged).unwrap().2, Ok(LogEnd::Torn(_))));
    // A crash that extended the file before its data landed.
    let mut zeros = log.clone();
    zeros.extend_from_slice(&[0; 4096]);
    let (_, all, end) = decode_all(&zeros).unwrap();
    assert_eq!(all, entries);
    assert!(matches!(end, Ok(LogEnd::Torn(t)) if t.entry == entries.len() as u64));
    // Garbage after the log is not a torn tail.
    let mut garbage = log;
    garbage.extend_from_slice(&[0xAB; 64]);
    assert!(matches!(
        decode_all(&garbage).unwrap().2,
        Err(LogError::Corrupt { what: Corruption::HeadChecksum, .. })
    ));
}

/// A sink in memory that refuses to grow past `cap` bytes (a full disk) and counts syncs.
#[derive(Debug, Clone)]
struct MemSink {
    inner: Arc<StdMutex<SinkState>>,
}

#[derive(Debug, Default)]
struct SinkState {
    bytes: Vec<u8>,
    cap: usize,
    /// Length of `bytes` at the last sync.
    synced_len: usize,
}

impl MemSink {
    fn new(cap: usize) -> Self {
        MemSink { inner: Arc::new(StdMutex::new(SinkState { cap, ..SinkState::default() })) }
    }
    fn synced(&self) -> Vec<u8> {
        let st = self.inner.lock().unwrap();
        st.bytes[..st.synced_len].to_vec()
    }
    fn all(&self) -> Vec<u8> {
        self.inner.lock().unwrap().bytes.clone()
    }
}

impl LogSink for MemSink {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut st = self.inner.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > st.cap {
            // As a file system does: what fits is written, then ENOSPC.
            let fits = st.cap.saturating_sub(offset as usize).min(buf.len());
            if st.bytes.len() < offset as usize + fits {
                st.bytes.resize(offset as usize + fits, 0);
            }
            st.bytes[offset as usize..offset as usize + fits].copy_from_slice(&buf[..fits]);
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if st.bytes.len() < end {
            st.bytes.resize(end, 0);
        }
        st.bytes[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let mut st = self.inner.lock().unwrap();
        st.synced_len = st.bytes.len();
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.lock().unwrap().bytes.truncate(len as usize);
        Ok(())
    }
}

fn recording_mem(cap: usize) -> (Arc<MemDev>, RecordingDev, MemSink) {
    let inner = Arc::new(MemDev::new(EXPORT));
    let sink = MemSink::new(cap);
    let log = LogWriter::with_sink(Path::new("mem"), Box::new(sink.clone()), &header()).unwrap();
    let dev = RecordingDev::new(Arc::clone(&inner) as Arc<dyn BlockDev>, Arc::new(log));
    (inner, dev, sink)
}

#[test]
fn a_recording_device_logs_every_request_and_the_log_replays_to_the_device() {
    let (inner, dev, sink) = recording_mem(usize::MAX);
    dev.write_at(&[1; 4096], 0).unwrap();
    dev.write_at(&[0; 4096], 8192).unwrap();
    dev.write_at_fua(&[2; 512], 512).unwrap();
    dev.discard(0, 512).unwrap();
    dev.sync().unwrap();
    dev.write_zeroes(1024, 1024, false).unwrap();
    dev.log().append(&Record::Mark { name: "m".into() }).unwrap();
    dev.write_at(&[3; 100], 70_000).unwrap();
    dev.sync().unwrap();
    let (_, entries, end) = decode_all(&sink.synced()).unwrap();
    assert_eq!(end.unwrap(), LogEnd::Clean);
    let kinds: Vec<&str> = entries.iter().map(|e| e.record.kind_name()).collect();
    assert_eq!(kinds, ["write", "write", "write", "trim", "flush", "write-zeroes", "mark", "write", "flush"]);
    assert_eq!(entries[1].record, Record::Write { offset: 8192, data: WriteData::Zeros(4096), fua: false });
    assert!(matches!(entries[2].record, Record::Write { fua: true, .. }));
    assert!(matches!(entries[5].record, Record::WriteZeroes { no_hole: true, .. }));
    let mut image = vec![0; EXPORT as usize];
    apply(&mut image, &entries);
    let mut disk = vec![0; EXPORT as usize];
    // The MemDev kept the trimmed sectors (a trim may leave old data); the replay zeroes them.
    inner.write_at(&[0; 512], 0).unwrap();
    inner.read_at(&mut disk, 0).unwrap();
    assert!(image == disk, "replay differs from the device");
}

/// The durability promises: a FUA write and a FLUSH return only with the log synced past their
/// record, so the synced part of the log holds every write a client was told is durable.
#[test]
fn fua_writes_and_flushes_return_only_once_the_log_is_synced() {
    let (_, dev, sink) = recording_mem(usize::MAX);
    dev.write_at(&[1; 512], 0).unwrap();
    dev.write_at_fua(&[2; 512], 512).unwrap();
    let (_, synced, _) = decode_all(&sink.synced()).unwrap();
    assert_eq!(synced.len(), 2, "the FUA write (and the write before it) must be in the synced log");
    dev.write_at(&[3; 512], 1024).unwrap();
    dev.sync().unwrap();
    let (_, synced, _) = decode_all(&sink.synced()).unwrap();
    assert_eq!(synced.last().map(|e| e.record.clone()), Some(Record::Flush { number: 1 }));
    assert_eq!(synced.len(), 4);
}

/// A device whose `sync` waits until the test lets it finish, to run a write in the middle.
#[derive(Debug)]
struct GatedSync {
    inner: MemDev,
    entered: StdMutex<mpsc::Sender<()>>,
    release: StdMutex<mpsc::Receiver<()>>,
}

impl BlockDev for GatedSync {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.inner.write_at(buf, offset)
    }
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps::default()
    }
    fn sync(&self) -> DevResult<()> {
        self.entered.lock().unwrap().send(()).unwrap();
        self.release.lock().unwrap().recv_timeout(Duration::from_secs(30)).unwrap();
        self.inner.sync()
    }
}

/// dm-log-writes semantics: a write that completes while the device sync of a FLUSH runs was
/// not necessarily covered by it, so its record must come after that FLUSH's marker. A marker
/// appended after the device sync would wrongly claim it durable at that flush.
#[test]
fn a_write_completing_during_a_flush_lands_after_its_marker() {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let gated = GatedSync {
        inner: MemDev::new(EXPORT),
        entered: StdMutex::new(entered_tx),
        release: StdMutex::new(release_rx),
    };
    let sink = MemSink::new(usize::MAX);
    let log = LogWriter::with_sink(Path::new("mem"), Box::new(sink.clone()), &header()).unwrap();
    let dev = Arc::new(RecordingDev::new(Arc::new(gated), Arc::new(log)));
    dev.write_at(&[1; 512], 0).unwrap();
    let flusher = {
        let dev = Arc::clone(&dev);
        std::thread::spawn(move || dev.sync())
    };
    entered_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    dev.write_at(&[2; 512], 512).unwrap();
    release_tx.send(()).unwrap();
    flusher.join().unwrap().unwrap();
    dev.log().sync_all().unwrap();
    let (_, entries, _) = decode_all(&sink.all()).unwrap();
    let order: Vec<String> = entries
        .iter()
        .map(|e| match &e.record {
            Record::Write { offset, .. } => format!("write@{offset}"),
            other => other.kind_name().to_string(),
        })
        .collect();
    assert_eq!(order, ["write@0", "flush", "write@512"]);
}

/// A device whose sync always fails (a dying disk).
#[derive(Debug)]
struct FailingSync(MemDev);

impl BlockDev for FailingSync {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.0.write_at(buf, offset)
    }
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps::default()
    }
    fn sync(&self) -> DevResult<()> {
        Err(DevError::Io {
            op: "sync",
            offset: 0,
            len: 0,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        })
    }
}

/// A FLUSH whose device sync fails is in the log already (its marker went first): a MARK
/// saying so must follow it and end the recording, so no replay trusts that flush.
#[test]
fn a_failed_device_sync_ends_the_log_with_a_mark_saying_so() {
    let sink = MemSink::new(usize::MAX);
    let log = LogWriter::with_sink(Path::new("mem"), Box::new(sink.clone()), &header()).unwrap();
    let dev = RecordingDev::new(Arc::new(FailingSync(MemDev::new(EXPORT))), Arc::new(log));
    dev.write_at(&[1; 512], 0).unwrap();
    assert!(dev.sync().is_err());
    assert!(dev.write_at(&[2; 512], 512).is_err(), "the recording must stop after a failed sync");
    let (_, entries, end) = decode_all(&sink.synced()).unwrap();
    assert_eq!(end.unwrap(), LogEnd::Clean);
    let kinds: Vec<&str> = entries.iter().map(|e| e.record.kind_name()).collect();
    assert_eq!(kinds, ["write", "flush", "mark"]);
    assert!(matches!(&entries[2].record, Record::Mark { name } if name.starts_with("flush 1 failed")));
}

/// A full log disk: the request whose record cannot be written fails with ENOSPC, and so does
/// every later write and flush; what the log holds is still a valid log.
#[test]
fn a_full_log_fails_writes_with_enospc_and_never_acknowledges_an_unrecorded_write() {
    let header_len = header().encode().unwrap().len();
    // Room for the header and two 4 KiB write records, not a third.
    let (_, dev, sink) = recording_mem(header_len + 2 * (RECORD_OVERHEAD + 8 + 4096) + 100);
    let mut acked = Vec::new();
    for i in 0..3u8 {
        let offset = u64::from(i) * 4096;
        if dev.write_at_fua(&[i + 1; 4096], offset).is_ok() {
            acked.push(offset);
        } else {
            break;
        }
    }
    assert_eq!(acked.len(), 2);
    let err = dev.write_at(&[9; 4096], 65536).unwrap_err();
    assert!(matches!(err, DevError::NoSpace(_)), "{err}");
    assert_eq!(err.nbd_errno(), libc::ENOSPC as u32);
    assert!(matches!(dev.sync(), Err(DevError::NoSpace(_))));
    let (_, entries, end) = decode_all(&sink.all()).unwrap();
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(end.unwrap(), LogEnd::Clean, "a failed write-out is cut back, the log stays clean");
}

// ---- the real server ----

/// Writes pseudo-random data through the client and into the model of the disk.
fn write(dev: &NbdDev, model: &mut [u8], offset: usize, len: usize, seed: u64) {
    let data = common::pseudo_random_bytes(len, seed);
    dev.write_at(&data, offset as u64).unwrap();
    model[offset..offset + len].copy_from_slice(&data);
}

/// A recording passthrough; its control socket goes next to the log unless `extra` names one
/// (tests run in parallel, and the default socket is one per working directory).
fn serve_recording(backing: &Path, log: &Path, extra: &[&str]) -> UbcacheServer {
    let socket = log.with_extension("ctl");
    let mut args = vec!["--backing", s(backing), "--listen", "127.0.0.1:0", "--record", s(log)];
    if !extra.contains(&"--ctl-socket") {
        args.extend_from_slice(&["--ctl-socket", s(&socket)]);
    }
    args.extend_from_slice(extra);
    UbcacheServer::start(&args)
}

/// The log after a SIGKILL holds every write acknowledged before the last completed FLUSH, in
/// order: replaying it up to that FLUSH gives exactly the client's view at that moment.
#[test]
fn the_log_survives_a_sigkill_with_every_write_flushed_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 4 << 20);
    let log = dir.path().join("rec.log");
    let mut server = serve_recording(&backing, &log, &[]);
    let client = NbdDev::connect(server.uri()).unwrap();
    let mut model = vec![0u8; 4 << 20];
    for i in 0..200u64 {
        let offset = ((i * 7919) % 900) as usize * 4096;
        write(&client, &mut model, offset, 4096 * (1 + (i % 3) as usize), i);
    }
    client.write_zeroes(0, 8192, true).unwrap();
    model[..8192].fill(0);
    client.sync().unwrap();
    let flushed = model.clone();
    // Writes after the flush: the log may or may not have them.
    for i in 0..20u64 {
        write(&client, &mut model, 4096 * i as usize, 4096, 1000 + i);
    }
    server.stop_with(libc::SIGKILL);
    drop(client);

    let (header, entries, _end) = read_log(&log);
    assert_eq!(header.export_size, 4 << 20);
    let flush = entries
        .iter()
        .position(|e| matches!(e.record, Record::Flush { number: 1 }))
        .expect("flush 1 in the log");
    let mut image = vec![0u8; 4 << 20];
    apply(&mut image, &entries[..flush]);
    assert!(image == flushed, "the log up to FLUSH 1 differs from what the client had written before it");
    assert!(replay_to(&log, &["--to-flush", "1"]) == flushed, "`ubcache replay --to-flush 1` differs");
}

#[test]
fn marks_go_in_the_log_over_the_control_socket_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let log = dir.path().join("rec.log");
    let sock = dir.path().join("ctl.sock");
    let mut server = serve_recording(&backing, &log, &["--ctl-socket", s(&sock)]);
    let client = NbdDev::connect(server.uri()).unwrap();
    client.write_at(&[1; 4096], 0).unwrap();
    let out = ubcache(&["mark", "after mkfs", "--ctl-socket", s(&sock)]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("at entry 1"), "{out:?}");
    client.write_at(&[2; 4096], 4096).unwrap();
    let out = ubcache(&["mark", "x", "--export", "nope", "--ctl-socket", s(&sock)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no export named \"nope\""), "{out:?}");
    drop(client);
    assert!(server.stop().success());
    let (_, entries, end) = read_log(&log);
    assert_eq!(end, LogEnd::Clean);
    assert_eq!(entries[1].record, Record::Mark { name: "after mkfs".into() });
    // A server that records nothing says so.
    let (backing2, cache) = common::format_pair(dir.path(), 4 << 20, 8 << 20);
    let sock2 = dir.path().join("ctl2.sock");
    let mut plain = UbcacheServer::start(&[
        "--cache",
        s(&cache),
        "--backing",
        s(&backing2),
        "--listen",
        "127.0.0.1:0",
        "--ctl-socket",
        s(&sock2),
    ]);
    let out = ubcache(&["mark", "x", "--ctl-socket", s(&sock2)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("recording is off"), "{out:?}");
    assert!(plain.stop().success());
}

#[test]
fn an_existing_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let log = make_file(dir.path(), "old.log", 10);
    let (code, stderr) = common::serve_expect_failure(&["--backing", s(&backing), "--record", s(&log)]);
    assert_ne!(code, 0);
    assert!(stderr.contains("earlier recording"), "{stderr}");
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 10, "the old log is untouched");
}

/// `ubcache replay LOG --out IMAGE END` and the image's bytes.
fn replay_to(log: &Path, end: &[&str]) -> Vec<u8> {
    let image = log.with_extension("replayed.img");
    let mut args = vec!["replay", s(log), "--out", s(&image), "--force"];
    args.extend_from_slice(end);
    let out = ubcache(&args);
    assert!(out.status.success(), "ubcache {args:?}: {out:?}");
    std::fs::read(&image).unwrap()
}

/// The image `ubcache replay --all` builds from a log.
fn replay_all(log: &Path) -> Vec<u8> {
    replay_to(log, &["--all"])
}

#[test]
fn qemu_io_writes_through_a_recording_export_replay_to_the_backing_file() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 16 << 20);
    let log = dir.path().join("rec.log");
    let mut server = serve_recording(&backing, &log, &[]);
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", server.uri()]);
    for c in [
        "write -P 0xab -f 0 64k",
        "write -P 0xcd 64k 4k",
        "write -P 0x11 -f 1M 1M",
        "write -P 0x22 3584 1024",
        "write -z 1M 128k",
        "flush",
        "discard 2M 64k",
        "write -P 0x33 16769024 8k",
    ] {
        cmd.args(["-c", c]);
    }
    let out = run_bounded(&mut cmd, common::TOOL_TIMEOUT);
    assert!(out.status.success(), "{out:?}");
    assert!(server.stop().success());
    assert!(
        replay_all(&log) == std::fs::read(&backing).unwrap(),
        "replay --all differs from the backing file"
    );
}

#[test]
fn fio_writes_through_a_recording_export_replay_to_the_backing_file() {
    if !require_tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 32 << 20);
    let log = dir.path().join("rec.log");
    let mut server = serve_recording(&backing, &log, &[]);
    let mut cmd = std::process::Command::new("fio");
    cmd.args([
        "--name=rec",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri()),
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--iodepth=16",
        "--size=32M",
        "--io_size=24M",
        "--fsync=50",
        "--randseed=7",
    ]);
    let out = run_bounded(&mut cmd, common::TOOL_TIMEOUT);
    assert!(out.status.success(), "{out:?}");
    assert!(server.stop().success());
    assert!(
        replay_all(&log) == std::fs::read(&backing).unwrap(),
        "replay --all differs from the backing file"
    );
}

/// A cached export in writeback mode records the same way: the replay equals what the export
/// reads (the backing file alone lacks the dirty data).
#[test]
fn a_cached_writeback_export_records_too() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = common::format_pair(dir.path(), 8 << 20, 8 << 20);
    let log = dir.path().join("rec.log");
    let mut server = UbcacheServer::start(&[
        "--cache",
        s(&cache),
        "--backing",
        s(&backing),
        "--mode",
        "writeback",
        "--listen",
        "127.0.0.1:0",
        "--record",
        s(&log),
        "--ctl-socket",
        s(&dir.path().join("ctl.sock")),
    ]);
    let client = NbdDev::connect(server.uri()).unwrap();
    for i in 0..64u64 {
        client.write_at(&common::pseudo_random_bytes(8192, i), (i * 40_960) % (7 << 20)).unwrap();
    }
    client.sync().unwrap();
    let mut served = vec![0u8; client.len() as usize];
    client.read_at(&mut served, 0).unwrap();
    drop(client);
    assert!(server.stop().success());
    assert!(replay_all(&log) == served, "replay differs from what the export reads");
}

/// End to end on a real tiny file system: when the log's disk fills, the client's write fails
/// with ENOSPC, the server says why, and the log holds every write that was acknowledged.
#[test]
fn a_log_disk_that_fills_fails_the_clients_write_with_enospc() {
    if !require_root("mounting a tiny tmpfs for the log") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tiny", s(&mnt)])
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let backing = make_file(dir.path(), "b.img", 4 << 20);
    let log = mnt.join("rec.log");
    let mut server = serve_recording(&backing, &log, &[]);
    let client = NbdDev::connect(server.uri()).unwrap();
    let mut acked = 0u64;
    let err = loop {
        let data = common::pseudo_random_bytes(16384, acked);
        match client.write_at_fua(&data, (acked * 16384) % (4 << 20)) {
            Ok(()) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 1000, "the 256 KiB log disk never filled");
    };
    assert!(matches!(err, DevError::NoSpace(_)), "{err}");
    server.stderr_with("No space left on device");
    drop(client);
    server.stop_with(libc::SIGKILL);
    let (_, entries, _) = read_log(&log);
    let writes = entries.iter().filter(|e| matches!(e.record, Record::Write { .. })).count() as u64;
    assert!(writes >= acked, "{acked} writes acknowledged but only {writes} in the log");
}
