//! Writing a batch of dirty keys home: [`CacheSet::write_back_scanned`] (and
//! [`CacheSet::write_back_keys`]) validate and pin the keys, copy them to backing
//! (`copy_runs`), sync backing and journal the keys clean. Every writer of dirty data home
//! runs this path: the background thread, the writeback drain, the engine's own
//! [`CacheSet::writeback_step`] (detach, leaving writeback mode, a full cache).
//!
//! # Crash ordering of [`CacheSet::write_back_keys`] (rules 4 and 6)
//! 1. The dirty keys (and with them the removal of the older clean keys they replaced) are
//!    durable before their data reaches backing. Otherwise a durable older clean key could
//!    survive a crash over backing that already holds newer data, and the sector's value would
//!    change later by itself, on eviction. [`CacheSet::write_back_scanned`] commits only when
//!    the journal is not yet durable up to the scan the keys came from
//!    ([`super::DirtyScan::journal_seq`]): a key still in the tree exactly as scanned was journalled
//!    at or before that seq (a new write gets new sectors, so an identical key is the same
//!    insertion). [`CacheSet::write_back_keys`] does not know the scan and commits everything.
//! 2. Take the writeback range lock of every coalesced write of the call (in (device, offset)
//!    order), *then* check under the metadata lock that every key is still in the tree exactly
//!    as scanned (and pin its bucket). The keys come from a key buffer filled earlier; a
//!    writethrough or bypass write may have written newer data to backing since. Such a write
//!    holds the range lock from its backing write to its tree update, so once we hold the lock
//!    and still find the key, no newer backing write of the range exists or can start until we
//!    are done: a stale copy can never land on backing after newer data. All keys are locked
//!    and checked before any data moves, so the copies can run back to back (`copy_runs`);
//!    a writethrough write into the call's ranges waits for the whole call.
//! 3. Copy the cached data to backing (in the kernel between buffered files, else through a
//!    buffer, with the backing writes on a second thread), sync every backing device written.
//! 4. Only then journal the keys clean with replace semantics: a key overwritten meanwhile (a
//!    writeback-mode write does not take the range lock) stays dirty and is written back later.
//!    Keys adjacent on backing and in one cache bucket are marked clean by one replace of the
//!    whole run (replace works sector by sector, so this is exactly one replace per key, with
//!    one journal entry instead of many, and leaves one clean key). The clean entries need no
//!    commit of their own: until one is durable the key is dirty after a crash and is written
//!    back again, which is harmless (backing already holds that data, and no newer backing
//!    write of the range can have happened while the key stayed in the tree, rule 2).
//!
//! # Foreground priority
//! Foreground reads need the metadata lock for their lookup, so writeback holds it only for
//! bounded chunks of CPU work (`META_CHUNK_KEYS` keys or runs at a time) and never across
//! data I/O or a journal commit (`Shared::commit_through` runs without it, see `set.rs`).
//!
//! # The copy
//! A drain is only as fast as the backing device if the device never waits for us, so:
//! - between two buffered files the kernel copies a run's pages from one page cache to the
//!   other (`copy_file_range`), no buffer of ours in between;
//! - otherwise a run is read from the cache into a page-aligned buffer (an `O_DIRECT` backing
//!   file writes it as it is, without a bounce copy) and written with one write. With more than
//!   one run, writer threads do the writes while this one reads the next run, so the device's
//!   write time and our read time overlap instead of adding up; short runs (random extents)
//!   get several writers, so several writes are in flight;
//! - a long run is queued for writeout as soon as it is written
//!   ([`crate::dev::BulkCopy::start_writeback`]): the disk writes it while the next one is
//!   copied, rather than all of the batch during the caller's sync.

use super::policy::{CoalesceLimits, DirtyExtent, coalesce};
use crate::alloc::AllocError;
use crate::cache::error::{CacheError, CacheResult};
use crate::cache::inflight::DevRange;
use crate::cache::set::{CacheSet, Meta, Shared};
use crate::cache::stats::Stats;
use crate::dev::SECTOR_SIZE;
use parking_lot::Mutex;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use ubcache_btree::{Key, Segment};

/// Keys validated or marked clean per hold of the metadata lock: a foreground read waits for
/// at most this much writeback bookkeeping (about a microsecond per key).
pub(crate) const META_CHUNK_KEYS: usize = 32;

/// What one [`CacheSet::write_back_keys`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WritebackReport {
    /// Keys written home and journalled clean (a key overwritten after its backing write is
    /// counted here too; it stays dirty in the tree).
    pub keys_written: usize,
    /// Keys skipped: overwritten, invalidated or reclaimed since the scan, not dirty, of a
    /// device not in this set, or overlapping an earlier key of the same call.
    pub keys_skipped: usize,
    /// Bytes written to backing.
    pub bytes_written: u64,
    /// Backing writes issued (contiguous keys are coalesced into one write).
    pub backing_writes: usize,
}

impl CacheSet {
    /// Writes `keys` home (see the module doc for the ordering): contiguous keys of one device
    /// are coalesced into one backing write within `limits` (in sectors). Keys no longer in the
    /// tree as given are skipped, so a key buffer filled earlier is safe to pass. Commits every
    /// pending journal entry first; [`CacheSet::write_back_scanned`] commits only when needed.
    pub fn write_back_keys(&self, keys: &[Key], limits: CoalesceLimits) -> CacheResult<WritebackReport> {
        self.shared.write_back_scanned(keys, u64::MAX, limits)
    }

    /// [`CacheSet::write_back_keys`] for keys that all come from scans whose
    /// [`super::DirtyScan::journal_seq`] is at most `scanned_seq`: the journal is committed first only
    /// if it is not yet durable through `scanned_seq` (rule 1 of the module doc). Passing a
    /// lower seq than the scan's breaks crash safety.
    pub fn write_back_scanned(
        &self,
        keys: &[Key],
        scanned_seq: u64,
        limits: CoalesceLimits,
    ) -> CacheResult<WritebackReport> {
        self.shared.write_back_scanned(keys, scanned_seq, limits)
    }
}

impl Shared {
    /// [`CacheSet::write_back_scanned`].
    pub(crate) fn write_back_scanned(
        &self,
        keys: &[Key],
        scanned_seq: u64,
        limits: CoalesceLimits,
    ) -> CacheResult<WritebackReport> {
        let sh = self;
        let mut report = WritebackReport::default();
        let mut wanted: Vec<Key> = keys
            .iter()
            .filter(|k| k.dirty && self.backings.iter().any(|b| b.dev_id == k.dev))
            .copied()
            .collect();
        report.keys_skipped += keys.len() - wanted.len();
        wanted.sort_by_key(|k| (k.dev, k.start()));
        // Keys of one scan never overlap; keys from two scans might. Keep the first of any
        // overlap (the other is re-read from the tree by a later scan).
        let mut sorted: Vec<Key> = Vec::with_capacity(wanted.len());
        for k in wanted {
            match sorted.last() {
                Some(p) if p.dev == k.dev && k.start() < p.end => report.keys_skipped += 1,
                _ => sorted.push(k),
            }
        }
        if sorted.is_empty() {
            return Ok(report);
        }
        // Rule (1) of the module doc.
        self.commit_through(scanned_seq)?;
        let extents: Vec<DirtyExtent> =
            sorted.iter().map(|k| (k.dev, k.start(), u64::from(k.size))).collect();
        let batches =
            coalesce(&extents, limits).map_err(|e| CacheError::Invalid(format!("writeback batch: {e}")))?;
        // Locks are taken in (device, offset) order; every other holder of several range locks
        // does the same, and foreground writers hold one at a time, so they cannot deadlock.
        let mut guards = Vec::with_capacity(batches.len());
        let mut segments = Vec::with_capacity(2 * META_CHUNK_KEYS);
        // The keys validated and pinned, and the contiguous runs they form (one backing write
        // each), in (device, offset) order.
        let mut valid: Vec<Key> = Vec::new();
        let mut runs: Vec<CopyRun> = Vec::new();
        let mut pins = Pins::default();
        for batch in batches {
            let Some(backing) = sh.backings.iter().position(|b| b.dev_id == batch.dev) else {
                report.keys_skipped += batch.extents.len();
                continue;
            };
            guards.push(sh.wb_locks.lock(DevRange {
                dev: batch.dev,
                start: batch.start,
                end: batch.start + batch.len,
            }));
            // Runs never span two batches: a batch is one range lock and at most one write.
            let first_run_of_batch = runs.len();
            // Rule (2): validate and pin under the lock, a chunk of keys per hold (a key
            // validated earlier stays pinned, and one overwritten meanwhile by a writeback-mode
            // write stays dirty by replace semantics in step 4).
            for chunk in sorted[batch.extents.clone()].chunks(META_CHUNK_KEYS) {
                let mut m = sh.lock_meta()?;
                // One lookup over the chunk's span (its keys are sorted, non-overlapping and of
                // one device): a key is still there exactly as scanned iff the segment that
                // starts where it starts is that key, as a lookup of the key's own range would
                // say (a new write gets new cache sectors, so the pointer tells insertions apart).
                let (Some(lo), Some(hi)) = (chunk.first(), chunk.last()) else { continue };
                m.tree.lookup_into(batch.dev, lo.start(), hi.end, &mut segments)?;
                let mut seg = 0;
                for k in chunk {
                    while segments.get(seg).is_some_and(|s| s.start() < k.start()) {
                        seg += 1;
                    }
                    if segments.get(seg) != Some(&Segment::Cached(*k)) {
                        report.keys_skipped += 1;
                        continue;
                    }
                    let extends =
                        runs.len() > first_run_of_batch && valid.last().is_some_and(|p| p.end == k.start());
                    // One pin per bucket and generation in a row: pins are all released
                    // after the last copy, so the pin an earlier key took covers this one.
                    if !pins.covers(sh.bucket_of(k.ptr.offset), k.ptr.generation) {
                        match m.alloc_mut().pin(k.ptr.offset, k.ptr.generation) {
                            Ok(b) => pins.push(b, k.ptr.generation),
                            Err(AllocError::Stale { .. }) => {
                                report.keys_skipped += 1;
                                continue;
                            }
                            Err(e) => {
                                pins.release(&mut m)?;
                                return sh.fail(e.into());
                            }
                        }
                    }
                    match runs.last_mut() {
                        Some(run) if extends => run.keys.end += 1,
                        _ => runs.push(CopyRun { backing, keys: valid.len()..valid.len() + 1 }),
                    }
                    valid.push(*k);
                }
            }
        }
        // Rule (3), first half: copy every run home. The pins keep the cached data where it is
        // until the copies are done, whatever happens.
        let copied = copy_runs(self, &runs, &valid);
        pins.release(&mut sh.meta.lock())?;
        copied?;
        let mut touched: Vec<usize> = runs.iter().map(|r| r.backing).collect();
        touched.dedup();
        report.backing_writes = runs.len();
        report.bytes_written = valid.iter().map(|k| u64::from(k.size) * SECTOR_SIZE).sum();
        let done = valid;
        // Rule (3): backing durable before any key is journalled clean.
        for &b in &touched {
            sh.backings[b].dev.sync()?;
        }
        // Rule (4), a chunk of runs per hold of the metadata lock. Keys that were written one
        // after another sit side by side on backing and in one cache bucket: such a run is
        // marked clean by one replace of the whole run, expecting the run's mapping. Replace
        // works sector by sector (a sector is replaced iff it is still mapped as expected), so
        // this does exactly what one replace per key does, with one lookup, one tree update
        // and one journal entry instead of one per key, and the run ends up as one clean key.
        let runs = self.clean_runs(&done);
        for chunk in runs.chunks(META_CHUNK_KEYS) {
            let mut m = sh.lock_meta()?;
            for dirty in chunk {
                let clean = Key { dirty: false, ..*dirty };
                if let Err(e) = sh.replace_locked(&mut m, clean, Some(dirty)) {
                    return sh.fail(e);
                }
                Stats::add(&sh.stats.written_back_bytes, u64::from(dirty.size) * SECTOR_SIZE);
            }
        }
        // The clean entries are committed when enough are pending (bounding the journal
        // buffer), without the metadata lock.
        if sh.wants_commit() {
            sh.commit()?;
        }
        drop(guards);
        report.keys_written = done.len();
        Ok(report)
    }

    /// `keys` (sorted, non-overlapping, dirty) merged into the fewest keys with the same
    /// sector-by-sector mapping: adjacent on one device, adjacent in the cache, of one
    /// generation and within one bucket (a key never spans buckets: buckets are reused one by
    /// one, and the allocator counts a key's sectors in the bucket its pointer names).
    fn clean_runs(&self, keys: &[Key]) -> Vec<Key> {
        let mut runs: Vec<Key> = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(run) = runs.last_mut()
                && run.dev == k.dev
                && run.end == k.start()
                && run.ptr.generation == k.ptr.generation
                && run.ptr.offset + u64::from(run.size) == k.ptr.offset
                && self.bucket_of(run.ptr.offset) == self.bucket_of(k.ptr.offset + u64::from(k.size) - 1)
                && let Some(size) = run.size.checked_add(k.size)
            {
                run.end = k.end;
                run.size = size;
                continue;
            }
            runs.push(*k);
        }
        runs
    }
}

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
        crate::dev::start_writeback(sh.backings[backing].dev.as_ref(), at, len)?;
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
            if !crate::dev::copy_in_kernel(backing.dev.as_ref(), sh.cache.as_ref(), from, at, n)? {
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
/// backing device says several writes help ([`crate::dev::DevCaps::parallel_writes`]: a
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
    let parallel_device = copies.iter().any(|c| sh.backings[c.backing].dev.capabilities().parallel_writes);
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
