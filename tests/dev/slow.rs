//! SlowDev: delays are applied (lower bounds only: sleeping never returns early), a serialized
//! device runs one op at a time, and data passes through unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use ubcache::dev::{BlockDev, DevResult, MemDev, SlowDev, SlowDevConfig};

/// Records how many ops were inside the inner device at once.
#[derive(Debug)]
struct ConcurrencyProbe {
    inner: MemDev,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl ConcurrencyProbe {
    fn new(len: u64) -> Self {
        Self { inner: MemDev::new(len), in_flight: AtomicUsize::new(0), max_in_flight: AtomicUsize::new(0) }
    }

    fn track<T>(&self, op: impl FnOnce() -> T) -> T {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        // Stay inside long enough for an unserialized neighbour to overlap.
        std::thread::sleep(Duration::from_millis(1));
        let result = op();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl BlockDev for ConcurrencyProbe {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capabilities(&self) -> ubcache::dev::DevCaps<'_> {
        ubcache::dev::DevCaps::default()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.track(|| self.inner.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.track(|| self.inner.write_at(buf, offset))
    }
    fn sync(&self) -> DevResult<()> {
        self.track(|| self.inner.sync())
    }
}

#[test]
fn serialized_device_runs_one_op_at_a_time() {
    let cfg =
        SlowDevConfig { per_op_latency: Duration::from_micros(200), serialize: true, ..Default::default() };
    let dev = Arc::new(SlowDev::new(ConcurrencyProbe::new(1 << 20), cfg));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                for i in 0..10u64 {
                    let off = (t * 10 + i) * 4096;
                    dev.write_at(&[t as u8 + 1; 4096], off).unwrap();
                    let mut back = [0; 4096];
                    dev.read_at(&mut back, off).unwrap();
                    assert_eq!(back, [t as u8 + 1; 4096]);
                }
                dev.sync().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(dev.inner().max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(dev.stats().ops, 4 * 21);
}

#[test]
fn latency_and_bandwidth_are_lower_bounds_on_elapsed_time() {
    let cfg = SlowDevConfig { per_op_latency: Duration::from_millis(2), ..Default::default() };
    let dev = SlowDev::new(MemDev::new(1 << 20), cfg);
    let start = Instant::now();
    for i in 0..10u64 {
        dev.read_at(&mut [0; 512], i * 512).unwrap();
    }
    assert!(start.elapsed() >= Duration::from_millis(20));

    // The bandwidth is shared: 4 unserialized threads writing 256 KiB each at 10 MB/s in total
    // need at least ~105 ms, however they overlap.
    let cfg = SlowDevConfig { bytes_per_sec: Some(10_000_000), ..Default::default() };
    let dev = Arc::new(SlowDev::new(MemDev::new(1 << 20), cfg));
    let start = Instant::now();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                for i in 0..4u64 {
                    dev.write_at(&[1; 65536], (t * 4 + i) * 65536).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(start.elapsed() >= Duration::from_millis(104), "took only {:?}", start.elapsed());
    assert_eq!(dev.stats().modeled_delay, Duration::from_nanos(1 << 20) * 100);
}

#[test]
fn virtual_time_does_not_sleep_but_accounts() {
    let dev =
        SlowDev::new(MemDev::new(1 << 20), SlowDevConfig { virtual_time: true, ..SlowDevConfig::hdd() });
    for i in 0..100u64 {
        dev.read_at(&mut [0; 512], (i * 104_729 * 512) % (1 << 20)).unwrap();
    }
    // 100 random reads on a disk take at least half a second of modelled time.
    assert!(dev.stats().modeled_delay >= Duration::from_millis(500));
    assert_eq!(dev.stats().seeks, 100);
}
