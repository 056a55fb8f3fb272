//! The btree's [`NodeStore`] on the cache device: node slots are `node_sectors`-sized, aligned
//! pieces of btree buckets handed out by the bucket allocator. A [`NodeAddr`] is the absolute
//! cache-device sector of the slot's first byte, so recovery can mark slots straight from
//! [`ubcache_btree::Tree::node_addrs`].
//!
//! The allocator lives here (not beside the tree) because the btree calls
//! [`NodeStore::alloc`] from inside [`ubcache_btree::Tree::flush`]; the engine reaches it through
//! `Meta::alloc` / `Meta::alloc_mut` (in `cache::set`).

use crate::alloc::{AllocError, Allocator, BucketState, OpenKind};
use crate::dev::{BlockDev, SECTOR_SIZE};
use crate::format::Geometry;
use std::sync::Arc;
use ubcache_btree::{NodeAddr, NodeStore, StoreError};

/// Node slots on the cache device, allocated from btree buckets.
#[derive(Debug)]
pub struct CacheStore {
    pub(crate) dev: Arc<dyn BlockDev>,
    pub(crate) geometry: Geometry,
    pub(crate) alloc: Allocator,
}

impl CacheStore {
    pub(crate) fn new(dev: Arc<dyn BlockDev>, geometry: Geometry, alloc: Allocator) -> Self {
        Self { dev, geometry, alloc }
    }

    /// Checks that `addr` names a node slot: aligned, inside the device, outside the fixed
    /// metadata regions, and the access stays within the slot.
    fn byte_offset(&self, addr: NodeAddr, offset: usize, len: usize) -> Result<u64, StoreError> {
        let node_sectors = u64::from(self.geometry.node_sectors);
        let aligned = node_sectors != 0 && addr % node_sectors == 0;
        let bucket = self.geometry.bucket_of_sector(addr);
        if !aligned || bucket.is_none_or(|b| self.geometry.is_fixed_metadata(b)) {
            return Err(StoreError::BadAddress(addr));
        }
        let node_bytes = self.geometry.node_bytes() as usize;
        if offset.checked_add(len).is_none_or(|end| end > node_bytes) {
            return Err(StoreError::OutOfRange { addr, offset, len });
        }
        Ok(addr * SECTOR_SIZE + offset as u64)
    }

    /// Returns node slots the last durable checkpoint no longer uses. A btree bucket whose slots
    /// are all free goes back to the free list. Call only after that checkpoint is durable
    /// (crash rule 3).
    pub(crate) fn free_slots(&mut self, addrs: &[NodeAddr]) -> Result<(), AllocError> {
        let node_sectors = self.geometry.node_sectors;
        for &addr in addrs {
            let Some(b) = self.geometry.bucket_of_sector(addr) else {
                return Err(AllocError::Invalid(format!("freed node slot {addr} is outside the device")));
            };
            let Some(bucket) = self.alloc.bucket(b).copied() else {
                return Err(AllocError::Invalid(format!("freed node slot {addr} is outside the device")));
            };
            self.alloc.remove_live(addr, node_sectors, bucket.generation, false)?;
            let after = self.alloc.bucket(b).copied();
            if after.is_some_and(|k| k.live_sectors == 0 && k.state == BucketState::Btree) {
                // Ignore Busy: the bucket may still be the open btree bucket; it is released
                // when a later free finds it sealed and empty.
                let _ = self.alloc.release_bucket(b);
            }
        }
        Ok(())
    }
}

fn io_err(addr: NodeAddr, e: crate::dev::DevError) -> StoreError {
    StoreError::Io { addr, source: Box::new(e) }
}

impl NodeStore for CacheStore {
    fn node_size(&self) -> usize {
        self.geometry.node_bytes() as usize
    }

    fn alloc(&mut self) -> Result<NodeAddr, StoreError> {
        let node_sectors = self.geometry.node_sectors;
        // Bucket and node sizes are powers of two with node <= bucket, so a slot never straddles
        // the end of a bucket and the grant is always whole.
        let a = self.alloc.alloc_sectors(OpenKind::Btree, node_sectors).map_err(|_| StoreError::NoSpace)?;
        let counted = self.alloc.unpin(a.bucket).and_then(|()| {
            if a.sectors != node_sectors {
                return Err(AllocError::Invalid(format!("partial node slot grant {a:?}")));
            }
            self.alloc.add_live(a.offset, node_sectors, a.generation, false)
        });
        match counted {
            Ok(_) => Ok(a.offset),
            Err(e) => Err(StoreError::Io { addr: a.offset, source: Box::new(e) }),
        }
    }

    fn read(&mut self, addr: NodeAddr, offset: usize, buf: &mut [u8]) -> Result<(), StoreError> {
        let at = self.byte_offset(addr, offset, buf.len())?;
        self.dev.read_at(buf, at).map_err(|e| io_err(addr, e))
    }

    fn write(&mut self, addr: NodeAddr, offset: usize, data: &[u8]) -> Result<(), StoreError> {
        let at = self.byte_offset(addr, offset, data.len())?;
        self.dev.write_at(data, at).map_err(|e| io_err(addr, e))
    }
}
