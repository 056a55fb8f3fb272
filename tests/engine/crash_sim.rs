//! Crash simulation of the durability contract (the harness, and what it checks, is in
//! `tests/support/crash_harness.rs`): every mode, mode switches, and concurrent writers.
//! Its mutation tests, which arm fail points, run in their own test crate (`tests/mutations/`).

use crate::crash_harness::{Tally, campaign, concurrent_campaign, report};
use std::time::Instant;
use ubcache::cache::CacheMode;

#[test]
fn crash_states_keep_the_durability_contract_in_writeback_mode() {
    let started = Instant::now();
    let t = campaign(CacheMode::Writeback, None, 0..6, 70, 3, false);
    report("writeback", &t, started);
    assert!(t.states > 500, "too few crash states: {}", t.states);
    assert_eq!(t.violations, 0, "{:#?}", t.first);
}

#[test]
fn crash_states_keep_the_durability_contract_in_writethrough_and_writearound() {
    let started = Instant::now();
    let mut t = campaign(CacheMode::Writethrough, None, 100..104, 70, 2, false);
    let t2 = campaign(CacheMode::Writearound, None, 200..203, 70, 2, false);
    t.states += t2.states;
    t.violations += t2.violations;
    t.recovery_crashes += t2.recovery_crashes;
    t.first.extend(t2.first);
    report("writethrough+writearound", &t, started);
    assert!(t.states > 300, "too few crash states: {}", t.states);
    assert_eq!(t.violations, 0, "{:#?}", t.first);
}

/// Mode switches in the middle of the workload: writes over dirty data in writethrough,
/// writearound and none, leaving writeback with and without writing dirty data home.
#[test]
fn crash_states_keep_the_durability_contract_across_mode_switches() {
    let started = Instant::now();
    let t = campaign(CacheMode::Writeback, None, 300..304, 80, 2, true);
    report("mode switches", &t, started);
    assert!(t.states > 300, "too few crash states: {}", t.states);
    assert_eq!(t.violations, 0, "{:#?}", t.first);
}

/// Soak: many more seeds and longer workloads. Run with
/// `cargo test --release --test engine crash_sim -- --ignored --nocapture` (CRASH_SEEDS sets the count).
#[test]
#[ignore = "soak run, minutes; see the doc comment"]
fn crash_soak() {
    let seeds: u64 = std::env::var("CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let started = Instant::now();
    let mut total = Tally::default();
    for (i, mode) in CacheMode::ALL.into_iter().enumerate() {
        let base = 10_000 * (i as u64 + 1);
        let t = campaign(mode, None, base..base + seeds, 120, 3, true);
        report(&format!("soak {mode}"), &t, started);
        total.states += t.states;
        total.violations += t.violations;
        total.first.extend(t.first);
    }
    assert_eq!(total.violations, 0, "{:#?}", total.first);
}

/// Several threads write, FUA-write, read and FLUSH disjoint ranges at once (group commit under
/// contention) while power is cut after a random number of cache or backing writes. Every FLUSH
/// or FUA a thread saw acknowledged must hold for its sectors after recovery.
#[test]
fn concurrent_workload_crash_states_keep_flushed_writes() {
    let started = Instant::now();
    let tally = concurrent_campaign(None, 300);
    report("concurrent", &tally, started);
    assert!(tally.states >= 1000);
    assert_eq!(tally.violations, 0, "{:#?}", tally.first);
}
