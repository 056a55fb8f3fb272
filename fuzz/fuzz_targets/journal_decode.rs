//! Journal record and entry decoders: any input decodes or fails cleanly, and what decodes
//! re-encodes to the same bytes. Each input is also tried with its crc fixed up, so the fuzzer
//! reaches the entry decoder behind the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ubcache::format::{self, RECORD_HEADER_LEN, RECORD_TRAILER_LEN, RecordHeader, Uuid};

fn check_record(data: &[u8]) {
    let Ok(h) = RecordHeader::decode(data) else { return };
    if let Ok((h2, entries)) = format::decode_record(data, h.sector, h.set_uuid) {
        assert_eq!(h, h2);
        let mut enc = Vec::new();
        for e in &entries {
            e.encode(&mut enc).expect("a decoded entry encodes");
        }
        let again = format::encode_record(&h, &enc).expect("a decoded record encodes");
        let covered = RECORD_HEADER_LEN + h.entries_len as usize + RECORD_TRAILER_LEN;
        assert_eq!(&again[..covered], &data[..covered]);
    }
    // Another cache set's or another address's record is never accepted.
    assert!(format::decode_record(data, h.sector.wrapping_add(1), h.set_uuid).is_err());
    let mut other: Uuid = h.set_uuid;
    other.0[0] ^= 1;
    assert!(format::decode_record(data, h.sector, other).is_err());
}

fuzz_target!(|data: &[u8]| {
    check_record(data);
    if let Ok(h) = RecordHeader::decode(data) {
        let at = RECORD_HEADER_LEN + h.entries_len as usize;
        if data.len() >= at + RECORD_TRAILER_LEN {
            let mut fixed = data.to_vec();
            let crc = crc32c::crc32c(&fixed[..at]);
            fixed[at..at + 4].copy_from_slice(&crc.to_le_bytes());
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
        assert_eq!(enc, rest);
    }
});
