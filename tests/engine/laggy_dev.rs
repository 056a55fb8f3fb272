//! A cache device whose latency a test turns up and down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use ubcache::dev::{BlockDev, DevResult, MemDev};

/// A memory device whose reads and writes take at least `delay_us` (syncs are not delayed):
/// a cache device whose latency a test turns up and down, for the congestion bypass.
#[derive(Debug)]
pub struct LaggyDev {
    pub inner: MemDev,
    pub delay_us: Arc<AtomicU64>,
}

impl LaggyDev {
    fn lag(&self) {
        let us = self.delay_us.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}

impl BlockDev for LaggyDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps::default()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.lag();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.lag();
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> DevResult<()> {
        self.inner.sync()
    }
}
