//! Errors of the cache engine, folded from every layer below it. `Corrupted`, `Dev` (I/O),
//! `NoSpace` and `Invalid` stay apart because callers act differently on each.

use crate::alloc::AllocError;
use crate::dev::DevError;
use crate::format::FormatError;
use crate::journal::JournalError;
use ubcache_btree::{BtreeError, StoreError};

/// Errors of [`crate::cache::CacheSet`] and [`crate::cache::CachedDev`].
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// On-disk metadata (superblock, journal, btree node, bucket table) failed a check, or the
    /// metadata contradicts itself. Never a panic, never a silent wrong read.
    #[error("cache metadata corrupted: {0}")]
    Corrupted(String),
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

impl From<BtreeError> for CacheError {
    fn from(e: BtreeError) -> Self {
        match e {
            BtreeError::Store(StoreError::NoSpace) => CacheError::NoSpace(e.to_string()),
            BtreeError::Store(StoreError::Io { .. }) => CacheError::Dev(DevError::Io {
                op: "btree node",
                offset: 0,
                len: 0,
                source: std::io::Error::other(e.to_string()),
            }),
            // A bad node address or out-of-slot access comes from a corrupt pointer.
            BtreeError::Corrupted { .. } | BtreeError::Store(_) => CacheError::Corrupted(e.to_string()),
            BtreeError::Invalid(_) => CacheError::Invalid(e.to_string()),
            BtreeError::Poisoned => CacheError::Failed(e.to_string()),
        }
    }
}

impl From<JournalError> for CacheError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::Dev(d) => CacheError::Dev(d),
            JournalError::Format(f) => f.into(),
            JournalError::Full { .. } => CacheError::NoSpace(e.to_string()),
            JournalError::Corrupted(_) => CacheError::Corrupted(e.to_string()),
            JournalError::Failed(_) => CacheError::Failed(e.to_string()),
            JournalError::Invalid(_) => CacheError::Invalid(e.to_string()),
        }
    }
}

impl From<FormatError> for CacheError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Dev(d) => CacheError::Dev(d),
            other => CacheError::Corrupted(other.to_string()),
        }
    }
}

impl From<AllocError> for CacheError {
    fn from(e: AllocError) -> Self {
        match e {
            AllocError::NoSpace { .. } => CacheError::NoSpace(e.to_string()),
            // The allocator's counts contradict the btree: a bug or corrupt metadata.
            other => CacheError::Corrupted(format!("bucket accounting: {other}")),
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
