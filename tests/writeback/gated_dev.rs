//! A device that holds one write in the middle, for races against writeback.

use std::time::Duration;
use ubcache::dev::{BlockDev, DevResult, MemDev};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Off,
    Armed(u64),
    Parked,
    Released,
}

/// A memory device whose first write at an armed offset parks until released: a test holds an
/// operation in the middle of its backing write and does something else meanwhile.
#[derive(Debug)]
pub struct GatedDev {
    inner: MemDev,
    gate: parking_lot::Mutex<Gate>,
    changed: parking_lot::Condvar,
}

impl GatedDev {
    pub fn new(len: u64) -> Self {
        Self {
            inner: MemDev::new(len),
            gate: parking_lot::Mutex::new(Gate::Off),
            changed: parking_lot::Condvar::new(),
        }
    }

    /// The next write at exactly `offset` parks.
    pub fn arm(&self, offset: u64) {
        *self.gate.lock() = Gate::Armed(offset);
    }

    pub fn wait_parked(&self) {
        let mut g = self.gate.lock();
        while *g != Gate::Parked {
            assert!(!self.changed.wait_for(&mut g, Duration::from_secs(30)).timed_out(), "never parked");
        }
    }

    pub fn release(&self) {
        *self.gate.lock() = Gate::Released;
        self.changed.notify_all();
    }
}

impl BlockDev for GatedDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps::default()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        {
            let mut g = self.gate.lock();
            if *g == Gate::Armed(offset) {
                *g = Gate::Parked;
                self.changed.notify_all();
                while *g == Gate::Parked {
                    self.changed.wait(&mut g);
                }
            }
        }
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> DevResult<()> {
        self.inner.sync()
    }
}
