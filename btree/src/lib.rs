#![doc = include_str!("../README.md")]

pub mod error;
pub mod format;
pub mod fuzzing;
pub mod key;
mod leaf;
pub mod store;
pub mod tree;

#[cfg(test)]
mod tests;

/// Address of a node slot: opaque to the btree, the store maps it to bytes.
pub type NodeAddr = u64;

pub use error::{BtreeError, CorruptionKind, Problem, StoreError};
pub use format::{MAX_DEPTH, NodePtr};
pub use key::{Key, Pos, Ptr, Segment};
pub use store::{MemStore, NodeStore};
pub use tree::{Checkpoint, InsertOutcome, ReplaceOutcome, Tree, TreeConfig, TreeStats};
