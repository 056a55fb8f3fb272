//! What the cache holds and how full it is: bucket, dirty and journal usage
//! ([`CacheSet::usage`]), the data capacity the writeback target is a share of, and which
//! backing devices are attached. Read by the writeback thread, the writeback drain and the
//! control socket's statistics.

use super::CachedDev;
use super::error::CacheResult;
use super::set::{CacheSet, Shared};
use crate::alloc::{BucketState, OpenKind};
use crate::dev::SECTOR_SIZE;
use std::sync::atomic::Ordering;

/// Space use of the cache device and the journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    pub bucket_bytes: u64,
    pub buckets_total: u64,
    /// Allocatable now or once a generation bump is durable.
    pub buckets_free: u64,
    /// Data buckets (sealed or open) without dirty sectors.
    pub buckets_clean: u64,
    /// Data buckets (sealed or open) holding dirty sectors.
    pub buckets_dirty: u64,
    /// Btree nodes, journal, superblocks and bucket tables.
    pub buckets_metadata: u64,
    /// Buckets pinned now by an in-flight read or writeback copy (they cannot be reused until
    /// it ends): 0 whenever the set is idle.
    pub buckets_pinned: u64,
    /// Dirty bytes in the whole tree (including devices not attached now).
    pub dirty_bytes: u64,
    /// Dirty bytes of attached devices: what writeback can write home now.
    pub attached_dirty_bytes: u64,
    /// Bytes of the cache that can hold data.
    pub data_capacity_bytes: u64,
    pub journal_used_bytes: u64,
    pub journal_capacity_bytes: u64,
}

impl CacheSet {
    /// Bucket, dirty and journal usage now.
    pub fn usage(&self) -> CacheResult<CacheUsage> {
        let sh = &self.shared;
        let g = &sh.geometry;
        let mut u = CacheUsage {
            bucket_bytes: g.bucket_bytes(),
            buckets_total: g.nbuckets,
            data_capacity_bytes: self.data_capacity_bytes(),
            journal_capacity_bytes: g.journal_region().len_bytes,
            ..CacheUsage::default()
        };
        u.journal_used_bytes = sh.journal.stats().used_sectors * SECTOR_SIZE;
        let m = sh.lock_meta()?;
        for b in m.alloc().buckets() {
            u.buckets_pinned += u64::from(b.pins > 0);
            match b.state {
                BucketState::Free | BucketState::FreePending { .. } => u.buckets_free += 1,
                BucketState::Data | BucketState::Open(OpenKind::Data) if b.dirty_sectors > 0 => {
                    u.buckets_dirty += 1;
                }
                BucketState::Data | BucketState::Open(OpenKind::Data) => u.buckets_clean += 1,
                BucketState::Btree
                | BucketState::Open(OpenKind::Btree)
                | BucketState::Journal
                | BucketState::Reserved => {
                    u.buckets_metadata += 1;
                }
            }
        }
        let stats = m.tree.stats();
        drop(m);
        u.dirty_bytes = stats.dirty_sectors * SECTOR_SIZE;
        u.attached_dirty_bytes = stats
            .dirty_sectors_by_dev
            .iter()
            .filter(|(dev, _)| sh.is_attached(**dev))
            .map(|(_, s)| s * SECTOR_SIZE)
            .sum();
        Ok(u)
    }

    /// The sequential cutoff in force (bytes; 0: never bypass).
    #[must_use]
    pub fn sequential_cutoff(&self) -> u64 {
        self.shared.seq.lock().cutoff()
    }
}

impl CachedDev {
    /// Whether the device was detached from its cache set (requests then go straight to it).
    #[must_use]
    pub fn is_detached(&self) -> bool {
        self.backing.detached.load(Ordering::Acquire)
    }
}

impl CacheSet {
    /// Bytes of the cache device that can hold data (buckets outside the fixed metadata): the
    /// cache size the writeback rate controller's dirty target is a percentage of.
    #[must_use]
    pub fn data_capacity_bytes(&self) -> u64 {
        let g = &self.shared.geometry;
        g.nbuckets.saturating_sub(g.first_free_bucket()) * u64::from(g.bucket_sectors) * SECTOR_SIZE
    }
}

impl Shared {
    /// Whether `dev` is one of this set's devices and not detached.
    pub(crate) fn is_attached(&self, dev: u32) -> bool {
        self.backings.iter().any(|b| b.dev_id == dev && !b.detached.load(Ordering::Acquire))
    }
}
