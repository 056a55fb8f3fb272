//! Crash states beyond a prefix: which of the writes still unflushed at a crash reached the disk.
//!
//! A plain write is durable only at the next FLUSH sent after its reply; until then the disk may
//! have stored it, not stored it, or (for a multi-sector write) stored some of its sectors, in
//! any order relative to the other unflushed writes. A FUA write is durable at its reply. So a
//! crash after the durable base (the prefix through the last FLUSH) may leave, in every sector,
//! the base value or any value written to that sector since, except that a FUA write and what
//! the log shows after it cannot be undone by an earlier unflushed write.
//!
//! The choice is a pure function ([`choose`]) of the window's entries, the mode and a seed; the
//! executor in `super::image` applies the chosen parts in log order. Applying a subset of the
//! writes in log order, with torn writes cut at sector boundaries, reaches every state the
//! contract allows sector by sector: for any sector, keeping only the write of the wanted value
//! among the writes to it leaves exactly that value.

use std::ops::Range;

/// How the unflushed writes of the crash window are applied (`--unflushed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unflushed {
    /// None of them: the durable base plus the FUA writes in the window.
    None,
    /// All of them, whole, in log order (the state a disk without a volatile cache would have).
    All,
    /// Each one whole or not at all, chosen by the seed.
    Random,
    /// Each one whole, not at all, or torn: a sector-granular prefix or subset of it.
    Torn,
}

impl std::str::FromStr for Unflushed {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(Self::None),
            "all" => Ok(Self::All),
            "random" => Ok(Self::Random),
            "torn" => Ok(Self::Torn),
            _ => Err(format!("bad --unflushed {text:?}: use none, all, random or torn")),
        }
    }
}

impl Unflushed {
    /// The flag value that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::All => "all",
            Self::Random => "random",
            Self::Torn => "torn",
        }
    }

    /// Whether the mode draws from a seed, so that several states can differ.
    pub fn is_random(self) -> bool {
        matches!(self, Self::Random | Self::Torn)
    }
}

/// One entry of the crash window that changes data (a write, a FUA write, a trim or a zeroing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowWrite {
    /// The entry number in the log.
    pub entry: u64,
    /// Byte range of the export it changes.
    pub range: Range<u64>,
    /// Durable at its reply: always applied, whole.
    pub fua: bool,
}

/// What to do with one window entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Apply {
    /// Apply the whole entry.
    Whole,
    /// Apply only these byte ranges of the export (inside the entry's range, ascending,
    /// disjoint): a torn write.
    Parts(Vec<Range<u64>>),
}

/// The decision for one crash state: the window entries to apply, in log order, and how. Window
/// entries not listed are dropped.
pub type Choice = Vec<(u64, Apply)>;

/// A small, stable pseudo-random generator (SplitMix64). Stable across versions and platforms
/// on purpose: a seed printed in a bug report must rebuild the same crash state later.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0); the tiny modulo bias does not matter for picking states.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Chooses which window entries a crash state applies and how. `sector` is the torn-write unit
/// (the log's sector size); a write is only ever cut at multiples of it.
pub fn choose(window: &[WindowWrite], mode: Unflushed, seed: u64, sector: u64) -> Choice {
    let mut rng = SplitMix64::new(seed);
    let mut choice = Vec::new();
    for w in window {
        if w.fua {
            choice.push((w.entry, Apply::Whole));
            continue;
        }
        let apply = match mode {
            Unflushed::None => None,
            Unflushed::All => Some(Apply::Whole),
            Unflushed::Random => (rng.below(2) == 1).then_some(Apply::Whole),
            Unflushed::Torn => match rng.below(3) {
                0 => None,
                1 => Some(Apply::Whole),
                _ => torn(&w.range, sector, &mut rng),
            },
        };
        if let Some(apply) = apply {
            choice.push((w.entry, apply));
        }
    }
    choice
}

/// A torn version of a write over `range`: a prefix of its sectors (as a disk that lost power
/// mid-transfer leaves) or an arbitrary subset (as a disk that reorders sectors may leave).
/// `None` when nothing of it is kept.
fn torn(range: &Range<u64>, sector: u64, rng: &mut SplitMix64) -> Option<Apply> {
    let pieces = sector_pieces(range, sector.max(1));
    if pieces.len() < 2 {
        // One sector cannot tear: it is written whole or not at all (sector atomicity).
        return (rng.below(2) == 1).then_some(Apply::Whole);
    }
    let kept: Vec<Range<u64>> = if rng.below(2) == 0 {
        let n = 1 + rng.below(pieces.len() as u64 - 1) as usize;
        pieces[..n].to_vec()
    } else {
        pieces.into_iter().filter(|_| rng.below(2) == 1).collect()
    };
    (!kept.is_empty()).then(|| Apply::Parts(merge(kept)))
}

/// `range` cut at every multiple of `sector` inside it.
fn sector_pieces(range: &Range<u64>, sector: u64) -> Vec<Range<u64>> {
    let mut pieces = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let boundary = (start / sector).saturating_add(1).saturating_mul(sector);
        let end = boundary.min(range.end);
        pieces.push(start..end);
        start = end;
    }
    pieces
}

/// Joins adjacent ranges of an ascending list, so a prefix is one write.
fn merge(ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(entry: u64, start: u64, end: u64, fua: bool) -> WindowWrite {
        WindowWrite { entry, range: start..end, fua }
    }

    #[test]
    fn fua_writes_are_always_applied_whole() {
        let window = [w(1, 0, 4096, true), w(2, 0, 512, false)];
        for mode in [Unflushed::None, Unflushed::Random, Unflushed::Torn] {
            for seed in 0..20 {
                let choice = choose(&window, mode, seed, 512);
                assert_eq!(choice.first(), Some(&(1, Apply::Whole)), "{mode:?} seed {seed}");
            }
        }
    }

    #[test]
    fn torn_parts_stay_inside_the_write_and_on_sector_boundaries() {
        let window = [w(7, 100, 5000, false)];
        let mut saw_parts = false;
        for seed in 0..200 {
            if let Some((_, Apply::Parts(parts))) = choose(&window, Unflushed::Torn, seed, 512).first() {
                saw_parts = true;
                for p in parts {
                    assert!(p.start >= 100 && p.end <= 5000 && p.start < p.end, "{p:?}");
                    assert!(p.start == 100 || p.start % 512 == 0, "{p:?}");
                    assert!(p.end == 5000 || p.end % 512 == 0, "{p:?}");
                }
            }
        }
        assert!(saw_parts);
    }

    #[test]
    fn the_same_seed_gives_the_same_state() {
        let window: Vec<_> = (0..32).map(|i| w(i, i * 4096, i * 4096 + 8192, false)).collect();
        assert_eq!(choose(&window, Unflushed::Torn, 9, 512), choose(&window, Unflushed::Torn, 9, 512));
        assert_ne!(choose(&window, Unflushed::Torn, 9, 512), choose(&window, Unflushed::Torn, 10, 512));
    }
}
