//! Persistence: node write-out ([`Tree::write_out`]) writes dirty nodes copy-on-write or as
//! appended bsets.

use super::{Body, Checkpoint, DiskState, NodeId, Tree, internal};
use crate::error::{BtreeError, CorruptionKind};
use crate::format::{self, ChildEntry, LeafEntry, MAX_DEPTH, NodeHeader, NodePtr, check_step};
use crate::key::{Key, Pos, Ptr};
use crate::store::NodeStore;

impl<S: NodeStore> Tree<S> {
    // ---------------------------------------------------------------- persistence

    /// Node write-out: makes every change since the last write-out persistent without overwriting any byte a
    /// previously returned root covers, and returns the new root and the slots no longer used.
    /// The caller syncs the store, records the root durably, and only then reuses `freed`.
    pub fn write_out(&mut self) -> Result<Checkpoint, BtreeError> {
        self.check_poisoned()?;
        let r = self.write_out_node(self.root, 0);
        let root = self.poison_on_err(r)?;
        self.last_root = Some(root);
        // Every cached node is clean now: eviction may make progress again.
        self.evict_retry_at = 0;
        let freed = std::mem::take(&mut self.pending_free);
        self.maybe_evict();
        Ok(Checkpoint { root, freed })
    }

    fn write_out_node(&mut self, id: NodeId, depth: usize) -> Result<NodePtr, BtreeError> {
        if depth >= MAX_DEPTH {
            return Err(BtreeError::corrupted(
                CorruptionKind::TooDeep,
                None,
                "write-out deeper than the maximum depth",
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
            let p = self.write_out_node(cid, depth + 1)?;
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
                Ok(ChildEntry {
                    hi: c.hi,
                    ptr: c.ptr.ok_or_else(|| internal("unwritten child at write-out"))?,
                })
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
