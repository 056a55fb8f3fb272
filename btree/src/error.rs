//! Errors of the btree layer. I/O failures of the store, corruption, and bad arguments stay apart
//! because callers act differently on each: retry or fail the request, go read-only, or reject.

use crate::NodeAddr;
use std::fmt;

/// What kind of invariant a corrupted node or iteration broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CorruptionKind {
    /// An iteration produced a key that does not sort strictly after the previous one.
    KeySkippedBackwards,
    /// Keys in a bset or node are not strictly increasing.
    KeysOutOfOrder,
    /// Two keys cover a common sector.
    OverlappingKeys,
    /// A key (or child) lies outside the range of the node holding it.
    OutOfNodeRange,
    /// A crc32c does not match.
    ChecksumMismatch,
    /// Wrong magic number.
    BadMagic,
    /// Unknown format version.
    BadVersion,
    /// The node says it lives at another address.
    WrongAddress,
    /// The node is another incarnation than the pointer expects.
    StaleNode,
    /// A length field or pointer length is impossible.
    BadLength,
    /// A node has an unexpected level (not parent level - 1, or too high).
    BadLevel,
    /// Descent exceeded the maximum depth.
    TooDeep,
    /// A key's own fields are inconsistent (size 0, starts before 0, pointer wraps, bad flags).
    BadKey,
}

impl fmt::Display for CorruptionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Errors of a [`crate::NodeStore`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No free node slot left.
    #[error("no free node slot")]
    NoSpace,
    /// The address does not name a node slot of this store.
    #[error("node address {0} is not valid for this store")]
    BadAddress(NodeAddr),
    /// The access reaches past the end of the node slot.
    #[error("access of {len} bytes at offset {offset} of node {addr} is outside the node")]
    OutOfRange {
        /// Node address.
        addr: NodeAddr,
        /// Byte offset in the node.
        offset: usize,
        /// Length of the access.
        len: usize,
    },
    /// The underlying device failed.
    #[error("I/O error on node {addr}: {source}")]
    Io {
        /// Node address.
        addr: NodeAddr,
        /// What failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Errors of the btree.
#[derive(Debug, thiserror::Error)]
pub enum BtreeError {
    /// An invariant is broken: a node read from the store, a node about to be written, or an
    /// iteration step. `detail` is a readable dump of the offending and neighbouring keys.
    #[error("btree corrupted ({kind}) at node {}: {detail}", fmt_addr(*.addr))]
    Corrupted {
        /// Which invariant.
        kind: CorruptionKind,
        /// The node concerned, when it has an address.
        addr: Option<NodeAddr>,
        /// Dump of the offending keys.
        detail: String,
    },
    /// The store failed.
    #[error("node store: {0}")]
    Store(#[from] StoreError),
    /// A caller passed something invalid (a malformed key, an inverted range, a bad config).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An earlier operation failed half-way; the in-memory tree may be inconsistent, so it refuses
    /// further changes. Reopen from the last checkpoint (and replay the journal).
    #[error("btree is poisoned by an earlier failure; reopen it from the last checkpoint")]
    Poisoned,
}

fn fmt_addr(addr: Option<NodeAddr>) -> String {
    match addr {
        Some(a) => a.to_string(),
        None => "(in memory, not yet written)".to_string(),
    }
}

impl BtreeError {
    /// A corruption error.
    pub(crate) fn corrupted(kind: CorruptionKind, addr: Option<NodeAddr>, detail: impl Into<String>) -> Self {
        BtreeError::Corrupted { kind, addr, detail: detail.into() }
    }

    /// The corruption kind, if this is a corruption.
    #[must_use]
    pub fn corruption_kind(&self) -> Option<CorruptionKind> {
        match self {
            BtreeError::Corrupted { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// One problem found by [`crate::Tree::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The node concerned, when known.
    pub addr: Option<NodeAddr>,
    /// The broken invariant; `None` when the node could not be read at all (store error).
    pub kind: Option<CorruptionKind>,
    /// Human-readable description with the offending keys.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Some(k) => write!(f, "node {}: {k}: {}", fmt_addr(self.addr), self.detail),
            None => write!(f, "node {}: unreadable: {}", fmt_addr(self.addr), self.detail),
        }
    }
}

impl Problem {
    pub(crate) fn from_error(addr: Option<NodeAddr>, err: &BtreeError) -> Problem {
        match err {
            BtreeError::Corrupted { kind, addr: a, detail } => {
                Problem { addr: a.or(addr), kind: Some(*kind), detail: detail.clone() }
            }
            other => Problem { addr, kind: None, detail: other.to_string() },
        }
    }
}
