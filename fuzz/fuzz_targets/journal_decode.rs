//! Journal record and entry decoders: any input decodes or fails cleanly, and what decodes
//! re-encodes to the same bytes (`ubcache::fuzzing::journal_decode`, which the corpus replay
//! test also runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ubcache::fuzzing::journal_decode(data);
});
