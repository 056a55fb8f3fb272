//! Every on-disk byte of a cache set outside the btree: superblocks, the cache layout, journal
//! records and entries, and the checkpointed bucket-state table.
//!
//! # API summary
//! - Layout: [`Geometry::compute`] lays out a cache device (superblock area, journal, two
//!   bucket-table regions, then data/btree buckets); [`Geometry::validate`] checks a decoded one.
//! - Cache superblock: [`CacheSuperblock::encode`] / [`CacheSuperblock::decode`];
//!   [`write_cache_superblock`] writes copy A, syncs, writes copy B, syncs;
//!   [`read_cache_superblock`] picks the valid copy with the highest seq and reports a bad copy.
//! - Backing superblock (two single-sector copies at bytes 0 and 4096, data at 8 KiB):
//!   [`BackingSuperblock::encode`] / [`BackingSuperblock::decode`] (copy A),
//!   [`BackingSuperblock::encode_copy`] / [`BackingSuperblock::decode_copy`];
//!   [`write_backing_superblock`] writes copy A, syncs, copy B, syncs;
//!   [`read_backing_superblock`] (`Ok(None)` = raw image) and [`read_backing_superblock_copies`]
//!   pick the copy in force with [`decode_backing_header`].
//! - Journal: [`JournalEntry::encode`] / [`decode_entries`]; record framing
//!   [`RecordHeader`], [`encode_record`], [`decode_record`] (used by [`crate::journal`]).
//! - Bucket table: [`BucketTable::encode`] / [`BucketTable::decode`],
//!   [`write_bucket_table`] / [`read_bucket_table`] on regions [`TableSlot::A`] / [`TableSlot::B`].
//! - Errors: [`FormatError`]. Every decoder accepts any input without panicking: lengths are
//!   validated before arithmetic and every allocation is bounded by the input length.
//!
//! All integers are little-endian; every record carries a magic, a format version, its own
//! address, a sequence number and a crc32c (Castagnoli). Addresses are in 512-byte sectors unless
//! a name ends in `_bytes`. `docs/format.md` has the same diagrams plus the version history.
//!
//! # Cache device layout
//! ```text
//! byte 0        4 KiB                 68 KiB                72 KiB
//! | (unused)    | superblock copy A   | ... | superblock copy B | ...pad to a bucket boundary
//! bucket: [0, sb_buckets)  superblock area (SB_AREA_BYTES = 72 KiB, rounded up to buckets)
//!         [journal.first, +journal.count)   journal ring          (fixed at format)
//!         [table_a.first, +table_count)     bucket table region A (gens + prios)
//!         [table_b.first, +table_count)     bucket table region B
//!         [first_free_bucket, nbuckets)     data and btree buckets (the allocator's)
//! ```
//! Copy B sits 64 KiB after copy A so that one failed or misdirected write of a few sectors
//! cannot destroy both copies.
//!
//! # Cache superblock (4096 bytes, at byte 4096 (A) and byte 69632 (B))
//! ```text
//! off  len  field
//!    0    8 magic "ubcCACHE"
//!    8    4 version (FormatVersion)
//!   12    4 reserved, 0
//!   16    8 compat features      (unknown bits ignored; bits 0-2: replacement policy)
//!   24    8 incompat features    (unknown bits: refuse to open)
//!   32    8 ro_compat features   (unknown bits: open read-only)
//!   40   16 cache-set uuid
//!   56   16 cache-device uuid
//!   72    8 own byte address (4096 or 69632)
//!   80    8 seq (+1 on every superblock write)
//!   88    4 bucket size, sectors
//!   92    4 btree node size, sectors
//!   96    8 nbuckets
//!  104    8 journal first bucket      112  8 journal bucket count
//!  120    8 table A first bucket      128  8 table B first bucket
//!  136    8 table region bucket count 144  4 backing device count  148 4 reserved, 0
//!  152 40*64 backing entries { uuid 16 | dev id u32 | reserved u32 | size_bytes u64 | data_offset_bytes u64 }
//! 2712 .. 4092 zero
//! 4092    4 crc32c of bytes [0, 4092)
//! ```

use crate::dev::{BlockDev, DevError, SECTOR_SIZE};
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Errors and versions
// ---------------------------------------------------------------------------------------------

/// Errors of the on-disk format layer.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The magic number does not name the structure that was expected here.
    #[error("bad magic: expected {expected:?}, found {found:02x?}")]
    BadMagic { expected: &'static str, found: [u8; 8] },
    /// A version this build does not know (written by a newer ubcache, or garbage).
    #[error("unsupported format version {0} (this build reads versions 1..={max})", max = FormatVersion::CURRENT as u32)]
    UnsupportedVersion(u32),
    /// The stored crc32c does not match the bytes.
    #[error("checksum mismatch: computed {got:#010x}, stored {expected:#010x}")]
    ChecksumMismatch { got: u32, expected: u32 },
    /// A valid-looking structure that claims to live somewhere else (misdirected write, or a
    /// structure copied from another place).
    #[error("structure at {actual} says it belongs at {recorded}")]
    WrongAddress { recorded: u64, actual: u64 },
    /// The input ends before the structure does.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: u64, have: u64 },
    /// The structure uses an incompatible feature this build does not implement.
    #[error("unknown incompatible feature bits {0:#x}: refusing to open (written by a newer ubcache?)")]
    UnknownIncompatFeatures(u64),
    /// A field holds a value that cannot be right.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Both superblock copies failed to decode.
    #[error("no valid cache superblock: copy A: {a}; copy B: {b}")]
    NoValidSuperblock { a: Box<FormatError>, b: Box<FormatError> },
    /// The device carries the backing magic but neither backing superblock copy is valid.
    #[error("no valid backing superblock: copy A: {a}; copy B: {b}")]
    NoValidBackingSuperblock { a: Box<FormatError>, b: Box<FormatError> },
    /// The device failed.
    #[error(transparent)]
    Dev(#[from] DevError),
}

impl FormatError {
    /// True when the error says the bytes are damaged or not ours (as opposed to an I/O failure).
    #[must_use]
    pub fn is_corruption(&self) -> bool {
        !matches!(self, FormatError::Dev(_))
    }
}

impl From<FormatError> for DevError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Dev(d) => d,
            other => DevError::Corrupted(other.to_string()),
        }
    }
}

pub type FormatResult<T> = Result<T, FormatError>;

/// On-disk format versions. Every structure carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum FormatVersion {
    /// Version 1 (2026-11): the first format. Superblocks, journal v1 entries, bucket table.
    V1 = 1,
}

impl FormatVersion {
    /// The version this build writes.
    pub const CURRENT: FormatVersion = FormatVersion::V1;
}

impl TryFrom<u32> for FormatVersion {
    type Error = FormatError;
    fn try_from(v: u32) -> FormatResult<Self> {
        match v {
            1 => Ok(FormatVersion::V1),
            other => Err(FormatError::UnsupportedVersion(other)),
        }
    }
}

/// Feature bits of a superblock. A feature changes the format without changing its version:
/// `compat` features can be ignored by readers that do not know them, unknown `ro_compat`
/// features allow reading but not writing, unknown `incompat` features forbid opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    pub compat: u64,
    pub incompat: u64,
    pub ro_compat: u64,
}

/// Compat feature of the cache superblock: the set's replacement policy is LRU (chosen at
/// runtime with `ubcache set replacement_policy`). At most one `COMPAT_POLICY_*` bit is set;
/// none: the policy was never set at runtime and the configuration's applies. Compat, because a
/// build that does not know it loses nothing but the preference (it uses its configured policy).
pub const COMPAT_POLICY_LRU: u64 = 1 << 0;
/// Compat feature: the set's replacement policy is FIFO (see [`COMPAT_POLICY_LRU`]).
pub const COMPAT_POLICY_FIFO: u64 = 1 << 1;
/// Compat feature: the set's replacement policy is random (see [`COMPAT_POLICY_LRU`]).
pub const COMPAT_POLICY_RANDOM: u64 = 1 << 2;
/// Every replacement-policy bit.
pub const COMPAT_POLICY_MASK: u64 = COMPAT_POLICY_LRU | COMPAT_POLICY_FIFO | COMPAT_POLICY_RANDOM;

/// Feature bits this build knows. The masks exist so that a newer ubcache can add features that
/// older builds ignore (compat), refuse (incompat) or open read-only (ro_compat).
pub const KNOWN_COMPAT: u64 = COMPAT_POLICY_MASK;
/// Known incompatible features (none in version 1).
pub const KNOWN_INCOMPAT: u64 = 0;
/// Known read-only-compatible features (none in version 1).
pub const KNOWN_RO_COMPAT: u64 = 0;

/// How a structure with these features may be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadWrite,
    /// Unknown ro_compat features: reading is safe, writing could break the unknown feature.
    ReadOnly,
}

impl Features {
    /// Checks the bits against what this build knows.
    pub fn open_mode(&self) -> FormatResult<OpenMode> {
        let unknown_incompat = self.incompat & !KNOWN_INCOMPAT;
        if unknown_incompat != 0 {
            return Err(FormatError::UnknownIncompatFeatures(unknown_incompat));
        }
        if self.ro_compat & !KNOWN_RO_COMPAT != 0 {
            return Ok(OpenMode::ReadOnly);
        }
        Ok(OpenMode::ReadWrite)
    }
}

/// A 128-bit identifier (cache set, cache device, backing device).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// The all-zero uuid: "none" (e.g. a detached backing device's cache set).
    pub const NIL: Uuid = Uuid([0; 16]);

    /// A fresh random uuid (from the OS random source; falls back to time and pid mixing when
    /// that is unavailable, which is still unique enough to tell two formats apart).
    #[must_use]
    pub fn random() -> Uuid {
        use std::io::Read;
        let mut bytes = [0u8; 16];
        let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        if from_os.is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let mut state = nanos ^ (u64::from(std::process::id()) << 32);
            for chunk in bytes.chunks_mut(8) {
                state = splitmix64(&mut state);
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
        }
        // RFC 4122 version 4 / variant bits, so tools recognise it as a random uuid.
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Uuid(bytes)
    }

    #[must_use]
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One step of the splitmix64 generator (used for uuid fallback and random reclaim).
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------------------
// Little-endian helpers over slices whose length was checked by the caller
// ---------------------------------------------------------------------------------------------

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
fn get_16(b: &[u8], off: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    a
}
fn get_8(b: &[u8], off: usize) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    a
}
fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn need(buf: &[u8], len: usize) -> FormatResult<()> {
    if buf.len() < len {
        return Err(FormatError::Truncated { need: len as u64, have: buf.len() as u64 });
    }
    Ok(())
}

/// Version 1 defines reserved and unused bytes as zero; anything else is not a structure this
/// build wrote (a later format that uses them sets a feature bit or a new version).
fn check_zero(bytes: &[u8], what: &str) -> FormatResult<()> {
    if bytes.iter().any(|&b| b != 0) {
        return Err(FormatError::Invalid(format!("{what} must be zero")));
    }
    Ok(())
}

fn check_crc(stored: u32, bytes: &[u8]) -> FormatResult<()> {
    let got = crc32c::crc32c(bytes);
    if got != stored {
        return Err(FormatError::ChecksumMismatch { got, expected: stored });
    }
    Ok(())
}

fn check_magic(found: [u8; 8], expected: &'static [u8; 8], name: &'static str) -> FormatResult<()> {
    if &found != expected {
        return Err(FormatError::BadMagic { expected: name, found });
    }
    Ok(())
}

/// A bounds-checked sequential reader for variable-length records.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> FormatResult<&'a [u8]> {
        if self.remaining() < n {
            return Err(FormatError::Truncated {
                need: (self.pos as u64).saturating_add(n as u64),
                have: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> FormatResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> FormatResult<u16> {
        Ok(get_u16(self.take(2)?, 0))
    }
    fn u32(&mut self) -> FormatResult<u32> {
        Ok(get_u32(self.take(4)?, 0))
    }
    fn u64(&mut self) -> FormatResult<u64> {
        Ok(get_u64(self.take(8)?, 0))
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry: where everything lives on the cache device
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Cache superblock
// ---------------------------------------------------------------------------------------------

/// Magic of the cache superblock.
pub const CACHE_SB_MAGIC: [u8; 8] = *b"ubcCACHE";
/// Most backing devices one cache set registers (bounded by the 4 KiB superblock).
pub const MAX_BACKING_DEVS: usize = 64;

const SB_MAGIC_OFF: usize = 0;
const SB_VERSION_OFF: usize = SB_MAGIC_OFF + 8;
const SB_RESERVED0_OFF: usize = SB_VERSION_OFF + 4;
const SB_COMPAT_OFF: usize = SB_RESERVED0_OFF + 4;
const SB_INCOMPAT_OFF: usize = SB_COMPAT_OFF + 8;
const SB_RO_COMPAT_OFF: usize = SB_INCOMPAT_OFF + 8;
const SB_SET_UUID_OFF: usize = SB_RO_COMPAT_OFF + 8;
const SB_DEV_UUID_OFF: usize = SB_SET_UUID_OFF + 16;
const SB_SELF_OFF: usize = SB_DEV_UUID_OFF + 16;
const SB_SEQ_OFF: usize = SB_SELF_OFF + 8;
const SB_BUCKET_SECTORS_OFF: usize = SB_SEQ_OFF + 8;
const SB_NODE_SECTORS_OFF: usize = SB_BUCKET_SECTORS_OFF + 4;
const SB_NBUCKETS_OFF: usize = SB_NODE_SECTORS_OFF + 4;
const SB_JOURNAL_FIRST_OFF: usize = SB_NBUCKETS_OFF + 8;
const SB_JOURNAL_COUNT_OFF: usize = SB_JOURNAL_FIRST_OFF + 8;
const SB_TABLE_A_OFF: usize = SB_JOURNAL_COUNT_OFF + 8;
const SB_TABLE_B_OFF: usize = SB_TABLE_A_OFF + 8;
const SB_TABLE_COUNT_OFF: usize = SB_TABLE_B_OFF + 8;
const SB_BACKING_COUNT_OFF: usize = SB_TABLE_COUNT_OFF + 8;
const SB_RESERVED1_OFF: usize = SB_BACKING_COUNT_OFF + 4;
const SB_BACKING_OFF: usize = SB_RESERVED1_OFF + 4;
/// Format: { uuid [16] | dev id u32 | reserved u32 | size_bytes u64 | data_offset_bytes u64 }
const BACKING_ENTRY_LEN: usize = 16 + 4 + 4 + 8 + 8;
const SB_BACKING_END: usize = SB_BACKING_OFF + MAX_BACKING_DEVS * BACKING_ENTRY_LEN;
const SB_CRC_OFF: usize = SB_BYTES - 4;
const _: () = assert!(SB_BACKING_END <= SB_CRC_OFF);
const _: () = assert!(SB_BACKING_OFF == 152);

/// Which of the two superblock copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SbCopy {
    A,
    B,
}

impl SbCopy {
    #[must_use]
    pub fn offset_bytes(self) -> u64 {
        match self {
            SbCopy::A => SB_A_OFFSET_BYTES,
            SbCopy::B => SB_B_OFFSET_BYTES,
        }
    }
}

/// A backing device registered with the cache set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackingEntry {
    /// The backing superblock's uuid.
    pub uuid: Uuid,
    /// The `dev` number keys of this backing device carry in the btree. Unique in the set.
    pub dev_id: u32,
    /// Size of the whole backing device in bytes (superblock included).
    pub size_bytes: u64,
    /// Where the exported data starts on the backing device.
    pub data_offset_bytes: u64,
}

/// A replacement policy stored in the cache superblock's compat bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredReplacementPolicy {
    Lru,
    Fifo,
    Random,
}

/// The cache device's superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSuperblock {
    pub version: FormatVersion,
    pub features: Features,
    pub set_uuid: Uuid,
    pub dev_uuid: Uuid,
    /// +1 on every write; the copy with the highest valid seq wins.
    pub seq: u64,
    pub geometry: Geometry,
    pub backing: Vec<BackingEntry>,
}

impl CacheSuperblock {
    /// A superblock for a freshly formatted cache device.
    #[must_use]
    pub fn new(geometry: Geometry, set_uuid: Uuid, dev_uuid: Uuid) -> Self {
        Self {
            version: FormatVersion::CURRENT,
            features: Features::default(),
            set_uuid,
            dev_uuid,
            seq: 1,
            geometry,
            backing: Vec::new(),
        }
    }

    /// The replacement policy stored by a runtime change (`None`: never set). Several policy
    /// bits (which this build never writes) read as `None`.
    #[must_use]
    pub fn replacement_policy(&self) -> Option<StoredReplacementPolicy> {
        match self.features.compat & COMPAT_POLICY_MASK {
            COMPAT_POLICY_LRU => Some(StoredReplacementPolicy::Lru),
            COMPAT_POLICY_FIFO => Some(StoredReplacementPolicy::Fifo),
            COMPAT_POLICY_RANDOM => Some(StoredReplacementPolicy::Random),
            _ => None,
        }
    }

    /// Stores `policy` in the compat bits (the caller advances `seq` and writes the superblock).
    pub fn set_replacement_policy(&mut self, policy: StoredReplacementPolicy) {
        let bit = match policy {
            StoredReplacementPolicy::Lru => COMPAT_POLICY_LRU,
            StoredReplacementPolicy::Fifo => COMPAT_POLICY_FIFO,
            StoredReplacementPolicy::Random => COMPAT_POLICY_RANDOM,
        };
        self.features.compat = (self.features.compat & !COMPAT_POLICY_MASK) | bit;
    }

    /// Format: { magic | version | .. | geometry | backing entries | crc32c }, 4096 bytes, see
    /// the module doc. `copy` sets the own-address field.
    pub fn encode(&self, copy: SbCopy) -> FormatResult<[u8; SB_BYTES]> {
        if self.backing.len() > MAX_BACKING_DEVS {
            return Err(FormatError::Invalid(format!(
                "{} backing devices, at most {MAX_BACKING_DEVS} fit in the superblock",
                self.backing.len()
            )));
        }
        self.geometry.validate()?;
        let g = &self.geometry;
        let mut b = [0u8; SB_BYTES];
        b[SB_MAGIC_OFF..SB_MAGIC_OFF + 8].copy_from_slice(&CACHE_SB_MAGIC);
        put_u32(&mut b, SB_VERSION_OFF, self.version as u32);
        put_u64(&mut b, SB_COMPAT_OFF, self.features.compat);
        put_u64(&mut b, SB_INCOMPAT_OFF, self.features.incompat);
        put_u64(&mut b, SB_RO_COMPAT_OFF, self.features.ro_compat);
        b[SB_SET_UUID_OFF..SB_SET_UUID_OFF + 16].copy_from_slice(&self.set_uuid.0);
        b[SB_DEV_UUID_OFF..SB_DEV_UUID_OFF + 16].copy_from_slice(&self.dev_uuid.0);
        put_u64(&mut b, SB_SELF_OFF, copy.offset_bytes());
        put_u64(&mut b, SB_SEQ_OFF, self.seq);
        put_u32(&mut b, SB_BUCKET_SECTORS_OFF, g.bucket_sectors);
        put_u32(&mut b, SB_NODE_SECTORS_OFF, g.node_sectors);
        put_u64(&mut b, SB_NBUCKETS_OFF, g.nbuckets);
        put_u64(&mut b, SB_JOURNAL_FIRST_OFF, g.journal.first);
        put_u64(&mut b, SB_JOURNAL_COUNT_OFF, g.journal.count);
        put_u64(&mut b, SB_TABLE_A_OFF, g.table_a.first);
        put_u64(&mut b, SB_TABLE_B_OFF, g.table_b.first);
        put_u64(&mut b, SB_TABLE_COUNT_OFF, g.table_a.count);
        put_u32(&mut b, SB_BACKING_COUNT_OFF, self.backing.len() as u32);
        for (i, e) in self.backing.iter().enumerate() {
            let off = SB_BACKING_OFF + i * BACKING_ENTRY_LEN;
            b[off..off + 16].copy_from_slice(&e.uuid.0);
            put_u32(&mut b, off + 16, e.dev_id);
            put_u64(&mut b, off + 24, e.size_bytes);
            put_u64(&mut b, off + 32, e.data_offset_bytes);
        }
        let crc = crc32c::crc32c(&b[..SB_CRC_OFF]);
        put_u32(&mut b, SB_CRC_OFF, crc);
        Ok(b)
    }

    /// Decodes a copy read from byte address `actual_offset`. Checks magic, crc, version,
    /// own address and geometry; feature bits are checked by the caller via
    /// [`Features::open_mode`] (so a tool can still show a superblock it may not open).
    pub fn decode(buf: &[u8], actual_offset: u64) -> FormatResult<CacheSuperblock> {
        need(buf, SB_BYTES)?;
        let b = &buf[..SB_BYTES];
        check_magic(get_8(b, SB_MAGIC_OFF), &CACHE_SB_MAGIC, "ubcCACHE")?;
        check_crc(get_u32(b, SB_CRC_OFF), &b[..SB_CRC_OFF])?;
        let version = FormatVersion::try_from(get_u32(b, SB_VERSION_OFF))?;
        let recorded = get_u64(b, SB_SELF_OFF);
        if recorded != actual_offset {
            return Err(FormatError::WrongAddress { recorded, actual: actual_offset });
        }
        let table_count = get_u64(b, SB_TABLE_COUNT_OFF);
        let geometry = Geometry {
            bucket_sectors: get_u32(b, SB_BUCKET_SECTORS_OFF),
            node_sectors: get_u32(b, SB_NODE_SECTORS_OFF),
            nbuckets: get_u64(b, SB_NBUCKETS_OFF),
            journal: BucketRange {
                first: get_u64(b, SB_JOURNAL_FIRST_OFF),
                count: get_u64(b, SB_JOURNAL_COUNT_OFF),
            },
            table_a: BucketRange { first: get_u64(b, SB_TABLE_A_OFF), count: table_count },
            table_b: BucketRange { first: get_u64(b, SB_TABLE_B_OFF), count: table_count },
        };
        geometry.validate()?;
        let count = get_u32(b, SB_BACKING_COUNT_OFF) as usize;
        if count > MAX_BACKING_DEVS {
            return Err(FormatError::Invalid(format!("backing device count {count} > {MAX_BACKING_DEVS}")));
        }
        check_zero(&b[SB_RESERVED0_OFF..SB_RESERVED0_OFF + 4], "superblock reserved field at 12")?;
        check_zero(&b[SB_RESERVED1_OFF..SB_RESERVED1_OFF + 4], "superblock reserved field at 148")?;
        check_zero(&b[SB_BACKING_OFF + count * BACKING_ENTRY_LEN..SB_CRC_OFF], "unused superblock space")?;
        let mut backing = Vec::with_capacity(count);
        for i in 0..count {
            let off = SB_BACKING_OFF + i * BACKING_ENTRY_LEN;
            check_zero(&b[off + 20..off + 24], "backing entry reserved field")?;
            let e = BackingEntry {
                uuid: Uuid(get_16(b, off)),
                dev_id: get_u32(b, off + 16),
                size_bytes: get_u64(b, off + 24),
                data_offset_bytes: get_u64(b, off + 32),
            };
            if e.data_offset_bytes > e.size_bytes {
                return Err(FormatError::Invalid(format!("backing entry {i}: data offset beyond its size")));
            }
            if backing.iter().any(|o: &BackingEntry| o.dev_id == e.dev_id || o.uuid == e.uuid) {
                return Err(FormatError::Invalid(format!("backing entry {i}: duplicate dev id or uuid")));
            }
            backing.push(e);
        }
        Ok(CacheSuperblock {
            version,
            features: Features {
                compat: get_u64(b, SB_COMPAT_OFF),
                incompat: get_u64(b, SB_INCOMPAT_OFF),
                ro_compat: get_u64(b, SB_RO_COMPAT_OFF),
            },
            set_uuid: Uuid(get_16(b, SB_SET_UUID_OFF)),
            dev_uuid: Uuid(get_16(b, SB_DEV_UUID_OFF)),
            seq: get_u64(b, SB_SEQ_OFF),
            geometry,
            backing,
        })
    }
}

/// Writes both superblock copies of `sb` (whose `seq` the caller has already advanced):
/// copy A, sync, copy B, sync. A crash between the two leaves one copy with the new seq and
/// one with the old; [`read_cache_superblock`] then takes the newer valid one.
pub fn write_cache_superblock(dev: &dyn BlockDev, sb: &CacheSuperblock) -> FormatResult<()> {
    if dev.len() < sb.geometry.device_bytes() {
        return Err(FormatError::Invalid(format!(
            "device has {} bytes, the superblock's layout needs {}",
            dev.len(),
            sb.geometry.device_bytes()
        )));
    }
    for copy in [SbCopy::A, SbCopy::B] {
        let bytes = sb.encode(copy)?;
        dev.write_at(&bytes, copy.offset_bytes())?;
        dev.sync()?;
    }
    Ok(())
}

/// What [`read_cache_superblock`] found.
#[derive(Debug)]
pub struct SuperblockRead {
    pub sb: CacheSuperblock,
    /// Which copy `sb` came from.
    pub copy: SbCopy,
    /// The other copy's problem, if it was unreadable (a warning: rewrite the superblock to
    /// repair it). `None` when both copies were valid (even if their seqs differ).
    pub other_copy_error: Option<FormatError>,
    /// Whether the features allow writing.
    pub open_mode: OpenMode,
}

/// Reads both copies and picks the valid one with the highest seq. A bad copy is logged as a
/// warning and reported in [`SuperblockRead::other_copy_error`]; both bad is
/// [`FormatError::NoValidSuperblock`]; unknown incompat features are
/// [`FormatError::UnknownIncompatFeatures`]. I/O errors are returned as they are.
pub fn read_cache_superblock(dev: &dyn BlockDev) -> FormatResult<SuperblockRead> {
    let read_copy = |copy: SbCopy| -> FormatResult<CacheSuperblock> {
        let off = copy.offset_bytes();
        if dev.len() < off + SB_BYTES as u64 {
            return Err(FormatError::Truncated { need: off + SB_BYTES as u64, have: dev.len() });
        }
        let mut buf = vec![0u8; SB_BYTES];
        dev.read_at(&mut buf, off)?;
        CacheSuperblock::decode(&buf, off)
    };
    let a = read_copy(SbCopy::A);
    let b = read_copy(SbCopy::B);
    // An I/O error is not corruption: report it rather than silently using the other copy.
    let (a, b) = match (a, b) {
        (Err(FormatError::Dev(e)), _) | (_, Err(FormatError::Dev(e))) => return Err(FormatError::Dev(e)),
        other => other,
    };
    let (sb, copy, other_copy_error) = match (a, b) {
        (Ok(a), Ok(b)) => {
            if b.seq > a.seq {
                (b, SbCopy::B, None)
            } else {
                (a, SbCopy::A, None)
            }
        }
        (Ok(a), Err(e)) => {
            log::warn!("cache superblock copy B is unusable ({e}); using copy A (seq {})", a.seq);
            (a, SbCopy::A, Some(e))
        }
        (Err(e), Ok(b)) => {
            log::warn!("cache superblock copy A is unusable ({e}); using copy B (seq {})", b.seq);
            (b, SbCopy::B, Some(e))
        }
        (Err(a), Err(b)) => return Err(FormatError::NoValidSuperblock { a: Box::new(a), b: Box::new(b) }),
    };
    if dev.len() < sb.geometry.device_bytes() {
        return Err(FormatError::Invalid(format!(
            "cache device has {} bytes but its superblock describes {} (truncated device?)",
            dev.len(),
            sb.geometry.device_bytes()
        )));
    }
    let open_mode = sb.features.open_mode()?;
    Ok(SuperblockRead { sb, copy, other_copy_error, open_mode })
}

// ---------------------------------------------------------------------------------------------
// Backing superblock
// ---------------------------------------------------------------------------------------------

/// Magic of the backing-device superblock.
pub const BACKING_SB_MAGIC: [u8; 8] = *b"ubcBACKD";
/// Byte address of backing superblock copy A (the start of the device, where tools look for
/// a signature).
pub const BACKING_SB_OFFSET_BYTES: u64 = 0;
/// Byte address of backing superblock copy B: the next 4 KiB block, so the two copies never
/// share a physical block (a 4Kn disk rewrites a whole block for a 512-byte write).
pub const BACKING_SB_B_OFFSET_BYTES: u64 = BACKING_SB_BLOCK_BYTES as u64;
/// The checksummed part of one copy: a single 512-byte sector. Disks persist a sector whole or
/// not at all, so a crash can leave a copy old or new but never a mix of both; that is why
/// every field and the crc sit in this one sector (a crc in a later sector than the fields
/// would let a torn write pair new fields with an old crc).
pub const BACKING_SB_RECORD_BYTES: usize = 512;
/// One copy as written: the record plus zero padding to 4 KiB, so that devices with 4 KiB
/// logical sectors (and `O_DIRECT`) can write a copy on its own.
pub const BACKING_SB_BLOCK_BYTES: usize = 4096;
/// Bytes at the start of a backing device that belong to ubcache (both copies).
pub const BACKING_HEADER_BYTES: u64 = 2 * BACKING_SB_BLOCK_BYTES as u64;
/// Where the exported data starts on a backing device with a superblock: right after the
/// header.
pub const BACKING_DATA_OFFSET_BYTES: u64 = BACKING_HEADER_BYTES;
const _: () = assert!(BACKING_DATA_OFFSET_BYTES == 8192);
const _: () = assert!(BACKING_SB_BLOCK_BYTES == SB_BYTES);

/// Which of the two backing superblock copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingSbCopy {
    /// At byte 0; always written first.
    A,
    /// At byte 4096; written after copy A is durable.
    B,
}

impl BackingSbCopy {
    /// Byte address of this copy on the backing device.
    #[must_use]
    pub fn offset_bytes(self) -> u64 {
        match self {
            BackingSbCopy::A => BACKING_SB_OFFSET_BYTES,
            BackingSbCopy::B => BACKING_SB_B_OFFSET_BYTES,
        }
    }
}

/// State of a backing device with respect to its cache set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BackingState {
    /// Attached; every write acknowledged so far is on the backing device.
    Clean = 0,
    /// Attached; the cache may hold data that is not on the backing device. Serving the
    /// backing device without its cache loses that data.
    Dirty = 1,
    /// Not attached to any cache set; the backing device is complete on its own.
    Detached = 2,
}

impl TryFrom<u8> for BackingState {
    type Error = FormatError;
    fn try_from(v: u8) -> FormatResult<Self> {
        match v {
            0 => Ok(BackingState::Clean),
            1 => Ok(BackingState::Dirty),
            2 => Ok(BackingState::Detached),
            other => Err(FormatError::Invalid(format!("backing state {other}"))),
        }
    }
}

/// Cache mode remembered per backing device (the engine's mode, stored as a byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StoredCacheMode {
    Writethrough = 0,
    Writeback = 1,
    Writearound = 2,
    None = 3,
}

impl TryFrom<u8> for StoredCacheMode {
    type Error = FormatError;
    fn try_from(v: u8) -> FormatResult<Self> {
        match v {
            0 => Ok(StoredCacheMode::Writethrough),
            1 => Ok(StoredCacheMode::Writeback),
            2 => Ok(StoredCacheMode::Writearound),
            3 => Ok(StoredCacheMode::None),
            other => Err(FormatError::Invalid(format!("cache mode {other}"))),
        }
    }
}

const BSB_MAGIC_OFF: usize = 0;
const BSB_VERSION_OFF: usize = BSB_MAGIC_OFF + 8;
const BSB_STATE_OFF: usize = BSB_VERSION_OFF + 4;
const BSB_MODE_OFF: usize = BSB_STATE_OFF + 1;
const BSB_RESERVED0_OFF: usize = BSB_MODE_OFF + 1;
const BSB_COMPAT_OFF: usize = BSB_RESERVED0_OFF + 2;
const BSB_INCOMPAT_OFF: usize = BSB_COMPAT_OFF + 8;
const BSB_RO_COMPAT_OFF: usize = BSB_INCOMPAT_OFF + 8;
const BSB_UUID_OFF: usize = BSB_RO_COMPAT_OFF + 8;
const BSB_SET_UUID_OFF: usize = BSB_UUID_OFF + 16;
const BSB_SELF_OFF: usize = BSB_SET_UUID_OFF + 16;
const BSB_SEQ_OFF: usize = BSB_SELF_OFF + 8;
const BSB_DATA_OFFSET_OFF: usize = BSB_SEQ_OFF + 8;
const BSB_SIZE_OFF: usize = BSB_DATA_OFFSET_OFF + 8;
const BSB_END: usize = BSB_SIZE_OFF + 8;
/// The crc is the last field of the record's one sector, never in a later sector.
const BSB_CRC_OFF: usize = BACKING_SB_RECORD_BYTES - 4;
const _: () = assert!(BSB_END == 104);
const _: () = assert!(BSB_END <= BSB_CRC_OFF);

/// The superblock at the start of a backing device, kept in two copies.
///
/// Each copy is a 4 KiB block (copy A at byte 0, copy B at byte 4096) whose first sector holds
/// every field and the crc; the rest of the block is zero:
/// ```text
/// off len field
///   0   8 magic "ubcBACKD"      8  4 version         12 1 state (BackingState)
///  13   1 cache mode           14  2 reserved, 0     16 8 compat    24 8 incompat
///  32   8 ro_compat            40 16 backing uuid    56 16 cache-set uuid (nil: none)
///  72   8 own address (0 or 4096)                    80 8 seq
///  88   8 data offset, bytes (8192)                  96 8 device size, bytes
/// 104 .. 508 zero              508 4 crc32c of [0, 508)
/// 512 .. 4096 zero padding (outside the crc; written as zero, refused if not)
/// ```
///
/// # Why this survives a crash during a state change
/// [`write_backing_superblock`] writes copy A, syncs, then copy B, syncs. A single-sector
/// record cannot tear (sector atomicity), so whatever a power loss leaves of the write in
/// flight is that copy's complete old or complete new record, and the other copy is untouched
/// and valid. Even on a device that broke sector atomicity, only the copy in flight could be
/// damaged and the other one still reads. [`read_backing_superblock`] therefore always finds
/// the old or the new state, and after a completed write both copies hold it, so losing
/// either copy later (a bad sector, a tool that wrote over sector 0) loses nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSuperblock {
    pub version: FormatVersion,
    pub features: Features,
    pub state: BackingState,
    pub cache_mode: StoredCacheMode,
    pub uuid: Uuid,
    /// The cache set this device is attached to; nil when detached.
    pub set_uuid: Uuid,
    /// +1 on every rewrite; tells the newer of two copies apart (see [`decode_backing_header`]).
    pub seq: u64,
    pub data_offset_bytes: u64,
    /// Size of the whole backing device when the superblock was written.
    pub size_bytes: u64,
}

impl BackingSuperblock {
    /// A new detached backing superblock for a device of `size_bytes`.
    pub fn new(uuid: Uuid, size_bytes: u64) -> FormatResult<Self> {
        if size_bytes <= BACKING_DATA_OFFSET_BYTES {
            return Err(FormatError::Invalid(format!(
                "backing device of {size_bytes} bytes has no room after its {BACKING_DATA_OFFSET_BYTES}-byte header"
            )));
        }
        Ok(Self {
            version: FormatVersion::CURRENT,
            features: Features::default(),
            state: BackingState::Detached,
            cache_mode: StoredCacheMode::Writethrough,
            uuid,
            set_uuid: Uuid::NIL,
            seq: 1,
            data_offset_bytes: BACKING_DATA_OFFSET_BYTES,
            size_bytes,
        })
    }

    /// Bytes exported to clients.
    #[must_use]
    pub fn export_bytes(&self) -> u64 {
        self.size_bytes.saturating_sub(self.data_offset_bytes)
    }

    /// Encodes copy A (the block written at byte 0). See [`BackingSuperblock::encode_copy`].
    #[must_use]
    pub fn encode(&self) -> [u8; BACKING_SB_BLOCK_BYTES] {
        self.encode_copy(BackingSbCopy::A)
    }

    /// Format: { magic | version | state | mode | reserved | features | uuid | set uuid |
    /// own address | seq | data offset | size | zero | crc32c } in one 512-byte sector, then
    /// zero padding to 4096 bytes (see the type's doc).
    #[must_use]
    pub fn encode_copy(&self, copy: BackingSbCopy) -> [u8; BACKING_SB_BLOCK_BYTES] {
        let mut b = [0u8; BACKING_SB_BLOCK_BYTES];
        b[BSB_MAGIC_OFF..BSB_MAGIC_OFF + 8].copy_from_slice(&BACKING_SB_MAGIC);
        put_u32(&mut b, BSB_VERSION_OFF, self.version as u32);
        b[BSB_STATE_OFF] = self.state as u8;
        b[BSB_MODE_OFF] = self.cache_mode as u8;
        put_u64(&mut b, BSB_COMPAT_OFF, self.features.compat);
        put_u64(&mut b, BSB_INCOMPAT_OFF, self.features.incompat);
        put_u64(&mut b, BSB_RO_COMPAT_OFF, self.features.ro_compat);
        b[BSB_UUID_OFF..BSB_UUID_OFF + 16].copy_from_slice(&self.uuid.0);
        b[BSB_SET_UUID_OFF..BSB_SET_UUID_OFF + 16].copy_from_slice(&self.set_uuid.0);
        put_u64(&mut b, BSB_SELF_OFF, copy.offset_bytes());
        put_u64(&mut b, BSB_SEQ_OFF, self.seq);
        put_u64(&mut b, BSB_DATA_OFFSET_OFF, self.data_offset_bytes);
        put_u64(&mut b, BSB_SIZE_OFF, self.size_bytes);
        let crc = crc32c::crc32c(&b[..BSB_CRC_OFF]);
        put_u32(&mut b, BSB_CRC_OFF, crc);
        b
    }

    /// Decodes copy A (a block read from byte 0). See [`BackingSuperblock::decode_copy`].
    pub fn decode(buf: &[u8]) -> FormatResult<BackingSuperblock> {
        Self::decode_copy(buf, BackingSbCopy::A)
    }

    /// Decodes one copy from `buf`, the [`BACKING_SB_BLOCK_BYTES`] read at `copy`'s address
    /// (longer input is ignored past the block). Checks magic, crc, version, own address,
    /// that reserved bytes and the padding are zero, and that the fields agree with each other.
    pub fn decode_copy(buf: &[u8], copy: BackingSbCopy) -> FormatResult<BackingSuperblock> {
        need(buf, BACKING_SB_BLOCK_BYTES)?;
        let b = &buf[..BACKING_SB_RECORD_BYTES];
        check_magic(get_8(b, BSB_MAGIC_OFF), &BACKING_SB_MAGIC, "ubcBACKD")?;
        check_crc(get_u32(b, BSB_CRC_OFF), &b[..BSB_CRC_OFF])?;
        let version = FormatVersion::try_from(get_u32(b, BSB_VERSION_OFF))?;
        let recorded = get_u64(b, BSB_SELF_OFF);
        if recorded != copy.offset_bytes() {
            return Err(FormatError::WrongAddress { recorded, actual: copy.offset_bytes() });
        }
        check_zero(&b[BSB_RESERVED0_OFF..BSB_RESERVED0_OFF + 2], "backing superblock reserved field")?;
        check_zero(&b[BSB_END..BSB_CRC_OFF], "unused backing superblock space")?;
        check_zero(&buf[BACKING_SB_RECORD_BYTES..BACKING_SB_BLOCK_BYTES], "backing superblock padding")?;
        let sb = BackingSuperblock {
            version,
            features: Features {
                compat: get_u64(b, BSB_COMPAT_OFF),
                incompat: get_u64(b, BSB_INCOMPAT_OFF),
                ro_compat: get_u64(b, BSB_RO_COMPAT_OFF),
            },
            state: BackingState::try_from(b[BSB_STATE_OFF])?,
            cache_mode: StoredCacheMode::try_from(b[BSB_MODE_OFF])?,
            uuid: Uuid(get_16(b, BSB_UUID_OFF)),
            set_uuid: Uuid(get_16(b, BSB_SET_UUID_OFF)),
            seq: get_u64(b, BSB_SEQ_OFF),
            data_offset_bytes: get_u64(b, BSB_DATA_OFFSET_OFF),
            size_bytes: get_u64(b, BSB_SIZE_OFF),
        };
        // The data must start after both copies, or writing data would destroy copy B.
        if sb.data_offset_bytes < BACKING_HEADER_BYTES
            || sb.data_offset_bytes % SECTOR_SIZE != 0
            || sb.data_offset_bytes >= sb.size_bytes
        {
            return Err(FormatError::Invalid(format!(
                "backing data offset {} with device size {}",
                sb.data_offset_bytes, sb.size_bytes
            )));
        }
        if (sb.state == BackingState::Detached) != sb.set_uuid.is_nil() {
            return Err(FormatError::Invalid(format!(
                "backing state {:?} with cache set {}",
                sb.state, sb.set_uuid
            )));
        }
        Ok(sb)
    }
}

/// What [`decode_backing_header`] / [`read_backing_superblock_copies`] found on a device that
/// carries the backing magic.
#[derive(Debug)]
pub struct BackingSuperblockRead {
    /// The superblock in force.
    pub sb: BackingSuperblock,
    /// Which copy it came from.
    pub copy: BackingSbCopy,
    /// Why the other copy is unusable, if it is (a warning: the next superblock write repairs
    /// it). `None` when both copies decode, even if they differ.
    pub other_copy_error: Option<FormatError>,
    /// Both copies decode and are equal: full redundancy. False after a crash between the two
    /// writes of a rewrite (the next rewrite makes them equal again) or with a damaged copy.
    pub copies_identical: bool,
}

/// Picks the backing superblock in force from `header`, the first [`BACKING_HEADER_BYTES`] of
/// a device (a shorter input is a device too small to hold both copies). A pure function of
/// its input, so it is fuzzed directly.
///
/// - Neither copy starts with the magic: `Ok(None)`, a raw image.
/// - Both copies decode: copy A, unless both belong to the same backing device (same uuid) and
///   copy B has the higher seq. Copy A is written first, so after any crash it is at least as
///   new as copy B; B can only be newer if a write of A was lost or rolled back by the device,
///   and then B's seq says so. Copies of different uuids mean B is left over from an earlier
///   format of this device (its seq means nothing to the new one), and A, written first by the
///   new format, wins.
/// - One copy decodes: that one; the other's error is reported.
/// - Neither decodes although one has the magic: [`FormatError::NoValidBackingSuperblock`]
///   (never "raw": serving the device raw would shift its data by the header).
pub fn decode_backing_header(header: &[u8]) -> FormatResult<Option<BackingSuperblockRead>> {
    let block = |copy: BackingSbCopy| {
        let start = copy.offset_bytes() as usize;
        header.get(start..).unwrap_or(&[])
    };
    let has_magic = |copy: BackingSbCopy| block(copy).get(..8).is_some_and(|m| m == BACKING_SB_MAGIC);
    if !has_magic(BackingSbCopy::A) && !has_magic(BackingSbCopy::B) {
        return Ok(None);
    }
    let a = BackingSuperblock::decode_copy(block(BackingSbCopy::A), BackingSbCopy::A);
    let b = BackingSuperblock::decode_copy(block(BackingSbCopy::B), BackingSbCopy::B);
    let read = match (a, b) {
        (Ok(a), Ok(b)) => {
            let copies_identical = a == b;
            let (sb, copy) =
                if a.uuid == b.uuid && b.seq > a.seq { (b, BackingSbCopy::B) } else { (a, BackingSbCopy::A) };
            BackingSuperblockRead { sb, copy, other_copy_error: None, copies_identical }
        }
        (Ok(a), Err(e)) => BackingSuperblockRead {
            sb: a,
            copy: BackingSbCopy::A,
            other_copy_error: Some(e),
            copies_identical: false,
        },
        (Err(e), Ok(b)) => BackingSuperblockRead {
            sb: b,
            copy: BackingSbCopy::B,
            other_copy_error: Some(e),
            copies_identical: false,
        },
        (Err(a), Err(b)) => {
            return Err(FormatError::NoValidBackingSuperblock { a: Box::new(a), b: Box::new(b) });
        }
    };
    Ok(Some(read))
}

/// Writes both copies of the backing superblock: copy A, sync, copy B, sync.
///
/// Crash ordering: while copy A is in flight copy B still holds the previous superblock, and
/// copy B is written only once A is durable, so at every instant at least one copy is a
/// complete valid superblock, either the old or the new one (see [`decode_backing_header`] for
/// how the reader picks). Returns once both copies are durable. The superblock is checked
/// before anything is written, so an invalid one (e.g. Dirty without a cache set) is refused
/// rather than written and found unreadable later.
pub fn write_backing_superblock(dev: &dyn BlockDev, sb: &BackingSuperblock) -> FormatResult<()> {
    if dev.len() < sb.data_offset_bytes || dev.len() < sb.size_bytes {
        return Err(FormatError::Invalid(format!(
            "backing device of {} bytes cannot hold a superblock for {} bytes with data at {}",
            dev.len(),
            sb.size_bytes,
            sb.data_offset_bytes
        )));
    }
    let blocks = [BackingSbCopy::A, BackingSbCopy::B].map(|copy| (copy, sb.encode_copy(copy)));
    for (copy, block) in &blocks {
        BackingSuperblock::decode_copy(block, *copy)?;
    }
    for (copy, block) in &blocks {
        dev.write_at(block, copy.offset_bytes())?;
        dev.sync()?;
    }
    Ok(())
}

/// Reads both copies and picks the superblock in force ([`decode_backing_header`]); an
/// unusable or stale copy is logged (warning) and reported in the result. `Ok(None)`: neither
/// copy has the backing magic, so the device is a raw image. Also checks the device is as
/// large as the superblock says.
pub fn read_backing_superblock_copies(dev: &dyn BlockDev) -> FormatResult<Option<BackingSuperblockRead>> {
    let mut header = vec![0u8; dev.len().min(BACKING_HEADER_BYTES) as usize];
    dev.read_at(&mut header, 0)?;
    let Some(read) = decode_backing_header(&header)? else {
        return Ok(None);
    };
    if let Some(e) = &read.other_copy_error {
        log::warn!(
            "backing superblock copy {:?} is unusable ({e}); using copy {:?} (seq {}); the next superblock write repairs it",
            other_backing_copy(read.copy),
            read.copy,
            read.sb.seq
        );
    } else if read.copy == BackingSbCopy::B {
        log::warn!(
            "backing superblock copy A is older than copy B (seq {}): a lost or rolled-back write; using copy B",
            read.sb.seq
        );
    } else if !read.copies_identical {
        log::info!(
            "backing superblock copy B is older than copy A (seq {}): a rewrite was interrupted; using copy A",
            read.sb.seq
        );
    }
    if dev.len() < read.sb.size_bytes {
        return Err(FormatError::Invalid(format!(
            "backing device has {} bytes, its superblock says {}",
            dev.len(),
            read.sb.size_bytes
        )));
    }
    Ok(Some(read))
}

fn other_backing_copy(copy: BackingSbCopy) -> BackingSbCopy {
    match copy {
        BackingSbCopy::A => BackingSbCopy::B,
        BackingSbCopy::B => BackingSbCopy::A,
    }
}

/// Reads the backing superblock in force ([`read_backing_superblock_copies`] without the
/// details). `Ok(None)`: no copy has the backing magic, so it is a raw image. A device that
/// has the magic but no valid copy is an error (never silently treated as raw: its data would
/// be shifted by the header).
pub fn read_backing_superblock(dev: &dyn BlockDev) -> FormatResult<Option<BackingSuperblock>> {
    Ok(read_backing_superblock_copies(dev)?.map(|read| read.sb))
}

// ---------------------------------------------------------------------------------------------
// Journal entries
// ---------------------------------------------------------------------------------------------

pub use ubcache_btree::{Key, NodePtr, Ptr};

/// Encoded length of a btree root pointer ([`NodePtr::to_bytes`]).
pub const ROOT_PTR_LEN: usize = ubcache_btree::format::NODE_PTR_LEN;

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

// ---------------------------------------------------------------------------------------------
// Bucket table (checkpointed gens + prios)
// ---------------------------------------------------------------------------------------------

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
