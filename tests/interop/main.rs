//! The real `ubcache` binary against real clients (qemu-io, nbdinfo, nbdcopy, fio, ext4 over
//! nbdfuse): see README, "Tests".

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

// Support: shared with other test crates (tests/support/), then this crate's own.
mod support;
#[path = "../support/tools.rs"]
mod tools;

mod cache_admin;
mod cache_modes;
mod cli;
mod ctl_runtime;
mod ext4;
mod ext4_crash;
mod fio;
mod nbd_backing;
mod nbdcopy;
mod nbdinfo;
mod qemu_io;
mod record;
mod replay;
