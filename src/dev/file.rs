//! A device backed by a file or a block device, with positional I/O.

use super::{BlockDev, DevError, DevResult, write_zeroes_by_writing};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// How to open a [`FileDev`].
#[derive(Debug, Clone, Default)]
pub struct FileDevOptions {
    /// Open read-only; writes fail with [`DevError::ReadOnly`].
    pub read_only: bool,
    /// Create the file if it is missing, sparse, with this size in bytes.
    pub create_with_size: Option<u64>,
}

/// A file or block device accessed with `pread`/`pwrite`, so concurrent requests never share a
/// cursor.
#[derive(Debug)]
pub struct FileDev {
    file: File,
    path: PathBuf,
    len: u64,
    read_only: bool,
    /// Set once an `fsync` failed: Linux may already have dropped the dirty pages, so later
    /// syncs could report success for data that is gone. Every later write and sync fails.
    sync_failed: AtomicBool,
}

impl FileDev {
    /// Opens `path` as a device.
    pub fn open(path: &Path, opts: &FileDevOptions) -> DevResult<Self> {
        let io_err = |op, source| DevError::Io { op, offset: 0, len: 0, source };
        let exists = path.exists();
        let file = match (exists, opts.create_with_size) {
            (false, Some(size)) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| io_err("create", e))?;
                file.set_len(size).map_err(|e| io_err("set_len", e))?;
                file
            }
            _ => OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .open(path)
                .map_err(|e| io_err("open", e))?,
        };
        let len = (&file).seek(SeekFrom::End(0)).map_err(|e| io_err("seek", e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
            read_only: opts.read_only,
            sync_failed: AtomicBool::new(false),
        })
    }

    /// The path this device was opened from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_writable(&self) -> DevResult<()> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(DevError::Io {
                op: "write",
                offset: 0,
                len: 0,
                source: std::io::Error::other("an earlier sync failed; refusing further writes"),
            });
        }
        Ok(())
    }
}

impl BlockDev for FileDev {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        DevError::check_range("read", offset, buf.len() as u64, self.len)?;
        // `read_exact_at` loops over short reads and EINTR.
        self.file.read_exact_at(buf, offset).map_err(|source| DevError::Io {
            op: "read",
            offset,
            len: buf.len() as u64,
            source,
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.check_writable()?;
        DevError::check_range("write", offset, buf.len() as u64, self.len)?;
        self.file.write_all_at(buf, offset).map_err(|source| DevError::Io {
            op: "write",
            offset,
            len: buf.len() as u64,
            source,
        })
    }

    fn sync(&self) -> DevResult<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_writable()?;
        self.file.sync_data().map_err(|source| {
            self.sync_failed.store(true, Ordering::Release);
            DevError::Io { op: "sync", offset: 0, len: self.len, source }
        })
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.check_writable()?;
        DevError::check_range("discard", offset, len, self.len)?;
        // Punching a hole is the natural TRIM for a file; where the file system cannot, TRIM is
        // advisory and doing nothing is correct.
        let _ = fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        self.check_writable()?;
        DevError::check_range("write_zeroes", offset, len, self.len)?;
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if fallocate(&self.file, mode, offset, len).is_ok() {
            return Ok(());
        }
        write_zeroes_by_writing(self, offset, len)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file` and open for
    // the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_sparse_file_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.img");
        let opts = FileDevOptions { create_with_size: Some(1 << 20), ..Default::default() };
        let dev = FileDev::open(&path, &opts).unwrap();
        assert_eq!(dev.len(), 1 << 20);
        dev.write_at(&[0xab; 4096], 8192).unwrap();
        dev.sync().unwrap();
        let mut buf = vec![0; 4096];
        dev.read_at(&mut buf, 8192).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));
        dev.write_zeroes(8192, 4096, true).unwrap();
        dev.read_at(&mut buf, 8192).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(matches!(dev.write_at(&[0; 1], 1 << 20), Err(DevError::OutOfRange { .. })));
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.img");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let dev = FileDev::open(&path, &FileDevOptions { read_only: true, ..Default::default() }).unwrap();
        assert!(matches!(dev.write_at(&[0; 512], 0), Err(DevError::ReadOnly)));
        let mut buf = [0; 512];
        dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1; 512]);
    }
}
