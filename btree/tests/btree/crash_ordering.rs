//! Crash ordering of `flush`: until the caller journals a new root, the previous root must stay
//! valid whatever happened to the bytes written since. This test takes a checkpoint, keeps
//! changing and flushing the tree (without releasing freed slots, as the caller must not before
//! journaling), then overwrites with garbage every byte of every slot that the old root does not
//! cover (simulating torn, partial and misdirected writes of the later flushes) and reopens the
//! old root: it must read back exactly the old content.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use ubcache_btree::format::{self, DecodedBody};
use ubcache_btree::{Key, MemStore, NodeAddr, NodePtr, NodeStore, Pos, Ptr, Tree, TreeConfig};

const NODE_SIZE: usize = 1024;

fn cfg() -> TreeConfig {
    TreeConfig { max_cached_nodes: 64, bset_align: 16 }
}

fn all_keys(t: &mut Tree<MemStore>) -> Vec<Key> {
    let mut out = Vec::new();
    assert_eq!(t.scan(Pos::MIN, &|_| true, usize::MAX, &mut out).unwrap(), None);
    out
}

/// Covered length of every slot the tree under `root` uses.
fn covered(store: &mut MemStore, root: NodePtr) -> HashMap<NodeAddr, usize> {
    let mut out = HashMap::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        let mut img = vec![0; p.len as usize];
        store.read(p.addr, 0, &mut img).unwrap();
        if let DecodedBody::Interior(c) = format::decode_node(&img, Some(&p), NODE_SIZE).unwrap().body {
            todo.extend(c.iter().map(|c| c.ptr));
        }
        out.insert(p.addr, p.len as usize);
    }
    out
}

fn random_ops(t: &mut Tree<MemStore>, rng: &mut StdRng, n: usize) {
    for _ in 0..n {
        let start = rng.gen_range(0..5000u64);
        let k = Key::new(
            rng.gen_range(0..2),
            start,
            rng.gen_range(1..32),
            Ptr { offset: rng.r#gen::<u32>().into(), generation: rng.r#gen() },
            rng.gen_bool(0.5),
        );
        if rng.gen_bool(0.85) {
            t.insert(k).unwrap();
        } else {
            t.invalidate(k.dev, k.start(), k.end).unwrap();
        }
    }
}

#[test]
fn old_root_survives_garbage_outside_what_it_covers() {
    let mut rng = StdRng::seed_from_u64(99);
    for round in 0..5 {
        let mut t = Tree::create(MemStore::new(NODE_SIZE), cfg()).unwrap();
        random_ops(&mut t, &mut rng, 800);
        let old = t.write_out().unwrap();
        t.store_mut().release(&old.freed);
        let old_keys = all_keys(&mut t);
        let old_dirty = t.stats().dirty_sectors;
        // Later work, flushed several times but never "journaled": nothing may be released.
        for _ in 0..3 {
            random_ops(&mut t, &mut rng, 300);
            t.write_out().unwrap();
        }
        let mut store = t.into_store();
        let keep = covered(&mut store, old.root);
        let mut addr = 0;
        while let Some(slot) = store.slot_mut(addr) {
            let from = keep.get(&addr).copied().unwrap_or(0);
            for b in &mut slot[from..] {
                *b = rng.r#gen();
            }
            addr += 1;
        }
        let mut reopened =
            Tree::open(store, old.root, cfg()).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(all_keys(&mut reopened), old_keys, "round {round}");
        assert_eq!(reopened.stats().dirty_sectors, old_dirty);
        assert!(reopened.check().unwrap().is_empty());
        // And the reopened tree keeps working (appends land after the covered bytes).
        random_ops(&mut reopened, &mut rng, 200);
        let cp = reopened.write_out().unwrap();
        let mut again = Tree::open(reopened.into_store(), cp.root, cfg()).unwrap();
        assert!(again.check().unwrap().is_empty());
    }
}
