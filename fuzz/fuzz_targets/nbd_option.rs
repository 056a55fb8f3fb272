//! NBD option parsing: every option-level decoder on arbitrary bytes, and (for inputs that start
//! with a zero byte) a whole server session fed the rest of the input as the client's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ubcache::nbd::fuzzing::option_parse(data);
    if let Some((&0, session)) = data.split_first() {
        ubcache::nbd::fuzzing::server_session(session);
    }
});
