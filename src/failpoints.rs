//! Named fail points: places where a test can make the engine break one of its own ordering
//! rules on purpose, to prove that the crash harness notices (a harness that cannot see a
//! broken FLUSH proves nothing).
//!
//! They exist only when the crate is built with the `failpoints` feature (the test suite turns
//! it on through the crate's dev-dependency on itself). Without it [`returns`] is a constant
//! `false` the compiler folds away, and the `fail` crate is not even compiled: a release build
//! pays nothing.
//!
//! A test arms one with `fail::cfg(NAME, "return")` inside a `fail::FailScenario` (fail points
//! are process-global: the scenario serialises the tests that use them and disarms every
//! point when it ends). Every point is listed here, with the rule it breaks.

/// A journal commit (FLUSH, FUA, a full journal buffer) skips the cache-device sync before it
/// writes its record, so a durable key can point at cache data that a crash loses (breaks
/// crash rule 1, data before metadata).
pub const COMMIT_SKIP_CACHE_SYNC: &str = "cache::commit::skip_cache_sync";

/// Reclaim makes buckets allocatable before the journal entries bumping their generations are
/// durable, so after a crash an old key's generation still matches a bucket that now holds
/// other data (breaks crash rule 2, bucket reuse).
pub const RECLAIM_SKIP_GEN_COMMIT: &str = "cache::reclaim::skip_gen_commit";

/// Every fail point, for tests that check each one is caught.
pub const ALL: [&str; 2] = [COMMIT_SKIP_CACHE_SYNC, RECLAIM_SKIP_GEN_COMMIT];

/// Whether fail point `name` is armed with the `return` action now.
#[cfg(feature = "failpoints")]
#[must_use]
pub fn returns(name: &str) -> bool {
    fail::eval(name, |_| ()).is_some()
}

/// Whether fail point `name` is armed: never, without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
#[must_use]
pub fn returns(_name: &str) -> bool {
    false
}
