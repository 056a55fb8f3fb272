//! Extent keys, pointers and positions: the values the btree indexes.

use std::fmt;

/// A position in the key space: sector `sector` of backing device `dev`. Keys sort by their end
/// position `(dev, end)`, and node ranges are expressed in positions too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    /// Backing device id.
    pub dev: u32,
    /// Sector (512 bytes) of that device.
    pub sector: u64,
}

impl Pos {
    /// The smallest position: the low bound of the whole tree.
    pub const MIN: Pos = Pos { dev: 0, sector: 0 };
    /// The largest position: the high bound of the whole tree.
    pub const MAX: Pos = Pos { dev: u32::MAX, sector: u64::MAX };

    /// A position.
    #[must_use]
    pub const fn new(dev: u32, sector: u64) -> Pos {
        Pos { dev, sector }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.sector)
    }
}

/// Where a key's data lives in the cache: the absolute cache-device sector holding the data of the
/// key's *start*, and the bucket generation the pointer was made with. The cache checks the
/// generation; the btree only stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ptr {
    /// Cache-device sector of the key's first sector.
    pub offset: u64,
    /// Bucket generation when the pointer was made.
    pub generation: u8,
}

/// An extent: sectors `[end - size, end)` of backing device `dev` are cached at `ptr`.
///
/// Keys compare by `(dev, end)` (see [`Key::pos`]); cutting `n` sectors off a key's front adds `n`
/// to `ptr.offset`, so every remaining sector still points at its own data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// Backing device id.
    pub dev: u32,
    /// One past the last sector covered.
    pub end: u64,
    /// Number of sectors covered (never 0 in a valid key).
    pub size: u32,
    /// Where the data is in the cache.
    pub ptr: Ptr,
    /// The cached data is newer than the backing device (must be written back).
    pub dirty: bool,
}

impl Key {
    /// The key covering `[start, start + size)` of `dev`. `start + size` saturates at `u64::MAX`;
    /// [`Key::validate`] (run by every tree operation) rejects keys whose fields do not add up.
    #[must_use]
    pub fn new(dev: u32, start: u64, size: u32, ptr: Ptr, dirty: bool) -> Key {
        Key { dev, end: start.saturating_add(u64::from(size)), size, ptr, dirty }
    }

    /// First sector covered.
    #[must_use]
    pub fn start(&self) -> u64 {
        self.end.saturating_sub(u64::from(self.size))
    }

    /// The sort position `(dev, end)`.
    #[must_use]
    pub fn pos(&self) -> Pos {
        Pos { dev: self.dev, sector: self.end }
    }

    /// The position of the key's first sector, `(dev, start)`.
    #[must_use]
    pub fn start_pos(&self) -> Pos {
        Pos { dev: self.dev, sector: self.start() }
    }

    /// Checks the fields are self-consistent: non-empty, `start >= 0`, and the pointer range does
    /// not wrap. Every key entering the tree or read from disk passes this check, so the cut and
    /// slice arithmetic below cannot overflow.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.size == 0 {
            return Err("key has size 0");
        }
        if u64::from(self.size) > self.end {
            return Err("key starts before sector 0 (size > end)");
        }
        if self.ptr.offset.checked_add(u64::from(self.size)).is_none() {
            return Err("key's cache pointer range wraps around u64");
        }
        Ok(())
    }

    /// The part of the key covering `[start, end)`, which must lie within the key (callers clip
    /// first). The pointer moves with the start.
    #[must_use]
    pub fn slice(&self, start: u64, end: u64) -> Key {
        debug_assert!(self.start() <= start && start < end && end <= self.end);
        let shift = start - self.start();
        Key {
            dev: self.dev,
            end,
            size: (end - start) as u32,
            ptr: Ptr { offset: self.ptr.offset + shift, generation: self.ptr.generation },
            dirty: self.dirty,
        }
    }

    /// Whether `self` and `other` map `[start, end)` (within both) to the same data: same
    /// device, generation and dirtiness, and pointers that agree sector by sector.
    #[must_use]
    pub fn same_mapping(&self, other: &Key) -> bool {
        self.dev == other.dev
            && self.ptr.generation == other.ptr.generation
            && self.dirty == other.dirty
            && (i128::from(self.ptr.offset) - i128::from(self.start()))
                == (i128::from(other.ptr.offset) - i128::from(other.start()))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dev {} [{}, {}) -> cache {} gen {}{}",
            self.dev,
            self.start(),
            self.end,
            self.ptr.offset,
            self.ptr.generation,
            if self.dirty { " dirty" } else { "" }
        )
    }
}

/// One piece of a read mapping returned by [`crate::Tree::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// The sectors `[key.start(), key.end)` are in the cache (the key is trimmed to the segment).
    Cached(Key),
    /// The sectors `[start, end)` are not cached.
    Hole {
        /// First sector.
        start: u64,
        /// One past the last sector.
        end: u64,
    },
}

impl Segment {
    /// First sector of the segment.
    #[must_use]
    pub fn start(&self) -> u64 {
        match self {
            Segment::Cached(k) => k.start(),
            Segment::Hole { start, .. } => *start,
        }
    }

    /// One past the last sector of the segment.
    #[must_use]
    pub fn end(&self) -> u64 {
        match self {
            Segment::Cached(k) => k.end,
            Segment::Hole { end, .. } => *end,
        }
    }
}
