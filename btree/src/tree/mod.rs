//! The tree: in-memory node cache, descent, insert with overlap fixup, replace, invalidate,
//! lookup, scan, node write-out (copy-on-write / append persistence), check.
//!
//! This file holds the types, open/create and the read paths (lookup, scan, stats); the node
//! cache and descent are in `cache.rs`, changes in `mutate.rs`, node write-out in `persist.rs` and the
//! verifying walks (open, check) in `verify.rs`.

mod cache;
mod mutate;
mod persist;
mod verify;

use crate::NodeAddr;
use crate::error::{BtreeError, CorruptionKind};
use crate::format::{self, LeafEntry, MAX_DEPTH, NodePtr, check_step};
use crate::key::{Key, Pos, Segment};
use crate::leaf::{Leaf, Loc};
use crate::store::NodeStore;
use std::collections::BTreeMap;
use verify::WalkStats;

type NodeId = usize;

/// Tuning knobs that are not part of the on-disk format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeConfig {
    /// Upper bound on nodes kept in memory. Clean nodes are evicted (second-chance) above it;
    /// dirty nodes stay until the next [`Tree::write_out`], so write out regularly.
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

/// What [`Tree::write_out`] returns: the new root to record durably, and the slots the new tree no
/// longer uses (reusable only once the new root is durable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Pointer to the root of the written-out tree.
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
    /// The child's last written-out version (None: never written out, then `mem` is set).
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
    /// Sector ranges changed since the last write (leaves), from which `write_out` builds the
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

    /// A new empty tree. Nothing is written until [`Tree::write_out`].
    pub fn create(store: S, cfg: TreeConfig) -> Result<Self, BtreeError> {
        let root = MemNode::new(0, Pos::MIN, Pos::MAX, Body::Leaf(Leaf::new()));
        Tree::with_root(store, cfg, root)
    }

    /// Opens the tree whose root a previous [`Tree::write_out`] returned. Walks and verifies every
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

    /// The root of the last checkpoint (from `open` or `write_out`).
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
}

/// Typical heap bytes per cached key of a leaf after random inserts: a block slot is 28 bytes
/// (u32 dev, u64 sector, 16-byte value) and blocks are about 2/3 full. [`TreeStats::cached_bytes`]
/// counts the real block sizes; this is for callers that size a node cache from a key count.
pub const BYTES_PER_CACHED_KEY: usize = 44;
