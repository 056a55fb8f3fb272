//! Writeback's data path: copies validated, pinned runs of dirty keys from the cache device to
//! their backing devices ([`copy_runs`], called by `Shared::write_back_scanned`,
//! which owns the crash ordering: see `wb_io.rs`). Nothing here is durable; the caller syncs.
//!
//! A flush is only as fast as the backing device if the device never waits for us, so:
//! - between two buffered files the kernel copies a run's pages from one page cache to the
//!   other (`copy_file_range`), no buffer of ours in between;
//! - otherwise a run is read from the cache into a page-aligned buffer (an `O_DIRECT` backing
//!   file writes it as it is, without a bounce copy) and written with one write. With more than
//!   one run, writer threads do the writes while this one reads the next run, so the device's
//!   write time and our read time overlap instead of adding up; short runs (random extents)
//!   get several writers, so several writes are in flight;
//! - a long run is queued for writeout as soon as it is written
//!   ([`crate::dev::BlockDev::start_writeback`]): the disk writes it while the next one is
//!   copied, rather than all of the batch during the caller's sync.

use super::error::{CacheError, CacheResult};
use super::set::{Meta, Shared};
use crate::dev::SECTOR_SIZE;
use parking_lot::Mutex;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use ubcache_btree::Key;

/// Alignment of writeback's backing-write buffers: the largest `O_DIRECT` alignment in common use.
const DIRECT_ALIGN: usize = 4096;

/// Runs at least this long are queued for writeout as soon as they are written. Shorter ones
/// (random 4 KiB extents) are left to the caller's sync, which can sort and merge them: a
/// writeout per 4 KiB run measured a third slower on random extents.
const START_WRITEBACK_MIN_BYTES: u64 = 256 << 10;

/// Keys `keys` of the caller's list of validated keys: contiguous on backing device
/// `backing` (an index into the set's backing devices), written with one backing write.
#[derive(Debug, Clone)]
pub(crate) struct CopyRun {
    pub(crate) backing: usize,
    pub(crate) keys: Range<usize>,
}

/// Buckets pinned for a writeback batch (pins keep a bucket from being reused while its data
/// is read), one per bucket and generation in a row of keys.
#[derive(Debug, Default)]
pub(crate) struct Pins {
    pinned: Vec<(u64, u8)>,
}

impl Pins {
    /// Whether the latest pin already holds `bucket` at `generation`.
    pub(crate) fn covers(&self, bucket: u64, generation: u8) -> bool {
        self.pinned.last() == Some(&(bucket, generation))
    }

    pub(crate) fn push(&mut self, bucket: u64, generation: u8) {
        self.pinned.push((bucket, generation));
    }

    /// Drops every pin; the first error is returned after all were tried.
    pub(crate) fn release(&mut self, m: &mut Meta) -> CacheResult<()> {
        let mut result = Ok(());
        for (bucket, _) in self.pinned.drain(..) {
            if let Err(e) = m.alloc_mut().unpin(bucket)
                && result.is_ok()
            {
                result = Err(e.into());
            }
        }
        result
    }
}

/// What is left of a run to copy through memory: cache pieces `(byte offset, bytes)` that are
/// contiguous on backing from byte `at` of backing device `backing`.
#[derive(Debug)]
struct MemCopy {
    backing: usize,
    at: u64,
    pieces: Vec<(u64, u64)>,
}

impl MemCopy {
    fn len(&self) -> usize {
        self.pieces.iter().map(|(_, n)| *n as usize).sum()
    }
}

/// A page-aligned buffer, reused from run to run (a fresh 1 MiB buffer per run costs its page
/// faults every time).
#[derive(Debug, Default)]
struct AlignedBuf {
    storage: Vec<u8>,
}

impl AlignedBuf {
    fn slice_mut(&mut self, n: usize) -> &mut [u8] {
        if self.storage.len() < n + DIRECT_ALIGN {
            self.storage = vec![0u8; n + DIRECT_ALIGN];
        }
        let skew = self.storage.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        &mut self.storage[skew..skew + n]
    }

    fn slice(&mut self, n: usize) -> &[u8] {
        self.slice_mut(n)
    }
}

/// `keys` (contiguous on backing) as pieces `(cache byte offset, bytes)` contiguous in the cache
/// too: keys written one after another usually sit one after another in the cache.
fn cache_pieces(keys: &[Key]) -> Vec<(u64, u64)> {
    let mut pieces: Vec<(u64, u64)> = Vec::new();
    for k in keys {
        let (from, len) = (k.ptr.offset * SECTOR_SIZE, u64::from(k.size) * SECTOR_SIZE);
        match pieces.last_mut() {
            Some((start, n)) if *start + *n == from => *n += len,
            _ => pieces.push((from, len)),
        }
    }
    pieces
}

fn start_writeback_if_long(sh: &Shared, backing: usize, at: u64, len: u64) -> CacheResult<()> {
    if len >= START_WRITEBACK_MIN_BYTES {
        sh.backings[backing].dev.start_writeback(at, len)?;
    }
    Ok(())
}

fn read_pieces(sh: &Shared, copy: &MemCopy, buf: &mut AlignedBuf) -> CacheResult<()> {
    let dst = buf.slice_mut(copy.len());
    let mut filled = 0usize;
    for &(from, n) in &copy.pieces {
        let n = n as usize;
        sh.cache.read_at(&mut dst[filled..filled + n], from)?;
        filled += n;
    }
    Ok(())
}

fn write_pieces(sh: &Shared, copy: &MemCopy, buf: &mut AlignedBuf) -> CacheResult<()> {
    let n = copy.len();
    sh.backings[copy.backing].dev.write_at(buf.slice(n), copy.at)?;
    start_writeback_if_long(sh, copy.backing, copy.at, n as u64)
}

/// Copies every run's cached data to its backing device (not durable: the caller syncs).
/// The runs' buckets must be pinned.
pub(crate) fn copy_runs(sh: &Shared, runs: &[CopyRun], keys: &[Key]) -> CacheResult<()> {
    let mut through_memory = Vec::new();
    for run in runs {
        let run_keys = &keys[run.keys.clone()];
        let Some(first) = run_keys.first() else { continue };
        let backing = &sh.backings[run.backing];
        let start = backing.data_offset + first.start() * SECTOR_SIZE;
        let pieces = cache_pieces(run_keys);
        let mut at = start;
        let mut in_kernel = 0;
        for &(from, n) in &pieces {
            if !backing.dev.copy_from(sh.cache.as_ref(), from, at, n)? {
                break;
            }
            at += n;
            in_kernel += 1;
        }
        if in_kernel == pieces.len() {
            start_writeback_if_long(sh, run.backing, start, at - start)?;
        } else {
            through_memory.push(MemCopy { backing: run.backing, at, pieces: pieces[in_kernel..].to_vec() });
        }
    }
    match through_memory.as_slice() {
        [] => Ok(()),
        [one] => {
            let mut buf = AlignedBuf::default();
            read_pieces(sh, one, &mut buf)?;
            write_pieces(sh, one, &mut buf)
        }
        many => copy_pipelined(sh, many),
    }
}

/// Backing writes in flight at once when the runs are short (random extents), or when the
/// backing device says several writes help ([`crate::dev::BlockDev::parallel_writes_help`]: a
/// remote volume): each write is a round trip to the device (a seek, a flash write, a network
/// request), and a device overlaps several of them. Otherwise long runs keep one writer, so
/// they reach the device in offset order (a disk writes them without seeking back).
const PARALLEL_WRITERS: usize = 4;

/// Runs shorter than this on average count as short (see [`PARALLEL_WRITERS`]).
const SHORT_RUN_BYTES: usize = 256 << 10;

/// How many writer threads copy `copies` (see [`PARALLEL_WRITERS`]).
fn writer_count(sh: &Shared, copies: &[MemCopy]) -> usize {
    let total: usize = copies.iter().map(MemCopy::len).sum();
    let short = total / copies.len().max(1) < SHORT_RUN_BYTES;
    let parallel_device = copies.iter().any(|c| sh.backings[c.backing].dev.parallel_writes_help());
    if short || parallel_device { PARALLEL_WRITERS.min(copies.len()) } else { 1 }
}

/// Copies through memory: this thread reads run `i + 1` from the cache while writer threads
/// write earlier runs to backing ([`writer_count`]). The runs are disjoint and all synced
/// before any is marked clean, so the order in which the writes complete does not matter.
/// Falls back to one thread if none can be started.
fn copy_pipelined(sh: &Shared, copies: &[MemCopy]) -> CacheResult<()> {
    let writers = writer_count(sh, copies);
    let stop = AtomicBool::new(false);
    let (to_writers, jobs) = mpsc::sync_channel::<(usize, AlignedBuf)>(writers);
    let jobs = Mutex::new(jobs);
    let (to_reader, returned) = mpsc::channel::<AlignedBuf>();
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(writers);
        for _ in 0..writers {
            let (jobs, to_reader, stop) = (&jobs, to_reader.clone(), &stop);
            let spawned = std::thread::Builder::new().name("ubcache-wb-write".into()).spawn_scoped(
                scope,
                move || -> CacheResult<()> {
                    let mut result = Ok(());
                    // Until the reader closes the queue. After a failure the remaining jobs are
                    // skipped, but every buffer still goes back: a reader waiting for one must
                    // get it, see `stop` and close the queue, or idle writers would wait forever.
                    // The lock is held only while waiting for the next job, not while writing.
                    loop {
                        // A statement of its own: in a `while let` the guard would live through
                        // the body and the writers would take turns.
                        let job = jobs.lock().recv();
                        let Ok((i, mut buf)) = job else { break };
                        if result.is_ok()
                            && !stop.load(Ordering::Acquire)
                            && let Err(e) = write_pieces(sh, &copies[i], &mut buf)
                        {
                            stop.store(true, Ordering::Release);
                            result = Err(e);
                        }
                        // The reader may have stopped already; then the buffer is simply dropped.
                        let _ = to_reader.send(buf);
                    }
                    result
                },
            );
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => log::warn!("writeback: no writer thread ({e}); {} writers", handles.len()),
            }
        }
        drop(to_reader);
        let mut read_result = Ok(());
        if handles.is_empty() {
            let mut buf = AlignedBuf::default();
            for copy in copies {
                read_pieces(sh, copy, &mut buf)?;
                write_pieces(sh, copy, &mut buf)?;
            }
            return Ok(());
        }
        let mut spare: Vec<AlignedBuf> = (0..=handles.len()).map(|_| AlignedBuf::default()).collect();
        for (i, copy) in copies.iter().enumerate() {
            // No buffer coming back means every writer stopped: their errors say why.
            let Some(mut buf) = spare.pop().or_else(|| returned.recv().ok()) else { break };
            if stop.load(Ordering::Acquire) {
                break;
            }
            if let Err(e) = read_pieces(sh, copy, &mut buf) {
                read_result = Err(e);
                break;
            }
            if to_writers.send((i, buf)).is_err() {
                break;
            }
        }
        drop(to_writers);
        let mut written = Ok(());
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(CacheError::Failed("writeback's backing writer thread panicked".into()))
            });
            if written.is_ok() {
                written = r;
            }
        }
        written.and(read_result)
    })
}
