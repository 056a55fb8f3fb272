//! Multi-node btrees of individually valid nodes wired together as the input says: opening one
//! returns an error or a tree that checks clean (`ubcache_btree::fuzzing::tree_open`, which the
//! corpus replay test and the bounded batch of the btree tests also run).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ubcache_btree::fuzzing::tree_open(data);
});
