//! A device backed by a file or a block device, with positional I/O.
//!
//! - **Direct I/O** (`FileDevOptions::direct`): opened with `O_DIRECT`, bypassing the page cache,
//!   so the cache does not hold every byte twice. The kernel then demands that buffer addresses,
//!   offsets and lengths be multiples of the file's DIO alignment (probed with `statx`); callers
//!   pass arbitrary buffers, so unaligned requests go through an aligned bounce buffer, and a
//!   write that covers only part of an aligned block is a read-modify-write of that block under a
//!   striped lock (two writers to different bytes of one block must not undo each other). If the
//!   file system refuses `O_DIRECT`, or the size is not a multiple of the alignment, the device
//!   logs a warning and stays buffered: correctness does not depend on it, and
//!   [`FileDev::is_direct`] tells which one is in use.
//! - **Zeroing and trim** use `fallocate` (which the kernel also implements for block devices,
//!   issuing discard / write-zeroes there), falling back step by step to writing zeros. Only
//!   "not supported" errors fall back; a real I/O error is returned.
//! - **Holes** are reported with `SEEK_HOLE`/`SEEK_DATA`, with a bounded number of `lseek` calls.
//! - **Sync failures are sticky**: after a failed `fsync` Linux may have dropped the dirty pages
//!   and cleared the error, so a later `fsync` could succeed although data was lost. After one
//!   failure every later write and sync fails with [`DevError::SyncFailed`], naming the first
//!   failure, until the device is reopened.
//! - **Syncs are serialised**: Linux reports a write-back error to only one of several callers
//!   that sync one open file at the same time (PostgreSQL's "fsyncgate"), so two concurrent
//!   FLUSHes could see one error and one success, and the success would acknowledge pages that
//!   were lost. Every operation that waits for write-back (`sync`, a `RWF_DSYNC` write) runs under
//!   one lock and checks the sticky failure after taking it, so a caller that queued behind the
//!   failing one fails too.

use super::{BlockDev, BulkCopy, DevCaps, DevError, DevResult, write_zeroes_by_writing};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// How to open a [`FileDev`].
#[derive(Debug, Clone, Default)]
pub struct FileDevOptions {
    /// Open read-only; writes fail with [`DevError::ReadOnly`].
    pub read_only: bool,
    /// Create the file if it is missing, sparse, with this size in bytes.
    pub create_with_size: Option<u64>,
    /// Use `O_DIRECT` where the file system allows it (see the module documentation).
    pub direct: bool,
}

/// Bounce buffers are at most this big, so a huge request does not allocate its whole size.
const BOUNCE_CHUNK: u64 = 1 << 20;
/// Read-modify-write locks: blocks hash onto this many stripes.
const RMW_STRIPES: usize = 64;
/// The alignment assumed when the kernel cannot tell us (no `STATX_DIOALIGN`): the largest
/// logical sector size in common use, so it is always sufficient.
const FALLBACK_DIO_ALIGN: u64 = 4096;
/// At most this many holes per `known_zero_ranges` call; the rest is reported as data, which is
/// always correct, and keeps a badly fragmented file from costing unbounded `lseek` calls.
const MAX_HOLES_PER_QUERY: usize = 512;

#[derive(Debug)]
struct DirectIo {
    /// Offsets, lengths and buffer addresses must be multiples of this (a power of two).
    align: u64,
    rmw_locks: Box<[Mutex<()>]>,
}

/// A file or block device accessed with `pread`/`pwrite`, so concurrent requests never share a
/// cursor.
#[derive(Debug)]
pub struct FileDev {
    file: File,
    path: PathBuf,
    len: u64,
    read_only: bool,
    is_block_device: bool,
    direct: Option<DirectIo>,
    /// Probed once at open: whether the file system punches holes (for a block device: whether
    /// it has a write-zeroes command, so zeroing writes no data).
    punch_supported: bool,
    /// Set once an `fsync` failed: Linux may already have dropped the dirty pages, so later
    /// syncs could report success for data that is gone. Every later write and sync fails.
    sync_failed: AtomicBool,
    /// What the first failed sync said, for the errors of every later one.
    first_sync_failure: Mutex<Option<String>>,
    /// Held by every operation that waits for write-back (see the module documentation).
    sync_lock: Mutex<()>,
    /// Test hook: the next sync fails as if `fsync` had returned EIO.
    #[cfg(test)]
    fail_next_sync: AtomicBool,
    /// Test hook: the injected failure first waits this long (milliseconds) inside the sync,
    /// as a slow failing write-back would, so concurrent callers queue behind it.
    #[cfg(test)]
    fail_delay_ms: std::sync::atomic::AtomicU64,
    /// Test hook: set when the injected failing sync has started.
    #[cfg(test)]
    failing_sync_started: AtomicBool,
}

fn io_err(op: &'static str, source: io::Error) -> DevError {
    DevError::Io { op, offset: 0, len: 0, source }
}

/// Errors that mean "this file system or device cannot do that", after which a slower way of
/// doing the same thing is correct.
fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENOTTY))
}

impl FileDev {
    /// Opens `path` as a device.
    pub fn open(path: &Path, opts: &FileDevOptions) -> DevResult<Self> {
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
        let metadata = file.metadata().map_err(|e| io_err("stat", e))?;
        let is_block_device = metadata.file_type().is_block_device();
        // Seeking to the end works for regular files and block devices alike.
        let len = (&file).seek(SeekFrom::End(0)).map_err(|e| io_err("seek", e))?;
        let (file, direct) = if opts.direct {
            Self::reopen_direct(path, file, len, opts.read_only, is_block_device)?
        } else {
            (file, None)
        };
        let punch_supported = !opts.read_only
            && if is_block_device {
                block_device_zeroes_fast(metadata.rdev())
            } else {
                probe_punch(&file, len)
            };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
            read_only: opts.read_only,
            is_block_device,
            direct,
            punch_supported,
            sync_failed: AtomicBool::new(false),
            first_sync_failure: Mutex::new(None),
            sync_lock: Mutex::new(()),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(test)]
            fail_delay_ms: std::sync::atomic::AtomicU64::new(0),
            #[cfg(test)]
            failing_sync_started: AtomicBool::new(false),
        })
    }

    /// Reopens `path` with `O_DIRECT`, or keeps the buffered `file` with a warning when direct
    /// I/O is impossible here.
    fn reopen_direct(
        path: &Path,
        file: File,
        len: u64,
        read_only: bool,
        is_block_device: bool,
    ) -> DevResult<(File, Option<DirectIo>)> {
        let align = match dio_alignment(&file, is_block_device) {
            Ok(Some(align)) => align,
            Ok(None) => {
                log::warn!(
                    "{}: the file system does not support O_DIRECT; using buffered I/O",
                    path.display()
                );
                return Ok((file, None));
            }
            Err(e) => return Err(io_err("statx", e)),
        };
        if len % align != 0 {
            // Read-modify-write of the last block would have to write past the end.
            log::warn!(
                "{}: size {len} is not a multiple of the direct I/O alignment {align}; using buffered I/O",
                path.display()
            );
            return Ok((file, None));
        }
        match OpenOptions::new().read(true).write(!read_only).custom_flags(libc::O_DIRECT).open(path) {
            Ok(direct_file) => {
                let rmw_locks = (0..RMW_STRIPES).map(|_| Mutex::new(())).collect();
                Ok((direct_file, Some(DirectIo { align, rmw_locks })))
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!("{}: O_DIRECT refused ({e}); using buffered I/O", path.display());
                Ok((file, None))
            }
            Err(e) => Err(io_err("open O_DIRECT", e)),
        }
    }

    /// The path this device was opened from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether I/O bypasses the page cache (`O_DIRECT` was requested and accepted).
    #[must_use]
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The direct I/O alignment in bytes, when direct I/O is in use.
    #[must_use]
    pub fn direct_alignment(&self) -> Option<u64> {
        self.direct.as_ref().map(|d| d.align)
    }

    /// Whether the device is a block device (rather than a regular file).
    #[must_use]
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    fn check_writable(&self) -> DevResult<()> {
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        self.check_not_sync_failed()
    }

    /// Fails with [`DevError::SyncFailed`] once any sync of this device failed.
    fn check_not_sync_failed(&self) -> DevResult<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            let first = self.first_sync_failure.lock().clone().unwrap_or_else(|| "unknown".to_owned());
            return Err(DevError::SyncFailed { first });
        }
        Ok(())
    }

    /// Makes a failed sync sticky, remembering the first failure for later errors.
    fn record_sync_failure(&self, op: &str, source: &io::Error) {
        let mut first = self.first_sync_failure.lock();
        if first.is_none() {
            *first = Some(format!("{op} of {} failed: {source}", self.path.display()));
            log::error!(
                "{}: {op} failed ({source}); refusing every later write and sync of this device",
                self.path.display()
            );
        }
        self.sync_failed.store(true, Ordering::Release);
    }

    fn read_raw(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // `read_exact_at` loops over short reads and EINTR, and turns an early end of file
        // (the file shrank under us) into an error instead of returning stale bytes.
        match &self.direct {
            Some(d) if !is_aligned(buf.as_ptr(), buf.len(), offset, d.align) => {
                self.read_bounced(d, buf, offset)
            }
            _ => self.file.read_exact_at(buf, offset),
        }
    }

    fn write_raw(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) if !is_aligned(buf.as_ptr(), buf.len(), offset, d.align) => {
                self.write_bounced(d, buf, offset)
            }
            _ => self.file.write_all_at(buf, offset),
        }
    }

    /// Reads through an aligned bounce buffer, one bounded chunk at a time.
    fn read_bounced(&self, d: &DirectIo, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut bounce =
            AlignedBuf::new(BOUNCE_CHUNK.min(align_up(end, d.align) - align_down(offset, d.align)), d.align);
        let mut chunk_start = align_down(offset, d.align);
        while chunk_start < end {
            let chunk_end = (chunk_start + BOUNCE_CHUNK).min(align_up(end, d.align));
            let chunk = bounce.slice_mut((chunk_end - chunk_start) as usize);
            self.file.read_exact_at(chunk, chunk_start)?;
            let (from, to) = (chunk_start.max(offset), chunk_end.min(end));
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&chunk[(from - chunk_start) as usize..(to - chunk_start) as usize]);
            chunk_start = chunk_end;
        }
        Ok(())
    }

    /// Writes through an aligned bounce buffer. Blocks the request covers only partly are read
    /// first and rewritten whole (read-modify-write), under the stripe locks of those blocks so
    /// that a concurrent write to other bytes of the same block is not lost.
    fn write_bounced(&self, d: &DirectIo, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let (first_block, end_aligned) = (align_down(offset, d.align), align_up(end, d.align));
        let mut bounce = AlignedBuf::new(BOUNCE_CHUNK.min(end_aligned - first_block), d.align);
        let mut chunk_start = first_block;
        while chunk_start < end {
            let chunk_end = (chunk_start + BOUNCE_CHUNK).min(end_aligned);
            let (from, to) = (chunk_start.max(offset), chunk_end.min(end));
            // Partial blocks: at most the first and the last block of this chunk.
            let mut partial: Vec<u64> = Vec::with_capacity(2);
            if from % d.align != 0 {
                partial.push(align_down(from, d.align));
            }
            if to % d.align != 0 && !partial.contains(&align_down(to, d.align)) {
                partial.push(align_down(to, d.align));
            }
            let mut stripes: Vec<usize> =
                partial.iter().map(|&b| ((b / d.align) % RMW_STRIPES as u64) as usize).collect();
            // A fixed lock order (ascending stripe) so two writers cannot deadlock.
            stripes.sort_unstable();
            stripes.dedup();
            let _guards: Vec<_> = stripes.iter().map(|&s| d.rmw_locks[s].lock()).collect();
            let chunk = bounce.slice_mut((chunk_end - chunk_start) as usize);
            for &block in &partial {
                let at = (block - chunk_start) as usize;
                self.file.read_exact_at(&mut chunk[at..at + d.align as usize], block)?;
            }
            chunk[(from - chunk_start) as usize..(to - chunk_start) as usize]
                .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
            self.file.write_all_at(chunk, chunk_start)?;
            chunk_start = chunk_end;
        }
        Ok(())
    }

    /// Punch → zero range → write zeros, for a caller that allows deallocation.
    fn zero_unmapping(&self, offset: u64, len: u64) -> DevResult<()> {
        for mode in [
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        ] {
            match fallocate(&self.file, mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => {}
                Err(source) => return Err(DevError::Io { op: "write_zeroes", offset, len, source }),
            }
        }
        write_zeroes_by_writing(self, offset, len)
    }

    /// Zero range → punch and reallocate → write zeros, keeping the blocks allocated (NBD
    /// NO_HOLE: the client wants later writes there not to fail for lack of space).
    fn zero_allocated(&self, offset: u64, len: u64) -> DevResult<()> {
        let fail = |source| DevError::Io { op: "write_zeroes", offset, len, source };
        match fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(fail(e)),
        }
        match fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Ok(()) => {
                // The range is zero now; allocating it again keeps the NO_HOLE promise. If that
                // fails the zeros are still correct, only the allocation is missing.
                return match fallocate(&self.file, libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                    Ok(()) => Ok(()),
                    Err(e) if is_unsupported(&e) => Ok(()),
                    Err(e) => Err(fail(e)),
                };
            }
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(fail(e)),
        }
        write_zeroes_by_writing(self, offset, len)
    }
}

impl BlockDev for FileDev {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        DevError::check_range("read", offset, buf.len() as u64, self.len)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.read_raw(buf, offset).map_err(|source| DevError::Io {
            op: "read",
            offset,
            len: buf.len() as u64,
            source,
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.check_writable()?;
        DevError::check_range("write", offset, buf.len() as u64, self.len)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.write_raw(buf, offset).map_err(|source| DevError::Io {
            op: "write",
            offset,
            len: buf.len() as u64,
            source,
        })
    }

    /// One `pwritev2(RWF_DSYNC)`: only this write (and the metadata to read it back) is made
    /// durable, not every dirty page of the file as a full `fdatasync` would. Unaligned direct
    /// writes (bounced) and kernels without `pwritev2` use a plain write and a full sync.
    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.check_writable()?;
        DevError::check_range("write_fua", offset, buf.len() as u64, self.len)?;
        let bounced =
            self.direct.as_ref().is_some_and(|d| !is_aligned(buf.as_ptr(), buf.len(), offset, d.align));
        if buf.is_empty() || bounced {
            self.write_at(buf, offset)?;
            return self.sync();
        }
        // The DSYNC half waits for write-back and consumes the file's error like an fsync.
        let dsync = {
            let _serial = self.sync_lock.lock();
            self.check_not_sync_failed()?;
            let result = write_all_dsync(&self.file, buf, offset);
            if let Err(source) = &result
                && !matches!(source.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP))
            {
                // The error may come from the sync half: as after a failed fsync, dirty pages
                // may be gone, so the failure is sticky.
                self.record_sync_failure("write_fua", source);
            }
            result
        };
        match dsync {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) => {
                self.write_at(buf, offset)?;
                self.sync()
            }
            Err(source) => Err(DevError::Io { op: "write_fua", offset, len: buf.len() as u64, source }),
        }
    }

    fn sync(&self) -> DevResult<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_writable()?;
        let _serial = self.sync_lock.lock();
        // Again under the lock: a sync that queued behind a failing one must fail too, as the
        // kernel reported the error to that one only.
        self.check_not_sync_failed()?;
        #[cfg(test)]
        let result = if self.fail_next_sync.swap(false, Ordering::AcqRel) {
            self.failing_sync_started.store(true, Ordering::Release);
            std::thread::sleep(std::time::Duration::from_millis(self.fail_delay_ms.load(Ordering::Acquire)));
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            self.file.sync_data()
        };
        #[cfg(not(test))]
        let result = self.file.sync_data();
        result.map_err(|source| {
            self.record_sync_failure("sync", &source);
            DevError::Io { op: "sync", offset: 0, len: self.len, source }
        })
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.check_writable()?;
        DevError::check_range("discard", offset, len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        // Punching a hole is the natural TRIM for a file (and a discard on a block device);
        // where it is unsupported, TRIM is advisory and doing nothing is correct.
        match fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => Ok(()),
            Err(source) => Err(DevError::Io { op: "discard", offset, len, source }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        self.check_writable()?;
        DevError::check_range("write_zeroes", offset, len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        if may_unmap { self.zero_unmapping(offset, len) } else { self.zero_allocated(offset, len) }
    }

    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        DevError::check_range("known_zero_ranges", offset, len, self.len)?;
        let end = offset + len;
        let mut holes = Vec::new();
        let mut pos = offset;
        while pos < end && holes.len() < MAX_HOLES_PER_QUERY {
            let hole = match lseek(&self.file, pos, libc::SEEK_HOLE) {
                Ok(Some(hole)) => hole,
                // ENXIO: `pos` is at or past the end of the file (it shrank): no more holes known.
                Ok(None) => break,
                // The file system cannot tell: knowing nothing is correct.
                Err(e) if is_unsupported(&e) => return Ok(Vec::new()),
                Err(source) => return Err(DevError::Io { op: "seek_hole", offset: pos, len, source }),
            };
            if hole >= end {
                break;
            }
            let data = match lseek(&self.file, hole, libc::SEEK_DATA) {
                Ok(Some(data)) => data,
                Ok(None) => end, // No data after the hole: it runs to the end of the file.
                Err(e) if is_unsupported(&e) => return Ok(Vec::new()),
                Err(source) => return Err(DevError::Io { op: "seek_data", offset: hole, len, source }),
            };
            let hole_end = data.min(end);
            if hole_end <= hole {
                // A file system answering inconsistently; stop rather than loop.
                break;
            }
            holes.push(hole..hole_end);
            pos = hole_end;
        }
        Ok(holes)
    }

    /// Buffered writes land in the page cache (cheap); with `O_DIRECT` every write waits for
    /// the disk. (A buffered write still blocks when the kernel throttles a writer that dirtied
    /// too many pages; the throttling paces the writer to the disk, so only the client's own
    /// later requests wait.)
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps {
            read_only: self.read_only,
            fast_zero: self.punch_supported,
            cheap_writes: self.direct.is_none(),
            parallel_writes: false,
            bulk: Some(self),
        }
    }
}

impl BulkCopy for FileDev {
    fn buffered_file(&self) -> Option<&File> {
        self.direct.is_none().then_some(&self.file)
    }

    /// `sync_file_range(2)` with `SYNC_FILE_RANGE_WRITE`: queues the range's dirty pages for
    /// writeout and returns (it waits only if the device's queue is full). Nothing is durable
    /// until `sync`: the call neither waits for the disk nor writes file metadata. With
    /// `O_DIRECT` there are no dirty pages to start: nothing to do.
    fn start_writeback(&self, offset: u64, len: u64) -> DevResult<()> {
        DevError::check_range("start_writeback", offset, len, self.len)?;
        if self.direct.is_some() || len == 0 {
            return Ok(());
        }
        let bad = |_| DevError::Invalid("start_writeback offset".into());
        let (off, n) =
            (libc::off64_t::try_from(offset).map_err(bad)?, libc::off64_t::try_from(len).map_err(bad)?);
        loop {
            // SAFETY: the descriptor is an open file owned by a live `File`; no memory is passed.
            let r =
                unsafe { libc::sync_file_range(self.file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                // Not every file system or kernel supports it; it is only a hint.
                Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::ESPIPE) => return Ok(()),
                _ => return Err(DevError::Io { op: "start_writeback", offset, len, source: e }),
            }
        }
    }

    /// `copy_file_range(2)`: the kernel moves the pages from the source file's page cache into
    /// this one's, one copy instead of a read into memory and a write out of it. Only between
    /// buffered files (mixing with `O_DIRECT` would bypass one side's page cache); a kernel or
    /// file system that cannot do it (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP on the first call, with
    /// nothing copied) gets `Ok(false)`.
    fn copy_from(&self, src: &dyn BlockDev, src_offset: u64, offset: u64, len: u64) -> DevResult<bool> {
        self.check_writable()?;
        DevError::check_range("copy", offset, len, self.len)?;
        DevError::check_range("copy source", src_offset, len, src.len())?;
        let (Some(from), None) = (super::buffered_file(src), self.direct.as_ref()) else {
            return Ok(false);
        };
        let copy_err = |source| DevError::Io { op: "copy", offset, len, source };
        let (mut off_in, mut off_out) = (
            libc::loff_t::try_from(src_offset).map_err(|_| DevError::Invalid("copy offset".into()))?,
            libc::loff_t::try_from(offset).map_err(|_| DevError::Invalid("copy offset".into()))?,
        );
        let mut done = 0u64;
        while done < len {
            let want = usize::try_from(len - done).unwrap_or(usize::MAX).min(1 << 30);
            // SAFETY: both descriptors are open files owned by live `File`s; the offsets are
            // valid pointers to locals the kernel updates.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &raw mut off_in,
                    self.file.as_raw_fd(),
                    &raw mut off_out,
                    want,
                    0,
                )
            };
            if n > 0 {
                done += n as u64;
                continue;
            }
            if n == 0 {
                return Err(copy_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "copy source ended early",
                )));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) if done == 0 => {
                    return Ok(false);
                }
                _ => return Err(copy_err(e)),
            }
        }
        Ok(true)
    }
}

fn align_down(x: u64, align: u64) -> u64 {
    x - x % align
}

fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

fn is_aligned(ptr: *const u8, len: usize, offset: u64, align: u64) -> bool {
    (ptr as usize as u64) % align == 0 && (len as u64) % align == 0 && offset % align == 0
}

/// A heap buffer whose usable part starts at an aligned address, without `unsafe`: it
/// over-allocates by one alignment unit and starts at the first aligned byte.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: u64, align: u64) -> Self {
        let storage = vec![0u8; (len + align) as usize];
        let misalignment = (storage.as_ptr() as usize as u64) % align;
        let start = if misalignment == 0 { 0 } else { (align - misalignment) as usize };
        Self { storage, start }
    }

    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.start..self.start + len]
    }
}

/// The direct I/O alignment of `file`: `Ok(None)` when the file system does not support
/// `O_DIRECT` at all.
fn dio_alignment(file: &File, is_block_device: bool) -> io::Result<Option<u64>> {
    // SAFETY: `statx` is a plain C struct of integers, for which all-zero bytes are valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes statx
    // describe the open fd itself, and `stx` is a live, writable statx buffer.
    let rc = unsafe {
        libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &raw mut stx)
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        if stx.stx_dio_offset_align == 0 {
            return Ok(None);
        }
        let align = u64::from(stx.stx_dio_offset_align.max(stx.stx_dio_mem_align)).max(512);
        return Ok(Some(align.next_power_of_two()));
    }
    if rc != 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
            return Err(e);
        }
    }
    // An older kernel: a block device knows its logical sector size; otherwise assume the
    // largest common one, which is always enough.
    if is_block_device {
        let mut sector_size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one c_int through the pointer, which points at a live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &raw mut sector_size) };
        if rc == 0 && sector_size > 0 {
            return Ok(Some(u64::from(sector_size.unsigned_abs()).next_power_of_two()));
        }
    }
    Ok(Some(FALLBACK_DIO_ALIGN))
}

/// Whether the file system punches holes, probed without changing any data: a punch past the
/// end of the file, with the size kept, touches nothing but is still refused where unsupported.
fn probe_punch(file: &File, len: u64) -> bool {
    fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, len, 4096).is_ok()
}

/// Whether a block device zeroes without transferring data: its queue advertises a write-zeroes
/// command (the kernel's fallocate on a block device then issues it; without one, punching is
/// refused and zero range falls back to writing zero pages, which is not fast).
fn block_device_zeroes_fast(rdev: u64) -> bool {
    let base = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    // A partition has no queue of its own; its parent disk's applies.
    ["queue/write_zeroes_max_bytes", "../queue/write_zeroes_max_bytes"].iter().any(|rel| {
        std::fs::read_to_string(format!("{base}/{rel}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|max| max > 0)
    })
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file` and open
        // for the duration of the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes all of `buf` at `offset` with `RWF_DSYNC`, looping over short writes and EINTR. The
/// kernel syncs each partial write before returning it, so every byte is durable at the end.
fn write_all_dsync(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let iov = libc::iovec { iov_base: buf.as_ptr().cast_mut().cast(), iov_len: buf.len() };
        // SAFETY: `iov` describes `buf`, which is live and unaliased for the call; the kernel only
        // reads through it (a write). The fd is owned by `file`.
        let rc = unsafe { libc::pwritev2(file.as_raw_fd(), &raw const iov, 1, off, libc::RWF_DSYNC) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = rc.unsigned_abs();
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev2 wrote nothing"));
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// `lseek` for SEEK_HOLE/SEEK_DATA: `Ok(None)` for ENXIO (no such region before end of file).
/// Only the fd's cursor moves, which this device never uses (all I/O is positional).
fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: lseek only reads its integer arguments on an fd owned by `file`.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc >= 0 {
        return Ok(Some(rc.unsigned_abs()));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) }
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

    /// Guards the fsync-gate problem: after a failed fsync the kernel may have dropped dirty
    /// pages and cleared the error, so a retry that "succeeds" would hide lost data.
    #[test]
    fn failed_sync_is_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sticky.img");
        let opts = FileDevOptions { create_with_size: Some(1 << 16), ..Default::default() };
        let dev = FileDev::open(&path, &opts).unwrap();
        dev.write_at(&[1; 512], 0).unwrap();
        dev.sync().unwrap();
        dev.fail_next_sync.store(true, Ordering::Release);
        assert!(matches!(dev.sync(), Err(DevError::Io { op: "sync", .. })));
        // The hook fired once; the real fsync would now succeed, yet the device must refuse,
        // with an error that names the first failure.
        match dev.sync() {
            Err(e @ DevError::SyncFailed { .. }) => {
                let text = e.to_string();
                assert!(text.contains("sync of") && text.contains("sticky.img"), "{text}");
                assert_eq!(e.nbd_errno(), libc::EIO as u32);
            }
            other => panic!("a sync after a failed one: {other:?}"),
        }
        assert!(matches!(dev.write_at(&[2; 512], 0), Err(DevError::SyncFailed { .. })));
        assert!(matches!(dev.write_at_fua(&[2; 512], 0), Err(DevError::SyncFailed { .. })));
        assert!(matches!(dev.write_zeroes(0, 512, true), Err(DevError::SyncFailed { .. })));
        // Reopening starts afresh (the operator has looked at the device).
        drop(dev);
        let dev = FileDev::open(&path, &FileDevOptions::default()).unwrap();
        dev.sync().unwrap();
        // Reads still work: the data that is there can be salvaged.
        let mut buf = [0; 512];
        dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1; 512]);
    }

    /// Guards the serialisation of syncs: Linux tells only one of several concurrent syncs of a
    /// file about a write-back error. Here the failing sync is slow; every sync that starts
    /// while it runs must fail too, never report success for the lost pages.
    #[test]
    fn syncs_queued_behind_a_failing_sync_fail_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("concurrent.img");
        let opts = FileDevOptions { create_with_size: Some(1 << 16), ..Default::default() };
        let dev = FileDev::open(&path, &opts).unwrap();
        dev.write_at(&[1; 512], 0).unwrap();
        dev.fail_delay_ms.store(300, Ordering::Release);
        dev.fail_next_sync.store(true, Ordering::Release);
        std::thread::scope(|s| {
            let failing = s.spawn(|| dev.sync());
            while !dev.failing_sync_started.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            let others: Vec<_> = (0..4)
                .map(|i| {
                    let dev = &dev;
                    s.spawn(
                        move || {
                            if i % 2 == 0 { dev.sync() } else { dev.write_at_fua(&[3; 512], 4096 * i) }
                        },
                    )
                })
                .collect();
            assert!(matches!(failing.join().unwrap(), Err(DevError::Io { op: "sync", .. })));
            for (i, other) in others.into_iter().enumerate() {
                let result = other.join().unwrap();
                assert!(
                    matches!(result, Err(DevError::SyncFailed { .. })),
                    "caller {i} started during the failing sync and got {result:?}"
                );
            }
        });
    }

    #[test]
    fn fua_writes_round_trip_buffered_and_direct() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [false, true] {
            let path = dir.path().join(format!("fua-{direct}.img"));
            let opts = FileDevOptions { create_with_size: Some(1 << 16), direct, ..Default::default() };
            let dev = FileDev::open(&path, &opts).unwrap();
            let mut aligned = AlignedBuf::new(4096, 4096);
            aligned.slice_mut(4096).fill(5);
            dev.write_at_fua(aligned.slice_mut(4096), 4096).unwrap();
            dev.write_at_fua(&[6; 100], 10).unwrap();
            let mut back = vec![0; 8192];
            dev.read_at(&mut back, 0).unwrap();
            assert!(back[10..110].iter().all(|&b| b == 6));
            assert!(back[4096..].iter().all(|&b| b == 5));
            assert!(matches!(dev.write_at_fua(&[1; 2], (1 << 16) - 1), Err(DevError::OutOfRange { .. })));
        }
    }

    /// The NBD server runs writes of a device that says they are cheap in its reader; a direct
    /// device waits for the disk on every write and must not say so.
    #[test]
    fn only_buffered_writes_are_cheap() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [false, true] {
            let path = dir.path().join(format!("cheap-{direct}.img"));
            let opts = FileDevOptions { create_with_size: Some(1 << 16), direct, ..Default::default() };
            let dev = FileDev::open(&path, &opts).unwrap();
            // A file system without O_DIRECT leaves the device buffered (see `is_direct`).
            assert_eq!(dev.capabilities().cheap_writes, !dev.is_direct(), "direct requested: {direct}");
        }
        let buffered =
            FileDev::open(&dir.path().join("cheap-false.img"), &FileDevOptions::default()).unwrap();
        assert!(buffered.capabilities().cheap_writes);
    }

    #[test]
    fn aligned_buf_is_aligned() {
        for align in [512u64, 4096] {
            let mut b = AlignedBuf::new(10_000, align);
            let s = b.slice_mut(10_000);
            assert_eq!((s.as_ptr() as usize as u64) % align, 0);
        }
    }
}
