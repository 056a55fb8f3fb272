//! A remote backing device: `--backing nbd+unix://...` (through `NbdDev`). One ubcache serves a
//! raw file as a passthrough; a second one formats a cache set over that export and serves it
//! cached in writeback mode. qemu-io writes through the cached export read back after a
//! restart, and after `ubcache flush` they are in the file behind the first server, 8 KiB in.

use crate::support;

use std::process::Command;
use support::{UbcacheServer, make_file, require_tool, run_ok, s, ubcache_ok};

#[test]
fn a_remote_nbd_export_is_cached_like_a_local_file() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let remote_file = make_file(dir.path(), "remote.img", 16 << 20);
    let remote_sock = dir.path().join("remote.sock");
    let mut remote = UbcacheServer::start(&["--backing", s(&remote_file), "--socket", s(&remote_sock)]);
    let uri = remote.uri().to_string();
    assert!(uri.starts_with("nbd+unix://"), "{uri}");

    let cache = dir.path().join("cache.img");
    ubcache_ok(&[
        "format",
        "--cache",
        s(&cache),
        "--size",
        "8M",
        "--bucket-size",
        "64K",
        "--node-size",
        "16K",
        "--backing",
        &uri,
    ]);
    let cached_sock = dir.path().join("cached.sock");
    let serve_args = [
        "--data-dir",
        s(dir.path()),
        "--cache",
        s(&cache),
        "--backing",
        &uri,
        "--mode",
        "writeback",
        "--socket",
        s(&cached_sock),
    ];
    let mut cached = UbcacheServer::start(&serve_args);
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        cached.uri(),
        "-c",
        "write -P 0x6e -f 1M 256k",
        "-c",
        "read -P 0x6e 1M 256k",
    ]));
    assert!(!out.contains("failed"), "{out}");
    assert!(cached.stop().success(), "{}", cached.stderr.text());

    let mut cached = UbcacheServer::start(&serve_args);
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", cached.uri(), "-c", "read -P 0x6e 1M 256k"]));
    assert!(!out.contains("failed"), "{out}");
    ubcache_ok(&["flush", "--data-dir", s(dir.path())]);
    assert!(cached.stop().success(), "{}", cached.stderr.text());
    assert!(remote.stop().success(), "{}", remote.stderr.text());
    let image = std::fs::read(&remote_file).unwrap();
    assert_eq!(&image[..8], b"ubcBACKD", "the backing superblock went to the remote file");
    let at = 8192 + (1 << 20);
    assert!(image[at..at + (256 << 10)].iter().all(|&b| b == 0x6e), "written home through NBD");
}
