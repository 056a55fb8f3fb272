//! Knob parsing as a pure module: every accepted value round-trips through its canonical text,
//! every out-of-range value is refused with the knob's name, and no input (knob names, values,
//! whole request lines) makes the parsers panic.

use proptest::prelude::*;
use ubcache::ctl::knobs::{
    KNOB_NAMES, KnobError, KnobSetting, Knobs, MAX_CONGESTED_US, MAX_SEQUENTIAL_CUTOFF,
    MAX_WRITEBACK_DELAY_SECS, MAX_WRITEBACK_RATE, MIN_WRITEBACK_RATE, ReplacementPolicy, format_size,
    parse_size,
};
use ubcache::ctl::protocol::{handle_line, parse_request};

#[test]
fn defaults_are_bcache_like_and_listed_in_order() {
    let list = Knobs::default().list();
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, KNOB_NAMES);
    let value = |name: &str| list.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(value("sequential_cutoff"), "4M");
    assert_eq!(value("writeback_percent"), "10");
    assert_eq!(value("writeback_delay"), "30");
    assert_eq!(value("replacement_policy"), "lru");
    assert_eq!(value("congested_read_threshold_us"), "2000");
}

#[test]
fn bounds_are_inclusive_and_checked_per_knob() {
    let ok = |k: &str, v: &str| KnobSetting::parse(k, v).unwrap();
    let refused = |k: &str, v: &str| {
        let err = KnobSetting::parse(k, v).unwrap_err();
        assert!(matches!(err, KnobError::OutOfRange { .. }), "{k}={v}: {err:?}");
        assert!(err.to_string().starts_with(k), "{err}");
    };
    assert_eq!(ok("sequential_cutoff", "0"), KnobSetting::SequentialCutoff(0));
    assert_eq!(ok("sequential_cutoff", "4G"), KnobSetting::SequentialCutoff(MAX_SEQUENTIAL_CUTOFF));
    refused("sequential_cutoff", &(MAX_SEQUENTIAL_CUTOFF + 1).to_string());
    assert_eq!(ok("writeback_percent", "100"), KnobSetting::WritebackPercent(100));
    refused("writeback_percent", "101");
    refused("writeback_percent", "99999999999");
    assert_eq!(ok("writeback_delay", "86400s"), KnobSetting::WritebackDelay(MAX_WRITEBACK_DELAY_SECS));
    refused("writeback_delay", "86401");
    assert_eq!(ok("writeback_rate_min", "512"), KnobSetting::WritebackRateMin(MIN_WRITEBACK_RATE));
    refused("writeback_rate_min", "511");
    refused("writeback_rate_max", "0");
    assert_eq!(ok("writeback_rate_max", "64G"), KnobSetting::WritebackRateMax(MAX_WRITEBACK_RATE));
    refused("writeback_rate_max", "65G");
    assert_eq!(ok("congested_write_threshold_us", "0"), KnobSetting::CongestedWriteThresholdUs(0));
    refused("congested_write_threshold_us", &(MAX_CONGESTED_US + 1).to_string());
    assert_eq!(
        ok("cache-replacement-policy", " FIFO "),
        KnobSetting::ReplacementPolicy(ReplacementPolicy::Fifo)
    );
}

#[test]
fn rate_bounds_conflict_is_refused_and_changes_nothing() {
    let mut knobs = Knobs::default();
    knobs.apply(KnobSetting::WritebackRateMax(1 << 20)).unwrap();
    let before = knobs;
    let err = knobs.apply(KnobSetting::WritebackRateMin(2 << 20)).unwrap_err();
    assert!(matches!(err, KnobError::Conflict(_)));
    assert_eq!(knobs, before);
    let err = knobs.apply(KnobSetting::WritebackRateMax(1024)).unwrap_err();
    assert!(err.to_string().contains("below writeback_rate_min"), "{err}");
    knobs.apply(KnobSetting::WritebackRateMin(1 << 20)).unwrap();
    assert_eq!(knobs.writeback_rate_min, knobs.writeback_rate_max);
}

fn any_setting() -> impl Strategy<Value = KnobSetting> {
    prop_oneof![
        (0..=MAX_SEQUENTIAL_CUTOFF).prop_map(KnobSetting::SequentialCutoff),
        (0_u8..=100).prop_map(KnobSetting::WritebackPercent),
        (0..=MAX_WRITEBACK_DELAY_SECS).prop_map(KnobSetting::WritebackDelay),
        (MIN_WRITEBACK_RATE..=MAX_WRITEBACK_RATE).prop_map(KnobSetting::WritebackRateMin),
        (MIN_WRITEBACK_RATE..=MAX_WRITEBACK_RATE).prop_map(KnobSetting::WritebackRateMax),
        prop::sample::select(ReplacementPolicy::ALL.to_vec()).prop_map(KnobSetting::ReplacementPolicy),
        (0..=MAX_CONGESTED_US).prop_map(KnobSetting::CongestedReadThresholdUs),
        (0..=MAX_CONGESTED_US).prop_map(KnobSetting::CongestedWriteThresholdUs),
    ]
}

proptest! {
    #[test]
    fn every_valid_setting_round_trips_through_its_text(setting in any_setting()) {
        prop_assert_eq!(KnobSetting::parse(setting.name(), &setting.value_text()).unwrap(), setting);
    }

    #[test]
    fn sizes_round_trip(bytes in any::<u64>(), shift in 0_u32..40) {
        let v = bytes >> shift << shift;
        prop_assert_eq!(parse_size(&format_size(v)).unwrap(), v);
    }

    #[test]
    fn arbitrary_knob_input_never_panics(name in "\\PC{0,24}", value in "\\PC{0,24}") {
        let _ = KnobSetting::parse(&name, &value);
        let _ = parse_size(&value);
        for known in KNOB_NAMES {
            if let Ok(s) = KnobSetting::parse(known, &value) {
                prop_assert_eq!(s.name(), known);
            }
        }
    }

    #[test]
    fn arbitrary_request_lines_never_panic(line in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_request(&line);
    }

    #[test]
    fn request_shaped_json_never_panics(
        cmd in prop::sample::select(vec!["stats", "set", "set-mode", "detach", "knobs", "x"]),
        key in "[a-z_]{1,12}",
        value in prop_oneof![
            Just("null".to_owned()), Just("true".to_owned()), "-?[0-9]{1,25}", "\"\\PC{0,12}\"",
            Just("[[[[]]]]".to_owned()), Just("{\"a\":{}}".to_owned())
        ],
    ) {
        let line = format!("{{\"cmd\":\"{cmd}\",\"{key}\":{value}}}");
        let _ = parse_request(line.as_bytes());
    }
}

/// A deeply nested request is refused by the JSON depth limit, not by a stack overflow.
#[test]
fn deeply_nested_json_is_an_error() {
    let line = format!("{{\"cmd\":\"stats\",\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let err = parse_request(line.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("malformed JSON"), "{err}");
    assert!(handle_line(&NoEngine, line.as_bytes()).contains("\"ok\":false"));
}

/// `handle_line` needs an engine; malformed lines never reach it.
struct NoEngine;

impl ubcache::ctl::ControlTarget for NoEngine {
    fn stats(&self) -> ubcache::ctl::StatsSnapshot {
        unreachable!("not called for malformed input")
    }
    fn set_mode(
        &self,
        _: Option<&str>,
        _: ubcache::ctl::CacheMode,
        _: bool,
    ) -> Result<(), ubcache::ctl::CtlError> {
        unreachable!()
    }
    fn modes(&self) -> Vec<(String, ubcache::ctl::CacheMode)> {
        unreachable!()
    }
    fn set_knob(&self, _: Option<&str>, _: KnobSetting) -> Result<(), ubcache::ctl::CtlError> {
        unreachable!()
    }
    fn knobs(&self, _: Option<&str>) -> Result<Vec<(String, String)>, ubcache::ctl::CtlError> {
        unreachable!()
    }
    fn start_flush(&self) -> Result<(), ubcache::ctl::CtlError> {
        unreachable!()
    }
    fn flush_progress(&self) -> ubcache::ctl::FlushProgress {
        unreachable!()
    }
    fn cancel_flush(&self) {}
    fn detach(&self, _: &str) -> Result<(), ubcache::ctl::CtlError> {
        unreachable!()
    }
    fn attach(&self, _: &str) -> Result<(), ubcache::ctl::CtlError> {
        unreachable!()
    }
}
