//! Writeback policy as pure functions: how fast to write dirty data home, and how to group
//! dirty extents into backing writes. The writeback thread (engine) asks these and does the I/O.
//!
//! - [`RateController`]: a PI controller on the amount of dirty data, like bcache's
//!   `__update_writeback_rate`. The target is `writeback_percent` of the cache; the rate is the
//!   error over `p_term_inverse` plus the integral of the error over `i_term_inverse`, clamped to
//!   `[min_rate, max_rate]`. The integral only grows while the output is not pinned at the
//!   maximum, and only shrinks while positive (anti-windup), so a long overload does not leave
//!   the controller writing at full speed long after the dirty data is back at its target.
//! - [`coalesce`]: merges dirty extents that are contiguous on the same device into one
//!   backing write, up to a maximum I/O size and extent count, keeping the input order.

use std::ops::Range;
use std::time::Duration;

/// Why a rate configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateConfigError {
    #[error("writeback_percent {0} is above 100")]
    Percent(u8),
    #[error("writeback rate minimum {min} must be > 0 and <= maximum {max}")]
    Bounds { min: u64, max: u64 },
    #[error("controller term inverses must be > 0 (p {p}, i {i})")]
    Terms { p: u64, i: u64 },
}

/// Tuning of the writeback rate controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateConfig {
    /// Bytes of the cache that can hold data; the target is a percentage of it.
    pub cache_bytes: u64,
    /// Dirty data aimed for, percent of `cache_bytes` (bcache default 10).
    pub writeback_percent: u8,
    /// Lowest rate, bytes per second: writeback always makes some progress.
    pub min_rate: u64,
    /// Highest rate, bytes per second.
    pub max_rate: u64,
    /// Proportional gain as an inverse: the rate gains 1 byte/s per this many bytes above target
    /// (bcache default 40).
    pub p_term_inverse: u64,
    /// Integral gain as an inverse: the rate gains 1 byte/s per this many byte-seconds of
    /// accumulated error (bcache default 10000).
    pub i_term_inverse: u64,
}

impl RateConfig {
    /// bcache's defaults for a cache of `cache_bytes`.
    #[must_use]
    pub fn with_cache_bytes(cache_bytes: u64) -> RateConfig {
        RateConfig {
            cache_bytes,
            writeback_percent: 10,
            min_rate: 4096,
            max_rate: 1 << 30,
            p_term_inverse: 40,
            i_term_inverse: 10_000,
        }
    }

    fn validate(&self) -> Result<(), RateConfigError> {
        if self.writeback_percent > 100 {
            return Err(RateConfigError::Percent(self.writeback_percent));
        }
        if self.min_rate == 0 || self.min_rate > self.max_rate {
            return Err(RateConfigError::Bounds { min: self.min_rate, max: self.max_rate });
        }
        if self.p_term_inverse == 0 || self.i_term_inverse == 0 {
            return Err(RateConfigError::Terms { p: self.p_term_inverse, i: self.i_term_inverse });
        }
        Ok(())
    }

    /// Dirty bytes the controller aims for.
    #[must_use]
    pub fn target_bytes(&self) -> u64 {
        // u128: cache_bytes * 100 may not fit in 64 bits.
        (u128::from(self.cache_bytes) * u128::from(self.writeback_percent.min(100)) / 100) as u64
    }
}

/// Longest step the integral takes in one update. A controller that was not updated for a
/// while (thread stalled, clock jump) must not integrate the whole gap at once.
pub const MAX_UPDATE_STEP: Duration = Duration::from_secs(30);

/// The writeback rate controller. Call [`RateController::update`] periodically (bcache: every
/// 5 s) with the dirty byte count; it returns the rate to write back at.
#[derive(Debug, Clone)]
pub struct RateController {
    config: RateConfig,
    /// Accumulated error, byte-seconds; never negative.
    integral: f64,
    last_update: Option<Duration>,
    rate: u64,
}

impl RateController {
    /// A controller starting at the minimum rate.
    ///
    /// # Errors
    /// [`RateConfigError`] for a percent above 100, min 0 or above max, or a zero gain inverse.
    pub fn new(config: RateConfig) -> Result<RateController, RateConfigError> {
        config.validate()?;
        Ok(RateController { config, integral: 0.0, last_update: None, rate: config.min_rate })
    }

    /// Changes the tuning, keeping the accumulated state (knob changes at runtime).
    ///
    /// # Errors
    /// As [`RateController::new`]; the old tuning stays on error.
    pub fn set_config(&mut self, config: RateConfig) -> Result<(), RateConfigError> {
        config.validate()?;
        self.config = config;
        self.rate = self.rate.clamp(config.min_rate, config.max_rate);
        Ok(())
    }

    /// The tuning.
    #[must_use]
    pub fn config(&self) -> RateConfig {
        self.config
    }

    /// The rate of the last update, bytes per second.
    #[must_use]
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Dirty bytes aimed for.
    #[must_use]
    pub fn target_bytes(&self) -> u64 {
        self.config.target_bytes()
    }

    /// The accumulated error term (byte-seconds), for tests and stats.
    #[must_use]
    pub fn integral(&self) -> f64 {
        self.integral
    }

    /// Computes the new rate from the dirty bytes now. `now` is a monotonic time; the first
    /// call only sets the proportional term (no elapsed time to integrate over).
    pub fn update(&mut self, dirty_bytes: u64, now: Duration) -> u64 {
        let step = match self.last_update {
            Some(last) => now.saturating_sub(last).min(MAX_UPDATE_STEP),
            None => Duration::ZERO,
        };
        self.last_update = Some(self.last_update.map_or(now, |last| last.max(now)));
        let cfg = &self.config;
        let error = dirty_bytes as f64 - cfg.target_bytes() as f64;
        let proportional = error / cfg.p_term_inverse as f64;
        let i_inverse = cfg.i_term_inverse as f64;
        let unclamped = proportional + self.integral / i_inverse;
        // Anti-windup (conditional integration, as bcache): grow the integral only while the
        // output is below the maximum (more would not be delivered), shrink it only while it is
        // positive, and never let it go negative (below target the rate is the minimum anyway).
        let integrate =
            (error > 0.0 && unclamped < cfg.max_rate as f64) || (error < 0.0 && self.integral > 0.0);
        if integrate {
            self.integral = (self.integral + error * step.as_secs_f64()).max(0.0);
        }
        let output = proportional + self.integral / i_inverse;
        self.rate = if output.is_nan() {
            cfg.min_rate
        } else {
            // `as` saturates for floats out of range; the clamp then applies the bounds.
            (output as u64).clamp(cfg.min_rate, cfg.max_rate)
        };
        self.rate
    }
}

/// One dirty extent: (device, start, length), in any one unit (sectors or bytes) used
/// consistently with [`CoalesceLimits::max_io_len`].
pub type DirtyExtent = (u32, u64, u64);

/// Bounds of one backing write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceLimits {
    /// Largest merged write; an extent longer than this on its own is its own batch (the
    /// engine's keys never span a bucket, so their length is bounded anyway).
    pub max_io_len: u64,
    /// Most extents in one write (bounds the executor's buffer list).
    pub max_extents: usize,
}

/// One backing write: a contiguous range of one device made of consecutive input extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    pub dev: u32,
    pub start: u64,
    pub len: u64,
    /// The input extents it covers (indices into the input slice, in order).
    pub extents: Range<usize>,
}

/// Why [`coalesce`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoalesceError {
    #[error("extent {index} has length 0")]
    ZeroLength { index: usize },
    #[error("extent {index} ends past the 64-bit address space")]
    Overflow { index: usize },
    #[error("extent {index} is not after extent {}: input must be in (device, offset) order without overlap", index - 1)]
    OutOfOrder { index: usize },
    #[error("coalesce limits must be positive (max_io_len {max_io_len}, max_extents {max_extents})")]
    BadLimits { max_io_len: u64, max_extents: usize },
}

/// Groups `extents` (dirty keys in (device, offset) order) into backing writes: consecutive
/// extents on the same device with no gap between them merge while the merged length stays
/// within `max_io_len` and the count within `max_extents`. Never reorders, never merges across
/// a device change or a gap. Refuses (rather than guesses about) unordered, overlapping,
/// empty or overflowing extents.
///
/// # Errors
/// [`CoalesceError`] naming the first bad extent, or bad limits.
pub fn coalesce(extents: &[DirtyExtent], limits: CoalesceLimits) -> Result<Vec<WriteBatch>, CoalesceError> {
    if limits.max_io_len == 0 || limits.max_extents == 0 {
        return Err(CoalesceError::BadLimits {
            max_io_len: limits.max_io_len,
            max_extents: limits.max_extents,
        });
    }
    let mut batches: Vec<WriteBatch> = Vec::new();
    let mut previous: Option<(u32, u64)> = None; // (dev, end) of the previous extent
    for (index, &(dev, start, len)) in extents.iter().enumerate() {
        if len == 0 {
            return Err(CoalesceError::ZeroLength { index });
        }
        let end = start.checked_add(len).ok_or(CoalesceError::Overflow { index })?;
        if let Some((prev_dev, prev_end)) = previous {
            if dev < prev_dev || (dev == prev_dev && start < prev_end) {
                return Err(CoalesceError::OutOfOrder { index });
            }
        }
        previous = Some((dev, end));
        let merges = batches.last().is_some_and(|b| {
            b.dev == dev
                && b.start + b.len == start
                && b.len.checked_add(len).is_some_and(|l| l <= limits.max_io_len)
                && b.extents.len() < limits.max_extents
        });
        match batches.last_mut() {
            Some(batch) if merges => {
                batch.len += len;
                batch.extents.end = index + 1;
            }
            _ => batches.push(WriteBatch { dev, start, len, extents: index..index + 1 }),
        }
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: CoalesceLimits = CoalesceLimits { max_io_len: 16, max_extents: 4 };

    #[test]
    fn contiguous_extents_merge_until_a_limit() {
        let input = [(0, 0, 4), (0, 4, 4), (0, 8, 8), (0, 16, 4)];
        let batches = coalesce(&input, LIMITS).unwrap();
        assert_eq!(
            batches,
            vec![
                WriteBatch { dev: 0, start: 0, len: 16, extents: 0..3 },
                WriteBatch { dev: 0, start: 16, len: 4, extents: 3..4 },
            ]
        );
        let many = [(1, 0, 1), (1, 1, 1), (1, 2, 1), (1, 3, 1), (1, 4, 1)];
        let batches = coalesce(&many, LIMITS).unwrap();
        assert_eq!(batches.iter().map(|b| b.extents.clone()).collect::<Vec<_>>(), vec![0..4, 4..5]);
    }

    #[test]
    fn gaps_and_device_changes_split_batches() {
        let input = [(0, 0, 4), (0, 5, 4), (1, 9, 4), (1, 13, 2)];
        let batches = coalesce(&input, LIMITS).unwrap();
        let ranges: Vec<_> = batches.iter().map(|b| (b.dev, b.start, b.len)).collect();
        assert_eq!(ranges, vec![(0, 0, 4), (0, 5, 4), (1, 9, 6)]);
    }

    #[test]
    fn an_oversized_extent_is_its_own_batch() {
        let input = [(0, 0, 4), (0, 4, 40), (0, 44, 4)];
        let lens: Vec<u64> = coalesce(&input, LIMITS).unwrap().iter().map(|b| b.len).collect();
        assert_eq!(lens, vec![4, 40, 4]);
    }

    #[test]
    fn bad_input_is_refused_with_the_index() {
        assert_eq!(coalesce(&[(0, 0, 4), (0, 2, 4)], LIMITS), Err(CoalesceError::OutOfOrder { index: 1 }));
        assert_eq!(coalesce(&[(1, 0, 4), (0, 8, 4)], LIMITS), Err(CoalesceError::OutOfOrder { index: 1 }));
        assert_eq!(coalesce(&[(0, 0, 0)], LIMITS), Err(CoalesceError::ZeroLength { index: 0 }));
        assert_eq!(coalesce(&[(0, u64::MAX, 1)], LIMITS), Err(CoalesceError::Overflow { index: 0 }));
        assert!(matches!(
            coalesce(&[], CoalesceLimits { max_io_len: 0, max_extents: 1 }),
            Err(CoalesceError::BadLimits { .. })
        ));
        assert_eq!(coalesce(&[], LIMITS), Ok(vec![]));
    }

    #[test]
    fn rate_config_is_validated() {
        let good = RateConfig::with_cache_bytes(1 << 30);
        assert!(RateController::new(good).is_ok());
        assert!(RateController::new(RateConfig { writeback_percent: 101, ..good }).is_err());
        assert!(RateController::new(RateConfig { min_rate: 0, ..good }).is_err());
        assert!(RateController::new(RateConfig { min_rate: 10, max_rate: 9, ..good }).is_err());
        assert!(RateController::new(RateConfig { p_term_inverse: 0, ..good }).is_err());
        assert_eq!(
            RateConfig { cache_bytes: u64::MAX, writeback_percent: 100, ..good }.target_bytes(),
            u64::MAX
        );
        assert_eq!(good.target_bytes(), (1 << 30) / 10);
    }
}
