//! Allocator behaviour: sector allocation, reserves, invalidation and durable generations,
//! victim policies, generation wrap, rebuild.

use ubcache::alloc::{
    AllocConfig, AllocError, AllocKind, Allocator, BucketState, GC_GEN_MAX, LiveExtent, OpenKind,
    PRIO_INITIAL, ReplacementPolicy, pick_victims,
};
use ubcache::format::{BucketTable, Geometry, JournalEntry};

/// 1 MiB of 8 KiB buckets (16 sectors): 128 buckets, the first 19 fixed metadata.
fn geometry() -> Geometry {
    Geometry::compute(1 << 20, 8192, 4096).unwrap()
}

fn cfg() -> AllocConfig {
    AllocConfig { btree_reserve: 3, journal_reserve: 1 }
}

/// Fills and seals `n` data buckets with clean live data; returns them.
fn fill_clean(a: &mut Allocator, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for _ in 0..n {
        let s = a.alloc_sectors(OpenKind::Data, 16).unwrap();
        assert_eq!(s.sectors, 16);
        assert!(a.add_live(s.offset, 16, s.generation, false).unwrap());
        a.unpin(s.bucket).unwrap();
        out.push(s.bucket);
    }
    out
}

#[test]
fn fresh_allocator_has_fixed_regions_and_free_buckets() {
    let g = geometry();
    let a = Allocator::new(&g, cfg());
    let st = a.stats();
    assert_eq!(st.reserved + st.journal + st.free, g.nbuckets);
    assert_eq!(st.journal, g.journal.count);
    assert_eq!(st.free, g.nbuckets - g.first_free_bucket());
    assert_eq!(a.bucket(0).unwrap().state, BucketState::Reserved);
    assert_eq!(a.bucket(g.journal.first).unwrap().state, BucketState::Journal);
    assert!(a.check().is_empty());
}

#[test]
fn sector_allocation_fills_one_bucket_then_opens_the_next() {
    let g = geometry();
    let mut a = Allocator::new(&g, cfg());
    let x = a.alloc_sectors(OpenKind::Data, 10).unwrap();
    assert_eq!(x.sectors, 10);
    assert_eq!(x.offset, g.bucket_start_sector(x.bucket));
    assert_eq!((x.ptr().offset, x.ptr().generation), (x.offset, x.generation));
    assert_eq!(a.bucket(x.bucket).unwrap().state, BucketState::Open(OpenKind::Data));
    // Only 6 sectors are left in the bucket: the grant is cut, and the bucket is sealed.
    let y = a.alloc_sectors(OpenKind::Data, 10).unwrap();
    assert_eq!((y.bucket, y.offset, y.sectors), (x.bucket, x.offset + 10, 6));
    assert_eq!(a.bucket(x.bucket).unwrap().state, BucketState::Data);
    let z = a.alloc_sectors(OpenKind::Data, 4).unwrap();
    assert_ne!(z.bucket, x.bucket);
    assert_eq!(a.bucket(x.bucket).unwrap().pins, 2, "both in-flight writes pin it");
    assert_eq!(
        a.alloc_sectors(OpenKind::Data, 0),
        Err(AllocError::Invalid("allocation of 0 sectors".into()))
    );
    // Btree node slots come from their own open bucket.
    let n = a.alloc_sectors(OpenKind::Btree, 8).unwrap();
    assert_ne!(n.bucket, z.bucket);
    assert_eq!(a.bucket(n.bucket).unwrap().state, BucketState::Open(OpenKind::Btree));
    assert!(a.check().is_empty(), "{:?}", a.check());
}

#[test]
fn data_never_takes_the_metadata_reserve() {
    let g = geometry();
    let mut a = Allocator::new(&g, cfg());
    let free = a.free_buckets();
    let mut data_buckets = 0;
    loop {
        match a.alloc_bucket(AllocKind::Data) {
            Ok(_) => data_buckets += 1,
            Err(AllocError::NoSpace { kind: AllocKind::Data, free, reserved }) => {
                assert_eq!(free, 4);
                assert_eq!(reserved, 4);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(data_buckets, free - 4);
    assert!(a.alloc_sectors(OpenKind::Data, 1).is_err());
    // Btree may take all but the journal reserve, the journal everything.
    for _ in 0..3 {
        a.alloc_bucket(AllocKind::Btree).unwrap();
    }
    assert!(matches!(
        a.alloc_bucket(AllocKind::Btree),
        Err(AllocError::NoSpace { kind: AllocKind::Btree, .. })
    ));
    let j = a.alloc_bucket(AllocKind::Journal).unwrap();
    assert!(a.alloc_bucket(AllocKind::Journal).is_err());
    // Releasing a metadata bucket returns it.
    a.release_bucket(j).unwrap();
    assert_eq!(a.free_buckets(), 1);
    assert!(a.check().is_empty());
}

#[test]
fn invalidated_bucket_is_reusable_only_after_its_generation_is_durable() {
    let g = geometry();
    let mut a = Allocator::new(&g, AllocConfig { btree_reserve: 0, journal_reserve: 0 });
    let buckets = fill_clean(&mut a, 3);
    let victim = buckets[0];
    let change = a.invalidate(victim).unwrap();
    assert_eq!(change.generation, 1);
    assert_eq!(change.entry(), JournalEntry::BucketGen { bucket: victim, generation: 1 });
    assert_eq!(a.bucket(victim).unwrap().state, BucketState::FreePending { token: change.token });
    assert_eq!(a.bucket(victim).unwrap().live_sectors, 0);
    // Old pointers are stale at once: they do not count and cannot be pinned.
    assert_eq!(
        a.pin(g.bucket_start_sector(victim), 0),
        Err(AllocError::Stale { bucket: victim, bucket_gen: 1, ptr_gen: 0 })
    );
    assert!(!a.remove_live(g.bucket_start_sector(victim), 16, 0, false).unwrap());

    // Use up every free bucket: the pending one is never handed out.
    while let Ok(b) = a.alloc_bucket(AllocKind::Data) {
        assert_ne!(b, victim);
    }
    assert_eq!(a.mark_gens_durable(change.token - 1), 0);
    assert_eq!(a.mark_gens_durable(change.token), 1);
    assert_eq!(a.bucket(victim).unwrap().state, BucketState::Free);
    let s = a.alloc_sectors(OpenKind::Data, 4).unwrap();
    assert_eq!((s.bucket, s.generation), (victim, 1));
    assert!(a.check().is_empty());
}

#[test]
fn dirty_pinned_open_and_metadata_buckets_are_not_invalidated() {
    let g = geometry();
    let mut a = Allocator::new(&g, cfg());
    let dirty = a.alloc_sectors(OpenKind::Data, 16).unwrap();
    a.add_live(dirty.offset, 16, dirty.generation, true).unwrap();
    a.unpin(dirty.bucket).unwrap();
    assert!(matches!(a.invalidate(dirty.bucket), Err(AllocError::Busy { .. })));
    // Written back: clean now, so it may go.
    assert!(a.set_clean(dirty.offset, 16, dirty.generation).unwrap());
    let clean = fill_clean(&mut a, 1)[0];
    let b = a.pin(g.bucket_start_sector(clean) + 3, 0).unwrap();
    assert_eq!(b, clean);
    assert!(matches!(a.invalidate(clean), Err(AllocError::Busy { pins: 1, .. })));
    a.unpin(clean).unwrap();
    assert!(a.unpin(clean).is_err(), "unbalanced unpin is an error");
    let open = a.alloc_sectors(OpenKind::Data, 3).unwrap();
    a.unpin(open.bucket).unwrap();
    assert!(matches!(a.invalidate(open.bucket), Err(AllocError::Busy { .. })));
    assert!(matches!(a.invalidate(0), Err(AllocError::Busy { state: BucketState::Reserved, .. })));
    assert!(matches!(a.invalidate(g.journal.first), Err(AllocError::Busy { .. })));
    assert!(a.invalidate(g.nbuckets).is_err());
    a.invalidate(dirty.bucket).unwrap();
    a.invalidate(clean).unwrap();
}

#[test]
fn victim_policies_pick_in_their_order_and_skip_what_is_not_reclaimable() {
    let g = geometry();
    let mut a = Allocator::new(&g, cfg());
    let buckets = fill_clean(&mut a, 6);
    // Bucket 1 hot, bucket 2 half empty, bucket 3 dirty, bucket 4 pinned.
    a.decay_prios(PRIO_INITIAL / 2);
    a.touch(buckets[1]);
    a.remove_live(g.bucket_start_sector(buckets[2]), 8, 0, false).unwrap();
    let d = a.alloc_sectors(OpenKind::Data, 16).unwrap();
    a.add_live(d.offset, 16, 0, true).unwrap();
    a.unpin(d.bucket).unwrap();
    a.pin(g.bucket_start_sector(buckets[4]), 0).unwrap();

    let lru = pick_victims(ReplacementPolicy::Lru, 0, a.buckets(), 10);
    assert_eq!(lru, vec![buckets[2], buckets[0], buckets[3], buckets[5], buckets[1]]);
    assert!(!lru.contains(&d.bucket) && !lru.contains(&buckets[4]));
    let fifo = pick_victims(ReplacementPolicy::Fifo, 0, a.buckets(), 3);
    assert_eq!(fifo, vec![buckets[0], buckets[1], buckets[2]]);
    let r1 = pick_victims(ReplacementPolicy::Random, 7, a.buckets(), 5);
    let r2 = pick_victims(ReplacementPolicy::Random, 7, a.buckets(), 5);
    assert_eq!(r1, r2, "same seed, same pick");
    let mut sorted = r1.clone();
    sorted.sort_unstable();
    let mut expected = lru;
    expected.sort_unstable();
    assert_eq!(sorted, expected);
    let others: Vec<_> =
        (0..20).map(|s| pick_victims(ReplacementPolicy::Random, s, a.buckets(), 5)).collect();
    assert!(others.iter().any(|o| *o != r1), "seeds change the order");

    let changes = a.reclaim(ReplacementPolicy::Lru, 0, 2);
    assert_eq!(changes.iter().map(|c| c.bucket).collect::<Vec<_>>(), vec![buckets[2], buckets[0]]);
    assert!(changes[0].token < changes[1].token);
    assert!(a.check().is_empty());
}

#[test]
fn generation_cannot_run_too_far_ahead_of_the_oldest_pointer_until_gc() {
    let g = geometry();
    let mut a = Allocator::new(&g, AllocConfig { btree_reserve: 0, journal_reserve: 0 });
    let first = fill_clean(&mut a, 1)[0];
    // Cycle the same bucket: invalidate, make durable, refill. Use up all other buckets first
    // so the free list hands it back each time.
    while a.alloc_bucket(AllocKind::Data).is_ok() {}
    let mut bumps = 0u32;
    loop {
        match a.invalidate(first) {
            Ok(c) => {
                bumps += 1;
                a.mark_gens_durable(c.token);
                let s = a.alloc_sectors(OpenKind::Data, 16).unwrap();
                assert_eq!(s.bucket, first);
                a.add_live(s.offset, 16, s.generation, false).unwrap();
                a.unpin(s.bucket).unwrap();
                if bumps >= u32::from(GC_GEN_MAX) / 2 {
                    assert!(a.wants_gc());
                }
            }
            Err(AllocError::NeedsGc { bucket, generation, oldest_gen }) => {
                assert_eq!(bucket, first);
                assert_eq!(generation.wrapping_sub(oldest_gen), GC_GEN_MAX);
                break;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(bumps <= 300, "never blocked");
    }
    assert_eq!(bumps, u32::from(GC_GEN_MAX));
    assert!(
        !pick_victims(ReplacementPolicy::Lru, 0, a.buckets(), 1000).contains(&first),
        "reclaim skips it too"
    );
    // GC: snapshot, (engine drops stale pointers), finish.
    let snap = a.gc_begin();
    a.gc_finish(&snap);
    assert!(!a.wants_gc());
    a.invalidate(first).unwrap();
}

#[test]
fn rebuild_recovers_states_counts_and_oldest_generations() {
    let g = geometry();
    let n = g.nbuckets as usize;
    let bs = u64::from(g.bucket_sectors);
    let mut table = BucketTable { seq: 3, gens: vec![0; n], prios: vec![100; n] };
    let data = g.first_free_bucket();
    let btree = data + 1;
    let stale_only = data + 2;
    table.gens[data as usize] = 10;
    table.gens[stale_only as usize] = 250;
    let live = vec![
        LiveExtent { offset: data * bs, sectors: 4, generation: 10, dirty: true },
        LiveExtent { offset: data * bs + 4, sectors: 8, generation: 10, dirty: false },
        LiveExtent { offset: data * bs + 12, sectors: 4, generation: 2, dirty: true }, // stale
        LiveExtent { offset: stale_only * bs, sectors: 4, generation: 200, dirty: false }, // stale
    ];
    let nodes = vec![btree * bs, btree * bs + 8];
    let a = Allocator::rebuild(&g, &table, live, nodes, cfg()).unwrap();
    let d = a.bucket(data).unwrap();
    assert_eq!(
        (d.state, d.live_sectors, d.dirty_sectors, d.generation, d.oldest_gen),
        (BucketState::Data, 12, 4, 10, 2)
    );
    let b = a.bucket(btree).unwrap();
    assert_eq!((b.state, b.live_sectors), (BucketState::Btree, 16));
    let s = a.bucket(stale_only).unwrap();
    assert_eq!((s.state, s.oldest_gen), (BucketState::Free, 200));
    assert_eq!(a.bucket(data + 3).unwrap().prio, 100);
    assert_eq!(a.free_buckets(), g.nbuckets - g.first_free_bucket() - 2);
    assert!(a.check().is_empty(), "{:?}", a.check());
    assert_eq!(a.table(4).gens, table.gens);

    // Corrupt inputs are errors, not panics.
    let bad_key = LiveExtent { offset: data * bs + 12, sectors: 8, generation: 10, dirty: false };
    assert!(Allocator::rebuild(&g, &table, [bad_key], [], cfg()).is_err(), "crosses a bucket");
    let in_meta = LiveExtent { offset: 0, sectors: 1, generation: 0, dirty: false };
    assert!(Allocator::rebuild(&g, &table, [in_meta], [], cfg()).is_err());
    let in_btree = LiveExtent { offset: btree * bs, sectors: 1, generation: 0, dirty: false };
    assert!(Allocator::rebuild(&g, &table, [in_btree], [btree * bs], cfg()).is_err());
    let over = (0..3).map(|_| LiveExtent { offset: data * bs, sectors: 8, generation: 10, dirty: false });
    assert!(Allocator::rebuild(&g, &table, over, [], cfg()).is_err(), "more live than the bucket");
    // A pointer with a generation the bucket never durably had (or one GC should have
    // removed): advancing the bucket could resurrect it, so rebuild refuses.
    let future = LiveExtent { offset: data * bs, sectors: 1, generation: 11, dirty: false };
    assert!(Allocator::rebuild(&g, &table, [future], [], cfg()).is_err());
    let ancient = LiveExtent {
        offset: data * bs,
        sectors: 1,
        generation: 10u8.wrapping_sub(GC_GEN_MAX + 1),
        dirty: false,
    };
    assert!(Allocator::rebuild(&g, &table, [ancient], [], cfg()).is_err());
    let short = BucketTable { seq: 1, gens: vec![0; n - 1], prios: vec![0; n - 1] };
    assert!(Allocator::rebuild(&g, &short, [], [], cfg()).is_err());
}

#[test]
fn lru_picks_the_n_coldest_emptiest_of_many_in_order() {
    let g = geometry();
    let mut a = Allocator::new(&g, AllocConfig { btree_reserve: 0, journal_reserve: 0 });
    // Buckets with 1..=16 live sectors, filled in a scrambled order, same priority.
    let mut filled = Vec::new();
    for i in 0..40u32 {
        let live = (i * 7) % 16 + 1;
        let s = a.alloc_sectors(OpenKind::Data, 16).unwrap();
        a.add_live(s.offset, live, s.generation, false).unwrap();
        a.unpin(s.bucket).unwrap();
        filled.push((live, s.bucket));
    }
    let mut expected = filled.clone();
    expected.sort_unstable();
    let want: Vec<u64> = expected.iter().take(6).map(|&(_, b)| b).collect();
    assert_eq!(pick_victims(ReplacementPolicy::Lru, 0, a.buckets(), 6), want);
    let fifo: Vec<u64> = filled.iter().take(6).map(|&(_, b)| b).collect();
    assert_eq!(pick_victims(ReplacementPolicy::Fifo, 0, a.buckets(), 6), fifo);
    let random = pick_victims(ReplacementPolicy::Random, 3, a.buckets(), 6);
    assert_eq!(random.len(), 6);
    let mut dedup = random;
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), 6, "no bucket picked twice");
    assert!(pick_victims(ReplacementPolicy::Lru, 0, a.buckets(), 0).is_empty());
    assert_eq!(pick_victims(ReplacementPolicy::Lru, 0, a.buckets(), 1000).len(), 40);
}

#[test]
fn cross_check_finds_counts_the_btree_does_not_back() {
    let g = geometry();
    let bs = u64::from(g.bucket_sectors);
    let mut a = Allocator::new(&g, cfg());
    let x = a.alloc_sectors(OpenKind::Data, 8).unwrap();
    a.add_live(x.offset, 8, x.generation, true).unwrap();
    a.unpin(x.bucket).unwrap();
    let node = a.alloc_sectors(OpenKind::Btree, 8).unwrap();
    a.add_live(node.offset, 8, node.generation, false).unwrap();
    a.unpin(node.bucket).unwrap();
    let key = LiveExtent { offset: x.offset, sectors: 8, generation: x.generation, dirty: true };
    assert!(
        a.cross_check(&g, [key], [node.offset]).is_empty(),
        "{:?}",
        a.cross_check(&g, [key], [node.offset])
    );
    // The btree says clean, the allocator dirty.
    let clean = LiveExtent { dirty: false, ..key };
    let problems = a.cross_check(&g, [clean], [node.offset]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains(&format!("bucket {}", x.bucket)));
    // A key into a free bucket.
    let stray = LiveExtent { offset: (x.bucket + 5) * bs, sectors: 2, generation: 0, dirty: false };
    let problems = a.cross_check(&g, [key, stray], [node.offset]);
    assert!(problems.iter().any(|p| p.contains("btree uses it")), "{problems:?}");
    // A node the allocator does not count.
    assert!(!a.cross_check(&g, [key], [node.offset, node.offset + 8]).is_empty());
}
