//! Fuzzing without a fuzzer: the corpus under `fuzz/corpus` replayed, and bounded random batches
//! of format records and NBD requests.

mod corpus;
mod format_batch;
mod nbd_batch;
