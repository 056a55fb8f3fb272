//! NBD: the server's protocol (handshake, commands, errors, limits) and the NBD client device.

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

// Support: shared with other test crates (tests/support/), then this crate's own.
#[path = "../support/tools.rs"]
mod tools;

mod nbd_dev;
mod protocol;
