//! FaultDev: deterministic error injection and read corruption over any device.

use ubcache::dev::{BlockDev, CrashMode, DevError, FaultDev, FaultOp, FaultRule, MemDev, SimDev};

/// A fixed mixed workload; returns which ops failed, in order.
fn workload(dev: &FaultDev<MemDev>) -> Vec<bool> {
    let mut outcomes = Vec::new();
    for i in 0..60u64 {
        let off = (i * 4096 * 7) % (1 << 20);
        let result = match i % 5 {
            0 | 1 => dev.write_at(&[i as u8; 4096], off),
            2 => dev.read_at(&mut [0; 4096], off),
            3 => dev.sync(),
            _ => dev.write_zeroes(off, 1024, false),
        };
        outcomes.push(result.is_err());
    }
    outcomes
}

fn rules() -> Vec<FaultRule> {
    vec![
        FaultRule::nth(FaultOp::Write, 5),
        FaultRule::nth(FaultOp::Read, 3).persistent().in_range(0..(512 << 10)),
        FaultRule::every(FaultOp::Sync).matching(|_| true).with_errno(libc::EIO),
        FaultRule::nth(FaultOp::Any, 40),
    ]
}

/// The same rules over the same op sequence fail exactly the same ops, every time.
#[test]
fn same_rules_same_failures() {
    let run = || {
        let dev = FaultDev::new(MemDev::new(1 << 20));
        for rule in rules() {
            dev.add_rule(rule);
        }
        (workload(&dev), dev.counts())
    };
    let (first, counts) = run();
    for _ in 0..3 {
        assert_eq!(run(), (first.clone(), counts));
    }
    // Every sync failed (12 of them), the 5th write once, and at least one read.
    let failed_syncs = (0..60).filter(|i| i % 5 == 3 && first[*i]).count();
    assert_eq!(failed_syncs, 12);
    assert!(first[10], "the 5th write (op 10) must fail");
    assert!(!first[11], "the write rule is one-shot");
    assert_eq!(counts.syncs, 12);
    assert_eq!(counts.injected_errors, first.iter().filter(|&&f| f).count() as u64);
}

/// A failed sync over a crash simulator persists nothing: the error path of a real fsync.
#[test]
fn failed_sync_persists_nothing_on_a_crash_simulator() {
    let dev = FaultDev::new(SimDev::new(1 << 16));
    dev.add_rule(FaultRule::nth(FaultOp::Sync, 1));
    dev.write_at(&[5; 512], 0).unwrap();
    assert!(matches!(dev.sync(), Err(DevError::Io { op: "sync", .. })));
    assert_eq!(dev.inner().crash_image(&CrashMode::DropAll)[0], 0);
    // The rule was one-shot: the retry succeeds and makes the write durable.
    dev.sync().unwrap();
    assert_eq!(dev.inner().crash_image(&CrashMode::DropAll)[0], 5);
}

/// A persistent error on a range: a bad region that never heals, while the rest works.
#[test]
fn persistent_bad_region() {
    let dev = FaultDev::new(MemDev::new(1 << 16));
    dev.add_rule(FaultRule::every(FaultOp::Any).in_range(8192..12288));
    for _ in 0..3 {
        assert!(dev.read_at(&mut [0; 512], 8192).is_err());
        assert!(dev.write_at(&[1; 512], 12287 - 511).is_err());
        assert!(dev.write_at(&[1; 512], 12288).is_ok());
    }
    // A sync overlaps the whole device, so a range rule on Any catches it too.
    assert!(dev.sync().is_err());
}

/// Bit flips on reads model metadata that reads back corrupted; a checksum over the read data
/// would catch them, and the data on the device stays intact.
#[test]
fn bit_flip_changes_checksum_of_read_back_data() {
    let dev = FaultDev::new(MemDev::new(1 << 16));
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 31) as u8).collect();
    dev.write_at(&block, 4096).unwrap();
    let crc = crc32c::crc32c(&block);
    dev.add_bit_flip(4096 + 1000..4096 + 1001, 1 << 3);
    let mut back = vec![0; 4096];
    dev.read_at(&mut back, 4096).unwrap();
    assert_ne!(crc32c::crc32c(&back), crc);
    assert_eq!(back[1000], block[1000] ^ 8);
    // Reads that do not touch the range are clean.
    let mut other = vec![0; 1000];
    dev.read_at(&mut other, 4096).unwrap();
    assert_eq!(other, block[..1000]);
    assert_eq!(dev.counts().corrupted_reads, 1);
}
