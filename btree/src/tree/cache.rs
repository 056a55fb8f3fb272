//! The in-memory node cache: node slots, loading children from the store, descent, eviction.

use super::{Body, Child, DiskState, MemNode, NodeId, Path, Tree, internal};
use crate::error::{BtreeError, CorruptionKind};
use crate::format::{self, DecodedBody, MAX_DEPTH, NodePtr};
use crate::key::Pos;
use crate::leaf::Leaf;
use crate::store::NodeStore;

impl<S: NodeStore> Tree<S> {
    // ---------------------------------------------------------------- node cache

    pub(super) fn alloc_id(&mut self, node: MemNode) -> NodeId {
        self.cached += 1;
        if let Some(id) = self.free_ids.pop() {
            self.nodes[id] = node;
            id
        } else {
            self.nodes.push(node);
            self.nodes.len() - 1
        }
    }

    pub(super) fn free_id(&mut self, id: NodeId) -> MemNode {
        self.cached -= 1;
        self.free_ids.push(id);
        std::mem::replace(&mut self.nodes[id], MemNode::placeholder())
    }

    /// Reads, decodes and verifies the node `ptr` points to, which must have `level` (if known)
    /// and exactly the range `[lo, hi]` its parent gives it.
    pub(super) fn load_node(
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

    pub(super) fn read_decoded(&mut self, ptr: &NodePtr) -> Result<format::DecodedNode, BtreeError> {
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
    pub(super) fn child_id(&mut self, parent: NodeId, idx: usize) -> Result<NodeId, BtreeError> {
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
    pub(super) fn descend_gt(&mut self, p: Pos) -> Result<Path, BtreeError> {
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
    pub(super) fn descend_gt_leaf(&mut self, p: Pos) -> Result<NodeId, BtreeError> {
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

    pub(super) fn maybe_evict(&mut self) {
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
        // Mostly dirty nodes (nothing to evict until the next write-out): do not walk the whole cache
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
}
