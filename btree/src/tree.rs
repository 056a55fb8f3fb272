//! The tree: in-memory node cache, descent, insert with overlap fixup, replace, invalidate,
//! lookup, scan, flush (copy-on-write / append persistence), check.

use crate::NodeAddr;
use crate::error::{BtreeError, CorruptionKind, Problem};
use crate::format::{
    self, ChildEntry, DecodedBody, LeafEntry, MAX_DEPTH, NodeHeader, NodePtr, check_step, dump_neighbours,
};
use crate::key::{Key, Pos, Ptr, Segment};
use crate::leaf::{Leaf, Loc};
use crate::store::NodeStore;
use std::collections::BTreeMap;

type NodeId = usize;

/// Tuning knobs that are not part of the on-disk format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeConfig {
    /// Upper bound on nodes kept in memory. Clean nodes are evicted (second-chance) above it;
    /// dirty nodes stay until the next [`Tree::flush`], so flush regularly.
    pub max_cached_nodes: usize,
    /// bsets are padded to this many bytes (a power of two, 8..=1 MiB, dividing the node size),
    /// normally the device's sector size so an append never rewrites a sector older pointers
    /// cover.
    pub bset_align: usize,
}

impl Default for TreeConfig {
    fn default() -> Self {
        TreeConfig { max_cached_nodes: 1024, bset_align: 512 }
    }
}

/// What [`Tree::flush`] returns: the new root to record durably, and the slots the new tree no
/// longer uses (reusable only once the new root is durable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Pointer to the root of the flushed tree.
    pub root: NodePtr,
    /// Slots used by the previous checkpoint but not by this one.
    pub freed: Vec<NodeAddr>,
}

/// Result of [`Tree::insert`] and [`Tree::invalidate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    /// The pieces of older keys that were removed (exactly the overwritten sectors), so the cache
    /// can keep per-bucket live-sector and dirty-sector counts.
    pub displaced: Vec<Key>,
}

/// Result of [`Tree::replace`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaceOutcome {
    /// Sectors of the new key that were inserted.
    pub inserted_sectors: u64,
    /// Sectors whose current state did not match the expectation (left untouched).
    pub collision_sectors: u64,
    /// Pieces of older keys removed by the inserted parts.
    pub displaced: Vec<Key>,
}

/// Counters of the tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Keys in the tree.
    pub keys: u64,
    /// Nodes in the tree.
    pub nodes: u64,
    /// Levels (1 for a lone leaf root).
    pub depth: u32,
    /// Nodes currently in memory.
    pub cached_nodes: usize,
    /// Estimated bytes of memory used by the cached nodes.
    pub cached_bytes: usize,
    /// Dirty sectors in the whole tree.
    pub dirty_sectors: u64,
    /// Dirty sectors per backing device (devices with none are absent).
    pub dirty_sectors_by_dev: BTreeMap<u32, u64>,
}

/// Where the last written version of a node lives.
#[derive(Clone, Copy, Debug)]
struct DiskState {
    addr: NodeAddr,
    seq: u64,
    len: usize,
    csum: u32,
    bsets: u32,
    align: usize,
}

impl DiskState {
    fn ptr(&self) -> NodePtr {
        NodePtr { addr: self.addr, seq: self.seq, len: self.len as u32, csum: self.csum }
    }
}

#[derive(Debug)]
struct Child {
    hi: Pos,
    /// The child's last flushed version (None: never flushed, then `mem` is set).
    ptr: Option<NodePtr>,
    /// The child, when cached.
    mem: Option<NodeId>,
}

#[derive(Debug)]
enum Body {
    Leaf(Leaf),
    Interior(Vec<Child>),
}

#[derive(Debug)]
struct MemNode {
    level: u8,
    lo: Pos,
    hi: Pos,
    disk: Option<DiskState>,
    /// Changed since its last write.
    dirty: bool,
    /// Must be written whole into a fresh slot (its range changed, or its change log overflowed).
    rewrite: bool,
    /// Second-chance bit for eviction.
    referenced: bool,
    /// Sector ranges changed since the last write (leaves), from which `flush` builds the
    /// appended delta bset.
    changed: Vec<(u32, u64, u64)>,
    body: Body,
}

impl MemNode {
    fn new(level: u8, lo: Pos, hi: Pos, body: Body) -> MemNode {
        MemNode {
            level,
            lo,
            hi,
            disk: None,
            dirty: true,
            rewrite: true,
            referenced: true,
            changed: Vec::new(),
            body,
        }
    }

    fn placeholder() -> MemNode {
        let mut n = MemNode::new(0, Pos::MIN, Pos::MAX, Body::Leaf(Leaf::new()));
        n.dirty = false;
        n
    }

    fn len(&self) -> usize {
        match &self.body {
            Body::Leaf(m) => m.len(),
            Body::Interior(c) => c.len(),
        }
    }

    fn note_change(&mut self, dev: u32, start: u64, end: u64, limit: usize) {
        self.dirty = true;
        if self.disk.is_some() && !self.rewrite {
            if self.changed.len() >= limit {
                // Too many scattered changes: a full rewrite is cheaper than a huge delta.
                self.rewrite = true;
                self.changed = Vec::new();
            } else {
                self.changed.push((dev, start, end));
            }
        }
    }

    fn has_cached_children(&self) -> bool {
        match &self.body {
            Body::Leaf(_) => false,
            Body::Interior(c) => c.iter().any(|c| c.mem.is_some()),
        }
    }
}

/// A root-to-leaf path: `ids[0]` is the root, `idx[k]` the index of `ids[k + 1]` in `ids[k]`.
#[derive(Clone, Copy, Debug)]
struct Path {
    ids: [NodeId; MAX_DEPTH],
    idx: [usize; MAX_DEPTH],
    len: usize,
}

impl Path {
    fn leaf(&self) -> NodeId {
        self.ids[self.len - 1]
    }
}

fn internal(what: &str) -> BtreeError {
    BtreeError::corrupted(CorruptionKind::BadLevel, None, format!("internal inconsistency: {what}"))
}

fn iter_error(
    kind: CorruptionKind,
    why: &str,
    addr: Option<NodeAddr>,
    prev: Option<&Key>,
    key: &Key,
    lo: Pos,
    hi: Pos,
) -> BtreeError {
    // An iteration that meets a key not after the previous one is the "key skipped backwards"
    // of bcache: report it under that name.
    let kind =
        if kind == CorruptionKind::KeysOutOfOrder { CorruptionKind::KeySkippedBackwards } else { kind };
    let prev = prev.map_or_else(|| "(none)".to_string(), ToString::to_string);
    BtreeError::corrupted(
        kind,
        addr,
        format!("{why} during iteration (node range [{lo}, {hi}]):\n  previous: {prev}\n  this:     {key}"),
    )
}

/// Checks one iteration step (see [`check_step`]) and turns a failure into the typed error with
/// the dump of both keys.
fn check_iter_step(
    prev: Option<&Key>,
    key: &Key,
    lo: Pos,
    hi: Pos,
    addr: Option<NodeAddr>,
) -> Result<(), BtreeError> {
    match check_step(prev, key, lo, hi) {
        Ok(()) => Ok(()),
        Err((kind, why)) => Err(iter_error(kind, why, addr, prev, key, lo, hi)),
    }
}

/// The checked in-order walk over leaf keys that `lookup` and `scan` share. It carries the
/// previous key across leaves, so every step — inside a leaf and from one leaf to the next — is
/// checked to sort strictly after it, not to overlap it, and to lie in its node's range.
#[derive(Default)]
struct CheckedWalk {
    prev: Option<Key>,
}

impl CheckedWalk {
    /// Starts on `node` (a leaf) at the first key after `search`. Entering a leaf at or below its
    /// low bound walks it from its first key: a key sorting before the bound (corruption) then
    /// shows up as a backwards step instead of being skipped.
    fn enter<'a>(&'a mut self, node: &'a MemNode, search: Pos) -> Result<LeafSteps<'a>, BtreeError> {
        let Body::Leaf(keys) = &node.body else {
            return Err(internal("descent ended on an interior node"));
        };
        let loc = if search <= node.lo { keys.first() } else { keys.first_after(search) };
        Ok(LeafSteps {
            keys,
            loc,
            lo: node.lo,
            hi: node.hi,
            addr: node.disk.map(|d| d.addr),
            prev: &mut self.prev,
        })
    }
}

/// A [`CheckedWalk`] inside one leaf.
struct LeafSteps<'a> {
    keys: &'a Leaf,
    loc: Option<Loc>,
    lo: Pos,
    hi: Pos,
    addr: Option<NodeAddr>,
    prev: &'a mut Option<Key>,
}

impl LeafSteps<'_> {
    /// The next key, checked against the previous one and the node range; `None` at the end of
    /// the leaf.
    fn next(&mut self) -> Result<Option<Key>, BtreeError> {
        let Some(loc) = self.loc else { return Ok(None) };
        let k = self.keys.key(loc);
        check_iter_step(self.prev.as_ref(), &k, self.lo, self.hi, self.addr)?;
        *self.prev = Some(k);
        self.loc = self.keys.next(loc);
        Ok(Some(k))
    }
}

/// The btree of extent keys. See the crate docs for the persistence model.
pub struct Tree<S: NodeStore> {
    store: S,
    cfg: TreeConfig,
    node_size: usize,
    align_shift: u16,
    leaf_cap: usize,
    interior_cap: usize,
    nodes: Vec<MemNode>,
    free_ids: Vec<NodeId>,
    cached: usize,
    root: NodeId,
    next_seq: u64,
    pending_free: Vec<NodeAddr>,
    keys: u64,
    node_count: u64,
    dirty_sectors: u64,
    dirty_by_dev: BTreeMap<u32, u64>,
    poisoned: bool,
    /// After an eviction pass that could not reach its target, the cache size at which to try
    /// again (0: no back-off).
    evict_retry_at: usize,
    last_root: Option<NodePtr>,
    scratch: Vec<u8>,
    scratch_entries: Vec<LeafEntry>,
    scratch_keys: Vec<Key>,
    read_buf: Vec<u8>,
}

impl<S: NodeStore> std::fmt::Debug for Tree<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("node_size", &self.node_size)
            .field("keys", &self.keys)
            .field("nodes", &self.node_count)
            .field("cached", &self.cached)
            .field("last_root", &self.last_root)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

struct Geometry {
    align_shift: u16,
    leaf_cap: usize,
    interior_cap: usize,
}

fn geometry(node_size: usize, cfg: &TreeConfig) -> Result<Geometry, BtreeError> {
    let align = cfg.bset_align;
    if !align.is_power_of_two()
        || !(8..=(1 << format::MAX_ALIGN_SHIFT)).contains(&align)
        || node_size % align != 0
    {
        return Err(BtreeError::Invalid(format!(
            "bset alignment {align} must be a power of two in 8..=1MiB dividing the node size {node_size}"
        )));
    }
    let room = node_size.saturating_sub(format::HEADER_LEN + format::BSET_HEADER_LEN);
    // Split at 3/4 of what a compacted node holds, leaving room for appended delta bsets.
    let leaf_cap = room / format::LEAF_ENTRY_LEN * 3 / 4;
    let interior_cap = room / format::CHILD_ENTRY_LEN * 3 / 4;
    if leaf_cap < 4 || interior_cap < 4 || node_size > u32::MAX as usize {
        return Err(BtreeError::Invalid(format!(
            "node size {node_size} is too small (or too large) for a btree node"
        )));
    }
    if cfg.max_cached_nodes < 2 * MAX_DEPTH {
        return Err(BtreeError::Invalid(format!("max_cached_nodes must be at least {}", 2 * MAX_DEPTH)));
    }
    Ok(Geometry { align_shift: align.trailing_zeros() as u16, leaf_cap, interior_cap })
}

impl<S: NodeStore> Tree<S> {
    fn with_root(store: S, cfg: TreeConfig, root: MemNode) -> Result<Self, BtreeError> {
        let node_size = store.node_size();
        let g = geometry(node_size, &cfg)?;
        Ok(Tree {
            store,
            cfg,
            node_size,
            align_shift: g.align_shift,
            leaf_cap: g.leaf_cap,
            interior_cap: g.interior_cap,
            nodes: vec![root],
            free_ids: Vec::new(),
            cached: 1,
            root: 0,
            next_seq: 1,
            pending_free: Vec::new(),
            keys: 0,
            node_count: 1,
            dirty_sectors: 0,
            dirty_by_dev: BTreeMap::new(),
            poisoned: false,
            evict_retry_at: 0,
            last_root: None,
            scratch: Vec::new(),
            scratch_entries: Vec::new(),
            scratch_keys: Vec::new(),
            read_buf: Vec::new(),
        })
    }

    /// A new empty tree. Nothing is written until [`Tree::flush`].
    pub fn create(store: S, cfg: TreeConfig) -> Result<Self, BtreeError> {
        let root = MemNode::new(0, Pos::MIN, Pos::MAX, Body::Leaf(Leaf::new()));
        Tree::with_root(store, cfg, root)
    }

    /// Opens the tree whose root a previous [`Tree::flush`] returned. Walks and verifies every
    /// node (this also rebuilds the key and dirty-sector counts); a corrupt tree is refused.
    pub fn open(store: S, root: NodePtr, cfg: TreeConfig) -> Result<Self, BtreeError> {
        let placeholder = MemNode::placeholder();
        let mut tree = Tree::with_root(store, cfg, placeholder)?;
        let node = tree.load_node(&root, None, Pos::MIN, Pos::MAX)?;
        tree.nodes[0] = node;
        tree.node_count = 0;
        let mut stats = WalkStats::default();
        tree.walk_disk(&root, None, Pos::MIN, Pos::MAX, 0, &mut stats)?;
        tree.keys = stats.keys;
        tree.node_count = stats.nodes;
        tree.dirty_sectors = stats.dirty_sectors;
        tree.dirty_by_dev = stats.dirty_by_dev;
        tree.next_seq = stats.max_seq + 1;
        tree.last_root = Some(root);
        Ok(tree)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably (e.g. to release freed slots).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Gives the store back.
    pub fn into_store(self) -> S {
        self.store
    }

    /// The root of the last checkpoint (from `open` or `flush`).
    #[must_use]
    pub fn last_root(&self) -> Option<NodePtr> {
        self.last_root
    }

    /// Keys a leaf holds before it splits (for tests that want to size trees).
    #[must_use]
    pub fn leaf_capacity(&self) -> usize {
        self.leaf_cap
    }

    fn check_poisoned(&self) -> Result<(), BtreeError> {
        if self.poisoned { Err(BtreeError::Poisoned) } else { Ok(()) }
    }

    fn poison_on_err<T>(&mut self, r: Result<T, BtreeError>) -> Result<T, BtreeError> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    // ---------------------------------------------------------------- node cache

    fn alloc_id(&mut self, node: MemNode) -> NodeId {
        self.cached += 1;
        if let Some(id) = self.free_ids.pop() {
            self.nodes[id] = node;
            id
        } else {
            self.nodes.push(node);
            self.nodes.len() - 1
        }
    }

    fn free_id(&mut self, id: NodeId) -> MemNode {
        self.cached -= 1;
        self.free_ids.push(id);
        std::mem::replace(&mut self.nodes[id], MemNode::placeholder())
    }

    /// Reads, decodes and verifies the node `ptr` points to, which must have `level` (if known)
    /// and exactly the range `[lo, hi]` its parent gives it.
    fn load_node(
        &mut self,
        ptr: &NodePtr,
        level: Option<u8>,
        lo: Pos,
        hi: Pos,
    ) -> Result<MemNode, BtreeError> {
        let decoded = self.read_decoded(ptr)?;
        let h = decoded.header;
        let addr = Some(ptr.addr);
        if let Some(l) = level {
            if h.level != l {
                return Err(BtreeError::corrupted(
                    CorruptionKind::BadLevel,
                    addr,
                    format!("node has level {}, parent expects {l}", h.level),
                ));
            }
        }
        if h.lo != lo || h.hi != hi {
            return Err(BtreeError::corrupted(
                CorruptionKind::OutOfNodeRange,
                addr,
                format!("node covers [{}, {}], parent gives it [{lo}, {hi}]", h.lo, h.hi),
            ));
        }
        let body = match decoded.body {
            DecodedBody::Leaf(keys) => Body::Leaf(Leaf::from_sorted(&keys)),
            DecodedBody::Interior(children) => {
                if h.level == 0 {
                    return Err(internal("interior body at level 0"));
                }
                Body::Interior(
                    children.iter().map(|c| Child { hi: c.hi, ptr: Some(c.ptr), mem: None }).collect(),
                )
            }
        };
        let mut node = MemNode::new(h.level, lo, hi, body);
        node.disk = Some(DiskState {
            addr: ptr.addr,
            seq: ptr.seq,
            len: decoded.len,
            csum: ptr.csum,
            bsets: decoded.bsets,
            align: h.align(),
        });
        node.dirty = false;
        node.rewrite = false;
        Ok(node)
    }

    fn read_decoded(&mut self, ptr: &NodePtr) -> Result<format::DecodedNode, BtreeError> {
        let len = ptr.len as usize;
        if len > self.node_size {
            return Err(BtreeError::corrupted(
                CorruptionKind::BadLength,
                Some(ptr.addr),
                format!("pointer length {len} exceeds the node size {}", self.node_size),
            ));
        }
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.resize(len, 0);
        let r = self.store.read(ptr.addr, 0, &mut buf).map_err(BtreeError::from);
        let r = r.and_then(|()| format::decode_node(&buf, Some(ptr), self.node_size));
        self.read_buf = buf;
        r
    }

    /// The cached child `idx` of interior node `parent`, loading it if needed.
    fn child_id(&mut self, parent: NodeId, idx: usize) -> Result<NodeId, BtreeError> {
        let p = &self.nodes[parent];
        let Body::Interior(children) = &p.body else {
            return Err(internal("child of a leaf"));
        };
        let child = children.get(idx).ok_or_else(|| internal("child index out of range"))?;
        if let Some(id) = child.mem {
            self.nodes[id].referenced = true;
            return Ok(id);
        }
        let ptr = child.ptr.ok_or_else(|| internal("uncached child without pointer"))?;
        let lo = if idx == 0 { p.lo } else { children[idx - 1].hi };
        let hi = child.hi;
        let level = p.level.checked_sub(1).ok_or_else(|| internal("interior node at level 0"))?;
        let node = self.load_node(&ptr, Some(level), lo, hi)?;
        let id = self.alloc_id(node);
        if let Body::Interior(children) = &mut self.nodes[parent].body {
            children[idx].mem = Some(id);
        }
        Ok(id)
    }

    /// Descends to the leaf holding the keys just after `p` (the first child whose `hi > p` at
    /// every level). `p` must be below `Pos::MAX`.
    fn descend_gt(&mut self, p: Pos) -> Result<Path, BtreeError> {
        let mut path = Path { ids: [0; MAX_DEPTH], idx: [0; MAX_DEPTH], len: 1 };
        path.ids[0] = self.root;
        loop {
            let id = path.ids[path.len - 1];
            let node = &self.nodes[id];
            let Body::Interior(children) = &node.body else {
                return Ok(path);
            };
            let idx = children.partition_point(|c| c.hi <= p);
            if idx >= children.len() {
                return Err(internal("descent position beyond the node range"));
            }
            if path.len >= MAX_DEPTH {
                return Err(BtreeError::corrupted(
                    CorruptionKind::TooDeep,
                    None,
                    format!("descent deeper than {MAX_DEPTH}"),
                ));
            }
            let child = self.child_id(id, idx)?;
            path.idx[path.len - 1] = idx;
            path.ids[path.len] = child;
            path.len += 1;
        }
    }

    /// [`Tree::descend_gt`] for readers that need only the leaf, not the path to it.
    fn descend_gt_leaf(&mut self, p: Pos) -> Result<NodeId, BtreeError> {
        let mut id = self.root;
        // Same bound as `descend_gt`: at most MAX_DEPTH - 1 steps down.
        for _ in 1..MAX_DEPTH {
            let Body::Interior(children) = &self.nodes[id].body else {
                return Ok(id);
            };
            let idx = children.partition_point(|c| c.hi <= p);
            let Some(child) = children.get(idx) else {
                return Err(internal("descent position beyond the node range"));
            };
            id = match child.mem {
                Some(cid) => {
                    self.nodes[cid].referenced = true;
                    cid
                }
                None => self.child_id(id, idx)?,
            };
        }
        match self.nodes[id].body {
            Body::Leaf(_) => Ok(id),
            Body::Interior(_) => Err(BtreeError::corrupted(
                CorruptionKind::TooDeep,
                None,
                format!("descent deeper than {MAX_DEPTH}"),
            )),
        }
    }

    // ---------------------------------------------------------------- leaf edits

    fn account(&mut self, k: &Key, add: bool) {
        if add {
            self.keys += 1;
        } else {
            self.keys -= 1;
        }
        if k.dirty {
            let s = u64::from(k.size);
            let e = self.dirty_by_dev.entry(k.dev).or_insert(0);
            if add {
                self.dirty_sectors += s;
                *e += s;
            } else {
                self.dirty_sectors -= s;
                *e -= s;
                if *e == 0 {
                    self.dirty_by_dev.remove(&k.dev);
                }
            }
        }
    }

    fn leaf_insert(&mut self, id: NodeId, k: Key) -> Result<(), BtreeError> {
        let limit = self.leaf_cap;
        let node = &mut self.nodes[id];
        let Body::Leaf(leaf) = &mut node.body else {
            return Err(internal("leaf insert into interior node"));
        };
        if !leaf.insert(&k) {
            return Err(BtreeError::corrupted(
                CorruptionKind::OverlappingKeys,
                node.disk.map(|d| d.addr),
                format!("insert over existing key at {}", k.pos()),
            ));
        }
        node.note_change(k.dev, k.start(), k.end, limit);
        self.account(&k, true);
        Ok(())
    }

    fn leaf_remove(&mut self, id: NodeId, pos: Pos) -> Result<Key, BtreeError> {
        let limit = self.leaf_cap;
        let node = &mut self.nodes[id];
        let Body::Leaf(leaf) = &mut node.body else {
            return Err(internal("leaf remove from interior node"));
        };
        let k = leaf.remove(pos).ok_or_else(|| internal("removing a missing key"))?;
        node.note_change(k.dev, k.start(), k.end, limit);
        self.account(&k, false);
        Ok(k)
    }

    /// Removes every part of a key overlapping `[start, end)` of `dev`, keeping the parts outside
    /// (cut front, cut back, split), and appends the removed parts to `displaced`.
    fn cut(&mut self, dev: u32, start: u64, end: u64, displaced: &mut Vec<Key>) -> Result<(), BtreeError> {
        let stop = Pos { dev, sector: end };
        let mut cursor = Pos { dev, sector: start };
        let mut prev: Option<Key> = None;
        loop {
            if cursor == Pos::MAX {
                return Ok(());
            }
            let path = self.descend_gt(cursor)?;
            let leaf = path.leaf();
            let hi = self.nodes[leaf].hi;
            let (changed, done) =
                self.cut_in_leaf(leaf, dev, start, end, &mut cursor, &mut prev, displaced)?;
            if changed {
                self.fix(&path)?;
            }
            if done || hi >= stop {
                return Ok(());
            }
            if !changed {
                cursor = hi;
            }
        }
    }

    /// The part of [`Tree::cut`] within one leaf: walks the keys after `cursor` (checking every
    /// step), cutting those overlapping `[start, end)`. Returns (changed, reached a key past the
    /// range).
    #[allow(clippy::too_many_arguments)]
    fn cut_in_leaf(
        &mut self,
        leaf: NodeId,
        dev: u32,
        start: u64,
        end: u64,
        cursor: &mut Pos,
        prev: &mut Option<Key>,
        displaced: &mut Vec<Key>,
    ) -> Result<(bool, bool), BtreeError> {
        let (lo, hi, addr) = {
            let n = &self.nodes[leaf];
            (n.lo, n.hi, n.disk.map(|d| d.addr))
        };
        let mut changed = false;
        loop {
            let Body::Leaf(keys) = &self.nodes[leaf].body else {
                return Err(internal("descent ended on an interior node"));
            };
            let Some(old) = keys.first_after(*cursor).map(|loc| keys.key(loc)) else {
                return Ok((changed, false));
            };
            check_iter_step(prev.as_ref(), &old, lo, hi, addr)?;
            if old.dev != dev || old.start() >= end {
                return Ok((changed, true));
            }
            self.leaf_remove(leaf, old.pos())?;
            displaced.push(old.slice(old.start().max(start), old.end.min(end)));
            if old.start() < start {
                self.leaf_insert(leaf, old.slice(old.start(), start))?;
            }
            if old.end > end {
                self.leaf_insert(leaf, old.slice(end, old.end))?;
            }
            *cursor = old.pos();
            *prev = Some(old);
            changed = true;
        }
    }

    /// When the first key after `begin` in `leaf` covers exactly the range of `key` (a rewrite of
    /// the same block, the common case), replaces it in place with one search and returns it.
    fn overwrite_exact(&mut self, leaf: NodeId, begin: Pos, key: &Key) -> Result<Option<Key>, BtreeError> {
        let limit = self.leaf_cap;
        let node = &mut self.nodes[leaf];
        let (lo, hi, addr) = (node.lo, node.hi, node.disk.map(|d| d.addr));
        let Body::Leaf(keys) = &mut node.body else {
            return Err(internal("descent ended on an interior node"));
        };
        let Some(loc) = keys.first_after(begin) else {
            return Ok(None);
        };
        let old = keys.key(loc);
        check_iter_step(None, &old, lo, hi, addr)?;
        if old.dev != key.dev || old.end != key.end || old.size != key.size {
            return Ok(None);
        }
        keys.set(loc, key);
        node.note_change(key.dev, key.start(), key.end, limit);
        self.account(&old, false);
        self.account(key, true);
        Ok(Some(old))
    }

    fn insert_impl(&mut self, key: Key, displaced: &mut Vec<Key>) -> Result<(), BtreeError> {
        let (dev, start, end) = (key.dev, key.start(), key.end);
        let begin = Pos { dev, sector: start };
        let path = self.descend_gt(begin)?;
        let leaf = path.leaf();
        if key.pos() <= self.nodes[leaf].hi {
            // Fast path (one descent): the key fits this leaf, so every key it overlaps is here
            // too (keys of later leaves start at or after this leaf's high bound).
            if let Some(old) = self.overwrite_exact(leaf, begin, &key)? {
                displaced.push(old);
                return Ok(());
            }
            let mut cursor = begin;
            let mut prev = None;
            self.cut_in_leaf(leaf, dev, start, end, &mut cursor, &mut prev, displaced)?;
            self.leaf_insert(leaf, key)?;
            return self.fix(&path);
        }
        self.cut(dev, start, end, displaced)?;
        let mut cur = start;
        while cur < end {
            let path = self.descend_gt(Pos { dev, sector: cur })?;
            let leaf = path.leaf();
            let hi = self.nodes[leaf].hi;
            // hi > (dev, cur), so a leaf ending on this device ends after `cur`.
            let piece_end = if hi.dev == dev { end.min(hi.sector) } else { end };
            self.leaf_insert(leaf, key.slice(cur, piece_end))?;
            self.fix(&path)?;
            cur = piece_end;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- structure

    fn is_over(&self, id: NodeId) -> bool {
        let n = &self.nodes[id];
        n.len() > if n.level == 0 { self.leaf_cap } else { self.interior_cap }
    }

    fn is_under(&self, id: NodeId) -> bool {
        let n = &self.nodes[id];
        // An interior node with a single child is always underfull (it adds a level for nothing).
        let min = if n.level == 0 { (self.leaf_cap / 4).max(1) } else { (self.interior_cap / 4).max(2) };
        n.len() < min
    }

    /// Restores the fill bounds along `path` after its leaf changed: split, merge, root
    /// growth/shrink.
    fn fix(&mut self, path: &Path) -> Result<(), BtreeError> {
        let mut k = path.len - 1;
        loop {
            let id = path.ids[k];
            if k == 0 {
                if self.is_over(id) {
                    self.grow_root()?;
                }
                return self.shrink_root();
            }
            let (parent, idx) = (path.ids[k - 1], path.idx[k - 1]);
            if self.is_over(id) {
                self.split_child(parent, idx)?;
            } else if self.is_under(id) {
                self.merge_child(parent, idx)?;
            } else {
                return Ok(());
            }
            k -= 1;
        }
    }

    fn split_child(&mut self, parent: NodeId, idx: usize) -> Result<(), BtreeError> {
        let id = self.child_id(parent, idx)?;
        let node = &mut self.nodes[id];
        let old_hi = node.hi;
        let (mid, right_body) = match &mut node.body {
            Body::Leaf(keys) => {
                let right = keys.split_half().ok_or_else(|| internal("split of a tiny leaf"))?;
                let mid = keys.last_pos().ok_or_else(|| internal("split left empty"))?;
                (mid, Body::Leaf(right))
            }
            Body::Interior(children) => {
                let right = children.split_off(children.len() / 2);
                let mid = children.last().ok_or_else(|| internal("split left empty"))?.hi;
                (mid, Body::Interior(right))
            }
        };
        node.hi = mid;
        node.dirty = true;
        node.rewrite = true;
        node.changed = Vec::new();
        let level = node.level;
        let right = MemNode::new(level, mid, old_hi, right_body);
        let rid = self.alloc_id(right);
        self.node_count += 1;
        let Body::Interior(children) = &mut self.nodes[parent].body else {
            return Err(internal("split under a leaf"));
        };
        children[idx].hi = mid;
        children.insert(idx + 1, Child { hi: old_hi, ptr: None, mem: Some(rid) });
        self.nodes[parent].dirty = true;
        Ok(())
    }

    fn merge_child(&mut self, parent: NodeId, idx: usize) -> Result<(), BtreeError> {
        let n = self.nodes[parent].len();
        if n < 2 {
            return Ok(());
        }
        let (a, b) = if idx + 1 < n { (idx, idx + 1) } else { (idx - 1, idx) };
        let ida = self.child_id(parent, a)?;
        let idb = self.child_id(parent, b)?;
        let (la, lb) = (self.nodes[ida].len(), self.nodes[idb].len());
        let level = self.nodes[ida].level;
        let cap = if level == 0 { self.leaf_cap } else { self.interior_cap };
        // Merge b into a; if the result is over capacity it is split again at its middle below,
        // which redistributes the entries evenly.
        let right = self.free_id(idb);
        if let Some(d) = right.disk {
            self.pending_free.push(d.addr);
        }
        self.node_count -= 1;
        let left = &mut self.nodes[ida];
        match (&mut left.body, right.body) {
            (Body::Leaf(l), Body::Leaf(r)) => l.append(r),
            (Body::Interior(l), Body::Interior(r)) => l.extend(r),
            _ => return Err(internal("merging nodes of different kinds")),
        }
        left.hi = right.hi;
        left.dirty = true;
        left.rewrite = true;
        left.changed = Vec::new();
        let Body::Interior(children) = &mut self.nodes[parent].body else {
            return Err(internal("merge under a leaf"));
        };
        children[a].hi = children[b].hi;
        children.remove(b);
        self.nodes[parent].dirty = true;
        if level > 0 && la > 0 && lb > 0 {
            // The seam between the two child lists may hold an underfull child that had no
            // sibling before (an emptied only child): merge it with its new neighbour now.
            for seam in [la, la - 1] {
                if seam < self.nodes[ida].len() && self.nodes[ida].len() > 1 {
                    let c = self.child_id(ida, seam)?;
                    if self.is_under(c) {
                        self.merge_child(ida, seam)?;
                        break;
                    }
                }
            }
        }
        if self.nodes[ida].len() > cap {
            self.split_child(parent, a)?;
        }
        Ok(())
    }

    fn grow_root(&mut self) -> Result<(), BtreeError> {
        let old = self.root;
        let level = self.nodes[old].level;
        if usize::from(level) + 1 >= MAX_DEPTH {
            return Err(BtreeError::corrupted(
                CorruptionKind::TooDeep,
                None,
                "tree would exceed the maximum depth",
            ));
        }
        let ptr = self.nodes[old].disk.map(|d| d.ptr());
        let root = MemNode::new(
            level + 1,
            Pos::MIN,
            Pos::MAX,
            Body::Interior(vec![Child { hi: Pos::MAX, ptr, mem: Some(old) }]),
        );
        self.root = self.alloc_id(root);
        self.node_count += 1;
        self.split_child(self.root, 0)
    }

    fn shrink_root(&mut self) -> Result<(), BtreeError> {
        while self.nodes[self.root].level > 0 && self.nodes[self.root].len() == 1 {
            let child = self.child_id(self.root, 0)?;
            let old = self.free_id(self.root);
            if let Some(d) = old.disk {
                self.pending_free.push(d.addr);
            }
            self.node_count -= 1;
            self.root = child;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- public operations

    fn validate_key(key: &Key) -> Result<(), BtreeError> {
        key.validate().map_err(|why| BtreeError::Invalid(format!("{why}: {key}")))
    }

    /// Inserts `key` with overwrite semantics: every part of an older key overlapping it is cut
    /// off (front, back, or split around it) and reported in the outcome.
    pub fn insert(&mut self, key: Key) -> Result<InsertOutcome, BtreeError> {
        let mut out = InsertOutcome::default();
        self.insert_into(key, &mut out.displaced)?;
        Ok(out)
    }

    /// [`Tree::insert`] appending the displaced pieces to a caller's buffer (no allocation when it
    /// has room).
    pub fn insert_into(&mut self, key: Key, displaced: &mut Vec<Key>) -> Result<(), BtreeError> {
        self.check_poisoned()?;
        Self::validate_key(&key)?;
        let r = self.insert_impl(key, displaced);
        self.poison_on_err(r)?;
        self.maybe_evict();
        Ok(())
    }

    /// Inserts the parts of `key` whose sectors are currently in the state `expected` describes:
    /// `None`, not cached; `Some(k)`, mapped by (a piece of) `k` (same device, generation,
    /// dirtiness, and pointer shifted consistently). Other sectors are collisions, not errors.
    pub fn replace(&mut self, key: Key, expected: Option<&Key>) -> Result<ReplaceOutcome, BtreeError> {
        self.check_poisoned()?;
        Self::validate_key(&key)?;
        if let Some(e) = expected {
            Self::validate_key(e)?;
        }
        let mut segments = Vec::new();
        self.lookup_into(key.dev, key.start(), key.end, &mut segments)?;
        let mut out = ReplaceOutcome::default();
        let matches = |seg: &Segment| match (seg, expected) {
            (Segment::Hole { .. }, None) => true,
            (Segment::Cached(cur), Some(e)) => {
                cur.same_mapping(e) && e.start() <= cur.start() && cur.end <= e.end
            }
            _ => false,
        };
        let mut run: Option<(u64, u64)> = None;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for seg in &segments {
            if matches(seg) {
                run = match run {
                    Some((s, e)) if e == seg.start() => Some((s, seg.end())),
                    Some(r) => {
                        runs.push(r);
                        Some((seg.start(), seg.end()))
                    }
                    None => Some((seg.start(), seg.end())),
                };
            } else {
                out.collision_sectors += seg.end() - seg.start();
            }
        }
        runs.extend(run);
        for (s, e) in runs {
            let r = self.insert_impl(key.slice(s, e), &mut out.displaced);
            self.poison_on_err(r)?;
            out.inserted_sectors += e - s;
        }
        self.maybe_evict();
        Ok(out)
    }

    /// Removes every key piece in `[start, end)` of `dev`; reports the removed pieces.
    pub fn invalidate(&mut self, dev: u32, start: u64, end: u64) -> Result<InsertOutcome, BtreeError> {
        self.check_poisoned()?;
        let mut out = InsertOutcome::default();
        if start >= end {
            return Ok(out);
        }
        let r = self.cut(dev, start, end, &mut out.displaced);
        self.poison_on_err(r)?;
        self.maybe_evict();
        Ok(out)
    }

    /// The read mapping of `[start, end)` of `dev`: contiguous segments covering exactly the
    /// range, each cached (the key trimmed to the segment) or a hole.
    pub fn lookup(&mut self, dev: u32, start: u64, end: u64) -> Result<Vec<Segment>, BtreeError> {
        let mut out = Vec::new();
        self.lookup_into(dev, start, end, &mut out)?;
        Ok(out)
    }

    /// [`Tree::lookup`] into a caller's buffer (cleared first).
    pub fn lookup_into(
        &mut self,
        dev: u32,
        start: u64,
        end: u64,
        out: &mut Vec<Segment>,
    ) -> Result<(), BtreeError> {
        out.clear();
        if start >= end {
            return Ok(());
        }
        let stop = Pos { dev, sector: end };
        let mut covered = start;
        let mut search = Pos { dev, sector: start };
        let mut walk = CheckedWalk::default();
        'leaves: loop {
            let leaf = self.descend_gt_leaf(search)?;
            let node = &self.nodes[leaf];
            let mut steps = walk.enter(node, search)?;
            while let Some(k) = steps.next()? {
                if k.dev != dev || k.start() >= end {
                    break 'leaves;
                }
                if k.start() > covered {
                    out.push(Segment::Hole { start: covered, end: k.start() });
                }
                let b = k.end.min(end);
                out.push(Segment::Cached(k.slice(k.start().max(covered), b)));
                covered = b;
                if covered >= end {
                    break 'leaves;
                }
            }
            if node.hi >= stop {
                break;
            }
            search = node.hi;
            self.maybe_evict();
        }
        if covered < end {
            out.push(Segment::Hole { start: covered, end });
        }
        self.maybe_evict();
        Ok(())
    }

    /// Ordered scan: appends to `out` up to `max` keys sorting after `from` (keys whose end is
    /// past `from.sector` on `from.dev`, then later devices) that `filter` accepts. Returns the
    /// position to continue from, or `None` at the end of the tree. Every step checks that the
    /// key sorts strictly after the previous one ("key skipped backwards").
    pub fn scan(
        &mut self,
        from: Pos,
        filter: &dyn Fn(&Key) -> bool,
        max: usize,
        out: &mut Vec<Key>,
    ) -> Result<Option<Pos>, BtreeError> {
        if max == 0 {
            return Ok(Some(from));
        }
        let mut taken = 0;
        let mut search = from;
        let mut walk = CheckedWalk::default();
        let resume = 'leaves: loop {
            if search == Pos::MAX {
                break None;
            }
            let leaf = self.descend_gt_leaf(search)?;
            let node = &self.nodes[leaf];
            let mut steps = walk.enter(node, search)?;
            while let Some(k) = steps.next()? {
                if filter(&k) {
                    out.push(k);
                    taken += 1;
                    if taken >= max {
                        break 'leaves Some(k.pos());
                    }
                }
            }
            search = node.hi;
            self.maybe_evict();
        };
        self.maybe_evict();
        Ok(resume)
    }

    // ---------------------------------------------------------------- persistence

    /// Makes every change since the last flush persistent without overwriting any byte a
    /// previously returned root covers, and returns the new root and the slots no longer used.
    /// The caller syncs the store, records the root durably, and only then reuses `freed`.
    pub fn flush(&mut self) -> Result<Checkpoint, BtreeError> {
        self.check_poisoned()?;
        let r = self.flush_node(self.root, 0);
        let root = self.poison_on_err(r)?;
        self.last_root = Some(root);
        // Every cached node is clean now: eviction may make progress again.
        self.evict_retry_at = 0;
        let freed = std::mem::take(&mut self.pending_free);
        self.maybe_evict();
        Ok(Checkpoint { root, freed })
    }

    fn flush_node(&mut self, id: NodeId, depth: usize) -> Result<NodePtr, BtreeError> {
        if depth >= MAX_DEPTH {
            return Err(BtreeError::corrupted(
                CorruptionKind::TooDeep,
                None,
                "flush deeper than the maximum depth",
            ));
        }
        let n = match &self.nodes[id].body {
            Body::Interior(c) => c.len(),
            Body::Leaf(_) => 0,
        };
        for i in 0..n {
            let Body::Interior(children) = &self.nodes[id].body else { break };
            let Some(cid) = children[i].mem else { continue };
            // Children first: a parent's pointer must describe what is already written.
            let p = self.flush_node(cid, depth + 1)?;
            let node = &mut self.nodes[id];
            if let Body::Interior(children) = &mut node.body {
                if children[i].ptr != Some(p) {
                    children[i].ptr = Some(p);
                    node.dirty = true;
                }
            }
        }
        let node = &self.nodes[id];
        if !node.dirty {
            if let Some(d) = node.disk {
                return Ok(d.ptr());
            }
        }
        self.write_node(id)
    }

    /// Builds the delta bset of a leaf: for every changed range (extended to whole current keys),
    /// the current keys and whiteouts for the gaps, so that applying it newest-wins to the last
    /// written version yields the current content.
    fn build_delta(&mut self, id: NodeId, out: &mut Vec<LeafEntry>) {
        out.clear();
        let node = &mut self.nodes[id];
        let Body::Leaf(keys) = &node.body else { return };
        let ranges = &mut node.changed;
        ranges.sort_unstable();
        coalesce(ranges);
        for r in ranges.iter_mut() {
            let (dev, a, b) = *r;
            if let Some(k) = keys.iter_after(Pos { dev, sector: a }).next() {
                if k.dev == dev && k.start() < a {
                    r.1 = k.start();
                }
            }
            if let Some(k) = keys.iter_after(Pos { dev, sector: b }).next() {
                if k.dev == dev && k.start() < b {
                    r.2 = k.end;
                }
            }
        }
        coalesce(ranges);
        for &(dev, a, b) in ranges.iter() {
            let mut cur = a;
            for k in keys.iter_after(Pos { dev, sector: a }) {
                if k.dev != dev || k.start() >= b {
                    break;
                }
                push_whiteouts(out, dev, cur, k.start());
                out.push(LeafEntry { key: k, whiteout: false });
                cur = k.end;
            }
            push_whiteouts(out, dev, cur, b);
        }
    }

    fn check_mem_leaf(&self, id: NodeId) -> Result<(), BtreeError> {
        let node = &self.nodes[id];
        let Body::Leaf(keys) = &node.body else { return Ok(()) };
        let mut prev: Option<Key> = None;
        for k in keys.iter() {
            if let Err((kind, why)) = check_step(prev.as_ref(), &k, node.lo, node.hi) {
                let prev = prev.map_or_else(|| "(none)".to_string(), |p| p.to_string());
                return Err(BtreeError::corrupted(
                    kind,
                    node.disk.map(|d| d.addr),
                    format!(
                        "{why}; refusing to write the node (range [{}, {}]):\n  previous: {prev}\n  this:     {k}",
                        node.lo, node.hi
                    ),
                ));
            }
            prev = Some(k);
        }
        Ok(())
    }

    fn child_entries(&self, id: NodeId) -> Result<Vec<ChildEntry>, BtreeError> {
        let Body::Interior(children) = &self.nodes[id].body else {
            return Err(internal("child entries of a leaf"));
        };
        children
            .iter()
            .map(|c| {
                Ok(ChildEntry { hi: c.hi, ptr: c.ptr.ok_or_else(|| internal("unwritten child at flush"))? })
            })
            .collect()
    }

    /// Writes node `id`: appends a bset when it has a slot with room, else writes it whole into a
    /// fresh slot (copy-on-write; the old slot is freed at the next checkpoint). The node is
    /// checked before anything is written.
    fn write_node(&mut self, id: NodeId) -> Result<NodePtr, BtreeError> {
        self.check_mem_leaf(id)?;
        let (level, lo, hi, disk, rewrite) = {
            let n = &self.nodes[id];
            (n.level, n.lo, n.hi, n.disk, n.rewrite)
        };
        let mut buf = std::mem::take(&mut self.scratch);
        let r = self.write_node_with(id, level, lo, hi, disk, rewrite, &mut buf);
        self.scratch = buf;
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn write_node_with(
        &mut self,
        id: NodeId,
        level: u8,
        lo: Pos,
        hi: Pos,
        disk: Option<DiskState>,
        rewrite: bool,
        buf: &mut Vec<u8>,
    ) -> Result<NodePtr, BtreeError> {
        buf.clear();
        if let (Some(d), false) = (disk, rewrite) {
            if level == 0 {
                let mut entries = std::mem::take(&mut self.scratch_entries);
                self.build_delta(id, &mut entries);
                let r = format::encode_leaf_bset(d.bsets, &entries, lo, hi, Some(d.addr), buf);
                self.scratch_entries = entries;
                r?;
            } else {
                let children = self.child_entries(id)?;
                format::encode_interior_bset(d.bsets, &children, lo, hi, self.node_size, Some(d.addr), buf)?;
            }
            format::pad_to(buf, d.align);
            if d.len + buf.len() <= self.node_size {
                // Append: only bytes past what every earlier pointer covers are written.
                self.store.write(d.addr, d.len, buf)?;
                let nd = DiskState {
                    len: d.len + buf.len(),
                    csum: crc32c::crc32c_append(d.csum, buf),
                    bsets: d.bsets + 1,
                    ..d
                };
                let node = &mut self.nodes[id];
                node.disk = Some(nd);
                node.dirty = false;
                node.changed.clear();
                return Ok(nd.ptr());
            }
            buf.clear();
        }
        // Copy-on-write into a fresh slot.
        let addr = self.store.alloc()?;
        let seq = self.next_seq;
        self.next_seq += 1;
        let header = NodeHeader { level, align_shift: self.align_shift, addr, seq, lo, hi };
        let encoded = if level == 0 {
            let mut keys = std::mem::take(&mut self.scratch_keys);
            keys.clear();
            if let Body::Leaf(leaf) = &self.nodes[id].body {
                keys.extend(leaf.iter());
            }
            let r = format::encode_leaf_node(&header, &keys, self.node_size, buf);
            self.scratch_keys = keys;
            r
        } else {
            self.child_entries(id)
                .and_then(|c| format::encode_interior_node(&header, &c, self.node_size, buf))
        };
        let ptr = match encoded
            .and_then(|p| self.store.write(addr, 0, buf).map(|()| p).map_err(BtreeError::from))
        {
            Ok(p) => p,
            Err(e) => {
                // The fresh slot is used by nobody; hand it back with the next checkpoint.
                self.pending_free.push(addr);
                return Err(e);
            }
        };
        let node = &mut self.nodes[id];
        if let Some(old) = node.disk {
            self.pending_free.push(old.addr);
        }
        node.disk = Some(DiskState {
            addr,
            seq,
            len: ptr.len as usize,
            csum: ptr.csum,
            bsets: 1,
            align: header.align(),
        });
        node.dirty = false;
        node.rewrite = false;
        node.changed = Vec::new();
        Ok(ptr)
    }

    fn maybe_evict(&mut self) {
        if self.cached <= self.cfg.max_cached_nodes.max(self.evict_retry_at) {
            return;
        }
        let target = self.cfg.max_cached_nodes * 3 / 4;
        for _ in 0..3 {
            self.evict_pass(self.root, 0, target);
            if self.cached <= target {
                self.evict_retry_at = 0;
                return;
            }
        }
        // Mostly dirty nodes (nothing to evict until the next flush): do not walk the whole cache
        // again on every operation, only after it grew by another eighth.
        self.evict_retry_at = self.cached + (self.cfg.max_cached_nodes / 8).max(16);
    }

    /// Drops clean, childless cached nodes below `id` (second chance: a referenced node is only
    /// unmarked), until `target` nodes remain.
    fn evict_pass(&mut self, id: NodeId, depth: usize, target: usize) {
        if depth >= MAX_DEPTH {
            return;
        }
        let n = match &self.nodes[id].body {
            Body::Interior(c) => c.len(),
            Body::Leaf(_) => return,
        };
        for i in 0..n {
            if self.cached <= target {
                return;
            }
            let Body::Interior(children) = &self.nodes[id].body else { return };
            let Some(cid) = children[i].mem else { continue };
            let ptr = children[i].ptr;
            self.evict_pass(cid, depth + 1, target);
            let c = &mut self.nodes[cid];
            let clean = !c.dirty && c.disk.is_some_and(|d| Some(d.ptr()) == ptr) && !c.has_cached_children();
            if !clean {
                continue;
            }
            if c.referenced {
                c.referenced = false;
                continue;
            }
            self.free_id(cid);
            if let Body::Interior(children) = &mut self.nodes[id].body {
                children[i].mem = None;
            }
        }
    }

    // ---------------------------------------------------------------- walks

    /// Walks the on-disk subtree under `ptr`, verifying every node, accumulating `stats`.
    fn walk_disk(
        &mut self,
        ptr: &NodePtr,
        level: Option<u8>,
        lo: Pos,
        hi: Pos,
        depth: usize,
        stats: &mut WalkStats,
    ) -> Result<(), BtreeError> {
        if depth >= MAX_DEPTH {
            return Err(BtreeError::corrupted(
                CorruptionKind::TooDeep,
                Some(ptr.addr),
                "tree deeper than the maximum depth",
            ));
        }
        let node = self.load_node(ptr, level, lo, hi)?;
        stats.nodes += 1;
        stats.max_seq = stats.max_seq.max(ptr.seq);
        stats.addrs.push(ptr.addr);
        match node.body {
            Body::Leaf(keys) => {
                for k in keys.iter() {
                    if let Some(prev) = stats.last_key {
                        if k.pos() <= prev.pos() || (k.dev == prev.dev && k.start() < prev.end) {
                            return Err(iter_error(
                                CorruptionKind::KeysOutOfOrder,
                                "tree order broken",
                                Some(ptr.addr),
                                Some(&prev),
                                &k,
                                lo,
                                hi,
                            ));
                        }
                    }
                    stats.last_key = Some(k);
                    stats.keys += 1;
                    if k.dirty {
                        stats.dirty_sectors += u64::from(k.size);
                        *stats.dirty_by_dev.entry(k.dev).or_insert(0) += u64::from(k.size);
                    }
                }
            }
            Body::Interior(children) => {
                let mut clo = lo;
                for c in &children {
                    if let Some(p) = c.ptr {
                        self.walk_disk(&p, Some(node.level - 1), clo, c.hi, depth + 1, stats)?;
                    }
                    clo = c.hi;
                }
            }
        }
        Ok(())
    }

    /// Walks the whole tree and verifies every invariant, returning all problems found. Cached
    /// nodes with unflushed changes are checked in memory; every other node is read from the
    /// store and verified (checksums, pointer, order, ranges, levels), and for clean cached nodes
    /// the stored image must equal the cached copy. Whole-tree order and the key/dirty counts are
    /// cross-checked too.
    pub fn check(&mut self) -> Result<Vec<Problem>, BtreeError> {
        let mut problems = Vec::new();
        let mut walk = WalkStats::default();
        self.check_mem(self.root, 0, Pos::MIN, Pos::MAX, None, &mut walk, &mut problems);
        if problems.is_empty()
            && (walk.keys != self.keys
                || walk.dirty_sectors != self.dirty_sectors
                || walk.dirty_by_dev != self.dirty_by_dev)
        {
            problems.push(Problem {
                addr: None,
                kind: None,
                detail: format!(
                    "accounting: walked {} keys / {} dirty sectors, counters say {} / {}",
                    walk.keys, walk.dirty_sectors, self.keys, self.dirty_sectors
                ),
            });
        }
        Ok(problems)
    }

    #[allow(clippy::too_many_arguments)]
    fn check_mem(
        &mut self,
        id: NodeId,
        depth: usize,
        lo: Pos,
        hi: Pos,
        level: Option<u8>,
        walk: &mut WalkStats,
        problems: &mut Vec<Problem>,
    ) {
        let (nlo, nhi, nlevel, disk, dirty) = {
            let n = &self.nodes[id];
            (n.lo, n.hi, n.level, n.disk, n.dirty)
        };
        let addr = disk.map(|d| d.addr);
        if depth >= MAX_DEPTH {
            problems.push(Problem {
                addr,
                kind: Some(CorruptionKind::TooDeep),
                detail: "cached tree too deep".into(),
            });
            return;
        }
        if nlo != lo || nhi != hi || level.is_some_and(|l| l != nlevel) {
            problems.push(Problem {
                addr,
                kind: Some(CorruptionKind::OutOfNodeRange),
                detail: format!("cached node covers [{nlo}, {nhi}] level {nlevel}, parent gives [{lo}, {hi}] level {level:?}"),
            });
        }
        if let (Some(d), false) = (disk, dirty) {
            // The stored version must be readable and equal to the cached copy.
            match self.read_decoded(&d.ptr()) {
                Err(e) => problems.push(Problem::from_error(addr, &e)),
                Ok(dec) => {
                    let same = match (&dec.body, &self.nodes[id].body) {
                        (DecodedBody::Leaf(keys), Body::Leaf(leaf)) => {
                            keys.len() == leaf.len() && keys.iter().zip(leaf.iter()).all(|(k, m)| *k == m)
                        }
                        (DecodedBody::Interior(ce), Body::Interior(ch)) => {
                            ce.len() == ch.len()
                                && ce.iter().zip(ch).all(|(e, c)| e.hi == c.hi && Some(e.ptr) == c.ptr)
                        }
                        _ => false,
                    };
                    if !same {
                        problems.push(Problem {
                            addr,
                            kind: Some(CorruptionKind::StaleNode),
                            detail: format!(
                                "stored node differs from the cached clean copy: stored {:?}",
                                dec.body
                            ),
                        });
                    }
                }
            }
        }
        match &self.nodes[id].body {
            Body::Leaf(leaf) => {
                let keys: Vec<Key> = leaf.iter().collect();
                check_keys_into(&keys, nlo, nhi, addr, walk, problems);
            }
            Body::Interior(children) => {
                let entries: Vec<(Pos, Option<NodePtr>, Option<NodeId>)> =
                    children.iter().map(|c| (c.hi, c.ptr, c.mem)).collect();
                let mut clo = nlo;
                for (i, (chi, cptr, cmem)) in entries.iter().enumerate() {
                    if *chi <= clo || *chi > nhi || (i + 1 == entries.len() && *chi != nhi) {
                        problems.push(Problem {
                            addr,
                            kind: Some(CorruptionKind::OutOfNodeRange),
                            detail: format!("child {i} bound {chi} does not fit [{clo}, {nhi}]"),
                        });
                    }
                    match (cmem, cptr) {
                        (Some(c), _) => {
                            self.check_mem(*c, depth + 1, clo, *chi, nlevel.checked_sub(1), walk, problems);
                        }
                        (None, Some(p)) => {
                            self.check_disk(p, depth + 1, clo, *chi, nlevel.checked_sub(1), walk, problems);
                        }
                        (None, None) => problems.push(Problem {
                            addr,
                            kind: Some(CorruptionKind::BadLevel),
                            detail: format!("child {i} has neither pointer nor cached node"),
                        }),
                    }
                    clo = *chi;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_disk(
        &mut self,
        ptr: &NodePtr,
        depth: usize,
        lo: Pos,
        hi: Pos,
        level: Option<u8>,
        walk: &mut WalkStats,
        problems: &mut Vec<Problem>,
    ) {
        if depth >= MAX_DEPTH {
            problems.push(Problem {
                addr: Some(ptr.addr),
                kind: Some(CorruptionKind::TooDeep),
                detail: "tree too deep".into(),
            });
            return;
        }
        let node = match self.load_node(ptr, level, lo, hi) {
            Ok(n) => n,
            Err(e) => {
                problems.push(Problem::from_error(Some(ptr.addr), &e));
                return;
            }
        };
        match node.body {
            Body::Leaf(leaf) => {
                let keys: Vec<Key> = leaf.iter().collect();
                check_keys_into(&keys, lo, hi, Some(ptr.addr), walk, problems);
            }
            Body::Interior(children) => {
                let mut clo = lo;
                for c in &children {
                    if let Some(p) = c.ptr {
                        self.check_disk(&p, depth + 1, clo, c.hi, node.level.checked_sub(1), walk, problems);
                    }
                    clo = c.hi;
                }
            }
        }
    }

    /// Addresses of every node slot the current tree uses (cached nodes that have a slot, and
    /// every stored node below them).
    pub fn node_addrs(&mut self) -> Result<Vec<NodeAddr>, BtreeError> {
        let mut out = Vec::new();
        let mut stack = vec![(self.root, 0usize)];
        while let Some((id, depth)) = stack.pop() {
            if depth >= MAX_DEPTH {
                return Err(BtreeError::corrupted(CorruptionKind::TooDeep, None, "cached tree too deep"));
            }
            let n = &self.nodes[id];
            if let Some(d) = n.disk {
                out.push(d.addr);
            }
            if let Body::Interior(children) = &n.body {
                let (lo, level) = (n.lo, n.level);
                let list: Vec<_> = children.iter().map(|c| (c.hi, c.ptr, c.mem)).collect();
                let mut clo = lo;
                for (chi, cptr, cmem) in list {
                    match (cmem, cptr) {
                        (Some(c), _) => stack.push((c, depth + 1)),
                        (None, Some(p)) => {
                            let mut stats = WalkStats::default();
                            self.walk_disk(&p, Some(level - 1), clo, chi, depth + 1, &mut stats)?;
                            out.extend(stats.addrs);
                        }
                        (None, None) => return Err(internal("child with neither pointer nor cached node")),
                    }
                    clo = chi;
                }
            }
        }
        Ok(out)
    }

    /// Counters of the tree.
    pub fn stats(&self) -> TreeStats {
        let mut leaf_bytes = 0usize;
        let mut cached_children = 0usize;
        let mut depth = 1;
        let mut seen = vec![false; self.nodes.len()];
        for id in &self.free_ids {
            seen[*id] = true;
        }
        for (id, n) in self.nodes.iter().enumerate() {
            if seen[id] {
                continue;
            }
            match &n.body {
                Body::Leaf(m) => leaf_bytes += m.heap_bytes(),
                Body::Interior(c) => cached_children += c.len(),
            }
            depth = depth.max(u32::from(n.level) + 1);
        }
        TreeStats {
            keys: self.keys,
            nodes: self.node_count,
            depth: u32::from(self.nodes[self.root].level) + 1,
            cached_nodes: self.cached,
            cached_bytes: leaf_bytes
                + cached_children * std::mem::size_of::<Child>()
                + self.cached * std::mem::size_of::<MemNode>(),
            dirty_sectors: self.dirty_sectors,
            dirty_sectors_by_dev: self.dirty_by_dev.clone(),
        }
    }

    /// Test hook: puts `key` straight into the leaf that holds positions just after `descent`,
    /// bypassing every check, to simulate in-memory corruption.
    #[cfg(test)]
    pub(crate) fn debug_insert_raw(&mut self, descent: Pos, key: Key) -> Result<(), BtreeError> {
        let path = self.descend_gt(descent)?;
        let leaf = path.leaf();
        if let Body::Leaf(keys) = &mut self.nodes[leaf].body {
            keys.insert(&key);
        }
        self.nodes[leaf].dirty = true;
        self.nodes[leaf].rewrite = true;
        Ok(())
    }
}

/// Typical heap bytes per cached key of a leaf after random inserts: a block slot is 28 bytes
/// (u32 dev, u64 sector, 16-byte value) and blocks are about 2/3 full. [`TreeStats::cached_bytes`]
/// counts the real block sizes; this is for callers that size a node cache from a key count.
pub const BYTES_PER_CACHED_KEY: usize = 44;

fn check_keys_into(
    keys: &[Key],
    lo: Pos,
    hi: Pos,
    addr: Option<NodeAddr>,
    walk: &mut WalkStats,
    problems: &mut Vec<Problem>,
) {
    if let Err(e) = format::check_leaf_keys(keys, lo, hi, addr) {
        problems.push(Problem::from_error(addr, &e));
    }
    for (i, k) in keys.iter().enumerate() {
        if let Some(prev) = walk.last_key {
            if k.pos() <= prev.pos() || (k.dev == prev.dev && k.start() < prev.end) {
                problems.push(Problem {
                    addr,
                    kind: Some(CorruptionKind::KeySkippedBackwards),
                    detail: format!("whole-tree order broken after {prev}:{}", dump_neighbours(keys, i)),
                });
            }
        }
        walk.last_key = Some(*k);
        walk.keys += 1;
        if k.dirty {
            walk.dirty_sectors += u64::from(k.size);
            *walk.dirty_by_dev.entry(k.dev).or_insert(0) += u64::from(k.size);
        }
    }
}

#[derive(Default)]
struct WalkStats {
    keys: u64,
    nodes: u64,
    max_seq: u64,
    dirty_sectors: u64,
    dirty_by_dev: BTreeMap<u32, u64>,
    last_key: Option<Key>,
    addrs: Vec<NodeAddr>,
}

/// Merges overlapping or adjacent ranges of a sorted list in place.
fn coalesce(ranges: &mut Vec<(u32, u64, u64)>) {
    let mut w = 0;
    for r in 0..ranges.len() {
        let cur = ranges[r];
        if w > 0 && ranges[w - 1].0 == cur.0 && ranges[w - 1].2 >= cur.1 {
            ranges[w - 1].2 = ranges[w - 1].2.max(cur.2);
        } else {
            ranges[w] = cur;
            w += 1;
        }
    }
    ranges.truncate(w);
}

fn push_whiteouts(out: &mut Vec<LeafEntry>, dev: u32, mut start: u64, end: u64) {
    while start < end {
        let size = (end - start).min(u64::from(u32::MAX));
        out.push(LeafEntry {
            key: Key { dev, end: start + size, size: size as u32, ptr: Ptr::default(), dirty: false },
            whiteout: true,
        });
        start += size;
    }
}
