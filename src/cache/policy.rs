//! Mode policy as pure functions: where a write goes, whether a read miss fills the cache, and
//! the sequential-cutoff detector. The engine asks these and then does the I/O; nothing here
//! touches a device, so every decision is unit-tested on its own.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a backing device is cached (bcache's `cache_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Writes go to backing and cache; acknowledged when both are done; keys are clean.
    Writethrough,
    /// Writes go to the cache only (dirty keys, journalled); written home later.
    Writeback,
    /// Writes go to backing and invalidate the cached range; reads still fill the cache.
    Writearound,
    /// Backing only: writes invalidate, reads do not fill. Dirty data still cached is served.
    None,
}

impl CacheMode {
    /// Every mode, for tests and the CLI's help text.
    pub const ALL: [CacheMode; 4] =
        [CacheMode::Writethrough, CacheMode::Writeback, CacheMode::Writearound, CacheMode::None];

    /// Stable small number, for an atomic and the on-disk/config encoding.
    #[must_use]
    pub fn to_u8(self) -> u8 {
        match self {
            CacheMode::Writethrough => 0,
            CacheMode::Writeback => 1,
            CacheMode::Writearound => 2,
            CacheMode::None => 3,
        }
    }

    /// Inverse of [`CacheMode::to_u8`]; `None` (the Option) for an unknown value.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<CacheMode> {
        match v {
            0 => Some(CacheMode::Writethrough),
            1 => Some(CacheMode::Writeback),
            2 => Some(CacheMode::Writearound),
            3 => Some(CacheMode::None),
            _ => Option::None,
        }
    }

    /// The lowercase name used by the CLI and the control socket.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writeback => "writeback",
            CacheMode::Writearound => "writearound",
            CacheMode::None => "none",
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CacheMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            format!("unknown cache mode {s:?} (expected writethrough, writeback, writearound or none)")
        })
    }
}

/// Where the data of one write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRoute {
    /// Into the cache only, as a dirty key (writeback).
    CacheDirty,
    /// To backing and into the cache as a clean key (writethrough).
    CacheAndBacking,
    /// To backing only; the cached range is invalidated.
    Backing,
}

/// Decides where a write goes.
///
/// `sequential_bypass`: the sequential-cutoff detector says this stream bypasses the cache.
/// `overlaps_dirty`: some sector of the write is currently cached dirty. In writeback mode such a
/// write goes to the cache even when it would bypass (crash rule 6 of `docs/design.md`: a bypass
/// write to backing could race the writeback of the older dirty copy). In the other modes the
/// engine sends it to backing with the ordering "write backing, sync backing, then invalidate".
#[must_use]
pub fn write_route(mode: CacheMode, sequential_bypass: bool, overlaps_dirty: bool) -> WriteRoute {
    match mode {
        CacheMode::Writeback if overlaps_dirty || !sequential_bypass => WriteRoute::CacheDirty,
        CacheMode::Writethrough if !sequential_bypass => WriteRoute::CacheAndBacking,
        CacheMode::Writeback | CacheMode::Writethrough | CacheMode::Writearound | CacheMode::None => {
            WriteRoute::Backing
        }
    }
}

/// Why a request bypassed the cache (went to backing only / did not fill the cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BypassReason {
    /// The cache mode does not cache this kind of request (writearound writes, mode none).
    Mode,
    /// Part of a sequential stream past the sequential cutoff.
    Sequential,
    /// The cache device is congested (its latency is over the threshold).
    Congestion,
    /// No cache space could be freed.
    Full,
}

impl BypassReason {
    /// Every reason, in the order statistics list them.
    pub const ALL: [BypassReason; 4] =
        [BypassReason::Mode, BypassReason::Sequential, BypassReason::Congestion, BypassReason::Full];

    /// The lowercase name (Prometheus `reason` label).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            BypassReason::Mode => "mode",
            BypassReason::Sequential => "sequential",
            BypassReason::Congestion => "congestion",
            BypassReason::Full => "full",
        }
    }
}

/// Why a write would bypass the cache, before the dirty-overlap rule of [`write_route`]:
/// the mode first, then the sequential cutoff, then congestion. `None`: the mode caches it.
#[must_use]
pub fn write_bypass_reason(mode: CacheMode, sequential: bool, congested: bool) -> Option<BypassReason> {
    match mode {
        CacheMode::Writearound | CacheMode::None => Some(BypassReason::Mode),
        CacheMode::Writeback | CacheMode::Writethrough if sequential => Some(BypassReason::Sequential),
        CacheMode::Writeback | CacheMode::Writethrough if congested => Some(BypassReason::Congestion),
        CacheMode::Writeback | CacheMode::Writethrough => None,
    }
}

/// Why a read miss would not fill the cache: the mode, then the sequential cutoff, then
/// congestion. `None`: misses fill the cache.
#[must_use]
pub fn read_bypass_reason(mode: CacheMode, sequential: bool, congested: bool) -> Option<BypassReason> {
    match mode {
        CacheMode::None => Some(BypassReason::Mode),
        _ if sequential => Some(BypassReason::Sequential),
        _ if congested => Some(BypassReason::Congestion),
        CacheMode::Writethrough | CacheMode::Writeback | CacheMode::Writearound => None,
    }
}

/// Whether a read miss (data read from backing) is inserted into the cache.
#[must_use]
pub fn fill_on_read_miss(mode: CacheMode, sequential_bypass: bool) -> bool {
    match mode {
        CacheMode::None => false,
        CacheMode::Writethrough | CacheMode::Writeback | CacheMode::Writearound => !sequential_bypass,
    }
}

/// Default sequential cutoff, as in bcache: streams longer than this bypass the cache.
pub const DEFAULT_SEQUENTIAL_CUTOFF: u64 = 4 << 20;

/// Number of streams tracked at once (bcache tracks 128 recent I/Os per device).
const TRACKED_STREAMS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Stream {
    dev: u32,
    /// Byte offset where the stream's last request ended: the next sequential request starts here.
    next: u64,
    /// Bytes the stream has transferred sequentially so far.
    sequential: u64,
    last_used: u64,
}

/// Tracks recent request streams (bcache's per-device `recent_io`): a request that starts where
/// a tracked stream ended continues it; once a stream has moved `cutoff` bytes sequentially, its
/// requests bypass the cache (large sequential I/O gains nothing from an SSD and would evict hot
/// data). Bounded memory: the least recently used stream is forgotten.
#[derive(Debug)]
pub struct SequentialDetector {
    cutoff: u64,
    streams: Vec<Stream>,
    tick: u64,
}

impl SequentialDetector {
    /// A detector with the given cutoff in bytes; 0 disables bypassing.
    #[must_use]
    pub fn new(cutoff: u64) -> Self {
        Self { cutoff, streams: Vec::with_capacity(TRACKED_STREAMS), tick: 0 }
    }

    /// The cutoff in bytes (0 = disabled).
    #[must_use]
    pub fn cutoff(&self) -> u64 {
        self.cutoff
    }

    /// Changes the cutoff; tracked streams are kept.
    pub fn set_cutoff(&mut self, cutoff: u64) {
        self.cutoff = cutoff;
    }

    /// Records a request of `len` bytes at `offset` on `dev` and returns whether it bypasses the
    /// cache (its stream, including this request, has reached the cutoff).
    pub fn observe(&mut self, dev: u32, offset: u64, len: u64) -> bool {
        let sequential = self.observe_stream(dev, offset, len);
        self.cutoff != 0 && sequential >= self.cutoff
    }

    /// Records a request like [`SequentialDetector::observe`] and returns the bytes its stream
    /// has moved sequentially, this request included (the congestion cutoff compares this).
    pub fn observe_stream(&mut self, dev: u32, offset: u64, len: u64) -> u64 {
        self.tick += 1;
        let end = offset.saturating_add(len);
        if let Some(s) = self.streams.iter_mut().find(|s| s.dev == dev && s.next == offset) {
            s.sequential = s.sequential.saturating_add(len);
            s.next = end;
            s.last_used = self.tick;
            s.sequential
        } else {
            let fresh = Stream { dev, next: end, sequential: len, last_used: self.tick };
            if self.streams.len() < TRACKED_STREAMS {
                self.streams.push(fresh);
            } else if let Some(lru) = self.streams.iter_mut().min_by_key(|s| s.last_used) {
                *lru = fresh;
            }
            len
        }
    }

    /// Whether a stream that has moved `stream_bytes` is past the sequential cutoff.
    #[must_use]
    pub fn past_cutoff(&self, stream_bytes: u64) -> bool {
        self.cutoff != 0 && stream_bytes >= self.cutoff
    }
}

/// Largest congestion cutoff: just over its threshold, a congested cache still takes every
/// request (and stream) smaller than this.
pub const CONGESTED_MAX_CUTOFF: u64 = 1 << 20;

/// Congestion policy (bcache's `bch_get_congested` + `check_should_bypass`, made
/// deterministic): `None` when the cache is not congested (`threshold_us` 0 disables it, or the
/// latency is at most the threshold); otherwise the stream size in bytes at or above which a
/// request bypasses the cache. The cutoff starts at [`CONGESTED_MAX_CUTOFF`] and halves for
/// every eighth of the threshold the latency is over it: at 1.5x the threshold streams of
/// 64 KiB and more bypass, at 2x of 4 KiB and more, and from about 2.6x every request (cutoff 0).
/// bcache draws a random cutoff from the same kind of curve; a deterministic one bypasses the
/// same share of large I/O and is testable.
#[must_use]
pub fn congestion_cutoff(latency_us: u64, threshold_us: u64) -> Option<u64> {
    if threshold_us == 0 || latency_us <= threshold_us {
        return None;
    }
    let steps = (latency_us - threshold_us).saturating_mul(8) / threshold_us;
    Some(if steps >= 64 { 0 } else { CONGESTED_MAX_CUTOFF >> steps })
}

/// Weight of a new sample in the latency average: 1/8 (bcache's EWMA weight for I/O latency
/// is of the same order), so one outlier moves it little and a sustained slowdown quickly.
const LATENCY_EWMA_SHIFT: u32 = 3;
/// With no new sample, the average halves every this many microseconds: a congested cache
/// sees fewer requests (they bypass), so without decay it would stay "congested" forever.
const LATENCY_HALF_LIFE_US: u64 = 1_000_000;

/// A moving average of one kind of cache-device latency (microseconds), decaying with time when
/// no new samples arrive. Lock-free: updates race benignly (a lost sample only smooths more).
#[derive(Debug)]
pub struct LatencyAverage {
    origin: std::time::Instant,
    average_us: AtomicU64,
    /// Microseconds since `origin` of the last sample.
    updated_us: AtomicU64,
}

impl Default for LatencyAverage {
    fn default() -> Self {
        Self {
            origin: std::time::Instant::now(),
            average_us: AtomicU64::new(0),
            updated_us: AtomicU64::new(0),
        }
    }
}

impl LatencyAverage {
    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Adds one I/O that took `took`.
    pub fn record(&self, took: std::time::Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let now = self.now_us();
        let current =
            decayed(self.average_us.load(Ordering::Relaxed), self.updated_us.load(Ordering::Relaxed), now);
        let next = if sample >= current {
            current + ((sample - current) >> LATENCY_EWMA_SHIFT)
        } else {
            current - ((current - sample) >> LATENCY_EWMA_SHIFT)
        };
        self.average_us.store(next, Ordering::Relaxed);
        self.updated_us.store(now, Ordering::Relaxed);
    }

    /// The average now (decayed since the last sample), microseconds.
    #[must_use]
    pub fn current_us(&self) -> u64 {
        decayed(
            self.average_us.load(Ordering::Relaxed),
            self.updated_us.load(Ordering::Relaxed),
            self.now_us(),
        )
    }
}

fn decayed(average: u64, updated_us: u64, now_us: u64) -> u64 {
    let halvings = now_us.saturating_sub(updated_us) / LATENCY_HALF_LIFE_US;
    if halvings >= 64 { 0 } else { average >> halvings }
}

/// Cache-device latency as the engine sees it, and the congestion thresholds (runtime knobs).
#[derive(Debug)]
pub struct CongestionTracker {
    pub read: LatencyAverage,
    pub write: LatencyAverage,
    read_threshold_us: AtomicU64,
    write_threshold_us: AtomicU64,
}

impl CongestionTracker {
    /// A tracker with the given thresholds (0 disables).
    #[must_use]
    pub fn new(read_threshold_us: u64, write_threshold_us: u64) -> Self {
        Self {
            read: LatencyAverage::default(),
            write: LatencyAverage::default(),
            read_threshold_us: AtomicU64::new(read_threshold_us),
            write_threshold_us: AtomicU64::new(write_threshold_us),
        }
    }

    /// (read, write) thresholds in microseconds.
    #[must_use]
    pub fn thresholds(&self) -> (u64, u64) {
        (self.read_threshold_us.load(Ordering::Relaxed), self.write_threshold_us.load(Ordering::Relaxed))
    }

    pub fn set_read_threshold(&self, us: u64) {
        self.read_threshold_us.store(us, Ordering::Relaxed);
    }

    pub fn set_write_threshold(&self, us: u64) {
        self.write_threshold_us.store(us, Ordering::Relaxed);
    }

    /// Whether a read stream of `stream_bytes` bypasses for congestion now.
    #[must_use]
    pub fn read_bypasses(&self, stream_bytes: u64) -> bool {
        congestion_cutoff(self.read.current_us(), self.read_threshold_us.load(Ordering::Relaxed))
            .is_some_and(|cutoff| stream_bytes >= cutoff)
    }

    /// Whether a write stream of `stream_bytes` bypasses for congestion now.
    #[must_use]
    pub fn write_bypasses(&self, stream_bytes: u64) -> bool {
        congestion_cutoff(self.write.current_us(), self.write_threshold_us.load(Ordering::Relaxed))
            .is_some_and(|cutoff| stream_bytes >= cutoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_routes_follow_the_mode_table() {
        use CacheMode::*;
        use WriteRoute::*;
        let table = [
            (Writeback, false, false, CacheDirty),
            (Writeback, true, false, Backing),
            (Writeback, true, true, CacheDirty),
            (Writeback, false, true, CacheDirty),
            (Writethrough, false, false, CacheAndBacking),
            (Writethrough, false, true, CacheAndBacking),
            (Writethrough, true, false, Backing),
            (Writearound, false, false, Backing),
            (Writearound, false, true, Backing),
            (None, false, false, Backing),
            (None, true, true, Backing),
        ];
        for (mode, seq, dirty, want) in table {
            assert_eq!(write_route(mode, seq, dirty), want, "{mode} seq={seq} dirty={dirty}");
        }
    }

    #[test]
    fn read_fill_only_when_mode_caches_and_stream_is_not_sequential() {
        assert!(fill_on_read_miss(CacheMode::Writearound, false));
        assert!(fill_on_read_miss(CacheMode::Writeback, false));
        assert!(!fill_on_read_miss(CacheMode::Writethrough, true));
        assert!(!fill_on_read_miss(CacheMode::None, false));
    }

    #[test]
    fn bypass_reasons_follow_mode_then_sequential_then_congestion() {
        use CacheMode::*;
        assert_eq!(write_bypass_reason(Writearound, false, false), Some(BypassReason::Mode));
        assert_eq!(write_bypass_reason(None, true, true), Some(BypassReason::Mode));
        assert_eq!(write_bypass_reason(Writeback, true, true), Some(BypassReason::Sequential));
        assert_eq!(write_bypass_reason(Writethrough, false, true), Some(BypassReason::Congestion));
        assert_eq!(write_bypass_reason(Writeback, false, false), Option::None);
        assert_eq!(read_bypass_reason(None, false, false), Some(BypassReason::Mode));
        assert_eq!(read_bypass_reason(Writearound, true, true), Some(BypassReason::Sequential));
        assert_eq!(read_bypass_reason(Writearound, false, true), Some(BypassReason::Congestion));
        assert_eq!(read_bypass_reason(Writeback, false, false), Option::None);
    }

    #[test]
    fn congestion_cutoff_shrinks_as_latency_grows_and_zero_threshold_disables() {
        assert_eq!(congestion_cutoff(5_000, 0), Option::None);
        assert_eq!(congestion_cutoff(2_000, 2_000), Option::None);
        assert_eq!(congestion_cutoff(2_100, 2_000), Some(CONGESTED_MAX_CUTOFF));
        assert_eq!(congestion_cutoff(3_000, 2_000), Some(CONGESTED_MAX_CUTOFF >> 4));
        assert_eq!(congestion_cutoff(4_000, 2_000), Some(4096));
        assert_eq!(congestion_cutoff(u64::MAX, 1), Some(0));
        let mut last = u64::MAX;
        for latency in (2_001..20_000).step_by(97) {
            let c = congestion_cutoff(latency, 2_000).unwrap();
            assert!(c <= last, "cutoff must not grow with latency");
            last = c;
        }
        assert_eq!(last, 0);
    }

    #[test]
    fn latency_average_moves_toward_samples() {
        let avg = LatencyAverage::default();
        assert_eq!(avg.current_us(), 0);
        for _ in 0..64 {
            avg.record(std::time::Duration::from_millis(8));
        }
        let high = avg.current_us();
        assert!((7_000..=8_000).contains(&high), "{high}");
        for _ in 0..64 {
            avg.record(std::time::Duration::from_micros(10));
        }
        assert!(avg.current_us() < 200, "{}", avg.current_us());
        assert_eq!(decayed(8_000, 0, 3 * LATENCY_HALF_LIFE_US), 1_000);
    }

    #[test]
    fn mode_names_round_trip() {
        for m in CacheMode::ALL {
            assert_eq!(m.name().parse::<CacheMode>(), Ok(m));
            assert_eq!(CacheMode::from_u8(m.to_u8()), Some(m));
        }
        assert!("fast".parse::<CacheMode>().is_err());
        assert_eq!(CacheMode::from_u8(9), Option::None);
    }

    #[test]
    fn sequential_stream_bypasses_once_it_reaches_the_cutoff() {
        let mut d = SequentialDetector::new(4 << 20);
        let chunk = 1 << 20;
        // Four 1 MiB requests back to back: the fourth reaches 4 MiB.
        assert!(!d.observe(0, 0, chunk));
        assert!(!d.observe(0, chunk, chunk));
        assert!(!d.observe(0, 2 * chunk, chunk));
        assert!(d.observe(0, 3 * chunk, chunk));
        assert!(d.observe(0, 4 * chunk, chunk));
        // A random request elsewhere is its own stream and is cached.
        assert!(!d.observe(0, 100 << 20, 4096));
        // The same offsets on another device are another stream.
        assert!(!d.observe(1, 5 * chunk, chunk));
    }

    #[test]
    fn interleaved_streams_are_tracked_apart() {
        let mut d = SequentialDetector::new(8192);
        assert!(!d.observe(0, 0, 4096));
        assert!(!d.observe(0, 1 << 30, 4096));
        assert!(d.observe(0, 4096, 4096));
        assert!(d.observe(0, (1 << 30) + 4096, 4096));
    }

    #[test]
    fn zero_cutoff_never_bypasses_and_lru_forgets_old_streams() {
        let mut d = SequentialDetector::new(0);
        for i in 0..10 {
            assert!(!d.observe(0, i * 4096, 4096));
        }
        let mut d = SequentialDetector::new(8192);
        assert!(!d.observe(0, 0, 4096));
        for i in 0..TRACKED_STREAMS as u64 {
            d.observe(0, (i + 10) << 20, 512);
        }
        // The first stream was evicted: continuing it starts a fresh stream.
        assert!(!d.observe(0, 4096, 4096));
        assert_eq!(d.streams.len(), TRACKED_STREAMS);
    }
}
