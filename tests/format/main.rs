//! The on-disk format: superblocks, journal records, the backing-device superblock (decode and
//! crash safety), recovery round trips, and the golden images that pin format version 1.

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod backing_crash;
mod backing_decode;
#[path = "../support/golden.rs"]
mod golden;
mod golden_images;
mod records;
mod recovery_roundtrip;
mod superblock;
