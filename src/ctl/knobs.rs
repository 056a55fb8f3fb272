//! Tuning knobs and cache modes as plain values: parsing, bounds, and formatting.
//!
//! Pure: nothing here touches the engine. The control socket parses a `set` request into a typed
//! [`KnobSetting`] before the engine sees it, so a bad value is refused with a clear message and
//! the engine only ever receives values inside their bounds. [`Knobs`] holds the current values
//! and checks the rules that span two knobs (`writeback_rate_min <= writeback_rate_max`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a knob name or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnobError {
    /// No knob has this name.
    #[error("unknown knob {name:?} (known: {known})")]
    UnknownKnob { name: String, known: String },
    /// The value does not parse as the knob's type.
    #[error("bad value {value:?} for {knob}: {reason}")]
    BadValue { knob: &'static str, value: String, reason: String },
    /// The value parses but lies outside the knob's bounds.
    #[error("{knob} = {value} is out of range ({min}..={max})")]
    OutOfRange { knob: &'static str, value: String, min: String, max: String },
    /// The value conflicts with another knob's current value.
    #[error("{0}")]
    Conflict(String),
    /// Not a cache mode.
    #[error("unknown cache mode {0:?} (expected writethrough, writeback, writearound or none)")]
    UnknownMode(String),
}

/// How a backing device is cached: the engine's own type, so a mode parsed here is the one the
/// engine acts on.
pub use crate::cache::CacheMode;

/// Parses a cache mode by name, ignoring case and surrounding blanks (the CLI's and the control
/// socket's spelling; the engine's `FromStr` is exact).
///
/// # Errors
/// [`KnobError::UnknownMode`] naming the four modes.
pub fn parse_mode(text: &str) -> Result<CacheMode, KnobError> {
    let wanted = text.trim();
    CacheMode::ALL
        .into_iter()
        .find(|m| m.name().eq_ignore_ascii_case(wanted))
        .ok_or_else(|| KnobError::UnknownMode(text.to_owned()))
}

/// The policy type is the on-disk one; its names live here with the other knobs.
pub use crate::format::ReplacementPolicy;

impl ReplacementPolicy {
    /// Every policy.
    pub const ALL: [ReplacementPolicy; 3] =
        [ReplacementPolicy::Lru, ReplacementPolicy::Fifo, ReplacementPolicy::Random];

    /// The lowercase name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            ReplacementPolicy::Lru => "lru",
            ReplacementPolicy::Fifo => "fifo",
            ReplacementPolicy::Random => "random",
        }
    }
}

impl fmt::Display for ReplacementPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes in one KiB, MiB, ... : every size suffix is binary, as in bcache's sysfs.
const SIZE_SUFFIXES: [(char, u32); 6] = [('k', 10), ('m', 20), ('g', 30), ('t', 40), ('p', 50), ('e', 60)];

/// Parses a size such as `0`, `4096`, `512k`, `8M`, `1G`, `4MiB` or `4MB` (all binary) into bytes.
///
/// # Errors
/// A message saying what is wrong: empty, not a number, unknown suffix, or too large for 64 bits.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty size".to_owned());
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("{s:?} does not start with a number (sizes look like 0, 4096, 512k, 8M)"));
    }
    let number: u64 = digits.parse().map_err(|_| format!("{digits:?} is too large"))?;
    let suffix = suffix.trim_start();
    let shift = if suffix.is_empty() || suffix.eq_ignore_ascii_case("b") {
        0
    } else {
        let mut chars = suffix.chars();
        let first = chars.next().map(|c| c.to_ascii_lowercase());
        let rest: String = chars.collect();
        let known_rest = rest.is_empty() || rest == "i" || rest == "iB" || rest == "B";
        match SIZE_SUFFIXES.iter().find(|(c, _)| Some(*c) == first) {
            Some((_, shift)) if known_rest => *shift,
            _ => return Err(format!("unknown size suffix {suffix:?} (use k, M, G, T; binary units)")),
        }
    };
    number
        .checked_shl(shift)
        .filter(|v| v >> shift == number)
        .ok_or_else(|| format!("{s:?} does not fit in 64 bits"))
}

/// Formats bytes with the largest binary suffix that divides them exactly (`8M`, `512k`, `1000`).
#[must_use]
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_owned();
    }
    for &(suffix, shift) in SIZE_SUFFIXES.iter().rev() {
        if bytes.trailing_zeros() >= shift {
            let unit = if suffix == 'k' { 'k' } else { suffix.to_ascii_uppercase() };
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn parse_integer(knob: &'static str, text: &str) -> Result<u64, KnobError> {
    let s = text.trim();
    s.parse::<u64>().map_err(|_| KnobError::BadValue {
        knob,
        value: text.to_owned(),
        reason: "expected a non-negative whole number".to_owned(),
    })
}

fn check_range(
    knob: &'static str,
    value: u64,
    min: u64,
    max: u64,
    show: fn(u64) -> String,
) -> Result<u64, KnobError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(KnobError::OutOfRange { knob, value: show(value), min: show(min), max: show(max) })
    }
}

fn plain(v: u64) -> String {
    v.to_string()
}

/// Largest sequential cutoff accepted: 4 GiB (bcache's limit is `UINT_MAX` bytes).
pub const MAX_SEQUENTIAL_CUTOFF: u64 = 4 << 30;
/// Default sequential cutoff, as in bcache.
pub const DEFAULT_SEQUENTIAL_CUTOFF: u64 = 4 << 20;
/// Default dirty target in percent of the cache (bcache's `writeback_percent`).
pub const DEFAULT_WRITEBACK_PERCENT: u8 = 10;
/// Default delay before writeback starts on newly dirtied data, seconds (bcache: 30).
pub const DEFAULT_WRITEBACK_DELAY_SECS: u64 = 30;
/// Longest writeback delay: one day. Longer would only hide dirty data from writeback.
pub const MAX_WRITEBACK_DELAY_SECS: u64 = 86_400;
/// Slowest writeback rate: one sector per second, so writeback always makes progress.
pub const MIN_WRITEBACK_RATE: u64 = 512;
/// Fastest configurable writeback rate: 64 GiB/s, far beyond any device, i.e. "unlimited".
pub const MAX_WRITEBACK_RATE: u64 = 64 << 30;
/// Default writeback rate floor: 8 sectors per second (bcache's `writeback_rate_minimum`).
pub const DEFAULT_WRITEBACK_RATE_MIN: u64 = 4096;
/// Default writeback rate ceiling: 1 GiB/s.
pub const DEFAULT_WRITEBACK_RATE_MAX: u64 = 1 << 30;
/// Default read congestion threshold, microseconds (bcache: 2 ms).
pub const DEFAULT_CONGESTED_READ_US: u64 = 2_000;
/// Default write congestion threshold, microseconds (bcache: 20 ms).
pub const DEFAULT_CONGESTED_WRITE_US: u64 = 20_000;
/// Largest congestion threshold: 10 s; a cache slower than that is broken, not congested.
pub const MAX_CONGESTED_US: u64 = 10_000_000;

/// One knob set to one value, already parsed and inside its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "knob", content = "value", rename_all = "snake_case")]
pub enum KnobSetting {
    /// Bytes a sequential stream may move before it bypasses the cache; 0 disables the bypass.
    SequentialCutoff(u64),
    /// Dirty data the writeback controller aims for, in percent of the cache (0..=100).
    WritebackPercent(u8),
    /// Seconds newly dirtied data waits before writeback may pick it.
    WritebackDelay(u64),
    /// Lowest writeback rate, bytes per second.
    WritebackRateMin(u64),
    /// Highest writeback rate, bytes per second.
    WritebackRateMax(u64),
    /// Bucket replacement policy.
    ReplacementPolicy(ReplacementPolicy),
    /// Cache read latency (µs) above which reads bypass the cache; 0 disables.
    CongestedReadThresholdUs(u64),
    /// Cache write latency (µs) above which writes bypass the cache; 0 disables.
    CongestedWriteThresholdUs(u64),
}

/// Every knob name, in the order `knobs` lists them.
pub const KNOB_NAMES: [&str; 8] = [
    "sequential_cutoff",
    "writeback_percent",
    "writeback_delay",
    "writeback_rate_min",
    "writeback_rate_max",
    "replacement_policy",
    "congested_read_threshold_us",
    "congested_write_threshold_us",
];

impl KnobSetting {
    /// Parses `value` for the knob called `name` (names as in [`KNOB_NAMES`]; `-` may stand for
    /// `_`), checking the knob's bounds.
    ///
    /// # Errors
    /// [`KnobError::UnknownKnob`], [`KnobError::BadValue`] or [`KnobError::OutOfRange`].
    pub fn parse(name: &str, value: &str) -> Result<KnobSetting, KnobError> {
        let normalized = name.trim().replace('-', "_");
        let size = |knob: &'static str| {
            parse_size(value).map_err(|reason| KnobError::BadValue { knob, value: value.to_owned(), reason })
        };
        match normalized.as_str() {
            "sequential_cutoff" => {
                let knob = "sequential_cutoff";
                Ok(KnobSetting::SequentialCutoff(check_range(
                    knob,
                    size(knob)?,
                    0,
                    MAX_SEQUENTIAL_CUTOFF,
                    format_size,
                )?))
            }
            "writeback_percent" => {
                let knob = "writeback_percent";
                let v = check_range(knob, parse_integer(knob, value)?, 0, 100, plain)?;
                Ok(KnobSetting::WritebackPercent(u8::try_from(v).unwrap_or(100)))
            }
            "writeback_delay" => {
                let knob = "writeback_delay";
                let text = value.trim();
                let text = text.strip_suffix('s').unwrap_or(text);
                Ok(KnobSetting::WritebackDelay(check_range(
                    knob,
                    parse_integer(knob, text)?,
                    0,
                    MAX_WRITEBACK_DELAY_SECS,
                    plain,
                )?))
            }
            "writeback_rate_min" => {
                let knob = "writeback_rate_min";
                let v = check_range(knob, size(knob)?, MIN_WRITEBACK_RATE, MAX_WRITEBACK_RATE, format_size)?;
                Ok(KnobSetting::WritebackRateMin(v))
            }
            "writeback_rate_max" => {
                let knob = "writeback_rate_max";
                let v = check_range(knob, size(knob)?, MIN_WRITEBACK_RATE, MAX_WRITEBACK_RATE, format_size)?;
                Ok(KnobSetting::WritebackRateMax(v))
            }
            "replacement_policy" | "cache_replacement_policy" => {
                let wanted = value.trim();
                ReplacementPolicy::ALL
                    .into_iter()
                    .find(|p| p.name().eq_ignore_ascii_case(wanted))
                    .map(KnobSetting::ReplacementPolicy)
                    .ok_or_else(|| KnobError::BadValue {
                        knob: "replacement_policy",
                        value: value.to_owned(),
                        reason: "expected lru, fifo or random".to_owned(),
                    })
            }
            "congested_read_threshold_us" => {
                let knob = "congested_read_threshold_us";
                let v = check_range(knob, parse_integer(knob, value)?, 0, MAX_CONGESTED_US, plain)?;
                Ok(KnobSetting::CongestedReadThresholdUs(v))
            }
            "congested_write_threshold_us" => {
                let knob = "congested_write_threshold_us";
                let v = check_range(knob, parse_integer(knob, value)?, 0, MAX_CONGESTED_US, plain)?;
                Ok(KnobSetting::CongestedWriteThresholdUs(v))
            }
            _ => Err(KnobError::UnknownKnob { name: name.to_owned(), known: KNOB_NAMES.join(", ") }),
        }
    }

    /// The knob's canonical name.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            KnobSetting::SequentialCutoff(_) => KNOB_NAMES[0],
            KnobSetting::WritebackPercent(_) => KNOB_NAMES[1],
            KnobSetting::WritebackDelay(_) => KNOB_NAMES[2],
            KnobSetting::WritebackRateMin(_) => KNOB_NAMES[3],
            KnobSetting::WritebackRateMax(_) => KNOB_NAMES[4],
            KnobSetting::ReplacementPolicy(_) => KNOB_NAMES[5],
            KnobSetting::CongestedReadThresholdUs(_) => KNOB_NAMES[6],
            KnobSetting::CongestedWriteThresholdUs(_) => KNOB_NAMES[7],
        }
    }

    /// The value in the form [`KnobSetting::parse`] accepts back.
    #[must_use]
    pub fn value_text(&self) -> String {
        match *self {
            KnobSetting::SequentialCutoff(v)
            | KnobSetting::WritebackRateMin(v)
            | KnobSetting::WritebackRateMax(v) => format_size(v),
            KnobSetting::WritebackPercent(v) => v.to_string(),
            KnobSetting::WritebackDelay(v)
            | KnobSetting::CongestedReadThresholdUs(v)
            | KnobSetting::CongestedWriteThresholdUs(v) => v.to_string(),
            KnobSetting::ReplacementPolicy(p) => p.name().to_owned(),
        }
    }
}

/// The current value of every knob, with the cross-knob rules. An engine can keep one of these
/// behind a lock and apply validated settings to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knobs {
    pub sequential_cutoff: u64,
    pub writeback_percent: u8,
    pub writeback_delay_secs: u64,
    pub writeback_rate_min: u64,
    pub writeback_rate_max: u64,
    pub replacement_policy: ReplacementPolicy,
    pub congested_read_threshold_us: u64,
    pub congested_write_threshold_us: u64,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            sequential_cutoff: DEFAULT_SEQUENTIAL_CUTOFF,
            writeback_percent: DEFAULT_WRITEBACK_PERCENT,
            writeback_delay_secs: DEFAULT_WRITEBACK_DELAY_SECS,
            writeback_rate_min: DEFAULT_WRITEBACK_RATE_MIN,
            writeback_rate_max: DEFAULT_WRITEBACK_RATE_MAX,
            replacement_policy: ReplacementPolicy::Lru,
            congested_read_threshold_us: DEFAULT_CONGESTED_READ_US,
            congested_write_threshold_us: DEFAULT_CONGESTED_WRITE_US,
        }
    }
}

impl Knobs {
    /// Applies one setting, refusing it (and changing nothing) if it breaks a cross-knob rule.
    ///
    /// # Errors
    /// [`KnobError::Conflict`] when the writeback rate minimum would exceed the maximum.
    pub fn apply(&mut self, setting: KnobSetting) -> Result<(), KnobError> {
        match setting {
            KnobSetting::WritebackRateMin(v) if v > self.writeback_rate_max => {
                return Err(KnobError::Conflict(format!(
                    "writeback_rate_min {} would exceed writeback_rate_max {}",
                    format_size(v),
                    format_size(self.writeback_rate_max)
                )));
            }
            KnobSetting::WritebackRateMax(v) if v < self.writeback_rate_min => {
                return Err(KnobError::Conflict(format!(
                    "writeback_rate_max {} would be below writeback_rate_min {}",
                    format_size(v),
                    format_size(self.writeback_rate_min)
                )));
            }
            _ => {}
        }
        match setting {
            KnobSetting::SequentialCutoff(v) => self.sequential_cutoff = v,
            KnobSetting::WritebackPercent(v) => self.writeback_percent = v,
            KnobSetting::WritebackDelay(v) => self.writeback_delay_secs = v,
            KnobSetting::WritebackRateMin(v) => self.writeback_rate_min = v,
            KnobSetting::WritebackRateMax(v) => self.writeback_rate_max = v,
            KnobSetting::ReplacementPolicy(p) => self.replacement_policy = p,
            KnobSetting::CongestedReadThresholdUs(v) => self.congested_read_threshold_us = v,
            KnobSetting::CongestedWriteThresholdUs(v) => self.congested_write_threshold_us = v,
        }
        Ok(())
    }

    /// Every knob as a setting, in [`KNOB_NAMES`] order.
    #[must_use]
    pub fn settings(&self) -> [KnobSetting; 8] {
        [
            KnobSetting::SequentialCutoff(self.sequential_cutoff),
            KnobSetting::WritebackPercent(self.writeback_percent),
            KnobSetting::WritebackDelay(self.writeback_delay_secs),
            KnobSetting::WritebackRateMin(self.writeback_rate_min),
            KnobSetting::WritebackRateMax(self.writeback_rate_max),
            KnobSetting::ReplacementPolicy(self.replacement_policy),
            KnobSetting::CongestedReadThresholdUs(self.congested_read_threshold_us),
            KnobSetting::CongestedWriteThresholdUs(self.congested_write_threshold_us),
        ]
    }

    /// Every knob as (name, value text), the form the `knobs` verb returns.
    #[must_use]
    pub fn list(&self) -> Vec<(String, String)> {
        self.settings().iter().map(|s| (s.name().to_owned(), s.value_text())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_garbage() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size(" 8M "), Ok(8 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("4MB"), Ok(4 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("7b"), Ok(7));
        for bad in ["", "M", "-1", "1.5M", "4X", "4Mx", "99999999999999999999", "16E", "0x10"] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(parse_size("15E"), Ok(15 << 60));
    }

    #[test]
    fn sizes_format_to_the_largest_exact_unit_and_round_trip() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(8 << 20), "8M");
        assert_eq!(format_size(512 << 10), "512k");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(3 << 30), "3G");
        for v in [0, 1, 511, 4096, 12345 << 10, 7 << 40, u64::MAX] {
            assert_eq!(parse_size(&format_size(v)), Ok(v));
        }
    }

    #[test]
    fn modes_parse_by_name_only() {
        for m in CacheMode::ALL {
            assert_eq!(parse_mode(m.name()), Ok(m));
            assert_eq!(parse_mode(&m.name().to_uppercase()), Ok(m));
        }
        let err = parse_mode("fast").unwrap_err();
        assert!(err.to_string().contains("writethrough, writeback, writearound or none"));
        assert!(parse_mode("").is_err());
    }
}
