//! The checkpointed bucket-state table (generations and priorities) and its two regions.

use super::{
    FormatError, FormatResult, FormatVersion, Geometry, MAX_BUCKETS, Uuid, check_crc, check_magic, get_8,
    get_16, get_u16, get_u32, get_u64, need, put_u16, put_u32, put_u64,
};
use crate::dev::{BlockDev, SECTOR_SIZE};

/// Which bucket-table region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TableSlot {
    A = 0,
    B = 1,
}

impl TableSlot {
    /// The other region: where the next checkpoint writes, so the last durable table survives
    /// a crash during the write.
    #[must_use]
    pub fn other(self) -> TableSlot {
        match self {
            TableSlot::A => TableSlot::B,
            TableSlot::B => TableSlot::A,
        }
    }
}

impl TryFrom<u8> for TableSlot {
    type Error = FormatError;
    fn try_from(v: u8) -> FormatResult<Self> {
        match v {
            0 => Ok(TableSlot::A),
            1 => Ok(TableSlot::B),
            other => Err(FormatError::Invalid(format!("bucket table slot {other}"))),
        }
    }
}

/// Magic of a bucket-table region.
pub const TABLE_MAGIC: [u8; 8] = *b"ubcBTABL";

const BT_MAGIC_OFF: usize = 0;
const BT_VERSION_OFF: usize = BT_MAGIC_OFF + 8;
const BT_SLOT_OFF: usize = BT_VERSION_OFF + 4;
const BT_SEQ_OFF: usize = BT_SLOT_OFF + 4;
const BT_SET_UUID_OFF: usize = BT_SEQ_OFF + 8;
const BT_NBUCKETS_OFF: usize = BT_SET_UUID_OFF + 16;
const BT_GENS_OFF: usize = BT_NBUCKETS_OFF + 8;
const _: () = assert!(BT_GENS_OFF == 48);

/// The checkpointed per-bucket state: generation and priority of every bucket.
///
/// Format: `{ magic [8] | version u32 | slot u32 (own address: 0 = A, 1 = B) | seq u64 |
///   set uuid [16] | nbuckets u64 | [generation u8; nbuckets] | [prio u16; nbuckets] | crc32c }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketTable {
    pub seq: u64,
    pub gens: Vec<u8>,
    pub prios: Vec<u16>,
}

impl BucketTable {
    /// Encoded size for `nbuckets` buckets (saturating: only used for layout checks).
    #[must_use]
    pub fn encoded_len(nbuckets: u64) -> u64 {
        (BT_GENS_OFF as u64).saturating_add(nbuckets.saturating_mul(3)).saturating_add(4)
    }

    /// Encodes for region `slot` of cache set `set_uuid`.
    pub fn encode(&self, slot: TableSlot, set_uuid: Uuid) -> FormatResult<Vec<u8>> {
        if self.gens.len() != self.prios.len() {
            return Err(FormatError::Invalid("bucket table gens and prios differ in length".into()));
        }
        let n = self.gens.len();
        let mut b = vec![0u8; BucketTable::encoded_len(n as u64) as usize];
        b[BT_MAGIC_OFF..BT_MAGIC_OFF + 8].copy_from_slice(&TABLE_MAGIC);
        put_u32(&mut b, BT_VERSION_OFF, FormatVersion::CURRENT as u32);
        put_u32(&mut b, BT_SLOT_OFF, u32::from(slot as u8));
        put_u64(&mut b, BT_SEQ_OFF, self.seq);
        b[BT_SET_UUID_OFF..BT_SET_UUID_OFF + 16].copy_from_slice(&set_uuid.0);
        put_u64(&mut b, BT_NBUCKETS_OFF, n as u64);
        b[BT_GENS_OFF..BT_GENS_OFF + n].copy_from_slice(&self.gens);
        let prios_off = BT_GENS_OFF + n;
        for (i, p) in self.prios.iter().enumerate() {
            put_u16(&mut b, prios_off + 2 * i, *p);
        }
        let crc_off = prios_off + 2 * n;
        let crc = crc32c::crc32c(&b[..crc_off]);
        put_u32(&mut b, crc_off, crc);
        Ok(b)
    }

    /// Decodes a table read from region `slot`. The bucket count is checked against the input
    /// length before anything is allocated.
    pub fn decode(buf: &[u8], slot: TableSlot, set_uuid: Uuid) -> FormatResult<BucketTable> {
        need(buf, BT_GENS_OFF)?;
        check_magic(get_8(buf, BT_MAGIC_OFF), &TABLE_MAGIC, "ubcBTABL")?;
        FormatVersion::try_from(get_u32(buf, BT_VERSION_OFF))?;
        let n64 = get_u64(buf, BT_NBUCKETS_OFF);
        if n64 > MAX_BUCKETS {
            return Err(FormatError::Invalid(format!("bucket table claims {n64} buckets")));
        }
        let total = BucketTable::encoded_len(n64);
        if (buf.len() as u64) < total {
            return Err(FormatError::Truncated { need: total, have: buf.len() as u64 });
        }
        let n = n64 as usize;
        let crc_off = BT_GENS_OFF + 3 * n;
        check_crc(get_u32(buf, crc_off), &buf[..crc_off])?;
        let recorded = u64::from(get_u32(buf, BT_SLOT_OFF));
        if recorded != u64::from(slot as u8) {
            return Err(FormatError::WrongAddress { recorded, actual: u64::from(slot as u8) });
        }
        let uuid = Uuid(get_16(buf, BT_SET_UUID_OFF));
        if uuid != set_uuid {
            return Err(FormatError::Invalid(format!(
                "bucket table of cache set {uuid} in cache set {set_uuid}"
            )));
        }
        let gens = buf[BT_GENS_OFF..BT_GENS_OFF + n].to_vec();
        let prios = (0..n).map(|i| get_u16(buf, BT_GENS_OFF + n + 2 * i)).collect();
        Ok(BucketTable { seq: get_u64(buf, BT_SEQ_OFF), gens, prios })
    }
}

/// Writes `table` to region `slot` and syncs. The caller then journals a checkpoint naming
/// `slot` and `table.seq`; until that record is durable the other region stays authoritative.
pub fn write_bucket_table(
    dev: &dyn BlockDev,
    geometry: &Geometry,
    set_uuid: Uuid,
    slot: TableSlot,
    table: &BucketTable,
) -> FormatResult<()> {
    if table.gens.len() as u64 != geometry.nbuckets {
        return Err(FormatError::Invalid(format!(
            "bucket table has {} buckets, the device {}",
            table.gens.len(),
            geometry.nbuckets
        )));
    }
    let mut bytes = table.encode(slot, set_uuid)?;
    let region = geometry.table_region(slot);
    if bytes.len() as u64 > region.len_bytes {
        return Err(FormatError::Invalid("bucket table larger than its region".into()));
    }
    // Pad to a sector multiple: devices opened with O_DIRECT need whole sectors.
    bytes.resize((bytes.len() as u64).next_multiple_of(SECTOR_SIZE) as usize, 0);
    dev.write_at(&bytes, region.offset_bytes)?;
    dev.sync()?;
    Ok(())
}

/// Reads the table in region `slot` and checks it is the one a checkpoint named (`expected_seq`).
pub fn read_bucket_table(
    dev: &dyn BlockDev,
    geometry: &Geometry,
    set_uuid: Uuid,
    slot: TableSlot,
    expected_seq: u64,
) -> FormatResult<BucketTable> {
    let len = BucketTable::encoded_len(geometry.nbuckets).next_multiple_of(SECTOR_SIZE);
    let region = geometry.table_region(slot);
    if len > region.len_bytes {
        return Err(FormatError::Invalid("bucket table larger than its region".into()));
    }
    let mut buf = vec![0u8; len as usize];
    dev.read_at(&mut buf, region.offset_bytes)?;
    let table = BucketTable::decode(&buf, slot, set_uuid)?;
    if table.seq != expected_seq {
        return Err(FormatError::Invalid(format!(
            "bucket table {slot:?} has seq {}, the checkpoint names seq {expected_seq}",
            table.seq
        )));
    }
    if table.gens.len() as u64 != geometry.nbuckets {
        return Err(FormatError::Invalid(format!(
            "bucket table has {} buckets, the device {}",
            table.gens.len(),
            geometry.nbuckets
        )));
    }
    Ok(table)
}
