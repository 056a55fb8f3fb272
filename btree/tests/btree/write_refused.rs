//! A node that breaks an ordering invariant is refused by the encoder/writer before any byte
//! reaches the store.

use ubcache_btree::format::{self, LeafEntry, NodeHeader};
use ubcache_btree::{CorruptionKind, Key, MemStore, NodeStore, Pos, Ptr};

fn key(start: u64, size: u32) -> Key {
    Key::new(1, start, size, Ptr { offset: 500 + start, generation: 2 }, false)
}

fn header(store: &mut MemStore) -> NodeHeader {
    let addr = store.alloc().unwrap();
    NodeHeader { level: 0, align_shift: 4, addr, seq: 1, lo: Pos::new(1, 0), hi: Pos::new(1, 1000) }
}

#[test]
fn out_of_order_keys_are_refused_and_not_written() {
    let mut store = MemStore::new(1024);
    let h = header(&mut store);
    let err = format::write_leaf_node(&mut store, &h, &[key(0, 8), key(16, 8), key(8, 8)]).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::KeysOutOfOrder), "{err}");
    assert!(err.to_string().contains("dev 1 [8, 16)"), "{err}");
    assert_eq!(store.writes(), 0, "the store never received the bytes");
}

#[test]
fn overlapping_keys_are_refused_and_not_written() {
    let mut store = MemStore::new(1024);
    let h = header(&mut store);
    let err = format::write_leaf_node(&mut store, &h, &[key(0, 8), key(4, 8)]).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::OverlappingKeys), "{err}");
    assert_eq!(store.writes(), 0);
}

#[test]
fn keys_outside_the_node_range_are_refused_and_not_written() {
    let mut store = MemStore::new(1024);
    let h = header(&mut store);
    let err = format::write_leaf_node(&mut store, &h, &[key(995, 8)]).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::OutOfNodeRange), "{err}");
    assert_eq!(store.writes(), 0);
}

#[test]
fn bset_encoder_refuses_and_leaves_the_buffer_untouched() {
    let mut out = vec![1, 2, 3];
    let entries =
        [LeafEntry { key: key(8, 8), whiteout: false }, LeafEntry { key: key(0, 4), whiteout: true }];
    let err = format::encode_leaf_bset(3, &entries, Pos::new(1, 0), Pos::new(1, 1000), Some(9), &mut out)
        .unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::KeysOutOfOrder));
    assert_eq!(out, vec![1, 2, 3]);
}

#[test]
fn a_valid_node_is_written_and_reads_back() {
    let mut store = MemStore::new(1024);
    let h = header(&mut store);
    let keys = [key(0, 8), key(8, 8), key(100, 3)];
    let ptr = format::write_leaf_node(&mut store, &h, &keys).unwrap();
    assert_eq!(store.writes(), 1);
    let mut img = vec![0; ptr.len as usize];
    store.read(h.addr, 0, &mut img).unwrap();
    let node = format::decode_node(&img, Some(&ptr), 1024).unwrap();
    assert_eq!(node.body, format::DecodedBody::Leaf(keys.to_vec()));
}
