//! The cache engine: a cache set (one cache device shared by backing devices) and, per backing
//! device, a [`crate::dev::BlockDev`] that serves it through the cache.
//!
//! - [`set`]: [`CacheSet`], split by responsibility: `open` (format, open with crash recovery,
//!   the load path fsck shares), `commit` (commit/FLUSH, checkpoint, reclaim), `attach` (attach,
//!   detach, mode) — its module doc lists where each crash-ordering rule is kept.
//! - [`cached`]: [`CachedDev`], the per-backing data path for every [`CacheMode`].
//! - [`policy`]: mode decisions and the sequential-cutoff detector, as pure functions.
//! - [`inflight`]: fill/collision tracking and the writeback range lock.
//! - [`writeback`]: writing dirty data home (the engine's writeback step and drain).
//! - [`usage`]: bucket, dirty and journal usage ([`CacheSet::usage`]).
//! - [`verify`]: the cross-checks of fsck as pure functions, run online by [`CacheSet::check`]
//!   and offline by [`crate::check::check`] (which consumes the recovery load path).
//!
//! # Decisions (the design, its numbered crash rules and the lock order: `docs/design.md`)
//! - **Commits run outside the metadata lock** (FLUSH, FUA, writeback, a full journal buffer):
//!   the committer notes the last appended entry, syncs, and writes only the entries up to it
//!   (`Journal::commit_through`), so an entry appended during its sync, whose data may not be
//!   durable yet, cannot reach the record (crash rule 1). Group commit still coalesces. Commits
//!   inside a larger locked step (reclaim, checkpoint, attach/detach) run under the lock.
//! - **A journal commit syncs the backing devices that took writes first.** So a durable clean
//!   key never claims data that backing could still lose.
//! - **Before a write to backing over cached data, pending entries are committed** (and clean
//!   pieces invalidated): otherwise a durable clean key - possibly hidden under a newer key that
//!   is not yet durable - could survive a crash over backing that already holds newer data, and
//!   the sector's value would later change by itself, on eviction. Writeback commits before it
//!   writes backing for the same reason. The crash harness found both; its "stability" check
//!   (write everything home after recovery, re-read) guards them.
//! - **Dirty data over a bypass write**: written to backing, backing synced, and only then the
//!   dirty key dropped. A crash in between keeps the dirty key, which wins and is written back.
//! - **Congestion bypass keeps the cache's answers**: when the cache device is slow (latency
//!   averages over `congested_*_threshold_us`), read misses skip the fill and writes take the
//!   bypass path above; read hits (dirty data included) still come from the cache, and in
//!   writeback mode a write over dirty data still goes into the cache (see `policy.rs`).
//! - **Runtime attach writes the cache superblock before the backing superblock**, so a crash
//!   in between leaves a device that still says Detached (used alone) and a harmless extra
//!   list entry; see [`CacheSet::attach`].
//! - **TRIM keeps dirty data** (TRIM is advisory; reads return old contents or zeros) and only
//!   discards the non-dirty sectors on backing.
//! - **Partial sectors are read-modify-written** under a per-device range lock that every write
//!   holds, so an unaligned write never loses a concurrent write to the same sector. TRIM of
//!   partial sectors is ignored (advisory).
//! - **Recovery ends with a checkpoint**, so a crash during recovery replays from the same (or the
//!   new, complete) checkpoint. Node slots of the checkpointed tree stay counted until then even
//!   if replay merged nodes away.
//!
//! # Known limitations
//! - A bit flip in the *last* journal record cannot be told from a torn write: replay drops it
//!   (`RecoveryReport::torn_tail`), losing the entries of that last commit.
//! - No data checksums: corruption of cached *data* is not detected (metadata is checksummed).
//! - Background writeback lives in [`writeback`] (key buffer, coalescing, PI rate control),
//!   next to the engine's synchronous steps it shares its copy path with.

pub mod cached;
pub mod error;
pub mod inflight;
pub mod policy;
pub mod set;
pub mod stats;
mod store;
pub mod usage;
pub mod verify;
pub mod writeback;

pub use cached::CachedDev;
pub use error::{CacheError, CacheResult, Corruption, Metadata};
pub use policy::{BypassReason, CacheMode, SequentialDetector, WriteRoute};
pub use set::{CacheConfig, CacheSet, Congestion, FormatOptions, RecoveryReport, format};
pub use stats::{Stats, StatsSnapshot};
pub use usage::CacheUsage;
pub use writeback::{DirtyScan, WritebackReport};
