//! Regression tests for the 2019 bcache corruption: a wrong search key (`PRECEDING_KEY()` of a
//! key at offset 0) made btree iteration go backwards or skip keys, so writeback missed or
//! reordered dirty extents and corrupt nodes could be written. Here: adjacent keys from
//! sequential writes come back in order from the writeback-style dirty scan (also across node and
//! device boundaries, with continuation positions), and a node image whose keys were reordered is
//! detected and reported with its keys, never accepted or written.

use ubcache_btree::format::{self, BSET_HEADER_LEN, HEADER_LEN, LEAF_ENTRY_LEN};
use ubcache_btree::{CorruptionKind, Key, MemStore, NodePtr, Pos, Ptr, Tree, TreeConfig};

fn cfg() -> TreeConfig {
    TreeConfig { max_cached_nodes: 64, bset_align: 16 }
}

fn write_4k(t: &mut Tree<MemStore>, dev: u32, sector: u64) -> Key {
    let k = Key::new(dev, sector, 8, Ptr { offset: 100_000 + sector, generation: 1 }, true);
    t.insert(k).unwrap();
    k
}

/// Scans the dirty keys `batch` at a time, as writeback refills its key buffer.
fn dirty_scan(t: &mut Tree<MemStore>, batch: usize) -> Vec<Key> {
    let mut all = Vec::new();
    let mut from = Pos::MIN;
    let mut rounds = 0;
    loop {
        let mut out = Vec::new();
        let next = t.scan(from, &|k| k.dirty, batch, &mut out).unwrap();
        all.extend(out);
        rounds += 1;
        assert!(rounds < 100_000, "scan must terminate");
        match next {
            Some(p) => from = p,
            None => return all,
        }
    }
}

#[test]
fn two_sequential_4k_writes_scan_in_order() {
    let mut t = Tree::create(MemStore::new(4096), cfg()).unwrap();
    let a = write_4k(&mut t, 0, 0);
    let b = write_4k(&mut t, 0, 8);
    assert_eq!(a.end, b.start(), "adjacent keys");
    for batch in [1, 2, 100] {
        assert_eq!(dirty_scan(&mut t, batch), vec![a, b], "batch {batch}");
    }
    // Continuing from the first key's position must return exactly the second key.
    let mut out = Vec::new();
    assert_eq!(t.scan(a.pos(), &|k| k.dirty, 10, &mut out).unwrap(), None);
    assert_eq!(out, vec![b]);
    // Starting at sector 0 (what PRECEDING_KEY got wrong) returns the key at offset 0.
    out.clear();
    t.scan(Pos::new(0, 0), &|k| k.dirty, 1, &mut out).unwrap();
    assert_eq!(out, vec![a]);
}

#[test]
fn sequential_writes_across_nodes_and_devices_scan_in_order() {
    let mut t = Tree::create(MemStore::new(512), cfg()).unwrap();
    let mut written = Vec::new();
    for dev in 0..3 {
        for i in 0..300u64 {
            written.push(write_4k(&mut t, dev, i * 8));
        }
    }
    assert!(t.stats().depth >= 3);
    for batch in [1, 7, 64] {
        assert_eq!(dirty_scan(&mut t, batch), written);
    }
    let cp = t.write_out().unwrap();
    let mut t = Tree::open(t.into_store(), cp.root, cfg()).unwrap();
    assert_eq!(dirty_scan(&mut t, 5), written);
}

/// Builds a one-leaf tree, returns its store and root.
fn one_leaf_tree() -> (MemStore, NodePtr) {
    let mut t = Tree::create(MemStore::new(4096), cfg()).unwrap();
    for i in 0..10u64 {
        write_4k(&mut t, 1, i * 8);
    }
    let cp = t.write_out().unwrap();
    (t.into_store(), cp.root)
}

/// Reorders two keys of the root leaf's image (keeping checksums valid, as a bug that builds a
/// bad bset in memory would) and returns the pointer that covers it.
fn reorder_keys_in_image(store: &mut MemStore, root: NodePtr, swap: (usize, usize)) -> NodePtr {
    let img = store.slot_mut(root.addr).unwrap();
    let at = |i: usize| HEADER_LEN + BSET_HEADER_LEN + i * LEAF_ENTRY_LEN;
    let (i, j) = swap;
    let a: Vec<u8> = img[at(i)..at(i) + LEAF_ENTRY_LEN].to_vec();
    let b: Vec<u8> = img[at(j)..at(j) + LEAF_ENTRY_LEN].to_vec();
    img[at(i)..at(i) + LEAF_ENTRY_LEN].copy_from_slice(&b);
    img[at(j)..at(j) + LEAF_ENTRY_LEN].copy_from_slice(&a);
    format::reseal_checksums(&mut img[..root.len as usize]);
    NodePtr { csum: format::image_checksum(&img[..root.len as usize]), ..root }
}

#[test]
fn reordered_keys_in_a_node_image_are_detected_and_reported() {
    let (mut store, root) = one_leaf_tree();
    let bad_root = reorder_keys_in_image(&mut store, root, (3, 4));
    let writes = store.writes();
    let err = Tree::open(store.clone(), bad_root, cfg()).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::KeysOutOfOrder), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("node {}", root.addr)), "names the node: {msg}");
    assert!(
        msg.contains("dev 1 [32, 40)") && msg.contains("dev 1 [24, 32)"),
        "dumps the neighbouring keys: {msg}"
    );
    assert_eq!(store.writes(), writes, "nothing written");
    // The decoder alone says the same.
    let img = store.slot_mut(root.addr).unwrap().clone();
    let err = format::decode_node(&img[..root.len as usize], Some(&bad_root), 4096).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::KeysOutOfOrder));
}

#[test]
fn a_key_moved_before_its_predecessor_is_out_of_order_not_skipped() {
    // Swap the first and last key: every iteration step after the first goes backwards.
    let (mut store, root) = one_leaf_tree();
    let bad_root = reorder_keys_in_image(&mut store, root, (0, 9));
    let err = Tree::open(store, bad_root, cfg()).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::KeysOutOfOrder), "{err}");
}

#[test]
fn a_changed_image_under_an_old_pointer_is_a_checksum_mismatch() {
    // Without patching the pointer, any change of the covered bytes is caught by its crc32c.
    let (mut store, root) = one_leaf_tree();
    let _ = reorder_keys_in_image(&mut store, root, (1, 2));
    let err = Tree::open(store, root, cfg()).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::ChecksumMismatch), "{err}");
}

#[test]
fn check_reports_a_corrupted_stored_leaf_of_an_open_tree() {
    let mut t = Tree::create(MemStore::new(512), cfg()).unwrap();
    for i in 0..200u64 {
        write_4k(&mut t, 1, i * 8);
    }
    t.write_out().unwrap();
    assert!(t.check().unwrap().is_empty());
    let addrs = t.node_addrs().unwrap();
    let leaf = addrs[addrs.len() - 1];
    let img = t.store_mut().slot_mut(leaf).unwrap();
    img[HEADER_LEN + BSET_HEADER_LEN + 5] ^= 0x40;
    let problems = t.check().unwrap();
    assert!(
        problems.iter().any(|p| p.addr == Some(leaf) && p.kind == Some(CorruptionKind::ChecksumMismatch)),
        "{problems:?}"
    );
}
