//! The control plane: socket protocol, server, client, CLI commands, stats, metrics, knobs,
//! flush, and the engine's control target.

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

// Support: shared with other test crates (tests/support/), then this crate's own.
mod fake_engine;
#[path = "../support/fixtures.rs"]
mod fixtures;

mod cli;
mod client;
mod engine_target;
mod flush;
mod knobs;
mod metrics;
mod server;
mod stats;
