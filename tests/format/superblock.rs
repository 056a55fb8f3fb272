//! Cache and backing superblocks: round trips, copy selection, corruption handling, features.

use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::{
    self, BackingEntry, BackingState, BackingSuperblock, CacheSuperblock, FormatError, FormatVersion,
    Geometry, OpenMode, SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES, SB_BYTES, SbCopy, StoredCacheMode, Uuid,
};

const BUCKET: u64 = 16 * 1024;
const DEV_BYTES: u64 = 4 << 20;

fn geometry() -> Geometry {
    Geometry::compute(DEV_BYTES, BUCKET, 4096).unwrap()
}

fn superblock() -> CacheSuperblock {
    let mut sb = CacheSuperblock::new(geometry(), Uuid::random(), Uuid::random());
    sb.backing.push(BackingEntry {
        uuid: Uuid::random(),
        dev_id: 7,
        size_bytes: 1 << 30,
        data_offset_bytes: format::BACKING_DATA_OFFSET_BYTES,
    });
    sb
}

/// Rewrites the crc of a 4 KiB superblock after a test edited a field on purpose.
fn fix_crc(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[..SB_BYTES - 4]);
    b[SB_BYTES - 4..SB_BYTES].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn geometry_lays_out_regions_in_order_after_the_superblock_area() {
    let g = geometry();
    g.validate().unwrap();
    assert_eq!(g.nbuckets, DEV_BYTES / BUCKET);
    assert!(g.journal.first * BUCKET >= format::SB_AREA_BYTES);
    assert_eq!(g.journal.count, format::MIN_JOURNAL_BUCKETS);
    assert_eq!(g.table_a.first, g.journal.end());
    assert_eq!(g.table_b.first, g.table_a.end());
    assert!(g.first_free_bucket() + format::MIN_FREE_BUCKETS <= g.nbuckets);
    assert!(g.is_fixed_metadata(g.table_b.first) && !g.is_fixed_metadata(g.first_free_bucket()));
    assert_eq!(g.bucket_of_sector(g.bucket_start_sector(5) + 3), Some(5));
    assert_eq!(g.bucket_of_sector(g.nbuckets * u64::from(g.bucket_sectors)), None);
}

#[test]
fn geometry_rejects_bad_sizes_and_tiny_devices() {
    assert!(matches!(Geometry::compute(DEV_BYTES, 3000, 512), Err(FormatError::Invalid(_))));
    assert!(matches!(Geometry::compute(DEV_BYTES, BUCKET, 2 * BUCKET), Err(FormatError::Invalid(_))));
    assert!(matches!(Geometry::compute(DEV_BYTES, BUCKET, 100), Err(FormatError::Invalid(_))));
    assert!(matches!(Geometry::compute(256 * 1024, BUCKET, 4096), Err(FormatError::Invalid(_))));
}

#[test]
fn cache_superblock_round_trips_through_both_copies() {
    let sb = superblock();
    for copy in [SbCopy::A, SbCopy::B] {
        let bytes = sb.encode(copy).unwrap();
        let back = CacheSuperblock::decode(&bytes, copy.offset_bytes()).unwrap();
        assert_eq!(back, sb);
        assert_eq!(back.encode(copy).unwrap(), bytes);
    }
}

#[test]
fn a_copy_read_from_the_other_address_is_wrong_address() {
    let bytes = superblock().encode(SbCopy::A).unwrap();
    let err = CacheSuperblock::decode(&bytes, SB_B_OFFSET_BYTES).unwrap_err();
    assert!(matches!(err, FormatError::WrongAddress { recorded, actual }
        if recorded == SB_A_OFFSET_BYTES && actual == SB_B_OFFSET_BYTES));
}

#[test]
fn write_then_read_uses_the_highest_seq() {
    let dev = MemDev::new(DEV_BYTES);
    let mut sb = superblock();
    format::write_cache_superblock(&dev, &sb).unwrap();
    let read = format::read_cache_superblock(&dev).unwrap();
    assert_eq!(read.sb, sb);
    assert!(read.other_copy_error.is_none());
    assert_eq!(read.open_mode, OpenMode::ReadWrite);

    // A crash between the two copies: A has the new seq, B the old one. A wins.
    sb.seq += 1;
    sb.backing.clear();
    dev.write_at(&sb.encode(SbCopy::A).unwrap(), SB_A_OFFSET_BYTES).unwrap();
    let read = format::read_cache_superblock(&dev).unwrap();
    assert_eq!(read.copy, SbCopy::A);
    assert_eq!(read.sb.seq, sb.seq);
    assert!(read.sb.backing.is_empty());

    // And if only B got the newer one (A then rewritten older by hand), B wins.
    sb.seq += 1;
    dev.write_at(&sb.encode(SbCopy::B).unwrap(), SB_B_OFFSET_BYTES).unwrap();
    let read = format::read_cache_superblock(&dev).unwrap();
    assert_eq!(read.copy, SbCopy::B);
    assert_eq!(read.sb.seq, sb.seq);
}

#[test]
fn flipped_bit_in_copy_a_falls_back_to_copy_b_with_a_warning() {
    let dev = MemDev::new(DEV_BYTES);
    let sb = superblock();
    format::write_cache_superblock(&dev, &sb).unwrap();
    for bit in [0usize, 8 * 45, 8 * 100 + 3, 8 * 4000 + 7, 8 * (SB_BYTES - 1)] {
        let mut bytes = sb.encode(SbCopy::A).unwrap();
        bytes[bit / 8] ^= 1 << (bit % 8);
        dev.write_at(&bytes, SB_A_OFFSET_BYTES).unwrap();
        let read = format::read_cache_superblock(&dev).unwrap();
        assert_eq!(read.copy, SbCopy::B, "bit {bit}");
        assert_eq!(read.sb, sb);
        let err = read.other_copy_error.expect("the bad copy is reported");
        assert!(
            matches!(err, FormatError::ChecksumMismatch { .. } | FormatError::BadMagic { .. }),
            "bit {bit}: {err}"
        );
    }
}

#[test]
fn both_copies_bad_is_a_clear_error() {
    let dev = MemDev::new(DEV_BYTES);
    let sb = superblock();
    format::write_cache_superblock(&dev, &sb).unwrap();
    let mut a = sb.encode(SbCopy::A).unwrap();
    a[100] ^= 0x10;
    dev.write_at(&a, SB_A_OFFSET_BYTES).unwrap();
    dev.write_at(&[0u8; 8], SB_B_OFFSET_BYTES).unwrap();
    let err = format::read_cache_superblock(&dev).unwrap_err();
    match &err {
        FormatError::NoValidSuperblock { a, b } => {
            assert!(matches!(**a, FormatError::ChecksumMismatch { .. }));
            assert!(matches!(**b, FormatError::BadMagic { .. }));
        }
        other => panic!("unexpected {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("copy A") && msg.contains("copy B"), "{msg}");
}

#[test]
fn blank_device_has_no_superblock() {
    let dev = MemDev::new(DEV_BYTES);
    assert!(matches!(format::read_cache_superblock(&dev), Err(FormatError::NoValidSuperblock { .. })));
    let tiny = MemDev::new(8192);
    assert!(matches!(format::read_cache_superblock(&tiny), Err(FormatError::NoValidSuperblock { .. })));
}

#[test]
fn superblock_of_a_larger_device_on_a_truncated_one_is_refused() {
    let sb = superblock();
    let dev = MemDev::new(DEV_BYTES / 2);
    for copy in [SbCopy::A, SbCopy::B] {
        dev.write_at(&sb.encode(copy).unwrap(), copy.offset_bytes()).unwrap();
    }
    assert!(matches!(format::read_cache_superblock(&dev), Err(FormatError::Invalid(_))));
    assert!(matches!(format::write_cache_superblock(&dev, &sb), Err(FormatError::Invalid(_))));
}

#[test]
fn feature_bits_decide_how_the_cache_may_be_opened() {
    let dev = MemDev::new(DEV_BYTES);
    let mut sb = superblock();
    sb.features.compat = 1 << 5;
    format::write_cache_superblock(&dev, &sb).unwrap();
    assert_eq!(format::read_cache_superblock(&dev).unwrap().open_mode, OpenMode::ReadWrite);

    sb.features.ro_compat = 1 << 2;
    format::write_cache_superblock(&dev, &sb).unwrap();
    assert_eq!(format::read_cache_superblock(&dev).unwrap().open_mode, OpenMode::ReadOnly);

    sb.features.incompat = 1 << 40;
    format::write_cache_superblock(&dev, &sb).unwrap();
    let err = format::read_cache_superblock(&dev).unwrap_err();
    assert!(matches!(err, FormatError::UnknownIncompatFeatures(bits) if bits == 1 << 40));
    assert!(err.to_string().contains("refusing to open"));
}

#[test]
fn unknown_version_is_refused_even_with_a_valid_crc() {
    let mut bytes = superblock().encode(SbCopy::A).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    fix_crc(&mut bytes);
    assert!(matches!(
        CacheSuperblock::decode(&bytes, SB_A_OFFSET_BYTES),
        Err(FormatError::UnsupportedVersion(7))
    ));
    assert_eq!(FormatVersion::try_from(1).unwrap(), FormatVersion::V1);
    assert!(FormatVersion::try_from(0).is_err());
}

#[test]
fn inconsistent_geometry_with_a_valid_crc_is_invalid() {
    let base = superblock().encode(SbCopy::A).unwrap();
    // nbuckets (offset 96) smaller than the regions; journal first (104) inside the sb area;
    // bucket size (88) not a power of two; backing count (144) too large.
    for (off, value) in [(96usize, 3u64), (104, 0), (88, 3), (144, 65)] {
        let mut bytes = base;
        if off == 88 || off == 144 {
            bytes[off..off + 4].copy_from_slice(&(value as u32).to_le_bytes());
        } else {
            bytes[off..off + 8].copy_from_slice(&value.to_le_bytes());
        }
        fix_crc(&mut bytes);
        assert!(
            matches!(CacheSuperblock::decode(&bytes, SB_A_OFFSET_BYTES), Err(FormatError::Invalid(_))),
            "field at {off}"
        );
    }
}

#[test]
fn truncated_input_is_truncated_not_a_panic() {
    let bytes = superblock().encode(SbCopy::A).unwrap();
    for len in [0, 1, 100, SB_BYTES - 1] {
        assert!(matches!(
            CacheSuperblock::decode(&bytes[..len], SB_A_OFFSET_BYTES),
            Err(FormatError::Truncated { .. })
        ));
    }
}

#[test]
fn too_many_backing_devices_do_not_encode() {
    let mut sb = superblock();
    sb.backing = (0..=format::MAX_BACKING_DEVS as u32)
        .map(|i| BackingEntry {
            uuid: Uuid::random(),
            dev_id: i,
            size_bytes: 1 << 20,
            data_offset_bytes: 8192,
        })
        .collect();
    assert!(matches!(sb.encode(SbCopy::A), Err(FormatError::Invalid(_))));
    sb.backing.truncate(format::MAX_BACKING_DEVS);
    let bytes = sb.encode(SbCopy::A).unwrap();
    assert_eq!(
        CacheSuperblock::decode(&bytes, SB_A_OFFSET_BYTES).unwrap().backing.len(),
        format::MAX_BACKING_DEVS
    );
}

#[test]
fn backing_superblock_round_trips_and_states_are_checked() {
    let dev = MemDev::new(1 << 20);
    assert_eq!(format::read_backing_superblock(&dev).unwrap(), None, "no magic: raw image");
    let mut sb = BackingSuperblock::new(Uuid::random(), 1 << 20).unwrap();
    assert_eq!(sb.export_bytes(), (1 << 20) - 8192);
    format::write_backing_superblock(&dev, &sb).unwrap();
    assert_eq!(format::read_backing_superblock(&dev).unwrap(), Some(sb.clone()));

    sb.state = BackingState::Dirty;
    sb.set_uuid = Uuid::random();
    sb.cache_mode = StoredCacheMode::Writeback;
    sb.seq += 1;
    format::write_backing_superblock(&dev, &sb).unwrap();
    let back = format::read_backing_superblock(&dev).unwrap().unwrap();
    assert_eq!(back.state, BackingState::Dirty);
    assert_eq!(back, sb);

    // Dirty without a cache set is contradictory.
    let mut bad = sb.clone();
    bad.set_uuid = Uuid::NIL;
    assert!(matches!(BackingSuperblock::decode(&bad.encode()), Err(FormatError::Invalid(_))));

    // One corrupted copy: the other is used. Both corrupted: an error, never "raw image".
    let mut bytes = sb.encode();
    bytes[20] ^= 1;
    dev.write_at(&bytes, 0).unwrap();
    assert_eq!(format::read_backing_superblock(&dev).unwrap(), Some(sb.clone()));
    let mut bytes_b = sb.encode_copy(format::BackingSbCopy::B);
    bytes_b[20] ^= 1;
    dev.write_at(&bytes_b, format::BACKING_SB_B_OFFSET_BYTES).unwrap();
    assert!(matches!(
        format::read_backing_superblock(&dev),
        Err(FormatError::NoValidBackingSuperblock { .. })
    ));

    // Device shorter than the superblock claims.
    let small = MemDev::new(64 * 1024);
    small.write_at(&sb.encode(), 0).unwrap();
    assert!(matches!(format::read_backing_superblock(&small), Err(FormatError::Invalid(_))));
    assert!(BackingSuperblock::new(Uuid::random(), 8192).is_err());
}

#[test]
fn uuids_are_random_and_print_as_uuids() {
    let a = Uuid::random();
    let b = Uuid::random();
    assert_ne!(a, b);
    assert!(!a.is_nil() && Uuid::NIL.is_nil());
    let s = a.to_string();
    assert_eq!(s.len(), 36);
    assert_eq!(s.matches('-').count(), 4);
}

/// A crash in the middle of writing copy A (only its first sector reached the disk) must leave
/// the old superblock readable from copy B.
#[test]
fn torn_write_of_copy_a_falls_back_to_the_previous_superblock_in_copy_b() {
    let dev = MemDev::new(DEV_BYTES);
    let old = superblock();
    format::write_cache_superblock(&dev, &old).unwrap();
    let mut new = old.clone();
    new.seq += 1;
    new.backing.clear();
    let bytes = new.encode(SbCopy::A).unwrap();
    dev.write_at(&bytes[..512], SB_A_OFFSET_BYTES).unwrap();
    let read = format::read_cache_superblock(&dev).unwrap();
    assert_eq!(read.copy, SbCopy::B);
    assert_eq!(read.sb, old);
    assert!(matches!(read.other_copy_error, Some(FormatError::ChecksumMismatch { .. })));
    // Rewriting both copies repairs it.
    format::write_cache_superblock(&dev, &new).unwrap();
    let read = format::read_cache_superblock(&dev).unwrap();
    assert_eq!(read.sb, new);
    assert!(read.other_copy_error.is_none());
}

#[test]
fn production_sized_geometry_is_laid_out_without_touching_the_device() {
    // 1 TiB with default 512 KiB buckets and 256 KiB nodes.
    let g = Geometry::compute(1 << 40, format::DEFAULT_BUCKET_BYTES, 256 * 1024).unwrap();
    assert_eq!(g.nbuckets, 2 * 1024 * 1024);
    assert_eq!(g.journal.count, format::MAX_JOURNAL_BUCKETS);
    assert_eq!(g.journal.first, 1, "the 72 KiB superblock area fits in bucket 0");
    assert_eq!(g.table_a.count, (48 + 3 * g.nbuckets + 4).div_ceil(format::DEFAULT_BUCKET_BYTES));
    assert_eq!(g.journal_region().len_bytes, 256 * format::DEFAULT_BUCKET_BYTES);
    let sb = CacheSuperblock::new(g, Uuid::random(), Uuid::random());
    let bytes = sb.encode(SbCopy::B).unwrap();
    assert_eq!(CacheSuperblock::decode(&bytes, SB_B_OFFSET_BYTES).unwrap(), sb);
    // Small devices get the minimum journal.
    let small = Geometry::compute(16 << 20, 64 * 1024, 4096).unwrap();
    assert_eq!(small.journal.count, format::MIN_JOURNAL_BUCKETS);
}
