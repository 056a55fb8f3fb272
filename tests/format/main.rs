//! The on-disk format: superblocks, journal records, the backing-device superblock (decode and
//! crash safety) and recovery round trips.

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod backing_crash;
mod backing_decode;
mod records;
mod recovery_roundtrip;
mod superblock;
