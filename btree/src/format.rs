//! The on-disk format of btree nodes. This module owns every on-disk byte of the btree; all
//! integers are little-endian.
//!
//! # A node slot
//!
//! A node lives in a fixed-size slot (the store's `node_size`). It is a header followed by a log
//! of bsets; each bset is padded with zeros to the node's alignment (`1 << align_shift` bytes,
//! typically a 512-byte sector) so that appending one never rewrites a byte an older pointer
//! covers, even on a device that writes whole sectors.
//!
//! ```text
//!  0                64          64+16+n*E   (pad)  next bset            ptr.len    node_size
//!  +----------------+-----------+----------+------+--------- ... -------+ - - - - - -+
//!  | node header    | bset hdr  | entries  | 0..0 | bset hdr | entries  |  unused /   |
//!  | (64 bytes)     | (16)      | n * E    |      |          |          |  torn tail  |
//!  +----------------+-----------+----------+------+--------- ... -------+ - - - - - -+
//! ```
//!
//! Node header (64 bytes):
//! ```text
//!  off size field
//!    0    8 magic          "UBCBTREE"
//!    8    4 version        FORMAT_VERSION
//!   12    1 level          0 = leaf; parent level = child level + 1; < MAX_DEPTH
//!   13    1 reserved       0
//!   14    2 align_shift    bsets are padded to 1 << align_shift bytes (3..=20)
//!   16    8 addr           the node's own address (catches misdirected writes)
//!   24    8 seq            incarnation: a fresh number each time a slot is (re)written from 0
//!   32    4 lo.dev         low bound of the node's range (inclusive for a key's first sector)
//!   36    8 lo.sector
//!   44    4 hi.dev         high bound of the node's range (inclusive for a key's end)
//!   48    8 hi.sector
//!   56    4 reserved       0
//!   60    4 crc32c         of bytes 0..60
//! ```
//!
//! A key `k` lies in a node of range `(lo, hi)` iff `lo <= (k.dev, k.start) && (k.dev, k.end) <= hi`:
//! extents never straddle node boundaries. An interior node's children partition its range: child
//! `i` covers `(hi[i-1], hi[i])` with `hi[-1] = lo` and the last `hi` equal to the node's `hi`.
//!
//! Bset header (16 bytes), then `count` entries:
//! ```text
//!  off size field
//!    0    4 magic          BSET_MAGIC
//!    4    4 index          position in the node's log: 0, 1, 2, ...
//!    8    4 count          number of entries
//!   12    4 crc32c         of bytes 0..12 of this header followed by the entries
//! ```
//!
//! Leaf entry (level 0), `LEAF_ENTRY_LEN` = 28 bytes:
//! `{ dev u32 | end u64 | size u32 | ptr.offset u64 | ptr.generation u8 | flags u8 | reserved u16 }`,
//! flags: bit 0 dirty, bit 1 whiteout (the range `[end - size, end)` holds nothing: it deletes
//! older keys of this node and is itself dropped when the bsets are merged).
//!
//! Interior entry (level > 0), `CHILD_ENTRY_LEN` = 36 bytes:
//! `{ hi.dev u32 | hi.sector u64 | child NodePtr (24 bytes) }`.
//!
//! `NodePtr` (24 bytes), also what the cache journals as the root:
//! `{ addr u64 | seq u64 | len u32 | crc32c u32 }` where `len` is the number of bytes of the slot
//! the pointer covers (a whole number of padded bsets) and the crc32c is of those `len` bytes.
//!
//! # Merged view
//!
//! Within a bset, entries are strictly increasing and (leaves) non-overlapping. A leaf's content is
//! its bsets applied in order, newest wins: each entry cuts every older key it overlaps (cut
//! front, cut back, or split in two) and then, unless it is a whiteout, takes its place. An
//! interior node's children are its last bset (each interior bset is a complete list).

use crate::NodeAddr;
use crate::error::{BtreeError, CorruptionKind};
use crate::key::{Key, Pos, Ptr};
use crate::store::NodeStore;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Magic number at the start of every node.
pub const NODE_MAGIC: [u8; 8] = *b"UBCBTREE";
/// Version 1: the first format (this layout).
pub const FORMAT_VERSION: u32 = 1;
/// Magic number of every bset.
pub const BSET_MAGIC: u32 = 0x7465_7362; // "bset" little-endian

// Header offsets, each chained from the one before.
const H_MAGIC: usize = 0;
const H_VERSION: usize = H_MAGIC + 8;
const H_LEVEL: usize = H_VERSION + 4;
const H_RESERVED0: usize = H_LEVEL + 1;
const H_ALIGN_SHIFT: usize = H_RESERVED0 + 1;
const H_ADDR: usize = H_ALIGN_SHIFT + 2;
const H_SEQ: usize = H_ADDR + 8;
const H_LO_DEV: usize = H_SEQ + 8;
const H_LO_SECTOR: usize = H_LO_DEV + 4;
const H_HI_DEV: usize = H_LO_SECTOR + 8;
const H_HI_SECTOR: usize = H_HI_DEV + 4;
const H_RESERVED1: usize = H_HI_SECTOR + 8;
const H_CSUM: usize = H_RESERVED1 + 4;
/// Length of the node header.
pub const HEADER_LEN: usize = H_CSUM + 4;

const B_MAGIC: usize = 0;
const B_INDEX: usize = B_MAGIC + 4;
const B_COUNT: usize = B_INDEX + 4;
const B_CSUM: usize = B_COUNT + 4;
/// Length of a bset header.
pub const BSET_HEADER_LEN: usize = B_CSUM + 4;

/// Length of one leaf entry.
pub const LEAF_ENTRY_LEN: usize = 28;
/// Length of an encoded [`NodePtr`].
pub const NODE_PTR_LEN: usize = 24;
/// Length of one interior entry.
pub const CHILD_ENTRY_LEN: usize = 12 + NODE_PTR_LEN;

/// Maximum number of levels. A tree of 16 levels with even 4 children per node would hold 4^15
/// leaves; anything deeper is corruption, and the bound keeps every descent finite.
pub const MAX_DEPTH: usize = 16;

/// Allowed range of `align_shift`: 8 bytes to 1 MiB.
pub const MIN_ALIGN_SHIFT: u16 = 3;
/// See [`MIN_ALIGN_SHIFT`].
pub const MAX_ALIGN_SHIFT: u16 = 20;

const FLAG_DIRTY: u8 = 1;
const FLAG_WHITEOUT: u8 = 2;

/// A pointer to one version of a node: its address, incarnation, and the prefix of the slot it
/// covers with that prefix's crc32c. Reading through it ignores anything appended later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodePtr {
    /// Slot address.
    pub addr: NodeAddr,
    /// Incarnation (the header's `seq`).
    pub seq: u64,
    /// Bytes of the slot covered.
    pub len: u32,
    /// crc32c of those bytes.
    pub csum: u32,
}

impl NodePtr {
    /// Encodes the pointer (`{ addr u64 | seq u64 | len u32 | crc32c u32 }`).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; NODE_PTR_LEN] {
        let mut b = [0u8; NODE_PTR_LEN];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.csum.to_le_bytes());
        b
    }

    /// Decodes a pointer. Any 24 bytes are a syntactically valid pointer; what it points to is
    /// verified when it is read.
    #[must_use]
    pub fn from_bytes(b: &[u8; NODE_PTR_LEN]) -> NodePtr {
        NodePtr { addr: rd_u64(b, 0), seq: rd_u64(b, 8), len: rd_u32(b, 16), csum: rd_u32(b, 20) }
    }
}

/// The decoded node header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeHeader {
    /// 0 for a leaf.
    pub level: u8,
    /// bsets are padded to `1 << align_shift` bytes.
    pub align_shift: u16,
    /// The node's own address.
    pub addr: NodeAddr,
    /// Incarnation.
    pub seq: u64,
    /// Low bound of the range.
    pub lo: Pos,
    /// High bound of the range.
    pub hi: Pos,
}

impl NodeHeader {
    /// Alignment of bsets in bytes.
    #[must_use]
    pub fn align(&self) -> usize {
        1usize << self.align_shift
    }
}

/// An entry of a leaf bset: a key, or a whiteout deleting a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafEntry {
    /// The key (for a whiteout only dev, end and size matter).
    pub key: Key,
    /// Deletes `[start, end)` instead of mapping it.
    pub whiteout: bool,
}

/// An entry of an interior bset: the child covering up to `hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildEntry {
    /// High bound of the child's range.
    pub hi: Pos,
    /// Where the child is.
    pub ptr: NodePtr,
}

/// A node as read from its image: its header and merged view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedNode {
    /// The header.
    pub header: NodeHeader,
    /// Number of bsets in the log.
    pub bsets: u32,
    /// Bytes of the image covered (a pointer's `len`).
    pub len: usize,
    /// Keys or children.
    pub body: DecodedBody,
}

/// The merged view of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodedBody {
    /// A leaf's keys, strictly increasing and non-overlapping.
    Leaf(Vec<Key>),
    /// An interior node's children, partitioning its range.
    Interior(Vec<ChildEntry>),
}

fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd_u32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn corrupt(kind: CorruptionKind, addr: Option<NodeAddr>, detail: impl Into<String>) -> BtreeError {
    BtreeError::corrupted(kind, addr, detail)
}

/// Rounds `n` up to a multiple of `align` (a power of two), or `None` on overflow.
#[must_use]
pub fn round_up(n: usize, align: usize) -> Option<usize> {
    Some(n.checked_add(align - 1)? & !(align - 1))
}

/// crc32c of a node image prefix, as stored in a [`NodePtr`].
#[must_use]
pub fn image_checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Appends the 64-byte header to `out`.
// Format: { magic | version | level | 0 | align_shift | addr | seq | lo | hi | 0 | crc32c }
pub fn encode_header(h: &NodeHeader, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    let b = &mut out[start..];
    b[H_MAGIC..H_MAGIC + 8].copy_from_slice(&NODE_MAGIC);
    b[H_VERSION..H_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[H_LEVEL] = h.level;
    b[H_ALIGN_SHIFT..H_ALIGN_SHIFT + 2].copy_from_slice(&h.align_shift.to_le_bytes());
    b[H_ADDR..H_ADDR + 8].copy_from_slice(&h.addr.to_le_bytes());
    b[H_SEQ..H_SEQ + 8].copy_from_slice(&h.seq.to_le_bytes());
    b[H_LO_DEV..H_LO_DEV + 4].copy_from_slice(&h.lo.dev.to_le_bytes());
    b[H_LO_SECTOR..H_LO_SECTOR + 8].copy_from_slice(&h.lo.sector.to_le_bytes());
    b[H_HI_DEV..H_HI_DEV + 4].copy_from_slice(&h.hi.dev.to_le_bytes());
    b[H_HI_SECTOR..H_HI_SECTOR + 8].copy_from_slice(&h.hi.sector.to_le_bytes());
    let csum = crc32c::crc32c(&b[..H_CSUM]);
    b[H_CSUM..H_CSUM + 4].copy_from_slice(&csum.to_le_bytes());
}

/// Decodes and verifies a node header (magic, version, checksum, reserved bytes, level, range).
pub fn decode_header(b: &[u8]) -> Result<NodeHeader, BtreeError> {
    if b.len() < HEADER_LEN {
        return Err(corrupt(
            CorruptionKind::BadLength,
            None,
            format!("node image of {} bytes has no header", b.len()),
        ));
    }
    if b[H_MAGIC..H_MAGIC + 8] != NODE_MAGIC {
        return Err(corrupt(CorruptionKind::BadMagic, None, format!("node magic {:02x?}", &b[..8])));
    }
    let addr = rd_u64(b, H_ADDR);
    let version = rd_u32(b, H_VERSION);
    if version != FORMAT_VERSION {
        return Err(corrupt(
            CorruptionKind::BadVersion,
            Some(addr),
            format!("node format version {version}"),
        ));
    }
    let stored = rd_u32(b, H_CSUM);
    let actual = crc32c::crc32c(&b[..H_CSUM]);
    if stored != actual {
        return Err(corrupt(
            CorruptionKind::ChecksumMismatch,
            Some(addr),
            format!("node header crc32c {stored:#010x}, computed {actual:#010x}"),
        ));
    }
    let h = NodeHeader {
        level: b[H_LEVEL],
        align_shift: rd_u16(b, H_ALIGN_SHIFT),
        addr,
        seq: rd_u64(b, H_SEQ),
        lo: Pos { dev: rd_u32(b, H_LO_DEV), sector: rd_u64(b, H_LO_SECTOR) },
        hi: Pos { dev: rd_u32(b, H_HI_DEV), sector: rd_u64(b, H_HI_SECTOR) },
    };
    if b[H_RESERVED0] != 0 || rd_u32(b, H_RESERVED1) != 0 {
        return Err(corrupt(CorruptionKind::BadVersion, Some(addr), "reserved header bytes are not zero"));
    }
    if usize::from(h.level) >= MAX_DEPTH {
        return Err(corrupt(
            CorruptionKind::BadLevel,
            Some(addr),
            format!("level {} >= {MAX_DEPTH}", h.level),
        ));
    }
    if !(MIN_ALIGN_SHIFT..=MAX_ALIGN_SHIFT).contains(&h.align_shift) {
        return Err(corrupt(CorruptionKind::BadLength, Some(addr), format!("align_shift {}", h.align_shift)));
    }
    if h.lo >= h.hi {
        return Err(corrupt(
            CorruptionKind::OutOfNodeRange,
            Some(addr),
            format!("empty node range [{}, {}]", h.lo, h.hi),
        ));
    }
    Ok(h)
}

fn encode_leaf_entry(e: &LeafEntry, out: &mut Vec<u8>) {
    let k = &e.key;
    out.extend_from_slice(&k.dev.to_le_bytes());
    out.extend_from_slice(&k.end.to_le_bytes());
    out.extend_from_slice(&k.size.to_le_bytes());
    out.extend_from_slice(&k.ptr.offset.to_le_bytes());
    out.push(k.ptr.generation);
    out.push(if k.dirty { FLAG_DIRTY } else { 0 } | if e.whiteout { FLAG_WHITEOUT } else { 0 });
    out.extend_from_slice(&[0, 0]);
}

fn decode_leaf_entry(b: &[u8], addr: Option<NodeAddr>) -> Result<LeafEntry, BtreeError> {
    let flags = b[25];
    let key = Key {
        dev: rd_u32(b, 0),
        end: rd_u64(b, 4),
        size: rd_u32(b, 12),
        ptr: Ptr { offset: rd_u64(b, 16), generation: b[24] },
        dirty: flags & FLAG_DIRTY != 0,
    };
    if flags & !(FLAG_DIRTY | FLAG_WHITEOUT) != 0 || rd_u16(b, 26) != 0 {
        return Err(corrupt(
            CorruptionKind::BadKey,
            addr,
            format!("unknown flags {flags:#x} or reserved bits in {key}"),
        ));
    }
    Ok(LeafEntry { key, whiteout: flags & FLAG_WHITEOUT != 0 })
}

fn encode_child_entry(c: &ChildEntry, out: &mut Vec<u8>) {
    out.extend_from_slice(&c.hi.dev.to_le_bytes());
    out.extend_from_slice(&c.hi.sector.to_le_bytes());
    out.extend_from_slice(&c.ptr.to_bytes());
}

fn decode_child_entry(b: &[u8]) -> ChildEntry {
    let mut p = [0u8; NODE_PTR_LEN];
    p.copy_from_slice(&b[12..12 + NODE_PTR_LEN]);
    ChildEntry { hi: Pos { dev: rd_u32(b, 0), sector: rd_u64(b, 4) }, ptr: NodePtr::from_bytes(&p) }
}

/// Formats keys `i-1..=i+1` of `keys` for an error message.
pub(crate) fn dump_neighbours<T: std::fmt::Display>(items: &[T], i: usize) -> String {
    let mut s = String::new();
    let first = i.saturating_sub(2);
    for (j, item) in items.iter().enumerate().skip(first).take((i + 2).min(items.len()).saturating_sub(first))
    {
        let mark = if j == i { ">>" } else { "  " };
        let _ = write!(s, "\n  {mark} #{j}: {item}");
    }
    s
}

impl std::fmt::Display for LeafEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.whiteout {
            write!(f, "whiteout dev {} [{}, {})", self.key.dev, self.key.start(), self.key.end)
        } else {
            self.key.fmt(f)
        }
    }
}

impl std::fmt::Display for ChildEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "child up to {} at node {} seq {} len {}",
            self.hi, self.ptr.addr, self.ptr.seq, self.ptr.len
        )
    }
}

/// Checks one step of a key sequence: `key` is valid, lies in `[lo, hi]`, and sorts strictly
/// after `prev` without overlapping it. This is the cheap always-on check used by bset building,
/// node reading, and every iterator step.
pub(crate) fn check_step(
    prev: Option<&Key>,
    key: &Key,
    lo: Pos,
    hi: Pos,
) -> Result<(), (CorruptionKind, &'static str)> {
    if let Err(why) = key.validate() {
        return Err((CorruptionKind::BadKey, why));
    }
    // Order first: an iteration that meets a key sorting before the previous one must be reported
    // as such ("key skipped backwards"), even when the key is also outside its node.
    if let Some(p) = prev {
        if key.pos() <= p.pos() {
            return Err((CorruptionKind::KeysOutOfOrder, "key does not sort after the previous key"));
        }
        if key.dev == p.dev && key.start() < p.end {
            return Err((CorruptionKind::OverlappingKeys, "key overlaps the previous key"));
        }
    }
    if key.start_pos() < lo || key.pos() > hi {
        return Err((CorruptionKind::OutOfNodeRange, "key lies outside the node's range"));
    }
    Ok(())
}

/// Checks a whole leaf entry sequence (a bset, or a node's merged view).
pub fn check_leaf_entries(
    entries: &[LeafEntry],
    lo: Pos,
    hi: Pos,
    addr: Option<NodeAddr>,
) -> Result<(), BtreeError> {
    let mut prev: Option<&Key> = None;
    for (i, e) in entries.iter().enumerate() {
        if let Err((kind, why)) = check_step(prev, &e.key, lo, hi) {
            return Err(corrupt(
                kind,
                addr,
                format!("{why} (node range [{lo}, {hi}]):{}", dump_neighbours(entries, i)),
            ));
        }
        prev = Some(&e.key);
    }
    Ok(())
}

/// Checks a sorted key list (a leaf's merged view).
pub fn check_leaf_keys(keys: &[Key], lo: Pos, hi: Pos, addr: Option<NodeAddr>) -> Result<(), BtreeError> {
    let mut prev: Option<&Key> = None;
    for (i, k) in keys.iter().enumerate() {
        if let Err((kind, why)) = check_step(prev, k, lo, hi) {
            return Err(corrupt(
                kind,
                addr,
                format!("{why} (node range [{lo}, {hi}]):{}", dump_neighbours(keys, i)),
            ));
        }
        prev = Some(k);
    }
    Ok(())
}

/// Checks an interior entry list: strictly increasing bounds, all within `(lo, hi]`, the last
/// equal to `hi`, and child pointers of a plausible length.
pub fn check_child_entries(
    children: &[ChildEntry],
    lo: Pos,
    hi: Pos,
    node_size: usize,
    addr: Option<NodeAddr>,
) -> Result<(), BtreeError> {
    let mut prev = lo;
    for (i, c) in children.iter().enumerate() {
        if c.hi <= prev {
            let kind = if i == 0 { CorruptionKind::OutOfNodeRange } else { CorruptionKind::KeysOutOfOrder };
            return Err(corrupt(
                kind,
                addr,
                format!("child bounds not increasing:{}", dump_neighbours(children, i)),
            ));
        }
        if c.hi > hi {
            return Err(corrupt(
                CorruptionKind::OutOfNodeRange,
                addr,
                format!("child beyond node range [{lo}, {hi}]:{}", dump_neighbours(children, i)),
            ));
        }
        let len = c.ptr.len as usize;
        if len < HEADER_LEN + BSET_HEADER_LEN || len > node_size {
            return Err(corrupt(
                CorruptionKind::BadLength,
                addr,
                format!("child pointer length:{}", dump_neighbours(children, i)),
            ));
        }
        prev = c.hi;
    }
    if prev != hi {
        return Err(corrupt(
            CorruptionKind::OutOfNodeRange,
            addr,
            format!("children end at {prev}, node range ends at {hi} ({} children)", children.len()),
        ));
    }
    Ok(())
}

/// Appends a bset of leaf entries (header, entries) to `out` after checking them: a bset whose
/// keys are out of order, overlap, or leave the node's range is refused with the matching
/// `Corrupted` error and nothing is appended.
pub fn encode_leaf_bset(
    index: u32,
    entries: &[LeafEntry],
    lo: Pos,
    hi: Pos,
    addr: Option<NodeAddr>,
    out: &mut Vec<u8>,
) -> Result<(), BtreeError> {
    check_leaf_entries(entries, lo, hi, addr)?;
    let start = out.len();
    push_bset_header(index, entries.len(), out);
    for e in entries {
        encode_leaf_entry(e, out);
    }
    seal_bset(&mut out[start..]);
    Ok(())
}

/// Appends a bset of interior entries after checking them (see [`check_child_entries`]).
pub fn encode_interior_bset(
    index: u32,
    children: &[ChildEntry],
    lo: Pos,
    hi: Pos,
    node_size: usize,
    addr: Option<NodeAddr>,
    out: &mut Vec<u8>,
) -> Result<(), BtreeError> {
    check_child_entries(children, lo, hi, node_size, addr)?;
    let start = out.len();
    push_bset_header(index, children.len(), out);
    for c in children {
        encode_child_entry(c, out);
    }
    seal_bset(&mut out[start..]);
    Ok(())
}

// Format: { BSET_MAGIC | index | count | crc32c(header[0..12] ++ entries) } entries...
fn push_bset_header(index: u32, count: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&BSET_MAGIC.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
}

fn bset_csum(bset: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&bset[..B_CSUM]), &bset[BSET_HEADER_LEN..])
}

fn seal_bset(bset: &mut [u8]) {
    let c = bset_csum(bset);
    bset[B_CSUM..B_CSUM + 4].copy_from_slice(&c.to_le_bytes());
}

/// Pads `out` with zeros to a multiple of `align`.
pub fn pad_to(out: &mut Vec<u8>, align: usize) {
    let target = round_up(out.len(), align).unwrap_or(out.len());
    out.resize(target, 0);
}

/// Removes from `map` every part of an older key overlapping `[start, end)` of `dev`, keeping the
/// parts outside (cut front, cut back, or both when the range lands in the middle).
fn cut_range(map: &mut BTreeMap<Pos, Key>, dev: u32, start: u64, end: u64) {
    // Bounded: every pass removes one key, and the pieces put back lie outside [start, end).
    loop {
        let Some((&pos, &old)) = map
            .range((std::ops::Bound::Excluded(Pos { dev, sector: start }), std::ops::Bound::Unbounded))
            .next()
        else {
            return;
        };
        if old.dev != dev || old.start() >= end {
            return;
        }
        map.remove(&pos);
        if old.start() < start {
            let front = old.slice(old.start(), start);
            map.insert(front.pos(), front);
        }
        if old.end > end {
            let back = old.slice(end, old.end);
            map.insert(back.pos(), back);
        }
    }
}

/// Decodes a node image and returns its merged view, verifying everything: lengths (before any
/// arithmetic), magic, version, header and bset checksums, the pointer (`expect`: address,
/// incarnation, covered length and its crc32c), every bset's order and range, and the merged
/// view. Allocation is bounded by the image length; there is no recursion.
///
/// Without `expect` (fuzzing, tools) the whole image is taken as covered and only the node's own
/// checksums are verified.
pub fn decode_node(
    image: &[u8],
    expect: Option<&NodePtr>,
    node_size: usize,
) -> Result<DecodedNode, BtreeError> {
    let addr_hint = expect.map(|p| p.addr);
    let len = match expect {
        Some(p) => p.len as usize,
        None => image.len(),
    };
    if len > image.len() || len > node_size || len < HEADER_LEN + BSET_HEADER_LEN {
        return Err(corrupt(
            CorruptionKind::BadLength,
            addr_hint,
            format!("node length {len} (image {} bytes, node size {node_size})", image.len()),
        ));
    }
    let image = &image[..len];
    let header = decode_header(image).map_err(|e| match e {
        BtreeError::Corrupted { kind, addr: None, detail } => corrupt(kind, addr_hint, detail),
        other => other,
    })?;
    let addr = Some(header.addr);
    if let Some(p) = expect {
        if header.addr != p.addr {
            return Err(corrupt(
                CorruptionKind::WrongAddress,
                Some(p.addr),
                format!("node read at {} says it is node {}", p.addr, header.addr),
            ));
        }
        if header.seq != p.seq {
            return Err(corrupt(
                CorruptionKind::StaleNode,
                addr,
                format!("node has incarnation {}, pointer expects {}", header.seq, p.seq),
            ));
        }
        let actual = crc32c::crc32c(image);
        if actual != p.csum {
            return Err(corrupt(
                CorruptionKind::ChecksumMismatch,
                addr,
                format!(
                    "crc32c of the first {len} bytes is {actual:#010x}, pointer expects {:#010x}",
                    p.csum
                ),
            ));
        }
    }
    let align = header.align();
    let entry_len = if header.level == 0 { LEAF_ENTRY_LEN } else { CHILD_ENTRY_LEN };
    let mut off = HEADER_LEN;
    let mut index: u32 = 0;
    let mut leaf: Option<BTreeMap<Pos, Key>> = None;
    let mut first_leaf_bset: Vec<Key> = Vec::new();
    let mut children: Vec<ChildEntry> = Vec::new();
    let mut entries: Vec<LeafEntry> = Vec::new();
    while off < len {
        if len - off < BSET_HEADER_LEN {
            return Err(corrupt(
                CorruptionKind::BadLength,
                addr,
                format!("truncated bset header at byte {off}"),
            ));
        }
        let hdr = &image[off..off + BSET_HEADER_LEN];
        if rd_u32(hdr, B_MAGIC) != BSET_MAGIC {
            return Err(corrupt(
                CorruptionKind::BadMagic,
                addr,
                format!("bset {index} at byte {off}: bad magic"),
            ));
        }
        let stored_index = rd_u32(hdr, B_INDEX);
        if stored_index != index {
            return Err(corrupt(
                CorruptionKind::StaleNode,
                addr,
                format!("bset at byte {off} has index {stored_index}, expected {index}"),
            ));
        }
        let count = rd_u32(hdr, B_COUNT) as usize;
        let body_len =
            count.checked_mul(entry_len).filter(|&b| b <= len - off - BSET_HEADER_LEN).ok_or_else(|| {
                corrupt(CorruptionKind::BadLength, addr, format!("bset {index} claims {count} entries"))
            })?;
        let end = off + BSET_HEADER_LEN + body_len;
        let bset = &image[off..end];
        let (stored, actual) = (rd_u32(bset, B_CSUM), bset_csum(bset));
        if stored != actual {
            return Err(corrupt(
                CorruptionKind::ChecksumMismatch,
                addr,
                format!("bset {index} crc32c {stored:#010x}, computed {actual:#010x}"),
            ));
        }
        let body = &bset[BSET_HEADER_LEN..];
        if header.level == 0 {
            entries.clear();
            for chunk in body.chunks_exact(LEAF_ENTRY_LEN) {
                entries.push(decode_leaf_entry(chunk, addr)?);
            }
            check_leaf_entries(&entries, header.lo, header.hi, addr)?;
            if index == 0 {
                first_leaf_bset = entries.iter().filter(|e| !e.whiteout).map(|e| e.key).collect();
            } else {
                let map =
                    leaf.get_or_insert_with(|| first_leaf_bset.drain(..).map(|k| (k.pos(), k)).collect());
                for e in &entries {
                    cut_range(map, e.key.dev, e.key.start(), e.key.end);
                    if !e.whiteout {
                        map.insert(e.key.pos(), e.key);
                    }
                }
            }
        } else {
            children.clear();
            children.extend(body.chunks_exact(CHILD_ENTRY_LEN).map(decode_child_entry));
            check_child_entries(&children, header.lo, header.hi, node_size, addr)?;
        }
        off = round_up(end, align).filter(|&o| o <= len).ok_or_else(|| {
            corrupt(
                CorruptionKind::BadLength,
                addr,
                format!("bset {index} padding runs past the node length {len}"),
            )
        })?;
        index += 1;
    }
    let body = if header.level == 0 {
        let keys: Vec<Key> = match leaf {
            Some(map) => map.into_values().collect(),
            None => first_leaf_bset,
        };
        // The merged view is sorted and non-overlapping by construction; checking it anyway is
        // what "checked after a node is read" promises, and it is linear.
        check_leaf_keys(&keys, header.lo, header.hi, addr)?;
        DecodedBody::Leaf(keys)
    } else {
        DecodedBody::Interior(children)
    };
    Ok(DecodedNode { header, bsets: index, len, body })
}

/// Encodes a complete one-bset leaf node image (header, keys, padding) into `out`, checking the
/// keys first. Returns the pointer to the image. Nothing is appended to `out` on error.
pub fn encode_leaf_node(
    header: &NodeHeader,
    keys: &[Key],
    node_size: usize,
    out: &mut Vec<u8>,
) -> Result<NodePtr, BtreeError> {
    check_leaf_keys(keys, header.lo, header.hi, Some(header.addr))?;
    let start = out.len();
    encode_header(header, out);
    push_bset_header(0, keys.len(), out);
    for k in keys {
        encode_leaf_entry(&LeafEntry { key: *k, whiteout: false }, out);
    }
    seal_bset(&mut out[start + HEADER_LEN..]);
    finish_image(header, node_size, out, start)
}

/// Encodes a complete one-bset interior node image into `out`.
pub fn encode_interior_node(
    header: &NodeHeader,
    children: &[ChildEntry],
    node_size: usize,
    out: &mut Vec<u8>,
) -> Result<NodePtr, BtreeError> {
    check_child_entries(children, header.lo, header.hi, node_size, Some(header.addr))?;
    let start = out.len();
    encode_header(header, out);
    push_bset_header(0, children.len(), out);
    for c in children {
        encode_child_entry(c, out);
    }
    seal_bset(&mut out[start + HEADER_LEN..]);
    finish_image(header, node_size, out, start)
}

fn finish_image(
    header: &NodeHeader,
    node_size: usize,
    out: &mut Vec<u8>,
    start: usize,
) -> Result<NodePtr, BtreeError> {
    let target = round_up(out.len() - start, header.align()).map(|l| start + l);
    match target {
        Some(t) if t - start <= node_size => {
            out.resize(t, 0);
            let img = &out[start..];
            Ok(NodePtr {
                addr: header.addr,
                seq: header.seq,
                len: img.len() as u32,
                csum: crc32c::crc32c(img),
            })
        }
        _ => {
            let n = out.len() - start;
            out.truncate(start);
            Err(BtreeError::Invalid(format!("node image of {n} bytes does not fit a {node_size}-byte node")))
        }
    }
}

/// Encodes a one-bset leaf node and writes it to `store` at `header.addr`. The keys are checked
/// before anything is written: a node that breaks an invariant is never written.
pub fn write_leaf_node<S: NodeStore + ?Sized>(
    store: &mut S,
    header: &NodeHeader,
    keys: &[Key],
) -> Result<NodePtr, BtreeError> {
    let mut buf = Vec::new();
    let ptr = encode_leaf_node(header, keys, store.node_size(), &mut buf)?;
    store.write(header.addr, 0, &buf)?;
    Ok(ptr)
}

/// Recomputes the header and bset checksums of an image in place (as far as its structure can be
/// followed), so tests and fuzzers can build images that pass the checksums and exercise the
/// semantic checks behind them. Returns the number of bytes followed (the covered length).
#[doc(hidden)]
pub fn reseal_checksums(image: &mut [u8]) -> usize {
    if image.len() < HEADER_LEN {
        return 0;
    }
    let c = crc32c::crc32c(&image[..H_CSUM]);
    image[H_CSUM..H_CSUM + 4].copy_from_slice(&c.to_le_bytes());
    let shift = rd_u16(image, H_ALIGN_SHIFT).clamp(MIN_ALIGN_SHIFT, MAX_ALIGN_SHIFT);
    let entry_len = if image[H_LEVEL] == 0 { LEAF_ENTRY_LEN } else { CHILD_ENTRY_LEN };
    let mut off = HEADER_LEN;
    while image.len() - off >= BSET_HEADER_LEN {
        let count = rd_u32(image, off + B_COUNT) as usize;
        let Some(end) = count.checked_mul(entry_len).and_then(|b| b.checked_add(off + BSET_HEADER_LEN))
        else {
            break;
        };
        if end > image.len() || rd_u32(image, off + B_MAGIC) != BSET_MAGIC {
            break;
        }
        seal_bset(&mut image[off..end]);
        match round_up(end, 1 << shift) {
            Some(o) if o <= image.len() => off = o,
            _ => return end,
        }
    }
    off
}

/// Re-checks the invariants of a decoded node (what [`decode_node`] promises): for fuzzers and
/// tests that want to assert a successful decode really is valid.
pub fn check_decoded(node: &DecodedNode, node_size: usize) -> Result<(), BtreeError> {
    let h = &node.header;
    if h.lo >= h.hi || usize::from(h.level) >= MAX_DEPTH || node.len > node_size || node.bsets == 0 {
        return Err(corrupt(CorruptionKind::BadLength, Some(h.addr), "decoded node header out of bounds"));
    }
    match &node.body {
        DecodedBody::Leaf(keys) if h.level == 0 => check_leaf_keys(keys, h.lo, h.hi, Some(h.addr)),
        DecodedBody::Interior(children) if h.level > 0 => {
            check_child_entries(children, h.lo, h.hi, node_size, Some(h.addr))
        }
        _ => Err(corrupt(CorruptionKind::BadLevel, Some(h.addr), "body kind does not match the level")),
    }
}
