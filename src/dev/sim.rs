//! A crash-simulating device: a durable image plus the writes the "disk" has not yet made durable.
//! The model is documented on [`SimDev`].

use super::{BlockDev, DevCaps, DevError, DevResult, MemDev, SECTOR_SIZE};
use parking_lot::Mutex;
use std::io;

/// What a simulated power loss does to each unsynced write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashMode {
    /// No unsynced write survives: the image is the last synced state (plus FUA writes).
    DropAll,
    /// Every unsynced write survives: the image equals the live state.
    KeepAll,
    /// Each unsynced write is kept or dropped whole, chosen by a generator seeded with `seed`.
    Random { seed: u64 },
    /// Each unsynced write is dropped, kept, or torn (an arbitrary subset of its sectors
    /// persisted), chosen by a generator seeded with `seed`.
    TornRandom { seed: u64 },
    /// The first `n` unsynced writes survive, the rest are dropped: a disk that drains its cache
    /// in order.
    KeepFirst(usize),
    /// One explicit fate per unsynced write, in write order; writes beyond the list are dropped.
    Explicit(Vec<WriteFate>),
}

/// The fate of one unsynced write in [`CrashMode::Explicit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFate {
    /// Never reached the media.
    Drop,
    /// Fully persisted.
    Keep,
    /// Only the first `n` sectors the write touches were persisted.
    KeepSectors(u64),
}

/// Where one unsynced write went, for a harness choosing [`CrashMode::Explicit`] fates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsyncedWrite {
    pub offset: u64,
    pub len: u64,
    /// Sectors it touches: the range of `n` in [`WriteFate::KeepSectors`] that tears it.
    pub sectors: u64,
    /// A FUA write: every crash keeps it, whatever its fate says.
    pub fua: bool,
}

/// Counters of the operations a [`SimDev`] has completed since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes, including FUA writes and zeroing/discard requests.
    pub writes: u64,
    /// Completed FUA writes (also counted in `writes`).
    pub fua_writes: u64,
    /// Completed syncs.
    pub syncs: u64,
    /// Bytes written (zeroing counts its length).
    pub bytes_written: u64,
    /// Writes issued since the last completed sync (what a crash may lose).
    pub unsynced_writes: u64,
}

/// The contents of one unsynced write.
#[derive(Debug, Clone)]
enum Payload {
    Bytes(Vec<u8>),
    /// `write_zeroes` and `discard` are stored compactly: only the length.
    Zeros(u64),
}

#[derive(Debug, Clone)]
struct Unsynced {
    offset: u64,
    payload: Payload,
    /// A FUA write: durable when acknowledged, so every crash keeps it.
    forced: bool,
}

impl Unsynced {
    fn len(&self) -> u64 {
        match &self.payload {
            Payload::Bytes(b) => b.len() as u64,
            Payload::Zeros(n) => *n,
        }
    }

    /// Applies the bytes in `range` (absolute device offsets, within this write) to `image`.
    fn apply_range(&self, image: &mut [u8], start: u64, end: u64) {
        let dst = &mut image[start as usize..end as usize];
        match &self.payload {
            Payload::Bytes(b) => {
                let from = (start - self.offset) as usize;
                dst.copy_from_slice(&b[from..from + dst.len()]);
            }
            Payload::Zeros(_) => dst.fill(0),
        }
    }

    fn apply(&self, image: &mut [u8]) {
        self.apply_range(image, self.offset, self.offset + self.len());
    }

    /// The absolute sector ranges this write touches, clipped to the write.
    fn sector_pieces(&self) -> impl Iterator<Item = (u64, u64)> + use<> {
        let (start, end) = (self.offset, self.offset + self.len());
        let first = start / SECTOR_SIZE;
        let last = end.div_ceil(SECTOR_SIZE);
        (first..last).map(move |s| ((s * SECTOR_SIZE).max(start), ((s + 1) * SECTOR_SIZE).min(end)))
    }

    fn sector_count(&self) -> u64 {
        if self.len() == 0 {
            return 0;
        }
        (self.offset + self.len()).div_ceil(SECTOR_SIZE) - self.offset / SECTOR_SIZE
    }
}

/// When the simulated power cut happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    None,
    /// Dies once this many more writes have completed.
    AfterWrites(u64),
    /// The sync that brings this count to zero dies before persisting anything.
    AtSync(u64),
}

#[derive(Debug)]
struct SimState {
    /// What survives any crash.
    durable: Vec<u8>,
    /// What reads see: `durable` with every unsynced write applied.
    live: Vec<u8>,
    unsynced: Vec<Unsynced>,
    stats: SimStats,
    trigger: Trigger,
    dead: bool,
    lying_sync: bool,
}

/// A crash-simulating device: a durable image plus the writes the "disk" has not yet made durable.
///
/// # The model
///
/// A real disk (and the page cache of a file in front of it) acknowledges a write long before the
/// data is on stable media: the bytes sit in a volatile cache that the disk drains in whatever
/// order suits it. Only a completed flush (`fsync`, NBD FLUSH, a SCSI SYNCHRONIZE CACHE) promises
/// that every write acknowledged before it has reached the media. If power fails first, each
/// unsynced write may independently be
/// - **dropped**: never reached the media, the old contents remain;
/// - **kept**: fully persisted;
/// - **torn**: partly persisted. Disks guarantee atomicity only per sector (the unit the drive
///   writes with one ECC block), so a torn write is a *subset of its sectors*, each of which holds
///   either its complete old or its complete new contents. A sector never holds half of each.
///
/// The one ordering a disk does keep is per address: a later write to a sector supersedes an
/// earlier one in its cache, so the earlier write can never land *after* the later one. [`SimDev`]
/// therefore replays surviving unsynced writes in their original order onto the durable image.
/// A FUA write ([`BlockDev::write_at_fua`]) is durable by itself when it returns, without
/// flushing anything else: it is recorded in order but always kept.
///
/// # Using it in a crash harness
///
/// - Run a workload on a `SimDev`; reads see the *live* state (durable image + unsynced writes),
///   as a running system would.
/// - Arm a trigger to cut the power at a chosen point: [`SimDev::set_crash_after_writes`] or
///   [`SimDev::set_crash_at_sync`] (or [`SimDev::crash_now`]). From then on every I/O fails and the
///   state is frozen, so the code under test sees a dead device, as after a real power loss.
/// - Take [`SimDev::crash_image`] with a [`CrashMode`] (deterministic, seeded), and restart the
///   system under test on [`SimDev::from_image`] (or a [`MemDev`]) of that image. Check the
///   durability contract against what was acknowledged.
/// - [`SimDev::set_lying_sync`] makes `sync` report success without persisting anything: a
///   deliberately broken FLUSH, so a harness can prove that it would catch one.
///
/// Sector boundaries are absolute device offsets (multiples of [`SECTOR_SIZE`]), so a write at an
/// unaligned offset tears only at those boundaries, as on a real disk.
///
/// # Cost
///
/// Thread-safe (one internal lock); reads copy from a live image, so they are as fast as
/// [`MemDev`]'s, and a sync costs only the bytes written since the previous one.
#[derive(Debug)]
pub struct SimDev {
    state: Mutex<SimState>,
    len: u64,
}

fn power_lost(op: &'static str, offset: u64, len: u64) -> DevError {
    DevError::Io { op, offset, len, source: io::Error::other("simulated power loss: the device is dead") }
}

impl SimDev {
    /// A zero-filled device of `len` bytes, all of it durable.
    #[must_use]
    pub fn new(len: u64) -> Self {
        Self::from_image(vec![0; len as usize])
    }

    /// A device whose durable (and live) contents are `image`, e.g. the result of
    /// [`SimDev::crash_image`] to restart after a crash.
    #[must_use]
    pub fn from_image(image: Vec<u8>) -> Self {
        let len = image.len() as u64;
        let state = SimState {
            live: image.clone(),
            durable: image,
            unsynced: Vec::new(),
            stats: SimStats::default(),
            trigger: Trigger::None,
            dead: false,
            lying_sync: false,
        };
        Self { state: Mutex::new(state), len }
    }

    /// Cuts the power once `n` more writes have completed (`0`: at once). Writes of any kind
    /// count: plain, FUA, zeroing and discard. Replaces any earlier trigger.
    pub fn set_crash_after_writes(&self, n: u64) {
        let mut st = self.state.lock();
        if n == 0 {
            st.dead = true;
            st.trigger = Trigger::None;
        } else {
            st.trigger = Trigger::AfterWrites(n);
        }
    }

    /// Cuts the power at the `n`-th sync from now (`1`: the next one; `0`: at once). That sync
    /// fails without persisting anything, so the writes before it stay unsynced and the crash
    /// mode decides their fate. Replaces any earlier trigger.
    pub fn set_crash_at_sync(&self, n: u64) {
        let mut st = self.state.lock();
        if n == 0 {
            st.dead = true;
            st.trigger = Trigger::None;
        } else {
            st.trigger = Trigger::AtSync(n);
        }
    }

    /// Cuts the power now: every later I/O fails and the state is frozen.
    pub fn crash_now(&self) {
        self.state.lock().dead = true;
    }

    /// Whether the power has been cut.
    #[must_use]
    pub fn is_dead(&self) -> bool {
        self.state.lock().dead
    }

    /// With `true`, `sync` reports success but persists nothing (FUA writes still do): a lying
    /// disk or a broken FLUSH, for proving that a crash harness catches one.
    pub fn set_lying_sync(&self, lying: bool) {
        self.state.lock().lying_sync = lying;
    }

    /// Operation counters.
    #[must_use]
    pub fn stats(&self) -> SimStats {
        let st = self.state.lock();
        SimStats { unsynced_writes: st.unsynced.len() as u64, ..st.stats }
    }

    /// Number of writes a crash may lose or tear right now.
    #[must_use]
    pub fn unsynced_write_count(&self) -> usize {
        self.state.lock().unsynced.len()
    }

    /// The unsynced writes in order (index `i` is the `i`-th fate of [`CrashMode::Explicit`]).
    #[must_use]
    pub fn unsynced_writes(&self) -> Vec<UnsyncedWrite> {
        let st = self.state.lock();
        st.unsynced
            .iter()
            .map(|w| UnsyncedWrite {
                offset: w.offset,
                len: w.len(),
                sectors: w.sector_count(),
                fua: w.forced,
            })
            .collect()
    }

    /// A copy of what reads currently see.
    #[must_use]
    pub fn live_image(&self) -> Vec<u8> {
        self.state.lock().live.clone()
    }

    /// A copy of the last synced state (FUA writes included): what [`CrashMode::DropAll`] leaves.
    #[must_use]
    pub fn durable_image(&self) -> Vec<u8> {
        self.crash_image(&CrashMode::DropAll)
    }

    /// The device contents after a power loss now (or at the frozen point, if the device is
    /// dead), with unsynced writes treated as `mode` says. Does not change the device, so one
    /// frozen state can be crashed many ways.
    #[must_use]
    pub fn crash_image(&self, mode: &CrashMode) -> Vec<u8> {
        let st = self.state.lock();
        let mut image = st.durable.clone();
        let mut rng = match mode {
            CrashMode::Random { seed } | CrashMode::TornRandom { seed } => SplitMix64::new(*seed),
            _ => SplitMix64::new(0),
        };
        for (index, write) in st.unsynced.iter().enumerate() {
            if write.forced {
                write.apply(&mut image);
                continue;
            }
            let fate = match mode {
                CrashMode::DropAll => WriteFate::Drop,
                CrashMode::KeepAll => WriteFate::Keep,
                CrashMode::KeepFirst(n) => {
                    if index < *n {
                        WriteFate::Keep
                    } else {
                        WriteFate::Drop
                    }
                }
                CrashMode::Explicit(fates) => fates.get(index).copied().unwrap_or(WriteFate::Drop),
                CrashMode::Random { .. } => {
                    if rng.next() & 1 == 0 {
                        WriteFate::Drop
                    } else {
                        WriteFate::Keep
                    }
                }
                CrashMode::TornRandom { .. } => match rng.next() % 3 {
                    0 => WriteFate::Drop,
                    1 => WriteFate::Keep,
                    _ => {
                        // An arbitrary subset of sectors, not only a prefix: disks may reorder
                        // the sectors of one request.
                        for (start, end) in write.sector_pieces() {
                            if rng.next() & 1 == 1 {
                                write.apply_range(&mut image, start, end);
                            }
                        }
                        continue;
                    }
                },
            };
            match fate {
                WriteFate::Drop => {}
                WriteFate::Keep => write.apply(&mut image),
                WriteFate::KeepSectors(n) => {
                    for (start, end) in write.sector_pieces().take(n.min(write.sector_count()) as usize) {
                        write.apply_range(&mut image, start, end);
                    }
                }
            }
        }
        image
    }

    /// [`SimDev::crash_image`] as a [`MemDev`], for restarting on a device that never crashes.
    #[must_use]
    pub fn crash_mem_dev(&self, mode: &CrashMode) -> MemDev {
        MemDev::from_bytes(self.crash_image(mode))
    }

    /// [`SimDev::crash_image`] as a fresh `SimDev`, for crashing again after recovery.
    #[must_use]
    pub fn crash_sim_dev(&self, mode: &CrashMode) -> SimDev {
        SimDev::from_image(self.crash_image(mode))
    }

    /// Records one write (already range-checked) and advances the write trigger.
    fn record_write(&self, op: &'static str, write: Unsynced) -> DevResult<()> {
        let mut st = self.state.lock();
        let len = write.len();
        if st.dead {
            return Err(power_lost(op, write.offset, len));
        }
        write.apply(&mut st.live);
        st.stats.writes += 1;
        st.stats.bytes_written += len;
        if write.forced {
            st.stats.fua_writes += 1;
        }
        st.unsynced.push(write);
        if let Trigger::AfterWrites(n) = st.trigger {
            if n <= 1 {
                st.trigger = Trigger::None;
                st.dead = true;
            } else {
                st.trigger = Trigger::AfterWrites(n - 1);
            }
        }
        Ok(())
    }
}

impl BlockDev for SimDev {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        DevError::check_range("read", offset, buf.len() as u64, self.len)?;
        let mut st = self.state.lock();
        if st.dead {
            return Err(power_lost("read", offset, buf.len() as u64));
        }
        let start = offset as usize;
        buf.copy_from_slice(&st.live[start..start + buf.len()]);
        st.stats.reads += 1;
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        DevError::check_range("write", offset, buf.len() as u64, self.len)?;
        self.record_write("write", Unsynced { offset, payload: Payload::Bytes(buf.to_vec()), forced: false })
    }

    fn write_at_fua(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        DevError::check_range("write_fua", offset, buf.len() as u64, self.len)?;
        self.record_write(
            "write_fua",
            Unsynced { offset, payload: Payload::Bytes(buf.to_vec()), forced: true },
        )
    }

    fn sync(&self) -> DevResult<()> {
        let mut st = self.state.lock();
        if st.dead {
            return Err(power_lost("sync", 0, self.len));
        }
        if let Trigger::AtSync(n) = st.trigger {
            if n <= 1 {
                // Power fails while the flush is in flight: nothing more became durable.
                st.trigger = Trigger::None;
                st.dead = true;
                return Err(power_lost("sync", 0, self.len));
            }
            st.trigger = Trigger::AtSync(n - 1);
        }
        st.stats.syncs += 1;
        if st.lying_sync {
            return Ok(());
        }
        let SimState { durable, unsynced, .. } = &mut *st;
        for write in unsynced.drain(..) {
            write.apply(durable);
        }
        Ok(())
    }

    /// Discard zeroes the range (an unsynced write like any other): the contract allows old
    /// contents or zeros, and zeros expose callers that wrongly expect trimmed data to survive.
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        DevError::check_range("discard", offset, len, self.len)?;
        self.record_write("discard", Unsynced { offset, payload: Payload::Zeros(len), forced: false })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> DevResult<()> {
        DevError::check_range("write_zeroes", offset, len, self.len)?;
        self.record_write("write_zeroes", Unsynced { offset, payload: Payload::Zeros(len), forced: false })
    }

    /// Zeroing is recorded, not written, so it is fast; no bulk copy (a kernel copy would skip
    /// the crash model).
    fn capabilities(&self) -> DevCaps<'_> {
        DevCaps { fast_zero: true, ..DevCaps::default() }
    }
}

/// A tiny deterministic generator (SplitMix64), so crash images depend only on the seed and
/// the device layer needs no random-number dependency.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(dev: &SimDev) -> Vec<u8> {
        let mut buf = vec![0; dev.len() as usize];
        dev.read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn reads_see_live_state_and_sync_makes_it_durable() {
        let dev = SimDev::new(8192);
        dev.write_at(&[1; 1000], 100).unwrap();
        dev.write_zeroes(200, 50, true).unwrap();
        let live = read_all(&dev);
        assert_eq!(live[100], 1);
        assert_eq!(live[200], 0);
        assert_eq!(live[1099], 1);
        assert_eq!(dev.crash_image(&CrashMode::DropAll), vec![0; 8192]);
        assert_eq!(dev.crash_image(&CrashMode::KeepAll), live);
        dev.sync().unwrap();
        assert_eq!(dev.unsynced_write_count(), 0);
        assert_eq!(dev.crash_image(&CrashMode::DropAll), live);
        assert_eq!(dev.stats().syncs, 1);
        assert_eq!(dev.stats().writes, 2);
    }

    #[test]
    fn keep_sectors_tears_on_absolute_sector_boundaries() {
        let dev = SimDev::new(4096);
        // Bytes 300..1300 touch sectors 0 (300..512), 1 (512..1024) and 2 (1024..1300).
        dev.write_at(&[9; 1000], 300).unwrap();
        assert_eq!(
            dev.unsynced_writes(),
            vec![UnsyncedWrite { offset: 300, len: 1000, sectors: 3, fua: false }]
        );
        let image = dev.crash_image(&CrashMode::Explicit(vec![WriteFate::KeepSectors(2)]));
        assert!(image[..300].iter().all(|&b| b == 0));
        assert!(image[300..1024].iter().all(|&b| b == 9));
        assert!(image[1024..].iter().all(|&b| b == 0));
    }

    #[test]
    fn fua_write_survives_every_crash_but_does_not_sync_others() {
        let dev = SimDev::new(4096);
        dev.write_at(&[1; 512], 0).unwrap();
        dev.write_at_fua(&[2; 512], 1024).unwrap();
        let dropped = dev.crash_image(&CrashMode::DropAll);
        assert_eq!(dropped[0], 0);
        assert_eq!(dropped[1024], 2);
        // A FUA write over an unsynced one: the older write can never land after it.
        dev.write_at(&[3; 512], 2048).unwrap();
        dev.write_at_fua(&[4; 512], 2048).unwrap();
        for seed in 0..20 {
            assert_eq!(dev.crash_image(&CrashMode::TornRandom { seed })[2048], 4);
        }
    }

    #[test]
    fn crash_after_writes_freezes_the_state() {
        let dev = SimDev::new(4096);
        dev.set_crash_after_writes(2);
        dev.write_at(&[1; 512], 0).unwrap();
        dev.write_at(&[2; 512], 512).unwrap();
        assert!(dev.is_dead());
        assert!(matches!(dev.write_at(&[3; 512], 1024), Err(DevError::Io { .. })));
        assert!(matches!(dev.read_at(&mut [0; 512], 0), Err(DevError::Io { .. })));
        assert!(matches!(dev.sync(), Err(DevError::Io { .. })));
        let kept = dev.crash_image(&CrashMode::KeepAll);
        assert_eq!((kept[0], kept[512], kept[1024]), (1, 2, 0));
    }

    #[test]
    fn crash_at_sync_leaves_writes_unsynced() {
        let dev = SimDev::new(4096);
        dev.set_crash_at_sync(2);
        dev.write_at(&[1; 512], 0).unwrap();
        dev.sync().unwrap();
        dev.write_at(&[2; 512], 512).unwrap();
        assert!(dev.sync().is_err());
        assert!(dev.is_dead());
        assert_eq!(dev.stats().syncs, 1);
        let image = dev.crash_image(&CrashMode::DropAll);
        assert_eq!((image[0], image[512]), (1, 0));
        assert_eq!(dev.crash_image(&CrashMode::KeepAll)[512], 2);
    }

    #[test]
    fn lying_sync_persists_nothing() {
        let dev = SimDev::new(4096);
        dev.set_lying_sync(true);
        dev.write_at(&[1; 512], 0).unwrap();
        dev.sync().unwrap();
        assert_eq!(dev.crash_image(&CrashMode::DropAll)[0], 0);
        dev.set_lying_sync(false);
        dev.sync().unwrap();
        assert_eq!(dev.crash_image(&CrashMode::DropAll)[0], 1);
    }

    #[test]
    fn out_of_range_is_rejected_without_recording() {
        let dev = SimDev::new(1024);
        assert!(matches!(dev.write_at(&[1; 2], 1023), Err(DevError::OutOfRange { .. })));
        assert!(matches!(dev.write_zeroes(u64::MAX, 2, false), Err(DevError::OutOfRange { .. })));
        assert_eq!(dev.unsynced_write_count(), 0);
    }
}
