//! Errors of the cache engine, folded from every layer below it. `Corrupted`, `Dev` (I/O),
//! `NoSpace` and `Invalid` stay apart because callers act differently on each. A corruption
//! keeps its cause: which metadata, where on the cache device (when known), and the lower
//! layer's error as its `source`, never only as text.

use crate::alloc::AllocError;
use crate::dev::DevError;
use crate::format::FormatError;
use crate::journal::JournalError;
use ubcache_btree::{BtreeError, StoreError};

/// Which metadata a [`Corruption`] was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metadata {
    /// A cache or backing superblock.
    Superblock,
    /// The journal ring or one of its records (a replayed entry included).
    Journal,
    /// A btree node (checksum, decoding, or an invariant inside it).
    BtreeNode,
    /// The btree as a whole: invariants across nodes, or a lookup that contradicts itself.
    Btree,
    /// The bucket table a checkpoint names.
    BucketTable,
    /// Per-bucket counts and generations: the allocator contradicts the btree.
    BucketAccounting,
    /// An on-disk structure decoded without the caller saying which (see the source).
    Structure,
}

impl std::fmt::Display for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Metadata::Superblock => "superblock",
            Metadata::Journal => "journal",
            Metadata::BtreeNode => "btree node",
            Metadata::Btree => "btree",
            Metadata::BucketTable => "bucket table",
            Metadata::BucketAccounting => "bucket accounting",
            Metadata::Structure => "on-disk structure",
        })
    }
}

/// Metadata that failed a check or contradicts itself: what, where, and the lower layer's
/// error that found it. `detail` repeats the cause's text, so printing only this error (as
/// logs and the CLI do) loses nothing; `source` keeps the typed cause for callers that walk
/// the chain.
#[derive(Debug, thiserror::Error)]
#[error("{what}{}: {detail}", fmt_at(*.at))]
pub struct Corruption {
    /// Which metadata.
    pub what: Metadata,
    /// Byte offset on the cache device of the damaged structure, when known.
    pub at: Option<u64>,
    /// What is wrong, readable.
    pub detail: String,
    /// The error of the layer below that found it, if one did.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

fn fmt_at(at: Option<u64>) -> String {
    at.map(|a| format!(" at byte {a}")).unwrap_or_default()
}

/// Errors of [`crate::cache::CacheSet`] and [`crate::cache::CachedDev`].
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// On-disk metadata (superblock, journal, btree node, bucket table) failed a check, or the
    /// metadata contradicts itself. Never a panic, never a silent wrong read.
    #[error("cache metadata corrupted: {0}")]
    Corrupted(#[source] Box<Corruption>),
    /// A device failed.
    #[error(transparent)]
    Dev(#[from] DevError),
    /// No cache space could be freed for metadata.
    #[error("no space: {0}")]
    NoSpace(String),
    /// A request or configuration that cannot be right.
    #[error("invalid: {0}")]
    Invalid(String),
    /// An earlier failure left the in-memory state unusable; reopen the cache set.
    #[error("cache set failed earlier, reopen it: {0}")]
    Failed(String),
}

pub type CacheResult<T> = Result<T, CacheError>;

impl CacheError {
    /// A corruption found by the engine itself (no lower-layer error).
    pub(crate) fn corrupted(what: Metadata, detail: impl Into<String>) -> Self {
        CacheError::Corrupted(Box::new(Corruption { what, at: None, detail: detail.into(), source: None }))
    }

    /// A corruption a lower layer reported: `context` (may be empty) is prefixed to its text.
    pub(crate) fn corrupted_by(
        what: Metadata,
        at: Option<u64>,
        context: &str,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let detail = if context.is_empty() { cause.to_string() } else { format!("{context}: {cause}") };
        CacheError::Corrupted(Box::new(Corruption { what, at, detail, source: Some(Box::new(cause)) }))
    }

    /// A format-layer error met while reading `what`: a device failure stays a device error.
    pub(crate) fn reading(what: Metadata, e: FormatError) -> Self {
        match e {
            FormatError::Dev(d) => CacheError::Dev(d),
            other => CacheError::corrupted_by(what, None, "", other),
        }
    }

    /// The corruption, if this is one.
    #[must_use]
    pub fn corruption(&self) -> Option<&Corruption> {
        match self {
            CacheError::Corrupted(c) => Some(c),
            _ => None,
        }
    }
}

/// Byte offset of a btree node address (a cache-device sector).
fn node_offset(addr: u64) -> Option<u64> {
    addr.checked_mul(crate::dev::SECTOR_SIZE)
}

impl From<BtreeError> for CacheError {
    fn from(e: BtreeError) -> Self {
        match e {
            BtreeError::Store(StoreError::NoSpace) => CacheError::NoSpace(e.to_string()),
            // The node store wraps the device's own error (with its real offset and op): hand
            // it on as it is. The store's slot accounting failing is the allocator
            // contradicting the btree.
            BtreeError::Store(StoreError::Io { addr, source }) => match source.downcast::<DevError>() {
                Ok(d) => CacheError::Dev(*d),
                Err(source) => match source.downcast::<AllocError>() {
                    Ok(a) => CacheError::corrupted_by(
                        Metadata::BucketAccounting,
                        node_offset(addr),
                        &format!("node slot {addr}"),
                        *a,
                    ),
                    Err(source) => CacheError::Dev(DevError::Io {
                        op: "btree node",
                        offset: node_offset(addr).unwrap_or(0),
                        len: 0,
                        source: std::io::Error::other(source),
                    }),
                },
            },
            // A bad node address or out-of-slot access comes from a corrupt pointer.
            BtreeError::Corrupted { addr, .. } => {
                CacheError::corrupted_by(Metadata::BtreeNode, addr.and_then(node_offset), "", e)
            }
            BtreeError::Store(StoreError::BadAddress(addr) | StoreError::OutOfRange { addr, .. }) => {
                CacheError::corrupted_by(Metadata::BtreeNode, node_offset(addr), "", e)
            }
            BtreeError::Invalid(_) => CacheError::Invalid(e.to_string()),
            BtreeError::Poisoned => CacheError::Failed(e.to_string()),
        }
    }
}

impl From<JournalError> for CacheError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::Dev(d) | JournalError::Format(FormatError::Dev(d)) => CacheError::Dev(d),
            JournalError::Format(f) => CacheError::corrupted_by(Metadata::Journal, None, "", f),
            JournalError::Full { .. } => CacheError::NoSpace(e.to_string()),
            JournalError::Corrupted(_) => CacheError::corrupted_by(Metadata::Journal, None, "", e),
            JournalError::Failed(_) => CacheError::Failed(e.to_string()),
            JournalError::Invalid(_) => CacheError::Invalid(e.to_string()),
        }
    }
}

impl From<FormatError> for CacheError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Dev(d) => CacheError::Dev(d),
            other => CacheError::corrupted_by(Metadata::Structure, None, "", other),
        }
    }
}

impl From<AllocError> for CacheError {
    fn from(e: AllocError) -> Self {
        match e {
            AllocError::NoSpace { .. } => CacheError::NoSpace(e.to_string()),
            // The allocator's counts contradict the btree: a bug or corrupt metadata.
            other => CacheError::corrupted_by(Metadata::BucketAccounting, None, "", other),
        }
    }
}

impl From<CacheError> for DevError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Dev(d) => d,
            CacheError::Corrupted(_) => DevError::Corrupted(e.to_string()),
            CacheError::NoSpace(_) => DevError::NoSpace(e.to_string()),
            CacheError::Invalid(_) => DevError::Invalid(e.to_string()),
            CacheError::Failed(_) => {
                DevError::Io { op: "cache", offset: 0, len: 0, source: std::io::Error::other(e.to_string()) }
            }
        }
    }
}
