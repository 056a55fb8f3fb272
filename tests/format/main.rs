//! The on-disk format: superblocks, journal records, the backing-device superblock (decode and
//! crash safety) and recovery round trips.

mod backing_crash;
mod backing_decode;
mod records;
mod recovery_roundtrip;
mod superblock;
