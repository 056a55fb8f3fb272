//! Writeback between real files, both ways it copies: buffered cache and backing files (the
//! data moves in the kernel, `copy_file_range`) and an `O_DIRECT` backing file (read into a
//! page-aligned buffer, written without a bounce). After a flush the backing file holds exactly
//! what was written, at the data offset behind its superblock.

use std::sync::Arc;
use ubcache::cache::writeback::{DrainStep, WritebackConfig};
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, FaultDev, FileDev, FileDevOptions};

const MIB: u64 = 1 << 20;
const EXPORT: u64 = 16 * MIB;
const DATA_OFFSET: u64 = 8192;

fn open_file(dir: &std::path::Path, name: &str, size: u64, direct: bool) -> FileDev {
    let opts = FileDevOptions { create_with_size: Some(size), direct, ..FileDevOptions::default() };
    FileDev::open(&dir.join(name), &opts).unwrap()
}

fn flush_round_trip(direct_backing: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cache: Arc<dyn BlockDev> = Arc::new(open_file(dir.path(), "cache.img", 64 * MIB, false));
    let backing: Arc<dyn BlockDev> =
        Arc::new(open_file(dir.path(), "backing.img", EXPORT + DATA_OFFSET, direct_backing));
    write_flush_and_compare(&cache, &backing, &format!("direct={direct_backing}"));
}

/// Writes through a writeback cache of `backing`, flushes everything home, and checks that
/// `backing` holds exactly what was written.
fn write_flush_and_compare(cache: &Arc<dyn BlockDev>, backing: &Arc<dyn BlockDev>, what: &str) {
    ubcache::cache::format(cache, std::slice::from_ref(backing), FormatOptions::default()).unwrap();
    let cfg = CacheConfig { mode: CacheMode::Writeback, sequential_cutoff: 0, ..CacheConfig::default() };
    let set = Arc::new(CacheSet::open(Arc::clone(cache), std::slice::from_ref(backing), cfg).unwrap());
    let dev = set.devices().remove(0);
    let mut model = vec![0u8; EXPORT as usize];
    // Contiguous 4 KiB writes (adjacent keys, long runs), then scattered odd-sized overwrites.
    for i in 0..1024u64 {
        let data = vec![(i % 200) as u8 + 1; 4096];
        dev.write_at(&data, 2 * MIB + i * 4096).unwrap();
        model[(2 * MIB + i * 4096) as usize..][..4096].copy_from_slice(&data);
    }
    for i in 0..300u64 {
        let (off, len) = ((i * 7919 * 512) % (EXPORT - 65536), 512 * (1 + i % 17));
        let data = vec![(i % 50) as u8 + 201; len as usize];
        dev.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    dev.sync().unwrap();
    assert!(set.stats().dirty_bytes > 4 * MIB);
    let written = DrainStep::new(Arc::clone(&set), WritebackConfig::for_drain()).run_to_end().unwrap();
    assert!(written >= 4 * MIB, "the flush wrote {written} bytes");
    assert_eq!(set.stats().dirty_bytes, 0);
    let mut home = vec![0u8; EXPORT as usize];
    backing.read_at(&mut home, DATA_OFFSET).unwrap();
    assert!(home == model, "{what}: the backing file differs from what was written");
}

#[test]
fn flush_between_buffered_files_copies_every_byte_home() {
    flush_round_trip(false);
}

#[test]
fn flush_to_a_direct_backing_file_copies_every_byte_home() {
    flush_round_trip(true);
}

/// A wrapper's capabilities reach the engine: writeback into a fault-injecting wrapper over a
/// buffered file still copies in the kernel, because the wrapper passes the file's bulk-copy
/// extension on (routed through its write rules). When a wrapper forgot to forward a hint, the
/// copy silently went through memory instead.
#[test]
fn a_fault_wrapper_over_a_buffered_file_keeps_the_kernel_copy() {
    let dir = tempfile::tempdir().unwrap();
    let cache: Arc<dyn BlockDev> = Arc::new(open_file(dir.path(), "cache.img", 64 * MIB, false));
    let faulty = Arc::new(FaultDev::new(open_file(dir.path(), "backing.img", EXPORT + DATA_OFFSET, false)));
    let caps = faulty.capabilities();
    assert!(caps.bulk.is_some() && caps.cheap_writes, "{caps:?}");
    let backing: Arc<dyn BlockDev> = faulty.clone();
    write_flush_and_compare(&cache, &backing, "fault wrapper");
    let counts = faulty.counts();
    assert!(counts.kernel_copies > 0, "writeback never copied in the kernel: {counts:?}");
}
