//! The engine's control target (`ubcache::ctl::engine::control_target`): stats mapped from the
//! engine, mode switches with and without flushing, knobs that act (all of them, the replacement
//! policy and congestion thresholds included), flush with progress, detach and re-attach. Also
//! driven through the real control socket once.

use crate::fixtures::{arc, format_open, tiny_config};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ubcache::cache::writeback::{WritebackConfig, WritebackThread};
use ubcache::cache::{CacheMode, CacheSet, CachedDev};
use ubcache::ctl::engine::control_target;
use ubcache::ctl::{
    ControlTarget, CtlError, ExportState, FlushState, KnobSetting, ReplacementPolicy, Request, request,
};
use ubcache::dev::{BlockDev, MemDev};
use ubcache::format::{BackingState, read_backing_superblock};

const BLOCK: usize = 4096;

struct Fixture {
    set: Arc<CacheSet>,
    backing: Arc<dyn BlockDev>,
    dev: Arc<CachedDev>,
    target: Arc<dyn ControlTarget>,
}

fn fixture(mode: CacheMode) -> Fixture {
    let cache = arc(MemDev::new(1 << 20));
    let backing = arc(MemDev::new(2 << 20));
    let set = Arc::new(format_open(&cache, &backing, tiny_config(mode)));
    set.set_sequential_cutoff(0);
    let dev = Arc::new(set.devices().remove(0));
    let target = control_target(Arc::clone(&set), vec![("disk0".to_owned(), Arc::clone(&dev))]);
    Fixture { set, backing, dev, target }
}

fn write_blocks(dev: &dyn BlockDev, model: &mut [u8], blocks: std::ops::Range<usize>, fill: u8) {
    for b in blocks {
        let buf = vec![fill ^ (b as u8); BLOCK];
        dev.write_at(&buf, (b * BLOCK) as u64).unwrap();
        model[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&buf);
    }
}

fn assert_backing_equals(backing: &dyn BlockDev, model: &[u8]) {
    let sb = read_backing_superblock(backing).unwrap().unwrap();
    let mut raw = vec![0u8; model.len()];
    backing.read_at(&mut raw, sb.data_offset_bytes).unwrap();
    assert!(raw == model, "backing differs from the model");
}

#[test]
fn stats_map_engine_counters_and_usage() {
    let f = fixture(CacheMode::Writeback);
    let mut model = vec![0u8; f.dev.len() as usize];
    write_blocks(f.dev.as_ref(), &mut model, 0..10, 7);
    let mut buf = vec![0u8; BLOCK];
    f.dev.read_at(&mut buf, 0).unwrap(); // hit
    f.dev.read_at(&mut buf, 100 * BLOCK as u64).unwrap(); // miss
    let s = f.target.stats();
    assert_eq!(s.total.write_cached, 10);
    assert_eq!(s.total.read_hits, 8, "hits count sectors");
    assert_eq!(s.total.read_misses, 8);
    assert_eq!(s.five_minute.write_cached, 10, "windows see the events too");
    assert_eq!(s.gauges.dirty_bytes, 10 * BLOCK as u64);
    assert_eq!(s.gauges.bucket_bytes, 16 * 1024);
    assert!(s.gauges.buckets_dirty > 0 && s.gauges.buckets_free > 0 && s.gauges.buckets_metadata > 0);
    assert!(s.gauges.journal_capacity_bytes > 0);
    assert!(s.gauges.journal_fill.is_some());
    assert_eq!(s.total.bypass_full, 0);
    // Writearound: writes bypass the cache (mode bypass).
    f.target.set_mode(Some("disk0"), CacheMode::Writearound, false).unwrap();
    f.dev.write_at(&buf, 200 * BLOCK as u64).unwrap();
    assert_eq!(f.target.stats().total.bypass_mode, 1);
}

#[test]
fn set_mode_flush_first_leaves_no_dirty_data_keep_dirty_keeps_it() {
    let f = fixture(CacheMode::Writeback);
    let mut model = vec![0u8; f.dev.len() as usize];
    write_blocks(f.dev.as_ref(), &mut model, 0..20, 1);
    f.target.set_mode(None, CacheMode::Writethrough, false).unwrap();
    assert_eq!(f.target.modes(), vec![("disk0".to_owned(), CacheMode::Writethrough)]);
    assert_eq!(f.set.stats().dirty_bytes, 20 * BLOCK as u64, "keep-dirty switch writes nothing home");
    f.target.set_mode(None, CacheMode::Writeback, false).unwrap();
    write_blocks(f.dev.as_ref(), &mut model, 10..30, 2);
    f.target.set_mode(Some("disk0"), CacheMode::None, true).unwrap();
    assert_eq!(f.set.stats().dirty_bytes, 0);
    assert_eq!(read_backing_superblock(f.backing.as_ref()).unwrap().unwrap().state, BackingState::Clean);
    assert_backing_equals(f.backing.as_ref(), &model);
    assert!(matches!(f.target.set_mode(Some("nope"), CacheMode::None, false), Err(CtlError::NotFound(_))));
}

#[test]
fn knobs_act_on_the_engine() {
    let f = fixture(CacheMode::Writeback);
    f.target.set_knob(None, KnobSetting::SequentialCutoff(8 << 20)).unwrap();
    assert_eq!(f.set.sequential_cutoff(), 8 << 20);
    f.target.set_knob(Some("disk0"), KnobSetting::WritebackPercent(25)).unwrap();
    f.target.set_knob(None, KnobSetting::WritebackDelay(5)).unwrap();
    f.target.set_knob(None, KnobSetting::WritebackRateMin(8192)).unwrap();
    let t = f.set.writeback_tuning().values();
    assert_eq!(t.writeback_percent, 25);
    assert_eq!(t.writeback_delay, Duration::from_secs(5));
    assert_eq!(t.min_rate, 8192);
    // Cross-knob rule: min above max refused, nothing changes.
    assert!(matches!(
        f.target.set_knob(None, KnobSetting::WritebackRateMax(4096)),
        Err(CtlError::Invalid(_))
    ));
    assert_eq!(f.set.writeback_tuning().values().max_rate, 1 << 30);
    f.target.set_knob(None, KnobSetting::CongestedReadThresholdUs(10)).unwrap();
    f.target.set_knob(None, KnobSetting::CongestedWriteThresholdUs(0)).unwrap();
    let c = f.set.congestion();
    assert_eq!((c.read_threshold_us, c.write_threshold_us), (10, 0));
    f.target.set_knob(None, KnobSetting::ReplacementPolicy(ReplacementPolicy::Random)).unwrap();
    assert_eq!(f.set.replacement_policy(), ReplacementPolicy::Random);
    // Back to the policy of tiny_config (FIFO).
    f.target.set_knob(None, KnobSetting::ReplacementPolicy(ReplacementPolicy::Fifo)).unwrap();
    let knobs: std::collections::BTreeMap<String, String> =
        f.target.knobs(None).unwrap().into_iter().collect();
    assert_eq!(knobs["sequential_cutoff"], "8M");
    assert_eq!(knobs["writeback_percent"], "25");
    assert_eq!(knobs["writeback_delay"], "5");
    assert_eq!(knobs["replacement_policy"], "fifo");
    assert_eq!(knobs["congested_read_threshold_us"], "10");
    assert_eq!(knobs["congested_write_threshold_us"], "0");
    assert!(matches!(f.target.knobs(Some("nope")), Err(CtlError::NotFound(_))));
}

#[test]
fn knob_changes_reach_a_running_writeback_thread() {
    let f = fixture(CacheMode::Writeback);
    let cfg = WritebackConfig { writeback_delay: Duration::from_secs(3600), ..WritebackConfig::default() };
    let thread = WritebackThread::start(Arc::clone(&f.set), cfg);
    let mut model = vec![0u8; f.dev.len() as usize];
    write_blocks(f.dev.as_ref(), &mut model, 0..8, 3);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(thread.status().bytes_written, 0, "held by the one-hour delay");
    f.target.set_knob(None, KnobSetting::WritebackDelay(0)).unwrap();
    f.target.set_knob(None, KnobSetting::WritebackPercent(0)).unwrap();
    f.target.set_knob(None, KnobSetting::WritebackRateMin(64 << 20)).unwrap();
    let start = Instant::now();
    while f.set.stats().dirty_bytes > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the thread did not pick up the new knobs");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(f.target.stats().gauges.writeback_rate_bytes_per_sec <= 64 << 20);
    thread.stop().unwrap();
    assert_backing_equals(f.backing.as_ref(), &model);
}

#[test]
fn flush_reports_progress_and_ends_done_with_backing_equal_to_the_model() {
    let f = fixture(CacheMode::Writeback);
    let mut model = vec![0u8; f.dev.len() as usize];
    write_blocks(f.dev.as_ref(), &mut model, 0..64, 9);
    assert_eq!(f.target.flush_progress().state, FlushState::Idle);
    f.target.start_flush().unwrap();
    let start = Instant::now();
    let end = loop {
        let p = f.target.flush_progress();
        if p.state != FlushState::Running {
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(end.state, FlushState::Done);
    assert_eq!(end.dirty_bytes_left, 0);
    assert_eq!(end.bytes_done, 64 * BLOCK as u64);
    assert_backing_equals(f.backing.as_ref(), &model);
    assert_eq!(read_backing_superblock(f.backing.as_ref()).unwrap().unwrap().state, BackingState::Clean);
    // A flush with nothing dirty is done at once.
    f.target.start_flush().unwrap();
    let start = Instant::now();
    while f.target.flush_progress().state == FlushState::Running {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(f.target.flush_progress().state, FlushState::Done);
}

#[test]
fn detach_writes_everything_home_and_attach_binds_it_again() {
    let f = fixture(CacheMode::Writeback);
    let mut model = vec![0u8; f.dev.len() as usize];
    write_blocks(f.dev.as_ref(), &mut model, 0..40, 5);
    match f.target.attach("disk0") {
        Err(CtlError::Invalid(m)) => assert!(m.contains("attached"), "{m}"),
        other => panic!("attach of an attached export: {other:?}"),
    }
    assert_eq!(f.target.export_states(), [("disk0".to_owned(), ExportState::Attached)]);
    f.target.detach("disk0").unwrap();
    assert!(f.dev.is_detached());
    assert_eq!(f.target.export_states(), [("disk0".to_owned(), ExportState::Detached)]);
    assert_backing_equals(f.backing.as_ref(), &model);
    assert_eq!(read_backing_superblock(f.backing.as_ref()).unwrap().unwrap().state, BackingState::Detached);
    assert!(matches!(f.target.detach("disk0"), Err(CtlError::Invalid(_))));
    assert!(matches!(f.target.detach("nope"), Err(CtlError::NotFound(_))));
    assert!(matches!(f.target.set_mode(None, CacheMode::Writeback, false), Err(CtlError::Invalid(_))));
    assert!(matches!(f.target.attach("nope"), Err(CtlError::NotFound(_))));
    f.target.attach("disk0").unwrap();
    assert!(!f.dev.is_detached());
    assert_eq!(f.target.export_states(), [("disk0".to_owned(), ExportState::Attached)]);
    let sb = read_backing_superblock(f.backing.as_ref()).unwrap().unwrap();
    assert_eq!((sb.state, sb.set_uuid), (BackingState::Clean, f.set.uuid()));
    let mut back = vec![0u8; model.len()];
    f.dev.read_at(&mut back, 0).unwrap();
    assert!(back == model, "the re-attached export reads the data written home");
    write_blocks(f.dev.as_ref(), &mut model, 0..4, 6);
    assert_eq!(f.target.stats().total.write_cached, 44, "writes are cached again");
}

#[test]
fn the_control_socket_serves_the_engine() {
    let f = fixture(CacheMode::Writeback);
    let mut model = vec![0u8; f.dev.len() as usize];
    write_blocks(f.dev.as_ref(), &mut model, 0..16, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = ubcache::ctl::socket_path(dir.path());
    let server = ubcache::ctl::CtlServer::start(&path, Arc::clone(&f.target), Default::default()).unwrap();
    let t = Duration::from_secs(30);
    let reply = request(&path, &Request::Stats, t).unwrap();
    assert_eq!(reply["stats"]["gauges"]["dirty_bytes"], serde_json::json!(16 * BLOCK));
    let set_mode = Request::SetMode { mode: CacheMode::Writethrough, flush_first: true, export: None };
    request(&path, &set_mode, t).unwrap();
    assert_eq!(f.set.stats().dirty_bytes, 0);
    let knob = Request::Set {
        knob: "congested_read_threshold_us".to_owned(),
        value: serde_json::json!(5),
        export: None,
    };
    let reply = request(&path, &knob, t).unwrap();
    assert_eq!(reply["value"], serde_json::json!("5"));
    assert_eq!(f.set.congestion().read_threshold_us, 5);
    drop(server);
    assert_backing_equals(f.backing.as_ref(), &model);
}
