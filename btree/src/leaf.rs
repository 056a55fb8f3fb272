//! The in-memory body of a leaf: its keys in order, laid out so a search touches few cache lines.
//!
//! A leaf of a 256 KiB node holds thousands of keys, and random lookups over a 1M-key tree miss
//! the CPU caches at every dependent load. A std `BTreeMap` walks about four levels of 11-key
//! nodes, each a dependent miss. Here a leaf is a sorted list of small *blocks* of at most
//! [`BLOCK_CAP`] keys each, plus a dense *fence* array holding the last position of every block:
//!
//! ```text
//! refs:   [ f0 *b0 | f1 *b1 | f2 *b2 | ... ]   fence: u128 (dev << 64 | sector) of the block's
//!                                              last key, beside the boxed block's pointer
//! block:  len | devs[CAP] (u32) | sectors[CAP] (u64) | vals[CAP] (offset, size, gen, dirty)
//! ```
//!
//! A search is a binary search of the fence array (its upper probes are shared by every search
//! of this leaf and so usually cached; the last probe brings the block pointer along), then a
//! prefetch of the whole block, so all its cache lines are in flight at once, then a branch-free
//! binary search over the block's `devs` and `sectors`, then one load of the (already
//! prefetched) value. An insert or remove moves at most one block's tail; a full block splits in
//! two, a block below a quarter full merges with (or borrows from) a neighbour. Splitting the
//! whole leaf moves block pointers, not keys.
//!
//! The leaf is a map from position `(dev, end)` to value, exactly like the `BTreeMap` it
//! replaces: nothing here checks key overlap or node range (the tree checks every iteration
//! step), and nothing here is persistent — the on-disk bsets are built from [`Leaf::iter`].

use crate::key::{Key, Pos, Ptr};
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};

/// Hint to load the cache line at `p` into L1.
///
/// # Safety
/// Needs SSE (part of the x86_64 baseline). A prefetch never faults, whatever `p` is.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn prefetch(p: *const i8) {
    // SAFETY: the caller's contract (SSE is always there on x86_64).
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
}

/// Keys per block. 32 keys are 128 + 256 bytes of search keys and 512 bytes of values: a
/// 904-byte block, 15 cache lines prefetched per lookup. Larger blocks prefetch more lines per
/// lookup, smaller ones make the fence array longer (16 and 64 measured no better; see the
/// crate README).
pub(crate) const BLOCK_CAP: usize = 32;
/// A block with fewer keys than this after a removal merges with a neighbour (or borrows).
const BLOCK_MIN: usize = BLOCK_CAP / 4;
/// Keys per block when a leaf is built from a sorted list (a node read from disk): room is left
/// so the next inserts do not split every block at once.
const BUILD_FILL: usize = BLOCK_CAP * 3 / 4;

/// The value of a leaf entry; the key's position `(dev, end)` is stored apart, for searching.
#[derive(Clone, Copy, Debug, Default)]
struct Val {
    offset: u64,
    size: u32,
    generation: u8,
    dirty: bool,
}

impl Val {
    fn of(k: &Key) -> Val {
        Val { offset: k.ptr.offset, size: k.size, generation: k.ptr.generation, dirty: k.dirty }
    }
}

/// A position as one integer with the same order: `(dev, sector)` compares like `dev << 64 |
/// sector`.
fn pack(p: Pos) -> u128 {
    (u128::from(p.dev) << 64) | u128::from(p.sector)
}

/// Slots past `len` hold the sentinel position `(u32::MAX, u64::MAX)`, so the search can run
/// over all [`BLOCK_CAP`] slots without first loading `len` (see [`Block::count`]). `repr(C)`
/// keeps `len` and the search keys in the first cache lines and the values after them.
#[repr(C)]
struct Block {
    len: usize,
    devs: [u32; BLOCK_CAP],
    sectors: [u64; BLOCK_CAP],
    vals: [Val; BLOCK_CAP],
}

impl Block {
    fn new() -> Box<Block> {
        Box::new(Block {
            len: 0,
            devs: [u32::MAX; BLOCK_CAP],
            sectors: [u64::MAX; BLOCK_CAP],
            vals: [Val::default(); BLOCK_CAP],
        })
    }

    fn pos(&self, i: usize) -> Pos {
        Pos { dev: self.devs[i], sector: self.sectors[i] }
    }

    fn key(&self, i: usize) -> Key {
        let v = &self.vals[i];
        Key {
            dev: self.devs[i],
            end: self.sectors[i],
            size: v.size,
            ptr: Ptr { offset: v.offset, generation: v.generation },
            dirty: v.dirty,
        }
    }

    fn last(&self) -> u128 {
        pack(self.pos(self.len - 1))
    }

    /// Number of keys at or before `p` (`le`) or strictly before it (`!le`): a branch-free
    /// binary search over all [`BLOCK_CAP`] slots (the sentinels sort after every position below
    /// `Pos::MAX`; the `min` covers `p == Pos::MAX`). Its loads depend on each other, but the
    /// block was prefetched whole, so they wait for lines already in flight, and it takes ~40
    /// instructions where a count over every slot takes ~400 (u64 compares do not vectorise on
    /// baseline x86_64).
    fn count(&self, p: Pos, le: bool) -> usize {
        let before = |i: usize| {
            let (d, s) = (self.devs[i], self.sectors[i]);
            (d < p.dev) | ((d == p.dev) & ((s < p.sector) | (le & (s == p.sector))))
        };
        // The answer lies in [lo, lo + n].
        let (mut lo, mut n) = (0, BLOCK_CAP);
        while n > 1 {
            let half = n / 2;
            lo += usize::from(before(lo + half - 1)) * half;
            n -= half;
        }
        (lo + usize::from(before(lo))).min(self.len)
    }

    /// Starts loading the whole block at once: the search's key lines and the values, so the
    /// search does not wait for its lines one after another and the value read after it
    /// does not wait for a second cache miss.
    #[inline]
    fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            let base: *const Block = self;
            for off in (0..std::mem::size_of::<Block>()).step_by(64) {
                // SAFETY: SSE is part of the x86_64 baseline, so the intrinsic's target feature
                // is always present; a prefetch is only a hint, never faults and changes no
                // state, and every address is inside this block anyway.
                unsafe { prefetch(base.cast::<i8>().wrapping_add(off)) }
            }
        }
    }

    /// Resets slots `from..to` (past the new `len`) to the sentinel.
    fn clear_slots(&mut self, from: usize, to: usize) {
        self.devs[from..to].fill(u32::MAX);
        self.sectors[from..to].fill(u64::MAX);
    }

    fn insert_at(&mut self, i: usize, k: &Key) {
        let n = self.len;
        debug_assert!(n < BLOCK_CAP && i <= n);
        self.devs.copy_within(i..n, i + 1);
        self.sectors.copy_within(i..n, i + 1);
        self.vals.copy_within(i..n, i + 1);
        self.devs[i] = k.dev;
        self.sectors[i] = k.end;
        self.vals[i] = Val::of(k);
        self.len = n + 1;
    }

    fn remove_at(&mut self, i: usize) -> Key {
        let k = self.key(i);
        let n = self.len;
        self.devs.copy_within(i + 1..n, i);
        self.sectors.copy_within(i + 1..n, i);
        self.vals.copy_within(i + 1..n, i);
        self.clear_slots(n - 1, n);
        self.len = n - 1;
        k
    }

    /// Moves the entries from `at` on into a new block.
    fn split_off(&mut self, at: usize) -> Box<Block> {
        let mut right = Block::new();
        right.append_range(self, at, self.len);
        self.clear_slots(at, self.len);
        self.len = at;
        right
    }

    /// Appends `src[from..to]` (the caller knows they sort after this block's keys).
    fn append_range(&mut self, src: &Block, from: usize, to: usize) {
        let n = self.len;
        let m = to - from;
        debug_assert!(n + m <= BLOCK_CAP);
        self.devs[n..n + m].copy_from_slice(&src.devs[from..to]);
        self.sectors[n..n + m].copy_from_slice(&src.sectors[from..to]);
        self.vals[n..n + m].copy_from_slice(&src.vals[from..to]);
        self.len = n + m;
    }

    /// Moves the first `m` entries of `right` (which follows this block) to the end of this one.
    fn take_front(&mut self, right: &mut Block, m: usize) {
        self.append_range(right, 0, m);
        let rn = right.len;
        right.devs.copy_within(m..rn, 0);
        right.sectors.copy_within(m..rn, 0);
        right.vals.copy_within(m..rn, 0);
        right.clear_slots(rn - m, rn);
        right.len = rn - m;
    }

    /// Moves the last `m` entries of this block to the front of `right` (which follows it).
    fn give_back(&mut self, right: &mut Block, m: usize) {
        let (n, rn) = (self.len, right.len);
        debug_assert!(rn + m <= BLOCK_CAP && m <= n);
        right.devs.copy_within(0..rn, m);
        right.sectors.copy_within(0..rn, m);
        right.vals.copy_within(0..rn, m);
        right.devs[..m].copy_from_slice(&self.devs[n - m..n]);
        right.sectors[..m].copy_from_slice(&self.sectors[n - m..n]);
        right.vals[..m].copy_from_slice(&self.vals[n - m..n]);
        right.len = rn + m;
        self.clear_slots(n - m, n);
        self.len = n - m;
    }
}

/// Where a key is in a leaf: block index and slot in the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    block: usize,
    slot: usize,
}

/// A block with its fence (the packed position of its last key) beside the pointer: the last
/// probes of the fence search load the pointer too, so reaching the block costs no further
/// dependent load.
struct BlockRef {
    fence: u128,
    block: Box<Block>,
}

impl BlockRef {
    fn new(block: Box<Block>) -> BlockRef {
        BlockRef { fence: block.last(), block }
    }
}

/// The ordered keys of one leaf. Invariants (kept by every method, checked by the unit tests'
/// `audit`): blocks are non-empty, hold at most [`BLOCK_CAP`] keys each and, unless there is only
/// one, at least `BLOCK_MIN`; their positions strictly increase across the whole leaf; each
/// fence is the packed last position of its block; `len` is the total key count.
#[derive(Default)]
pub(crate) struct Leaf {
    /// In key order. Splitting a block inserts into this Vec: it moves 32-byte entries, never
    /// 900-byte blocks.
    refs: Vec<BlockRef>,
    len: usize,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf").field("keys", &self.len).field("blocks", &self.refs.len()).finish()
    }
}

impl Leaf {
    /// An empty leaf.
    pub(crate) fn new() -> Leaf {
        Leaf::default()
    }

    /// A leaf holding `keys`, which must be sorted by position without duplicates (a decoded,
    /// verified node).
    pub(crate) fn from_sorted(keys: &[Key]) -> Leaf {
        let mut leaf = Leaf::new();
        for chunk in keys.chunks(BUILD_FILL) {
            let mut b = Block::new();
            for (i, k) in chunk.iter().enumerate() {
                b.devs[i] = k.dev;
                b.sectors[i] = k.end;
                b.vals[i] = Val::of(k);
            }
            b.len = chunk.len();
            leaf.refs.push(BlockRef::new(b));
        }
        leaf.len = keys.len();
        if let Some(last) = leaf.refs.len().checked_sub(1) {
            leaf.rebalance(last);
        }
        leaf
    }

    /// Number of keys.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of heap this leaf uses (for the tree's memory estimate).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.refs.len() * std::mem::size_of::<Block>()
            + self.refs.capacity() * std::mem::size_of::<BlockRef>()
    }

    /// The location of the first key.
    pub(crate) fn first(&self) -> Option<Loc> {
        if self.len == 0 { None } else { Some(Loc { block: 0, slot: 0 }) }
    }

    /// The location of the first key sorting strictly after `p`.
    pub(crate) fn first_after(&self, p: Pos) -> Option<Loc> {
        let pp = pack(p);
        let block = self.refs.partition_point(|r| r.fence <= pp);
        let b = &self.refs.get(block)?.block;
        b.prefetch();
        // The block's last key is after `p`, so the slot is inside the block.
        Some(Loc { block, slot: b.count(p, true) })
    }

    /// The location following `loc`.
    pub(crate) fn next(&self, loc: Loc) -> Option<Loc> {
        if loc.slot + 1 < self.refs[loc.block].block.len {
            Some(Loc { block: loc.block, slot: loc.slot + 1 })
        } else if loc.block + 1 < self.refs.len() {
            Some(Loc { block: loc.block + 1, slot: 0 })
        } else {
            None
        }
    }

    /// The key at `loc` (a location this leaf returned since its last change).
    pub(crate) fn key(&self, loc: Loc) -> Key {
        self.refs[loc.block].block.key(loc.slot)
    }

    /// Replaces the value of the key at `loc` with `k`'s, which must have the same position.
    pub(crate) fn set(&mut self, loc: Loc, k: &Key) {
        let b = &mut self.refs[loc.block].block;
        debug_assert!(b.pos(loc.slot) == k.pos());
        b.vals[loc.slot] = Val::of(k);
    }

    /// The last position, if any.
    pub(crate) fn last_pos(&self) -> Option<Pos> {
        self.refs.last().map(|r| r.block.pos(r.block.len - 1))
    }

    /// Inserts `k` at its position; returns false (and changes nothing) when a key with the same
    /// position is present.
    pub(crate) fn insert(&mut self, k: &Key) -> bool {
        let p = k.pos();
        if self.refs.is_empty() {
            let mut b = Block::new();
            b.insert_at(0, k);
            self.refs.push(BlockRef::new(b));
            self.len = 1;
            return true;
        }
        let pp = pack(p);
        // The first block whose last key is at or after `p`; past every key, the last block.
        let mut block = self.refs.partition_point(|r| r.fence < pp).min(self.refs.len() - 1);
        let mut slot = self.refs[block].block.count(p, false);
        {
            let b = &self.refs[block].block;
            if slot < b.len && b.pos(slot) == p {
                return false;
            }
        }
        if self.refs[block].block.len == BLOCK_CAP {
            let half = BLOCK_CAP / 2;
            self.split_block(block, half);
            if slot > half {
                block += 1;
                slot -= half;
            }
        }
        let r = &mut self.refs[block];
        r.block.insert_at(slot, k);
        if slot + 1 == r.block.len {
            r.fence = pp;
        }
        self.len += 1;
        true
    }

    /// Cuts block `block` before slot `at` (both parts non-empty).
    fn split_block(&mut self, block: usize, at: usize) {
        let r = &mut self.refs[block];
        let right = r.block.split_off(at);
        r.fence = r.block.last();
        self.refs.insert(block + 1, BlockRef::new(right));
    }

    /// Removes and returns the key at position `p`.
    pub(crate) fn remove(&mut self, p: Pos) -> Option<Key> {
        let pp = pack(p);
        let block = self.refs.partition_point(|r| r.fence < pp);
        let r = self.refs.get_mut(block)?;
        let slot = r.block.count(p, false);
        if slot >= r.block.len || r.block.pos(slot) != p {
            return None;
        }
        let k = r.block.remove_at(slot);
        self.len -= 1;
        if r.block.len == 0 {
            self.refs.remove(block);
        } else {
            if slot == r.block.len {
                r.fence = r.block.last();
            }
            self.rebalance(block);
        }
        Some(k)
    }

    /// Restores the size bound of the underfull block `block`: merges it with a neighbour, or
    /// evens the two out when together they would not fit one block. A merge may still leave a
    /// small block (two small neighbours), so it repeats until the bound holds or one block is
    /// left.
    fn rebalance(&mut self, mut block: usize) {
        while self.refs.len() >= 2 && self.refs[block].block.len < BLOCK_MIN {
            let a = if block + 1 < self.refs.len() { block } else { block - 1 };
            let (left, right) = self.refs.split_at_mut(a + 1);
            let (l, r) = (&mut left[a], &mut right[0]);
            let total = l.block.len + r.block.len;
            if total <= BLOCK_CAP {
                l.block.append_range(&r.block, 0, r.block.len);
                l.fence = r.fence;
                self.refs.remove(a + 1);
                block = a;
            } else {
                // Both end with more than BLOCK_CAP / 2 keys.
                let want = total / 2;
                if l.block.len < want {
                    l.block.take_front(&mut r.block, want - l.block.len);
                } else {
                    l.block.give_back(&mut r.block, l.block.len - want);
                }
                l.fence = l.block.last();
                return;
            }
        }
    }

    /// Splits the leaf at its middle key (index `len / 2` goes right, as `BTreeMap::split_off`
    /// at that key would) and returns the right half. `None` below two keys.
    pub(crate) fn split_half(&mut self) -> Option<Leaf> {
        if self.len < 2 {
            return None;
        }
        let mut at = self.len / 2;
        let mut block = 0;
        while at >= self.refs[block].block.len {
            at -= self.refs[block].block.len;
            block += 1;
        }
        if at > 0 {
            // The middle falls inside a block: cut it there first.
            self.split_block(block, at);
            block += 1;
        }
        let refs = self.refs.split_off(block);
        let moved: usize = refs.iter().map(|r| r.block.len).sum();
        self.len -= moved;
        let mut right = Leaf { refs, len: moved };
        // Cutting a block can leave a small one on either side of the cut.
        self.rebalance(self.refs.len() - 1);
        right.rebalance(0);
        Some(right)
    }

    /// Appends `right`, whose keys all sort after this leaf's.
    pub(crate) fn append(&mut self, mut right: Leaf) {
        let seam = self.refs.len();
        self.len += right.len;
        self.refs.append(&mut right.refs);
        // The two blocks meeting at the seam may be small (an emptying leaf): keep the bound.
        if seam > 0 {
            let mut i = seam - 1;
            while i < self.refs.len().min(seam + 1) {
                if self.refs.len() > 1 && self.refs[i].block.len < BLOCK_MIN {
                    // Merges (fewer blocks) or evens out (block i is then big enough).
                    self.rebalance(i);
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Every key in order.
    pub(crate) fn iter(&self) -> Iter<'_> {
        Iter { leaf: self, loc: self.first() }
    }

    /// The keys sorting strictly after `p`, in order.
    pub(crate) fn iter_after(&self, p: Pos) -> Iter<'_> {
        Iter { leaf: self, loc: self.first_after(p) }
    }
}

/// In-order iterator over a leaf's keys.
pub(crate) struct Iter<'a> {
    leaf: &'a Leaf,
    loc: Option<Loc>,
}

impl Iterator for Iter<'_> {
    type Item = Key;

    fn next(&mut self) -> Option<Key> {
        let loc = self.loc?;
        self.loc = self.leaf.next(loc);
        Some(self.leaf.key(loc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn key(dev: u32, end: u64, size: u32) -> Key {
        Key {
            dev,
            end,
            size,
            ptr: Ptr { offset: end.wrapping_mul(3), generation: (end % 251) as u8 },
            dirty: end % 2 == 0,
        }
    }

    /// Checks every structural invariant of the leaf.
    fn audit(l: &Leaf) {
        let mut total = 0;
        let mut prev: Option<Pos> = None;
        for r in &l.refs {
            let (b, f) = (&r.block, &r.fence);
            assert!(b.len > 0 && b.len <= BLOCK_CAP, "block size {}", b.len);
            assert!(b.len >= BLOCK_MIN || l.refs.len() == 1, "underfull block: {:?}", block_sizes(l));
            for i in 0..b.len {
                if let Some(p) = prev {
                    assert!(p < b.pos(i), "order: {p} then {}", b.pos(i));
                }
                prev = Some(b.pos(i));
            }
            assert_eq!(*f, b.last(), "fence");
            for i in b.len..BLOCK_CAP {
                assert_eq!((b.devs[i], b.sectors[i]), (u32::MAX, u64::MAX), "sentinel slot {i}");
            }
            total += b.len;
        }
        assert_eq!(total, l.len);
    }

    fn contents(l: &Leaf) -> Vec<Key> {
        l.iter().collect()
    }

    fn block_sizes(l: &Leaf) -> Vec<usize> {
        l.refs.iter().map(|r| r.block.len).collect()
    }

    #[test]
    fn insert_splits_a_full_block_in_the_middle_and_at_both_ends() {
        let mut l = Leaf::new();
        for i in 0..BLOCK_CAP as u64 {
            assert!(l.insert(&key(1, 10 + i * 10, 1)));
        }
        assert_eq!(block_sizes(&l), vec![BLOCK_CAP]);
        // Into the middle of the full block: it splits, the key lands in order.
        assert!(l.insert(&key(1, 105, 1)));
        audit(&l);
        assert_eq!(l.refs.len(), 2);
        // Before the first key and after the last key.
        assert!(l.insert(&key(1, 1, 1)));
        assert!(l.insert(&key(1, 100_000, 1)));
        audit(&l);
        let ends: Vec<u64> = contents(&l).iter().map(|k| k.end).collect();
        let mut want: Vec<u64> = (0..BLOCK_CAP as u64).map(|i| 10 + i * 10).collect();
        want.extend([1, 105, 100_000]);
        want.sort_unstable();
        assert_eq!(ends, want);
        // Duplicate positions are refused without change.
        assert!(!l.insert(&key(1, 105, 3)));
        assert_eq!(l.len(), BLOCK_CAP + 3);
    }

    #[test]
    fn key_exactly_at_a_fence_is_found_and_replaced_in_its_block() {
        let mut l = Leaf::new();
        for i in 0..(3 * BLOCK_CAP) as u64 {
            l.insert(&key(1, i * 8 + 8, 8));
        }
        audit(&l);
        assert!(l.refs.len() >= 3);
        let fence_pos = l.refs[0].block.pos(l.refs[0].block.len - 1);
        assert!(!l.insert(&key(fence_pos.dev, fence_pos.sector, 8)), "fence key is a duplicate");
        // first_after the fence is the first key of the next block.
        let loc = l.first_after(fence_pos).unwrap();
        assert_eq!(loc, Loc { block: 1, slot: 0 });
        assert_eq!(l.key(loc).end, fence_pos.sector + 8);
        // first_after just before the fence is the fence key itself.
        let loc = l.first_after(Pos::new(1, fence_pos.sector - 1)).unwrap();
        assert_eq!(l.key(loc).pos(), fence_pos);
        let new = Key { dirty: true, ..key(1, fence_pos.sector, 8) };
        l.set(loc, &new);
        assert_eq!(l.key(loc), new);
        // Removing the fence key moves the fence to the block's new last key.
        assert_eq!(l.remove(fence_pos), Some(new));
        audit(&l);
        assert_eq!(l.remove(fence_pos), None);
    }

    #[test]
    fn removals_merge_and_borrow_between_blocks() {
        let mut l = Leaf::new();
        let n = 6 * BLOCK_CAP as u64;
        for i in 0..n {
            l.insert(&key(1, i + 1, 1));
        }
        audit(&l);
        let before = l.refs.len();
        // Empty the second block almost entirely: it must merge or borrow, never stay tiny.
        let second: Vec<Pos> = (0..l.refs[1].block.len).map(|i| l.refs[1].block.pos(i)).collect();
        for p in &second[..second.len() - 1] {
            assert!(l.remove(*p).is_some());
            audit(&l);
            assert!(l.refs.iter().all(|r| r.block.len >= BLOCK_MIN) || l.refs.len() == 1);
        }
        assert!(l.refs.len() < before, "the emptied block was merged away");
        // Remove everything from the back, then the front: the leaf ends empty and consistent.
        for i in (n / 2..n).rev() {
            l.remove(Pos::new(1, i + 1));
            audit(&l);
        }
        for i in 0..n / 2 {
            l.remove(Pos::new(1, i + 1));
            audit(&l);
        }
        assert_eq!(l.len(), 0);
        assert!(l.refs.is_empty() && l.first().is_none() && l.first_after(Pos::MIN).is_none());
    }

    #[test]
    fn an_underfull_block_borrows_from_a_full_neighbour_both_ways() {
        // Underfull left block, full right block: the left one takes keys from the right.
        let keys: Vec<Key> = (0..2 * BUILD_FILL as u64).map(|i| key(1, i * 10 + 10, 1)).collect();
        let mut l = Leaf::from_sorted(&keys);
        assert_eq!(block_sizes(&l), vec![BUILD_FILL, BUILD_FILL]);
        let mut extra = Vec::new();
        for i in 0..(BLOCK_CAP - BUILD_FILL) as u64 {
            let k = key(1, keys[BUILD_FILL].end + 1 + i, 1);
            assert!(l.insert(&k));
            extra.push(k);
        }
        assert_eq!(block_sizes(&l), vec![BUILD_FILL, BLOCK_CAP]);
        for k in &keys[..BUILD_FILL - BLOCK_MIN + 1] {
            assert!(l.remove(k.pos()).is_some());
        }
        audit(&l);
        let sizes = block_sizes(&l);
        assert_eq!(sizes.len(), 2, "{sizes:?}");
        assert!(sizes.iter().all(|s| *s > BLOCK_CAP / 2), "evened out: {sizes:?}");
        let mut want: Vec<Key> = keys[BUILD_FILL - BLOCK_MIN + 1..].to_vec();
        want.extend(extra);
        want.sort_by_key(Key::pos);
        assert_eq!(contents(&l), want);
        for k in &want {
            assert_eq!(l.first_after(Pos::new(k.dev, k.end - 1)).map(|loc| l.key(loc)), Some(*k));
        }

        // Full left block, underfull right block (the last one): it takes keys from the left.
        let mut l = Leaf::from_sorted(&keys);
        for i in 0..(BLOCK_CAP - BUILD_FILL) as u64 {
            assert!(l.insert(&key(1, keys[0].end + 1 + i, 1)));
        }
        assert_eq!(block_sizes(&l), vec![BLOCK_CAP, BUILD_FILL]);
        for k in &keys[BUILD_FILL..2 * BUILD_FILL - BLOCK_MIN + 1] {
            assert!(l.remove(k.pos()).is_some());
        }
        audit(&l);
        let sizes = block_sizes(&l);
        assert!(sizes.len() == 2 && sizes.iter().all(|s| *s > BLOCK_CAP / 2), "{sizes:?}");
    }

    #[test]
    fn iteration_crosses_block_boundaries_and_devices() {
        let mut l = Leaf::new();
        let mut want = Vec::new();
        for dev in [1u32, 2, 7] {
            for i in 0..(2 * BLOCK_CAP) as u64 {
                let k = key(dev, u64::MAX - 1000 + i * 3, 2);
                l.insert(&k);
                want.push(k);
            }
        }
        want.sort_by_key(Key::pos);
        audit(&l);
        assert_eq!(contents(&l), want);
        for (i, k) in want.iter().enumerate() {
            let after: Vec<Key> = l.iter_after(k.pos()).collect();
            assert_eq!(after, want[i + 1..], "iter_after {}", k.pos());
            let from_just_before: Vec<Key> = l.iter_after(Pos::new(k.dev, k.end - 1)).collect();
            assert_eq!(from_just_before, want[i..]);
        }
        assert_eq!(l.iter_after(Pos::new(1, 5)).count(), want.len());
        assert!(l.first_after(Pos::MAX).is_none());
        assert!(l.iter_after(Pos::new(7, u64::MAX)).next().is_none());
        assert_eq!(l.last_pos(), want.last().map(Key::pos));
    }

    #[test]
    fn split_half_matches_a_split_at_the_middle_key_and_append_restores() {
        for n in [2usize, 3, 5, BLOCK_CAP, BLOCK_CAP + 1, 5 * BLOCK_CAP + 7] {
            let keys: Vec<Key> = (0..n as u64).map(|i| key(1, i * 4 + 4, 4)).collect();
            for mut l in [Leaf::from_sorted(&keys), {
                let mut l = Leaf::new();
                for k in keys.iter().rev() {
                    l.insert(k);
                }
                l
            }] {
                audit(&l);
                let right = l.split_half().unwrap();
                audit(&l);
                audit(&right);
                assert_eq!(contents(&l), keys[..n / 2], "left half of {n}");
                assert_eq!(contents(&right), keys[n / 2..], "right half of {n}");
                l.append(right);
                audit(&l);
                assert_eq!(contents(&l), keys);
            }
        }
        assert!(Leaf::from_sorted(&[key(1, 8, 8)]).split_half().is_none());
    }

    #[test]
    fn append_rebalances_small_blocks_at_the_seam() {
        // Two single-block leaves of a few keys each (an emptying leaf and its neighbour): the
        // seam blocks merge.
        let mut left = Leaf::from_sorted(&[key(1, 1, 1), key(1, 2, 1)]);
        left.append(Leaf::from_sorted(&[key(1, 1000, 1)]));
        audit(&left);
        assert_eq!(block_sizes(&left), vec![3]);
        // A big leaf and a one-key leaf: the small block joins its neighbour.
        let big: Vec<Key> = (0..(3 * BLOCK_CAP) as u64).map(|i| key(1, i + 1, 1)).collect();
        let mut left = Leaf::from_sorted(&big);
        left.append(Leaf::from_sorted(&[key(1, 1000, 1)]));
        audit(&left);
        let mut right = Leaf::from_sorted(&[key(1, 0, 0)]);
        right.append(Leaf::from_sorted(&big[1..]));
        audit(&right);
        assert_eq!(left.len(), 3 * BLOCK_CAP + 1);
    }

    /// Random operations against a `BTreeMap`: the same content, order and lookups after each.
    #[test]
    fn random_ops_match_btreemap() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut l = Leaf::new();
        let mut m: BTreeMap<Pos, Key> = BTreeMap::new();
        for step in 0..20_000 {
            let p = Pos::new((rnd() % 3) as u32, rnd() % 600 + 1);
            match rnd() % 4 {
                0 | 1 => {
                    let k = key(p.dev, p.sector, 1);
                    assert_eq!(l.insert(&k), !m.contains_key(&p));
                    m.entry(p).or_insert(k);
                }
                2 => assert_eq!(l.remove(p), m.remove(&p)),
                _ => {
                    let got = l.first_after(p).map(|loc| l.key(loc));
                    let want = m.range((std::ops::Bound::Excluded(p), std::ops::Bound::Unbounded)).next();
                    assert_eq!(got.as_ref(), want.map(|(_, k)| k));
                }
            }
            if step % 97 == 0 {
                audit(&l);
                assert_eq!(contents(&l), m.values().copied().collect::<Vec<_>>());
            }
            if step % 1999 == 0 && l.len() >= 2 {
                let right = l.split_half().unwrap();
                audit(&right);
                l.append(right);
            }
        }
        audit(&l);
        assert_eq!(contents(&l), m.values().copied().collect::<Vec<_>>());
    }
}
