//! Rule 6 against a key buffer filled earlier: a writethrough write that replaces a dirty key on
//! backing *between* the writeback scan and the writeback of that key must win. The writeback
//! of the first key is parked on its backing write (so the scan is done and the second key is
//! still queued) while a writethrough write of the second key's range is issued; then the
//! writeback resumes. Either interleaving is right, as long as backing ends with the newer data:
//!
//! - `ubcache::writeback` (`CacheSet::write_back_keys`) takes the range locks of all its keys
//!   and validates them before it copies any data, so the writethrough write waits for the
//!   writeback (this test checks that it does) and then overwrites backing; a writethrough
//!   write that lands between the scan and the writeback call makes it skip the key.
//! - The engine's own `CacheSet::writeback_step` (used by `write_back_all`, `set_mode` with
//!   flush-first, `detach` and the write path when the cache is full) runs the same path since
//!   session 3. Before, it locked and validated key by key, and at first not at all: it wrote
//!   the stale copy over the newer data while a clean key claimed the newer data, so the
//!   acknowledged write was lost once that key was evicted. This test guards that too.

use crate::fixtures::{format_open, tiny_config};
use crate::gated_dev::GatedDev;
use std::sync::Arc;
use std::time::Duration;
use ubcache::cache::writeback::policy::CoalesceLimits;
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::read_backing_superblock;
use ubcache_btree::Pos;

const SECTOR: u64 = 512;

/// Runs the race with `writeback` as the writeback under test: the writethrough write must wait
/// while the writeback, whose range locks cover it, is parked. Returns whether backing holds
/// the newer data of the second range afterwards.
fn race(writeback: impl FnOnce(&CacheSet) + Send + 'static) -> bool {
    let cache: Arc<dyn BlockDev> = Arc::new(MemDev::new(1 << 20));
    let gated = Arc::new(GatedDev::new(8192 + (1 << 20)));
    let backing: Arc<dyn BlockDev> = Arc::clone(&gated) as Arc<dyn BlockDev>;
    let set = Arc::new(format_open(&cache, &backing, tiny_config(CacheMode::Writeback)));
    set.set_sequential_cutoff(0);
    let dev = set.devices().remove(0);
    let data_offset = read_backing_superblock(backing.as_ref()).unwrap().unwrap().data_offset_bytes;
    // Two dirty keys with a gap between them (never merged, never coalesced).
    dev.write_at(&[1u8; 4096], 0).unwrap();
    dev.write_at(&[2u8; 4096], 64 * SECTOR).unwrap();
    gated.arm(data_offset);
    let wb_set = Arc::clone(&set);
    let handle = std::thread::spawn(move || writeback(&wb_set));
    gated.wait_parked();
    // The first key's writeback is parked; the second key was scanned. A writethrough write
    // replaces the second key's data on backing and in the cache.
    dev.set_mode(CacheMode::Writethrough, false).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let writer_dev = dev.clone();
    let writer = std::thread::spawn(move || {
        writer_dev.write_at(&[3u8; 4096], 64 * SECTOR).unwrap();
        done_tx.send(()).unwrap();
    });
    assert!(
        done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the writethrough write completed while the writeback that holds its range was parked"
    );
    gated.release();
    handle.join().unwrap();
    writer.join().unwrap();
    let mut read = vec![0u8; 4096];
    dev.read_at(&mut read, 64 * SECTOR).unwrap();
    assert_eq!(read, vec![3u8; 4096], "the cache serves the newer data");
    let mut raw = vec![0u8; 4096];
    backing.read_at(&mut raw, data_offset + 64 * SECTOR).unwrap();
    raw == vec![3u8; 4096]
}

#[test]
fn write_back_keys_holds_off_a_writethrough_write_of_a_scanned_key() {
    let newest_on_backing = race(|set| {
        let keys = set.scan_dirty(Pos::MIN, 100).unwrap().keys;
        assert_eq!(keys.len(), 2);
        let report =
            set.write_back_keys(&keys, CoalesceLimits { max_io_len: 2048, max_extents: 64 }).unwrap();
        assert_eq!((report.keys_written, report.keys_skipped), (2, 0), "{report:?}");
    });
    assert!(newest_on_backing, "the stale copy of the second key overwrote the newer data on backing");
}

#[test]
fn write_back_keys_skips_a_key_replaced_on_backing_after_the_scan() {
    let cache: Arc<dyn BlockDev> = Arc::new(MemDev::new(1 << 20));
    let backing: Arc<dyn BlockDev> = Arc::new(MemDev::new(8192 + (1 << 20)));
    let set = format_open(&cache, &backing, tiny_config(CacheMode::Writeback));
    set.set_sequential_cutoff(0);
    let dev = set.devices().remove(0);
    let data_offset = read_backing_superblock(backing.as_ref()).unwrap().unwrap().data_offset_bytes;
    dev.write_at(&[1u8; 4096], 0).unwrap();
    dev.write_at(&[2u8; 4096], 64 * SECTOR).unwrap();
    let keys = set.scan_dirty(Pos::MIN, 100).unwrap().keys;
    assert_eq!(keys.len(), 2);
    dev.set_mode(CacheMode::Writethrough, false).unwrap();
    dev.write_at(&[3u8; 4096], 64 * SECTOR).unwrap();
    let report = set.write_back_keys(&keys, CoalesceLimits { max_io_len: 2048, max_extents: 64 }).unwrap();
    assert_eq!((report.keys_written, report.keys_skipped), (1, 1), "{report:?}");
    let mut raw = vec![0u8; 4096];
    backing.read_at(&mut raw, data_offset + 64 * SECTOR).unwrap();
    assert_eq!(raw, vec![3u8; 4096], "the stale copy of the second key overwrote the newer data on backing");
}

#[test]
fn engine_writeback_step_holds_off_a_writethrough_write_of_a_scanned_key() {
    let newest_on_backing = race(|set| {
        assert_eq!(set.writeback_step(16).unwrap(), 2);
    });
    assert!(newest_on_backing, "the stale copy of the second key overwrote the newer data on backing");
}
