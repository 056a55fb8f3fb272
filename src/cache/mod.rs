//! The cache engine: a cache set (one cache device shared by backing devices) and, per backing
//! device, a [`crate::dev::BlockDev`] that serves it through the cache.
//!
//! - [`set`]: [`CacheSet`] (format, open with crash recovery, commit/FLUSH, checkpoint,
//!   reclaim, writeback) — its module doc lists where each crash-ordering rule is kept.
//! - [`cached`]: [`CachedDev`], the per-backing data path for every [`CacheMode`].
//! - [`policy`]: mode decisions and the sequential-cutoff detector, as pure functions.
//! - [`inflight`]: fill/collision tracking and the writeback range lock.

pub mod cached;
pub mod error;
pub mod inflight;
pub mod policy;
pub mod set;
pub mod stats;
mod store;

pub use cached::CachedDev;
pub use error::{CacheError, CacheResult};
pub use policy::{CacheMode, SequentialDetector, WriteRoute};
pub use set::{CacheConfig, CacheSet, DebugKnobs, FormatOptions, RecoveryReport, format};
pub use stats::{Stats, StatsSnapshot};
