//! The NBD client against crafted and randomly mutated servers (`ubcache::nbd::fuzzing::
//! client_session`): a READ whose structured reply leaves a gap, overlaps itself, reaches outside
//! the request or follows chunks with a simple reply must fail (the bytes no chunk carried would
//! otherwise reach the caller as zeros), and no server byte stream may panic or hang the client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ubcache::nbd::fuzzing::{
    client_session, data_chunk, encode_chunk, hole_chunk, seed_client_handshake, seed_client_replies,
};
use ubcache::nbd::proto;

const SIZE: u64 = 1 << 20;

/// Replies to READ 2 and FLUSH that are always fine, after `read1`'s chunks.
fn with_read1(read1: &[u8]) -> Vec<u8> {
    let mut s = read1.to_vec();
    s.extend(data_chunk(2, 4096, &[1; 65536], true));
    s.extend(proto::SimpleReply { errno: 0, handle: 3 }.encode());
    s
}

fn run(replies: &[u8]) -> Vec<Result<usize, String>> {
    client_session(&seed_client_handshake(SIZE), replies)
}

#[test]
fn a_well_formed_server_is_read_in_full() {
    let out = run(&seed_client_replies());
    assert_eq!(out, vec![Ok(4096), Ok(65536), Ok(0)]);
    // The committed cargo-fuzz seed is exactly this session.
    let seed =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/nbd_client_reply/seed-session"));
    assert_eq!(seed.unwrap(), ubcache::nbd::fuzzing::seed_client_reply_input());
}

#[test]
fn a_structured_read_with_a_gap_fails_instead_of_returning_zeros() {
    // 1024 bytes of data, then DONE: 3072 bytes were never sent.
    let out = run(&with_read1(&data_chunk(1, 0, &[7; 1024], true)));
    let err = out[0].as_ref().expect_err("a READ with a gap must fail");
    assert!(err.contains("does not cover"), "{err}");
    // The connection is dropped: the requests after it fail too.
    assert!(out[1].is_err() && out[2].is_err(), "{out:?}");
    // A gap in the middle, with the end covered.
    let mut s = data_chunk(1, 0, &[7; 1024], false);
    s.extend(hole_chunk(1, 2048, 2048, true));
    assert!(run(&with_read1(&s))[0].is_err());
    // A DONE chunk of another type with no data at all.
    let none = encode_chunk(1, proto::chunk::TYPE_NONE, true, &[]);
    assert!(run(&with_read1(&none))[0].is_err());
}

#[test]
fn overlapping_or_out_of_bounds_chunks_fail() {
    // The same 4096 bytes covered twice over (sum of lengths right, coverage not).
    let mut s = data_chunk(1, 0, &[1; 2048], false);
    s.extend(data_chunk(1, 1024, &[2; 2048], true));
    let err = run(&with_read1(&s))[0].clone().expect_err("overlap");
    assert!(err.contains("overlap"), "{err}");
    // Past the end of the request, before it, and a hole chunk of 2^32-1 bytes.
    assert!(run(&with_read1(&data_chunk(1, 1, &[1; 4096], true)))[0].is_err());
    assert!(run(&with_read1(&data_chunk(1, u64::MAX - 10, &[1; 16], true)))[0].is_err());
    assert!(run(&with_read1(&hole_chunk(1, 0, u32::MAX, true)))[0].is_err());
    // An empty hole chunk.
    let mut s = hole_chunk(1, 0, 0, false);
    s.extend(data_chunk(1, 0, &[1; 4096], true));
    assert!(run(&with_read1(&s))[0].is_err());
    // A simple reply after a chunk that covered half.
    let mut s = data_chunk(1, 0, &[1; 2048], false);
    s.extend(proto::SimpleReply { errno: 0, handle: 1 }.encode());
    s.extend(vec![9u8; 4096]);
    assert!(run(&with_read1(&s))[0].is_err());
    // A chunk header claiming more than any READ reply may carry.
    let mut huge = proto::ChunkHeader {
        flags: proto::chunk::FLAG_DONE,
        chunk_type: proto::chunk::TYPE_OFFSET_DATA,
        handle: 1,
        len: u32::MAX,
    }
    .encode()
    .to_vec();
    huge.extend_from_slice(&0u64.to_be_bytes());
    assert!(run(&huge)[0].is_err());
}

#[test]
fn an_export_of_2_pow_63_bytes_or_a_server_vanishing_mid_negotiation_is_an_error() {
    assert!(client_session(&seed_client_handshake(1 << 63), &seed_client_replies()).is_empty());
    assert_eq!(
        client_session(&seed_client_handshake((1 << 63) - 1), &seed_client_replies()),
        vec![Ok(4096), Ok(65536), Ok(0)]
    );
    let handshake = seed_client_handshake(SIZE);
    for cut in 0..handshake.len() {
        assert!(client_session(&handshake[..cut], &[]).is_empty(), "cut at {cut}");
    }
    // Vanishing mid-reply: every cut of the replies fails the unfinished requests.
    let replies = seed_client_replies();
    for cut in (0..replies.len()).step_by(97) {
        let out = client_session(&handshake, &replies[..cut]);
        assert_eq!(out.len(), 3);
        assert!(out.iter().any(Result::is_err), "cut at {cut}: {out:?}");
    }
}

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        if out.is_empty() {
            break;
        }
        let i = rng.gen_range(0..out.len());
        match rng.gen_range(0..4) {
            0 => out[i] ^= 1 << rng.gen_range(0..8),
            1 => out[i] = [0u8, 0xff, 0x7f, 0x80][rng.gen_range(0..4)],
            2 => out.truncate(i),
            _ => out.insert(i, rng.r#gen()),
        }
    }
    out
}

#[test]
fn mutated_servers_never_panic_or_hang_the_client() {
    let mut rng = StdRng::seed_from_u64(0x636c_6e74);
    let handshake = seed_client_handshake(SIZE);
    let replies = seed_client_replies();
    for round in 0..600 {
        if round % 3 == 0 {
            client_session(&mutate(&mut rng, &handshake), &replies);
        } else {
            let out = client_session(&handshake, &mutate(&mut rng, &replies));
            assert_eq!(out.len(), 3, "{out:?}");
        }
    }
}
