//! The NBD client against a hostile server: the input is everything the server sends, split into
//! handshake and transmission-phase bytes by its first two bytes (little endian length).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ubcache::nbd::fuzzing::client_reply(data);
});
