//! One connection after the accept: handshake then transmission, the request reader and
//! the requests it runs.

use super::handshake::{Session, discard, handshake};
use super::reply::{
    BufPool, MAX_BLOCK_STATUS_EXTENTS, MAX_BLOCK_STATUS_LEN, Permits, Reply, ReplyBody, ReplySink,
    WriterState,
};
use super::{BoxRead, BoxWrite, ConnError, DeviceCalls, ExportState, Shared};
use crate::dev::{BlockDev, DevError};
use crate::nbd::proto::{self, ExportParams, Request, RequestHeader, errno};
use std::io;
use std::ops::Range;
use std::sync::Arc;
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

const READ_BUFFER: usize = 256 << 10;
const WRITE_BUFFER: usize = 256 << 10;

pub(super) async fn serve_connection(
    reader: BoxRead,
    mut writer: BoxWrite,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
    peer: String,
) {
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let negotiated = tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        r = tokio::time::timeout(shared.handshake_timeout, handshake(&mut reader, &mut writer, &shared)) => r,
    };
    let session = match negotiated {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            log::debug!("nbd: {peer}: handshake ended: {e}");
            return;
        }
        Err(_) => {
            log::debug!("nbd: {peer}: handshake timed out");
            return;
        }
    };
    if let Err(e) = transmission(reader, writer, &shared, session, stop).await {
        log::debug!("nbd: {peer}: connection closed: {e}");
    }
}

async fn transmission(
    mut reader: BufReader<BoxRead>,
    writer: BoxWrite,
    shared: &Shared,
    session: Session,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let Session { export, structured, block_status } = session;
    let pool = Arc::new(BufPool::default());
    let (kill_tx, kill_rx) = watch::channel(false);
    let sink = Arc::new(ReplySink {
        queue: parking_lot::Mutex::new(Vec::new()),
        writer: tokio::sync::Mutex::new(WriterState {
            out: Some(BufWriter::with_capacity(WRITE_BUFFER, writer)),
            spare: Vec::new(),
        }),
        pool: pool.clone(),
        kill: kill_rx,
    });
    let slots = Arc::new(Semaphore::new(shared.max_in_flight));
    let bytes = Arc::new(Semaphore::new(shared.max_buffer_bytes));
    let params = ExportParams {
        size: export.size,
        read_only: export.read_only,
        structured_replies: structured,
        block_status,
    };
    let conn = Conn {
        export: export.clone(),
        params,
        sink: sink.clone(),
        slots: slots.clone(),
        bytes,
        pool,
        max_in_flight: shared.max_in_flight,
        device_calls: shared.device_calls,
        min_hole_query_len: shared.min_hole_query_len,
        cheap_writes: shared.device_calls != DeviceCalls::BlockingPool
            && export.export.dev.capabilities().cheap_writes,
    };
    // The reader checks for shutdown between requests. A client that stops reading replies
    // can keep it waiting for an in-flight slot or in the middle of a payload, so shutdown also
    // gets a hard deadline here.
    let mut stop_deadline = stop.clone();
    let result = tokio::select! {
        r = conn.read_requests(&mut reader, &mut stop) => r,
        () = async {
            let _ = stop_deadline.wait_for(|s| *s).await;
            tokio::time::sleep(shared.shutdown_drain_timeout).await;
        } => Err(ConnError::Refused("shutdown deadline passed while reading a request")),
    };
    // Every request still running holds its slot until its reply is written: once all slots
    // are back, every reply has gone out.
    // Checked at configuration to fit a u32.
    let all_slots = u32::try_from(shared.max_in_flight).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(shared.shutdown_drain_timeout, async {
        // Replies the reader deferred, should the deadline have cut it short.
        sink.write_queued_replies().await;
        slots.acquire_many(all_slots).await
    })
    .await;
    if drained.is_err() {
        log::warn!("nbd: client did not read its replies in time; dropping the connection");
        let _ = kill_tx.send(true);
    }
    // A writer finishes its flush before it lets go of the lock.
    let mut writer = sink.writer.lock().await;
    if let (Some(mut out), Ok(_)) = (writer.out.take(), drained) {
        match tokio::time::timeout(shared.shutdown_drain_timeout, out.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::debug!("nbd: closing the connection: {e}"),
            Err(_) => log::debug!("nbd: closing the connection timed out"),
        }
    }
    result
}

/// What every request of one connection needs.
struct Conn {
    export: Arc<ExportState>,
    params: ExportParams,
    sink: Arc<ReplySink>,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    pool: Arc<BufPool>,
    max_in_flight: usize,
    device_calls: DeviceCalls,
    min_hole_query_len: u32,
    /// Non-FUA WRITEs run in the reader itself: the device says a write is a copy into memory
    /// ([`crate::dev::DevCaps::cheap_writes`]) and device calls are not meant for the blocking pool.
    /// A task per write would cost a spawn, a wake-up of another worker and a copy of the
    /// payload, more than the `pwrite` into the page cache itself.
    cheap_writes: bool,
}

/// The reader writes the replies of requests it ran itself when it is about to wait for the
/// client, so a burst of requests costs one `write` for all its replies. It does not hold more
/// than this many, so a long burst still gives the client replies to work on early.
const MAX_DEFERRED_REPLIES: usize = 16;

/// When more than this many bytes of later requests wait in the read buffer, the reader is
/// behind (its thread gets little CPU, or the client sends more than one thread can write):
/// writes then go to tasks like any other request, so idle workers take a share instead of
/// everything waiting for the one reader. A server that keeps up holds a request or two.
/// The value is a trade-off, measured on 2 cores, 4 KiB random writes at QD32 (IOPS on an idle
/// machine / with six CPU hogs running): 128 KiB (a QD32 backlog of 4 KiB writes never reaches
/// it) 174-180k / 51k; 64 KiB 148k / 80k (half the queue goes to tasks even when idle); a task
/// per write 132k / 64k. An idle server is the case to serve well; on a machine starved of CPU
/// one thread gets one share, which is why 128 KiB loses there.
const READER_BEHIND_BYTES: usize = 128 << 10;

impl Conn {
    /// Reads and starts requests until the client leaves or shutdown; then writes the replies
    /// the reader deferred (they hold in-flight slots the connection's drain waits for).
    async fn read_requests(
        &self,
        reader: &mut BufReader<BoxRead>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        let result = self.read_requests_until_done(reader, stop).await;
        self.sink.write_queued_replies().await;
        result
    }

    async fn read_requests_until_done(
        &self,
        reader: &mut BufReader<BoxRead>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        let mut hdr = [0u8; proto::REQUEST_HEADER_LEN];
        // Replies of requests the reader ran itself, queued but not written yet (see
        // `MAX_DEFERRED_REPLIES`).
        let mut deferred = 0usize;
        loop {
            if deferred > 0 && (reader.buffer().len() < hdr.len() || deferred >= MAX_DEFERRED_REPLIES) {
                // About to wait for the client (or enough replies piled up): send what we have.
                // (Replies of tasks are written by the tasks.)
                self.sink.write_queued_replies().await;
                deferred = 0;
            }
            // Only a whole header is a request; a client that vanishes mid-header or mid-payload
            // just ends its connection.
            let read = if reader.buffer().len() >= hdr.len() && !*stop.borrow() {
                // Already buffered (the common case under load): no need to watch for shutdown.
                reader.read_exact(&mut hdr).await
            } else {
                tokio::select! {
                    biased;
                    r = reader.read_exact(&mut hdr) => r,
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let header = RequestHeader::decode(&hdr)?;
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    // Every slot is taken; some may be held by replies only we would write.
                    self.sink.write_queued_replies().await;
                    deferred = 0;
                    let Ok(slot) = self.slots.clone().acquire_owned().await else { return Ok(()) };
                    slot
                }
            };
            let request = match proto::check_request(&header, &self.params) {
                Ok(r) => r,
                Err(rejection) => {
                    log::debug!("nbd: rejecting request {header:?}: {}", rejection.reason);
                    // The rest of a payload may take a while to come.
                    self.sink.write_queued_replies().await;
                    discard(reader, u64::from(header.payload_len())).await?;
                    // READ and BLOCK_STATUS answer in chunks once structured replies are on.
                    let chunked = [proto::Command::Read, proto::Command::BlockStatus]
                        .iter()
                        .any(|c| header.cmd_type == c.to_wire());
                    let body = if chunked && self.params.structured_replies {
                        ReplyBody::StructuredError {
                            errno: rejection.errno,
                            message: rejection.reason.to_owned(),
                        }
                    } else {
                        ReplyBody::Status { errno: rejection.errno }
                    };
                    self.sink.send(Reply { handle: header.handle, body, _permits: Some((slot, None)) }).await;
                    deferred = 0;
                    continue;
                }
            };
            if let Request::Write { offset, len, fua: false } = request
                && self.cheap_writes
                && reader.buffer().len().saturating_sub(len as usize) < READER_BEHIND_BYTES
            {
                let errno = self.write_in_reader(reader, offset, len as usize).await?;
                let body = ReplyBody::Status { errno };
                self.sink.defer(Reply { handle: header.handle, body, _permits: Some((slot, None)) });
                deferred += 1;
                continue;
            }
            let data_len = match request {
                Request::Disc => return Ok(()),
                Request::Read { len, .. } | Request::Write { len, .. } => len,
                _ => 0,
            };
            let mem = if data_len > 0 {
                // data_len <= MAX_PAYLOAD <= the semaphore's capacity, so this always completes.
                Some(self.acquire_bytes(data_len).await?)
            } else {
                None
            };
            let payload = if let Request::Write { len, .. } = request {
                let mut buf = self.pool.get(len as usize);
                if reader.buffer().len() < buf.len() {
                    // The rest of the payload may take a while to come.
                    self.sink.write_queued_replies().await;
                    deferred = 0;
                }
                read_payload(reader, &mut buf).await?;
                Some(buf)
            } else {
                None
            };
            let job = Job {
                export: self.export.clone(),
                handle: header.handle,
                request,
                payload,
                structured: self.params.structured_replies,
                min_hole_query_len: self.min_hole_query_len,
                permits: (slot, mem),
                pool: self.pool.clone(),
            };
            if self.dispatch(job, reader.buffer().len()).await {
                deferred += 1;
            }
        }
    }

    /// Payload-byte permits for a request, writing deferred replies first if it has to wait.
    async fn acquire_bytes(&self, len: u32) -> Result<OwnedSemaphorePermit, ConnError> {
        if let Ok(p) = self.bytes.clone().try_acquire_many_owned(len) {
            return Ok(p);
        }
        self.sink.write_queued_replies().await;
        self.bytes
            .clone()
            .acquire_many_owned(len)
            .await
            .map_err(|_| ConnError::Refused("payload semaphore closed"))
    }

    /// Runs a non-FUA WRITE of `len` payload bytes in the reader (see `cheap_writes`): straight
    /// from the read buffer when the whole payload is there (no copy, no buffer), otherwise
    /// through a pooled buffer. Returns the reply's errno.
    async fn write_in_reader(
        &self,
        reader: &mut BufReader<BoxRead>,
        offset: u64,
        len: usize,
    ) -> Result<u32, ConnError> {
        let dev = &*self.export.export.dev;
        let result = if reader.buffer().len() >= len {
            let result = dev.write_at(&reader.buffer()[..len], offset);
            std::pin::Pin::new(&mut *reader).consume(len);
            result
        } else {
            // `len` <= MAX_PAYLOAD, checked by `check_request`.
            let _mem = self.acquire_bytes(len as u32).await?;
            let mut buf = self.pool.get(len);
            // The rest of the payload may take a while to come.
            self.sink.write_queued_replies().await;
            read_payload(reader, &mut buf).await?;
            let result = dev.write_at(&buf, offset);
            self.pool.put(buf);
            result
        };
        Ok(result.map_or_else(|e| dev_errno(&e), |()| 0))
    }

    /// Runs a request where it costs least (see [`DeviceCalls`]); `buffered` is how many bytes
    /// of later requests the reader already holds. Returns whether the reply was deferred (the
    /// request ran in the reader and its reply waits in the queue for the reader to write it).
    async fn dispatch(&self, job: Job, buffered: usize) -> bool {
        let sink = self.sink.clone();
        match job.kind() {
            JobKind::Syncing => {
                // Waits for a sync without holding a worker (see `flush`).
                drop(tokio::spawn(async move { sink.send(job.run_syncing().await).await }));
            }
            JobKind::Durable => {
                // A FUA write waits for the disk inside the device call: on the blocking pool.
                drop(tokio::spawn(async move { sink.send(job.run_blocking().await).await }));
            }
            JobKind::Quick => match self.device_calls {
                DeviceCalls::Inline => {
                    sink.defer(job.run());
                    return true;
                }
                // The only request in flight, and no other one already received: run it here.
                // A task would cost a spawn and a wake-up of another worker, and nothing could
                // overlap with it anyway (QD1 latency). The reply goes out before the reader
                // waits for the next request.
                DeviceCalls::OnWorkers
                    if buffered < proto::REQUEST_HEADER_LEN
                        && self.slots.available_permits() + 1 >= self.max_in_flight =>
                {
                    sink.defer(job.run());
                    return true;
                }
                DeviceCalls::OnWorkers => drop(tokio::spawn(async move { sink.send(job.run()).await })),
                DeviceCalls::BlockingPool => {
                    drop(tokio::spawn(async move { sink.send(job.run_blocking().await).await }));
                }
            },
            JobKind::Other => match self.device_calls {
                DeviceCalls::BlockingPool => {
                    drop(tokio::spawn(async move { sink.send(job.run_blocking().await).await }));
                }
                DeviceCalls::OnWorkers | DeviceCalls::Inline => {
                    drop(tokio::spawn(async move { sink.send(job.run()).await }));
                }
            },
        }
        false
    }
}

/// A WRITE payload at least this long goes from the socket straight into its buffer, past the
/// reader's buffer: one copy less (128 KiB writes), at the cost of not reading the next request
/// ahead in the same system call, which matters only for small payloads.
const DIRECT_PAYLOAD_MIN: usize = 64 << 10;

/// Fills `buf` with the next bytes of the stream: first whatever the reader already buffered,
/// then, for a large rest, directly from the socket.
async fn read_payload(reader: &mut BufReader<BoxRead>, buf: &mut [u8]) -> io::Result<()> {
    let buffered = reader.buffer();
    if buffered.len() >= buf.len() || buf.len() - buffered.len() < DIRECT_PAYLOAD_MIN {
        reader.read_exact(buf).await?;
        return Ok(());
    }
    let n = buffered.len();
    buf[..n].copy_from_slice(buffered);
    std::pin::Pin::new(&mut *reader).consume(n);
    reader.get_mut().read_exact(&mut buf[n..]).await?;
    Ok(())
}

/// How a request runs (see [`Conn::dispatch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    /// READ, non-FUA WRITE, CACHE: a short device call (for page-cache hits).
    Quick,
    /// A FUA WRITE: the device call itself waits for the disk.
    Durable,
    /// FLUSH, and TRIM or WRITE_ZEROES with FUA: need a device sync.
    Syncing,
    /// TRIM and WRITE_ZEROES without FUA.
    Other,
}

struct Job {
    export: Arc<ExportState>,
    handle: u64,
    request: Request,
    payload: Option<Vec<u8>>,
    structured: bool,
    min_hole_query_len: u32,
    permits: Permits,
    pool: Arc<BufPool>,
}

impl Job {
    fn kind(&self) -> JobKind {
        match self.request {
            Request::Read { .. } | Request::Cache { .. } | Request::Write { fua: false, .. } => {
                JobKind::Quick
            }
            Request::Write { fua: true, .. } => JobKind::Durable,
            Request::Flush | Request::Trim { fua: true, .. } | Request::WriteZeroes { fua: true, .. } => {
                JobKind::Syncing
            }
            Request::Trim { .. }
            | Request::WriteZeroes { .. }
            | Request::BlockStatus { .. }
            | Request::Disc => JobKind::Other,
        }
    }

    /// Runs the device call on tokio's blocking pool. Should the device panic, the request is
    /// answered with EIO (its permits went down with the call).
    async fn run_blocking(self) -> Reply {
        let handle = self.handle;
        tokio::task::spawn_blocking(move || self.run()).await.unwrap_or_else(|e| {
            log::error!("nbd: device call failed: {e}");
            Reply { handle, body: ReplyBody::Status { errno: errno::EIO }, _permits: None }
        })
    }

    /// FLUSH, or TRIM/WRITE_ZEROES followed by a sync (FUA): the sync is shared with concurrent
    /// flushes of the export and runs off the workers.
    async fn run_syncing(mut self) -> Reply {
        let export = self.export.clone();
        let dev = &export.export.dev;
        let done = match self.request {
            Request::Flush => Ok(()),
            // Trim and zeroing are quick (hole punching) or bounded like a write.
            _ => match self.run_without_sync() {
                ReplyBody::Status { errno: 0 } => Ok(()),
                ReplyBody::Status { errno } => Err(errno),
                _ => Err(errno::EIO),
            },
        };
        // Only after the trim or zeroing has returned, so the sync covers it.
        let errno = match done {
            Ok(()) => export.syncer.sync(dev).await.err().unwrap_or(0),
            Err(errno) => errno,
        };
        Reply { handle: self.handle, body: ReplyBody::Status { errno }, _permits: Some(self.permits) }
    }

    /// Runs the device call synchronously and builds the reply.
    fn run(mut self) -> Reply {
        let body = match self.request {
            Request::Flush => {
                let dev = &*self.export.export.dev;
                ReplyBody::Status { errno: dev.sync().map_or_else(|e| dev_errno(&e), |()| 0) }
            }
            Request::Trim { fua: true, .. } | Request::WriteZeroes { fua: true, .. } => {
                match self.run_without_sync() {
                    ReplyBody::Status { errno: 0 } => {
                        let dev = &*self.export.export.dev;
                        ReplyBody::Status { errno: dev.sync().map_or_else(|e| dev_errno(&e), |()| 0) }
                    }
                    other => other,
                }
            }
            _ => self.run_without_sync(),
        };
        Reply { handle: self.handle, body, _permits: Some(self.permits) }
    }

    /// The device call of the request, without the sync a FUA trim or zeroing also needs.
    fn run_without_sync(&mut self) -> ReplyBody {
        let dev = &*self.export.export.dev;
        let status =
            |r: Result<(), DevError>| ReplyBody::Status { errno: r.map_or_else(|e| dev_errno(&e), |()| 0) };
        match self.request {
            Request::Read { offset, len, df } => self.read(dev, offset, len, df),
            Request::Write { offset, fua, .. } => {
                let buf = self.payload.take().unwrap_or_default();
                let r = if fua { dev.write_at_fua(&buf, offset) } else { dev.write_at(&buf, offset) };
                self.pool.put(buf);
                status(r)
            }
            Request::Flush => ReplyBody::Status { errno: 0 },
            Request::Trim { offset, len, .. } => status(dev.discard(offset, u64::from(len))),
            Request::Cache { offset, len } => status(dev.prefetch(offset, u64::from(len))),
            Request::WriteZeroes { offset, len, no_hole, fast_zero, .. } => {
                if fast_zero && !dev.capabilities().fast_zero {
                    // The client asked to fail rather than be slow.
                    ReplyBody::Status { errno: errno::ENOTSUP }
                } else {
                    status(dev.write_zeroes(offset, u64::from(len), !no_hole))
                }
            }
            Request::BlockStatus { offset, len, req_one } => self.block_status(dev, offset, len, req_one),
            // Handled by the reader; answered with EINVAL should it ever get here.
            Request::Disc => ReplyBody::Status { errno: errno::EINVAL },
        }
    }

    /// `base:allocation` extents from the device's known zero ranges: holes are HOLE|ZERO, the
    /// rest is reported as data (always correct). The reply may cover only a prefix of the
    /// range, as the spec allows, so the work per request stays bounded.
    fn block_status(&self, dev: &dyn BlockDev, offset: u64, len: u32, req_one: bool) -> ReplyBody {
        let len = len.min(MAX_BLOCK_STATUS_LEN);
        let end = offset + u64::from(len);
        let holes = match dev.known_zero_ranges(offset, u64::from(len)) {
            Ok(h) => sanitize_holes(h, offset..end),
            Err(e) => return ReplyBody::StructuredError { errno: dev_errno(&e), message: e.to_string() },
        };
        let hole_flags = proto::alloc_state::HOLE | proto::alloc_state::ZERO;
        let mut extents: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        for h in holes.iter().chain(std::iter::once(&(end..end))) {
            // Extent lengths are bounded by `len`, a u32.
            if h.start > pos {
                extents.push(((h.start - pos) as u32, 0));
            }
            if h.end > h.start {
                extents.push(((h.end - h.start) as u32, hole_flags));
            }
            pos = h.end;
            if extents.len() >= MAX_BLOCK_STATUS_EXTENTS {
                break;
            }
        }
        extents.truncate(if req_one { 1 } else { MAX_BLOCK_STATUS_EXTENTS });
        ReplyBody::BlockStatus { extents }
    }

    fn read(&self, dev: &dyn BlockDev, offset: u64, len: u32, df: bool) -> ReplyBody {
        let mut buf = self.pool.get(len as usize);
        let fail = |e: &DevError, buf: Vec<u8>| {
            self.pool.put(buf);
            if self.structured {
                ReplyBody::StructuredError { errno: dev_errno(e), message: e.to_string() }
            } else {
                ReplyBody::Status { errno: dev_errno(e) }
            }
        };
        let end = offset + u64::from(len);
        let holes = if self.structured && !df && len >= self.min_hole_query_len {
            match dev.known_zero_ranges(offset, u64::from(len)) {
                Ok(h) => sanitize_holes(h, offset..end),
                Err(e) => return fail(&e, buf),
            }
        } else {
            Vec::new()
        };
        // Read only the parts that are not known zeros.
        let mut pos = offset;
        for gap in holes.iter().map(|h| h.start..h.end).chain(std::iter::once(end..end)) {
            if gap.start > pos {
                let (a, b) = ((pos - offset) as usize, (gap.start - offset) as usize);
                if let Err(e) = dev.read_at(&mut buf[a..b], pos) {
                    return fail(&e, buf);
                }
            }
            pos = gap.end;
        }
        if self.structured {
            ReplyBody::StructuredRead { offset, buf, holes }
        } else {
            ReplyBody::SimpleData { buf }
        }
    }
}

/// Keeps only well-formed holes: within `bounds`, sorted, non-overlapping, non-empty. A device
/// that reports nonsense gets its data read instead of trusted.
fn sanitize_holes(holes: Vec<Range<u64>>, bounds: Range<u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(holes.len());
    for h in holes {
        let start = h.start.max(bounds.start);
        let end = h.end.min(bounds.end);
        if start >= end {
            continue;
        }
        if out.last().is_some_and(|last| start < last.end) {
            return Vec::new();
        }
        out.push(start..end);
    }
    out
}

fn dev_errno(e: &DevError) -> u32 {
    e.nbd_errno()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_clipped_and_nonsense_is_ignored() {
        assert_eq!(sanitize_holes(vec![0..10, 20..200], 5..100), vec![5..10, 20..100]);
        assert_eq!(sanitize_holes(vec![0..5, 100..200, 50..50], 5..100), Vec::<Range<u64>>::new());
        // Overlapping or unsorted ranges mean the device is confused: read everything instead.
        assert_eq!(sanitize_holes(vec![10..30, 20..40], 0..100), Vec::<Range<u64>>::new());
        assert_eq!(sanitize_holes(vec![50..60, 10..20], 0..100), Vec::<Range<u64>>::new());
    }
}
