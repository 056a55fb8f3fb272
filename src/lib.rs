//! ubcache: a userspace, bcache-style caching block device served over NBD.
//!
//! The crate is a library first: the `ubcache` binary and every test drive the same API.
//! - [`dev`]: the [`dev::BlockDev`] trait every byte of I/O goes through, and its devices.
//! - [`cli`]: the `ubcache` command-line application (serve, format/show/check, control
//!   commands) on top of everything below; nothing in the library imports it.
//! - [`nbd`]: the NBD wire protocol, server, client and [`nbd::NbdDev`], a remote export as a
//!   block device.
//! - [`mod@format`]: every on-disk byte of a cache set outside the btree (superblocks, layout,
//!   journal records, bucket table).
//! - [`journal`]: the journal ring with group commit and replay.
//! - [`alloc`]: buckets, generations, free lists, reclaim.
//! - [`cache`]: the cache engine: `CacheSet` (format, open with crash recovery, FLUSH,
//!   checkpoint, writeback in [`cache::writeback`]) and `CachedDev`, a backing device served through the cache.
//! - [`check`]: fsck, cross-checking btree x allocator x journal.
//! - [`failpoints`]: named fail points that break one ordering rule on purpose (tests only;
//!   nothing without the `failpoints` feature).
//! - [`ctl`]: the control socket (JSON), statistics and Prometheus metrics, and the engine
//!   behind it (`ctl::engine`).
//!
//! The btree of extent keys lives in its own crate, `ubcache-btree`, with no I/O of its own.

pub mod alloc;
pub mod cache;
pub mod check;
pub mod cli;
pub mod ctl;
pub mod dev;
pub mod failpoints;
pub mod format;
pub mod fuzzing;
pub mod journal;
pub mod nbd;
