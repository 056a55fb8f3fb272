//! The control subcommands as the `ubcache` binary will parse them (clap), run against a real
//! control socket with a fake engine behind it.

use crate::fake_engine;

use clap::Parser;
use fake_engine::FakeEngine;
use std::path::Path;
use std::time::Duration;
use ubcache::cli::control::{CtlCommand, run_cli_polling};
use ubcache::ctl::{CacheMode, CtlError, CtlServer, CtlServerConfig, FlushState, socket_path};

#[derive(Debug, Parser)]
struct TestCli {
    #[command(subcommand)]
    command: CtlCommand,
}

fn parse(args: &[&str]) -> Result<CtlCommand, clap::Error> {
    TestCli::try_parse_from(std::iter::once("ubcache").chain(args.iter().copied())).map(|c| c.command)
}

/// Runs a command line; returns (stdout, progress output).
fn run(data_dir: &Path, args: &[&str]) -> Result<(String, String), CtlError> {
    let command = parse(args).unwrap();
    let (mut out, mut progress) = (Vec::new(), Vec::new());
    run_cli_polling(&command, data_dir, &mut out, &mut progress, Duration::from_millis(1))?;
    Ok((String::from_utf8(out).unwrap(), String::from_utf8(progress).unwrap()))
}

#[test]
fn subcommands_run_against_the_server_in_the_data_dir() {
    let engine = FakeEngine::new(&["disk0"], 3 << 20);
    let dir = tempfile::tempdir().unwrap();
    let server =
        CtlServer::start(&socket_path(dir.path()), engine.clone(), CtlServerConfig::default()).unwrap();
    let data_dir = dir.path();

    let (out, _) = run(data_dir, &["set-mode", "writeback", "--export", "disk0"]).unwrap();
    assert_eq!(out, "disk0: mode writeback\n");
    assert_eq!(
        engine.mode_calls.lock().last().unwrap(),
        &(Some("disk0".to_owned()), CacheMode::Writeback, false)
    );

    let (out, _) = run(data_dir, &["set", "writeback_percent", "25"]).unwrap();
    assert_eq!(out, "writeback_percent = 25\n");
    let (out, _) = run(data_dir, &["knobs"]).unwrap();
    assert!(out.contains("writeback_percent = 25\n"), "{out}");
    let (out, _) = run(data_dir, &["stats"]).unwrap();
    assert!(out.starts_with("uptime: "), "{out}");

    // flush waits, drawing the bar in place, and ends at 100%.
    let (out, progress) = run(data_dir, &["flush"]).unwrap();
    assert_eq!(out, "flush started\n");
    let frames: Vec<&str> = progress.trim_end().split('\r').filter(|f| !f.is_empty()).collect();
    assert!(frames.len() >= 3, "{progress:?}");
    assert!(
        frames.last().unwrap().contains("100.0%") && frames.last().unwrap().ends_with("done"),
        "{progress:?}"
    );
    assert_eq!(engine.flush.lock().state, FlushState::Done);

    // Explicit socket path, and errors from the server come back typed.
    let socket = socket_path(data_dir);
    let err = run(Path::new("/nonexistent"), &["detach", "nope", "--ctl-socket", socket.to_str().unwrap()])
        .unwrap_err();
    assert!(matches!(err, CtlError::NotFound(_)), "{err:?}");
    let (out, _) =
        run(Path::new("/nonexistent"), &["detach", "disk0", "--data-dir", data_dir.to_str().unwrap()])
            .unwrap();
    assert_eq!(out, "disk0: detached\n");
    server.stop();
}

#[test]
fn a_flush_that_ends_cancelled_or_failed_is_an_error_for_the_cli() {
    let engine = FakeEngine::new(&["disk0"], 3 << 20);
    let dir = tempfile::tempdir().unwrap();
    let server =
        CtlServer::start(&socket_path(dir.path()), engine.clone(), CtlServerConfig::default()).unwrap();
    run(dir.path(), &["flush", "--no-wait"]).unwrap();
    assert_eq!(engine.flush.lock().state, FlushState::Running);
    let (out, _) = run(dir.path(), &["flush", "--cancel"]).unwrap();
    assert_eq!(out, "flush cancelled\n");
    assert_eq!(engine.flush.lock().state, FlushState::Cancelled);
    for (end, want) in [(FlushState::Cancelled, "cancelled"), (FlushState::Failed, "flush failed")] {
        *engine.end_flush_as.lock() = Some(end);
        let err = run(dir.path(), &["flush"]).unwrap_err();
        assert!(matches!(err, CtlError::Failed(_)), "{err:?}");
        assert!(err.to_string().contains(want), "{err}");
    }
    server.stop();
}

#[test]
fn bad_command_lines_are_usage_errors() {
    let err = parse(&["set-mode", "turbo"]).unwrap_err();
    assert!(err.to_string().contains("unknown cache mode"), "{err}");
    assert!(parse(&["set", "sequential_cutoff"]).is_err());
    assert!(parse(&["flush", "--no-wait", "--cancel"]).is_err());
    assert_eq!(
        parse(&["set-mode", "none", "--flush-first"]).unwrap(),
        CtlCommand::SetMode {
            mode: CacheMode::None,
            flush_first: true,
            export: None,
            socket: ubcache::cli::control::SocketArgs { ctl_socket: None, data_dir: None }
        }
    );
}

#[test]
fn no_server_is_a_clear_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = run(dir.path(), &["stats"]).unwrap_err();
    assert!(matches!(err, CtlError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("connect to control socket"), "{err}");
    assert!(err.to_string().contains("ubcache.ctl"), "{err}");
}
