//! The on-disk format: superblocks, journal records, the backing-device superblock (decode and
//! crash safety), recovery round trips, and the golden images that pin format version 1.

mod backing_crash;
mod backing_decode;
mod golden_images;
mod records;
mod recovery_roundtrip;
mod superblock;
