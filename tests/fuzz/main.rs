//! Fuzzing without a fuzzer: the corpus under `fuzz/corpus` replayed, and bounded random batches
//! of format records and NBD requests.

// Tests state their expectations by unwrapping and panicking, and print what they skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod corpus;
mod format_batch;
mod nbd_batch;
