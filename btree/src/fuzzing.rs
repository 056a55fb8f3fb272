//! The checks shared by the cargo-fuzz targets `fuzz/fuzz_targets/btree_node_decode.rs` and
//! `fuzz/fuzz_targets/btree_tree_open.rs`, the corpus replay test of the root crate
//! (`tests/fuzz/corpus.rs`) and the bounded batches of the btree tests: decoding any bytes as a
//! node returns an error or a node that satisfies every invariant, and opening any tree of
//! individually valid nodes returns an error or a tree that checks clean, never a panic.

use crate::format::{self, ChildEntry, LeafEntry, MAX_DEPTH, NodeHeader, NodePtr};
use crate::key::{Key, Pos, Ptr};
use crate::store::{MemStore, NodeStore};
use crate::tree::{Tree, TreeConfig};

/// The node size the fuzz inputs are decoded with (inputs are cut to it).
pub const FUZZ_NODE_SIZE: usize = 64 * 1024;

/// Decodes `data` (cut to [`FUZZ_NODE_SIZE`]) as a node image, as it is and with its checksums
/// resealed so the checks behind them are reached. Panics only if the decoder accepts a node
/// that breaks an invariant: that is the bug the fuzzer looks for.
pub fn node_decode(data: &[u8]) {
    let data = &data[..data.len().min(FUZZ_NODE_SIZE)];
    check_image(data);
    let mut resealed = data.to_vec();
    format::reseal_checksums(&mut resealed);
    check_image(&resealed);
}

#[allow(clippy::panic)] // The fuzzer's finding, reported the only way a fuzz target can.
fn check_image(img: &[u8]) {
    if let Ok(node) = format::decode_node(img, None, FUZZ_NODE_SIZE)
        && let Err(e) = format::check_decoded(&node, FUZZ_NODE_SIZE)
    {
        panic!("decoder accepted an invalid node: {e}");
    }
    // Through a pointer that covers the image exactly (and names the address the header claims).
    if let Some(addr) = img.get(16..24).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) {
        let ptr = NodePtr {
            addr,
            seq: 0,
            len: u32::try_from(img.len()).unwrap_or(u32::MAX),
            csum: format::image_checksum(img),
        };
        let _ = format::decode_node(img, Some(&ptr), FUZZ_NODE_SIZE);
    }
}

/// The node size of the trees [`tree_open`] builds: small, so a few bytes of input make a deep
/// tree.
pub const TREE_NODE_SIZE: usize = 512;

/// The most nodes (written versions) one input builds.
const MAX_BUILT_NODES: usize = 64;

/// Builds a multi-node tree from `data` with [`build_tree`] and opens it with [`open_checked`].
/// Every node is valid on its own (checksums, order, its own range); what the input controls is
/// how they fit together: ranges against the parent's bounds, sibling overlaps, levels, shared
/// children, pointers to older versions of the same slot (self-pointers), depth.
pub fn tree_open(data: &[u8]) {
    if let Some((store, root)) = build_tree(data) {
        open_checked(store, root);
    }
}

/// Opens the tree under `root`. Panics only if `Tree::open` accepts a tree that its own `check`
/// faults or whose full scan fails: that is the bug the fuzzer looks for.
#[allow(clippy::panic)] // The fuzzer's finding, reported the only way a fuzz target can.
pub fn open_checked(store: MemStore, root: NodePtr) {
    let cfg = TreeConfig { max_cached_nodes: 2 * MAX_DEPTH, bset_align: 16 };
    let Ok(mut tree) = Tree::open(store, root, cfg) else { return };
    match tree.check() {
        Ok(problems) if problems.is_empty() => {}
        Ok(problems) => panic!("open accepted a tree that check faults: {problems:?}"),
        Err(e) => panic!("open accepted a tree that check cannot walk: {e}"),
    }
    let mut keys = Vec::new();
    if let Err(e) = tree.scan(Pos::MIN, &|_| true, usize::MAX, &mut keys) {
        panic!("open accepted a tree whose scan fails: {e}");
    }
}

/// Reads the input a byte at a time; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A position of a small key space: the two ends, or sector `8 * b` of device 1.
    fn pos(&mut self) -> Pos {
        match self.next() {
            0 => Pos::MIN,
            255 => Pos::MAX,
            b => Pos::new(1, u64::from(b) * 8),
        }
    }
}

/// One written version of a node: what a parent needs to point at it, and what an append needs.
#[derive(Clone, Copy)]
struct Built {
    header: NodeHeader,
    ptr: NodePtr,
    bsets: u32,
}

/// Builds node images into a fresh [`MemStore`] as `data` says, and returns the store and the
/// root pointer (the last version built), or `None` when the input built nothing. Each step
/// takes an opcode byte: a leaf, an interior node over earlier versions, or a bset appended to an
/// earlier node (whose new version may point at the slot's own older version). Nodes the
/// encoders refuse are skipped: only individually valid nodes reach the store.
#[must_use]
pub fn build_tree(data: &[u8]) -> Option<(MemStore, NodePtr)> {
    let mut b = Bytes(data);
    let mut store = MemStore::new(TREE_NODE_SIZE);
    let mut built: Vec<Built> = Vec::new();
    let mut seq = 1;
    while !b.is_empty() && built.len() < MAX_BUILT_NODES {
        let op = b.next() % 3;
        let made = match op {
            0 | 1 => {
                let level = if op == 0 { 0 } else { 1 + b.next() % (MAX_DEPTH as u8 - 1) };
                let (lo, hi) = (b.pos(), b.pos());
                let Ok(addr) = store.alloc() else { break };
                let header = NodeHeader { level, align_shift: 4, addr, seq, lo, hi };
                seq += 1;
                let mut buf = Vec::new();
                let ptr = if level == 0 {
                    let keys: Vec<Key> = fuzz_entries(&mut b, lo).into_iter().map(|e| e.key).collect();
                    format::encode_leaf_node(&header, &keys, TREE_NODE_SIZE, &mut buf)
                } else {
                    let children = fuzz_children(&mut b, &built, hi);
                    format::encode_interior_node(&header, &children, TREE_NODE_SIZE, &mut buf)
                };
                match ptr {
                    Ok(ptr) if store.write(addr, 0, &buf).is_ok() => Some(Built { header, ptr, bsets: 1 }),
                    _ => None,
                }
            }
            _ => {
                let Some(&old) = pick(&mut b, &built) else { continue };
                append(&mut b, &mut store, &built, old)
            }
        };
        built.extend(made);
    }
    let root = built.last()?.ptr;
    Some((store, root))
}

/// Appends one bset to the slot of `old` (leaf entries, or a complete child list that may name
/// `old` itself) and returns the new version.
fn append(b: &mut Bytes<'_>, store: &mut MemStore, built: &[Built], old: Built) -> Option<Built> {
    let h = old.header;
    let mut buf = Vec::new();
    let encoded = if h.level == 0 {
        let entries = fuzz_entries(b, h.lo);
        format::encode_leaf_bset(old.bsets, &entries, h.lo, h.hi, Some(h.addr), &mut buf)
    } else {
        let children = fuzz_children(b, built, h.hi);
        format::encode_interior_bset(old.bsets, &children, h.lo, h.hi, TREE_NODE_SIZE, Some(h.addr), &mut buf)
    };
    encoded.ok()?;
    format::pad_to(&mut buf, h.align());
    let offset = old.ptr.len as usize;
    let len = offset + buf.len();
    if len > TREE_NODE_SIZE {
        return None;
    }
    store.write(h.addr, offset, &buf).ok()?;
    let mut image = vec![0; len];
    store.read(h.addr, 0, &mut image).ok()?;
    let ptr = NodePtr { len: len as u32, csum: format::image_checksum(&image), ..old.ptr };
    Some(Built { header: h, ptr, bsets: old.bsets + 1 })
}

/// Up to four increasing leaf entries from `lo` on (some whiteouts, some dirty).
fn fuzz_entries(b: &mut Bytes<'_>, lo: Pos) -> Vec<LeafEntry> {
    let n = b.next() % 5;
    let mut sector = if lo.dev == 1 { lo.sector } else { 0 };
    let mut out = Vec::new();
    for _ in 0..n {
        let x = b.next();
        sector += u64::from(x % 4) * 8;
        let size = 8 * (1 + u32::from(x >> 6));
        let key = Key::new(1, sector, size, Ptr { offset: sector, generation: 1 }, x & 16 != 0);
        out.push(LeafEntry { key, whiteout: x & 32 != 0 });
        sector += u64::from(size);
    }
    out
}

/// Up to four children over earlier versions, the last one ending at `hi` as a parent must.
fn fuzz_children(b: &mut Bytes<'_>, built: &[Built], hi: Pos) -> Vec<ChildEntry> {
    let n = 1 + b.next() % 4;
    let mut out = Vec::new();
    for i in 0..n {
        let Some(child) = pick(b, built) else { break };
        let chi = if i + 1 == n { hi } else { b.pos() };
        out.push(ChildEntry { hi: chi, ptr: child.ptr });
    }
    if let Some(last) = out.last_mut() {
        last.hi = hi;
    }
    out
}

fn pick<'a>(b: &mut Bytes<'_>, built: &'a [Built]) -> Option<&'a Built> {
    match built.len() {
        0 => None,
        n => built.get(usize::from(b.next()) % n),
    }
}
