//! The bucket allocator: generations, priorities, free lists with reserves, open buckets,
//! live/dirty sector counts, pins, and reclaim.
//!
//! # API summary
//! ```text
//! Allocator::new(&geometry, cfg) -> Allocator                         // freshly formatted cache
//! Allocator::rebuild(&geometry, &table, live_extents, btree_node_sectors, cfg) -> Result<Allocator>
//! alloc.alloc_sectors(OpenKind::Data, n) -> Result<SectorAlloc>        // pinned; unpin after the btree insert
//! alloc.alloc_bucket(AllocKind::Btree) -> Result<u64>                  // a whole bucket
//! alloc.add_live(offset, sectors, generation, dirty) / remove_live(..) / set_clean(..) -> Result<bool /*counted*/>
//! alloc.pin(offset, generation) -> Result<u64 /*bucket*/>; alloc.unpin(bucket)
//! alloc.touch(bucket); alloc.decay_prios(amount)                       // LRU priority
//! pick_victims(&policy, alloc.buckets(), n) -> Vec<u64>                 // pure policy
//! alloc.invalidate(bucket) -> Result<GenChange>; alloc.reclaim(&policy, n) -> Vec<GenChange>
//! alloc.mark_gens_durable(upto_token) -> usize                          // FreePending -> Free
//! alloc.release_bucket(bucket)                                          // empty btree/journal bucket -> Free
//! alloc.gc_begin() -> GcSnapshot; alloc.gc_finish(snapshot)             // generation wrap bookkeeping
//! alloc.table(seq) -> BucketTable; alloc.stats(); alloc.check() -> Vec<String>
//! alloc.cross_check(&geometry, live_extents, btree_node_sectors) -> Vec<String>   // fsck
//! ```
//! The allocator does no I/O and takes `&mut self`: the engine keeps it behind its own lock.
//!
//! # Bucket life cycle
//! `Free -> Open(kind) -> Data | Btree` (sealed when full) `-> FreePending -> Free`.
//! Data buckets are dirty while `dirty_sectors > 0`; dirty, pinned, open and metadata buckets
//! are never reclaimed. Invalidation bumps the generation, which makes every pointer into the
//! bucket stale at once (a pointer is valid only while `ptr.generation == bucket.generation`), and parks the
//! bucket in `FreePending { token }`. The engine journals the [`GenChange`] (as
//! [`crate::format::JournalEntry::BucketGen`]), commits, and then calls
//! [`Allocator::mark_gens_durable`]`(token)`: only then can the bucket be allocated again
//! (crash rule 2: reuse only after the new generation is durable). Tokens are handed out in
//! increasing order; the engine must journal generation changes in token order (it does so naturally by
//! appending while it holds the allocator lock).
//!
//! # Generation wrap
//! Generations are 8 bits. A stale pointer with generation `g` into a bucket at generation `g + 256` would
//! look valid again. As in bcache (`BUCKET_GC_GEN_MAX`), every bucket remembers `oldest_gen`,
//! the oldest generation a pointer into it may still carry; [`Allocator::invalidate`] refuses
//! (with [`AllocError::NeedsGc`]) to move `generation` more than [`GC_GEN_MAX`] (96) ahead of it, and
//! reclaim skips such buckets. GC: [`Allocator::gc_begin`] snapshots the generations, the engine
//! walks the whole btree and removes every pointer whose generation differs from its bucket's current
//! generation, then [`Allocator::gc_finish`] raises each `oldest_gen` to the snapshot.
//! [`Allocator::wants_gc`] turns true at half the distance so GC runs before anything blocks.
//!
//! # Priorities (LRU policy)
//! bcache-like: a bucket gets [`PRIO_INITIAL`] when opened and on every read hit
//! ([`Allocator::touch`]); [`Allocator::decay_prios`] lowers all of them over time. LRU reclaim
//! picks the lowest `prio * live_sectors` first, so empty and cold buckets go first.

use crate::format::{self, BucketTable, Geometry, JournalEntry};
use std::collections::VecDeque;

/// Most generations a bucket may run ahead of the oldest pointer into it (bcache's
/// BUCKET_GC_GEN_MAX): far below 256, so a stale pointer can never alias a new generation.
pub const GC_GEN_MAX: u8 = 96;
/// Priority of a freshly opened or just-hit bucket.
pub const PRIO_INITIAL: u16 = 32768;

/// Errors of the allocator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    /// No bucket may be handed out for this kind (reserves included). Reclaim or write back.
    #[error("no free bucket for {kind:?}: {free} free, {reserved} reserved for metadata")]
    NoSpace { kind: AllocKind, free: u64, reserved: u64 },
    /// The pointer's generation no longer matches its bucket: the data is gone.
    #[error("stale pointer: bucket {bucket} is at generation {bucket_gen}, pointer has generation {ptr_gen}")]
    Stale { bucket: u64, bucket_gen: u8, ptr_gen: u8 },
    /// The bucket's generation would run too far ahead of its oldest pointer: run GC first.
    #[error(
        "bucket {bucket} needs GC before its generation may advance (generation {generation}, oldest {oldest_gen})"
    )]
    NeedsGc { bucket: u64, generation: u8, oldest_gen: u8 },
    /// The bucket may not be invalidated/released in its current state.
    #[error("bucket {bucket} cannot be {op} in state {state:?} (pins {pins}, dirty sectors {dirty})")]
    Busy { bucket: u64, op: &'static str, state: BucketState, pins: u32, dirty: u32 },
    /// An address or count that cannot be right (outside the device, crossing a bucket,
    /// underflowing a count): an engine bug or corrupt metadata.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl From<AllocError> for crate::dev::DevError {
    fn from(e: AllocError) -> Self {
        match e {
            AllocError::NoSpace { .. } => crate::dev::DevError::NoSpace(e.to_string()),
            AllocError::Invalid(_) => crate::dev::DevError::Corrupted(e.to_string()),
            _ => crate::dev::DevError::Invalid(e.to_string()),
        }
    }
}

pub type AllocResult<T> = Result<T, AllocError>;

/// What a whole bucket is allocated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocKind {
    Data,
    Btree,
    Journal,
}

/// What an open (being filled, sector by sector) bucket holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenKind {
    Data,
    Btree,
}

/// State of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketState {
    /// Superblock area and bucket-table regions: never allocated.
    Reserved,
    /// Journal (the ring fixed at format, or a bucket allocated with [`AllocKind::Journal`]).
    Journal,
    /// Allocatable.
    Free,
    /// Invalidated (generation bumped) but the new generation is not yet durable; allocatable after
    /// [`Allocator::mark_gens_durable`] covers `token`.
    FreePending { token: u64 },
    /// Being filled by sector allocations.
    Open(OpenKind),
    /// Sealed data bucket (dirty while `dirty_sectors > 0`).
    Data,
    /// Holds btree node slots.
    Btree,
}

/// Per-bucket bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub state: BucketState,
    pub generation: u8,
    /// Oldest generation a pointer into this bucket may still carry (see "Generation wrap").
    pub oldest_gen: u8,
    pub prio: u16,
    /// Sectors referenced by valid (current-generation) keys or node slots.
    pub live_sectors: u32,
    /// Of those, sectors of dirty keys.
    pub dirty_sectors: u32,
    /// In-flight reads and writes; a pinned bucket is never reclaimed.
    pub pins: u32,
    /// Allocation order of the bucket's last opening (FIFO policy).
    pub opened_at: u64,
}

impl Bucket {
    fn new(state: BucketState, generation: u8, prio: u16) -> Self {
        Self {
            state,
            generation,
            oldest_gen: generation,
            prio,
            live_sectors: 0,
            dirty_sectors: 0,
            pins: 0,
            opened_at: 0,
        }
    }
    /// A sealed data bucket holding dirty data.
    #[must_use]
    pub fn is_dirty(&self) -> bool {
        self.dirty_sectors > 0
    }
    /// Whether the generation may advance now without risking a wrap.
    #[must_use]
    pub fn gen_can_advance(&self) -> bool {
        self.generation.wrapping_add(1).wrapping_sub(self.oldest_gen) <= GC_GEN_MAX
    }
    /// Whether reclaim may take this bucket: sealed clean data, unpinned, generation may advance.
    #[must_use]
    pub fn is_reclaimable(&self) -> bool {
        self.state == BucketState::Data && self.dirty_sectors == 0 && self.pins == 0 && self.gen_can_advance()
    }
}

pub use crate::format::ReplacementPolicy;

/// Picks up to `n` reclaimable buckets (see [`Bucket::is_reclaimable`]) by `policy`: LRU takes
/// the lowest `prio * live_sectors`, FIFO the oldest opened, random a uniform pick reproducible
/// from `seed` (which only random uses). Pure: the caller invalidates what it returns.
#[must_use]
pub fn pick_victims(policy: ReplacementPolicy, seed: u64, buckets: &[Bucket], n: usize) -> Vec<u64> {
    let mut candidates: Vec<u64> =
        (0..buckets.len() as u64).filter(|&b| buckets[b as usize].is_reclaimable()).collect();
    let n = n.min(candidates.len());
    if n == 0 {
        return Vec::new();
    }
    // Selection of the best n is O(buckets); only those n are sorted.
    let mut take_smallest = |key: &dyn Fn(u64) -> (u64, u64, u64)| {
        if n < candidates.len() {
            candidates.select_nth_unstable_by_key(n - 1, |&b| key(b));
        }
        candidates.truncate(n);
        candidates.sort_unstable_by_key(|&b| key(b));
    };
    match policy {
        ReplacementPolicy::Lru => take_smallest(&|b| {
            let k = &buckets[b as usize];
            (u64::from(k.prio) * u64::from(k.live_sectors), u64::from(k.prio), b)
        }),
        ReplacementPolicy::Fifo => take_smallest(&|b| (buckets[b as usize].opened_at, b, 0)),
        ReplacementPolicy::Random => {
            // Partial Fisher-Yates with splitmix64: the first n are a uniform random pick,
            // reproducible from the seed.
            let mut state = seed;
            let len = candidates.len();
            for i in 0..n {
                let j = i + (format::splitmix64(&mut state) % (len - i) as u64) as usize;
                candidates.swap(i, j);
            }
            candidates.truncate(n);
        }
    }
    candidates
}

/// Reserves: how many free buckets only metadata may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocConfig {
    /// Free buckets data allocation never takes, kept for btree nodes (so a btree split or a
    /// checkpoint can always proceed, which is what frees space).
    pub btree_reserve: u64,
    /// Free buckets neither data nor btree take, kept for journal buckets.
    pub journal_reserve: u64,
}

impl Default for AllocConfig {
    fn default() -> Self {
        Self { btree_reserve: 4, journal_reserve: 0 }
    }
}

/// A sector allocation inside an open bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorAlloc {
    pub bucket: u64,
    /// Absolute cache-device sector.
    pub offset: u64,
    /// Granted sectors: at most the request; less when the bucket ran out (allocate again for
    /// the rest).
    pub sectors: u32,
    /// The bucket generation to put in the pointer.
    pub generation: u8,
}

impl SectorAlloc {
    /// The btree pointer to the allocated sectors.
    #[must_use]
    pub fn ptr(&self) -> format::Ptr {
        format::Ptr { offset: self.offset, generation: self.generation }
    }
}

/// A generation change to journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenChange {
    pub bucket: u64,
    pub generation: u8,
    /// Pass to [`Allocator::mark_gens_durable`] once the change is durable.
    pub token: u64,
}

impl GenChange {
    /// The journal entry recording this change.
    #[must_use]
    pub fn entry(&self) -> JournalEntry {
        JournalEntry::BucketGen { bucket: self.bucket, generation: self.generation }
    }
}

/// A live extent (or btree node) found at recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveExtent {
    pub offset: u64,
    pub sectors: u32,
    pub generation: u8,
    pub dirty: bool,
}

impl From<&format::Key> for LiveExtent {
    fn from(k: &format::Key) -> Self {
        LiveExtent { offset: k.ptr.offset, sectors: k.size, generation: k.ptr.generation, dirty: k.dirty }
    }
}

/// Generations at the start of a GC pass.
#[derive(Debug, Clone)]
pub struct GcSnapshot {
    gens: Vec<u8>,
}

/// Counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocStats {
    pub free: u64,
    pub free_pending: u64,
    pub open: u64,
    pub clean_data: u64,
    pub dirty_data: u64,
    pub btree: u64,
    pub journal: u64,
    pub reserved: u64,
    pub pinned: u64,
    pub live_sectors: u64,
    pub dirty_sectors: u64,
}

#[derive(Debug, Clone, Copy)]
struct OpenBucket {
    bucket: u64,
    /// Next free sector within the bucket.
    fill: u32,
}

/// The allocator.
#[derive(Debug, Clone)]
pub struct Allocator {
    bucket_sectors: u32,
    cfg: AllocConfig,
    buckets: Vec<Bucket>,
    free: VecDeque<u64>,
    pending: VecDeque<(u64, u64)>,
    open: [Option<OpenBucket>; 2],
    next_token: u64,
    next_open_order: u64,
}

fn open_index(kind: OpenKind) -> usize {
    match kind {
        OpenKind::Data => 0,
        OpenKind::Btree => 1,
    }
}

impl Allocator {
    fn fixed_state(geometry: &Geometry, b: u64) -> Option<BucketState> {
        if geometry.journal.contains(b) {
            Some(BucketState::Journal)
        } else if geometry.is_fixed_metadata(b) {
            Some(BucketState::Reserved)
        } else {
            None
        }
    }

    fn with_buckets(geometry: &Geometry, buckets: Vec<Bucket>, cfg: AllocConfig) -> Self {
        let free =
            (0..buckets.len() as u64).filter(|&b| buckets[b as usize].state == BucketState::Free).collect();
        Self {
            bucket_sectors: geometry.bucket_sectors,
            cfg,
            buckets,
            free,
            pending: VecDeque::new(),
            open: [None, None],
            next_token: 1,
            next_open_order: 1,
        }
    }

    /// The allocator of a freshly formatted cache: every bucket outside the fixed regions is
    /// free at generation 0.
    #[must_use]
    pub fn new(geometry: &Geometry, cfg: AllocConfig) -> Self {
        let buckets = (0..geometry.nbuckets)
            .map(|b| Bucket::new(Self::fixed_state(geometry, b).unwrap_or(BucketState::Free), 0, 0))
            .collect();
        Self::with_buckets(geometry, buckets, cfg)
    }

    /// Rebuilds the allocator at recovery from the checkpointed bucket table (with the replayed
    /// `BucketGen` entries already applied to `table.gens`), every key of the btree after replay
    /// (`live`, stale ones included: they set `oldest_gen`), and the start sector of every btree
    /// node the tree uses (each takes `node_sectors`). Buckets with live data become `Data`,
    /// buckets with nodes `Btree`, the rest `Free` (no generation bump needed: nothing valid points
    /// into them).
    pub fn rebuild(
        geometry: &Geometry,
        table: &BucketTable,
        live: impl IntoIterator<Item = LiveExtent>,
        btree_node_sectors: impl IntoIterator<Item = u64>,
        cfg: AllocConfig,
    ) -> AllocResult<Self> {
        let n = geometry.nbuckets;
        if table.gens.len() as u64 != n || table.prios.len() as u64 != n {
            return Err(AllocError::Invalid(format!(
                "bucket table has {} gens / {} prios for {n} buckets",
                table.gens.len(),
                table.prios.len()
            )));
        }
        let mut buckets: Vec<Bucket> = (0..n)
            .map(|b| {
                let i = b as usize;
                Bucket::new(
                    Self::fixed_state(geometry, b).unwrap_or(BucketState::Free),
                    table.gens[i],
                    table.prios[i],
                )
            })
            .collect();
        let bucket_sectors = u64::from(geometry.bucket_sectors);
        let locate = |offset: u64, sectors: u32, what: &str| -> AllocResult<usize> {
            let b = offset / bucket_sectors;
            let end = offset.checked_add(u64::from(sectors));
            if b >= n || sectors == 0 || end.is_none_or(|e| (e - 1) / bucket_sectors != b) {
                return Err(AllocError::Invalid(format!(
                    "{what} at sector {offset} (+{sectors}) is outside one bucket of the device"
                )));
            }
            if geometry.is_fixed_metadata(b) {
                return Err(AllocError::Invalid(format!(
                    "{what} at sector {offset} lies in fixed metadata bucket {b}"
                )));
            }
            Ok(b as usize)
        };
        for node in btree_node_sectors {
            let b = locate(node, geometry.node_sectors, "btree node")?;
            let k = &mut buckets[b];
            k.state = BucketState::Btree;
            k.live_sectors = k.live_sectors.saturating_add(geometry.node_sectors);
        }
        let mut max_dist = vec![0u8; n as usize];
        for e in live {
            let b = locate(e.offset, e.sectors, "key")?;
            let k = &mut buckets[b];
            let dist = k.generation.wrapping_sub(e.generation);
            if dist > GC_GEN_MAX {
                // Either older than GC allows or newer than its bucket (a generation that was
                // never made durable): advancing the bucket could make it valid again, so the
                // cache must not be used until the key is removed.
                return Err(AllocError::Invalid(format!(
                    "key at sector {} has generation {}, bucket {b} is at {}: more than {GC_GEN_MAX} apart \
                     (stale pointer GC missed, or a generation from the future)",
                    e.offset, e.generation, k.generation
                )));
            }
            max_dist[b] = max_dist[b].max(dist);
            if dist != 0 {
                continue; // stale pointer: does not count, but holds oldest_gen back
            }
            if k.state == BucketState::Btree {
                return Err(AllocError::Invalid(format!(
                    "key at sector {} with current generation {} lies in btree bucket {b}",
                    e.offset, e.generation
                )));
            }
            k.state = BucketState::Data;
            k.live_sectors = k.live_sectors.saturating_add(e.sectors);
            if e.dirty {
                k.dirty_sectors = k.dirty_sectors.saturating_add(e.sectors);
            }
            if k.live_sectors > geometry.bucket_sectors {
                return Err(AllocError::Invalid(format!(
                    "bucket {b} has {} live sectors, more than its {} (overlapping keys?)",
                    k.live_sectors, geometry.bucket_sectors
                )));
            }
        }
        for (k, d) in buckets.iter_mut().zip(max_dist) {
            k.oldest_gen = k.generation.wrapping_sub(d);
        }
        Ok(Self::with_buckets(geometry, buckets, cfg))
    }

    /// All buckets, indexed by bucket number.
    #[must_use]
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// One bucket.
    #[must_use]
    pub fn bucket(&self, b: u64) -> Option<&Bucket> {
        self.buckets.get(usize::try_from(b).ok()?)
    }

    /// Number of allocatable buckets.
    #[must_use]
    pub fn free_buckets(&self) -> u64 {
        self.free.len() as u64
    }

    fn reserve_for(&self, kind: AllocKind) -> u64 {
        match kind {
            AllocKind::Data => self.cfg.btree_reserve + self.cfg.journal_reserve,
            AllocKind::Btree => self.cfg.journal_reserve,
            AllocKind::Journal => 0,
        }
    }

    fn take_free(&mut self, kind: AllocKind) -> AllocResult<u64> {
        let reserved = self.reserve_for(kind);
        if self.free.len() as u64 <= reserved {
            return Err(AllocError::NoSpace { kind, free: self.free.len() as u64, reserved });
        }
        // Free list entries are kept exact; the check guards against a bookkeeping bug.
        match self.free.pop_front() {
            Some(b) if self.buckets[b as usize].state == BucketState::Free => Ok(b),
            other => Err(AllocError::Invalid(format!("free list entry {other:?} is not free"))),
        }
    }

    /// Allocates a whole bucket for metadata (`Btree` or `Journal`) or as a sealed `Data` bucket.
    pub fn alloc_bucket(&mut self, kind: AllocKind) -> AllocResult<u64> {
        let b = self.take_free(kind)?;
        let order = self.next_open_order;
        self.next_open_order += 1;
        let k = &mut self.buckets[b as usize];
        k.state = match kind {
            AllocKind::Data => BucketState::Data,
            AllocKind::Btree => BucketState::Btree,
            AllocKind::Journal => BucketState::Journal,
        };
        k.prio = PRIO_INITIAL;
        k.opened_at = order;
        Ok(b)
    }

    /// Allocates up to `sectors` consecutive sectors in the open bucket of `kind` (opening a
    /// new one when needed). The bucket is pinned: call [`Allocator::unpin`] once the btree
    /// insert for the written data is done (or the write failed), so reclaim cannot take the
    /// bucket while the data is in flight and not yet counted live.
    pub fn alloc_sectors(&mut self, kind: OpenKind, sectors: u32) -> AllocResult<SectorAlloc> {
        if sectors == 0 {
            return Err(AllocError::Invalid("allocation of 0 sectors".into()));
        }
        let idx = open_index(kind);
        let ob = match self.open[idx] {
            Some(ob) if ob.fill < self.bucket_sectors => ob,
            _ => {
                let alloc_kind = match kind {
                    OpenKind::Data => AllocKind::Data,
                    OpenKind::Btree => AllocKind::Btree,
                };
                let b = self.take_free(alloc_kind)?;
                self.seal(kind);
                let order = self.next_open_order;
                self.next_open_order += 1;
                let k = &mut self.buckets[b as usize];
                k.state = BucketState::Open(kind);
                k.prio = PRIO_INITIAL;
                k.opened_at = order;
                OpenBucket { bucket: b, fill: 0 }
            }
        };
        let granted = sectors.min(self.bucket_sectors - ob.fill);
        let k = &mut self.buckets[ob.bucket as usize];
        k.pins += 1;
        let alloc = SectorAlloc {
            bucket: ob.bucket,
            offset: ob.bucket * u64::from(self.bucket_sectors) + u64::from(ob.fill),
            sectors: granted,
            generation: k.generation,
        };
        let fill = ob.fill + granted;
        self.open[idx] = Some(OpenBucket { bucket: ob.bucket, fill });
        if fill == self.bucket_sectors {
            self.seal(kind);
        }
        Ok(alloc)
    }

    /// Closes the open bucket of `kind`: it becomes `Data`/`Btree` and may be reclaimed.
    pub fn seal(&mut self, kind: OpenKind) {
        if let Some(ob) = self.open[open_index(kind)].take() {
            self.buckets[ob.bucket as usize].state = match kind {
                OpenKind::Data => BucketState::Data,
                OpenKind::Btree => BucketState::Btree,
            };
        }
    }

    fn locate(&self, offset: u64, sectors: u32) -> AllocResult<usize> {
        let bs = u64::from(self.bucket_sectors);
        let b = offset / bs;
        let ok = (b as usize) < self.buckets.len()
            && sectors > 0
            && offset.checked_add(u64::from(sectors)).is_some_and(|e| (e - 1) / bs == b);
        if !ok {
            return Err(AllocError::Invalid(format!(
                "extent at sector {offset} (+{sectors}) is not inside one bucket"
            )));
        }
        Ok(b as usize)
    }

    /// Counts `sectors` at `offset` as live (a key was inserted). Returns false (and counts
    /// nothing) for a stale pointer.
    pub fn add_live(&mut self, offset: u64, sectors: u32, generation: u8, dirty: bool) -> AllocResult<bool> {
        let b = self.locate(offset, sectors)?;
        let bucket_sectors = self.bucket_sectors;
        let k = &mut self.buckets[b];
        if k.generation != generation || matches!(k.state, BucketState::FreePending { .. }) {
            return Ok(false);
        }
        if !matches!(k.state, BucketState::Open(_) | BucketState::Data | BucketState::Btree) {
            return Err(AllocError::Invalid(format!(
                "live sectors added to bucket {b} in state {:?}",
                k.state
            )));
        }
        let live = k.live_sectors + sectors;
        if live > bucket_sectors {
            return Err(AllocError::Invalid(format!("bucket {b} would have {live} live sectors")));
        }
        k.live_sectors = live;
        if dirty {
            k.dirty_sectors += sectors;
        }
        Ok(true)
    }

    /// Uncounts `sectors` at `offset` (a key piece was displaced). Returns false for a stale
    /// pointer (it was not counted).
    pub fn remove_live(
        &mut self,
        offset: u64,
        sectors: u32,
        generation: u8,
        dirty: bool,
    ) -> AllocResult<bool> {
        let b = self.locate(offset, sectors)?;
        let k = &mut self.buckets[b];
        if k.generation != generation || matches!(k.state, BucketState::FreePending { .. }) {
            return Ok(false);
        }
        if k.live_sectors < sectors || (dirty && k.dirty_sectors < sectors) {
            return Err(AllocError::Invalid(format!(
                "bucket {b}: removing {sectors} sectors (dirty {dirty}) from live {} dirty {}",
                k.live_sectors, k.dirty_sectors
            )));
        }
        k.live_sectors -= sectors;
        if dirty {
            k.dirty_sectors -= sectors;
        }
        Ok(true)
    }

    /// A dirty extent became clean (written back, journalled).
    pub fn set_clean(&mut self, offset: u64, sectors: u32, generation: u8) -> AllocResult<bool> {
        let b = self.locate(offset, sectors)?;
        let k = &mut self.buckets[b];
        if k.generation != generation || matches!(k.state, BucketState::FreePending { .. }) {
            return Ok(false);
        }
        if k.dirty_sectors < sectors {
            return Err(AllocError::Invalid(format!(
                "bucket {b}: cleaning {sectors} sectors, only {} dirty",
                k.dirty_sectors
            )));
        }
        k.dirty_sectors -= sectors;
        Ok(true)
    }

    /// Pins the bucket of a pointer for an in-flight read. Fails with `Stale` if the pointer's
    /// generation is no longer the bucket's (treat as a miss).
    pub fn pin(&mut self, offset: u64, generation: u8) -> AllocResult<u64> {
        let b = self.locate(offset, 1)?;
        let k = &mut self.buckets[b];
        if k.generation != generation || !matches!(k.state, BucketState::Open(_) | BucketState::Data) {
            return Err(AllocError::Stale {
                bucket: b as u64,
                bucket_gen: k.generation,
                ptr_gen: generation,
            });
        }
        k.pins += 1;
        Ok(b as u64)
    }

    /// Drops one pin (from [`Allocator::pin`] or [`Allocator::alloc_sectors`]).
    pub fn unpin(&mut self, bucket: u64) -> AllocResult<()> {
        let k = self
            .buckets
            .get_mut(bucket as usize)
            .ok_or_else(|| AllocError::Invalid(format!("unpin of bucket {bucket} outside the device")))?;
        if k.pins == 0 {
            return Err(AllocError::Invalid(format!("unpin of unpinned bucket {bucket}")));
        }
        k.pins -= 1;
        Ok(())
    }

    /// A read hit the bucket: its priority goes back to [`PRIO_INITIAL`].
    pub fn touch(&mut self, bucket: u64) {
        if let Some(k) = self.buckets.get_mut(bucket as usize) {
            k.prio = k.prio.max(PRIO_INITIAL);
        }
    }

    /// Ages every priority by `amount` (call periodically, e.g. per N sectors of I/O).
    pub fn decay_prios(&mut self, amount: u16) {
        for k in &mut self.buckets {
            k.prio = k.prio.saturating_sub(amount);
        }
    }

    /// Invalidates a sealed, clean, unpinned data bucket (or an empty btree bucket is released
    /// with [`Allocator::release_bucket`] instead): bumps its generation and parks it in
    /// `FreePending`. Journal the returned change, commit, then [`Allocator::mark_gens_durable`].
    pub fn invalidate(&mut self, bucket: u64) -> AllocResult<GenChange> {
        let k = self.buckets.get(bucket as usize).ok_or_else(|| {
            AllocError::Invalid(format!("invalidate of bucket {bucket} outside the device"))
        })?;
        if k.state != BucketState::Data || k.dirty_sectors > 0 || k.pins > 0 {
            return Err(AllocError::Busy {
                bucket,
                op: "invalidated",
                state: k.state,
                pins: k.pins,
                dirty: k.dirty_sectors,
            });
        }
        if !k.gen_can_advance() {
            return Err(AllocError::NeedsGc { bucket, generation: k.generation, oldest_gen: k.oldest_gen });
        }
        let token = self.next_token;
        self.next_token += 1;
        let k = &mut self.buckets[bucket as usize];
        k.generation = k.generation.wrapping_add(1);
        k.state = BucketState::FreePending { token };
        k.live_sectors = 0;
        k.dirty_sectors = 0;
        k.prio = 0;
        self.pending.push_back((token, bucket));
        Ok(GenChange { bucket, generation: k.generation, token })
    }

    /// Picks up to `n` victims by `policy` (random: from `seed`) and invalidates them.
    pub fn reclaim(&mut self, policy: ReplacementPolicy, seed: u64, n: usize) -> Vec<GenChange> {
        let victims = pick_victims(policy, seed, &self.buckets, n);
        // pick_victims only returns buckets invalidate accepts, so nothing is dropped here.
        victims.into_iter().filter_map(|b| self.invalidate(b).ok()).collect()
    }

    /// The generation changes with token <= `upto` are durable: those buckets become allocatable.
    /// Returns how many buckets were freed.
    pub fn mark_gens_durable(&mut self, upto: u64) -> usize {
        let mut freed = 0;
        while let Some(&(token, b)) = self.pending.front() {
            if token > upto {
                break;
            }
            self.pending.pop_front();
            let k = &mut self.buckets[b as usize];
            if k.state == (BucketState::FreePending { token }) {
                k.state = BucketState::Free;
                self.free.push_back(b);
                freed += 1;
            }
        }
        freed
    }

    /// Returns an empty `Btree` or `Journal` bucket (allocated with
    /// [`Allocator::alloc_bucket`]) to the free list. The caller guarantees that the last
    /// durable checkpoint no longer references it (crash rule 3). No generation bump is needed: data
    /// pointers into it are all stale from before it became metadata.
    pub fn release_bucket(&mut self, bucket: u64) -> AllocResult<()> {
        let k = self
            .buckets
            .get(bucket as usize)
            .ok_or_else(|| AllocError::Invalid(format!("release of bucket {bucket} outside the device")))?;
        let releasable = match k.state {
            BucketState::Btree => k.pins == 0,
            BucketState::Journal => true,
            _ => false,
        };
        if !releasable || self.open.iter().flatten().any(|o| o.bucket == bucket) {
            return Err(AllocError::Busy {
                bucket,
                op: "released",
                state: k.state,
                pins: k.pins,
                dirty: k.dirty_sectors,
            });
        }
        let k = &mut self.buckets[bucket as usize];
        k.state = BucketState::Free;
        k.live_sectors = 0;
        k.dirty_sectors = 0;
        self.free.push_back(bucket);
        Ok(())
    }

    /// Starts a GC pass (see "Generation wrap").
    #[must_use]
    pub fn gc_begin(&self) -> GcSnapshot {
        GcSnapshot { gens: self.buckets.iter().map(|k| k.generation).collect() }
    }

    /// Ends a GC pass: every pointer older than the snapshot's generation has been removed.
    pub fn gc_finish(&mut self, snapshot: &GcSnapshot) {
        for (k, &g) in self.buckets.iter_mut().zip(&snapshot.gens) {
            // Only move forward: oldest_gen <= g <= generation in wrapping order.
            if g.wrapping_sub(k.oldest_gen) <= k.generation.wrapping_sub(k.oldest_gen) {
                k.oldest_gen = g;
            }
        }
    }

    /// Whether some bucket's generation is half way to [`GC_GEN_MAX`] ahead of its oldest
    /// pointer: run GC soon, before invalidation blocks.
    #[must_use]
    pub fn wants_gc(&self) -> bool {
        self.buckets.iter().any(|k| k.generation.wrapping_sub(k.oldest_gen) >= GC_GEN_MAX / 2)
    }

    /// The bucket table to checkpoint.
    #[must_use]
    pub fn table(&self, seq: u64) -> BucketTable {
        BucketTable {
            seq,
            gens: self.buckets.iter().map(|k| k.generation).collect(),
            prios: self.buckets.iter().map(|k| k.prio).collect(),
        }
    }

    /// Cross-checks the in-memory counts against the btree (for fsck): rebuilds an allocator
    /// from this one's generations and the given keys and node slots (as [`Allocator::rebuild`]
    /// takes them) and returns every bucket whose live or dirty count, or kind, disagrees.
    /// Open and free-pending buckets are compared by their counts only.
    #[must_use]
    pub fn cross_check(
        &self,
        geometry: &Geometry,
        live: impl IntoIterator<Item = LiveExtent>,
        btree_node_sectors: impl IntoIterator<Item = u64>,
    ) -> Vec<String> {
        let rebuilt = match Allocator::rebuild(geometry, &self.table(0), live, btree_node_sectors, self.cfg) {
            Ok(a) => a,
            Err(e) => return vec![format!("the btree does not fit the bucket table: {e}")],
        };
        let mut problems = Vec::new();
        for (b, (mine, theirs)) in self.buckets.iter().zip(&rebuilt.buckets).enumerate() {
            if (mine.live_sectors, mine.dirty_sectors) != (theirs.live_sectors, theirs.dirty_sectors) {
                problems.push(format!(
                    "bucket {b} ({:?}): counted live {} dirty {}, the btree has live {} dirty {}",
                    mine.state,
                    mine.live_sectors,
                    mine.dirty_sectors,
                    theirs.live_sectors,
                    theirs.dirty_sectors
                ));
            }
            let kinds_differ = matches!(
                (mine.state, theirs.state),
                (
                    BucketState::Data | BucketState::Open(OpenKind::Data) | BucketState::Free,
                    BucketState::Btree
                ) | (
                    BucketState::Btree | BucketState::Open(OpenKind::Btree) | BucketState::Free,
                    BucketState::Data
                )
            );
            if kinds_differ {
                problems.push(format!(
                    "bucket {b} is {:?} but the btree uses it as {:?}",
                    mine.state, theirs.state
                ));
            }
        }
        problems
    }

    /// Counts by state.
    #[must_use]
    pub fn stats(&self) -> AllocStats {
        let mut s = AllocStats::default();
        for k in &self.buckets {
            match k.state {
                BucketState::Reserved => s.reserved += 1,
                BucketState::Journal => s.journal += 1,
                BucketState::Free => s.free += 1,
                BucketState::FreePending { .. } => s.free_pending += 1,
                BucketState::Open(_) => s.open += 1,
                BucketState::Data if k.is_dirty() => s.dirty_data += 1,
                BucketState::Data => s.clean_data += 1,
                BucketState::Btree => s.btree += 1,
            }
            if k.pins > 0 {
                s.pinned += 1;
            }
            s.live_sectors += u64::from(k.live_sectors);
            s.dirty_sectors += u64::from(k.dirty_sectors);
        }
        s
    }

    /// Checks the allocator's own invariants; returns every violation found.
    #[must_use]
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut in_free = vec![false; self.buckets.len()];
        for &b in &self.free {
            match in_free.get_mut(b as usize) {
                Some(seen) if !*seen => *seen = true,
                _ => problems.push(format!("bucket {b} listed twice or out of range in the free list")),
            }
        }
        for (b, k) in self.buckets.iter().enumerate() {
            if (k.state == BucketState::Free) != in_free[b] {
                problems
                    .push(format!("bucket {b} state {:?} but free-list membership {}", k.state, in_free[b]));
            }
            if k.dirty_sectors > k.live_sectors || k.live_sectors > self.bucket_sectors {
                problems.push(format!("bucket {b}: live {} dirty {}", k.live_sectors, k.dirty_sectors));
            }
            if k.generation.wrapping_sub(k.oldest_gen) > GC_GEN_MAX {
                problems.push(format!(
                    "bucket {b}: generation {} too far ahead of oldest {}",
                    k.generation, k.oldest_gen
                ));
            }
            if let BucketState::FreePending { token } = k.state
                && !self.pending.contains(&(token, b as u64))
            {
                problems.push(format!("bucket {b} pending with token {token} not in the pending list"));
            }
            if let BucketState::Open(kind) = k.state
                && self.open[open_index(kind)].is_none_or(|o| o.bucket != b as u64)
            {
                problems.push(format!("bucket {b} open but not the open bucket of {kind:?}"));
            }
        }
        problems
    }
}
