//! Checks shared by the cargo-fuzz targets `fuzz/fuzz_targets/{superblock,journal}_decode.rs`
//! and the corpus replay test (`tests/fuzz/corpus.rs`). Each takes arbitrary bytes and must never
//! panic; it asserts only what the decoders promise: whatever decodes re-encodes to the same
//! bytes, and a record is never accepted for another address or cache set. Each input is also
//! tried with its crc fixed up, so the checks behind the checksum are reached.
//! (NBD's are in [`crate::nbd::fuzzing`], the btree node decoder's in `ubcache_btree::fuzzing`.)
#![allow(clippy::panic, clippy::expect_used)] // A failed assertion is the fuzzer's finding.

use crate::format::{
    self, BACKING_SB_RECORD_BYTES, BackingSuperblock, BucketTable, CacheSuperblock, RECORD_HEADER_LEN,
    RECORD_TRAILER_LEN, RecordHeader, SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES, SB_BYTES, SbCopy, TableSlot,
    Uuid,
};

/// `data` with a crc32c of `data[..at]` written at `at` (None when it is too short).
fn with_crc_at(data: &[u8], at: usize) -> Option<Vec<u8>> {
    let end = at.checked_add(4)?;
    if data.len() < end {
        return None;
    }
    let mut fixed = data.to_vec();
    let crc = crc32c::crc32c(&fixed[..at]);
    fixed[at..end].copy_from_slice(&crc.to_le_bytes());
    Some(fixed)
}

/// Cache and backing superblocks and the bucket table.
pub fn superblock_decode(data: &[u8]) {
    check_superblocks(data);
    if let Some(fixed) = with_crc_at(data, SB_BYTES - 4) {
        check_superblocks(&fixed);
    }
    // The backing superblock's crc closes its first sector.
    if let Some(fixed) = with_crc_at(data, BACKING_SB_RECORD_BYTES - 4) {
        check_superblocks(&fixed);
    }
    check_table(data);
    // The table's crc follows its 48-byte header and 3 bytes per bucket.
    if let Some(n) = data.get(40..48).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
        && let Some(at) =
            usize::try_from(n).ok().and_then(|n| n.checked_mul(3)).and_then(|x| x.checked_add(48))
        && let Some(fixed) = with_crc_at(data, at)
    {
        check_table(&fixed);
    }
}

fn check_superblocks(data: &[u8]) {
    for (copy, offset) in [(SbCopy::A, SB_A_OFFSET_BYTES), (SbCopy::B, SB_B_OFFSET_BYTES)] {
        if let Ok(sb) = CacheSuperblock::decode(data, offset) {
            let again = sb.encode(copy).expect("a decoded superblock encodes");
            assert_eq!(&again[..], &data[..SB_BYTES], "cache superblock does not round-trip");
            let _ = sb.features.open_mode();
        }
    }
    if let Ok(sb) = BackingSuperblock::decode(data) {
        assert_eq!(&sb.encode()[..], &data[..SB_BYTES], "backing superblock does not round-trip");
    }
    if let Ok(Some(read)) = format::decode_backing_header(data) {
        let start = usize::try_from(read.copy.offset_bytes()).expect("a copy offset fits usize");
        assert_eq!(
            &read.sb.encode_copy(read.copy)[..],
            &data[start..start + SB_BYTES],
            "backing header does not round-trip"
        );
    }
}

fn check_table(data: &[u8]) {
    let set = Uuid(data.get(24..40).and_then(|b| b.try_into().ok()).unwrap_or([0; 16]));
    for slot in [TableSlot::A, TableSlot::B] {
        if let Ok(t) = BucketTable::decode(data, slot, set) {
            let again = t.encode(slot, set).expect("a decoded table encodes");
            assert_eq!(&again[..], &data[..again.len()], "bucket table does not round-trip");
        }
    }
}

/// Journal records and the entry decoder.
pub fn journal_decode(data: &[u8]) {
    check_record(data);
    if let Ok(h) = RecordHeader::decode(data) {
        let at = RECORD_HEADER_LEN + h.entries_len as usize;
        if let Some(fixed) = with_crc_at(data, at).filter(|_| data.len() >= at + RECORD_TRAILER_LEN) {
            check_record(&fixed);
        }
    }
    // The entry decoder alone: the first 4 bytes are the count.
    if let Some((count, rest)) = data.split_first_chunk::<4>()
        && let Ok(entries) = format::decode_entries(rest, u32::from_le_bytes(*count))
    {
        let mut enc = Vec::new();
        for e in &entries {
            e.encode(&mut enc).expect("a decoded entry encodes");
        }
        assert_eq!(enc, rest, "journal entries do not round-trip");
    }
}

fn check_record(data: &[u8]) {
    let Ok(h) = RecordHeader::decode(data) else { return };
    if let Ok((h2, entries)) = format::decode_record(data, h.sector, h.set_uuid) {
        assert_eq!(h, h2, "record header decodes differently inside the record");
        let mut enc = Vec::new();
        for e in &entries {
            e.encode(&mut enc).expect("a decoded entry encodes");
        }
        let again = format::encode_record(&h, &enc).expect("a decoded record encodes");
        let covered = RECORD_HEADER_LEN + h.entries_len as usize + RECORD_TRAILER_LEN;
        assert_eq!(&again[..covered], &data[..covered], "journal record does not round-trip");
    }
    // Another cache set's or another address's record is never accepted.
    assert!(format::decode_record(data, h.sector.wrapping_add(1), h.set_uuid).is_err());
    let mut other: Uuid = h.set_uuid;
    other.0[0] ^= 1;
    assert!(format::decode_record(data, h.sector, other).is_err());
}
