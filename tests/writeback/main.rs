//! Writeback: dirty-key scans and batches, copying runs home, commit order, crashes during
//! writeback, races with foreground I/O, the writeback thread and its rate and coalescing policies.

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

// Support: shared with other test crates (tests/support/), then this crate's own.
#[path = "../support/fixtures.rs"]
mod fixtures;
mod gated_dev;
#[path = "../support/power_cut.rs"]
mod power_cut;

mod batches;
mod clean_runs;
mod coalesce_policy;
mod commit_order;
mod crash;
mod file_copy;
mod model;
mod races;
mod rate_policy;
mod thread;
