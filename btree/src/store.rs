//! The node store: the only way the btree reaches its bytes.

use crate::NodeAddr;
use crate::error::StoreError;
use std::collections::BTreeSet;

/// All node I/O goes through this trait; the btree does no file I/O of its own.
///
/// A store hands out fixed-size node slots. The btree only ever writes bytes of a slot that no
/// pointer it has returned covers yet (appends), or whole fresh slots; see the crate docs,
/// "Persistence".
pub trait NodeStore {
    /// Size in bytes of every node slot (fixed at format time).
    fn node_size(&self) -> usize;
    /// A fresh node slot that no live tree uses.
    fn alloc(&mut self) -> Result<NodeAddr, StoreError>;
    /// Reads `buf.len()` bytes at `offset` of node `addr`.
    fn read(&mut self, addr: NodeAddr, offset: usize, buf: &mut [u8]) -> Result<(), StoreError>;
    /// Writes `data` at `offset` of node `addr`.
    fn write(&mut self, addr: NodeAddr, offset: usize, data: &[u8]) -> Result<(), StoreError>;
}

/// An in-memory [`NodeStore`] for tests, benches and fuzzing. Slots are allocated with ever
/// increasing addresses unless released with [`MemStore::release`]; it counts writes so tests can
/// prove a write was refused.
#[derive(Clone, Debug)]
pub struct MemStore {
    node_size: usize,
    slots: Vec<Option<Vec<u8>>>,
    free: BTreeSet<NodeAddr>,
    max_slots: usize,
    writes: u64,
    appends: u64,
    bytes_written: u64,
}

impl MemStore {
    /// A store of slots of `node_size` bytes, without a slot limit.
    #[must_use]
    pub fn new(node_size: usize) -> MemStore {
        MemStore::with_capacity(node_size, usize::MAX)
    }

    /// A store holding at most `max_slots` slots (then `alloc` fails with `NoSpace`).
    #[must_use]
    pub fn with_capacity(node_size: usize, max_slots: usize) -> MemStore {
        MemStore {
            node_size,
            slots: Vec::new(),
            free: BTreeSet::new(),
            max_slots,
            writes: 0,
            appends: 0,
            bytes_written: 0,
        }
    }

    /// Makes the slots reusable (the caller's allocator: only after the checkpoint that stopped
    /// using them is durable). Their bytes are kept until a new `alloc` hands the slot out, as on
    /// a real device.
    pub fn release(&mut self, addrs: &[NodeAddr]) {
        for &a in addrs {
            if (a as usize) < self.slots.len() {
                self.free.insert(a);
            }
        }
    }

    /// Number of `write` calls so far.
    #[must_use]
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Number of `write` calls at a non-zero offset (appended bsets) so far.
    #[must_use]
    pub fn appends(&self) -> u64 {
        self.appends
    }

    /// Number of bytes written so far.
    #[must_use]
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Slots currently allocated (not released).
    #[must_use]
    pub fn slots_in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The raw bytes of a slot, for tests that corrupt node images.
    pub fn slot_mut(&mut self, addr: NodeAddr) -> Option<&mut Vec<u8>> {
        self.slots.get_mut(usize::try_from(addr).ok()?)?.as_mut()
    }

    fn slot(&mut self, addr: NodeAddr, offset: usize, len: usize) -> Result<&mut [u8], StoreError> {
        let node_size = self.node_size;
        let slot = usize::try_from(addr)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .and_then(|s| s.as_mut())
            .ok_or(StoreError::BadAddress(addr))?;
        match offset.checked_add(len) {
            Some(end) if end <= node_size => Ok(&mut slot[offset..end]),
            _ => Err(StoreError::OutOfRange { addr, offset, len }),
        }
    }
}

impl NodeStore for MemStore {
    fn node_size(&self) -> usize {
        self.node_size
    }

    fn alloc(&mut self) -> Result<NodeAddr, StoreError> {
        if let Some(a) = self.free.pop_first() {
            return Ok(a);
        }
        if self.slots.len() >= self.max_slots {
            return Err(StoreError::NoSpace);
        }
        self.slots.push(Some(vec![0; self.node_size]));
        Ok((self.slots.len() - 1) as NodeAddr)
    }

    fn read(&mut self, addr: NodeAddr, offset: usize, buf: &mut [u8]) -> Result<(), StoreError> {
        let src = self.slot(addr, offset, buf.len())?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, addr: NodeAddr, offset: usize, data: &[u8]) -> Result<(), StoreError> {
        let dst = self.slot(addr, offset, data.len())?;
        dst.copy_from_slice(data);
        self.writes += 1;
        self.appends += u64::from(offset > 0);
        self.bytes_written += data.len() as u64;
        Ok(())
    }
}
