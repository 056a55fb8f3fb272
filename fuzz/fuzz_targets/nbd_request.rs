//! NBD request parsing and validation: `RequestHeader::decode` + `check_request` on arbitrary
//! bytes, with the invariants of `ubcache::nbd::fuzzing::request_parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ubcache::nbd::fuzzing::request_parse(data);
});
