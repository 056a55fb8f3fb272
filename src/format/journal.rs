//! Journal entries and the record framing around them.

use super::{
    FormatError, FormatResult, FormatVersion, Key, NodePtr, Ptr, Reader, TableSlot, Uuid, check_crc,
    check_magic, get_8, get_16, get_u32, get_u64, need, put_u16, put_u32, put_u64,
};
use crate::dev::SECTOR_SIZE;

/// Encoded length of a btree root pointer ([`NodePtr::to_bytes`]).
pub const ROOT_PTR_LEN: usize = ubcache_btree::format::NODE_PTR_LEN;

/// A checkpoint: the btree root and bucket table that together describe the cache as of
/// journal seq `replay_from - 1`. Replay applies entries with seq >= `replay_from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEntry {
    /// The btree root (encoded by the btree crate: `{ addr u64 | seq u64 | len u32 | crc32c u32 }`).
    pub root: NodePtr,
    /// Region holding the bucket table written for this checkpoint.
    pub table_slot: TableSlot,
    /// Seq of that bucket table (must match what the region holds).
    pub table_seq: u64,
    /// Oldest journal seq still needed: replay starts there.
    pub replay_from: u64,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalEntry {
    /// Insert with overwrite semantics.
    KeyInsert(Key),
    /// Insert where the current state matches `expected` (read-miss fill, writeback clean).
    KeyReplace { key: Key, expected: Option<Key> },
    /// Drop every cached piece of `[start, end)` of `dev`.
    Invalidate { dev: u32, start: u64, end: u64 },
    /// A bucket's generation changed (invalidation for reuse).
    BucketGen { bucket: u64, generation: u8 },
    /// A checkpoint of btree root + bucket table.
    Checkpoint(CheckpointEntry),
}

const ENTRY_KEY_INSERT: u8 = 1;
const ENTRY_KEY_REPLACE: u8 = 2;
const ENTRY_INVALIDATE: u8 = 3;
const ENTRY_BUCKET_GEN: u8 = 4;
const ENTRY_CHECKPOINT: u8 = 5;
/// Format: { dev u32 | end u64 | size u32 | ptr offset u64 | ptr generation u8 | flags u8 (bit 0 dirty) }
const KEY_LEN: usize = 4 + 8 + 4 + 8 + 1 + 1;
/// Entry header: { kind u8 | payload len u16 }
const ENTRY_HEADER_LEN: usize = 3;

fn encode_key(out: &mut Vec<u8>, k: &Key) {
    out.extend_from_slice(&k.dev.to_le_bytes());
    out.extend_from_slice(&k.end.to_le_bytes());
    out.extend_from_slice(&k.size.to_le_bytes());
    out.extend_from_slice(&k.ptr.offset.to_le_bytes());
    out.push(k.ptr.generation);
    out.push(u8::from(k.dirty));
}

fn decode_key(r: &mut Reader<'_>) -> FormatResult<Key> {
    let dev = r.u32()?;
    let end = r.u64()?;
    let size = r.u32()?;
    let offset = r.u64()?;
    let generation = r.u8()?;
    let flags = r.u8()?;
    if flags > 1 {
        return Err(FormatError::Invalid(format!("key flags {flags:#x}")));
    }
    let key = Key { dev, end, size, ptr: Ptr { offset, generation }, dirty: flags == 1 };
    key.validate().map_err(|why| FormatError::Invalid(format!("journalled key {key:?}: {why}")))?;
    Ok(key)
}

impl JournalEntry {
    /// Appends the encoding to `out`.
    /// Format: { kind u8 | payload len u16 | payload }, payloads:
    /// - KeyInsert   { key }
    /// - KeyReplace  { key | has expected u8 | expected key (if has) }
    /// - Invalidate  { dev u32 | start u64 | end u64 }
    /// - BucketGen   { bucket u64 | generation u8 }
    /// - Checkpoint  { replay_from u64 | table slot u8 | table seq u64 | root NodePtr (24 bytes) }
    pub fn encode(&self, out: &mut Vec<u8>) -> FormatResult<()> {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0]);
        let kind = match self {
            JournalEntry::KeyInsert(k) => {
                encode_key(out, k);
                ENTRY_KEY_INSERT
            }
            JournalEntry::KeyReplace { key, expected } => {
                encode_key(out, key);
                match expected {
                    Some(e) => {
                        out.push(1);
                        encode_key(out, e);
                    }
                    None => out.push(0),
                }
                ENTRY_KEY_REPLACE
            }
            JournalEntry::Invalidate { dev, start: s, end } => {
                if s > end {
                    out.truncate(start);
                    return Err(FormatError::Invalid(format!("invalidate range {s}..{end} is reversed")));
                }
                out.extend_from_slice(&dev.to_le_bytes());
                out.extend_from_slice(&s.to_le_bytes());
                out.extend_from_slice(&end.to_le_bytes());
                ENTRY_INVALIDATE
            }
            JournalEntry::BucketGen { bucket, generation } => {
                out.extend_from_slice(&bucket.to_le_bytes());
                out.push(*generation);
                ENTRY_BUCKET_GEN
            }
            JournalEntry::Checkpoint(c) => {
                out.extend_from_slice(&c.replay_from.to_le_bytes());
                out.push(c.table_slot as u8);
                out.extend_from_slice(&c.table_seq.to_le_bytes());
                out.extend_from_slice(&c.root.to_bytes());
                ENTRY_CHECKPOINT
            }
        };
        let payload_len = out.len() - start - ENTRY_HEADER_LEN;
        out[start] = kind;
        // Every payload is bounded well below u16::MAX (largest: replace, 57 bytes).
        put_u16(out, start + 1, payload_len as u16);
        Ok(())
    }

    /// Length of the encoding.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        ENTRY_HEADER_LEN
            + match self {
                JournalEntry::KeyInsert(_) => KEY_LEN,
                JournalEntry::KeyReplace { expected, .. } => KEY_LEN + 1 + expected.map_or(0, |_| KEY_LEN),
                JournalEntry::Invalidate { .. } => 20,
                JournalEntry::BucketGen { .. } => 9,
                JournalEntry::Checkpoint(_) => 8 + 1 + 8 + ROOT_PTR_LEN,
            }
    }

    fn decode_one(r: &mut Reader<'_>) -> FormatResult<JournalEntry> {
        let kind = r.u8()?;
        let len = r.u16()? as usize;
        let payload = r.take(len)?;
        let mut p = Reader::new(payload);
        let entry = match kind {
            ENTRY_KEY_INSERT => JournalEntry::KeyInsert(decode_key(&mut p)?),
            ENTRY_KEY_REPLACE => {
                let key = decode_key(&mut p)?;
                let expected = match p.u8()? {
                    0 => None,
                    1 => Some(decode_key(&mut p)?),
                    other => return Err(FormatError::Invalid(format!("replace has-expected flag {other}"))),
                };
                JournalEntry::KeyReplace { key, expected }
            }
            ENTRY_INVALIDATE => {
                let dev = p.u32()?;
                let start = p.u64()?;
                let end = p.u64()?;
                if start > end {
                    return Err(FormatError::Invalid(format!("invalidate range {start}..{end} is reversed")));
                }
                JournalEntry::Invalidate { dev, start, end }
            }
            ENTRY_BUCKET_GEN => JournalEntry::BucketGen { bucket: p.u64()?, generation: p.u8()? },
            ENTRY_CHECKPOINT => {
                let replay_from = p.u64()?;
                let table_slot = TableSlot::try_from(p.u8()?)?;
                let table_seq = p.u64()?;
                let mut root = [0u8; ROOT_PTR_LEN];
                root.copy_from_slice(p.take(ROOT_PTR_LEN)?);
                let root = NodePtr::from_bytes(&root);
                JournalEntry::Checkpoint(CheckpointEntry { root, table_slot, table_seq, replay_from })
            }
            other => return Err(FormatError::Invalid(format!("unknown journal entry kind {other}"))),
        };
        if p.remaining() != 0 {
            return Err(FormatError::Invalid(format!(
                "journal entry kind {kind}: {} trailing payload bytes",
                p.remaining()
            )));
        }
        Ok(entry)
    }
}

/// Decodes exactly `count` entries filling all of `bytes`. The output is bounded by the input:
/// every entry takes at least 3 bytes, so a `count` larger than `bytes.len() / 3` is refused
/// before allocating.
pub fn decode_entries(bytes: &[u8], count: u32) -> FormatResult<Vec<JournalEntry>> {
    let count = count as usize;
    if count > bytes.len() / ENTRY_HEADER_LEN {
        return Err(FormatError::Invalid(format!(
            "{count} journal entries cannot fit in {} bytes",
            bytes.len()
        )));
    }
    let mut r = Reader::new(bytes);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(JournalEntry::decode_one(&mut r)?);
    }
    if r.remaining() != 0 {
        return Err(FormatError::Invalid(format!("{} bytes after the last journal entry", r.remaining())));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Journal record framing
// ---------------------------------------------------------------------------------------------

/// Magic of a journal record.
pub const JOURNAL_MAGIC: [u8; 8] = *b"ubcJRNL1";
/// Length of the record header.
pub const RECORD_HEADER_LEN: usize = JR_ENTRIES_OFF;
/// Bytes after the entries: the crc32c.
pub const RECORD_TRAILER_LEN: usize = 4;
/// Largest journal record the format allows. Writers split bigger commits (their own limit is
/// far lower, 256 KiB by default); replay reads a whole record into memory, so a header that
/// claims more is damaged, never a reason to allocate what it says.
pub const MAX_RECORD_BYTES: u64 = 16 << 20;

const JR_MAGIC_OFF: usize = 0;
const JR_VERSION_OFF: usize = JR_MAGIC_OFF + 8;
const JR_COUNT_OFF: usize = JR_VERSION_OFF + 4;
const JR_FIRST_SEQ_OFF: usize = JR_COUNT_OFF + 4;
const JR_PREV_SEQ_OFF: usize = JR_FIRST_SEQ_OFF + 8;
const JR_SELF_OFF: usize = JR_PREV_SEQ_OFF + 8;
const JR_PREV_OFFSET_OFF: usize = JR_SELF_OFF + 8;
const JR_SET_UUID_OFF: usize = JR_PREV_OFFSET_OFF + 8;
const JR_ENTRIES_LEN_OFF: usize = JR_SET_UUID_OFF + 16;
const JR_SECTORS_OFF: usize = JR_ENTRIES_LEN_OFF + 4;
const JR_ENTRIES_OFF: usize = JR_SECTORS_OFF + 4;
const _: () = assert!(JR_ENTRIES_OFF == 72);

/// Header of a journal record.
///
/// Format (the whole record, padded with zeros to a multiple of 512 bytes so that a torn
/// write of any sector breaks the crc):
/// `{ magic [8] | version u32 | entry count u32 | first seq u64 | prev seq u64 |
///    own sector u64 | prev record sector u64 | set uuid [16] | entries len u32 |
///    record sectors u32 | [entries] | crc32c of everything before it }`
///
/// Entry `i` has seq `first_seq + i`. `prev_seq`/`prev_sector` name the record this one
/// follows in the chain (0/0 for the first record after format), so replay links records by
/// position and seq, and a record left over from an older lap can never be mistaken for the
/// successor of a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub entry_count: u32,
    pub first_seq: u64,
    pub prev_seq: u64,
    /// Own address: sector offset of the record within the journal region.
    pub sector: u64,
    pub prev_sector: u64,
    pub set_uuid: Uuid,
    pub entries_len: u32,
    /// Whole record length including padding, in sectors.
    pub record_sectors: u32,
}

impl RecordHeader {
    /// Seq of the last entry (`first_seq - 1` for an empty record).
    #[must_use]
    pub fn last_seq(&self) -> u64 {
        self.first_seq.saturating_add(u64::from(self.entry_count)).saturating_sub(1)
    }
    /// Whole record length in bytes.
    #[must_use]
    pub fn record_bytes(&self) -> u64 {
        u64::from(self.record_sectors) * SECTOR_SIZE
    }

    /// Sectors a record with `entries_len` entry bytes occupies.
    #[must_use]
    pub fn sectors_for(entries_len: usize) -> u64 {
        ((RECORD_HEADER_LEN + entries_len + RECORD_TRAILER_LEN) as u64).div_ceil(SECTOR_SIZE)
    }

    /// Decodes and checks just the header (magic, version, lengths), for scanning. The crc is
    /// checked by [`decode_record`] once the whole record is read.
    pub fn decode(buf: &[u8]) -> FormatResult<RecordHeader> {
        need(buf, RECORD_HEADER_LEN)?;
        check_magic(get_8(buf, JR_MAGIC_OFF), &JOURNAL_MAGIC, "ubcJRNL1")?;
        FormatVersion::try_from(get_u32(buf, JR_VERSION_OFF))?;
        let h = RecordHeader {
            entry_count: get_u32(buf, JR_COUNT_OFF),
            first_seq: get_u64(buf, JR_FIRST_SEQ_OFF),
            prev_seq: get_u64(buf, JR_PREV_SEQ_OFF),
            sector: get_u64(buf, JR_SELF_OFF),
            prev_sector: get_u64(buf, JR_PREV_OFFSET_OFF),
            set_uuid: Uuid(get_16(buf, JR_SET_UUID_OFF)),
            entries_len: get_u32(buf, JR_ENTRIES_LEN_OFF),
            record_sectors: get_u32(buf, JR_SECTORS_OFF),
        };
        let needed = RecordHeader::sectors_for(h.entries_len as usize);
        if u64::from(h.record_sectors) != needed {
            return Err(FormatError::Invalid(format!(
                "record claims {} sectors, its {} entry bytes need {needed}",
                h.record_sectors, h.entries_len
            )));
        }
        if h.record_bytes() > MAX_RECORD_BYTES {
            return Err(FormatError::Invalid(format!(
                "record claims {} sectors, more than the format's limit of {MAX_RECORD_BYTES} bytes",
                h.record_sectors
            )));
        }
        if h.first_seq == 0
            || h.prev_seq >= h.first_seq
            || h.first_seq.checked_add(u64::from(h.entry_count)).is_none()
        {
            return Err(FormatError::Invalid(format!(
                "record seqs: first {} prev {} count {}",
                h.first_seq, h.prev_seq, h.entry_count
            )));
        }
        Ok(h)
    }
}

/// Encodes a whole record (header, entries, crc, zero padding to a sector multiple).
pub fn encode_record(h: &RecordHeader, entries: &[u8]) -> FormatResult<Vec<u8>> {
    if entries.len() != h.entries_len as usize
        || u64::from(h.record_sectors) != RecordHeader::sectors_for(entries.len())
    {
        return Err(FormatError::Invalid("record header does not match its entries".into()));
    }
    let total = h.record_bytes() as usize;
    let mut b = vec![0u8; total];
    b[JR_MAGIC_OFF..JR_MAGIC_OFF + 8].copy_from_slice(&JOURNAL_MAGIC);
    put_u32(&mut b, JR_VERSION_OFF, FormatVersion::CURRENT as u32);
    put_u32(&mut b, JR_COUNT_OFF, h.entry_count);
    put_u64(&mut b, JR_FIRST_SEQ_OFF, h.first_seq);
    put_u64(&mut b, JR_PREV_SEQ_OFF, h.prev_seq);
    put_u64(&mut b, JR_SELF_OFF, h.sector);
    put_u64(&mut b, JR_PREV_OFFSET_OFF, h.prev_sector);
    b[JR_SET_UUID_OFF..JR_SET_UUID_OFF + 16].copy_from_slice(&h.set_uuid.0);
    put_u32(&mut b, JR_ENTRIES_LEN_OFF, h.entries_len);
    put_u32(&mut b, JR_SECTORS_OFF, h.record_sectors);
    let end = JR_ENTRIES_OFF + entries.len();
    b[JR_ENTRIES_OFF..end].copy_from_slice(entries);
    let crc = crc32c::crc32c(&b[..end]);
    put_u32(&mut b, end, crc);
    Ok(b)
}

/// Decodes a whole record read from sector `actual_sector` of the journal region: header,
/// crc, own address, set uuid, then the entries.
pub fn decode_record(
    buf: &[u8],
    actual_sector: u64,
    set_uuid: Uuid,
) -> FormatResult<(RecordHeader, Vec<JournalEntry>)> {
    let h = RecordHeader::decode(buf)?;
    let end = RECORD_HEADER_LEN + h.entries_len as usize;
    need(buf, end + RECORD_TRAILER_LEN)?;
    check_crc(get_u32(buf, end), &buf[..end])?;
    if h.sector != actual_sector {
        return Err(FormatError::WrongAddress { recorded: h.sector, actual: actual_sector });
    }
    if h.set_uuid != set_uuid {
        return Err(FormatError::Invalid(format!(
            "journal record of cache set {} in cache set {set_uuid}",
            h.set_uuid
        )));
    }
    let entries = decode_entries(&buf[RECORD_HEADER_LEN..end], h.entry_count)?;
    Ok((h, entries))
}
