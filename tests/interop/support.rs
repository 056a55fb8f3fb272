//! Helpers of the interop tests: spawn the real `ubcache` binary, wait for the URI it prints, run
//! external clients with timeouts. Whether a missing tool skips the test (outside CI) or fails it
//! (under `CI=true`) is decided in `tests/support/tools.rs`; root is required the same way here.
//!
//! Every process a test starts is owned by a guard whose `Drop` kills it, so a failing assertion
//! never leaves a server or a client behind.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::tools::under_ci;
pub use crate::tools::{find_tool, require_tool};

/// How long a server may take to print its URI. Generous: the machine may be busy building.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client tool may run before the test fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// The line prefix `ubcache serve` prints on stdout for every URI (see `cli::ready_line`).
pub const READY_PREFIX: &str = "ubcache: serving export ";

/// Like [`require_tool`] for several tools.
pub fn require_tools(tools: &[&str]) -> bool {
    tools.iter().all(|t| require_tool(t))
}

/// Returns true when running as root. Otherwise fails under `CI=true`, or skips with a message.
pub fn require_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(!under_ci(), "{why} needs root (CI=true)");
    println!("SKIPPED: {why} needs root; skipping this test");
    false
}

/// Path of the `ubcache` binary cargo built for these tests.
pub fn ubcache_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ubcache")
}

/// Lines a child wrote to one of its streams, collected by a thread so the pipe never fills.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<String>>>);

impl Captured {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    fn drain(stream: impl Read + Send + 'static, ready: Option<mpsc::Sender<String>>) -> Self {
        let captured = Captured::default();
        let lines = captured.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let (Some(tx), Some(uri)) = (&ready, line.strip_prefix(READY_PREFIX)) {
                    // `"NAME" at URI`: the URI is the last word.
                    if let Some((_, uri)) = uri.rsplit_once(" at ") {
                        let _ = tx.send(uri.to_string());
                    }
                }
                lines.0.lock().unwrap().push(line);
            }
        });
        captured
    }
}

/// A running `ubcache serve`. Dropping it kills the process.
pub struct UbcacheServer {
    child: Option<Child>,
    /// Every URI the server printed, in order.
    pub uris: Vec<String>,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl UbcacheServer {
    /// Starts `ubcache serve ARGS` and waits until it printed `expected_uris` ready lines.
    pub fn start_with(args: &[&str], expected_uris: usize) -> Self {
        Self::start_in(None, args, expected_uris)
    }

    /// Like [`UbcacheServer::start_with`], in working directory `cwd`.
    pub fn start_in(cwd: Option<&Path>, args: &[&str], expected_uris: usize) -> Self {
        let mut cmd = Command::new(ubcache_bin());
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ubcache");
        let (tx, rx) = mpsc::channel();
        let stdout = Captured::drain(child.stdout.take().unwrap(), Some(tx));
        let stderr = Captured::drain(child.stderr.take().unwrap(), None);
        let mut server = UbcacheServer { child: Some(child), uris: Vec::new(), stdout, stderr };
        let deadline = Instant::now() + START_TIMEOUT;
        while server.uris.len() < expected_uris {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(uri) => server.uris.push(uri),
                Err(_) if Instant::now() >= deadline => {
                    panic!(
                        "ubcache did not print its URI within {START_TIMEOUT:?}; stderr:\n{}",
                        server.stderr.text()
                    )
                }
                Err(_) => {
                    if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                        // Let the reader threads take the last lines.
                        std::thread::sleep(Duration::from_millis(100));
                        panic!("ubcache exited early with {status}; stderr:\n{}", server.stderr.text());
                    }
                }
            }
        }
        server
    }

    /// Starts `ubcache serve ARGS` with one listener and waits for its URI.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(args, 1)
    }

    /// Stderr once it contains `needle` (waits up to 10 s: the log reader thread may lag behind
    /// the ready line on stdout); fails the test otherwise.
    pub fn stderr_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.stderr.text();
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "stderr never contained {needle:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first URI.
    pub fn uri(&self) -> &str {
        &self.uris[0]
    }

    /// Sends `signal` and waits (bounded) for the process to exit.
    pub fn stop_with(&mut self, signal: libc::c_int) -> ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill only sends a signal; `pid` is our own child, not yet reaped (we hold the
        // `Child`), so the pid cannot have been reused.
        unsafe { libc::kill(pid, signal) };
        let status = wait_bounded(&mut child, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
        status.unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ubcache did not exit within 60 s of signal {signal}; stderr:\n{}", self.stderr.text())
        })
    }

    /// Clean shutdown with SIGTERM; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }
}

impl Drop for UbcacheServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with a timeout, capturing its output; kills it and fails the test
/// when the timeout expires.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let description = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {description}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let Some(status) = wait_bounded(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{description} did not finish within {timeout:?}");
    };
    Output { status, stdout: out_thread.join().unwrap(), stderr: err_thread.join().unwrap() }
}

/// Runs `cmd` and fails the test, showing its output, unless it succeeds. Returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let description = format!("{cmd:?}");
    let output = run_bounded(cmd, TOOL_TIMEOUT);
    assert!(
        output.status.success(),
        "{description} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `ubcache serve ARGS` expecting it to fail before serving; returns (exit code, stderr).
pub fn serve_expect_failure(args: &[&str]) -> (i32, String) {
    let output = run_bounded(Command::new(ubcache_bin()).arg("serve").args(args), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!output.status.success(), "ubcache serve {args:?} succeeded unexpectedly; stdout:\n{stdout}");
    assert!(!stdout.contains(READY_PREFIX), "ubcache serve {args:?} started serving:\n{stdout}");
    assert!(
        !stderr.contains("panicked"),
        "ubcache serve {args:?} panicked instead of reporting an error:\n{stderr}"
    );
    let code =
        output.status.code().unwrap_or_else(|| panic!("killed by a signal: {}\n{stderr}", output.status));
    (code, stderr)
}

/// A sparse or filled file of `len` bytes in `dir`; returns its path.
pub fn make_file(dir: &Path, name: &str, len: u64) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(len).unwrap();
    path
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The tool name as `str` for a path argument.
pub fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Runs `ubcache ARGS` (any subcommand) to completion with a timeout.
pub fn ubcache(args: &[&str]) -> Output {
    run_bounded(Command::new(ubcache_bin()).args(args), TOOL_TIMEOUT)
}

/// Runs `ubcache ARGS` and fails the test unless it succeeds; returns stdout.
pub fn ubcache_ok(args: &[&str]) -> String {
    run_ok(Command::new(ubcache_bin()).args(args))
}

/// A formatted pair in `dir`: a sparse backing file of `backing_bytes` and a cache file of
/// `cache_bytes` with small buckets (64 KiB) and nodes (16 KiB), so that tests fill, evict and
/// write back quickly. Returns (backing, cache).
pub fn format_pair(dir: &Path, backing_bytes: u64, cache_bytes: u64) -> (PathBuf, PathBuf) {
    let backing = make_file(dir, "backing.img", backing_bytes);
    let cache = dir.join("cache.img");
    ubcache_ok(&[
        "format",
        "--cache",
        s(&cache),
        "--size",
        &cache_bytes.to_string(),
        "--backing",
        s(&backing),
        "--bucket-size",
        "64K",
        "--node-size",
        "16K",
    ]);
    (backing, cache)
}

/// `ubcache check --json` on a stopped pair: (exit code, parsed JSON).
pub fn check_json(cache: &Path, backing: &Path) -> (i32, serde_json::Value) {
    let out = ubcache(&["check", "--cache", s(cache), "--backing", s(backing), "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("check --json printed no JSON ({e}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().expect("check exited by a signal"), json)
}
