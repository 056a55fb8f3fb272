//! Writeback: dirty-key scans and batches, copying runs home, commit order, crashes during
//! writeback, races with foreground I/O, the writeback thread and its rate and coalescing policies.

#[path = "../support/cache_support.rs"]
mod cache_support;

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
