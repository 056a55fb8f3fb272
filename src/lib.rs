//! ubcache: a userspace, bcache-style caching block device served over NBD.
//!
//! The crate is a library first: the `ubcache` binary and every test drive the same API. Modules,
//! top layer first (a module imports only from layers below it; `docs/design.md` has the design):
//! - [`cli`]: the `ubcache` application (serve, format/show/check, control commands); nothing in
//!   the library imports it.
//! - [`record`]: recording an export's writes, flushes and marks to a replayable log (a
//!   `BlockDev` wrapper and the `mark` control verb), and replaying it.
//! - [`nbd`]: the NBD wire protocol, server, client and [`nbd::NbdDev`] (a remote export as a
//!   block device).
//! - [`ctl`]: the control socket (JSON), statistics, Prometheus metrics, and the cache engine
//!   behind them (`ctl::engine`).
//! - [`cache`]: the cache engine: `CacheSet` (format, open with crash recovery, FLUSH, checkpoint,
//!   writeback in [`cache::writeback`]) and `CachedDev`, a backing device served through it.
//! - [`check`]: fsck, cross-checking btree x allocator x journal.
//! - [`alloc`]: buckets, generations, free lists, reclaim.
//! - [`journal`]: the journal ring with group commit and replay.
//! - [`mod@format`]: every on-disk byte of a cache set outside the btree (superblocks, layout,
//!   journal records, bucket table).
//! - [`dev`]: the [`dev::BlockDev`] trait every byte of I/O goes through, and its devices.
//! - [`failpoints`]: named fail points that break one ordering rule on purpose (tests only;
//!   nothing without the `failpoints` feature).
//! - [`fuzzing`]: the checks the fuzz targets and the corpus replay test share.
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
pub mod record;
