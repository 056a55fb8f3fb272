//! Walks that verify: the on-disk walk used by open, `check`, and `node_addrs`.

use super::{Body, NodeId, Tree, internal, iter_error};
use crate::NodeAddr;
use crate::error::{BtreeError, CorruptionKind, Problem};
use crate::format::{self, DecodedBody, MAX_DEPTH, NodePtr, dump_neighbours};
use crate::key::{Key, Pos};
use crate::store::NodeStore;
use std::collections::BTreeMap;

impl<S: NodeStore> Tree<S> {
    // ---------------------------------------------------------------- walks

    /// Walks the on-disk subtree under `ptr`, verifying every node, accumulating `stats`.
    pub(super) fn walk_disk(
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
    /// nodes with changes not yet written out are checked in memory; every other node is read from the
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
}

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
pub(super) struct WalkStats {
    pub(super) keys: u64,
    pub(super) nodes: u64,
    pub(super) max_seq: u64,
    pub(super) dirty_sectors: u64,
    pub(super) dirty_by_dev: BTreeMap<u32, u64>,
    last_key: Option<Key>,
    addrs: Vec<NodeAddr>,
}
