//! ubcache: a userspace, bcache-style caching block device served over NBD.
//!
//! The crate is a library first: the `ubcache` binary and every test drive the same API.
//! - [`dev`]: the [`dev::BlockDev`] trait every byte of I/O goes through, and its devices.
//! - [`nbd`]: the NBD wire protocol, server and a small client.
//! - [`mod@format`]: every on-disk byte of a cache set outside the btree (superblocks, layout,
//!   journal records, bucket table).
//! - [`journal`]: the journal ring with group commit and replay.
//! - [`alloc`]: buckets, generations, free lists, reclaim.
//! - [`cache`]: the cache engine: `CacheSet` (format, open with crash recovery, FLUSH,
//!   checkpoint, writeback) and `CachedDev`, a backing device served through the cache.
//! - [`check`]: fsck, cross-checking btree x allocator x journal.
//! - [`serve`]: `ubcache serve`: options, default files, exports, running the server.
//! - [`cache`]: the cache set engine (`CacheSet`, per-backing `CachedDev`, modes, recovery).
//! - [`check`]: fsck of a cache set.
//! - [`record`]: recording an export's writes, flushes and marks to a replayable log.
//! - [`ctl`]: the control socket (JSON), statistics and Prometheus metrics.
//! - [`wbpolicy`]: writeback policy as pure functions (rate controller, extent coalescing).
//! - [`writeback`]: the background writeback thread (key buffer, coalescing, rate control).
//! - [`engine_ctl`]: the cache engine behind the control socket ([`ctl::ControlTarget`]).
//!
//! The btree of extent keys lives in its own crate, `ubcache-btree`, with no I/O of its own.

pub mod alloc;
pub mod cache;
pub mod check;
pub mod ctl;
pub mod dev;
pub mod engine_ctl;
pub mod format;
pub mod fuzzing;
pub mod journal;
pub mod nbd;
pub mod record;
pub mod serve;
pub mod wbpolicy;
pub mod writeback;
