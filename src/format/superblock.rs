//! The cache superblock (two 4 KiB copies on the cache device) and the backing superblock
//! (two single-sector copies at the start of a backing device).

use super::{
    BucketRange, COMPAT_POLICY_FIFO, COMPAT_POLICY_LRU, COMPAT_POLICY_MASK, COMPAT_POLICY_RANDOM, Features,
    FormatError, FormatResult, FormatVersion, Geometry, OpenMode, SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES,
    SB_BYTES, Uuid, check_crc, check_magic, check_zero, get_8, get_16, get_u32, get_u64, need, put_u32,
    put_u64,
};
use crate::dev::{BlockDev, SECTOR_SIZE};

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

/// Which reclaimable bucket is invalidated first when the cache needs space: the one policy
/// type of the whole program. Its on-disk code is here (the cache superblock's
/// `COMPAT_POLICY_*` bits); its names (`lru`, `fifo`, `random`) are in `ctl::knobs`; the
/// allocator's `pick_victims` executes it. The random policy's seed is not part of the policy:
/// it is not stored and has no name, it is the executor's input (`CacheConfig::reclaim_seed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplacementPolicy {
    /// Least recently used first (bcache's default: lowest `prio * live_sectors`).
    Lru,
    /// Oldest filled bucket first.
    Fifo,
    /// Uniformly random, reproducible from a seed.
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
    pub fn replacement_policy(&self) -> Option<ReplacementPolicy> {
        match self.features.compat & COMPAT_POLICY_MASK {
            COMPAT_POLICY_LRU => Some(ReplacementPolicy::Lru),
            COMPAT_POLICY_FIFO => Some(ReplacementPolicy::Fifo),
            COMPAT_POLICY_RANDOM => Some(ReplacementPolicy::Random),
            _ => None,
        }
    }

    /// Stores `policy` in the compat bits (the caller advances `seq` and writes the superblock).
    pub fn set_replacement_policy(&mut self, policy: ReplacementPolicy) {
        let bit = match policy {
            ReplacementPolicy::Lru => COMPAT_POLICY_LRU,
            ReplacementPolicy::Fifo => COMPAT_POLICY_FIFO,
            ReplacementPolicy::Random => COMPAT_POLICY_RANDOM,
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
