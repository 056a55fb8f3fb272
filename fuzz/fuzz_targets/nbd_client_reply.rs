//! The NBD client against a hostile server: the input is everything the server sends, split into
//! handshake and transmission-phase bytes by its first two bytes (little endian length).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else { return };
    let split = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (handshake, replies) = rest.split_at(split);
    ubcache::nbd::fuzzing::client_session(handshake, replies);
});
