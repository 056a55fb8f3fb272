//! Statistics with an injected clock: totals, the three rolling windows expiring events at
//! exactly the documented times, idle gaps, gauges, hit ratio, JSON form, and exact counts
//! under concurrent updates while the clock moves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use ubcache::ctl::stats::{Counter, Gauge, ManualClock, Stats, StatsSnapshot, WINDOWS};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn new_stats(start: u64) -> (Arc<ManualClock>, Stats) {
    let clock = Arc::new(ManualClock::new(secs(start)));
    (clock.clone(), Stats::with_clock(clock))
}

#[test]
fn windows_are_sixty_intervals_of_5s_1min_24min() {
    let shapes: Vec<(&str, u64, u32)> =
        WINDOWS.iter().map(|w| (w.name, w.interval.as_secs(), w.slots)).collect();
    assert_eq!(shapes, vec![("five_minute", 5, 60), ("hour", 60, 60), ("day", 1440, 60)]);
}

#[test]
fn each_window_drops_an_event_exactly_when_its_interval_leaves() {
    // Start mid-interval at t=1000 s (interval boundaries are absolute on the clock).
    let (clock, stats) = new_stats(1000);
    stats.add(Counter::ReadMisses, 5); // t = 1000: 5 s interval 200, 1 min interval 16, day interval 0
    // For each window: the last time at which the event still counts, and the first at which
    // it does not. The event's interval k leaves when the current interval reaches k + 60.
    let expectations = [
        ("five_minute", (200 + 60) * 5 - 1, (200 + 60) * 5),
        ("hour", (16 + 60) * 60 - 1, (16 + 60) * 60),
        ("day", 60 * 1440 - 1, 60 * 1440),
    ];
    let window = |s: &StatsSnapshot, name: &str| match name {
        "five_minute" => s.five_minute.read_misses,
        "hour" => s.hour.read_misses,
        _ => s.day.read_misses,
    };
    for (name, still, gone) in expectations {
        clock.set(secs(still));
        assert_eq!(window(&stats.snapshot(), name), 5, "{name} at {still}");
        clock.set(secs(gone));
        assert_eq!(window(&stats.snapshot(), name), 0, "{name} at {gone}");
    }
    assert_eq!(stats.snapshot().total.read_misses, 5);
    assert_eq!(stats.snapshot().uptime_secs, 60 * 1440 - 1000);
}

#[test]
fn windows_sum_events_by_interval_exactly() {
    let (clock, stats) = new_stats(0);
    // One event per second for 10 minutes, each of value t.
    for t in 0..600_u64 {
        clock.set(secs(t));
        stats.add(Counter::WriteCached, t);
    }
    clock.set(secs(600)); // interval 120 of the 5 s window: intervals 61..=120 are in it
    let s = stats.snapshot();
    let sum = |range: std::ops::Range<u64>| range.sum::<u64>();
    assert_eq!(s.total.write_cached, sum(0..600));
    assert_eq!(s.five_minute.write_cached, sum(305..600));
    assert_eq!(s.hour.write_cached, sum(0..600));
    assert_eq!(s.day.write_cached, sum(0..600));
}

#[test]
fn a_long_idle_gap_empties_windows_without_touching_totals() {
    let (clock, stats) = new_stats(0);
    stats.add(Counter::ReadHits, 7);
    clock.advance(Duration::from_secs(365 * 86_400));
    let s = stats.snapshot();
    assert_eq!((s.five_minute.read_hits, s.hour.read_hits, s.day.read_hits), (0, 0, 0));
    assert_eq!(s.total.read_hits, 7);
    // And counting resumes normally after the gap.
    stats.add(Counter::ReadHits, 2);
    let s = stats.snapshot();
    assert_eq!((s.five_minute.read_hits, s.day.read_hits, s.total.read_hits), (2, 2, 9));
}

#[test]
fn hit_ratio_per_window_and_none_without_reads() {
    let (clock, stats) = new_stats(0);
    assert_eq!(stats.snapshot().total.hit_ratio, None);
    stats.add(Counter::ReadHits, 9);
    stats.add(Counter::ReadMisses, 1);
    clock.advance(secs(400)); // out of the 5-minute window
    stats.add(Counter::ReadMisses, 3);
    let s = stats.snapshot();
    assert_eq!(s.total.hit_ratio, Some(9.0 / 13.0));
    assert_eq!(s.five_minute.hit_ratio, Some(0.0));
    assert_eq!(s.hour.hit_ratio, Some(9.0 / 13.0));
}

#[test]
fn gauges_set_add_and_saturate_at_zero() {
    let (_clock, stats) = new_stats(0);
    stats.set_gauge(Gauge::JournalCapacityBytes, 1000);
    stats.set_gauge(Gauge::JournalUsedBytes, 250);
    stats.add_gauge(Gauge::DirtyBytes, 4096);
    stats.add_gauge(Gauge::DirtyBytes, 4096);
    stats.sub_gauge(Gauge::DirtyBytes, 1024);
    assert_eq!(stats.gauge(Gauge::DirtyBytes), 7168);
    stats.sub_gauge(Gauge::DirtyBytes, 1 << 40);
    assert_eq!(stats.gauge(Gauge::DirtyBytes), 0, "gauge wrapped below zero");
    stats.add_gauge(Gauge::BucketsFree, u64::MAX);
    stats.add_gauge(Gauge::BucketsFree, 1);
    let s = stats.snapshot();
    assert_eq!(s.gauges.buckets_free, u64::MAX);
    assert_eq!(s.gauges.journal_fill, Some(0.25));
    assert_eq!(s.gauges.get(Gauge::JournalUsedBytes), 250);
}

#[test]
fn snapshot_json_round_trips_and_names_every_counter() {
    let (clock, stats) = new_stats(0);
    for (i, &c) in Counter::ALL.iter().enumerate() {
        stats.add(c, i as u64 + 1);
    }
    clock.advance(secs(10));
    let s = stats.snapshot();
    let json = serde_json::to_value(&s).unwrap();
    for (i, &c) in Counter::ALL.iter().enumerate() {
        assert_eq!(json["total"][c.name()], serde_json::json!(i as u64 + 1), "{}", c.name());
        assert_eq!(s.total.get(c), i as u64 + 1);
    }
    for &g in Gauge::ALL {
        assert!(json["gauges"].get(g.name()).is_some(), "{}", g.name());
    }
    let back: StatsSnapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back, s);
}

/// Guards the boundary rule of the module doc: with adders racing the clock across many
/// interval boundaries, no event is lost or double counted, and each event lands in a window
/// according to a clock reading taken while it was being added: a window's count lies between
/// the events whose clock reading *before* the add was inside it and those whose reading
/// *after* the add was.
#[test]
fn concurrent_adds_while_the_clock_moves_are_counted_exactly() {
    use ubcache::ctl::Clock;
    let (clock, stats) = new_stats(0);
    let stats = Arc::new(stats);
    let running = Arc::new(AtomicBool::new(true));
    let ticker = {
        let (clock, running) = (clock.clone(), running.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                clock.advance(Duration::from_millis(50));
                std::thread::yield_now();
            }
        })
    };
    let threads = 4;
    let per_thread = 20_000_usize;
    let adders: Vec<_> = (0..threads)
        .map(|_| {
            let (stats, clock) = (stats.clone(), clock.clone());
            std::thread::spawn(move || {
                let mut readings = Vec::with_capacity(per_thread);
                for _ in 0..per_thread {
                    let before = clock.now();
                    stats.incr(Counter::MissCollisions);
                    readings.push((before, clock.now()));
                }
                readings
            })
        })
        .collect();
    let readings: Vec<(Duration, Duration)> = adders.into_iter().flat_map(|a| a.join().unwrap()).collect();
    running.store(false, Ordering::SeqCst);
    ticker.join().unwrap();
    let now = clock.now();
    let s = stats.snapshot();
    let total = (threads * per_thread) as u64;
    assert_eq!(s.total.miss_collisions, total);
    for (window, count) in WINDOWS.iter().zip([s.five_minute.miss_collisions, s.hour.miss_collisions]) {
        let interval = window.interval.as_nanos();
        let current = now.as_nanos() / interval;
        let start =
            Duration::from_nanos((current.saturating_sub(u128::from(window.slots) - 1) * interval) as u64);
        let surely_in = readings.iter().filter(|(before, _)| *before >= start).count() as u64;
        let maybe_in = readings.iter().filter(|(_, after)| *after >= start).count() as u64;
        assert!(
            (surely_in..=maybe_in).contains(&count),
            "{}: {count} not in {surely_in}..={maybe_in} (clock at {now:?})",
            window.name
        );
    }
    clock.advance(Duration::from_secs(61 * 1440));
    let s = stats.snapshot();
    assert_eq!((s.five_minute.miss_collisions, s.hour.miss_collisions, s.day.miss_collisions), (0, 0, 0));
    assert_eq!(s.total.miss_collisions, total);
}

/// Cost of one counter update on the request path, uncontended and with two threads.
/// Prints figures only (speed is not asserted in tests). Run:
/// `cargo test --test ctl stats_add_cost -- --ignored --nocapture`
#[test]
#[ignore = "measurement; run by hand"]
fn stats_add_cost() {
    let stats = Arc::new(Stats::new());
    let n = 2_000_000_u64;
    for threads in [1_u64, 2] {
        let start = std::time::Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    for _ in 0..n {
                        stats.incr(Counter::ReadHits);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let elapsed = start.elapsed();
        println!("{threads} thread(s): {:.1} ns per add", elapsed.as_nanos() as f64 / n as f64);
    }
    assert_eq!(stats.snapshot().total.read_hits, 3 * n);
}
