//! The CLI's text renderers: the flush progress bar (percent, bytes, rate, ETA) and the stats
//! table.

use std::sync::Arc;
use std::time::Duration;
use ubcache::ctl::stats::{Counter, Gauge, ManualClock, Stats};
use ubcache::ctl::{FlushProgress, FlushState, render_flush_progress, render_stats};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn progress(state: FlushState, done: u64, left: u64, rate: u64) -> FlushProgress {
    FlushProgress { state, dirty_bytes_left: left, bytes_done: done, rate_bytes_per_sec: rate }
}

#[test]
fn half_done_flush_shows_half_a_bar_percent_and_eta() {
    let line = render_flush_progress(&progress(FlushState::Running, GIB, GIB, 10 * MIB), 20);
    assert_eq!(line, "[##########..........]  50.0%  1.0 GiB of 2.0 GiB  10.0 MiB/s  ETA 0:01:43  running");
}

#[test]
fn bar_is_full_only_when_nothing_is_left() {
    let almost = render_flush_progress(&progress(FlushState::Running, 999, 1, 1), 10);
    assert!(almost.starts_with("[#########.]"), "{almost}");
    assert!(almost.contains(" 99.9%"), "{almost}");
    assert!(almost.contains("ETA 0:00:01"), "{almost}");
    let done = render_flush_progress(&progress(FlushState::Done, 1000, 0, 0), 10);
    assert!(done.starts_with("[##########] 100.0%"), "{done}");
    assert!(done.ends_with("ETA 0:00:00  done"), "{done}");
}

#[test]
fn unknown_rate_has_no_eta_and_nothing_dirty_is_complete() {
    let stalled = render_flush_progress(&progress(FlushState::Running, 0, 5 * MIB, 0), 4);
    assert_eq!(stalled, "[....]   0.0%  0 B of 5.0 MiB  0 B/s  ETA -:--:--  running");
    let nothing = render_flush_progress(&progress(FlushState::Idle, 0, 0, 0), 4);
    assert!(nothing.starts_with("[####] 100.0%"), "{nothing}");
    let failed = render_flush_progress(&progress(FlushState::Failed, MIB, 3 * MIB, MIB), 4);
    assert!(failed.starts_with("[#...]  25.0%") && failed.ends_with("FAILED"), "{failed}");
}

#[test]
fn eta_rounds_up_and_handles_huge_values() {
    let p = progress(FlushState::Running, 0, 10 * MIB + 1, MIB);
    assert_eq!(p.eta_secs(), Some(11));
    let huge = progress(FlushState::Running, u64::MAX / 2, u64::MAX, 1);
    let line = render_flush_progress(&huge, 8);
    assert!(line.contains("ETA 5124095576030431:00:15"), "{line}");
    assert!(line.starts_with("[##......]  33.3%"), "{line}");
    assert!(line.contains("8.0 EiB of 16.0 EiB"), "{line}"); // the shown total saturates
}

#[test]
fn stats_table_lists_counters_per_window_and_gauges() {
    let clock = Arc::new(ManualClock::new(Duration::ZERO));
    let stats = Stats::with_clock(clock.clone());
    stats.add(Counter::ReadHits, 3);
    stats.add(Counter::ReadMisses, 1);
    clock.advance(Duration::from_secs(3600 + 61));
    stats.add(Counter::ReadHits, 2);
    stats.set_gauge(Gauge::DirtyBytes, 3 * MIB);
    let table = render_stats(&stats.snapshot());
    let row =
        |name: &str| table.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap().to_owned();
    let cells = |name: &str| row(name).split_whitespace().skip(1).map(str::to_owned).collect::<Vec<_>>();
    // total, 5min, 1hour, 1day
    assert_eq!(cells("read_hits"), ["5", "2", "2", "5"]);
    assert_eq!(cells("read_misses"), ["1", "0", "0", "1"]);
    assert_eq!(cells("hit_ratio"), ["83.3%", "100.0%", "100.0%", "83.3%"]);
    assert_eq!(
        row("dirty_bytes").split_whitespace().skip(1).collect::<Vec<_>>().join(" "),
        "3145728 (3.0 MiB)"
    );
    assert!(table.starts_with("uptime: 1:01:01\n"), "{table}");
    assert!(row("journal_fill").ends_with('-'));
}
