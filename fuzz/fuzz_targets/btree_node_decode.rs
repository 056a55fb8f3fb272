//! Btree node images: decoding any bytes returns an error or a valid node
//! (`ubcache_btree::fuzzing::node_decode`, which the corpus replay test also runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ubcache_btree::fuzzing::node_decode(data);
});
