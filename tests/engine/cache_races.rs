//! The two races the data path must win, made deterministic with a device that parks one I/O
//! until the test releases it:
//! - rule 5: a read-miss fill that read backing before a write changed it must not insert its
//!   (now stale) data: it is dropped and counted as a collision;
//! - rule 6: a write to backing must not be overtaken by an in-flight writeback of the older
//!   dirty copy of the same range.

use crate::fixtures::{arc, format_open, tiny_config};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::time::Duration;
use ubcache::cache::CacheMode;
use ubcache::dev::{BlockDev, DevResult, MemDev};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Gate {
    #[default]
    Off,
    /// The next read/write touching `at` parks (reads after fetching the data, writes before
    /// writing it) until released.
    Armed {
        at: u64,
        on_write: bool,
    },
    Parked,
    Released,
}

/// A MemDev that can park exactly one I/O.
#[derive(Debug)]
struct GateDev {
    inner: MemDev,
    gate: Mutex<Gate>,
    changed: Condvar,
}

impl GateDev {
    fn new(len: u64) -> Self {
        Self { inner: MemDev::new(len), gate: Mutex::new(Gate::Off), changed: Condvar::new() }
    }
    fn arm(&self, at: u64, on_write: bool) {
        *self.gate.lock() = Gate::Armed { at, on_write };
    }
    fn park_if_armed(&self, offset: u64, len: u64, is_write: bool) {
        let mut g = self.gate.lock();
        if let Gate::Armed { at, on_write } = *g
            && on_write == is_write
            && offset <= at
            && at < offset + len
        {
            *g = Gate::Parked;
            self.changed.notify_all();
            while *g == Gate::Parked {
                self.changed.wait(&mut g);
            }
        }
    }
    fn wait_parked(&self) {
        let mut g = self.gate.lock();
        let r = self.changed.wait_while_for(&mut g, |g| *g != Gate::Parked, Duration::from_secs(10));
        assert!(!r.timed_out(), "the gated I/O never arrived");
    }
    fn release(&self) {
        *self.gate.lock() = Gate::Released;
        self.changed.notify_all();
    }
}

impl BlockDev for GateDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps::default()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.inner.read_at(buf, offset)?;
        self.park_if_armed(offset, buf.len() as u64, false);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.park_if_armed(offset, buf.len() as u64, true);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> DevResult<()> {
        self.inner.sync()
    }
}

const HEADER: u64 = 8192;

#[test]
fn fill_that_raced_a_write_is_dropped_as_a_collision() {
    let gate = Arc::new(GateDev::new(512 * 1024 + HEADER));
    let backing: Arc<dyn BlockDev> = Arc::clone(&gate) as _;
    let cache = arc(MemDev::new(1 << 20));
    let set = Arc::new(format_open(&cache, &backing, tiny_config(CacheMode::Writearound)));
    let dev = set.device(0).unwrap();
    dev.write_at(&[1u8; 4096], 65536).unwrap();
    gate.arm(HEADER + 65536, false);
    let reader = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            dev.read_at(&mut buf, 65536).unwrap();
            buf
        })
    };
    // The reader has looked up (miss), registered its fill and read the old data from backing.
    gate.wait_parked();
    dev.write_at(&[2u8; 4096], 65536).unwrap();
    gate.release();
    let old = reader.join().unwrap();
    assert_eq!(old, vec![1u8; 4096], "the racing read may return the old data");
    assert_eq!(set.stats().collisions, 1, "the stale fill must be dropped and counted");
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 65536).unwrap();
    assert_eq!(buf, vec![2u8; 4096], "a stale fill was inserted over newer data");
    dev.read_at(&mut buf, 65536).unwrap();
    assert_eq!(buf, vec![2u8; 4096]);
}

#[test]
fn backing_write_waits_for_inflight_writeback_of_the_same_range() {
    let gate = Arc::new(GateDev::new(512 * 1024 + HEADER));
    let backing: Arc<dyn BlockDev> = Arc::clone(&gate) as _;
    let cache = arc(MemDev::new(1 << 20));
    let set = Arc::new(format_open(&cache, &backing, tiny_config(CacheMode::Writeback)));
    let dev = set.device(0).unwrap();
    dev.write_at(&[1u8; 4096], 131_072).unwrap();
    // Leave writeback without flushing: the dirty copy stays, writes now go to backing.
    dev.set_mode(CacheMode::None, false).unwrap();
    gate.arm(HEADER + 131_072, true);
    let writeback = {
        let set = Arc::clone(&set);
        std::thread::spawn(move || set.writeback_step(8).unwrap())
    };
    gate.wait_parked(); // writeback holds the old dirty data, about to write it to backing
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            dev.write_at(&[2u8; 4096], 131_072).unwrap();
            tx.send(()).unwrap();
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the backing write did not wait for the in-flight writeback of its range"
    );
    gate.release();
    assert_eq!(writeback.join().unwrap(), 1);
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    writer.join().unwrap();
    let mut raw = vec![0u8; 4096];
    backing.read_at(&mut raw, HEADER + 131_072).unwrap();
    assert_eq!(raw, vec![2u8; 4096], "stale writeback data landed after the newer write");
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 131_072).unwrap();
    assert_eq!(buf, vec![2u8; 4096]);
    assert_eq!(set.stats().dirty_bytes, 0);
}
