//! The cache engine: a cache set (one cache device shared by backing devices) and, per backing
//! device, a [`crate::dev::BlockDev`] that serves it through the cache.

pub mod inflight;
pub mod policy;
pub mod stats;

pub use policy::{CacheMode, SequentialDetector, WriteRoute};
pub use stats::{Stats, StatsSnapshot};
