//! Mutation tests of the crash simulation: each arms a fail point (`ubcache::failpoints`) that
//! breaks one crash-ordering rule on purpose during the workload, and requires the crash harness
//! (`tests/support/crash_harness.rs`) to find violations: a harness that cannot see a broken
//! FLUSH proves nothing.
//!
//! Fail points are process-global, so these tests live in a test crate of their own (no test of
//! another crate can meet an armed point) and each runs inside a `fail::FailScenario`, which
//! runs them one at a time and disarms every point at its end. They need the library's
//! `failpoints` feature, which the crate's dev-dependency on itself turns on for every test build.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../support/crash_harness.rs"]
mod crash_harness;

use crash_harness::{campaign, concurrent_campaign, report};
use std::time::Instant;
use ubcache::cache::CacheMode;
use ubcache::failpoints;

/// Runs the tests of this crate one at a time (fail points are process-global); disarms every
/// fail point when dropped.
fn serial() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// The harness must catch a FLUSH that does not sync the cache before its journal record.
#[test]
fn mutation_flush_without_cache_sync_is_detected() {
    let _serial = serial();
    let started = Instant::now();
    let t = campaign(CacheMode::Writeback, Some(failpoints::COMMIT_SKIP_CACHE_SYNC), 0..3, 70, 3, false);
    report("mutation: flush skips cache sync", &t, started);
    assert!(t.violations > 0, "the crash harness did not detect a FLUSH that skips the cache sync");
}

/// The harness must catch a bucket reused before its bumped generation is durable.
#[test]
fn mutation_bucket_reuse_before_generation_durable_is_detected() {
    let _serial = serial();
    let started = Instant::now();
    let t = campaign(CacheMode::Writeback, Some(failpoints::RECLAIM_SKIP_GEN_COMMIT), 0..3, 70, 3, false);
    report("mutation: bucket reuse before generation durable", &t, started);
    assert!(
        t.violations > 0,
        "the crash harness did not detect bucket reuse before the generation was durable"
    );
}

/// The concurrent harness, too, must see a FLUSH that skips the cache sync.
#[test]
fn mutation_flush_without_cache_sync_is_detected_under_concurrency() {
    let _serial = serial();
    let started = Instant::now();
    let tally = concurrent_campaign(Some(failpoints::COMMIT_SKIP_CACHE_SYNC), 300);
    report("mutation under concurrency: flush skips cache sync", &tally, started);
    assert!(
        tally.violations > 0,
        "the concurrent crash harness did not detect a FLUSH that skips the cache sync"
    );
}
