//! Geometry: where everything lives on the cache device (see the diagram in [`super`]).

use super::{BucketTable, FormatError, FormatResult, TableSlot};
use crate::dev::SECTOR_SIZE;

/// Byte address of superblock copy A. The first 4 KiB stay unused (partition tables, boot
/// blocks and bcache all leave them alone).
pub const SB_A_OFFSET_BYTES: u64 = 4096;
/// Byte address of superblock copy B: 64 KiB after copy A (see module doc for why).
pub const SB_B_OFFSET_BYTES: u64 = SB_A_OFFSET_BYTES + 64 * 1024;
/// Size of one superblock copy: a 4 KiB block, so a copy is one atomic unit on 4Kn devices.
pub const SB_BYTES: usize = 4096;
/// End of the superblock area; buckets below it are reserved.
pub const SB_AREA_BYTES: u64 = SB_B_OFFSET_BYTES + SB_BYTES as u64;

/// Smallest bucket: 4 KiB (tests use 8-64 KiB; production default 512 KiB).
pub const MIN_BUCKET_BYTES: u64 = 4096;
/// Largest bucket: 64 MiB. Bounds per-bucket sector counts to u32 comfortably.
pub const MAX_BUCKET_BYTES: u64 = 64 << 20;
/// Default bucket size, as bcache.
pub const DEFAULT_BUCKET_BYTES: u64 = 512 * 1024;
/// Most buckets a cache device may have (2^31): bounds the in-memory bucket table (a few bytes
/// per bucket) and the table region size, whatever a corrupt superblock claims.
pub const MAX_BUCKETS: u64 = 1 << 31;
/// Fewest journal buckets; the journal gets nbuckets/64 clamped to [MIN, MAX].
pub const MIN_JOURNAL_BUCKETS: u64 = 8;
/// Most journal buckets at format (the journal is scanned whole at recovery, so it stays small).
pub const MAX_JOURNAL_BUCKETS: u64 = 256;
/// Fewest buckets left for data and btree after the fixed regions.
pub const MIN_FREE_BUCKETS: u64 = 8;

/// A contiguous run of buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BucketRange {
    pub first: u64,
    pub count: u64,
}

impl BucketRange {
    /// One past the last bucket (saturating, so a corrupt value cannot overflow).
    #[must_use]
    pub fn end(&self) -> u64 {
        self.first.saturating_add(self.count)
    }
    #[must_use]
    pub fn contains(&self, bucket: u64) -> bool {
        bucket >= self.first && bucket < self.end()
    }
}

/// The layout of a cache device, fixed at format and stored in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub bucket_sectors: u32,
    pub node_sectors: u32,
    pub nbuckets: u64,
    pub journal: BucketRange,
    pub table_a: BucketRange,
    pub table_b: BucketRange,
}

impl Geometry {
    /// Lays out a device of `device_bytes` with the given bucket and btree node sizes (both
    /// powers of two, node <= bucket).
    pub fn compute(device_bytes: u64, bucket_bytes: u64, node_bytes: u64) -> FormatResult<Geometry> {
        if !bucket_bytes.is_power_of_two() || !(MIN_BUCKET_BYTES..=MAX_BUCKET_BYTES).contains(&bucket_bytes) {
            return Err(FormatError::Invalid(format!(
                "bucket size {bucket_bytes} must be a power of two in [{MIN_BUCKET_BYTES}, {MAX_BUCKET_BYTES}]"
            )));
        }
        if !node_bytes.is_power_of_two() || node_bytes < SECTOR_SIZE || node_bytes > bucket_bytes {
            return Err(FormatError::Invalid(format!(
                "btree node size {node_bytes} must be a power of two in [512, bucket size {bucket_bytes}]"
            )));
        }
        let nbuckets = (device_bytes / bucket_bytes).min(MAX_BUCKETS);
        let sb_buckets = SB_AREA_BYTES.div_ceil(bucket_bytes);
        let journal_count = (nbuckets / 64).clamp(MIN_JOURNAL_BUCKETS, MAX_JOURNAL_BUCKETS);
        let table_count = BucketTable::encoded_len(nbuckets).div_ceil(bucket_bytes);
        let journal = BucketRange { first: sb_buckets, count: journal_count };
        let table_a = BucketRange { first: journal.end(), count: table_count };
        let table_b = BucketRange { first: table_a.end(), count: table_count };
        let geometry = Geometry {
            bucket_sectors: (bucket_bytes / SECTOR_SIZE) as u32,
            node_sectors: (node_bytes / SECTOR_SIZE) as u32,
            nbuckets,
            journal,
            table_a,
            table_b,
        };
        if table_b.end().saturating_add(MIN_FREE_BUCKETS) > nbuckets {
            return Err(FormatError::Invalid(format!(
                "device of {device_bytes} bytes is too small: {nbuckets} buckets of {bucket_bytes} bytes, \
                 {} needed for metadata plus {MIN_FREE_BUCKETS} for data",
                table_b.end()
            )));
        }
        Ok(geometry)
    }

    /// Checks a decoded geometry: sizes in range, regions in order, inside the device, and the
    /// table regions big enough for the bucket table.
    pub fn validate(&self) -> FormatResult<()> {
        let bucket_bytes = self.bucket_bytes();
        if !bucket_bytes.is_power_of_two() || !(MIN_BUCKET_BYTES..=MAX_BUCKET_BYTES).contains(&bucket_bytes) {
            return Err(FormatError::Invalid(format!("bucket size {bucket_bytes} bytes out of range")));
        }
        let node_bytes = self.node_bytes();
        if !node_bytes.is_power_of_two() || node_bytes < SECTOR_SIZE || node_bytes > bucket_bytes {
            return Err(FormatError::Invalid(format!("btree node size {node_bytes} bytes out of range")));
        }
        if self.nbuckets > MAX_BUCKETS {
            return Err(FormatError::Invalid(format!(
                "{} buckets is more than {MAX_BUCKETS}",
                self.nbuckets
            )));
        }
        let sb_buckets = SB_AREA_BYTES.div_ceil(bucket_bytes);
        let table_needed = BucketTable::encoded_len(self.nbuckets).div_ceil(bucket_bytes);
        let ordered = self.journal.first >= sb_buckets
            && self.journal.count >= 1
            && self.table_a.first >= self.journal.end()
            && self.table_b.first >= self.table_a.end()
            && self.table_a.count == self.table_b.count
            && self.table_a.count >= table_needed
            && self.table_b.end() <= self.nbuckets;
        if !ordered {
            return Err(FormatError::Invalid(format!("inconsistent layout: {self:?}")));
        }
        Ok(())
    }

    #[must_use]
    pub fn bucket_bytes(&self) -> u64 {
        u64::from(self.bucket_sectors) * SECTOR_SIZE
    }
    #[must_use]
    pub fn node_bytes(&self) -> u64 {
        u64::from(self.node_sectors) * SECTOR_SIZE
    }
    /// Bytes the device must have for this layout.
    #[must_use]
    pub fn device_bytes(&self) -> u64 {
        self.nbuckets.saturating_mul(self.bucket_bytes())
    }
    /// First sector of `bucket`.
    #[must_use]
    pub fn bucket_start_sector(&self, bucket: u64) -> u64 {
        bucket.saturating_mul(u64::from(self.bucket_sectors))
    }
    /// The bucket holding `sector`, if it is on the device.
    #[must_use]
    pub fn bucket_of_sector(&self, sector: u64) -> Option<u64> {
        let b = sector / u64::from(self.bucket_sectors.max(1));
        (b < self.nbuckets).then_some(b)
    }
    /// First bucket that is neither superblock area, journal nor bucket table.
    #[must_use]
    pub fn first_free_bucket(&self) -> u64 {
        self.table_b.end()
    }
    /// Whether the bucket belongs to a fixed metadata region (superblocks, journal, tables).
    #[must_use]
    pub fn is_fixed_metadata(&self, bucket: u64) -> bool {
        bucket < self.first_free_bucket()
    }
    /// Byte range of the journal ring.
    #[must_use]
    pub fn journal_region(&self) -> Region {
        self.region_of(self.journal)
    }
    /// Byte range of a bucket-table region.
    #[must_use]
    pub fn table_region(&self, slot: TableSlot) -> Region {
        match slot {
            TableSlot::A => self.region_of(self.table_a),
            TableSlot::B => self.region_of(self.table_b),
        }
    }
    fn region_of(&self, r: BucketRange) -> Region {
        Region {
            offset_bytes: r.first.saturating_mul(self.bucket_bytes()),
            len_bytes: r.count.saturating_mul(self.bucket_bytes()),
        }
    }
}

/// A byte range of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset_bytes: u64,
    pub len_bytes: u64,
}
