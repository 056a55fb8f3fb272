//! Journal entries and records, and the bucket table: round trips and corruption detection.

use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::{
    self, BucketTable, CheckpointEntry, FormatError, Geometry, JournalEntry, Key, NodePtr, Ptr, RecordHeader,
    TableSlot, Uuid,
};

fn key(dev: u32, start: u64, size: u32, offset: u64, generation: u8, dirty: bool) -> Key {
    Key { dev, end: start + u64::from(size), size, ptr: Ptr { offset, generation }, dirty }
}

fn all_kinds() -> Vec<JournalEntry> {
    vec![
        JournalEntry::KeyInsert(key(1, 0, 8, 4096, 3, true)),
        JournalEntry::KeyReplace { key: key(2, 100, 16, 8192, 0, false), expected: None },
        JournalEntry::KeyReplace {
            key: key(2, 100, 16, 8192, 1, false),
            expected: Some(key(2, 96, 32, 77, 255, true)),
        },
        JournalEntry::Invalidate { dev: 3, start: 10, end: 1 << 40 },
        JournalEntry::BucketGen { bucket: 123_456, generation: 200 },
        JournalEntry::Checkpoint(CheckpointEntry {
            root: NodePtr { addr: 0x1234_5678_9abc, seq: 42, len: 4096, csum: 0xdead_beef },
            table_slot: TableSlot::B,
            table_seq: 99,
            replay_from: 17,
        }),
    ]
}

fn encode_all(entries: &[JournalEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let before = out.len();
        e.encode(&mut out).unwrap();
        assert_eq!(out.len() - before, e.encoded_len(), "{e:?}");
    }
    out
}

#[test]
fn every_entry_kind_round_trips() {
    let entries = all_kinds();
    let bytes = encode_all(&entries);
    assert_eq!(format::decode_entries(&bytes, entries.len() as u32).unwrap(), entries);
}

#[test]
fn journalled_keys_that_the_btree_would_reject_are_refused() {
    for bad in [key(1, 0, 8, 0, 0, false), key(1, 0, 8, u64::MAX - 3, 0, false)] {
        let mut k = bad;
        if bad.ptr.offset == 0 {
            k.size = 0; // empty key
        }
        let mut out = Vec::new();
        JournalEntry::KeyInsert(k).encode(&mut out).unwrap();
        assert!(matches!(format::decode_entries(&out, 1), Err(FormatError::Invalid(_))), "{k:?}");
    }
}

#[test]
fn entries_with_wrong_counts_or_trailing_bytes_are_refused() {
    let entries = all_kinds();
    let bytes = encode_all(&entries);
    assert!(format::decode_entries(&bytes, entries.len() as u32 - 1).is_err(), "trailing entry");
    assert!(format::decode_entries(&bytes, entries.len() as u32 + 1).is_err(), "missing entry");
    assert!(matches!(format::decode_entries(&bytes, u32::MAX), Err(FormatError::Invalid(_))), "huge count");
    let mut unknown = bytes;
    unknown[0] = 99;
    assert!(format::decode_entries(&unknown, entries.len() as u32).is_err());
}

#[test]
fn invalid_entries_do_not_encode() {
    let mut out = Vec::new();
    JournalEntry::BucketGen { bucket: 1, generation: 1 }.encode(&mut out).unwrap();
    let len = out.len();
    assert!(JournalEntry::Invalidate { dev: 0, start: 5, end: 4 }.encode(&mut out).is_err());
    assert_eq!(out.len(), len, "a failed encode leaves nothing behind");
}

fn record(set: Uuid, sector: u64) -> (RecordHeader, Vec<u8>) {
    let entries = encode_all(&all_kinds());
    let h = RecordHeader {
        entry_count: all_kinds().len() as u32,
        first_seq: 10,
        prev_seq: 9,
        sector,
        prev_sector: 0,
        set_uuid: set,
        entries_len: entries.len() as u32,
        record_sectors: RecordHeader::sectors_for(entries.len()) as u32,
    };
    let bytes = format::encode_record(&h, &entries).unwrap();
    (h, bytes)
}

#[test]
fn record_round_trips_and_is_sector_padded() {
    let set = Uuid::random();
    let (h, bytes) = record(set, 40);
    assert_eq!(bytes.len() % 512, 0);
    let (back, entries) = format::decode_record(&bytes, 40, set).unwrap();
    assert_eq!(back, h);
    assert_eq!(back.last_seq(), 10 + all_kinds().len() as u64 - 1);
    assert_eq!(entries, all_kinds());
}

#[test]
fn every_single_bit_flip_in_a_record_is_detected() {
    let set = Uuid::random();
    let (h, bytes) = record(set, 40);
    // Bits inside header, entries and crc; the zero padding is not covered by design.
    let covered = format::RECORD_HEADER_LEN + h.entries_len as usize + format::RECORD_TRAILER_LEN;
    for bit in 0..covered * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(format::decode_record(&b, 40, set).is_err(), "flip of bit {bit} not detected");
    }
}

#[test]
fn record_from_elsewhere_or_another_cache_set_is_refused() {
    let set = Uuid::random();
    let (_, bytes) = record(set, 40);
    assert!(matches!(format::decode_record(&bytes, 41, set), Err(FormatError::WrongAddress { .. })));
    assert!(matches!(format::decode_record(&bytes, 40, Uuid::random()), Err(FormatError::Invalid(_))));
    // A torn record: its tail never made it.
    let mut torn = bytes;
    torn[200..].fill(0);
    assert!(format::decode_record(&torn, 40, set).is_err());
}

#[test]
fn bucket_table_round_trips_through_its_regions() {
    let g = Geometry::compute(4 << 20, 16 * 1024, 4096).unwrap();
    let dev = MemDev::new(4 << 20);
    let set = Uuid::random();
    let n = g.nbuckets as usize;
    let table = BucketTable {
        seq: 5,
        gens: (0..n).map(|i| (i * 7) as u8).collect(),
        prios: (0..n).map(|i| (i * 1000) as u16).collect(),
    };
    format::write_bucket_table(&dev, &g, set, TableSlot::B, &table).unwrap();
    assert_eq!(format::read_bucket_table(&dev, &g, set, TableSlot::B, 5).unwrap(), table);
    // The checkpoint names another seq: refused.
    assert!(format::read_bucket_table(&dev, &g, set, TableSlot::B, 6).is_err());
    // Region A was never written.
    assert!(matches!(
        format::read_bucket_table(&dev, &g, set, TableSlot::A, 5),
        Err(FormatError::BadMagic { .. })
    ));
    // Bytes of region B decoded as region A: wrong address.
    let bytes = table.encode(TableSlot::B, set).unwrap();
    assert!(matches!(BucketTable::decode(&bytes, TableSlot::A, set), Err(FormatError::WrongAddress { .. })));
    assert!(matches!(
        BucketTable::decode(&bytes, TableSlot::B, Uuid::random()),
        Err(FormatError::Invalid(_))
    ));
    // Wrong bucket count for the device.
    let short = BucketTable { seq: 1, gens: vec![0; n - 1], prios: vec![0; n - 1] };
    assert!(format::write_bucket_table(&dev, &g, set, TableSlot::A, &short).is_err());
}

#[test]
fn bucket_table_bit_flips_and_truncation_are_detected() {
    let set = Uuid::random();
    let table = BucketTable { seq: 1, gens: vec![1, 2, 3, 4, 5], prios: vec![9, 8, 7, 6, 5] };
    let bytes = table.encode(TableSlot::A, set).unwrap();
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(BucketTable::decode(&b, TableSlot::A, set).is_err(), "bit {bit}");
    }
    for len in 0..bytes.len() {
        assert!(BucketTable::decode(&bytes[..len], TableSlot::A, set).is_err(), "len {len}");
    }
    // A huge claimed bucket count is refused without allocating.
    let mut huge = bytes;
    huge[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(BucketTable::decode(&huge, TableSlot::A, set), Err(FormatError::Invalid(_))));
    huge[40..48].copy_from_slice(&(1u64 << 30).to_le_bytes());
    assert!(matches!(BucketTable::decode(&huge, TableSlot::A, set), Err(FormatError::Truncated { .. })));
}

/// Checkpoints alternate table regions so a crash while writing the new table leaves the table
/// of the last durable checkpoint intact in the other region.
#[test]
fn torn_table_write_leaves_the_other_region_readable() {
    let g = Geometry::compute(4 << 20, 16 * 1024, 4096).unwrap();
    let dev = MemDev::new(4 << 20);
    let set = Uuid::random();
    let n = g.nbuckets as usize;
    let old = BucketTable { seq: 1, gens: vec![1; n], prios: vec![1; n] };
    format::write_bucket_table(&dev, &g, set, TableSlot::A, &old).unwrap();
    let new = BucketTable { seq: 2, gens: vec![2; n], prios: vec![2; n] };
    let bytes = new.encode(TableSlot::B, set).unwrap();
    let region = g.table_region(TableSlot::B);
    dev.write_at(&bytes[..bytes.len() / 2], region.offset_bytes).unwrap();
    assert!(matches!(
        format::read_bucket_table(&dev, &g, set, TableSlot::B, 2),
        Err(FormatError::ChecksumMismatch { .. } | FormatError::Truncated { .. })
    ));
    assert_eq!(format::read_bucket_table(&dev, &g, set, TableSlot::A, 1).unwrap(), old);
}
