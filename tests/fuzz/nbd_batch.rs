//! The NBD fuzz targets' functions over a bounded, deterministic batch of random and mutated
//! inputs, as an ordinary test: a regression here is a decoder that panics or accepts what it
//! must refuse. The cargo-fuzz targets (`fuzz/fuzz_targets/nbd_*.rs`) explore further.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ubcache::nbd::fuzzing;
use ubcache::nbd::proto::{self, Command, RequestHeader};

/// Applies a few random byte flips, insertions, deletions and truncations.
fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        match rng.gen_range(0..5) {
            0 if !out.is_empty() => {
                let i = rng.gen_range(0..out.len());
                out[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !out.is_empty() => {
                let i = rng.gen_range(0..out.len());
                out[i] = *[0u8, 0xff, 0x7f, 0x80].get(rng.gen_range(0..4)).unwrap();
            }
            2 => {
                let i = rng.gen_range(0..=out.len());
                out.insert(i, rng.r#gen());
            }
            3 if !out.is_empty() => {
                let i = rng.gen_range(0..out.len());
                out.remove(i);
            }
            _ => {
                let len = rng.gen_range(0..=out.len());
                out.truncate(len);
            }
        }
    }
    out
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = rng.gen_range(0..=max);
    (0..len).map(|_| rng.r#gen()).collect()
}

#[test]
fn request_parsing_survives_random_and_mutated_headers() {
    let mut rng = StdRng::seed_from_u64(0x6e62_6401);
    for _ in 0..20_000 {
        fuzzing::request_parse(&random_bytes(&mut rng, 48));
    }
    // Well-formed headers with interesting values, then mutated.
    let offsets = [0u64, 1, 511, 4096, 1 << 30, u64::MAX - 4096, u64::MAX];
    let lengths = [0u32, 1, 4096, proto::MAX_PAYLOAD, proto::MAX_PAYLOAD + 1, u32::MAX];
    for _ in 0..20_000 {
        let header = RequestHeader {
            flags: if rng.gen_bool(0.5) { rng.gen_range(0..64) } else { rng.r#gen() },
            cmd_type: rng.gen_range(0..10),
            handle: rng.r#gen(),
            offset: offsets[rng.gen_range(0..offsets.len())],
            length: lengths[rng.gen_range(0..lengths.len())],
        };
        let mut input = header.encode().to_vec();
        input.extend_from_slice(&random_bytes(&mut rng, 10));
        fuzzing::request_parse(&input);
        fuzzing::request_parse(&mutate(&mut rng, &input));
    }
}

#[test]
fn option_parsing_survives_random_and_mutated_payloads() {
    let mut rng = StdRng::seed_from_u64(0x6e62_6402);
    for _ in 0..20_000 {
        fuzzing::option_parse(&random_bytes(&mut rng, 64));
    }
    for _ in 0..20_000 {
        let name_len = rng.gen_range(0..40);
        let request = proto::InfoRequest {
            name: (0..name_len).map(|_| rng.gen_range('a'..='z')).collect(),
            requests: (0..rng.gen_range(0..6)).map(|_| rng.gen_range(0..5)).collect(),
        };
        let encoded = request.encode();
        assert_eq!(proto::InfoRequest::parse(&encoded).unwrap(), request);
        fuzzing::option_parse(&encoded);
        fuzzing::option_parse(&mutate(&mut rng, &encoded));
    }
}

#[test]
fn server_sessions_survive_mutated_client_streams() {
    let mut rng = StdRng::seed_from_u64(0x6e62_6403);
    let seed = fuzzing::seed_session();
    // The unmutated seed must get through the handshake and the requests: the reply stream holds
    // the simple-reply magic only if transmission was reached.
    let out = fuzzing::server_session(&seed);
    let magic = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes();
    assert!(out.windows(4).any(|w| w == magic), "seed session never reached transmission");
    let mut reached_transmission = 0;
    for _ in 0..300 {
        let out = fuzzing::server_session(&mutate(&mut rng, &seed));
        if out.windows(4).any(|w| w == magic) {
            reached_transmission += 1;
        }
    }
    // Most mutations land in the long request tail, so most sessions must get that far; if
    // none did, this test would only be exercising the greeting.
    assert!(
        reached_transmission > 100,
        "only {reached_transmission} of 300 mutated sessions reached transmission"
    );
    for _ in 0..100 {
        fuzzing::server_session(&random_bytes(&mut rng, 256));
    }
    // Oversize and overflowing requests after a valid handshake.
    let mut session = seed[..seed.len() - proto::REQUEST_HEADER_LEN].to_vec();
    for (cmd, offset, length) in
        [(Command::Read, u64::MAX, u32::MAX), (Command::Write, 0, u32::MAX), (Command::Cache, 1 << 63, 1)]
    {
        let h = RequestHeader { flags: 0, cmd_type: cmd.to_wire(), handle: 7, offset, length };
        session.extend_from_slice(&h.encode());
    }
    fuzzing::server_session(&session);
}
