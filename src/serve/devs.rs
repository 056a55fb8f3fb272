//! Small device adapters `ubcache serve` puts between the NBD server and a device:
//! - [`OffsetDev`]: the data region of a backing device that carries a ubcache backing
//!   superblock, served without its cache (the export starts 8 KiB into the device).
//! - [`AlignedDev`]: sector alignment for the cache engine, which takes only whole 512-byte
//!   sectors, while the NBD server advertises a minimum block size of 1 byte (so clients may send
//!   any offset and length).

use crate::dev::{BlockDev, DevError, DevResult, SECTOR_SIZE};
use parking_lot::RwLock;
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
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
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
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn writes_are_cheap(&self) -> bool {
        self.inner.writes_are_cheap()
    }
}

/// Turns requests at any byte offset and length into whole-sector requests for `inner`.
///
/// Aligned requests pass straight through. An unaligned write is a read-modify-write of the
/// sectors it touches; it holds the lock exclusively so that no other write to the same sector
/// can land between its read and its write (that write would be undone). Aligned writes take
/// the lock shared, so they run in parallel with each other and only wait for a read-modify-write.
#[derive(Debug)]
pub struct AlignedDev {
    inner: Arc<dyn BlockDev>,
    rmw: RwLock<()>,
}

fn aligned(offset: u64, len: u64) -> bool {
    offset % SECTOR_SIZE == 0 && len % SECTOR_SIZE == 0
}

/// The whole sectors covering `[offset, offset + len)`.
fn covering(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / SECTOR_SIZE * SECTOR_SIZE;
    let end = (offset + len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    (start, end)
}

impl AlignedDev {
    #[must_use]
    pub fn new(inner: Arc<dyn BlockDev>) -> Self {
        Self { inner, rmw: RwLock::new(()) }
    }

    /// Read-modify-write of the sectors covering `[offset, offset + data.len())`, with `data`
    /// (or zeros when `data` is `None`, for `len` bytes) placed at `offset`.
    fn rmw(&self, data: Option<&[u8]>, offset: u64, len: u64, fua: bool) -> DevResult<()> {
        let (start, end) = covering(offset, len);
        let mut buf = vec![
            0u8;
            usize::try_from(end - start)
                .map_err(|_| DevError::Invalid("request too large".into()))?
        ];
        let _exclusive = self.rmw.write();
        self.inner.read_at(&mut buf, start)?;
        let from = (offset - start) as usize;
        let to = from + len as usize;
        match data {
            Some(d) => buf[from..to].copy_from_slice(d),
            None => buf[from..to].fill(0),
        }
        if fua { self.inner.write_at_fua(&buf, start) } else { self.inner.write_at(&buf, start) }
    }
}

impl BlockDev for AlignedDev {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let len = buf.len() as u64;
        if aligned(offset, len) {
            return self.inner.read_at(buf, offset);
        }
        DevError::check_range("read", offset, len, self.len())?;
        let (start, end) = covering(offset, len);
        let mut tmp = vec![
            0u8;
            usize::try_from(end - start)
                .map_err(|_| DevError::Invalid("request too large".into()))?
        ];
        self.inner.read_at(&mut tmp, start)?;
        let from = (offset - start) as usize;
        buf.copy_from_slice(&tmp[from..from + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        if aligned(offset, buf.len() as u64) {
            let _shared = self.rmw.read();
            return self.inner.write_at(buf, offset);
        }
        DevError::check_range("write", offset, buf.len() as u64, self.len())?;
        self.rmw(Some(buf), offset, buf.len() as u64, false)
    }
    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        if aligned(offset, buf.len() as u64) {
            let _shared = self.rmw.read();
            return self.inner.write_at_fua(buf, offset);
        }
        DevError::check_range("write", offset, buf.len() as u64, self.len())?;
        self.rmw(Some(buf), offset, buf.len() as u64, true)
    }
    fn sync(&self) -> DevResult<()> {
        self.inner.sync()
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        DevError::check_range("discard", offset, len, self.len())?;
        // TRIM is advisory: only the whole sectors inside the range are discarded.
        let start = offset.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let end = (offset + len) / SECTOR_SIZE * SECTOR_SIZE;
        if start < end {
            let _shared = self.rmw.read();
            self.inner.discard(start, end - start)?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        if aligned(offset, len) {
            let _shared = self.rmw.read();
            return self.inner.write_zeroes(offset, len, may_unmap);
        }
        DevError::check_range("write_zeroes", offset, len, self.len())?;
        let inner_start = offset.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let inner_end = (offset + len) / SECTOR_SIZE * SECTOR_SIZE;
        if inner_start >= inner_end {
            return self.rmw(None, offset, len, false);
        }
        if offset < inner_start {
            self.rmw(None, offset, inner_start - offset, false)?;
        }
        if inner_end < offset + len {
            self.rmw(None, inner_end, offset + len - inner_end, false)?;
        }
        let _shared = self.rmw.read();
        self.inner.write_zeroes(inner_start, inner_end - inner_start, may_unmap)
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        self.inner.known_zero_ranges(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        DevError::check_range("cache", offset, len, self.len())?;
        let (start, end) = covering(offset, len);
        self.inner.prefetch(start, end - start)
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDev;

    /// A device that refuses anything that is not whole sectors, like the cache engine.
    #[derive(Debug)]
    struct SectorsOnly(MemDev);

    impl SectorsOnly {
        fn check(offset: u64, len: u64) -> DevResult<()> {
            if aligned(offset, len) { Ok(()) } else { Err(DevError::Invalid("unaligned".into())) }
        }
    }

    impl BlockDev for SectorsOnly {
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
            Self::check(offset, buf.len() as u64)?;
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
            Self::check(offset, buf.len() as u64)?;
            self.0.write_at(buf, offset)
        }
        fn sync(&self) -> DevResult<()> {
            self.0.sync()
        }
        fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
            Self::check(offset, len)?;
            self.0.write_zeroes(offset, len, may_unmap)
        }
        fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
            Self::check(offset, len)?;
            self.0.discard(offset, len)
        }
    }

    #[test]
    fn unaligned_requests_become_whole_sector_requests() {
        let dev = AlignedDev::new(Arc::new(SectorsOnly(MemDev::new(8192))));
        let mut model = vec![0u8; 8192];
        for (i, (offset, len)) in
            [(1u64, 10usize), (510, 4), (1000, 3000), (0, 512), (4095, 1)].into_iter().enumerate()
        {
            let data = vec![i as u8 + 1; len];
            dev.write_at(&data, offset).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
        dev.write_zeroes(700, 2000, false).unwrap();
        model[700..2700].fill(0);
        dev.write_at_fua(&[9; 7], 8185).unwrap();
        model[8185..8192].fill(9);
        let mut all = vec![0u8; 8192];
        dev.read_at(&mut all, 0).unwrap();
        assert_eq!(all, model);
        let mut piece = vec![0u8; 33];
        dev.read_at(&mut piece, 999).unwrap();
        assert_eq!(piece, model[999..1032]);
        dev.discard(3, 1000).unwrap();
        assert!(dev.write_at(&[0; 2], 8191).is_err(), "past the end is refused, not wrapped");
    }

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
