//! Writeback between real files, both ways it copies: buffered cache and backing files (the
//! data moves in the kernel, `copy_file_range`) and an `O_DIRECT` backing file (read into a
//! page-aligned buffer, written without a bounce). After a flush the backing file holds exactly
//! what was written, at the data offset behind its superblock.

use std::sync::Arc;
use ubcache::cache::writeback::{DrainStep, WritebackConfig};
use ubcache::cache::{CacheConfig, CacheMode, CacheSet, FormatOptions};
use ubcache::dev::{BlockDev, FileDev, FileDevOptions};

const MIB: u64 = 1 << 20;
const EXPORT: u64 = 16 * MIB;
const DATA_OFFSET: u64 = 8192;

fn flush_round_trip(direct_backing: bool) {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, size: u64, direct: bool| -> Arc<dyn BlockDev> {
        let opts = FileDevOptions { create_with_size: Some(size), direct, ..FileDevOptions::default() };
        Arc::new(FileDev::open(&dir.path().join(name), &opts).unwrap())
    };
    let cache = open("cache.img", 64 * MIB, false);
    let backing = open("backing.img", EXPORT + DATA_OFFSET, direct_backing);
    ubcache::cache::format(&cache, std::slice::from_ref(&backing), FormatOptions::default()).unwrap();
    let cfg = CacheConfig { mode: CacheMode::Writeback, sequential_cutoff: 0, ..CacheConfig::default() };
    let set = Arc::new(CacheSet::open(Arc::clone(&cache), std::slice::from_ref(&backing), cfg).unwrap());
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
    assert!(home == model, "direct={direct_backing}: the backing file differs from what was written");
}

#[test]
fn flush_between_buffered_files_copies_every_byte_home() {
    flush_round_trip(false);
}

#[test]
fn flush_to_a_direct_backing_file_copies_every_byte_home() {
    flush_round_trip(true);
}
