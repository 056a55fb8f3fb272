//! FileDev against real files: direct I/O with arbitrary buffers, zeroing fallbacks, holes, and
//! files that change under the device.

use proptest::prelude::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use ubcache::dev::{BlockDev, BulkCopy, DevError, FileDev, FileDevOptions};

fn create(path: &Path, size: u64, direct: bool) -> FileDev {
    FileDev::open(path, &FileDevOptions { create_with_size: Some(size), direct, ..Default::default() })
        .unwrap()
}

fn note_if_buffered(dev: &FileDev) {
    if !dev.is_direct() {
        eprintln!("note: the temp directory's file system refused O_DIRECT; testing the buffered fallback");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, byte: u8, misalign: usize },
    Read { offset: u64, len: usize, misalign: usize },
    Zero { offset: u64, len: u64, unmap: bool },
}

const LEN: u64 = 256 * 1024;

fn arb_op() -> impl Strategy<Value = Op> {
    let extent = (0..LEN, 1..20_000usize).prop_map(|(o, l)| (o, l.min((LEN - o) as usize)));
    prop_oneof![
        4 => (extent.clone(), any::<u8>(), 0..8usize)
            .prop_map(|((offset, len), byte, misalign)| Op::Write { offset, len, byte, misalign }),
        3 => (extent.clone(), 0..8usize).prop_map(|((offset, len), misalign)| Op::Read { offset, len, misalign }),
        1 => (extent, any::<bool>()).prop_map(|((offset, len), unmap)| Op::Zero { offset, len: len as u64, unmap }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Direct I/O with unaligned offsets, lengths and buffer addresses behaves exactly like a
    /// plain byte array (bounce buffers and read-modify-write are invisible to the caller).
    #[test]
    fn direct_io_with_arbitrary_buffers_matches_a_byte_array(ops in prop::collection::vec(arb_op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let dev = create(&dir.path().join("d.img"), LEN, true);
        let mut model = vec![0u8; LEN as usize];
        for op in &ops {
            match *op {
                Op::Write { offset, len, byte, misalign } => {
                    let mut storage = vec![0u8; len + misalign];
                    storage[misalign..].fill(byte);
                    dev.write_at(&storage[misalign..], offset).unwrap();
                    model[offset as usize..][..len].fill(byte);
                }
                Op::Read { offset, len, misalign } => {
                    let mut storage = vec![0xeeu8; len + misalign];
                    dev.read_at(&mut storage[misalign..], offset).unwrap();
                    prop_assert_eq!(&storage[misalign..], &model[offset as usize..][..len]);
                }
                Op::Zero { offset, len, unmap } => {
                    dev.write_zeroes(offset, len, unmap).unwrap();
                    model[offset as usize..][..len as usize].fill(0);
                }
            }
        }
        dev.sync().unwrap();
        drop(dev);
        prop_assert_eq!(std::fs::read(dir.path().join("d.img")).unwrap(), model);
    }
}

#[test]
fn direct_io_aligned_and_unaligned_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let dev = create(&dir.path().join("a.img"), 1 << 20, true);
    note_if_buffered(&dev);
    if let Some(align) = dev.direct_alignment() {
        assert!(align.is_power_of_two() && align >= 512);
        println!("direct I/O alignment: {align}");
    }
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    // Larger than one bounce chunk, unaligned at both ends.
    dev.write_at(&data[..1_000_003], 7).unwrap();
    let mut back = vec![0u8; 1_000_003];
    dev.read_at(&mut back, 7).unwrap();
    assert_eq!(back, data[..1_000_003]);
    let mut head = [0xffu8; 7];
    dev.read_at(&mut head, 0).unwrap();
    assert_eq!(head, [0; 7], "bytes before an unaligned write must be preserved");
}

/// Guards against lost updates in read-modify-write: threads writing different bytes of the
/// same aligned blocks concurrently must all survive.
#[test]
fn concurrent_unaligned_writes_to_one_block_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(create(&dir.path().join("c.img"), 64 * 1024, true));
    note_if_buffered(&dev);
    const PIECE: u64 = 100;
    const THREADS: u64 = 4;
    for round in 1..=5u8 {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let dev = Arc::clone(&dev);
                std::thread::spawn(move || {
                    // Pieces t, t+4, t+8, ... interleave the threads inside every block.
                    for i in (t..(16 * 1024 / PIECE)).step_by(THREADS as usize) {
                        dev.write_at(&[round.wrapping_mul(16) + t as u8 + 1; PIECE as usize], i * PIECE)
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut back = vec![0u8; 16 * 1024];
        dev.read_at(&mut back, 0).unwrap();
        for i in 0..(16 * 1024 / PIECE) {
            let expected = round.wrapping_mul(16) + (i % THREADS) as u8 + 1;
            let piece = &back[(i * PIECE) as usize..((i + 1) * PIECE) as usize];
            assert!(piece.iter().all(|&b| b == expected), "round {round}: piece {i} lost its write");
        }
    }
}

#[test]
fn direct_falls_back_when_size_is_not_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let dev = create(&dir.path().join("odd.img"), 4096 * 3 + 100, true);
    assert!(!dev.is_direct(), "a size that is not a multiple of the alignment cannot use O_DIRECT");
    dev.write_at(&[3; 50], 4096 * 3 + 50).unwrap();
    let mut back = [0; 50];
    dev.read_at(&mut back, 4096 * 3 + 50).unwrap();
    assert_eq!(back, [3; 50]);
}

/// A file that shrank after open: a read past its new end is an error, never stale or zero
/// bytes passed off as data.
#[test]
fn read_past_a_shrunken_file_is_an_error() {
    for direct in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrink.img");
        let dev = create(&path, 64 * 1024, direct);
        dev.write_at(&[9; 8192], 0).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        let mut buf = vec![0u8; 8192];
        let err = dev.read_at(&mut buf, 0).unwrap_err();
        assert!(matches!(err, DevError::Io { op: "read", .. }), "direct={direct}: {err}");
        // Reads within what is left still work.
        dev.read_at(&mut buf[..4096], 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9));
    }
}

#[test]
fn holes_are_reported_with_seek_hole() {
    let dir = tempfile::tempdir().unwrap();
    let dev = create(&dir.path().join("h.img"), 1 << 20, false);
    dev.write_at(&[1; 4096], 64 * 1024).unwrap();
    dev.write_at(&[1; 4096], 512 * 1024).unwrap();
    let holes = dev.known_zero_ranges(0, 1 << 20).unwrap();
    // Whatever a file system reports must be sorted, disjoint, inside the query and zero.
    let mut prev_end = 0;
    for h in &holes {
        assert!(h.start >= prev_end && h.start < h.end && h.end <= 1 << 20);
        prev_end = h.end;
        let mut buf = vec![0xffu8; (h.end - h.start) as usize];
        dev.read_at(&mut buf, h.start).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "hole {h:?} holds data");
    }
    if dev.capabilities().fast_zero {
        // A file system that punches holes also tracks them at block granularity (4 KiB here).
        let k = 1024;
        assert_eq!(holes, vec![0..64 * k, 68 * k..512 * k, 516 * k..1024 * k]);
        assert_eq!(dev.known_zero_ranges(60 * k, 10 * k).unwrap(), vec![60 * k..64 * k, 68 * k..70 * k]);
        assert_eq!(dev.known_zero_ranges(64 * k, 4 * k).unwrap(), vec![]);
        // Punching makes a new hole visible.
        dev.discard(64 * k, 4 * k).unwrap();
        assert_eq!(dev.known_zero_ranges(0, 100 * k).unwrap(), vec![0..100 * k]);
    } else {
        println!("note: the file system does not punch holes; only the safety of the answer was checked");
    }
    assert!(matches!(dev.known_zero_ranges(1 << 20, 1), Err(DevError::OutOfRange { .. })));
    assert_eq!(dev.known_zero_ranges(0, 0).unwrap(), vec![]);
}

/// A badly fragmented file costs a bounded number of lseek calls per query.
#[test]
fn hole_queries_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let dev = create(&dir.path().join("frag.img"), 8 << 20, false);
    for i in 0..1000u64 {
        dev.write_at(&[1; 4096], i * 8192).unwrap();
    }
    let holes = dev.known_zero_ranges(0, 8 << 20).unwrap();
    assert!(holes.len() <= 512, "{} holes in one answer", holes.len());
    if dev.capabilities().fast_zero {
        assert_eq!(holes.len(), 512);
        assert_eq!(holes[0], 4096..8192);
    }
}

#[test]
fn zeroing_modes_deallocate_or_keep_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.img");
    let dev = create(&path, 4 << 20, false);
    dev.write_at(&vec![7; 4 << 20], 0).unwrap();
    dev.sync().unwrap();
    let full = std::fs::metadata(&path).unwrap().blocks();
    dev.write_zeroes(0, 2 << 20, false).unwrap();
    let mut buf = vec![0xffu8; 4 << 20];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf[..2 << 20].iter().all(|&b| b == 0) && buf[2 << 20..].iter().all(|&b| b == 7));
    let after_no_hole = std::fs::metadata(&path).unwrap().blocks();
    dev.write_zeroes(2 << 20, 2 << 20, true).unwrap();
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let after_unmap = std::fs::metadata(&path).unwrap().blocks();
    if dev.capabilities().fast_zero {
        // NO_HOLE keeps the space (up to a little metadata); may_unmap gives half of it back.
        assert!(after_no_hole + 64 >= full, "NO_HOLE zeroing freed space: {full} -> {after_no_hole}");
        assert!(after_unmap < full * 3 / 4, "unmapping freed nothing: {full} -> {after_unmap}");
    }
    // Zero-length requests are no-ops, not EINVAL from fallocate.
    dev.write_zeroes(100, 0, true).unwrap();
    dev.discard(100, 0).unwrap();
    assert!(matches!(dev.write_zeroes(4 << 20, 1, true), Err(DevError::OutOfRange { .. })));
}

#[test]
fn fast_zero_is_probed_and_false_for_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.img");
    let dev = create(&path, 1 << 20, false);
    let writable_fast_zero = dev.capabilities().fast_zero;
    // The probe must not change the file.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    drop(dev);
    let ro = FileDev::open(&path, &FileDevOptions { read_only: true, ..Default::default() }).unwrap();
    assert!(!ro.capabilities().fast_zero);
    assert!(matches!(ro.write_zeroes(0, 512, true), Err(DevError::ReadOnly)));
    assert!(matches!(ro.discard(0, 512), Err(DevError::ReadOnly)));
    println!("fast_zero on this file system: {writable_fast_zero}");
}

/// `copy_from` between two buffered files copies in the kernel (`copy_file_range`) and reads
/// back exactly; it is declined (Ok(false), nothing written) where a side is `O_DIRECT` or not
/// a file, and refused with an error out of range or on a read-only target.
#[test]
fn copy_from_copies_between_buffered_files_and_declines_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let src = create(&dir.path().join("src.img"), 1 << 20, false);
    let dst = create(&dir.path().join("dst.img"), 1 << 20, false);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    src.write_at(&data, 4096).unwrap();
    assert!(dst.copy_from(&src, 4096 + 1000, 70_000, 200_000).unwrap(), "buffered files copy in the kernel");
    dst.sync().unwrap();
    let mut back = vec![0u8; 200_000];
    dst.read_at(&mut back, 70_000).unwrap();
    assert!(back == data[1000..201_000], "copied bytes differ");
    let mut before = vec![1u8; 1000];
    dst.read_at(&mut before, 69_000).unwrap();
    assert!(before.iter().all(|&b| b == 0), "bytes before the target range were touched");

    assert!(dst.copy_from(&src, 0, (1 << 20) - 100, 200).is_err(), "past the target's end");
    assert!(dst.copy_from(&src, (1 << 20) - 100, 0, 200).is_err(), "past the source's end");
    let mem = ubcache::dev::MemDev::new(1 << 20);
    assert!(!dst.copy_from(&mem, 0, 0, 4096).unwrap(), "a memory device has no file to copy from");
    let direct = create(&dir.path().join("direct.img"), 1 << 20, true);
    if direct.is_direct() {
        assert!(!direct.copy_from(&src, 0, 0, 4096).unwrap(), "an O_DIRECT target declines");
        assert!(!dst.copy_from(&direct, 0, 0, 4096).unwrap(), "an O_DIRECT source declines");
    } else {
        note_if_buffered(&direct);
    }
    let ro =
        FileDev::open(&dir.path().join("dst.img"), &FileDevOptions { read_only: true, ..Default::default() })
            .unwrap();
    assert!(ro.copy_from(&src, 0, 0, 4096).is_err(), "a read-only target refuses");
}

/// `start_writeback` only starts the writeout of what was written (the flush benchmark shows
/// its effect): the data reads back unchanged, a reopened file sees it after the sync, ranges
/// past the end are refused, and an `O_DIRECT` file (no dirty pages) accepts it as a no-op.
#[test]
fn start_writeback_keeps_data_and_checks_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wb.img");
    let dev = create(&path, 4 << 20, false);
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    dev.write_at(&data, 1 << 20).unwrap();
    dev.start_writeback(1 << 20, 1 << 20).unwrap();
    dev.start_writeback(0, 0).unwrap();
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == data, "start_writeback changed the data");
    dev.sync().unwrap();
    let again = FileDev::open(&path, &FileDevOptions::default()).unwrap();
    again.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == data, "a reopened file differs");
    let err = dev.start_writeback((4 << 20) - 4096, 8192).expect_err("past the end");
    assert!(err.to_string().contains("start_writeback"), "{err}");
    let direct = create(&dir.path().join("direct.img"), 1 << 20, true);
    if direct.is_direct() {
        direct.start_writeback(0, 1 << 20).unwrap();
        assert!(direct.start_writeback(0, 2 << 20).is_err(), "past the end of an O_DIRECT file");
    } else {
        note_if_buffered(&direct);
    }
}
