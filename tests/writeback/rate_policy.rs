//! The writeback rate controller in a simulated plant: dirty data grows by a foreground inflow
//! and shrinks by whatever the controller's rate writes home, one simulated second at a time.

use std::time::Duration;
use ubcache::cache::writeback::policy::{RateConfig, RateController};

const MIB: u64 = 1 << 20;
const CACHE: u64 = 1 << 30;

/// Runs the plant for `seconds`; `inflow(t)` is the foreground dirtying rate at second `t`.
/// Returns the (dirty, rate) after each second.
fn simulate(
    controller: &mut RateController,
    start_dirty: u64,
    seconds: u64,
    inflow: impl Fn(u64) -> u64,
) -> Vec<(u64, u64)> {
    let mut dirty = start_dirty;
    let mut trace = Vec::with_capacity(seconds as usize);
    for t in 0..seconds {
        let rate = controller.update(dirty, Duration::from_secs(t));
        // Writeback cannot write more than what is dirty.
        dirty = dirty.saturating_sub(rate).saturating_add(inflow(t));
        trace.push((dirty, rate));
    }
    trace
}

fn controller() -> RateController {
    RateController::new(RateConfig::with_cache_bytes(CACHE)).unwrap()
}

#[test]
fn converges_to_the_target_under_steady_inflow() {
    let mut c = controller();
    let target = c.target_bytes();
    let inflow = 2 * MIB;
    let trace = simulate(&mut c, 600 * MIB, 3600, |_| inflow);
    let (dirty, rate) = *trace.last().unwrap();
    let error = dirty.abs_diff(target);
    assert!(error < target / 100, "dirty {dirty} not within 1% of target {target}");
    // In equilibrium writeback keeps pace with the inflow (the integral term carries it).
    assert!(rate.abs_diff(inflow) < inflow / 20, "rate {rate} vs inflow {inflow}");
    // It got there: the last 10 minutes all stay close.
    assert!(trace[3000..].iter().all(|(d, _)| d.abs_diff(target) < target / 20));
}

#[test]
fn rate_rises_while_dirty_grows() {
    let mut c = controller();
    let target = c.target_bytes();
    let mut previous = 0;
    for step in 1..=50_u64 {
        let rate = c.update(target + step * 10 * MIB, Duration::from_secs(step));
        assert!(rate > previous, "step {step}: rate {rate} did not rise above {previous}");
        previous = rate;
    }
    assert!(previous > 10 * MIB, "500 MiB over target should write back fast, got {previous}");
}

#[test]
fn stays_at_the_minimum_below_target() {
    let mut c = controller();
    let min = c.config().min_rate;
    let trace = simulate(&mut c, 0, 2000, |t| if t % 7 == 0 { 50 * 1024 } else { 0 });
    assert!(trace.iter().all(|(dirty, _)| *dirty < c.target_bytes()));
    assert!(trace.iter().all(|(_, rate)| *rate == min), "rate left the minimum below target");
    assert_eq!(c.integral(), 0.0);
}

#[test]
fn bursty_inflow_does_not_make_it_oscillate_or_blow_up() {
    let mut c = controller();
    let target = c.target_bytes();
    let cfg = c.config();
    // Inflow alternates 0 and 12 MiB/s every 5 minutes for two hours, then stays at 3 MiB/s.
    let trace = simulate(&mut c, target, 4 * 3600, |t| {
        if t < 7200 { if (t / 300) % 2 == 0 { 12 * MIB } else { 0 } } else { 3 * MIB }
    });
    assert!(trace.iter().all(|(_, r)| (cfg.min_rate..=cfg.max_rate).contains(r)));
    let worst = trace.iter().map(|(d, _)| *d).max().unwrap();
    assert!(worst < target + 2 * 300 * 12 * MIB, "dirty peaked at {worst}");
    // After the bursts stop the deviation decays instead of ringing.
    let deviation =
        |range: std::ops::Range<usize>| trace[range].iter().map(|(d, _)| d.abs_diff(target)).max().unwrap();
    let early = deviation(7200..8400);
    let late = deviation(12_600..14_400);
    assert!(late < early / 10, "deviation early {early}, late {late}");
    assert!(late < target / 50, "still {late} bytes off target after two hours of steady inflow");
}

#[test]
fn anti_windup_lets_the_rate_fall_soon_after_an_overload() {
    let cfg = RateConfig { max_rate: 4 * MIB, ..RateConfig::with_cache_bytes(CACHE) };
    let mut c = RateController::new(cfg).unwrap();
    let target = c.target_bytes();
    // 20 minutes of inflow above the maximum rate: dirty grows, the rate is pinned at max.
    let overload = simulate(&mut c, target, 1200, |_| 6 * MIB);
    assert!(overload[600..].iter().all(|(_, r)| *r == cfg.max_rate));
    let integral_after_overload = c.integral();
    // The integral stopped growing once the output was pinned (else it would hold ~1200 s of
    // a growing error: about 1e12 byte-seconds).
    assert!(integral_after_overload < 1e11, "integral wound up to {integral_after_overload}");
    // Inflow stops. Dirty drains back to the target; the rate must not stay high past it.
    let mut dirty = overload.last().unwrap().0;
    let mut undershoot = 0;
    for t in 1200..6000 {
        let rate = c.update(dirty, Duration::from_secs(t));
        dirty = dirty.saturating_sub(rate);
        undershoot = undershoot.max(target.saturating_sub(dirty));
    }
    // A PI controller must undershoot a little to drain the integral it gathered before the
    // output pinned (here about 40% of the target). A wound-up integral (~1e12 byte-seconds,
    // 100 MiB/s of extra rate) would instead drain the cache of dirty data entirely.
    assert!(undershoot < target / 2, "wrote {undershoot} bytes below target after the overload");
    assert!(dirty > 0);
}

#[test]
fn a_long_pause_between_updates_integrates_at_most_one_bounded_step() {
    let mut c = controller();
    let target = c.target_bytes();
    c.update(target + 100 * MIB, Duration::from_secs(0));
    c.update(target + 100 * MIB, Duration::from_secs(100_000));
    let bounded = (100 * MIB) as f64 * 30.0;
    assert!((c.integral() - bounded).abs() < 1.0, "integral {}", c.integral());
    // A clock reading from the past does not integrate backwards.
    let before = c.integral();
    c.update(target + 100 * MIB, Duration::from_secs(5));
    assert_eq!(c.integral(), before);
}
