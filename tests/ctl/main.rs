//! The control plane: socket protocol, server, client, CLI commands, stats, metrics, knobs,
//! flush, and the engine's control target.

#[path = "../support/cache_support.rs"]
mod cache_support;
mod ctl_support;

mod cli;
mod client;
mod engine_target;
mod flush;
mod knobs;
mod metrics;
mod server;
mod stats;
