//! Bookkeeping for I/O that runs outside the metadata lock (`docs/design.md`, "Data path"):
//! in-flight read-miss fills (collision detection) and writeback ranges that backing writes must
//! not overtake. (Read pins on buckets live in the allocator.)

use parking_lot::{Condvar, Mutex};

/// A half-open sector range of one backing device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevRange {
    pub dev: u32,
    pub start: u64,
    pub end: u64,
}

impl DevRange {
    #[must_use]
    pub fn overlaps(&self, other: &DevRange) -> bool {
        self.dev == other.dev && self.start < other.end && other.start < self.end
    }
}

/// Identifies one registered fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillId(u64);

#[derive(Debug)]
struct Fill {
    id: u64,
    range: DevRange,
    collided: bool,
}

/// In-flight read-miss fills (crash rule 5 of `docs/design.md`). A fill reads backing outside
/// the metadata lock and inserts the data afterwards; any write or invalidation that touches its
/// range in between makes the data it read possibly stale, so the fill is marked collided and its
/// insert is dropped. Lives under the engine's metadata lock, so registration and collision
/// marking are ordered with the btree updates they race against.
#[derive(Debug, Default)]
pub struct FillTracker {
    next_id: u64,
    fills: Vec<Fill>,
}

impl FillTracker {
    /// Registers a fill of `range`; call before reading backing.
    pub fn register(&mut self, range: DevRange) -> FillId {
        self.next_id += 1;
        self.fills.push(Fill { id: self.next_id, range, collided: false });
        FillId(self.next_id)
    }

    /// Marks every in-flight fill overlapping `range` as collided; returns how many were newly marked.
    pub fn collide(&mut self, range: DevRange) -> usize {
        let mut n = 0;
        for f in &mut self.fills {
            if !f.collided && f.range.overlaps(&range) {
                f.collided = true;
                n += 1;
            }
        }
        n
    }

    /// Ends a fill; returns whether it collided (its insert must then be dropped).
    /// An unknown id counts as collided: inserting data nobody tracked would be unsafe.
    pub fn finish(&mut self, id: FillId) -> bool {
        match self.fills.iter().position(|f| f.id == id.0) {
            Some(i) => self.fills.swap_remove(i).collided,
            None => true,
        }
    }

    /// Number of fills in flight.
    #[must_use]
    pub fn len(&self) -> usize {
        self.fills.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.fills.is_empty()
    }
}

/// Ranges being written back (read from cache, written to backing). A write that goes to backing
/// directly waits until no writeback overlaps its range and holds the range meanwhile, so a stale
/// writeback copy can never land on backing after newer data (crash rule 6 of
/// `docs/design.md`).
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, DevRange)>>,
    released: Condvar,
    next_id: Mutex<u64>,
}

/// Holds a range of [`RangeLocks`] until dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Blocks until no held range overlaps `range`, then holds it.
    pub fn lock(&self, range: DevRange) -> RangeGuard<'_> {
        let id = {
            let mut next = self.next_id.lock();
            *next += 1;
            *next
        };
        let mut held = self.held.lock();
        while held.iter().any(|(_, r)| r.overlaps(&range)) {
            self.released.wait(&mut held);
        }
        held.push((id, range));
        RangeGuard { locks: self, id }
    }

    /// Holds `range` only if nothing overlapping is held now.
    pub fn try_lock(&self, range: DevRange) -> Option<RangeGuard<'_>> {
        let id = {
            let mut next = self.next_id.lock();
            *next += 1;
            *next
        };
        let mut held = self.held.lock();
        if held.iter().any(|(_, r)| r.overlaps(&range)) {
            return None;
        }
        held.push((id, range));
        Some(RangeGuard { locks: self, id })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        held.retain(|(id, _)| *id != self.id);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn r(dev: u32, start: u64, end: u64) -> DevRange {
        DevRange { dev, start, end }
    }

    #[test]
    fn fill_collides_only_with_overlapping_ranges_of_the_same_device() {
        let mut t = FillTracker::default();
        let a = t.register(r(0, 10, 20));
        let b = t.register(r(0, 30, 40));
        let c = t.register(r(1, 10, 20));
        assert_eq!(t.collide(r(0, 19, 31)), 2);
        assert_eq!(t.collide(r(0, 15, 16)), 0, "already collided fills are not counted twice");
        assert!(t.finish(a));
        assert!(t.finish(b));
        assert!(!t.finish(c));
        assert!(t.finish(c), "a finished fill is unknown and counts as collided");
        assert!(t.is_empty());
        let d = t.register(r(0, 0, 10));
        assert_eq!(t.collide(r(0, 10, 20)), 0, "half-open ranges that touch do not overlap");
        assert!(!t.finish(d));
    }

    #[test]
    fn range_lock_blocks_overlaps_until_released() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(r(0, 0, 100));
        assert!(locks.try_lock(r(0, 50, 60)).is_none());
        assert!(locks.try_lock(r(0, 100, 200)).is_some());
        assert!(locks.try_lock(r(1, 0, 100)).is_some());
        let l2 = Arc::clone(&locks);
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            let _g = l2.lock(r(0, 99, 101));
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "overlapping lock must wait");
        drop(g);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        h.join().unwrap();
        assert!(locks.try_lock(r(0, 0, 200)).is_some());
    }
}
