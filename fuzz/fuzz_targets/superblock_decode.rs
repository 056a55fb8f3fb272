//! Cache and backing superblock decoders, and the bucket table: any input decodes or fails
//! cleanly, and what decodes re-encodes to the same bytes. Each input is tried as is and with
//! its crc fixed up, so the fuzzer also reaches the checks behind the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ubcache::format::{
    BackingSuperblock, BucketTable, CacheSuperblock, SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES, SB_BYTES, SbCopy,
    TableSlot, Uuid,
};

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

fn check_superblocks(data: &[u8]) {
    for (copy, offset) in [(SbCopy::A, SB_A_OFFSET_BYTES), (SbCopy::B, SB_B_OFFSET_BYTES)] {
        if let Ok(sb) = CacheSuperblock::decode(data, offset) {
            let again = sb.encode(copy).expect("a decoded superblock encodes");
            assert_eq!(&again[..], &data[..SB_BYTES]);
            let _ = sb.features.open_mode();
        }
    }
    if let Ok(sb) = BackingSuperblock::decode(data) {
        assert_eq!(&sb.encode()[..], &data[..SB_BYTES]);
    }
    if let Ok(Some(read)) = ubcache::format::decode_backing_header(data) {
        let start = read.copy.offset_bytes() as usize;
        assert_eq!(&read.sb.encode_copy(read.copy)[..], &data[start..start + SB_BYTES]);
    }
}

fn check_table(data: &[u8]) {
    let set = Uuid(data.get(24..40).and_then(|b| b.try_into().ok()).unwrap_or([0; 16]));
    for slot in [TableSlot::A, TableSlot::B] {
        if let Ok(t) = BucketTable::decode(data, slot, set) {
            let again = t.encode(slot, set).expect("a decoded table encodes");
            assert_eq!(&again[..], &data[..again.len()]);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_superblocks(data);
    if let Some(fixed) = with_crc_at(data, SB_BYTES - 4) {
        check_superblocks(&fixed);
    }
    // The backing superblock's crc closes its first sector.
    if let Some(fixed) = with_crc_at(data, ubcache::format::BACKING_SB_RECORD_BYTES - 4) {
        check_superblocks(&fixed);
    }
    check_table(data);
    if let Some(n) = data.get(40..48).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        && let Some(at) =
            usize::try_from(n).ok().and_then(|n| n.checked_mul(3)).and_then(|x| x.checked_add(48))
        && let Some(fixed) = with_crc_at(data, at)
    {
        check_table(&fixed);
    }
});
