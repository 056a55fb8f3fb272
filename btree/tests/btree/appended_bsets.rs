//! Decoding a node checks every appended bset (index > 0) on its own, not only the merged view:
//! an appended bset out of order, overlapping, or with a whiteout outside the node's range would
//! merge into a plausible node and hide what wrote it.
// A refusal that did not happen is reported with what was accepted.
#![allow(clippy::panic)]

use ubcache_btree::format::{self, BSET_HEADER_LEN, LEAF_ENTRY_LEN, LeafEntry, NodeHeader};
use ubcache_btree::{CorruptionKind, Key, Pos, Ptr};

const NODE_SIZE: usize = 1024;

fn key(start: u64, size: u32) -> Key {
    Key::new(1, start, size, Ptr { offset: 100 + start, generation: 1 }, false)
}

/// A leaf image of bset 0 (`[0, 8)`) and an appended bset 1 of `[16, 24)`, `[24, 32)` (a whiteout
/// when `whiteout`), after `edit` changed the raw bytes of the appended bset's entries; every
/// checksum is resealed so only the semantic checks can object.
fn image(whiteout: bool, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let h =
        NodeHeader { level: 0, align_shift: 4, addr: 3, seq: 1, lo: Pos::new(1, 0), hi: Pos::new(1, 100) };
    let mut img = Vec::new();
    format::encode_leaf_node(&h, &[key(0, 8)], NODE_SIZE, &mut img).unwrap();
    let at = img.len();
    let entries = [LeafEntry { key: key(16, 8), whiteout: false }, LeafEntry { key: key(24, 8), whiteout }];
    format::encode_leaf_bset(1, &entries, h.lo, h.hi, Some(h.addr), &mut img).unwrap();
    format::pad_to(&mut img, h.align());
    edit(&mut img[at + BSET_HEADER_LEN..at + BSET_HEADER_LEN + 2 * LEAF_ENTRY_LEN]);
    format::reseal_checksums(&mut img);
    img
}

fn decode_kind(img: &[u8]) -> Option<CorruptionKind> {
    match format::decode_node(img, None, NODE_SIZE) {
        Ok(node) => panic!("decoded a node with a broken appended bset: {:?}", node.body),
        Err(e) => e.corruption_kind(),
    }
}

#[test]
fn intact_appended_bset_decodes() {
    let node = format::decode_node(&image(false, |_| {}), None, NODE_SIZE).unwrap();
    assert_eq!(node.bsets, 2);
    assert_eq!(node.body, format::DecodedBody::Leaf(vec![key(0, 8), key(16, 8), key(24, 8)]));
}

/// Entries swapped: merged newest-wins, the result would still be sorted.
#[test]
fn appended_bset_out_of_order_is_refused() {
    let img = image(false, |e| {
        let (a, b) = e.split_at_mut(LEAF_ENTRY_LEN);
        a.swap_with_slice(b);
    });
    assert_eq!(decode_kind(&img), Some(CorruptionKind::KeysOutOfOrder));
}

/// The second entry grown backwards over the first (size field 8 -> 12): merging would cut the
/// first and hide the overlap.
#[test]
fn appended_bset_with_overlapping_entries_is_refused() {
    let img = image(false, |e| {
        let size = LEAF_ENTRY_LEN + 12;
        e[size..size + 4].copy_from_slice(&12u32.to_le_bytes());
    });
    assert_eq!(decode_kind(&img), Some(CorruptionKind::OverlappingKeys));
}

/// A whiteout ending past the node's range: it leaves no key in the merged view, so only the
/// check of the bset itself sees it.
#[test]
fn appended_whiteout_outside_the_node_range_is_refused() {
    let img = image(true, |e| {
        let end = LEAF_ENTRY_LEN + 4;
        e[end..end + 8].copy_from_slice(&200u64.to_le_bytes());
    });
    assert_eq!(decode_kind(&img), Some(CorruptionKind::OutOfNodeRange));
}
