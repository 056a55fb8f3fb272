//! Replies: the payload buffer pool, the reply queue any finisher drains, and the encoders.

use super::BoxWrite;
use crate::nbd::proto;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, watch};

/// A small per-connection pool of payload buffers, so steady-state I/O allocates nothing.
#[derive(Debug, Default)]
pub(super) struct BufPool {
    bufs: parking_lot::Mutex<Vec<Vec<u8>>>,
}

/// Buffers above this size are freed rather than pooled, so an idle connection holds little.
const POOLED_BUF_MAX: usize = 1 << 20;
const POOL_MAX_BUFS: usize = 64;

impl BufPool {
    /// A buffer of exactly `len` bytes. Bytes left from an earlier request are not cleared: every
    /// user overwrites the whole buffer (a payload read, a device read) before sending any of
    /// it, and a failed read sends no data, so stale bytes never reach a client.
    pub(super) fn get(&self, len: usize) -> Vec<u8> {
        let mut buf = self.bufs.lock().pop().unwrap_or_default();
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    pub(super) fn put(&self, buf: Vec<u8>) {
        if buf.capacity() <= POOLED_BUF_MAX {
            let mut bufs = self.bufs.lock();
            if bufs.len() < POOL_MAX_BUFS {
                bufs.push(buf);
            }
        }
    }
}

/// What goes out for one request. The permits ride along so in-flight limits are released only
/// once the reply has been written.
pub(super) struct Reply {
    pub(super) handle: u64,
    pub(super) body: ReplyBody,
    pub(super) _permits: Option<Permits>,
}

/// A request's in-flight slot and, for READ/WRITE, its payload bytes.
pub(super) type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

pub(super) enum ReplyBody {
    /// A simple reply without data (success or error of any command but a structured READ).
    Status { errno: u32 },
    /// READ data as a simple reply.
    SimpleData { buf: Vec<u8> },
    /// READ data as structured chunks: data chunks, hole chunks for `holes`, the last one DONE.
    StructuredRead { offset: u64, buf: Vec<u8>, holes: Vec<Range<u64>> },
    /// A structured error chunk (a failed READ when structured replies are on).
    StructuredError { errno: u32, message: String },
    /// `base:allocation` extents (length, flags) as one block status chunk.
    BlockStatus { extents: Vec<(u32, u32)> },
}

/// One BLOCK_STATUS reply describes at most this much of the export (clients ask again for the
/// rest), so one request cannot make the device walk a huge range.
pub(super) const MAX_BLOCK_STATUS_LEN: u32 = 1 << 30;
/// And at most this many extents (8 bytes each on the wire).
pub(super) const MAX_BLOCK_STATUS_EXTENTS: usize = 4096;

/// The reply side of a connection. Whoever finishes a request (a request task, or the reader
/// itself on the fast path) queues its reply and then tries to become the writer: the one that
/// gets the lock writes every queued reply into the buffered writer and flushes once the queue
/// is empty, so a burst of replies costs one system call; the others return at once. There is
/// no writer task, so an uncontended reply goes out without a task hand-off.
///
/// No reply is stranded: a reply is queued *before* its sender tries the lock, and the writer
/// looks at the queue again *after* releasing the lock, so either the sender gets the lock or
/// the writer sees the reply.
pub(super) struct ReplySink {
    pub(super) queue: parking_lot::Mutex<Vec<Reply>>,
    pub(super) writer: tokio::sync::Mutex<WriterState>,
    pub(super) pool: Arc<BufPool>,
    /// Set at shutdown when the client did not read its replies in time: a writer stuck on a
    /// full socket gives up, and the connection is dropped.
    pub(super) kill: watch::Receiver<bool>,
}

pub(super) struct WriterState {
    /// `None` once writing failed (the client is gone) or the connection was killed; replies
    /// are then dropped, which still releases their permits.
    pub(super) out: Option<BufWriter<BoxWrite>>,
    /// The queue's storage is swapped with this one, so draining allocates nothing.
    pub(super) spare: Vec<Reply>,
}

impl ReplySink {
    /// Queues a reply and writes it (and whatever else is queued) unless another writer is
    /// already at work, which will then write it.
    pub(super) async fn send(&self, reply: Reply) {
        self.defer(reply);
        self.write_queued_replies().await;
    }

    /// Queues a reply without writing it. Whoever defers must call
    /// [`ReplySink::write_queued_replies`] before it waits for anything: the reply holds an
    /// in-flight slot, and the client may be waiting for it before it sends more.
    pub(super) fn defer(&self, reply: Reply) {
        self.queue.lock().push(reply);
    }

    /// Writes every queued reply unless another writer is already at work, which will then
    /// write them (it looks at the queue again after it lets go of the lock).
    pub(super) async fn write_queued_replies(&self) {
        loop {
            let Ok(mut writer) = self.writer.try_lock() else { return };
            let mut kill = self.kill.clone();
            let written = tokio::select! {
                biased;
                r = self.write_queued(&mut writer) => r,
                _ = kill.wait_for(|k| *k) => Err(io::Error::other("replies not read before the shutdown deadline")),
            };
            if let Err(e) = written {
                log::debug!("nbd: writing replies failed: {e}");
                writer.out = None;
            }
            drop(writer);
            // A reply queued while we held the lock saw it taken and left its writing to us.
            if self.queue.lock().is_empty() {
                return;
            }
        }
    }

    async fn write_queued(&self, writer: &mut WriterState) -> io::Result<()> {
        let mut batch = std::mem::take(&mut writer.spare);
        loop {
            std::mem::swap(&mut batch, &mut *self.queue.lock());
            if batch.is_empty() {
                break;
            }
            let Some(out) = writer.out.as_mut() else {
                batch.clear();
                continue;
            };
            for reply in batch.drain(..) {
                write_reply(out, reply, &self.pool).await?;
            }
        }
        writer.spare = batch;
        match writer.out.as_mut() {
            Some(out) => out.flush().await,
            None => Ok(()),
        }
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(out: &mut W, reply: Reply, pool: &BufPool) -> io::Result<()> {
    let handle = reply.handle;
    match reply.body {
        ReplyBody::Status { errno } => {
            out.write_all(&proto::SimpleReply { errno, handle }.encode()).await?;
        }
        ReplyBody::SimpleData { buf } => {
            out.write_all(&proto::SimpleReply { errno: 0, handle }.encode()).await?;
            out.write_all(&buf).await?;
            pool.put(buf);
        }
        ReplyBody::StructuredRead { offset, buf, holes } => {
            write_structured_read(out, handle, offset, &buf, &holes).await?;
            pool.put(buf);
        }
        ReplyBody::StructuredError { errno, message } => {
            let payload = proto::encode_error_chunk_payload(errno, &message);
            let header = proto::ChunkHeader {
                flags: proto::chunk::FLAG_DONE,
                chunk_type: proto::chunk::TYPE_ERROR,
                handle,
                len: payload.len() as u32,
            };
            out.write_all(&header.encode()).await?;
            out.write_all(&payload).await?;
        }
        ReplyBody::BlockStatus { extents } => {
            let payload = proto::encode_block_status(proto::BASE_ALLOCATION_ID, &extents);
            let header = proto::ChunkHeader {
                flags: proto::chunk::FLAG_DONE,
                chunk_type: proto::chunk::TYPE_BLOCK_STATUS,
                handle,
                // At most 4 + 8 * MAX_BLOCK_STATUS_EXTENTS bytes.
                len: payload.len() as u32,
            };
            out.write_all(&header.encode()).await?;
            out.write_all(&payload).await?;
        }
    }
    Ok(())
}

/// Data and hole chunks in offset order; the last chunk carries DONE.
async fn write_structured_read<W: AsyncWrite + Unpin>(
    out: &mut W,
    handle: u64,
    offset: u64,
    buf: &[u8],
    holes: &[Range<u64>],
) -> io::Result<()> {
    let end = offset + buf.len() as u64;
    // Segments: (start, end, is_hole), covering offset..end.
    let mut segments: Vec<(u64, u64, bool)> = Vec::with_capacity(2 * holes.len() + 1);
    let mut pos = offset;
    for h in holes {
        if h.start > pos {
            segments.push((pos, h.start, false));
        }
        segments.push((h.start, h.end, true));
        pos = h.end;
    }
    if pos < end {
        segments.push((pos, end, false));
    }
    let last = segments.len().saturating_sub(1);
    for (i, &(start, stop, hole)) in segments.iter().enumerate() {
        let flags = if i == last { proto::chunk::FLAG_DONE } else { 0 };
        // Segment lengths are bounded by the request length (<= MAX_PAYLOAD).
        let seg_len = (stop - start) as u32;
        if hole {
            let header =
                proto::ChunkHeader { flags, chunk_type: proto::chunk::TYPE_OFFSET_HOLE, handle, len: 12 };
            out.write_all(&header.encode()).await?;
            out.write_all(&start.to_be_bytes()).await?;
            out.write_all(&seg_len.to_be_bytes()).await?;
        } else {
            let header = proto::ChunkHeader {
                flags,
                chunk_type: proto::chunk::TYPE_OFFSET_DATA,
                handle,
                len: 8 + seg_len,
            };
            out.write_all(&header.encode()).await?;
            out.write_all(&start.to_be_bytes()).await?;
            let (a, b) = ((start - offset) as usize, (stop - offset) as usize);
            out.write_all(&buf[a..b]).await?;
        }
    }
    Ok(())
}
