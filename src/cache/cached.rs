//! The data path: one backing device served through the cache set as a [`BlockDev`].
//!
//! Every request follows the same shape: take the metadata lock to build a read mapping or to
//! allocate cache space, drop it for the data transfer, take it again to insert keys. Requests
//! that are not whole 512-byte sectors are served by read-modify-write of the partial sectors.

use super::error::{CacheError, CacheResult, Metadata};
use super::inflight::{DevRange, FillId};
use super::policy::{
    BypassReason, CacheMode, WriteRoute, read_bypass_reason, write_bypass_reason, write_route,
};
use super::set::{Backing, Meta, Shared};
use super::stats::Stats;
use crate::alloc::{AllocError, SectorAlloc};
use crate::dev::{BlockDev, DevCaps, DevError, DevResult, SECTOR_SIZE};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use ubcache_btree::{Key, Ptr, Segment};

/// Largest request handled in one piece; bigger ones are split (bounds buffers and key sizes).
const MAX_CHUNK_BYTES: u64 = 4 << 20;

/// One backing device of a cache set, served through the cache.
#[derive(Debug, Clone)]
pub struct CachedDev {
    pub(crate) shared: Arc<Shared>,
    pub(crate) backing: Arc<Backing>,
}

/// A piece of a read mapping after generation checks.
enum Piece {
    /// Cached data at `ptr` (bucket pinned).
    Hit { start: u64, end: u64, ptr: Ptr, bucket: u64 },
    /// Read from backing; `expected` is what the fill must find to insert (a stale key or none).
    Miss { start: u64, end: u64, expected: Option<Key>, fill: Option<FillId> },
}

/// What a backing-bound write does to the device.
#[derive(Clone, Copy)]
enum BackingOp<'a> {
    Write(&'a [u8]),
    Zeroes { may_unmap: bool },
    Discard,
}

impl CachedDev {
    /// The dev id keys of this device carry.
    #[must_use]
    pub fn dev_id(&self) -> u32 {
        self.backing.dev_id
    }

    /// The current cache mode.
    #[must_use]
    pub fn mode(&self) -> CacheMode {
        self.backing.mode()
    }

    /// Switches the cache mode at runtime. Leaving writeback with `write_back_first` writes
    /// every dirty key home first (otherwise dirty data stays cached and is still served).
    pub fn set_mode(&self, mode: CacheMode, write_back_first: bool) -> CacheResult<()> {
        self.shared.set_mode(&self.backing, mode, write_back_first)
    }

    /// Checks a request's range and says where it goes: through the cache, or (detached)
    /// straight to the backing device. Either way the request holds the device's gate (read)
    /// until it is done, so `detach` and `attach` (which take it to write) wait for requests in
    /// flight: none may still be adding dirty keys or marking the backing superblock Dirty
    /// once a detach has unbound the device. An uncontended read lock is one atomic add.
    fn route(&self, op: &'static str, offset: u64, len: u64) -> DevResult<Route<'_>> {
        DevError::check_range(op, offset, len, self.backing.export_len)?;
        let gate = self.backing.passthrough_gate.read();
        if self.backing.detached.load(Ordering::Acquire) {
            Ok(Route::Alone(Passthrough {
                dev: self.backing.dev.as_ref(),
                at: self.backing.data_offset,
                _gate: gate,
            }))
        } else {
            Ok(Route::Cache(gate))
        }
    }

    /// Reads whole sectors (`offset` and `buf.len()` multiples of 512); says whether any
    /// missing data was brought into the cache.
    fn read_aligned(&self, buf: &mut [u8], offset: u64, force_fill: bool) -> CacheResult<bool> {
        let mut done = 0usize;
        let mut filled = false;
        for (off, n) in Self::chunks(offset, buf.len() as u64) {
            filled |= self.read_sectors(&mut buf[done..done + n as usize], off / SECTOR_SIZE, force_fill)?;
            done += n as usize;
        }
        Ok(filled)
    }

    /// Writes whole sectors; with `fua` one commit at the end covers every chunk.
    fn write_aligned(&self, buf: &[u8], offset: u64, fua: bool) -> CacheResult<()> {
        let mut done = 0usize;
        let chunks: Vec<_> = Self::chunks(offset, buf.len() as u64).collect();
        let last = chunks.len().saturating_sub(1);
        for (i, (off, n)) in chunks.into_iter().enumerate() {
            self.write_sectors(&buf[done..done + n as usize], off / SECTOR_SIZE, fua && i == last)?;
            done += n as usize;
        }
        Ok(())
    }

    /// Any write: whole sectors directly; a partial first or last sector by read-modify-write,
    /// under the device's RMW range lock (which every write holds) so no other write to those
    /// sectors can slip between the read and the write.
    fn write_any(&self, buf: &[u8], offset: u64, fua: bool) -> CacheResult<()> {
        let len = buf.len() as u64;
        let (a, e) = span(offset, len);
        let _rmw = self.backing.rmw_locks.lock(self.range(a / SECTOR_SIZE, e / SECTOR_SIZE));
        if a == offset && e == offset + len {
            return self.write_aligned(buf, offset, fua);
        }
        let sector = SECTOR_SIZE as usize;
        let mut tmp = vec![0u8; (e - a) as usize];
        if offset != a {
            self.read_aligned(&mut tmp[..sector], a, false)?;
        }
        let tail = tmp.len() - sector;
        if offset + len != e && (tail != 0 || offset == a) {
            self.read_aligned(&mut tmp[tail..], e - SECTOR_SIZE, false)?;
        }
        let from = (offset - a) as usize;
        tmp[from..from + buf.len()].copy_from_slice(buf);
        self.write_aligned(&tmp, a, fua)
    }

    fn range(&self, start: u64, end: u64) -> DevRange {
        DevRange { dev: self.backing.dev_id, start, end }
    }

    fn backing_offset(&self, sector: u64) -> u64 {
        self.backing.data_offset + sector * SECTOR_SIZE
    }

    /// Reads `buf` at sector `start`; `force_fill` caches misses even past the sequential
    /// cutoff (NBD CACHE). Says whether any missing data was brought into the cache.
    fn read_sectors(&self, buf: &mut [u8], start: u64, force_fill: bool) -> CacheResult<bool> {
        let end = start + buf.len() as u64 / SECTOR_SIZE;
        let dev = self.backing.dev_id;
        let mode = self.mode();
        let bypass = if force_fill && mode != CacheMode::None {
            None
        } else {
            let (stream, sequential) = self.shared.observe_stream(dev, start * SECTOR_SIZE, buf.len() as u64);
            // Only a read that is not already bypassing asks about congestion (cheap anyway).
            let congested = !sequential && self.shared.read_congested(stream);
            read_bypass_reason(mode, sequential, congested)
        };
        let fill = bypass.is_none();
        let mut pieces = Vec::new();
        {
            let mut m = self.shared.lock_meta()?;
            let segs = m.tree.lookup(dev, start, end)?;
            check_mapping(&segs, start, end)?;
            for seg in segs {
                match seg {
                    Segment::Cached(k) => match m.alloc_mut().pin(k.ptr.offset, k.ptr.generation) {
                        Ok(bucket) => {
                            m.alloc_mut().touch(bucket);
                            pieces.push(Piece::Hit { start: k.start(), end: k.end, ptr: k.ptr, bucket });
                        }
                        Err(AllocError::Stale { .. }) => {
                            let id = fill.then(|| m.fills.register(self.range(k.start(), k.end)));
                            pieces.push(Piece::Miss {
                                start: k.start(),
                                end: k.end,
                                expected: Some(k),
                                fill: id,
                            });
                        }
                        Err(e) => return self.shared.fail(e.into()),
                    },
                    Segment::Hole { start, end } => {
                        let id = fill.then(|| m.fills.register(self.range(start, end)));
                        pieces.push(Piece::Miss { start, end, expected: None, fill: id });
                    }
                }
            }
        }
        // Data I/O outside the lock. Every pin and fill registration is released below, on
        // success and on error.
        let mut result: CacheResult<()> = Ok(());
        for p in &pieces {
            let (s, e) = match p {
                Piece::Hit { start, end, .. } | Piece::Miss { start, end, .. } => (*start, *end),
            };
            let part = &mut buf[((s - start) * SECTOR_SIZE) as usize..((e - start) * SECTOR_SIZE) as usize];
            let r = match p {
                Piece::Hit { ptr, .. } => {
                    Stats::add(&self.shared.stats.read_hits, e - s);
                    self.shared.read_cache(part, ptr.offset)
                }
                Piece::Miss { .. } => {
                    Stats::add(&self.shared.stats.read_misses, e - s);
                    self.backing.dev.read_at(part, self.backing_offset(s))
                }
            };
            if let Err(err) = r {
                result = Err(err.into());
                break;
            }
        }
        {
            let mut m = self.shared.lock_meta_to_release();
            for p in &pieces {
                if let Piece::Hit { bucket, .. } = p {
                    m.alloc_mut().unpin(*bucket)?;
                }
            }
            if result.is_err() {
                for p in &pieces {
                    if let Piece::Miss { fill: Some(id), .. } = p {
                        m.fills.finish(*id);
                    }
                }
            }
        }
        result?;
        if !fill {
            Stats::add(&self.shared.stats.read_bypassed, 1);
        }
        // A bypass reason counts only when something was read from backing without filling.
        if let Some(reason) = bypass
            && pieces.iter().any(|p| matches!(p, Piece::Miss { .. }))
        {
            self.shared.stats.bypassed(reason);
        }
        // The data read is right whatever happens to the fills: a failed fill is logged, not
        // returned, and every registered fill is finished.
        let (mut no_space, mut any_filled) = (false, false);
        for p in pieces {
            if let Piece::Miss { start: s, end: e, expected, fill: Some(id) } = p {
                let data = &buf[((s - start) * SECTOR_SIZE) as usize..((e - start) * SECTOR_SIZE) as usize];
                match self.fill(id, s, e, expected, data) {
                    Ok(filled) => {
                        no_space |= !filled;
                        any_filled |= filled;
                    }
                    Err(err) => {
                        self.shared.lock_meta_to_release().fills.finish(id);
                        log::warn!(
                            "cache fill of dev {} sectors {s}..{e} failed: {err}",
                            self.backing.dev_id
                        );
                    }
                }
            }
        }
        // One request, one reason, however many of its pieces found no space.
        if no_space {
            self.shared.stats.bypassed(BypassReason::Full);
        }
        Ok(any_filled)
    }

    /// Inserts data read from backing into the cache with replace semantics: dropped if a write
    /// or invalidation touched the range meanwhile (collision).
    /// Returns `false` when no cache space could be freed for it (the fill was skipped).
    fn fill(
        &self,
        id: FillId,
        start: u64,
        end: u64,
        expected: Option<Key>,
        data: &[u8],
    ) -> CacheResult<bool> {
        let allocs = {
            let mut m = self.shared.lock_meta()?;
            match self.shared.alloc_extents_locked(&mut m, end - start)? {
                Some(a) => a,
                None => {
                    // No clean space: skip the fill (a read never waits for writeback).
                    m.fills.finish(id);
                    return Ok(false);
                }
            }
        };
        let written = self.write_extents(&allocs, data);
        let mut m = self.shared.lock_meta()?;
        let collided = m.fills.finish(id);
        let mut result = Ok(());
        if written.is_ok() && !collided {
            let mut at = start;
            for a in &allocs {
                let key = Key::new(
                    self.backing.dev_id,
                    at,
                    a.sectors,
                    Ptr { offset: a.offset, generation: a.generation },
                    false,
                );
                let exp = expected.map(|k| k.slice(at, at + u64::from(a.sectors)));
                match self.shared.replace_locked(&mut m, key, exp.as_ref()) {
                    Ok(c) if c > 0 => Stats::add(&self.shared.stats.collisions, 1),
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                at += u64::from(a.sectors);
            }
        } else if collided {
            Stats::add(&self.shared.stats.collisions, 1);
        }
        m.unpin_allocs(&allocs)?;
        if let Err(e) = result {
            return self.shared.fail(e);
        }
        written?;
        self.shared.unlock_and_commit(m, false)?;
        Ok(true)
    }

    fn write_extents(&self, allocs: &[SectorAlloc], data: &[u8]) -> CacheResult<()> {
        let mut at = 0usize;
        for a in allocs {
            let n = a.sectors as usize * SECTOR_SIZE as usize;
            self.shared.write_cache(&data[at..at + n], a.offset)?;
            at += n;
        }
        Ok(())
    }

    /// Whether any sector of the range is cached dirty.
    fn overlaps_dirty(&self, start: u64, end: u64) -> CacheResult<bool> {
        let mut m = self.shared.lock_meta()?;
        let segs = m.tree.lookup(self.backing.dev_id, start, end)?;
        Ok(segs.iter().any(|s| matches!(s, Segment::Cached(k) if k.dirty)))
    }

    fn write_sectors(&self, data: &[u8], start: u64, fua: bool) -> CacheResult<()> {
        let end = start + data.len() as u64 / SECTOR_SIZE;
        let mode = self.mode();
        let (stream, sequential) =
            self.shared.observe_stream(self.backing.dev_id, start * SECTOR_SIZE, data.len() as u64);
        let caching_mode = matches!(mode, CacheMode::Writeback | CacheMode::Writethrough);
        let congested = caching_mode && !sequential && self.shared.write_congested(stream);
        let bypass = write_bypass_reason(mode, sequential, congested);
        // A bypassing write over dirty data stays in the cache in writeback mode (see
        // `write_route`): the same rule for a sequential and a congestion bypass.
        let dirty = mode == CacheMode::Writeback && bypass.is_some() && self.overlaps_dirty(start, end)?;
        match write_route(mode, bypass.is_some(), dirty) {
            WriteRoute::CacheDirty => self.write_cached(data, start, true, fua),
            WriteRoute::CacheAndBacking => self.write_cached(data, start, false, fua),
            WriteRoute::Backing => {
                if let Some(reason) = bypass {
                    self.shared.stats.bypassed(reason);
                }
                self.write_backing(BackingOp::Write(data), start, end, fua)
            }
        }
    }

    /// Writes into the cache (dirty: writeback; clean: writethrough, also to backing).
    fn write_cached(&self, data: &[u8], start: u64, dirty: bool, fua: bool) -> CacheResult<()> {
        let end = start + data.len() as u64 / SECTOR_SIZE;
        // Cache full of dirty data: write some back, then try again; as a last resort send the
        // write to backing (rule 6 fallback), which is correct in every mode.
        let mut allocs = None;
        for attempt in 0..3 {
            {
                let mut m = self.shared.lock_meta()?;
                allocs = self.shared.alloc_extents_locked(&mut m, end - start)?;
            }
            if allocs.is_some() || attempt == 2 {
                break;
            }
            if self.shared.writeback_step(16)? == 0 {
                break;
            }
        }
        let Some(allocs) = allocs else {
            Stats::add(&self.shared.stats.full_fallbacks, 1);
            self.shared.stats.bypassed(BypassReason::Full);
            return self.write_backing(BackingOp::Write(data), start, end, fua);
        };
        if dirty && let Err(e) = self.shared.begin_dirty_write(&self.backing) {
            self.unpin_all(&allocs)?;
            return Err(e);
        }
        let result = self.write_cached_inner(data, start, end, dirty, fua, &allocs);
        if dirty {
            self.shared.end_dirty_write(&self.backing);
        }
        result
    }

    fn unpin_all(&self, allocs: &[SectorAlloc]) -> CacheResult<()> {
        let mut m = self.shared.lock_meta_to_release();
        m.unpin_allocs(allocs)?;
        Ok(())
    }

    fn write_cached_inner(
        &self,
        data: &[u8],
        start: u64,
        end: u64,
        dirty: bool,
        fua: bool,
        allocs: &[SectorAlloc],
    ) -> CacheResult<()> {
        let mut io = self.write_extents(allocs, data);
        let _guard;
        if !dirty && io.is_ok() {
            // Writethrough: backing too, under the writeback range lock (rule 6), after the
            // clean cached copy of the range is durably invalidated.
            _guard = self.shared.lock_backing_range(self.range(start, end));
            {
                let mut m = self.shared.lock_meta()?;
                if let Err(e) = self.prepare_backing_write(&mut m, start, end) {
                    drop(m);
                    self.unpin_all(allocs)?;
                    return self.shared.fail(e);
                }
            }
            io = self.backing.dev.write_at(data, self.backing_offset(start)).map_err(CacheError::from);
            self.backing.sync_state.note_write();
        }
        let mut m = self.shared.lock_meta()?;
        let mut result = io;
        if result.is_ok() {
            m.fills.collide(self.range(start, end));
            let mut at = start;
            for a in allocs {
                let key = Key::new(
                    self.backing.dev_id,
                    at,
                    a.sectors,
                    Ptr { offset: a.offset, generation: a.generation },
                    dirty,
                );
                if let Err(e) = self.shared.insert_locked(&mut m, key) {
                    result = Err(e);
                    break;
                }
                at += u64::from(a.sectors);
            }
        }
        m.unpin_allocs(allocs)?;
        match result {
            Ok(()) => {}
            Err(e @ CacheError::Dev(_)) => return Err(e),
            Err(e) => return self.shared.fail(e),
        }
        Stats::add(&self.shared.stats.write_cached, 1);
        // Committed without the metadata lock, so reads go on during the syncs.
        self.shared.unlock_and_commit(m, fua)
    }

    /// A write (or zeroing, or discard) that goes to backing, not into the cache. Holds the
    /// writeback range lock so an in-flight writeback of older data cannot land after it.
    ///
    /// Clean cached data of the range is invalidated *durably* before the backing write (see
    /// [`CachedDev::prepare_backing_write`]). Dirty cached data is dropped only *after* the
    /// new data is durable on backing, otherwise a crash could resurrect the backing copy older
    /// than the dirty one. Discard leaves dirty data alone (it is advisory) and skips those
    /// sectors.
    fn write_backing(&self, op: BackingOp<'_>, start: u64, end: u64, fua: bool) -> CacheResult<()> {
        let _guard = self.shared.lock_backing_range(self.range(start, end));
        let dev = self.backing.dev_id;
        // Sub-ranges to send to backing (discard skips dirty ones).
        let mut targets = vec![(start, end)];
        let has_dirty;
        {
            let mut m = self.shared.lock_meta()?;
            let r = self.prepare_backing_write(&mut m, start, end);
            has_dirty = match r {
                Ok(d) => d,
                Err(e) => return self.shared.fail(e),
            };
            m.fills.collide(self.range(start, end));
            if matches!(op, BackingOp::Discard) && has_dirty {
                // Discard is advisory: dirty sectors keep their data and are not discarded.
                let segs = m.tree.lookup(dev, start, end)?;
                check_mapping(&segs, start, end)?;
                targets = segs
                    .iter()
                    .filter(|s| !matches!(s, Segment::Cached(k) if k.dirty))
                    .map(|s| (s.start(), s.end()))
                    .collect();
            }
        }
        for &(s, e) in &targets {
            let off = self.backing_offset(s);
            let len = (e - s) * SECTOR_SIZE;
            let r = match op {
                BackingOp::Write(data) => {
                    let from = ((s - start) * SECTOR_SIZE) as usize;
                    self.backing.dev.write_at(&data[from..from + len as usize], off)
                }
                BackingOp::Zeroes { may_unmap } => self.backing.dev.write_zeroes(off, len, may_unmap),
                BackingOp::Discard => self.backing.dev.discard(off, len),
            };
            self.backing.sync_state.note_write();
            r?;
        }
        let replaces_dirty = has_dirty && !matches!(op, BackingOp::Discard);
        if replaces_dirty {
            self.backing.dev.sync()?;
        }
        let mut m = self.shared.lock_meta()?;
        // Fills that read backing while it was being written may hold old data.
        m.fills.collide(self.range(start, end));
        if replaces_dirty && let Err(e) = self.shared.invalidate_locked(&mut m, dev, start, end) {
            return self.shared.fail(e);
        }
        Stats::add(&self.shared.stats.write_bypassed, 1);
        // Committed without the metadata lock, so reads go on during the syncs.
        self.shared.unlock_and_commit(m, fua)
    }

    /// Prepares a range for a write to backing: invalidates every *clean* cached piece of it
    /// and, if any piece was cached at all, commits the journal before returning. Returns
    /// whether dirty pieces remain.
    ///
    /// Why commit: a clean key claims "cache equals backing". If the backing write could become
    /// durable while a clean key over the range is still durable, a crash would leave the cache
    /// serving the old data and later (after eviction) backing serving the new one: a value that
    /// changes with no write. The durable clean key may also hide under a newer key that is not
    /// yet durable (a dirty write over an older fill), so every pending entry is committed, not
    /// only the invalidation. A durable *dirty* key over the range is harmless: after a crash it
    /// wins and is written back over whatever backing holds. Cost: one journal commit per backing
    /// write over cached data with entries pending.
    fn prepare_backing_write(&self, m: &mut Meta, start: u64, end: u64) -> CacheResult<bool> {
        let dev = self.backing.dev_id;
        let segs = m.tree.lookup(dev, start, end)?;
        let mut has_dirty = false;
        let mut cached = false;
        for seg in segs {
            if let Segment::Cached(k) = seg {
                cached = true;
                if k.dirty {
                    has_dirty = true;
                } else {
                    self.shared.invalidate_locked(m, dev, k.start(), k.end)?;
                }
            }
        }
        if cached {
            self.shared.commit_locked(m)?;
        }
        Ok(has_dirty)
    }

    fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let mut at = 0;
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            let n = MAX_CHUNK_BYTES.min(len - at);
            let item = (offset + at, n);
            at += n;
            Some(item)
        })
    }
}

/// The read mapping must cover exactly `[start, end)`, in order, without gaps: the data copy
/// below slices the buffer by it, so a btree bug becomes an error here, not a panic there.
fn check_mapping(segs: &[Segment], start: u64, end: u64) -> CacheResult<()> {
    let mut at = start;
    for s in segs {
        if s.start() != at || s.end() <= s.start() || s.end() > end {
            return Err(CacheError::corrupted(
                Metadata::Btree,
                format!(
                    "read mapping of [{start}, {end}) has segment [{}, {}) where sector {at} was expected",
                    s.start(),
                    s.end()
                ),
            ));
        }
        at = s.end();
    }
    if at != end {
        return Err(CacheError::corrupted(
            Metadata::Btree,
            format!("read mapping of [{start}, {end}) ends at {at}"),
        ));
    }
    Ok(())
}

impl BlockDev for CachedDev {
    fn len(&self) -> u64 {
        self.backing.export_len
    }

    /// None of the hints: a write may wait for the cache engine's locks and I/O, and zeroing
    /// writes zeros through the cache.
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps::default()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let len = buf.len() as u64;
        let _gate = match self.route("read", offset, len)? {
            Route::Alone(p) => return p.dev.read_at(buf, p.at + offset),
            Route::Cache(gate) => gate,
        };
        let (a, e) = span(offset, len);
        if a == offset && e == offset + len {
            self.read_aligned(buf, offset, false)?;
            return Ok(());
        }
        let mut tmp = vec![0u8; (e - a) as usize];
        self.read_aligned(&mut tmp, a, false)?;
        let from = (offset - a) as usize;
        buf.copy_from_slice(&tmp[from..from + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let _gate = match self.route("write", offset, buf.len() as u64)? {
            Route::Alone(p) => return p.dev.write_at(buf, p.at + offset),
            Route::Cache(gate) => gate,
        };
        Ok(self.write_any(buf, offset, false)?)
    }

    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let _gate = match self.route("write", offset, buf.len() as u64)? {
            Route::Alone(p) => return p.dev.write_at_fua(buf, p.at + offset),
            Route::Cache(gate) => gate,
        };
        Ok(self.write_any(buf, offset, true)?)
    }

    fn sync(&self) -> DevResult<()> {
        let _gate = match self.route("sync", 0, 0)? {
            Route::Alone(p) => return p.dev.sync(),
            Route::Cache(gate) => gate,
        };
        Ok(self.shared.commit()?)
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        let _gate = match self.route("discard", offset, len)? {
            Route::Alone(p) => return p.dev.discard(p.at + offset, len),
            Route::Cache(gate) => gate,
        };
        // Advisory: only the whole sectors inside the range are discarded.
        let start = offset.div_ceil(SECTOR_SIZE);
        let end = (offset + len) / SECTOR_SIZE;
        if start < end {
            self.write_backing(BackingOp::Discard, start, end, false)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        let _gate = match self.route("write_zeroes", offset, len)? {
            Route::Alone(p) => return p.dev.write_zeroes(p.at + offset, len, may_unmap),
            Route::Cache(gate) => gate,
        };
        let first = offset.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let last = (offset + len) / SECTOR_SIZE * SECTOR_SIZE;
        if first >= last {
            // Inside one or two partial sectors.
            return Ok(self.write_any(&vec![0u8; len as usize], offset, false)?);
        }
        if offset < first {
            self.write_any(&vec![0u8; (first - offset) as usize], offset, false)?;
        }
        if last < offset + len {
            self.write_any(&vec![0u8; (offset + len - last) as usize], last, false)?;
        }
        let (start, end) = (first / SECTOR_SIZE, last / SECTOR_SIZE);
        let _rmw = self.backing.rmw_locks.lock(self.range(start, end));
        let len = last - first;
        let mode = self.mode();
        // Zeroing is a write: in writeback mode over dirty data, and for small ranges in the
        // caching modes, it goes through the normal write path so the cache holds the zeros;
        // otherwise backing zeroes the range and the cached copy is invalidated.
        let through_cache = match mode {
            CacheMode::Writeback => true,
            CacheMode::Writethrough => len <= MAX_CHUNK_BYTES,
            CacheMode::Writearound | CacheMode::None => false,
        };
        if through_cache {
            let zeros = vec![0u8; MAX_CHUNK_BYTES.min(len) as usize];
            for (off, n) in Self::chunks(first, len) {
                self.write_sectors(&zeros[..n as usize], off / SECTOR_SIZE, false)?;
            }
            return Ok(());
        }
        self.write_backing(BackingOp::Zeroes { may_unmap }, start, end, false)?;
        Ok(())
    }

    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        let _gate = match self.route("prefetch", offset, len)? {
            Route::Alone(_) => return Ok(()),
            Route::Cache(gate) => gate,
        };
        if self.mode() == CacheMode::None {
            return Ok(());
        }
        let (a, e) = span(offset, len);
        let mut buf = vec![0u8; MAX_CHUNK_BYTES.min(e - a) as usize];
        let mut filled = false;
        for (off, n) in Self::chunks(a, e - a) {
            filled |= self.read_aligned(&mut buf[..n as usize], off, true)?;
        }
        // bcache counts read-ahead on misses; NBD CACHE is the client's read-ahead.
        if filled {
            Stats::add(&self.shared.stats.readaheads, 1);
        }
        Ok(())
    }
}

/// Where a request goes ([`CachedDev::route`]).
enum Route<'a> {
    /// Through the cache, holding the gate.
    Cache(parking_lot::RwLockReadGuard<'a, ()>),
    Alone(Passthrough<'a>),
}

/// A detached device served alone: its data region, with the gate held for the request.
struct Passthrough<'a> {
    dev: &'a dyn BlockDev,
    /// Where the export starts on the device (after its superblock).
    at: u64,
    _gate: parking_lot::RwLockReadGuard<'a, ()>,
}

/// The whole-sector span `[a, e)` (bytes) covering `[offset, offset + len)`.
fn span(offset: u64, len: u64) -> (u64, u64) {
    let a = offset / SECTOR_SIZE * SECTOR_SIZE;
    let e = (offset + len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    (a, e)
}
