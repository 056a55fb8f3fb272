//! Power cuts for crash tests: where to cut, and which crash images to check at each cut. Used
//! by the `engine` and `writeback` test crates.

use ubcache::dev::SimDev;

/// Where a crash test cuts the power: never, after the n-th write or at the n-th sync of the
/// cache or the backing device (counted from when the cut is armed).
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    Never,
    CacheWrite(u64),
    CacheSync(u64),
    BackingWrite(u64),
    BackingSync(u64),
}

impl Cut {
    pub fn arm(self, cache: &SimDev, backing: &SimDev) {
        match self {
            Cut::Never => {}
            Cut::CacheWrite(n) => cache.set_crash_after_writes(n),
            Cut::CacheSync(n) => cache.set_crash_at_sync(n),
            Cut::BackingWrite(n) => backing.set_crash_after_writes(n),
            Cut::BackingSync(n) => backing.set_crash_at_sync(n),
        }
    }

    /// `Never`, then every `stride(count)`-th cut point of an operation that did
    /// `(writes, syncs)` on the cache and on the backing device.
    pub fn points(cache: (u64, u64), backing: (u64, u64), stride: impl Fn(u64) -> u64) -> Vec<Cut> {
        let every = |n: u64| (1..=n).step_by(stride(n).max(1) as usize);
        let mut out = vec![Cut::Never];
        out.extend(every(cache.0).map(Cut::CacheWrite));
        out.extend(every(cache.1).map(Cut::CacheSync));
        out.extend(every(backing.0).map(Cut::BackingWrite));
        out.extend(every(backing.1).map(Cut::BackingSync));
        out
    }
}

/// The crash images a crash test checks at each cut: every unsynced write dropped, every one
/// kept, and two random mixes (whole writes; torn writes).
pub fn crash_modes(rng: &mut impl rand::Rng) -> [ubcache::dev::CrashMode; 4] {
    use ubcache::dev::CrashMode;
    [
        CrashMode::DropAll,
        CrashMode::KeepAll,
        CrashMode::Random { seed: rng.r#gen() },
        CrashMode::TornRandom { seed: rng.r#gen() },
    ]
}
