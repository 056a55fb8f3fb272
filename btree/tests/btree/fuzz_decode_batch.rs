//! The node decoder over a bounded, deterministic batch of hostile inputs: random bytes, random
//! bytes behind a valid header, and valid node images (single- and multi-bset leaves, interior
//! nodes) mutated by bit flips, truncations, length-field edits and splices, with and without
//! resealed checksums. Decoding must never panic, and every successful decode must satisfy the
//! node invariants and re-encode to an image that decodes to the same content. (The same checks
//! run unbounded under `cargo fuzz run btree_node_decode` in `fuzz/`.)

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use ubcache_btree::format::{
    self, BSET_HEADER_LEN, DecodedBody, DecodedNode, HEADER_LEN, NodeHeader, NodePtr,
};
use ubcache_btree::{CorruptionKind, Key, MemStore, NodeStore, Pos, Ptr, Tree, TreeConfig};

const NODE_SIZE: usize = 1024;

/// Valid images (exactly the bytes their pointer covers) with their pointers.
fn valid_images() -> Vec<(Vec<u8>, NodePtr)> {
    let mut t =
        Tree::create(MemStore::new(NODE_SIZE), TreeConfig { max_cached_nodes: 64, bset_align: 16 }).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let mut root = None;
    for round in 0..6 {
        for _ in 0..150 {
            let start = rng.gen_range(0..3000u64);
            let k = Key::new(
                rng.gen_range(0..2),
                start,
                rng.gen_range(1..24),
                Ptr { offset: start * 3, generation: round },
                rng.gen_bool(0.5),
            );
            if rng.gen_bool(0.8) {
                t.insert(k).unwrap();
            } else {
                t.invalidate(k.dev, k.start(), k.end).unwrap();
            }
        }
        root = Some(t.write_out().unwrap().root);
    }
    let mut store = t.into_store();
    let mut out = Vec::new();
    let mut todo = vec![root.unwrap()];
    while let Some(ptr) = todo.pop() {
        let mut img = vec![0; ptr.len as usize];
        store.read(ptr.addr, 0, &mut img).unwrap();
        let node = format::decode_node(&img, Some(&ptr), NODE_SIZE).unwrap();
        if let DecodedBody::Interior(children) = &node.body {
            todo.extend(children.iter().map(|c| c.ptr));
        }
        out.push((img, ptr));
    }
    assert!(out.iter().any(|(img, _)| img[12] > 0), "an interior node");
    assert!(
        out.iter()
            .any(|(img, _)| img[12] == 0 && format::decode_node(img, None, NODE_SIZE).unwrap().bsets > 1),
        "a leaf with appended bsets"
    );
    out
}

/// A successful decode must be a valid node that survives a re-encode round trip.
fn assert_valid(node: &DecodedNode) {
    format::check_decoded(node, NODE_SIZE).unwrap();
    let mut buf = Vec::new();
    let ptr = match &node.body {
        DecodedBody::Leaf(keys) => {
            format::encode_leaf_node(&node.header, keys, usize::MAX >> 1, &mut buf).unwrap()
        }
        DecodedBody::Interior(children) => {
            format::encode_interior_node(&node.header, children, NODE_SIZE, &mut buf).unwrap()
        }
    };
    let again = format::decode_node(&buf, Some(&ptr), usize::MAX >> 1).unwrap();
    assert_eq!(again.body, node.body);
    assert_eq!(again.header, node.header);
}

fn decode_all_ways(img: &[u8], ptr: &NodePtr, kinds: &mut HashSet<CorruptionKind>) -> usize {
    let mut ok = 0;
    match format::decode_node(img, None, NODE_SIZE) {
        Ok(node) => {
            assert_valid(&node);
            ok += 1;
        }
        Err(e) => {
            kinds.insert(e.corruption_kind().expect("decode errors are corruption errors"));
        }
    }
    // Through the original pointer, and through a pointer patched to cover the mutated image.
    if let Ok(node) = format::decode_node(img, Some(ptr), NODE_SIZE) {
        assert_valid(&node);
        ok += 1;
    }
    let patched =
        NodePtr { len: img.len().min(u32::MAX as usize) as u32, csum: format::image_checksum(img), ..*ptr };
    if let Ok(node) = format::decode_node(img, Some(&patched), NODE_SIZE) {
        assert_valid(&node);
        ok += 1;
    }
    ok
}

fn mutate(rng: &mut StdRng, img: &[u8]) -> Vec<u8> {
    let mut m = img.to_vec();
    match rng.gen_range(0..6) {
        0 => {
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..m.len());
                m[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        1 => m.truncate(rng.gen_range(0..m.len())),
        2 => {
            // Edit a bset count (first bset or a random later offset) to something odd.
            let at =
                if rng.gen_bool(0.5) { HEADER_LEN + 8 } else { rng.gen_range(0..m.len().saturating_sub(4)) };
            let v: u32 = match rng.gen_range(0..4) {
                0 => u32::MAX,
                1 => rng.gen_range(0..64),
                2 => 0,
                _ => rng.r#gen(),
            };
            if at + 4 <= m.len() {
                m[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        3 => {
            // Edit a header field: level, align_shift, range bounds.
            let field = [12usize, 14, 32, 36, 44, 48][rng.gen_range(0..6)];
            m[field] = rng.r#gen();
        }
        4 => {
            // Grow the image with garbage (a torn append).
            let extra = rng.gen_range(1..200);
            m.extend((0..extra).map(|_| rng.r#gen::<u8>()));
        }
        _ => {
            // Swap two 28-byte windows (reordered keys).
            if m.len() > HEADER_LEN + BSET_HEADER_LEN + 56 {
                let a = rng.gen_range(HEADER_LEN..m.len() - 28);
                let b = rng.gen_range(HEADER_LEN..m.len() - 28);
                let wa = m[a..a + 28].to_vec();
                m.copy_within(b..b + 28, a);
                m[b..b + 28].copy_from_slice(&wa);
            }
        }
    }
    if rng.gen_bool(0.6) {
        format::reseal_checksums(&mut m);
    }
    m
}

#[test]
fn decoder_survives_a_batch_of_hostile_images() {
    let valid = valid_images();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut accepted = 0;
    let mut kinds = HashSet::new();
    for (img, ptr) in &valid {
        assert_eq!(decode_all_ways(img, ptr, &mut kinds), 3, "valid images decode");
    }
    for _ in 0..3000 {
        let (img, ptr) = &valid[rng.gen_range(0..valid.len())];
        let m = mutate(&mut rng, img);
        accepted += decode_all_ways(&m, ptr, &mut kinds);
    }
    let dummy = NodePtr { addr: 0, seq: 0, len: 0, csum: 0 };
    for _ in 0..1000 {
        let len = rng.gen_range(0..1200);
        let mut m: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        if rng.gen_bool(0.5) && m.len() >= HEADER_LEN {
            // A valid header in front of random bsets.
            let h = NodeHeader {
                level: rng.gen_range(0..2),
                align_shift: rng.gen_range(3..6),
                addr: 0,
                seq: 0,
                lo: Pos::MIN,
                hi: Pos::MAX,
            };
            let mut hb = Vec::new();
            format::encode_header(&h, &mut hb);
            m[..HEADER_LEN].copy_from_slice(&hb);
            format::reseal_checksums(&mut m);
        }
        accepted += decode_all_ways(&m, &dummy, &mut kinds);
    }
    // Some mutations are harmless (e.g. a resealed flip of a pointer's offset bits): the batch
    // must see both outcomes, or it is not exercising the decoder.
    assert!(accepted > 0, "some mutated images are still valid");
    // And it must reach the checks behind the checksums.
    for kind in [
        CorruptionKind::BadMagic,
        CorruptionKind::BadLength,
        CorruptionKind::ChecksumMismatch,
        CorruptionKind::KeysOutOfOrder,
        CorruptionKind::OverlappingKeys,
        CorruptionKind::OutOfNodeRange,
    ] {
        assert!(kinds.contains(&kind), "{kind} never seen; seen: {kinds:?}");
    }
}
