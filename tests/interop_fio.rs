//! fio with its NBD engine (libnbd) against `ubcache serve`: random writes of mixed sizes at
//! queue depth 16 with crc32c verification, then a verify-only pass against a restarted server
//! on the same backing file, which proves the data survived a clean shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{UbcacheServer, make_file, require_tool, run_bounded, s};
use std::process::Command;

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
    ]);
    cmd.args(extra);
    let output = run_bounded(&mut cmd, common::TOOL_TIMEOUT);
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

    // Same seed, same offsets: verify only, through a fresh server over a Unix socket.
    let socket = dir.path().join("s.sock");
    let server = UbcacheServer::start(&["--backing", s(&backing), "--socket", s(&socket)]);
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
    ]);
    let output = run_bounded(&mut cmd, common::TOOL_TIMEOUT);
    assert!(!output.status.success(), "fio verify missed a zeroed block: {output:?}");
}
