//! `ubcache format`, `show` and `check` through the real binary, and the refusals of `serve`
//! that protect data: a cache paired with the wrong backing device, a Dirty backing device
//! served without its cache, formatting over a cache or over data.

use crate::support;

use std::process::Command;
use support::{
    UbcacheServer, check_json, format_pair, make_file, s, serve_expect_failure, ubcache, ubcache_ok,
};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[test]
fn format_writes_a_cache_and_a_backing_superblock_and_show_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), 32 << 20, 16 << 20);
    let shown = json(&ubcache_ok(&["show", "--cache", s(&cache), "--backing", s(&backing), "--json"]));
    let c = &shown["cache"];
    assert_eq!(c["device_bytes"], 16 << 20);
    assert_eq!(c["bucket_bytes"], 64 << 10);
    assert_eq!(c["node_bytes"], 16 << 10);
    assert_eq!(c["nbuckets"], 256);
    assert_eq!(c["state"], "clean");
    assert_eq!(c["dirty_bytes"], 0);
    let b = &shown["backing"][0];
    assert_eq!(b["dev_id"], 0);
    assert_eq!(b["path"], s(&backing));
    assert_eq!(b["data_offset_bytes"], 8192);
    assert_eq!(b["export_bytes"], (32 << 20) - 8192);
    assert_eq!(b["state"], "Clean");
    assert_eq!(b["set_uuid"], c["set_uuid"]);
    // The text form says the same.
    let text = ubcache_ok(&["show", "--cache", s(&cache)]);
    assert!(text.contains("256 buckets of 65536 bytes") && text.contains("state           clean"), "{text}");
    // The backing superblock is at byte 0 of the backing file.
    let head = std::fs::read(&backing).unwrap();
    assert_eq!(&head[..8], b"ubcBACKD");

    let (code, report) = check_json(&cache, &backing);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["clean"], true);
    assert_eq!(report["report"]["problems"].as_array().unwrap().len(), 0);
}

#[test]
fn format_refuses_to_overwrite_a_cache_or_data_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), 8 << 20, 8 << 20);
    let before = std::fs::read(&cache).unwrap();
    let other = make_file(dir.path(), "other.img", 8 << 20);
    let out = ubcache(&["format", "--cache", s(&cache), "--backing", s(&other)]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already holds cache set") && stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(&cache).unwrap(), before, "the refused format wrote nothing");
    assert_eq!(std::fs::read(&other).unwrap(), vec![0u8; 8 << 20], "nor to the backing device");

    // A backing device attached to a set is refused for a new set.
    let fresh = dir.path().join("fresh.img");
    let small = ["--bucket-size", "64K", "--node-size", "16K"];
    let out = ubcache(
        &[&["format", "--cache", s(&fresh), "--size", "8M", "--backing", s(&backing)][..], &small].concat(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("attached to cache set"), "{out:?}");

    // A raw image with data in its first 8 KiB would be overwritten and shifted.
    let raw = dir.path().join("raw.img");
    let mut data = vec![0u8; 1 << 20];
    data[1024..1030].copy_from_slice(b"ext4sb");
    std::fs::write(&raw, &data).unwrap();
    let out = ubcache(
        &[&["format", "--cache", s(&fresh), "--size", "8M", "--backing", s(&raw)][..], &small].concat(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("first 8 KiB"), "{out:?}");
    assert_eq!(std::fs::read(&raw).unwrap(), data);

    // --force does it, with a warning.
    let out = ubcache(
        &[&["format", "--cache", s(&cache), "--backing", s(&raw), "--force", "--json"][..], &small].concat(),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARNING"), "{out:?}");
    let summary = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(summary["backing"][0][1], (1 << 20) - 8192);

    // Bad geometry and a missing size are clear errors that create nothing.
    let nothing = dir.path().join("nothing.img");
    let out = ubcache(&["format", "--cache", s(&nothing)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"), "{out:?}");
    let out = ubcache(&["format", "--cache", s(&nothing), "--size", "8M", "--bucket-size", "3K"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!nothing.exists());
}

/// A new user pointing `--cache` at the wrong file must not lose it: a cache device that is not a
/// ubcache cache and has data in its first MiB is refused (a zeroed one is fine).
#[test]
fn format_refuses_a_cache_device_holding_other_data_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let small = ["--bucket-size", "64K", "--node-size", "16K"];
    let backing = make_file(dir.path(), "backing.img", 8 << 20);
    let cache = dir.path().join("photos.img");
    let mut data = vec![0u8; 8 << 20];
    // One non-zero byte near the end of the first MiB is enough to refuse.
    data[(1 << 20) - 1] = 0x5a;
    data[(4 << 20)..(4 << 20) + 9].copy_from_slice(b"my photos");
    std::fs::write(&cache, &data).unwrap();
    let out = ubcache(&[&["format", "--cache", s(&cache), "--backing", s(&backing)][..], &small].concat());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a ubcache cache") && stderr.contains("--force"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "a one-line error: {stderr}");
    assert_eq!(std::fs::read(&cache).unwrap(), data, "the refused format wrote nothing");
    assert_eq!(std::fs::read(&backing).unwrap(), vec![0u8; 8 << 20], "nor to the backing device");

    // Data after the first MiB alone does not count (the caller owns a zeroed head).
    let late = dir.path().join("late.img");
    let mut late_data = vec![0u8; 8 << 20];
    late_data[1 << 20] = 1;
    std::fs::write(&late, &late_data).unwrap();
    let other_backing = make_file(dir.path(), "backing2.img", 8 << 20);
    ubcache_ok(&[&["format", "--cache", s(&late), "--backing", s(&other_backing)][..], &small].concat());

    // --force overrides, with a warning.
    let out = ubcache(
        &[&["format", "--cache", s(&cache), "--backing", s(&backing), "--force"][..], &small].concat(),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARNING: --force"), "{out:?}");
    let (code, report) = check_json(&cache, &backing);
    assert_eq!(code, 0, "{report}");
}

#[test]
fn a_cache_with_the_wrong_backing_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let one = tempfile::tempdir_in(dir.path()).unwrap();
    let two = tempfile::tempdir_in(dir.path()).unwrap();
    let (backing_one, cache_one) = format_pair(one.path(), 8 << 20, 8 << 20);
    let (backing_two, _cache_two) = format_pair(two.path(), 8 << 20, 8 << 20);
    let (code, stderr) = serve_expect_failure(&["--cache", s(&cache_one), "--backing", s(&backing_two)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("belongs to cache set"), "{stderr}");
    // The right pair serves.
    let mut server = UbcacheServer::start(&[
        "--data-dir",
        s(dir.path()),
        "--cache",
        s(&cache_one),
        "--backing",
        s(&backing_one),
        "--listen",
        "127.0.0.1:0",
    ]);
    // While it runs, show and check refuse (they would read a state changing under them).
    let out = ubcache(&["check", "--cache", s(&cache_one)]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another ubcache process"), "{out:?}");
    assert!(server.stop().success());
}

#[test]
fn a_dirty_backing_device_without_its_cache_is_refused_unless_forced() {
    if !support::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), 16 << 20, 8 << 20);
    let mut server = UbcacheServer::start(&[
        "--data-dir",
        s(dir.path()),
        "--cache",
        s(&cache),
        "--backing",
        s(&backing),
        "--mode",
        "writeback",
        "--listen",
        "127.0.0.1:0",
    ]);
    let out = support::run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        server.uri(),
        "-c",
        "write -P 0x5d -f 0 64k",
    ]));
    assert!(!out.contains("failed"), "{out}");
    // SIGKILL: no writeback on the way out, the data lives only in the cache.
    server.stop_with(libc::SIGKILL);
    let shown = json(&ubcache_ok(&["show", "--cache", s(&cache), "--backing", s(&backing), "--json"]));
    assert_eq!(shown["backing"][0]["state"], "Dirty", "{shown}");

    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("Dirty") && stderr.contains("--force"), "{stderr}");
    let mut forced = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0", "--force"]);
    forced.stderr_with("WARNING: --force");
    let out = support::run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        forced.uri(),
        "-c",
        "read -P 0 0 64k",
    ]));
    assert!(!out.contains("failed"), "the write was only in the cache, so alone it reads zeros: {out}");
    assert!(forced.stop().success());

    // With its cache the write is there, and recovery says what it found.
    let mut server = UbcacheServer::start(&[
        "--data-dir",
        s(dir.path()),
        "--cache",
        s(&cache),
        "--backing",
        s(&backing),
        "--listen",
        "127.0.0.1:0",
    ]);
    let log = server.stderr_with("recovery replayed");
    assert!(!log.contains("recovery replayed 0 "), "{log}");
    let out = support::run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        server.uri(),
        "-c",
        "read -P 0x5d 0 64k",
    ]));
    assert!(!out.contains("failed"), "{out}");
    assert!(server.stop().success());
    let (code, report) = check_json(&cache, &backing);
    assert_eq!(code, 0, "{report}");
}

#[test]
fn check_finds_damage_and_says_so_in_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), 8 << 20, 8 << 20);
    // Not a cache at all: the check cannot run.
    let out = ubcache(&["check", "--cache", s(&backing), "--json"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(json(&String::from_utf8_lossy(&out.stdout))["clean"], false);
    // A backing device the set does not know: a problem, exit code 1, listed in the JSON.
    let stranger = make_file(dir.path(), "stranger.img", 1 << 20);
    let (code, report) = check_json(&cache, &stranger);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["clean"], false);
    let problems = report["report"]["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p["kind"] == "backing_unbound"), "{report}");
    let out = ubcache(&["check", "--cache", s(&cache), "--backing", s(&stranger)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("PROBLEM:"), "{out:?}");
    // Both superblock copies damaged: also cannot run, never a panic.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&cache).unwrap();
        f.write_all_at(&[0xff; 64], 4096 + 64).unwrap();
        f.write_all_at(&[0xff; 64], 4096 + 65536 + 64).unwrap();
    }
    let out = ubcache(&["check", "--cache", s(&cache), "--backing", s(&backing)]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn a_cached_serve_exposes_metrics_and_its_control_socket() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), 8 << 20, 8 << 20);
    let mut server = UbcacheServer::start(&[
        "--data-dir",
        s(dir.path()),
        "--cache",
        s(&cache),
        "--backing",
        s(&backing),
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let log = server.stderr_with("/metrics");
    let addr = log
        .split("metrics at http://")
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .expect("the metrics address is logged")
        .to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.") && body.contains("ubcache_"), "{body}");
    let stats = ubcache_ok(&["stats", "--json", "--data-dir", s(dir.path())]);
    let _: serde_json::Value = json(&stats);
    assert!(server.stop().success());
    // The control socket is removed on a clean stop.
    assert!(!dir.path().join("ubcache.ctl").exists());
    // Without a cache there are no statistics to serve.
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--metrics", "127.0.0.1:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--metrics needs a cache"), "{stderr}");
}
