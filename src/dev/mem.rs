//! An in-memory device: the fast, deterministic stand-in for a file in tests and benchmarks.

use super::{BlockDev, DevCaps, DevError, DevResult};
use parking_lot::RwLock;

/// A device whose bytes live in memory. `sync` is a no-op: nothing is ever lost.
#[derive(Debug)]
pub struct MemDev {
    data: RwLock<Vec<u8>>,
}

impl MemDev {
    /// A zero-filled device of `len` bytes.
    #[must_use]
    pub fn new(len: u64) -> Self {
        Self { data: RwLock::new(vec![0; len as usize]) }
    }

    /// A device holding exactly `bytes`.
    #[must_use]
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self { data: RwLock::new(bytes) }
    }

    /// A copy of the whole contents.
    #[must_use]
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

impl BlockDev for MemDev {
    fn len(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let data = self.data.read();
        DevError::check_range("read", offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let mut data = self.data.write();
        DevError::check_range("write", offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> DevResult<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> DevResult<()> {
        let mut data = self.data.write();
        DevError::check_range("write_zeroes", offset, len, data.len() as u64)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    /// Zeroing memory is fast; nothing else beyond plain I/O.
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps { fast_zero: true, ..DevCaps::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_writes_and_rejects_out_of_range() {
        let dev = MemDev::new(4096);
        dev.write_at(&[7; 512], 512).unwrap();
        let mut buf = [0; 1024];
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..].iter().all(|&b| b == 7));
        assert!(matches!(dev.write_at(&[1; 2], 4095), Err(DevError::OutOfRange { .. })));
        assert!(matches!(dev.read_at(&mut [0; 1], u64::MAX), Err(DevError::OutOfRange { .. })));
        dev.write_zeroes(512, 256, true).unwrap();
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf[..768].iter().all(|&b| b == 0) && buf[768..].iter().all(|&b| b == 7));
    }
}
