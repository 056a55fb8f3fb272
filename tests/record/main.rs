//! Recording and replay (issue 11): the log format and its decoder, the recording device and
//! `serve --record` (`log`), and `ubcache replay` with its model-based tests, crash states and
//! check loop (`replay`).

#[path = "../support/common.rs"]
mod common;

mod log;
mod replay;
