//! Changes to the tree: leaf edits with overlap fixup, split/merge/grow/shrink, and the public
//! insert, replace and invalidate.

use super::{
    Body, Child, InsertOutcome, MemNode, NodeId, Path, ReplaceOutcome, Tree, check_iter_step, internal,
};
use crate::error::{BtreeError, CorruptionKind};
use crate::format::MAX_DEPTH;
use crate::key::{Key, Pos, Segment};
use crate::store::NodeStore;

impl<S: NodeStore> Tree<S> {
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
