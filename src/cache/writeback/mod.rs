//! Writeback: copying dirty data from the cache device home to its backing device and
//! journalling the keys clean (crash rule 4: read cache, write backing, sync backing, then
//! replace the key).
//!
//! - [`scan`]: finding dirty keys ([`CacheSet::scan_dirty`], the key buffer [`DirtyKeyBuf`]).
//! - [`copy`]: writing a batch of keys home with its crash ordering
//!   ([`CacheSet::write_back_scanned`]) and the data copy itself.
//! - [`policy`]: pure functions: the PI rate controller and extent coalescing.
//! - [`thread`]: the background writeback thread ([`WritebackThread`]).
//! - [`tuning`]: [`WritebackConfig`] and the set's runtime knobs ([`WritebackTuning`]).
//! - Here: the engine's synchronous steps: [`CacheSet::writeback_step`], the *writeback
//!   drain* [`CacheSet::write_back_all`] (detach, leaving writeback mode) and [`DrainStep`],
//!   the batched drain behind `ubcache flush`.
//!
//! "Drain" is not a FLUSH: the NBD FLUSH ([`CacheSet::sync`]) is the durability barrier and
//! writes nothing home; a drain writes every dirty byte home. The ctl verb and CLI command that
//! start a drain keep their historical name, `flush`.

pub mod copy;
pub mod policy;
pub mod scan;
pub mod thread;
pub mod tuning;

pub use copy::WritebackReport;
pub use scan::{DirtyKeyBuf, DirtyScan};
pub use thread::{MAX_PAUSE, RATE_SLICE, WritebackStatus, WritebackThread};
pub use tuning::{TuningValues, WritebackConfig, WritebackTuning};

use super::error::{CacheError, CacheResult};
use super::set::{CacheSet, Shared};
use crate::dev::SECTOR_SIZE;
use crate::format::BackingState;
use policy::CoalesceLimits;
use std::sync::Arc;
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
            // Only keys of this set's devices (a device being detached included: detach drains
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
        // The same path as the writeback thread's (crash ordering in `copy.rs`): coalesced
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
            // Large steps: each one ends with a backing sync (see `WritebackConfig::for_drain`).
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

impl CacheSet {
    /// Ends a writeback drain: commits, and marks every attached backing device without dirty
    /// data (and no dirty write in flight) Clean in its superblock.
    pub fn finish_drain(&self) -> CacheResult<()> {
        {
            let mut m = self.shared.lock_meta()?;
            self.shared.commit_locked(&mut m)?;
        }
        self.shared.mark_clean_if_no_dirty()
    }
}

/// Most bytes one drain batch holds range locks for.
const DRAIN_BATCH_MAX_BYTES: u64 = 64 << 20;
/// Most runs (range locks, backing writes) in one drain batch: the range locks are a list that
/// every locker scans, so thousands of held ranges would cost foreground writers and the drain
/// itself quadratic time.
const DRAIN_BATCH_MAX_RUNS: usize = 1024;

/// One step of a writeback drain (what the control socket's `flush` verb runs, step by step,
/// to report progress): writes back one batch at full speed and returns the bytes written;
/// `Ok(0)` only when no dirty data of an attached device is left (the backing devices are then
/// marked Clean).
#[derive(Debug)]
pub struct DrainStep {
    set: Arc<CacheSet>,
    keybuf: DirtyKeyBuf,
    config: WritebackConfig,
}

impl DrainStep {
    #[must_use]
    pub fn new(set: Arc<CacheSet>, config: WritebackConfig) -> Self {
        Self { set, keybuf: DirtyKeyBuf::new(config.keybuf_keys), config }
    }

    /// Writes back one batch; see the type doc.
    pub fn step(&mut self) -> CacheResult<u64> {
        // Keys skipped because they changed under us, or dirty data appearing faster than it
        // is written, can make a batch write nothing: retry a bounded number of times, so a
        // drain that cannot progress fails instead of spinning or claiming it is done.
        let mut last_dirty = u64::MAX;
        let mut stalls = 0;
        loop {
            let dirty = self.set.usage()?.attached_dirty_bytes;
            if dirty == 0 {
                self.set.finish_drain()?;
                return Ok(0);
            }
            let budget = self
                .config
                .max_io_bytes
                .saturating_mul(self.config.batch_keys as u64)
                .clamp(1, DRAIN_BATCH_MAX_BYTES);
            let keys =
                self.keybuf.take_runs(&self.set, self.config.batch_keys, budget, DRAIN_BATCH_MAX_RUNS)?;
            let report =
                self.set.write_back_scanned(&keys, self.keybuf.scanned_seq(), self.config.limits())?;
            if report.bytes_written > 0 {
                return Ok(report.bytes_written);
            }
            if dirty < last_dirty {
                stalls = 0;
            } else {
                stalls += 1;
                if stalls > 1000 {
                    return Err(CacheError::Failed(format!(
                        "flush made no progress with {dirty} dirty bytes left"
                    )));
                }
            }
            last_dirty = dirty;
            std::thread::yield_now();
        }
    }

    /// Runs steps until nothing dirty is left.
    pub fn run_to_end(&mut self) -> CacheResult<u64> {
        let mut total = 0u64;
        loop {
            match self.step()? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }
}
