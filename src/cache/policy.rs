//! Mode policy as pure functions: where a write goes, whether a read miss fills the cache, and
//! the sequential-cutoff detector. The engine asks these and then does the I/O; nothing here
//! touches a device, so every decision is unit-tested on its own.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

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
/// write goes to the cache even when it would bypass (CACHE_DESIGN rule 6: a bypass write to
/// backing could race the writeback of the older dirty copy). In the other modes the engine sends
/// it to backing with the ordering "write backing, sync backing, then invalidate".
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
        self.tick += 1;
        let end = offset.saturating_add(len);
        let sequential = if let Some(s) = self.streams.iter_mut().find(|s| s.dev == dev && s.next == offset) {
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
        };
        self.cutoff != 0 && sequential >= self.cutoff
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
