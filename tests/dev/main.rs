//! Block devices: files, the crash simulator, fault injection, slow devices, a real loop device.

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod blockdev;
mod fault;
mod file;
mod sim;
mod slow;
