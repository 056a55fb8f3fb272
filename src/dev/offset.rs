//! [`OffsetDev`]: the data region of a backing device that carries a ubcache backing superblock,
//! served without its cache (the export starts 8 KiB into the device).
//!
//! Cached exports need no adapter: the NBD server advertises a minimum block size of 1 byte, and
//! the engine's `CachedDev` does its own read-modify-write of partial sectors under its per-range
//! lock.

use super::{BlockDev, DevCaps, DevError, DevResult, SECTOR_SIZE};
use std::ops::Range;
use std::sync::Arc;

/// A window `[offset, offset + len)` of another device, seen as a device of `len` bytes.
#[derive(Debug)]
pub struct OffsetDev {
    inner: Arc<dyn BlockDev>,
    offset: u64,
    len: u64,
}

impl OffsetDev {
    /// The window starting at `offset` up to the end of `inner` (rounded down to whole sectors).
    pub fn new(inner: Arc<dyn BlockDev>, offset: u64) -> DevResult<Self> {
        let Some(rest) = inner.len().checked_sub(offset) else {
            return Err(DevError::Invalid(format!(
                "device of {} bytes is smaller than its {offset}-byte header",
                inner.len()
            )));
        };
        Ok(Self { inner, offset, len: rest / SECTOR_SIZE * SECTOR_SIZE })
    }

    fn shift(&self, op: &'static str, offset: u64, len: u64) -> DevResult<u64> {
        DevError::check_range(op, offset, len, self.len)?;
        Ok(self.offset + offset)
    }
}

impl BlockDev for OffsetDev {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let at = self.shift("read", offset, buf.len() as u64)?;
        self.inner.read_at(buf, at)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let at = self.shift("write", offset, buf.len() as u64)?;
        self.inner.write_at(buf, at)
    }
    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let at = self.shift("write", offset, buf.len() as u64)?;
        self.inner.write_at_fua(buf, at)
    }
    fn sync(&self) -> DevResult<()> {
        self.inner.sync()
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        let at = self.shift("discard", offset, len)?;
        self.inner.discard(at, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        let at = self.shift("write_zeroes", offset, len)?;
        self.inner.write_zeroes(at, len, may_unmap)
    }
    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        let at = self.shift("block_status", offset, len)?;
        let ranges = self.inner.known_zero_ranges(at, len)?;
        Ok(ranges
            .into_iter()
            .filter_map(|r| {
                let start = r.start.max(at) - self.offset;
                let end = r.end.min(at + len).checked_sub(self.offset)?;
                (start < end).then_some(start..end)
            })
            .collect())
    }
    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        let at = self.shift("cache", offset, len)?;
        self.inner.prefetch(at, len)
    }
    /// The inner device's capabilities without the bulk-copy extension: that one works at the
    /// inner device's offsets, and no bulk writer uses an offset window (only passthrough exports
    /// do).
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps { bulk: None, ..self.inner.capabilities() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDev;

    #[test]
    fn offset_dev_shifts_every_request_and_bounds_it() {
        let inner: Arc<dyn BlockDev> = Arc::new(MemDev::new(8192 + 4096 + 100));
        let dev = OffsetDev::new(Arc::clone(&inner), 8192).unwrap();
        assert_eq!(dev.len(), 4096, "rounded down to whole sectors");
        dev.write_at(&[7; 512], 512).unwrap();
        let mut buf = [0u8; 512];
        inner.read_at(&mut buf, 8192 + 512).unwrap();
        assert_eq!(buf, [7; 512]);
        assert!(dev.write_at(&[0; 512], 4096).is_err());
        assert!(OffsetDev::new(inner, 1 << 20).is_err());
    }
}
