//! Store failures and the bounded node cache: an I/O error is reported as `Store`, a failed flush
//! poisons the tree (it never half-applies a checkpoint), the last checkpoint still opens, and the
//! node cache stays within its bound while the tree is larger than it.

use ubcache_btree::{BtreeError, Key, MemStore, NodeAddr, NodeStore, Pos, Ptr, StoreError, Tree, TreeConfig};

/// A store that fails every write after `fail_after` writes, and every read when `fail_reads`.
#[derive(Debug)]
struct FlakyStore {
    inner: MemStore,
    fail_after: u64,
    fail_reads: bool,
}

impl NodeStore for FlakyStore {
    fn node_size(&self) -> usize {
        self.inner.node_size()
    }
    fn alloc(&mut self) -> Result<NodeAddr, StoreError> {
        self.inner.alloc()
    }
    fn read(&mut self, addr: NodeAddr, offset: usize, buf: &mut [u8]) -> Result<(), StoreError> {
        if self.fail_reads {
            return Err(StoreError::Io { addr, source: "injected read error".into() });
        }
        self.inner.read(addr, offset, buf)
    }
    fn write(&mut self, addr: NodeAddr, offset: usize, data: &[u8]) -> Result<(), StoreError> {
        if self.inner.writes() >= self.fail_after {
            return Err(StoreError::Io { addr, source: "injected write error".into() });
        }
        self.inner.write(addr, offset, data)
    }
}

fn cfg() -> TreeConfig {
    TreeConfig { max_cached_nodes: 40, bset_align: 16 }
}

fn k(i: u64) -> Key {
    Key::new(1, i * 8, 8, Ptr { offset: i * 8, generation: 0 }, i % 3 == 0)
}

#[test]
fn failed_flush_poisons_and_the_last_checkpoint_still_opens() {
    let mut t = Tree::create(
        FlakyStore { inner: MemStore::new(512), fail_after: u64::MAX, fail_reads: false },
        cfg(),
    )
    .unwrap();
    for i in 0..300 {
        t.insert(k(i)).unwrap();
    }
    let good = t.write_out().unwrap();
    for i in 300..600 {
        t.insert(k(i)).unwrap();
    }
    let writes = t.store().inner.writes();
    t.store_mut().fail_after = writes + 3;
    let err = t.write_out().unwrap_err();
    assert!(matches!(err, BtreeError::Store(StoreError::Io { .. })), "{err}");
    assert!(matches!(t.insert(k(1000)), Err(BtreeError::Poisoned)));
    assert!(matches!(t.write_out(), Err(BtreeError::Poisoned)));
    // Recovery: the last checkpoint is intact.
    let mut store = t.into_store();
    store.fail_after = u64::MAX;
    let mut t = Tree::open(store, good.root, cfg()).unwrap();
    assert_eq!(t.stats().keys, 300);
    assert!(t.check().unwrap().is_empty());
}

#[test]
fn read_errors_are_reported_not_panics() {
    let mut t = Tree::create(
        FlakyStore { inner: MemStore::new(512), fail_after: u64::MAX, fail_reads: false },
        cfg(),
    )
    .unwrap();
    for i in 0..2000 {
        t.insert(k(i)).unwrap();
    }
    let cp = t.write_out().unwrap();
    let mut store = t.into_store();
    store.fail_reads = true;
    let err = Tree::open(store, cp.root, cfg()).unwrap_err();
    assert!(matches!(err, BtreeError::Store(StoreError::Io { .. })), "{err}");
}

#[test]
fn node_cache_stays_bounded() {
    let mut t = Tree::create(MemStore::new(512), cfg()).unwrap();
    for i in 0..5000 {
        t.insert(k(i)).unwrap();
        if i % 500 == 0 {
            t.write_out().unwrap();
        }
    }
    let cp = t.write_out().unwrap();
    assert!(t.stats().nodes > 200, "the tree must be much larger than the cache");
    let mut t = Tree::open(t.into_store(), cp.root, cfg()).unwrap();
    let mut out = Vec::new();
    assert_eq!(t.scan(Pos::MIN, &|_| true, usize::MAX, &mut out).unwrap(), None);
    assert_eq!(out.len(), 5000);
    assert!(t.stats().cached_nodes <= 40, "cached {}", t.stats().cached_nodes);
    for i in (0..5000).step_by(37) {
        let segs = t.lookup(1, i * 8, i * 8 + 8).unwrap();
        assert_eq!(segs.len(), 1);
        assert!(t.stats().cached_nodes <= 40);
    }
    assert!(t.check().unwrap().is_empty());
}
