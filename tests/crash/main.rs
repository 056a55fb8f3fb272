//! The crash simulation of the durability contract, and every test that arms a fail point
//! (`ubcache::failpoints`).
//!
//! Fail points are process-global: a point armed here would also break any test of another
//! module running on the harness's other thread. So the tests that arm them have this binary to
//! themselves (and serialise among themselves with `fail::FailScenario`); keep it that way when
//! adding a fail-point test.

// Tests state their expectations by unwrapping and panicking, and print their figures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod crash_sim;
