//! Fuzzing without a fuzzer: the corpus under `fuzz/corpus` replayed, and bounded random batches
//! of format records, NBD requests, the NBD client against hostile servers and whole mutated
//! cache images opened.

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod corpus;
mod format_batch;
#[path = "../support/golden.rs"]
mod golden;
mod nbd_batch;
mod nbd_client_batch;
mod open_batch;
