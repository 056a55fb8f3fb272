//! Model-based test of the allocator: random sequences of allocation, insert, removal, write
//! back, read pins, reclaim, durable generations and metadata buckets. After every step:
//! - a bucket handed out was Free before the step (so never pinned, open, dirty, metadata, or
//!   free-pending with a non-durable generation), and its generation equals the last durable one;
//! - data allocation never took the metadata reserve;
//! - reclaim only took sealed clean unpinned data buckets;
//! - live/dirty counts equal the model's, and `Allocator::check` finds nothing.

use proptest::prelude::*;
use ubcache::alloc::{AllocConfig, AllocKind, Allocator, BucketState, OpenKind, ReplacementPolicy};
use ubcache::format::Geometry;

#[derive(Debug, Clone)]
enum Op {
    AllocData(u32),
    InsertInflight(usize, bool),
    FailInflight(usize),
    RemoveLive(usize),
    CleanLive(usize),
    PinRead(usize),
    UnpinRead(usize),
    Reclaim(u8, usize, u64),
    MarkDurable(u8),
    AllocMeta(bool),
    ReleaseMeta(usize),
    SealData,
    Decay(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u32..40).prop_map(Op::AllocData),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(i, d)| Op::InsertInflight(i, d)),
        1 => any::<usize>().prop_map(Op::FailInflight),
        2 => any::<usize>().prop_map(Op::RemoveLive),
        2 => any::<usize>().prop_map(Op::CleanLive),
        2 => any::<usize>().prop_map(Op::PinRead),
        2 => any::<usize>().prop_map(Op::UnpinRead),
        2 => (0u8..3, 1usize..6, any::<u64>()).prop_map(|(p, n, s)| Op::Reclaim(p, n, s)),
        2 => any::<u8>().prop_map(Op::MarkDurable),
        1 => any::<bool>().prop_map(Op::AllocMeta),
        1 => any::<usize>().prop_map(Op::ReleaseMeta),
        1 => Just(Op::SealData),
        1 => any::<u16>().prop_map(Op::Decay),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    bucket: u64,
    offset: u64,
    sectors: u32,
    generation: u8,
    dirty: bool,
}

#[derive(Default)]
struct Model {
    inflight: Vec<Extent>,
    live: Vec<Extent>,
    read_pins: Vec<u64>,
    meta: Vec<u64>,
    durable_gen: Vec<u8>,
    /// Gen changes handed out and not yet reported durable: (token, bucket, new gen).
    pending: Vec<(u64, u64, u8)>,
}

fn pick<T: Copy>(v: &[T], i: usize) -> Option<(usize, T)> {
    if v.is_empty() { None } else { Some((i % v.len(), v[i % v.len()])) }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    // 64 buckets, 45 of them allocatable: small, so buckets are reclaimed and reused constantly.
    let g = Geometry::compute(512 * 1024, 8192, 4096).unwrap();
    let cfg = AllocConfig { btree_reserve: 3, journal_reserve: 2 };
    let mut a = Allocator::new(&g, cfg);
    let mut m = Model { durable_gen: vec![0; g.nbuckets as usize], ..Model::default() };
    for (step, op) in ops.iter().enumerate() {
        let before: Vec<_> = a.buckets().to_vec();
        let free_before = a.free_buckets();
        let newly_taken = |a: &Allocator, b: u64| -> Result<(), TestCaseError> {
            let prev = before[b as usize];
            prop_assert_eq!(
                prev.state,
                BucketState::Free,
                "step {}: bucket {} handed out from {:?}",
                step,
                b,
                prev
            );
            prop_assert_eq!(prev.pins, 0);
            prop_assert_eq!(a.buckets()[b as usize].generation, m.durable_gen[b as usize]);
            prop_assert!(!g.is_fixed_metadata(b));
            Ok(())
        };
        match op.clone() {
            Op::AllocData(n) => {
                if let Ok(s) = a.alloc_sectors(OpenKind::Data, n) {
                    prop_assert!(s.sectors >= 1 && s.sectors <= n);
                    if before[s.bucket as usize].state != BucketState::Open(OpenKind::Data) {
                        newly_taken(&a, s.bucket)?;
                        prop_assert!(free_before > 5, "data took the reserve ({} free)", free_before);
                    }
                    prop_assert_eq!(s.generation, a.buckets()[s.bucket as usize].generation);
                    m.inflight.push(Extent {
                        bucket: s.bucket,
                        offset: s.offset,
                        sectors: s.sectors,
                        generation: s.generation,
                        dirty: false,
                    });
                } else {
                    prop_assert!(
                        free_before <= 5
                            || before.iter().any(|b| b.state == BucketState::Open(OpenKind::Data))
                    );
                }
            }
            Op::InsertInflight(i, dirty) => {
                if let Some((idx, mut e)) = pick(&m.inflight, i) {
                    m.inflight.swap_remove(idx);
                    e.dirty = dirty;
                    // The bucket was pinned since allocation, so the pointer cannot be stale.
                    prop_assert!(a.add_live(e.offset, e.sectors, e.generation, dirty).unwrap());
                    a.unpin(e.bucket).unwrap();
                    m.live.push(e);
                }
            }
            Op::FailInflight(i) => {
                if let Some((idx, e)) = pick(&m.inflight, i) {
                    m.inflight.swap_remove(idx);
                    a.unpin(e.bucket).unwrap();
                }
            }
            Op::RemoveLive(i) => {
                if let Some((idx, e)) = pick(&m.live, i) {
                    m.live.swap_remove(idx);
                    prop_assert!(a.remove_live(e.offset, e.sectors, e.generation, e.dirty).unwrap());
                }
            }
            Op::CleanLive(i) => {
                if let Some((idx, e)) = pick(&m.live, i)
                    && e.dirty
                {
                    prop_assert!(a.set_clean(e.offset, e.sectors, e.generation).unwrap());
                    m.live[idx].dirty = false;
                }
            }
            Op::PinRead(i) => {
                if let Some((_, e)) = pick(&m.live, i) {
                    prop_assert_eq!(a.pin(e.offset, e.generation).unwrap(), e.bucket);
                    m.read_pins.push(e.bucket);
                }
            }
            Op::UnpinRead(i) => {
                if let Some((idx, b)) = pick(&m.read_pins, i) {
                    m.read_pins.swap_remove(idx);
                    a.unpin(b).unwrap();
                }
            }
            Op::Reclaim(p, n, seed) => {
                let policy = match p {
                    0 => ReplacementPolicy::Lru,
                    1 => ReplacementPolicy::Fifo,
                    _ => ReplacementPolicy::Random,
                };
                for c in a.reclaim(policy, seed, n) {
                    let prev = before[c.bucket as usize];
                    prop_assert_eq!(prev.state, BucketState::Data, "reclaimed from {:?}", prev);
                    prop_assert_eq!(prev.pins, 0);
                    prop_assert_eq!(prev.dirty_sectors, 0);
                    prop_assert_eq!(c.generation, prev.generation.wrapping_add(1));
                    prop_assert!(!m.inflight.iter().any(|e| e.bucket == c.bucket));
                    prop_assert!(!m.read_pins.contains(&c.bucket));
                    // Keys into it are now stale: the engine would treat them as misses.
                    m.live.retain(|e| e.bucket != c.bucket);
                    m.pending.push((c.token, c.bucket, c.generation));
                }
            }
            Op::MarkDurable(fraction) => {
                // The engine committed the journal up to some of the pending changes.
                if let Some(&(first, _, _)) = m.pending.first() {
                    let last = m.pending.last().map_or(first, |p| p.0);
                    let upto = first + (last - first) * u64::from(fraction) / 255;
                    let freed = a.mark_gens_durable(upto);
                    let covered: Vec<_> = m.pending.iter().filter(|p| p.0 <= upto).copied().collect();
                    prop_assert_eq!(freed, covered.len());
                    for (_, b, generation) in covered {
                        m.durable_gen[b as usize] = generation;
                    }
                    m.pending.retain(|p| p.0 > upto);
                }
            }
            Op::AllocMeta(journal) => {
                let kind = if journal { AllocKind::Journal } else { AllocKind::Btree };
                if let Ok(b) = a.alloc_bucket(kind) {
                    newly_taken(&a, b)?;
                    if !journal {
                        prop_assert!(free_before > 2, "btree took the journal reserve");
                    }
                    m.meta.push(b);
                }
            }
            Op::ReleaseMeta(i) => {
                if let Some((idx, b)) = pick(&m.meta, i) {
                    m.meta.swap_remove(idx);
                    a.release_bucket(b).unwrap();
                }
            }
            Op::SealData => a.seal(OpenKind::Data),
            Op::Decay(n) => a.decay_prios(n),
        }
        let problems = a.check();
        prop_assert!(problems.is_empty(), "step {} {:?}: {:?}", step, op, problems);
        for (b, k) in a.buckets().iter().enumerate() {
            let live: u32 = m.live.iter().filter(|e| e.bucket == b as u64).map(|e| e.sectors).sum();
            let dirty: u32 =
                m.live.iter().filter(|e| e.bucket == b as u64 && e.dirty).map(|e| e.sectors).sum();
            if matches!(k.state, BucketState::Data | BucketState::Open(_)) {
                prop_assert_eq!(
                    (k.live_sectors, k.dirty_sectors),
                    (live, dirty),
                    "bucket {} step {}",
                    b,
                    step
                );
            }
            let pins = m.inflight.iter().filter(|e| e.bucket == b as u64).count()
                + m.read_pins.iter().filter(|&&p| p == b as u64).count();
            prop_assert_eq!(k.pins as usize, pins, "pins of bucket {}", b);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn random_operation_sequences_keep_every_allocator_promise(ops in proptest::collection::vec(op(), 1..400)) {
        run(&ops)?;
    }
}
