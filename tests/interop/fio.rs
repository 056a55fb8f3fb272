//! fio with its NBD engine (libnbd) against `ubcache serve`: random writes of mixed sizes at
//! queue depth 16 with crc32c verification, then a verify-only pass against a restarted server
//! on the same backing file, which proves the data survived a clean shutdown.

use crate::support;

use std::process::Command;
use support::{UbcacheServer, make_file, require_tool, run_bounded, s};

fn fio_verify(uri: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randseed=1234",
        // fio saves a verify state file in its working directory when a job fails.
        "--verify_state_save=0",
    ]);
    cmd.args(extra);
    let output = run_bounded(&mut cmd, support::TOOL_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "fio failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(!stdout.contains("verify: bad"), "{stdout}");
    stdout
}

#[test]
fn randwrite_qd16_verifies_and_survives_a_restart() {
    if !require_tool("fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 64 << 20);
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    let out = fio_verify(server.uri(), &[]);
    assert!(out.contains("err= 0"), "{out}");
    assert!(server.stop().success(), "{}", server.stderr.text());

    // Same seed, same offsets: verify only, through a fresh server over a Unix socket, with the
    // other way of running device calls.
    let socket = dir.path().join("s.sock");
    let server =
        UbcacheServer::start(&["--backing", s(&backing), "--socket", s(&socket), "--device-calls", "inline"]);
    let out = fio_verify(server.uri(), &["--verify_only"]);
    assert!(out.contains("err= 0"), "{out}");
}

#[test]
fn verify_detects_corruption_in_the_backing_file() {
    if !require_tool("fio") {
        return;
    }
    // The guard for the test above: if the backing file is damaged between the write and the
    // verify pass, fio must fail, or a passing verify proves nothing.
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 64 << 20);
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    fio_verify(server.uri(), &["--rw=write", "--bs=64k", "--bsrange=64k-64k"]);
    assert!(server.stop().success());
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&backing).unwrap();
        file.write_all_at(&[0u8; 4096], 1 << 20).unwrap();
    }
    let server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri()),
        "--rw=write",
        "--bs=64k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--verify_only",
        "--verify_fatal=1",
        "--randseed=1234",
        "--verify_state_save=0",
    ]);
    cmd.current_dir(dir.path());
    let output = run_bounded(&mut cmd, support::TOOL_TIMEOUT);
    assert!(!output.status.success(), "fio verify missed a zeroed block: {output:?}");
}

#[test]
fn sigterm_under_load_with_an_idle_connection_exits_cleanly() {
    if !require_tool("fio") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 64 << 20);
    let socket = dir.path().join("s.sock");
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--socket", s(&socket)]);
    // A client that connects and never finishes the handshake must not hold shutdown up.
    let _idle = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", server.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--time_based",
            "--runtime=60",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until writes land, so the signal arrives with requests in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&backing).unwrap().blocks() == 0 {
        assert!(Instant::now() < deadline, "fio wrote nothing within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // `stop` fails the test if the server has not exited 60 s after SIGTERM.
    let status = server.stop();
    assert!(status.success(), "{}", server.stderr.text());
    assert!(server.stderr.text().contains("stopped cleanly"), "{}", server.stderr.text());
    assert!(!socket.exists(), "the Unix socket is removed at shutdown");
    let fio_status = support::wait_bounded(&mut fio, Duration::from_secs(30));
    if fio_status.is_none() {
        let _ = fio.kill();
        let _ = fio.wait();
        panic!("fio kept running after the server stopped");
    }
}
