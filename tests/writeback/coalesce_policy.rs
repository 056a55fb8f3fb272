//! Property: coalesced write batches cover exactly the input extents, in order, each batch a
//! contiguous run on one device within the limits, and no two neighbouring batches could have
//! been merged (the grouping is maximal).

use proptest::prelude::*;
use ubcache::cache::writeback::policy::{CoalesceLimits, DirtyExtent, coalesce};

/// Sorted, non-overlapping extents over a few devices, with gaps of 0 (contiguous) or more.
fn sorted_extents() -> impl Strategy<Value = Vec<DirtyExtent>> {
    prop::collection::vec((0_u32..3, prop_oneof![Just(0_u64), 1_u64..20], 1_u64..40), 0..120).prop_map(
        |steps| {
            let mut out = Vec::with_capacity(steps.len());
            let mut dev = 0_u32;
            let mut cursor = 0_u64;
            for (dev_step, gap, len) in steps {
                // Mostly stay on the device; sometimes move to a later one (offsets restart).
                if dev_step == 2 {
                    dev += 1;
                    cursor = gap;
                } else {
                    cursor += gap;
                }
                out.push((dev, cursor, len));
                cursor += len;
            }
            out
        },
    )
}

proptest! {
    #[test]
    fn batches_cover_exactly_the_input_in_order(
        extents in sorted_extents(),
        max_io_len in 1_u64..100,
        max_extents in 1_usize..10,
    ) {
        let limits = CoalesceLimits { max_io_len, max_extents };
        let batches = coalesce(&extents, limits).unwrap();
        // Exact cover, in order, no reordering: the index ranges tile 0..n.
        let mut next = 0;
        for b in &batches {
            prop_assert_eq!(b.extents.start, next);
            prop_assert!(b.extents.end > b.extents.start);
            next = b.extents.end;
            let members = &extents[b.extents.clone()];
            // One device, contiguous, starting at the first member, as long as their sum.
            prop_assert!(members.iter().all(|e| e.0 == b.dev));
            prop_assert_eq!(members[0].1, b.start);
            for pair in members.windows(2) {
                prop_assert_eq!(pair[0].1 + pair[0].2, pair[1].1, "gap merged");
            }
            prop_assert_eq!(members.iter().map(|e| e.2).sum::<u64>(), b.len);
            prop_assert!(members.len() <= max_extents);
            prop_assert!(b.len <= max_io_len || members.len() == 1);
        }
        prop_assert_eq!(next, extents.len());
        // Maximal: a batch ends only at a device change, a gap, or a limit.
        for pair in batches.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let mergeable = a.dev == b.dev
                && a.start + a.len == b.start
                && a.len + extents[b.extents.start].2 <= max_io_len
                && a.extents.len() < max_extents;
            prop_assert!(!mergeable, "batches {:?} and {:?} should have merged", a, b);
        }
    }

    #[test]
    fn shuffled_input_is_refused_not_reordered(extents in sorted_extents(), swap in any::<prop::sample::Index>()) {
        prop_assume!(extents.len() >= 2);
        let mut shuffled = extents.clone();
        let i = swap.index(extents.len() - 1);
        shuffled.swap(i, i + 1);
        let limits = CoalesceLimits { max_io_len: 64, max_extents: 8 };
        prop_assert!(coalesce(&shuffled, limits).is_err());
    }
}
