//! Writeback skips its journal commit when the keys it writes are already durable
//! (`CacheSet::write_back_scanned` with the scan's journal seq), but never when they are not:
//! a dirty key that no FLUSH made durable must be committed before its data reaches backing.
//! Otherwise a crash leaves the older clean key durable over backing that already holds the
//! newer data: the cache serves the old value and the sector changes by itself when that key is
//! evicted. The test crashes right after the writeback and checks that the cache and backing
//! agree on the sector after recovery.

use crate::fixtures::{TINY, tiny_config};
use std::sync::Arc;
use ubcache::cache::writeback::DirtyKeyBuf;
use ubcache::cache::writeback::policy::CoalesceLimits;
use ubcache::cache::{CacheMode, CacheSet};
use ubcache::dev::{BlockDev, SimDev};
use ubcache::format::read_backing_superblock;
use ubcache_btree::Pos;

const EXPORT_BYTES: u64 = 64 * 1024;
const LIMITS: CoalesceLimits = CoalesceLimits { max_io_len: 2048, max_extents: 64 };

fn dynd(d: &Arc<SimDev>) -> Arc<dyn BlockDev> {
    Arc::clone(d) as Arc<dyn BlockDev>
}

/// Sector 0..8 holds `old` durably as a clean cached key (and on backing); then `new` is written
/// in writeback mode without a FLUSH. Returns the devices and the open set.
fn old_clean_then_new_dirty(old: &[u8], new: &[u8]) -> (Arc<SimDev>, Arc<SimDev>, Arc<CacheSet>) {
    let cache = Arc::new(SimDev::new(1 << 20));
    let backing = Arc::new(SimDev::new(8192 + EXPORT_BYTES));
    ubcache::cache::format(&dynd(&cache), &[dynd(&backing)], TINY).unwrap();
    let set = Arc::new(
        CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writethrough)).unwrap(),
    );
    set.set_sequential_cutoff(0);
    let dev = set.device(0).unwrap();
    dev.write_at(old, 0).unwrap();
    dev.sync().unwrap();
    dev.set_mode(CacheMode::Writeback, false).unwrap();
    dev.write_at(new, 0).unwrap();
    assert!(set.stats().dirty_bytes > 0);
    (cache, backing, set)
}

/// Crashes both devices (unsynced writes dropped), recovers, and returns (read through the
/// cache, raw backing) of the first 4 KiB.
fn crash_and_read(cache: &SimDev, backing: &SimDev) -> (Vec<u8>, Vec<u8>) {
    cache.crash_now();
    backing.crash_now();
    let cache = Arc::new(SimDev::from_image(cache.durable_image()));
    let backing = Arc::new(SimDev::from_image(backing.durable_image()));
    let sb = read_backing_superblock(backing.as_ref()).unwrap().unwrap();
    let set = CacheSet::open(dynd(&cache), &[dynd(&backing)], tiny_config(CacheMode::Writeback)).unwrap();
    let mut through = vec![0u8; 4096];
    set.device(0).unwrap().read_at(&mut through, 0).unwrap();
    let mut raw = vec![0u8; 4096];
    backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
    (through, raw)
}

#[test]
fn writeback_of_unflushed_dirty_keys_commits_them_before_backing_gets_the_data() {
    let (old, new) = (vec![0x11u8; 4096], vec![0x22u8; 4096]);
    let (cache, backing, set) = old_clean_then_new_dirty(&old, &new);
    let mut keybuf = DirtyKeyBuf::new(16);
    let keys = keybuf.take(&set, 16, u64::MAX).unwrap();
    assert!(!keys.is_empty());
    let report = set.write_back_scanned(&keys, keybuf.scanned_seq(), LIMITS).unwrap();
    assert_eq!(report.bytes_written, 4096);
    let (through, raw) = crash_and_read(&cache, &backing);
    assert!(raw == new, "the writeback's backing write was not synced");
    assert!(
        through == raw,
        "after the crash the cache serves {:#x} but backing holds {:#x}: the dirty key was not durable",
        through[0],
        raw[0]
    );
}

#[test]
fn write_back_keys_commits_pending_dirty_keys_first() {
    // write_back_keys knows no scan: it must commit whatever is pending.
    let (old, new) = (vec![0x33u8; 4096], vec![0x44u8; 4096]);
    let (cache, backing, set) = old_clean_then_new_dirty(&old, &new);
    let keys = set.scan_dirty(Pos::MIN, 16).unwrap().keys;
    set.write_back_keys(&keys, LIMITS).unwrap();
    let (through, raw) = crash_and_read(&cache, &backing);
    assert!(through == raw && raw == new, "cache {:#x}, backing {:#x}", through[0], raw[0]);
}

#[test]
fn keys_already_durable_are_written_back_without_a_commit() {
    let (old, new) = (vec![0x55u8; 4096], vec![0x66u8; 4096]);
    let (cache, backing, set) = old_clean_then_new_dirty(&old, &new);
    set.sync().unwrap();
    let commits = set.stats().journal_commits;
    let mut keybuf = DirtyKeyBuf::new(16);
    let keys = keybuf.take(&set, 16, u64::MAX).unwrap();
    let report = set.write_back_scanned(&keys, keybuf.scanned_seq(), LIMITS).unwrap();
    assert_eq!(report.keys_written, keys.len());
    assert_eq!(set.stats().journal_commits, commits, "a commit was made for keys already durable");
    // The clean entry is not durable yet: after a crash the key is dirty again, and cache and
    // backing still agree.
    let (through, raw) = crash_and_read(&cache, &backing);
    assert!(through == new && raw == new, "cache {:#x}, backing {:#x}", through[0], raw[0]);
}
