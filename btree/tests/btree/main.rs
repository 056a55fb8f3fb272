//! The btree crate through its public API: basic operations, a model check, large leaves,
//! crash ordering of node writes, store errors, refused writes and decoding random bytes.

// Tests state their expectations by unwrapping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod basic;
mod crash_ordering;
mod fuzz_decode_batch;
mod key_order_regression;
mod large_leaf_model;
mod model;
mod store_errors;
mod write_refused;
