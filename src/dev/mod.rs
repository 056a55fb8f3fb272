//! Block devices: the one small trait all I/O goes through, and its implementations.
//!
//! Everything that touches a cache or backing device (the NBD server, the cache engine, the
//! journal, tests) does so through [`BlockDev`]. Tests swap in devices that keep data in memory
//! ([`MemDev`]), simulate power loss ([`SimDev`]), inject faults ([`FaultDev`]) or latency
//! ([`SlowDev`]), so the same code that runs in production is the code under test. [`OffsetDev`]
//! is a window of another device (a backing device's data region behind its superblock). A
//! remote NBD export as a device lives with the NBD code (`crate::nbd::NbdDev`), which sits above
//! this layer.
//!
//! Semantics every implementation keeps:
//! - `read_at`/`write_at` transfer the whole buffer or return an error; callers never see a short
//!   transfer (implementations loop over short reads/writes of the OS).
//! - Nothing is durable until [`BlockDev::sync`] returns `Ok`. After a crash a write that was not
//!   followed by a completed sync may be absent, present, or torn (at sector granularity).
//! - Errors are sticky only where an implementation says so (a failed `fsync` on Linux may drop
//!   dirty pages, so [`FileDev`] refuses further writes after one).

mod fault;
mod file;
mod mem;
mod offset;
mod sim;
mod slow;

pub use fault::{FaultCounts, FaultDev, FaultOp, FaultRule, OpFilter, OpInfo, RuleId};
pub use file::{FileDev, FileDevOptions};
pub use mem::MemDev;
pub use offset::OffsetDev;
pub use sim::{CrashMode, SimDev, SimStats, UnsyncedWrite, WriteFate};
pub use slow::{SlowDev, SlowDevConfig, SlowStats};

use std::io;
use std::ops::Range;

/// Sector size of the NBD export and of every on-disk address: 512 bytes, as in bcache.
pub const SECTOR_SIZE: u64 = 512;

/// Errors of the device layer. Callers act differently on each kind, so they stay apart.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The OS or the medium failed.
    #[error("I/O error during {op} at offset {offset} (length {len}): {source}")]
    Io { op: &'static str, offset: u64, len: u64, source: io::Error },
    /// The request reaches past the end of the device.
    #[error("{op} of {len} bytes at offset {offset} is beyond the device size {size}")]
    OutOfRange { op: &'static str, offset: u64, len: u64, size: u64 },
    /// The device (or export) is read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// On-disk metadata failed a check (magic, checksum, ordering invariant, ...).
    #[error("corrupted metadata: {0}")]
    Corrupted(String),
    /// No space left (cache full and no fallback possible).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The request is not valid for this device (alignment, flags, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The device does not support this operation.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// An earlier sync (or durable write) of this device failed. The kernel may have dropped the
    /// data it could not write and cleared the error, so nothing is acknowledged as durable again
    /// until the device is reopened; `first` describes the failure that started it.
    #[error(
        "an earlier sync of this device failed ({first}); no write or sync succeeds until it is reopened"
    )]
    SyncFailed { first: String },
}

impl DevError {
    /// The errno an NBD reply carries for this error (NBD spec, "Error values").
    #[must_use]
    pub fn nbd_errno(&self) -> u32 {
        match self {
            DevError::Io { .. } | DevError::Corrupted(_) | DevError::SyncFailed { .. } => libc::EIO as u32,
            DevError::OutOfRange { .. } | DevError::NoSpace(_) => libc::ENOSPC as u32,
            DevError::ReadOnly => libc::EPERM as u32,
            DevError::Invalid(_) => libc::EINVAL as u32,
            DevError::Unsupported(_) => libc::ENOTSUP as u32,
        }
    }

    /// Checks that `offset..offset+len` lies within a device of `size` bytes, without overflow.
    pub fn check_range(op: &'static str, offset: u64, len: u64, size: u64) -> Result<(), DevError> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DevError::OutOfRange { op, offset, len, size }),
        }
    }
}

pub type DevResult<T> = Result<T, DevError>;

/// A byte-addressed block device. Implementations are thread-safe: many requests are in flight at
/// once, so every method takes `&self` and positional I/O never shares a file cursor.
pub trait BlockDev: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn len(&self) -> u64;

    /// True when the device has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()>;

    /// Writes all of `buf` at `offset`. Not durable until [`BlockDev::sync`].
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()>;

    /// Writes all of `buf` at `offset` and returns only once this data (and whatever metadata
    /// locates it) is durable: NBD's FUA. The default is a write followed by a full sync.
    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.write_at(buf, offset)?;
        self.sync()
    }

    /// Makes every completed write durable.
    fn sync(&self) -> DevResult<()>;

    /// Tells the device the range is no longer needed (NBD TRIM). Afterwards the range reads as
    /// either its old contents or zeros; the default does nothing, which the NBD spec allows.
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        DevError::check_range("discard", offset, len, self.len())
    }

    /// Makes the range read as zeros. With `may_unmap` the device may deallocate the range
    /// (punch a hole); without it the blocks stay allocated (NBD's NO_HOLE).
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        let _ = may_unmap;
        write_zeroes_by_writing(self, offset, len)
    }

    /// Sub-ranges of `offset..offset+len` that are known to read as zeros (holes), sorted and
    /// non-overlapping. Used for structured-reply hole chunks. Knowing nothing is always correct.
    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        let _ = (offset, len);
        Ok(Vec::new())
    }

    /// Prefetches a range (NBD CACHE). The default does nothing: a device without a cache has
    /// nothing to warm.
    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        DevError::check_range("prefetch", offset, len, self.len())
    }

    /// What the device can do beyond the calls above, as one value: see [`DevCaps`]. There is
    /// no default, so every device (and above all every wrapper) states its capabilities in one
    /// place: a wrapper passes on its inner device's value, narrowing the fields its own
    /// behaviour changes, and cannot drop a hint by forgetting to forward a method.
    fn capabilities(&self) -> DevCaps<'_>;
}

/// What a device can do beyond plain I/O. The NBD server and the bulk writers (writeback) read
/// it; none of it changes what the data is, only how fast it moves, except `read_only`.
///
/// The all-false [`Default`] is always correct for a device that wants none of it.
#[derive(Clone, Copy, Default)]
pub struct DevCaps<'a> {
    /// The device refuses writes.
    pub read_only: bool,
    /// Zeroing is fast (no data is written), for NBD's FAST_ZERO: when false a `FAST_ZERO`
    /// request fails at once with ENOTSUP instead of writing zeros slowly.
    pub fast_zero: bool,
    /// A [`BlockDev::write_at`] normally returns after a copy into memory (the page cache),
    /// without waiting for a disk. The NBD server then runs such writes in the connection's
    /// reader instead of handing each one to a task: cheaper, but a write that does block holds
    /// up the connection's later requests.
    pub cheap_writes: bool,
    /// Large writes that are adjacent on the device still go faster several at a time than one
    /// after another in offset order: true where each write waits for a round trip (a remote
    /// volume), false where order matters more (a disk seeks back for an out-of-order write).
    /// Bulk writers (writeback) keep one large write in flight unless this says so.
    pub parallel_writes: bool,
    /// The bulk-copy extension, where the device has one: copies in the kernel and early
    /// writeout for bulk writers.
    pub bulk: Option<&'a dyn BulkCopy>,
}

impl std::fmt::Debug for DevCaps<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCaps")
            .field("read_only", &self.read_only)
            .field("fast_zero", &self.fast_zero)
            .field("cheap_writes", &self.cheap_writes)
            .field("parallel_writes", &self.parallel_writes)
            .field("bulk", &self.bulk.is_some())
            .finish()
    }
}

/// The optional bulk-copy extension of a device ([`DevCaps::bulk`]): what a bulk writer like
/// writeback uses to move long runs without a user-space buffer and to keep the disk busy.
pub trait BulkCopy: Send + Sync {
    /// The open file behind this device when it is a plain file read and written through the
    /// page cache at the device's own offsets, so another device can copy from it in the kernel
    /// ([`BulkCopy::copy_from`]). None where a copy from the file would skip something the
    /// device does on a read (a wrapper that injects faults or delays).
    fn buffered_file(&self) -> Option<&std::fs::File>;

    /// Writes `len` bytes of `src` (from `src_offset`) at `offset` of this device without a
    /// user-space buffer, where both devices allow it (`copy_file_range` between two buffered
    /// files). Not durable until [`BlockDev::sync`], like `write_at`. Returns `Ok(false)`,
    /// having written nothing, where it cannot: the caller then copies through memory.
    fn copy_from(&self, src: &dyn BlockDev, src_offset: u64, offset: u64, len: u64) -> DevResult<bool>;

    /// Starts writing the range's completed writes to stable storage without waiting for them
    /// and without making anything durable: a later [`BlockDev::sync`] is still needed, and
    /// then finds less to wait for. A bulk writer calls it after each large write so that the
    /// disk works while the writer prepares the next one.
    fn start_writeback(&self, offset: u64, len: u64) -> DevResult<()>;
}

/// The file `dev` can be copied from in the kernel, if any ([`BulkCopy::buffered_file`]).
#[must_use]
pub fn buffered_file(dev: &dyn BlockDev) -> Option<&std::fs::File> {
    dev.capabilities().bulk.and_then(BulkCopy::buffered_file)
}

/// Copies `len` bytes from `src` to `dst` in the kernel where `dst` has the bulk-copy
/// extension and both sides allow it; `Ok(false)`, having written nothing, where not.
pub fn copy_in_kernel(
    dst: &dyn BlockDev,
    src: &dyn BlockDev,
    src_offset: u64,
    offset: u64,
    len: u64,
) -> DevResult<bool> {
    match dst.capabilities().bulk {
        Some(bulk) => bulk.copy_from(src, src_offset, offset, len),
        None => Ok(false),
    }
}

/// Starts the writeout of a range of `dev` where it has the bulk-copy extension
/// ([`BulkCopy::start_writeback`]); elsewhere only checks the range (a device whose writes reach
/// the disk before they return has nothing to start).
pub fn start_writeback(dev: &dyn BlockDev, offset: u64, len: u64) -> DevResult<()> {
    match dev.capabilities().bulk {
        Some(bulk) => bulk.start_writeback(offset, len),
        None => DevError::check_range("start_writeback", offset, len, dev.len()),
    }
}

/// Zeroes a range by writing zero buffers, the fallback for devices that cannot punch holes.
pub fn write_zeroes_by_writing<D: BlockDev + ?Sized>(dev: &D, offset: u64, len: u64) -> DevResult<()> {
    DevError::check_range("write_zeroes", offset, len, dev.len())?;
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        dev.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

impl<T: BlockDev + ?Sized> BlockDev for std::sync::Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        (**self).write_at(buf, offset)
    }
    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        (**self).write_at_fua(buf, offset)
    }
    fn sync(&self) -> DevResult<()> {
        (**self).sync()
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        (**self).write_zeroes(offset, len, may_unmap)
    }
    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        (**self).known_zero_ranges(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        (**self).prefetch(offset, len)
    }
    fn capabilities(&self) -> DevCaps<'_> {
        (**self).capabilities()
    }
}
