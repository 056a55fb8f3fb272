//! A wrapper that injects I/O errors and read corruption into any device, deterministically.
//!
//! Rules say which operations fail: the op kind, an optional byte range the op must overlap, an
//! optional predicate, and which matching op fires first (the `n`-th, counted from when the rule
//! was added). A one-shot rule fails that one op and retires; a persistent rule then fails every
//! later matching op too (a dead disk or a bad region). Bit flips corrupt the data returned by
//! reads of a range without touching the inner device: metadata that reads back damaged.
//!
//! A failed op never reaches the inner device (a failed write changed nothing, a failed sync
//! made nothing durable), unless the rule says a failing write got part-way
//! ([`FaultRule::with_partial_write`]).

use super::{BlockDev, BulkCopy, DevCaps, DevError, DevResult};
use parking_lot::Mutex;
use std::ops::Range;
use std::sync::Arc;

/// The kind of operation a fault rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    Read,
    /// Plain and FUA writes.
    Write,
    /// Syncs only: a FUA write is a [`FaultOp::Write`] (with [`OpInfo::fua`] set).
    Sync,
    Discard,
    WriteZeroes,
    /// Every kind above.
    Any,
}

/// One operation as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpInfo {
    /// Never [`FaultOp::Any`].
    pub op: FaultOp,
    pub offset: u64,
    /// Bytes transferred; a sync covers the whole device.
    pub len: u64,
    /// A FUA write.
    pub fua: bool,
}

/// A predicate that narrows a rule further.
pub type OpFilter = Arc<dyn Fn(&OpInfo) -> bool + Send + Sync>;

/// Which operations fail. Build with [`FaultRule::nth`] or [`FaultRule::every`] and refine.
#[derive(Clone)]
pub struct FaultRule {
    op: FaultOp,
    range: Option<Range<u64>>,
    filter: Option<OpFilter>,
    /// 1-based index among matching ops of the first one that fails.
    nth: u64,
    persistent: bool,
    errno: i32,
    /// A failing write first writes this many leading bytes: it failed part-way.
    partial_write: Option<u64>,
}

impl std::fmt::Debug for FaultRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultRule")
            .field("op", &self.op)
            .field("range", &self.range)
            .field("filter", &self.filter.as_ref().map(|_| "<fn>"))
            .field("nth", &self.nth)
            .field("persistent", &self.persistent)
            .field("errno", &self.errno)
            .field("partial_write", &self.partial_write)
            .finish()
    }
}

impl FaultRule {
    /// Fails only the `n`-th matching op (1-based; `0` is treated as `1`).
    #[must_use]
    pub fn nth(op: FaultOp, n: u64) -> Self {
        Self {
            op,
            range: None,
            filter: None,
            nth: n.max(1),
            persistent: false,
            errno: libc::EIO,
            partial_write: None,
        }
    }

    /// Fails every matching op.
    #[must_use]
    pub fn every(op: FaultOp) -> Self {
        Self::nth(op, 1).persistent()
    }

    /// Matches only ops overlapping `range` (a sync overlaps everything).
    #[must_use]
    pub fn in_range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Matches only ops for which `filter` returns true.
    #[must_use]
    pub fn matching(mut self, filter: impl Fn(&OpInfo) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// Once fired, keeps failing every later matching op.
    #[must_use]
    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    /// The OS error number the failure carries (default `EIO`).
    #[must_use]
    pub fn with_errno(mut self, errno: i32) -> Self {
        self.errno = errno;
        self
    }

    /// A write this rule fails still reaches the inner device with its first `bytes` bytes (as
    /// much as there is), as when a device fails part-way through a request.
    #[must_use]
    pub fn with_partial_write(mut self, bytes: u64) -> Self {
        self.partial_write = Some(bytes);
        self
    }

    fn matches(&self, info: &OpInfo) -> bool {
        if self.op != FaultOp::Any && self.op != info.op {
            return false;
        }
        if let Some(range) = &self.range {
            // An empty op (zero-length read) overlaps nothing; a sync overlaps everything.
            let end = info.offset.saturating_add(info.len);
            let overlaps = info.len > 0 && info.offset < range.end && end > range.start;
            if info.op != FaultOp::Sync && !overlaps {
                return false;
            }
        }
        self.filter.as_ref().is_none_or(|f| f(info))
    }
}

/// Handle of an added rule, for [`FaultDev::remove_rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// Counters of a [`FaultDev`]: ops attempted (including failed ones) and errors injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub reads: u64,
    pub writes: u64,
    pub syncs: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub injected_errors: u64,
    /// Reads whose returned data had bits flipped.
    pub corrupted_reads: u64,
    /// Writes that were kernel copies ([`BulkCopy::copy_from`]; also counted in `writes`).
    pub kernel_copies: u64,
}

/// An injected failure: the error, and for a write how much of it reaches the device anyway.
#[derive(Debug)]
struct Injected {
    error: DevError,
    partial_write: Option<u64>,
}

#[derive(Debug)]
struct RuleState {
    id: RuleId,
    rule: FaultRule,
    seen: u64,
    fired: bool,
}

#[derive(Debug, Clone)]
struct BitFlip {
    range: Range<u64>,
    xor: u8,
}

#[derive(Debug, Default)]
struct FaultState {
    rules: Vec<RuleState>,
    flips: Vec<BitFlip>,
    counts: FaultCounts,
    next_id: u64,
}

/// Wraps `D`, failing or corrupting the operations its rules select.
#[derive(Debug)]
pub struct FaultDev<D> {
    inner: D,
    state: Mutex<FaultState>,
}

impl<D: BlockDev> FaultDev<D> {
    /// A wrapper with no rules: every op passes through.
    pub fn new(inner: D) -> Self {
        Self { inner, state: Mutex::new(FaultState::default()) }
    }

    /// Adds a rule; its op count starts now.
    pub fn add_rule(&self, rule: FaultRule) -> RuleId {
        let mut st = self.state.lock();
        let id = RuleId(st.next_id);
        st.next_id += 1;
        st.rules.push(RuleState { id, rule, seen: 0, fired: false });
        id
    }

    /// Removes a rule; returns whether it was present.
    pub fn remove_rule(&self, id: RuleId) -> bool {
        let mut st = self.state.lock();
        let before = st.rules.len();
        st.rules.retain(|r| r.id != id);
        st.rules.len() != before
    }

    /// Removes every rule and bit flip: the device heals.
    pub fn clear(&self) {
        let mut st = self.state.lock();
        st.rules.clear();
        st.flips.clear();
    }

    /// Every read returns the bytes of `range` XORed with `xor` (`1 << bit` flips one bit per
    /// byte). The inner device is untouched, so a rewrite does not heal it: the medium is bad.
    pub fn add_bit_flip(&self, range: Range<u64>, xor: u8) {
        self.state.lock().flips.push(BitFlip { range, xor });
    }

    /// The op counters.
    pub fn counts(&self) -> FaultCounts {
        self.state.lock().counts
    }

    /// The wrapped device, to inspect or to bypass the faults.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Unwraps the device.
    pub fn into_inner(self) -> D {
        self.inner
    }

    /// Counts the op and decides whether it fails. Every rule sees every op, so each rule's
    /// count is exact even when another rule fires on the same op; the first rule that fires
    /// decides the error.
    fn check(&self, op_name: &'static str, info: OpInfo) -> Result<(), Injected> {
        let mut st = self.state.lock();
        let counts = &mut st.counts;
        match info.op {
            FaultOp::Read => counts.reads += 1,
            FaultOp::Write => counts.writes += 1,
            FaultOp::Sync => counts.syncs += 1,
            FaultOp::Discard => counts.discards += 1,
            FaultOp::WriteZeroes => counts.write_zeroes += 1,
            FaultOp::Any => {}
        }
        let mut fired: Option<(i32, Option<u64>)> = None;
        let mut retire = Vec::new();
        for (index, r) in st.rules.iter_mut().enumerate() {
            if !r.rule.matches(&info) {
                continue;
            }
            r.seen += 1;
            let fires = if r.fired { r.rule.persistent } else { r.seen >= r.rule.nth };
            if fires {
                r.fired = true;
                fired.get_or_insert((r.rule.errno, r.rule.partial_write));
                if !r.rule.persistent {
                    retire.push(index);
                }
            }
        }
        for index in retire.into_iter().rev() {
            st.rules.remove(index);
        }
        match fired {
            Some((errno, partial_write)) => {
                st.counts.injected_errors += 1;
                Err(Injected {
                    error: DevError::Io {
                        op: op_name,
                        offset: info.offset,
                        len: info.len,
                        source: std::io::Error::from_raw_os_error(errno),
                    },
                    partial_write,
                })
            }
            None => Ok(()),
        }
    }

    /// A write that a rule fails, possibly after writing a prefix.
    fn fail_write(&self, injected: Injected, buf: &[u8], offset: u64) -> DevError {
        if let Some(prefix) = injected.partial_write {
            let n = (prefix.min(buf.len() as u64)) as usize;
            if n > 0 {
                // The inner device's own error, if any, would only repeat the injected one.
                let _ = self.inner.write_at(&buf[..n], offset);
            }
        }
        injected.error
    }

    fn apply_flips(&self, buf: &mut [u8], offset: u64) {
        let mut st = self.state.lock();
        let end = offset.saturating_add(buf.len() as u64);
        let mut corrupted = false;
        for flip in &st.flips {
            let start = flip.range.start.max(offset);
            let stop = flip.range.end.min(end);
            if start < stop && flip.xor != 0 {
                for b in &mut buf[(start - offset) as usize..(stop - offset) as usize] {
                    *b ^= flip.xor;
                }
                corrupted = true;
            }
        }
        if corrupted {
            st.counts.corrupted_reads += 1;
        }
    }
}

impl<D: BlockDev> BlockDev for FaultDev<D> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        let len = buf.len() as u64;
        self.check("read", OpInfo { op: FaultOp::Read, offset, len, fua: false }).map_err(|i| i.error)?;
        self.inner.read_at(buf, offset)?;
        self.apply_flips(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let len = buf.len() as u64;
        match self.check("write", OpInfo { op: FaultOp::Write, offset, len, fua: false }) {
            Ok(()) => self.inner.write_at(buf, offset),
            Err(injected) => Err(self.fail_write(injected, buf, offset)),
        }
    }

    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        let len = buf.len() as u64;
        match self.check("write_fua", OpInfo { op: FaultOp::Write, offset, len, fua: true }) {
            Ok(()) => self.inner.write_at_fua(buf, offset),
            Err(injected) => Err(self.fail_write(injected, buf, offset)),
        }
    }

    fn sync(&self) -> DevResult<()> {
        let len = self.inner.len();
        self.check("sync", OpInfo { op: FaultOp::Sync, offset: 0, len, fua: false }).map_err(|i| i.error)?;
        self.inner.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.check("discard", OpInfo { op: FaultOp::Discard, offset, len, fua: false })
            .map_err(|i| i.error)?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DevResult<()> {
        self.check("write_zeroes", OpInfo { op: FaultOp::WriteZeroes, offset, len, fua: false })
            .map_err(|i| i.error)?;
        self.inner.write_zeroes(offset, len, may_unmap)
    }

    fn known_zero_ranges(&self, offset: u64, len: u64) -> DevResult<Vec<Range<u64>>> {
        self.inner.known_zero_ranges(offset, len)
    }

    fn prefetch(&self, offset: u64, len: u64) -> DevResult<()> {
        self.inner.prefetch(offset, len)
    }

    /// The inner device's capabilities, with the bulk-copy extension routed through this
    /// device so that its write rules still apply to copies (see the [`BulkCopy`] impl).
    fn capabilities(&self) -> DevCaps<'_> {
        let inner = self.inner.capabilities();
        DevCaps { bulk: inner.bulk.map(|_| self as &dyn BulkCopy), ..inner }
    }
}

/// A copy into this device is a write: the write rules see it (and count it) before the inner
/// device's kernel copy runs. An injected error fails the whole copy with nothing written (a
/// rule's partial write needs the data in memory, which a kernel copy never has). As a copy
/// *source* the device offers no file: reads must go through [`BlockDev::read_at`], where read
/// rules and bit flips apply.
impl<D: BlockDev> BulkCopy for FaultDev<D> {
    fn buffered_file(&self) -> Option<&std::fs::File> {
        None
    }

    fn copy_from(&self, src: &dyn BlockDev, src_offset: u64, offset: u64, len: u64) -> DevResult<bool> {
        let Some(bulk) = self.inner.capabilities().bulk else { return Ok(false) };
        if super::buffered_file(src).is_none() || bulk.buffered_file().is_none() {
            // The inner device would decline (a source or a target without a buffered file):
            // decline before a rule counts a write that then happens through `write_at`.
            return Ok(false);
        }
        self.check("copy", OpInfo { op: FaultOp::Write, offset, len, fua: false }).map_err(|i| i.error)?;
        let copied = bulk.copy_from(src, src_offset, offset, len)?;
        if copied {
            self.state.lock().counts.kernel_copies += 1;
        }
        Ok(copied)
    }

    fn start_writeback(&self, offset: u64, len: u64) -> DevResult<()> {
        match self.inner.capabilities().bulk {
            Some(bulk) => bulk.start_writeback(offset, len),
            None => DevError::check_range("start_writeback", offset, len, self.inner.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDev;

    fn is_eio(r: DevResult<()>) -> bool {
        matches!(r, Err(DevError::Io { source, .. }) if source.raw_os_error() == Some(libc::EIO))
    }

    #[test]
    fn one_shot_nth_write_fails_once_and_changes_nothing() {
        let dev = FaultDev::new(MemDev::new(4096));
        dev.add_rule(FaultRule::nth(FaultOp::Write, 2));
        dev.write_at(&[1; 512], 0).unwrap();
        assert!(is_eio(dev.write_at(&[2; 512], 512)));
        dev.write_at(&[3; 512], 1024).unwrap();
        let mut buf = [0; 1536];
        dev.read_at(&mut buf, 0).unwrap();
        assert_eq!((buf[0], buf[512], buf[1024]), (1, 0, 3));
        let c = dev.counts();
        assert_eq!((c.writes, c.reads, c.injected_errors), (3, 1, 1));
    }

    #[test]
    fn persistent_rule_keeps_failing_after_firing() {
        let dev = FaultDev::new(MemDev::new(4096));
        dev.add_rule(FaultRule::nth(FaultOp::Sync, 2).persistent());
        dev.sync().unwrap();
        assert!(is_eio(dev.sync()));
        assert!(is_eio(dev.sync()));
        dev.write_at(&[1; 4], 0).unwrap();
    }

    #[test]
    fn range_and_predicate_narrow_a_rule() {
        let dev = FaultDev::new(MemDev::new(8192));
        let id = dev.add_rule(FaultRule::every(FaultOp::Any).in_range(4096..5000));
        dev.add_rule(FaultRule::every(FaultOp::Write).matching(|i| i.fua).with_errno(libc::ENOSPC));
        assert!(dev.read_at(&mut [0; 512], 3584).is_ok());
        assert!(is_eio(dev.read_at(&mut [0; 513], 3584)));
        assert!(is_eio(dev.write_at(&[0; 8], 4999)));
        assert!(dev.write_at(&[0; 8], 5000).is_ok());
        let fua = dev.write_at_fua(&[0; 8], 0);
        assert!(
            matches!(fua, Err(DevError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOSPC))
        );
        assert!(dev.remove_rule(id));
        assert!(dev.read_at(&mut [0; 512], 4096).is_ok());
    }

    #[test]
    fn partial_write_reaches_the_device_before_the_error() {
        let dev = FaultDev::new(MemDev::new(4096));
        dev.add_rule(FaultRule::nth(FaultOp::Write, 1).with_partial_write(100));
        assert!(is_eio(dev.write_at(&[7; 512], 0)));
        let mut buf = [0; 512];
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 7) && buf[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bit_flips_corrupt_reads_only() {
        let dev = FaultDev::new(MemDev::new(4096));
        dev.write_at(&[0xf0; 16], 100).unwrap();
        dev.add_bit_flip(104..106, 0x01);
        let mut buf = [0; 16];
        dev.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf[3..7], &[0xf0, 0xf1, 0xf1, 0xf0]);
        let mut raw = [0; 16];
        dev.inner().read_at(&mut raw, 100).unwrap();
        assert_eq!(raw, [0xf0; 16]);
        assert_eq!(dev.counts().corrupted_reads, 1);
        dev.clear();
        dev.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [0xf0; 16]);
    }

    /// A fault wrapper over a buffered file keeps the file's capabilities, bulk copy included,
    /// and its write rules apply to kernel copies as to writes.
    #[test]
    fn capabilities_pass_through_and_write_rules_fail_kernel_copies() {
        use crate::dev::{FileDev, FileDevOptions, copy_in_kernel};
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let opts = FileDevOptions { create_with_size: Some(1 << 16), ..FileDevOptions::default() };
            FileDev::open(&dir.path().join(name), &opts).unwrap()
        };
        let src = open("src.img");
        src.write_at(&[9; 4096], 0).unwrap();
        let dst = FaultDev::new(open("dst.img"));
        let (outer, inner) = (dst.capabilities(), dst.inner().capabilities());
        assert_eq!(
            (outer.cheap_writes, outer.fast_zero, outer.read_only),
            (inner.cheap_writes, inner.fast_zero, inner.read_only)
        );
        assert!(outer.bulk.is_some());
        assert!(copy_in_kernel(&dst, &src, 0, 0, 4096).unwrap());
        assert_eq!((dst.counts().writes, dst.counts().kernel_copies), (1, 1));
        dst.add_rule(FaultRule::nth(FaultOp::Write, 1));
        assert!(is_eio(copy_in_kernel(&dst, &src, 0, 4096, 4096).map(drop)));
        let mut buf = [1u8; 4096];
        dst.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0; 4096], "a failed copy writes nothing");
        assert!(!copy_in_kernel(&dst, &MemDev::new(8192), 0, 0, 4096).unwrap(), "no file to copy from");
        assert!(buffered_file_of(&dst).is_none(), "reads of a fault wrapper go through its rules");
    }

    fn buffered_file_of(dev: &dyn BlockDev) -> Option<&std::fs::File> {
        crate::dev::buffered_file(dev)
    }
}
