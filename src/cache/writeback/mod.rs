//! Writeback: copying dirty data from the cache device to its backing device and journalling
//! the keys clean (crash rule 4: read cache, write backing, sync backing, then replace the key).
//!
//! The engine's own synchronous steps live here: [`CacheSet::writeback_step`] and the
//! writeback drain [`CacheSet::write_back_all`] (used by detach, by leaving writeback mode and
//! by `ubcache flush`). "Drain" is not a FLUSH: the NBD FLUSH is the durability barrier
//! ([`CacheSet::sync`]) and writes nothing home.

use super::error::{CacheError, CacheResult};
use super::set::{CacheSet, Shared};
use crate::dev::SECTOR_SIZE;
use crate::format::BackingState;
use crate::wbpolicy::CoalesceLimits;
use ubcache_btree::{Key, Pos};

impl CacheSet {
    /// Writes back up to `max_keys` dirty keys (in offset order from where the last step
    /// stopped). Returns the number of keys written back; 0 when nothing is dirty.
    pub fn writeback_step(&self, max_keys: usize) -> CacheResult<usize> {
        self.shared.writeback_step(max_keys)
    }

    /// Writeback drain: writes back every dirty key, makes it durable, and marks the backing
    /// devices Clean. (Not a FLUSH: [`CacheSet::sync`] is the durability barrier.)
    pub fn write_back_all(&self) -> CacheResult<()> {
        self.shared.write_back_all()
    }
}

impl Shared {
    /// Writes back up to `max_keys` dirty keys, continuing where the last call stopped: read
    /// cache, write backing, sync backing, then journal the keys clean with replace semantics
    /// (crash rule 4). Holds the writeback range locks of the keys meanwhile, so no bypass
    /// write to backing can be overtaken (rule 6).
    pub(crate) fn writeback_step(&self, max_keys: usize) -> CacheResult<usize> {
        let _pass = self.writeback_pass.lock();
        let mut keys = Vec::new();
        let scanned_seq = {
            let mut m = self.lock_meta()?;
            let from = m.wb_cursor;
            // Only keys of this set's devices (a device being detached included: detach flushes
            // it with this): dirty data of a device that is not here stays cached.
            let wanted = |k: &Key| k.dirty && self.backings.iter().any(|b| b.dev_id == k.dev);
            let next = m.tree.scan(from, &wanted, max_keys.max(1), &mut keys)?;
            m.wb_cursor = next.unwrap_or(Pos::MIN);
            if keys.is_empty() && from != Pos::MIN {
                let next = m.tree.scan(Pos::MIN, &wanted, max_keys.max(1), &mut keys)?;
                m.wb_cursor = next.unwrap_or(Pos::MIN);
            }
            // Read under the metadata lock: every key seen was journalled at or before it.
            self.journal.last_appended_seq()
        };
        if keys.is_empty() {
            return Ok(0);
        }
        // The same path as the writeback thread's (crash ordering in `wb_io.rs`): coalesced
        // backing writes of at most 1 MiB, every key re-checked under its range lock.
        let limits = CoalesceLimits { max_io_len: (1 << 20) / SECTOR_SIZE, max_extents: keys.len() };
        let report = self.write_back_scanned(&keys, scanned_seq, limits)?;
        Ok(report.keys_written)
    }

    /// Writeback drain: writes back everything, commits, and marks every attached backing
    /// device Clean.
    pub(crate) fn write_back_all(&self) -> CacheResult<()> {
        loop {
            let dirty_before = self.lock_meta()?.tree.stats().dirty_sectors;
            if dirty_before == 0 {
                break;
            }
            // Large steps: each one ends with a backing sync (see `WritebackConfig::for_flush`).
            let n = self.writeback_step(4096)?;
            if n == 0 {
                let stats = self.lock_meta()?.tree.stats();
                let dirty = stats.dirty_sectors;
                let attached_dirty: u64 = self
                    .backings
                    .iter()
                    .map(|b| stats.dirty_sectors_by_dev.get(&b.dev_id).copied().unwrap_or(0))
                    .sum();
                if attached_dirty == 0 {
                    // Only devices that are not attached hold dirty data: it stays cached.
                    break;
                }
                if dirty >= dirty_before {
                    return Err(CacheError::Failed(format!(
                        "writeback made no progress with {dirty} dirty sectors"
                    )));
                }
            }
        }
        {
            let mut m = self.lock_meta()?;
            self.commit_locked(&mut m)?;
        }
        self.mark_clean_if_no_dirty()
    }

    /// Marks each backing device without dirty keys (and no dirty write in flight) Clean.
    pub(crate) fn mark_clean_if_no_dirty(&self) -> CacheResult<()> {
        for b in &self.backings {
            let mut g = b.sb.lock();
            if g.dirty_writers > 0 || g.sb.state != BackingState::Dirty {
                continue;
            }
            let dirty =
                self.meta.lock().tree.stats().dirty_sectors_by_dev.get(&b.dev_id).copied().unwrap_or(0);
            if dirty == 0 {
                // The clean keys must be durable before the superblock says Clean.
                {
                    let mut m = self.lock_meta()?;
                    self.commit_locked(&mut m)?;
                }
                Shared::write_backing_state(b, &mut g, BackingState::Clean)?;
            }
        }
        Ok(())
    }
}
