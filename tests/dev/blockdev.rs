//! FileDev on a real block device (a loop device over a temp file).
//!
//! Needs root and `losetup`, so it is ignored by default. Run it with:
//! `sudo -E cargo test --test dev blockdev -- --ignored`

use std::path::{Path, PathBuf};
use std::process::Command;
use ubcache::dev::{BlockDev, DevError, FileDev, FileDevOptions};

/// A loop device, detached on drop.
struct LoopDev(PathBuf);

impl LoopDev {
    fn attach(backing: &Path) -> Self {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(backing).output().unwrap();
        assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        Self(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root and losetup: sudo -E cargo test --test dev blockdev -- --ignored"]
fn file_dev_on_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing).unwrap().set_len(8 << 20).unwrap();
    let loop_dev = LoopDev::attach(&backing);
    for direct in [false, true] {
        let dev = FileDev::open(&loop_dev.0, &FileDevOptions { direct, ..Default::default() }).unwrap();
        assert!(dev.is_block_device());
        assert_eq!(dev.len(), 8 << 20, "the size of a block device comes from seeking to its end");
        assert_eq!(dev.is_direct(), direct);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8 + 1).collect();
        dev.write_at(&data, 1234).unwrap();
        dev.sync().unwrap();
        let mut back = vec![0; data.len()];
        dev.read_at(&mut back, 1234).unwrap();
        assert_eq!(back, data);
        // Zeroing: aligned (fallocate on the block device) and unaligned (falls back to writing).
        dev.write_zeroes(4096, 8192, false).unwrap();
        dev.write_zeroes(20_001, 999, true).unwrap();
        dev.discard(65_536, 4096).unwrap();
        dev.read_at(&mut back, 1234).unwrap();
        for (i, &b) in back.iter().enumerate() {
            let pos = 1234 + i as u64;
            let zeroed = (4096..12_288).contains(&pos) || (20_001..21_000).contains(&pos);
            let discarded = (65_536..69_632).contains(&pos);
            if zeroed {
                assert_eq!(b, 0, "byte {pos} not zeroed");
            } else if !discarded {
                assert_eq!(b, data[i], "byte {pos} changed");
            }
        }
        // A block device has no holes to report; the answer must still be safe.
        for hole in dev.known_zero_ranges(0, 8 << 20).unwrap() {
            let mut buf = vec![1; (hole.end - hole.start) as usize];
            dev.read_at(&mut buf, hole.start).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        }
        assert!(matches!(dev.write_at(&[0], 8 << 20), Err(DevError::OutOfRange { .. })));
        eprintln!("loop device, direct={direct}: fast_zero={}", dev.capabilities().fast_zero);
    }
}
