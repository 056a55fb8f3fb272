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
//! The code is split by structure: `layout.rs` (geometry), `superblock.rs` (cache and backing
//! superblocks), `journal.rs` (entries and record framing), `bucket.rs` (bucket table); this
//! file holds what they share (errors, versions, features, uuids, little-endian helpers) and
//! re-exports them all, so callers name everything `crate::format::X`.
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

use crate::dev::DevError;
use std::fmt;

mod bucket;
mod journal;
mod layout;
mod superblock;

// Callers name everything as `crate::format::X`; the files are an internal split.
pub use bucket::*;
pub use journal::*;
pub use layout::*;
pub use superblock::*;
pub use ubcache_btree::{Key, NodePtr, Ptr};

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
