//! Statistics of a cache set: counters with totals and rolling windows (5 minutes, 1 hour,
//! 1 day, as bcache's `stats_five_minute`, `stats_hour`, `stats_day`), and gauges.
//!
//! # Exactness
//! bcache's windows are exponentially decayed estimates. Ours are exact sums: each window keeps
//! a ring of the counter totals at the start of each of its last 60 intervals (5 s, 60 s and
//! 24 min long), and a window's value is `total now - total at the start of its oldest interval`.
//! So a window covers its last 59 whole intervals plus the current partial one; an event counts
//! in a window exactly as long as its interval is in the ring.
//!
//! For the totals at a boundary to be exact, no event may be added "across" a boundary: adders
//! hold a shared gate (read lock) while they read the clock and bump the atomic; the roll to a
//! new interval takes the gate exclusively. An adder that sees the clock past the next boundary
//! rolls first. Events are therefore attributed by the clock reading taken inside the gate,
//! and the request path pays one uncontended-in-the-common-case read lock plus atomics.
//!
//! The clock is injected ([`Clock`]); tests drive a [`ManualClock`].

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic clock: time since an arbitrary origin, never going backwards.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since the clock's origin.
    fn now(&self) -> Duration;
}

/// The real monotonic clock ([`Instant`]).
#[derive(Debug)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    #[must_use]
    pub fn new() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock at `start`.
    #[must_use]
    pub fn new(start: Duration) -> Self {
        Self { nanos: AtomicU64::new(duration_nanos(start)) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(duration_nanos(by), Ordering::SeqCst);
    }

    /// Moves the clock to `to`; a time before the current one is ignored (the clock is monotonic).
    pub fn set(&self, to: Duration) {
        self.nanos.fetch_max(duration_nanos(to), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

macro_rules! define_counters {
    ($( $variant:ident => $field:ident : $help:literal ),* $(,)?) => {
        /// A monotonic event counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Counter {
            $( #[doc = $help] $variant, )*
        }

        impl Counter {
            /// Every counter, in snapshot and exposition order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),*];

            /// The snake_case name (JSON field; Prometheus name before `_total`).
            #[must_use]
            pub fn name(self) -> &'static str {
                match self { $( Counter::$variant => stringify!($field), )* }
            }

            /// One line saying what is counted.
            #[must_use]
            pub fn help(self) -> &'static str {
                match self { $( Counter::$variant => $help, )* }
            }

            fn index(self) -> usize {
                self as usize
            }
        }

        /// Counter values over one span (total or a window), plus the read hit ratio.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct CounterValues {
            $( #[doc = $help] pub $field: u64, )*
            /// `read_hits / (read_hits + read_misses)`; `None` when there were no reads.
            pub hit_ratio: Option<f64>,
        }

        impl CounterValues {
            fn from_array(values: &[u64; COUNTERS]) -> CounterValues {
                let mut out = CounterValues {
                    $( $field: values[Counter::$variant.index()], )*
                    hit_ratio: None,
                };
                out.hit_ratio = hit_ratio(out.read_hits, out.read_misses);
                out
            }

            /// The value of one counter.
            #[must_use]
            pub fn get(&self, counter: Counter) -> u64 {
                match counter { $( Counter::$variant => self.$field, )* }
            }
        }
    };
}

define_counters! {
    ReadHits => read_hits: "Read hits: sectors served from the cache.",
    ReadMisses => read_misses: "Read misses: sectors read from the backing device.",
    WriteCached => write_cached: "Write requests whose data went into the cache.",
    BypassMode => bypass_mode: "Requests that bypassed the cache because of the cache mode (writearound or none).",
    BypassSequential => bypass_sequential: "Requests that bypassed the cache: part of a sequential stream past the cutoff.",
    BypassCongestion => bypass_congestion: "Requests that bypassed the cache: the cache device was congested.",
    BypassFull => bypass_full: "Requests that bypassed the cache: no cache space could be freed.",
    MissCollisions => miss_collisions: "Read-miss fills dropped because a write raced them.",
    Readaheads => readaheads: "Read-ahead (NBD CACHE prefetch) requests that brought missing data into the cache.",
    WrittenBackBytes => written_back_bytes: "Bytes of dirty data written home by writeback.",
    BucketsReclaimed => buckets_reclaimed: "Buckets invalidated for reuse.",
    JournalCommits => journal_commits: "Journal records written.",
    Checkpoints => checkpoints: "Btree checkpoints written.",
}

/// Number of counters.
const COUNTERS: usize = Counter::ALL.len();

macro_rules! define_gauges {
    ($( $variant:ident => $field:ident : $help:literal ),* $(,)?) => {
        /// A value that goes up and down.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Gauge {
            $( #[doc = $help] $variant, )*
        }

        impl Gauge {
            /// Every gauge, in snapshot and exposition order.
            pub const ALL: &'static [Gauge] = &[$(Gauge::$variant),*];

            /// The snake_case name (JSON field and Prometheus name).
            #[must_use]
            pub fn name(self) -> &'static str {
                match self { $( Gauge::$variant => stringify!($field), )* }
            }

            /// One line saying what is measured.
            #[must_use]
            pub fn help(self) -> &'static str {
                match self { $( Gauge::$variant => $help, )* }
            }

            fn index(self) -> usize {
                self as usize
            }
        }

        /// Gauge values at one moment, plus the journal fill ratio.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct GaugeValues {
            $( #[doc = $help] pub $field: u64, )*
            /// `journal_used_bytes / journal_capacity_bytes`; `None` without a journal.
            pub journal_fill: Option<f64>,
        }

        impl GaugeValues {
            fn from_array(values: &[u64; GAUGES]) -> GaugeValues {
                let mut out = GaugeValues {
                    $( $field: values[Gauge::$variant.index()], )*
                    journal_fill: None,
                };
                out.journal_fill = ratio(out.journal_used_bytes, out.journal_capacity_bytes);
                out
            }

            /// The value of one gauge.
            #[must_use]
            pub fn get(&self, gauge: Gauge) -> u64 {
                match gauge { $( Gauge::$variant => self.$field, )* }
            }
        }
    };
}

define_gauges! {
    DirtyBytes => dirty_bytes: "Bytes of dirty data in the cache (only the cache holds them).",
    WritebackRate => writeback_rate_bytes_per_sec: "Current writeback rate target, bytes per second.",
    BucketsFree => buckets_free: "Buckets holding nothing, ready for allocation.",
    BucketsClean => buckets_clean: "Buckets holding only clean cached data.",
    BucketsDirty => buckets_dirty: "Buckets holding dirty data.",
    BucketsMetadata => buckets_metadata: "Buckets holding btree nodes, journal or bucket tables.",
    BucketBytes => bucket_bytes: "Size of one bucket in bytes.",
    JournalUsedBytes => journal_used_bytes: "Journal bytes still needed for replay.",
    JournalCapacityBytes => journal_capacity_bytes: "Journal size in bytes.",
}

/// Number of gauges.
const GAUGES: usize = Gauge::ALL.len();

fn ratio(part: u64, whole: u64) -> Option<f64> {
    if whole == 0 { None } else { Some(part as f64 / whole as f64) }
}

fn hit_ratio(hits: u64, misses: u64) -> Option<f64> {
    ratio(hits, hits.saturating_add(misses))
}

/// A rolling window's shape: `slots` intervals of `interval` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub name: &'static str,
    pub interval: Duration,
    pub slots: u32,
}

/// The three windows, finest first. Every interval is a multiple of the first one, so the
/// finest window's next boundary is the earliest boundary of all.
pub const WINDOWS: [WindowSpec; 3] = [
    WindowSpec { name: "five_minute", interval: Duration::from_secs(5), slots: 60 },
    WindowSpec { name: "hour", interval: Duration::from_secs(60), slots: 60 },
    WindowSpec { name: "day", interval: Duration::from_secs(24 * 60), slots: 60 },
];

#[derive(Debug)]
struct Window {
    interval_nanos: u64,
    slots: usize,
    /// Index (time / interval) of the current interval.
    current: u64,
    /// Counter totals at the start of each of the last `slots` intervals, oldest first (the
    /// oldest may be the creation time when the window has not filled yet).
    starts: VecDeque<[u64; COUNTERS]>,
}

impl Window {
    fn new(spec: WindowSpec, now_nanos: u64) -> Window {
        let interval_nanos = duration_nanos(spec.interval).max(1);
        let slots = spec.slots.max(1) as usize;
        let mut starts = VecDeque::with_capacity(slots + 1);
        starts.push_back([0; COUNTERS]);
        Window { interval_nanos, slots, current: now_nanos / interval_nanos, starts }
    }

    /// Advances to the interval containing `now_nanos`; `totals` are the totals at every
    /// boundary crossed (no event was added since the last roll, see the module doc).
    fn roll(&mut self, now_nanos: u64, totals: &[u64; COUNTERS]) {
        let index = now_nanos / self.interval_nanos;
        let crossed = index.saturating_sub(self.current);
        // More than `slots` boundaries crossed: every slot starts with the same totals.
        let pushes = crossed.min(self.slots as u64);
        for _ in 0..pushes {
            self.starts.push_back(*totals);
            while self.starts.len() > self.slots {
                self.starts.pop_front();
            }
        }
        self.current = self.current.max(index);
    }

    fn values(&self, totals: &[u64; COUNTERS]) -> [u64; COUNTERS] {
        let oldest = self.starts.front().copied().unwrap_or([0; COUNTERS]);
        std::array::from_fn(|i| totals[i].saturating_sub(oldest[i]))
    }
}

#[derive(Debug)]
struct Rolling {
    windows: [Window; 3],
    start_nanos: u64,
}

/// Live statistics of a cache set. Cheap to update from many threads.
#[derive(Debug)]
pub struct Stats {
    clock: Arc<dyn Clock>,
    totals: [AtomicU64; COUNTERS],
    gauges: [AtomicU64; GAUGES],
    /// When the finest window's current interval ends (nanoseconds on `clock`).
    next_boundary: AtomicU64,
    /// The gate of the module doc: shared by adders, exclusive for rolling and snapshots.
    rolling: RwLock<Rolling>,
}

/// A point-in-time copy of [`Stats`], as the `stats` verb returns it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Seconds since the statistics started.
    pub uptime_secs: u64,
    /// Since start.
    pub total: CounterValues,
    /// The last 5 minutes (60 intervals of 5 s).
    pub five_minute: CounterValues,
    /// The last hour (60 intervals of 1 min).
    pub hour: CounterValues,
    /// The last day (60 intervals of 24 min).
    pub day: CounterValues,
    /// Gauges now.
    pub gauges: GaugeValues,
}

impl Stats {
    /// Statistics on the real monotonic clock.
    #[must_use]
    pub fn new() -> Stats {
        Stats::with_clock(Arc::new(MonotonicClock::new()))
    }

    /// Statistics on `clock` (tests pass a [`ManualClock`]).
    #[must_use]
    pub fn with_clock(clock: Arc<dyn Clock>) -> Stats {
        let now = duration_nanos(clock.now());
        let windows = WINDOWS.map(|spec| Window::new(spec, now));
        let next_boundary = next_boundary_after(&windows[0], now);
        Stats {
            clock,
            totals: std::array::from_fn(|_| AtomicU64::new(0)),
            gauges: std::array::from_fn(|_| AtomicU64::new(0)),
            next_boundary: AtomicU64::new(next_boundary),
            rolling: RwLock::new(Rolling { windows, start_nanos: now }),
        }
    }

    /// Adds `n` to a counter.
    pub fn add(&self, counter: Counter, n: u64) {
        loop {
            {
                let _gate = self.rolling.read();
                let now = duration_nanos(self.clock.now());
                if now < self.next_boundary.load(Ordering::Acquire) {
                    self.totals[counter.index()].fetch_add(n, Ordering::Relaxed);
                    return;
                }
            }
            // Past a boundary: roll first so this event lands in the new interval.
            let mut rolling = self.rolling.write();
            self.roll_locked(&mut rolling);
        }
    }

    /// Adds 1 to a counter.
    pub fn incr(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Sets a gauge.
    pub fn set_gauge(&self, gauge: Gauge, value: u64) {
        self.gauges[gauge.index()].store(value, Ordering::Relaxed);
    }

    /// Raises a gauge by `n` (saturating).
    pub fn add_gauge(&self, gauge: Gauge, n: u64) {
        let _ = self.gauges[gauge.index()]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(n)));
    }

    /// Lowers a gauge by `n`, stopping at 0 (a bookkeeping slip must not wrap to 2^64).
    pub fn sub_gauge(&self, gauge: Gauge, n: u64) {
        let _ = self.gauges[gauge.index()]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
    }

    /// The current value of a gauge.
    #[must_use]
    pub fn gauge(&self, gauge: Gauge) -> u64 {
        self.gauges[gauge.index()].load(Ordering::Relaxed)
    }

    /// The total of a counter since start.
    #[must_use]
    pub fn total(&self, counter: Counter) -> u64 {
        self.totals[counter.index()].load(Ordering::Relaxed)
    }

    /// Totals, windows and gauges now.
    #[must_use]
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut rolling = self.rolling.write();
        let now = self.roll_locked(&mut rolling);
        // Exclusive gate: no add is in progress, so totals and window starts agree.
        let totals: [u64; COUNTERS] = std::array::from_fn(|i| self.totals[i].load(Ordering::Relaxed));
        let gauges: [u64; GAUGES] = std::array::from_fn(|i| self.gauges[i].load(Ordering::Relaxed));
        let [five, hour, day] = &rolling.windows;
        StatsSnapshot {
            uptime_secs: now.saturating_sub(rolling.start_nanos) / 1_000_000_000,
            total: CounterValues::from_array(&totals),
            five_minute: CounterValues::from_array(&five.values(&totals)),
            hour: CounterValues::from_array(&hour.values(&totals)),
            day: CounterValues::from_array(&day.values(&totals)),
            gauges: GaugeValues::from_array(&gauges),
        }
    }

    /// Rolls every window to now; the caller holds the gate exclusively. Returns now.
    fn roll_locked(&self, rolling: &mut Rolling) -> u64 {
        let now = duration_nanos(self.clock.now());
        if now >= self.next_boundary.load(Ordering::Acquire) {
            let totals: [u64; COUNTERS] = std::array::from_fn(|i| self.totals[i].load(Ordering::Relaxed));
            for window in &mut rolling.windows {
                window.roll(now, &totals);
            }
            self.next_boundary.store(next_boundary_after(&rolling.windows[0], now), Ordering::Release);
        }
        now
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

fn next_boundary_after(finest: &Window, now_nanos: u64) -> u64 {
    (now_nanos / finest.interval_nanos).saturating_add(1).saturating_mul(finest.interval_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_at_zero() -> (Arc<ManualClock>, Stats) {
        let clock = Arc::new(ManualClock::new(Duration::ZERO));
        let stats = Stats::with_clock(clock.clone());
        (clock, stats)
    }

    #[test]
    fn names_are_unique_snake_case() {
        let mut names: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.extend(Gauge::ALL.iter().map(|g| g.name()));
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }

    #[test]
    fn window_forgets_an_event_exactly_when_its_interval_leaves_the_ring() {
        let (clock, stats) = stats_at_zero();
        clock.set(Duration::from_secs(7)); // interval 1 of the 5 s window
        stats.add(Counter::ReadHits, 3);
        // Interval 1 stays in the 5-minute ring while the current interval is <= 60.
        clock.set(Duration::from_secs(60 * 5 + 4)); // interval 60
        let s = stats.snapshot();
        assert_eq!(s.five_minute.read_hits, 3);
        clock.set(Duration::from_secs(61 * 5)); // interval 61: interval 1 drops out
        let s = stats.snapshot();
        assert_eq!(s.five_minute.read_hits, 0);
        assert_eq!(s.hour.read_hits, 3);
        assert_eq!(s.total.read_hits, 3);
    }
}
