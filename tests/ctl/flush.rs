//! The flush runner: runs an engine's writeback step on its own thread until nothing is dirty,
//! reports progress and rate on an injected clock, refuses a second flush, cancels, reports a
//! failing step, and joins its thread on drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;
use ubcache::ctl::stats::ManualClock;
use ubcache::ctl::{CtlError, FlushRunner, FlushState};

const MIB: u64 = 1 << 20;

fn runner(dirty: &Arc<AtomicU64>, clock: &Arc<ManualClock>) -> FlushRunner {
    let dirty = dirty.clone();
    FlushRunner::new(clock.clone(), Box::new(move || dirty.load(Ordering::SeqCst)))
}

/// A step that writes back up to 1 MiB and takes one simulated second.
fn step_fn(
    dirty: &Arc<AtomicU64>,
    clock: &Arc<ManualClock>,
) -> impl FnMut() -> Result<u64, String> + Send + 'static {
    let (dirty, clock) = (dirty.clone(), clock.clone());
    move || {
        let left = dirty.load(Ordering::SeqCst);
        let n = left.min(MIB);
        dirty.fetch_sub(n, Ordering::SeqCst);
        clock.advance(Duration::from_secs(1));
        Ok(n)
    }
}

#[test]
fn flush_runs_until_nothing_is_dirty_and_reports_the_rate() {
    let clock = Arc::new(ManualClock::new(Duration::from_secs(100)));
    let dirty = Arc::new(AtomicU64::new(10 * MIB + 5));
    let r = runner(&dirty, &clock);
    let idle = r.progress();
    assert_eq!(
        (idle.state, idle.dirty_bytes_left, idle.bytes_done, idle.rate_bytes_per_sec),
        (FlushState::Idle, 10 * MIB + 5, 0, 0)
    );
    r.start(step_fn(&dirty, &clock)).unwrap();
    let done = r.wait();
    assert_eq!(done.state, FlushState::Done);
    assert_eq!((done.bytes_done, done.dirty_bytes_left), (10 * MIB + 5, 0));
    // 11 productive steps and one empty one, one simulated second each: 12 s.
    assert_eq!(done.rate_bytes_per_sec, (10 * MIB + 5) / 12);
    // The rate of a finished flush does not decay as time passes.
    clock.advance(Duration::from_secs(1000));
    assert_eq!(r.progress().rate_bytes_per_sec, done.rate_bytes_per_sec);
    assert_eq!(r.last_error(), None);
    // A second flush starts from zero.
    dirty.store(MIB, Ordering::SeqCst);
    r.start(step_fn(&dirty, &clock)).unwrap();
    assert_eq!(r.wait().bytes_done, MIB);
}

#[test]
fn a_second_flush_is_refused_while_one_runs_and_cancel_stops_it() {
    let clock = Arc::new(ManualClock::new(Duration::ZERO));
    let dirty = Arc::new(AtomicU64::new(100 * MIB));
    let r = runner(&dirty, &clock);
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let mut inner = step_fn(&dirty, &clock);
    // Each step announces itself and waits for the test's go-ahead, so the flush is surely
    // running below. The runner records a step's bytes before it calls the next step.
    r.start(move || {
        entered_tx.send(()).map_err(|_| "test is gone".to_owned())?;
        go_rx.recv_timeout(Duration::from_secs(30)).map_err(|_| "test never released the step".to_owned())?;
        inner()
    })
    .unwrap();
    for _ in 0..3 {
        entered_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        go_tx.send(()).unwrap();
    }
    // The fourth step has started: the first three are fully accounted.
    entered_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let running = r.progress();
    assert_eq!(running.state, FlushState::Running);
    assert_eq!(running.bytes_done, 3 * MIB);
    assert_eq!(running.dirty_bytes_left, 97 * MIB);
    let err = r.start(|| Ok(0)).unwrap_err();
    assert!(matches!(err, CtlError::Busy(_)), "{err:?}");
    r.cancel();
    go_tx.send(()).unwrap(); // lets the step in progress finish; the runner then sees the cancel
    let end = r.wait();
    assert_eq!(end.state, FlushState::Cancelled);
    assert_eq!(end.bytes_done, 4 * MIB);
    assert_eq!(end.dirty_bytes_left, 96 * MIB);
}

#[test]
fn a_failing_step_ends_the_flush_as_failed_with_its_error() {
    let clock = Arc::new(ManualClock::new(Duration::ZERO));
    let dirty = Arc::new(AtomicU64::new(10 * MIB));
    let r = runner(&dirty, &clock);
    let mut inner = step_fn(&dirty, &clock);
    let mut calls = 0;
    r.start(move || {
        calls += 1;
        if calls == 3 { Err("backing write failed at sector 42".to_owned()) } else { inner() }
    })
    .unwrap();
    let end = r.wait();
    assert_eq!(end.state, FlushState::Failed);
    assert_eq!(end.bytes_done, 2 * MIB);
    assert_eq!(end.dirty_bytes_left, 8 * MIB);
    assert_eq!(r.last_error().as_deref(), Some("backing write failed at sector 42"));
}

#[test]
fn dropping_the_runner_cancels_and_joins_an_endless_flush() {
    let clock = Arc::new(ManualClock::new(Duration::ZERO));
    let dirty = Arc::new(AtomicU64::new(1));
    let r = runner(&dirty, &clock);
    // Foreground writes keep re-dirtying: the flush would never end on its own.
    r.start(|| {
        std::thread::sleep(Duration::from_millis(1));
        Ok(512)
    })
    .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(r);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("drop did not stop the flush thread");
}
