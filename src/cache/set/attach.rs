//! Attach, detach and cache mode: the backing superblock state machine (Clean / Dirty /
//! Detached), the dirty-write gate, and the crash ordering of the two superblock writes.

use super::{Backing, BackingSb, CacheSet, Shared};
use crate::cache::error::{CacheError, CacheResult};
use crate::cache::policy::CacheMode;
use crate::dev::BlockDev;
use crate::format::{self, BackingEntry, BackingState, StoredCacheMode, Uuid};
use std::sync::atomic::Ordering;

fn stored_mode(m: CacheMode) -> StoredCacheMode {
    match m {
        CacheMode::Writethrough => StoredCacheMode::Writethrough,
        CacheMode::Writeback => StoredCacheMode::Writeback,
        CacheMode::Writearound => StoredCacheMode::Writearound,
        CacheMode::None => StoredCacheMode::None,
    }
}

impl CacheSet {
    /// Detaches a backing device: writes all its dirty data home, drops its keys, marks its
    /// superblock Detached (it can then be used alone) and removes it from the cache
    /// superblock. Its [`crate::cache::CachedDev`] handles go on serving, straight from the device
    /// (as bcache's detached devices do); requests that arrive during the detach wait for it.
    /// If writing home fails, the device stays attached and the error is returned.
    pub fn detach(&self, dev_id: u32) -> CacheResult<()> {
        let sh = &self.shared;
        let Some(b) = sh.backings.iter().find(|b| b.dev_id == dev_id) else {
            return Err(CacheError::Invalid(format!("no attached backing device with id {dev_id}")));
        };
        // New requests wait at the gate (they see `detached`) until the device is clean and
        // unbound, so none reaches it directly while dirty data of it is still cached.
        let _gate = b.passthrough_gate.write();
        if b.detached.swap(true, Ordering::AcqRel) {
            return Err(CacheError::Invalid(format!("backing device {dev_id} is already detached")));
        }
        let written_home = sh.write_back_all().and_then(|()| {
            let mut m = sh.lock_meta()?;
            let dirty = m.tree.stats().dirty_sectors_by_dev.get(&dev_id).copied().unwrap_or(0);
            if dirty > 0 {
                return Err(CacheError::Invalid(format!("{dirty} dirty sectors of dev {dev_id} remain")));
            }
            sh.invalidate_locked(&mut m, dev_id, 0, u64::MAX)?;
            sh.commit_locked(&mut m)
        });
        if let Err(e) = written_home {
            // Dirty data may still be cached: the device must go on being served through it.
            b.detached.store(false, Ordering::Release);
            return Err(e);
        }
        // From here on no key of the device is left, so serving it alone is right even if a
        // superblock write below fails (the device then stays detached for this run).
        {
            let mut g = b.sb.lock();
            let mut next = g.sb.clone();
            next.state = BackingState::Detached;
            next.set_uuid = Uuid::NIL;
            next.seq += 1;
            format::write_backing_superblock(b.dev.as_ref(), &next)?;
            g.sb = next;
        }
        let mut sb = sh.sb_current.lock();
        let mut next = sb.clone();
        next.backing.retain(|e| e.dev_id != dev_id);
        next.seq += 1;
        format::write_cache_superblock(sh.cache.as_ref(), &next)?;
        *sb = next;
        Ok(())
    }

    /// Attaches a detached backing device: one detached at runtime ([`CacheSet::detach`]) or
    /// one whose superblock already said Detached when the set was opened (detached before a
    /// restart, see [`CacheSet::open`]). Binds its superblock to this set (state Clean, this
    /// set's uuid), registers it in the cache superblock under its dev id, and serves it
    /// through the cache, starting with an empty cache for it (whatever was written to it
    /// meanwhile is read from backing).
    ///
    /// Crash ordering, so a crash at any point leaves it detached or attached, each consistent:
    /// 1. Every key of the device is invalidated and the journal committed. Detach already did
    ///    this; doing it again costs one lookup and guards against keys that could otherwise
    ///    serve data older than what was written to the device while it was detached.
    /// 2. The cache superblock lists the device (both copies, synced). A crash here: the
    ///    backing superblock still says Detached with no set, so the device is complete alone,
    ///    and `open` serves it as a detached export under the listed dev id; the list entry
    ///    has no keys and is harmless (attach again rewrites it).
    /// 3. The backing superblock says Clean and names this set (both copies, synced). From
    ///    here on `open` attaches it; it has no keys, so no stale data can be served.
    /// 4. Only then do requests flow through the cache.
    ///
    /// Before step 1 the device is synced: writes it took while detached are durable before a
    /// FLUSH through the cache (which syncs backing only after cache-path writes) can be acked.
    pub fn attach(&self, dev_id: u32) -> CacheResult<()> {
        let sh = &self.shared;
        let Some(b) = sh.backings.iter().find(|b| b.dev_id == dev_id) else {
            return Err(CacheError::Invalid(format!("no backing device with id {dev_id} in this cache set")));
        };
        // Requests served straight from the device finish first; new ones wait, then see it
        // attached and go through the cache.
        let _gate = b.passthrough_gate.write();
        if !b.detached.load(Ordering::Acquire) {
            return Err(CacheError::Invalid(format!("backing device {dev_id} is attached")));
        }
        // The device may have been written while detached (used alone): its old superblock in
        // memory may be stale too, so read it back.
        let Some(current) = format::read_backing_superblock(b.dev.as_ref())? else {
            return Err(CacheError::Invalid(format!(
                "backing device {dev_id} no longer has a ubcache superblock (reformatted?)"
            )));
        };
        if current.set_uuid != Uuid::NIL && current.set_uuid != sh.sb.set_uuid {
            return Err(CacheError::Invalid(format!(
                "backing device {dev_id} is bound to cache set {}; detach it there first",
                current.set_uuid
            )));
        }
        // Writes the device took while detached were acknowledged without a sync; once it is
        // attached a FLUSH syncs it only if a write through the cache touched it, so make them
        // durable now (the superblock write below syncs too, but that is not its job).
        b.dev.sync()?;
        {
            let mut m = sh.lock_meta()?;
            sh.invalidate_locked(&mut m, dev_id, 0, u64::MAX)?;
            sh.commit_locked(&mut m)?;
        }
        {
            let mut sb = sh.sb_current.lock();
            // Never unregister another device: its cached data would be orphaned (open picks
            // a detached device's id among the ids no listed device uses, so this cannot
            // happen unless the superblocks were changed behind our back).
            if let Some(other) = sb.backing.iter().find(|e| e.dev_id == dev_id && e.uuid != current.uuid) {
                return Err(CacheError::Invalid(format!(
                    "dev id {dev_id} is registered to backing device {} in the cache superblock",
                    other.uuid
                )));
            }
            let mut next = sb.clone();
            next.backing.retain(|e| e.uuid != current.uuid);
            next.backing.push(BackingEntry {
                uuid: current.uuid,
                dev_id,
                size_bytes: current.size_bytes,
                data_offset_bytes: current.data_offset_bytes,
            });
            next.backing.sort_by_key(|e| e.dev_id);
            next.seq += 1;
            format::write_cache_superblock(sh.cache.as_ref(), &next)?;
            *sb = next;
        }
        {
            let mut g = b.sb.lock();
            let mut next = current;
            next.state = BackingState::Clean;
            next.set_uuid = sh.sb.set_uuid;
            next.cache_mode = stored_mode(b.mode());
            next.seq = next.seq.max(g.sb.seq) + 1;
            format::write_backing_superblock(b.dev.as_ref(), &next)?;
            g.sb = next;
        }
        b.detached.store(false, Ordering::Release);
        Ok(())
    }
}

impl Shared {
    /// Writes the backing superblock with a new state (and the current mode), synced.
    pub(crate) fn set_backing_state(&self, b: &Backing, state: BackingState) -> CacheResult<()> {
        let mut g = b.sb.lock();
        Self::write_backing_state(b, &mut g, state)
    }

    pub(crate) fn write_backing_state(
        b: &Backing,
        g: &mut BackingSb,
        state: BackingState,
    ) -> CacheResult<()> {
        let mode = stored_mode(b.mode());
        if g.sb.state == state && g.sb.cache_mode == mode {
            return Ok(());
        }
        let mut next = g.sb.clone();
        next.state = state;
        next.cache_mode = mode;
        next.seq += 1;
        format::write_backing_superblock(b.dev.as_ref(), &next)?;
        g.sb = next;
        Ok(())
    }

    /// Enters a write that may add dirty keys: the backing superblock says Dirty (durably)
    /// before the write is acknowledged, and writeback cannot mark it Clean until
    /// [`Shared::end_dirty_write`].
    pub(crate) fn begin_dirty_write(&self, b: &Backing) -> CacheResult<()> {
        let mut g = b.sb.lock();
        Self::write_backing_state(b, &mut g, BackingState::Dirty)?;
        g.dirty_writers += 1;
        Ok(())
    }

    pub(crate) fn end_dirty_write(&self, b: &Backing) {
        let mut g = b.sb.lock();
        g.dirty_writers = g.dirty_writers.saturating_sub(1);
    }

    /// Changes the mode of one backing device. Leaving writeback with `write_back_first` writes
    /// all dirty data home first (a writeback drain).
    pub(crate) fn set_mode(&self, b: &Backing, mode: CacheMode, write_back_first: bool) -> CacheResult<()> {
        let old = b.mode();
        // The new mode first: writes arriving during the drain no longer add dirty data, so
        // the drain ends even under a steady write load.
        b.mode.store(mode.to_u8(), Ordering::Release);
        if old == CacheMode::Writeback && mode != CacheMode::Writeback && write_back_first {
            self.write_back_all()?;
        }
        let mut g = b.sb.lock();
        let state = g.sb.state;
        Self::write_backing_state(b, &mut g, state)
    }
}
