//! Finding dirty data: [`CacheSet::scan_dirty`] (one bounded scan of the btree for dirty keys
//! of attached devices) and [`DirtyKeyBuf`], bcache's keybuf: a bounded buffer of dirty keys
//! refilled from the btree in (device, offset) order, continuing where the last refill stopped
//! and wrapping to the start at the end of the tree (a *pass*). Keys in the buffer may go stale
//! (overwritten, written back by someone else); the copy re-checks each key under the
//! writeback range lock before it writes it (see [`super::copy`]). The buffer remembers the
//! journal seq of its scans, so the copy commits the journal before a batch only when the
//! scanned keys are not durable yet (once per refill, not once per batch).

use crate::cache::{CacheResult, CacheSet};
use crate::dev::SECTOR_SIZE;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use ubcache_btree::{Key, Pos};

/// Dirty keys found by [`CacheSet::scan_dirty`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyScan {
    /// Dirty keys of attached devices, in (device, offset) order.
    pub keys: Vec<Key>,
    /// Where the next scan continues; `None` at the end of the tree (a full pass is done).
    pub next: Option<Pos>,
    /// The last journal seq appended when the scan ran: every key of the scan was journalled
    /// at or before it (pass it to [`CacheSet::write_back_scanned`]).
    pub journal_seq: u64,
}

impl CacheSet {
    /// Up to `max` dirty keys of attached devices sorting after `from`, in offset order (the
    /// refill of a writeback key buffer).
    pub fn scan_dirty(&self, from: Pos, max: usize) -> CacheResult<DirtyScan> {
        let attached: Vec<u32> = self
            .shared
            .backings
            .iter()
            .filter(|b| !b.detached.load(Ordering::Acquire))
            .map(|b| b.dev_id)
            .collect();
        let wanted = |k: &Key| k.dirty && attached.contains(&k.dev);
        let mut keys = Vec::new();
        let mut m = self.shared.lock_meta()?;
        let next = m.tree.scan(from, &wanted, max.max(1), &mut keys)?;
        // Read under the metadata lock: entries are appended under it, so every key seen was
        // appended at or before this seq.
        let journal_seq = self.shared.journal.last_appended_seq();
        drop(m);
        Ok(DirtyScan { keys, next, journal_seq })
    }
}

/// Dirty keys found per scan call of a refill (one hold of the metadata lock each).
const SCAN_CHUNK_KEYS: usize = 64;

/// A bounded buffer of dirty keys, refilled from the btree in offset order (bcache's keybuf).
#[derive(Debug)]
pub struct DirtyKeyBuf {
    keys: VecDeque<Key>,
    /// Where the next refill starts.
    next: Pos,
    capacity: usize,
    passes: u64,
    /// The newest [`DirtyScan::journal_seq`] of the scans that filled the buffer.
    scanned_seq: u64,
}

impl DirtyKeyBuf {
    /// An empty buffer of `capacity` keys, starting at the beginning of the tree.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self { keys: VecDeque::new(), next: Pos::MIN, capacity: capacity.max(1), passes: 0, scanned_seq: 0 }
    }

    /// A journal seq at or after the journalling of every key the buffer has handed out: what
    /// [`CacheSet::write_back_scanned`] needs durable before it writes them.
    #[must_use]
    pub fn scanned_seq(&self) -> u64 {
        self.scanned_seq
    }

    /// Completed passes over the whole tree.
    #[must_use]
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// Takes up to `max_keys` keys (at least one if any is dirty) whose total size stays within
    /// `max_bytes`, refilling from the btree when empty. Empty: nothing dirty was found in a
    /// whole pass.
    pub fn take(&mut self, set: &CacheSet, max_keys: usize, max_bytes: u64) -> CacheResult<Vec<Key>> {
        self.take_runs(set, max_keys, max_bytes, usize::MAX)
    }

    /// [`DirtyKeyBuf::take`], also stopping before a key that would start run number
    /// `max_runs + 1` (a run: keys contiguous on one device, written with one backing write
    /// under one range lock). Bounds the range locks a batch of scattered keys holds.
    pub fn take_runs(
        &mut self,
        set: &CacheSet,
        max_keys: usize,
        max_bytes: u64,
        max_runs: usize,
    ) -> CacheResult<Vec<Key>> {
        if self.keys.is_empty() {
            self.refill(set)?;
        }
        let mut out: Vec<Key> = Vec::new();
        let mut bytes = 0u64;
        let mut runs = 0usize;
        while let Some(k) = self.keys.front() {
            let size = u64::from(k.size) * SECTOR_SIZE;
            let new_run = out.last().is_none_or(|p| p.dev != k.dev || p.end != k.start());
            if out.len() >= max_keys.max(1)
                || (!out.is_empty() && bytes + size > max_bytes)
                || (new_run && !out.is_empty() && runs >= max_runs.max(1))
            {
                break;
            }
            bytes += size;
            runs += usize::from(new_run);
            out.extend(self.keys.pop_front());
        }
        Ok(out)
    }

    fn refill(&mut self, set: &CacheSet) -> CacheResult<()> {
        // Scans of at most SCAN_CHUNK_KEYS keys (each holds the metadata lock foreground reads
        // need) up to the capacity or the end of the tree; if the rest of this pass held
        // nothing, one new pass from the start.
        let mut wrapped = false;
        while self.keys.len() < self.capacity {
            let from = self.next;
            let want = (self.capacity - self.keys.len()).min(SCAN_CHUNK_KEYS);
            let scan = set.scan_dirty(from, want)?;
            self.scanned_seq = self.scanned_seq.max(scan.journal_seq);
            self.keys.extend(scan.keys);
            match scan.next {
                Some(p) => self.next = p,
                None => {
                    self.next = Pos::MIN;
                    self.passes += 1;
                    if !self.keys.is_empty() || from == Pos::MIN || wrapped {
                        break;
                    }
                    wrapped = true;
                }
            }
        }
        Ok(())
    }
}
