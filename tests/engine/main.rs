//! The cache engine on in-memory and crash-simulating devices: bucket allocator, journal,
//! cache modes, bypass and congestion, replacement, attach/detach, corruption, and the crash
//! simulation of the durability contract.

#[path = "../support/cache_support.rs"]
mod cache_support;
#[path = "../support/crash_harness.rs"]
mod crash_harness;

mod alloc_buckets;
mod alloc_model;
mod cache_attach;
mod cache_bypass;
mod cache_congestion_model;
mod cache_corruption;
mod cache_mode_persist;
mod cache_model;
mod cache_modes;
mod cache_races;
mod cache_replacement_policy;
mod crash_sim;
mod gc_full_cache;
mod journal_model;
mod journal_replay;
