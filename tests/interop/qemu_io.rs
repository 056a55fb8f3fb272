//! `qemu-io` (QEMU's NBD client) against `ubcache serve`: pattern writes with and without FUA,
//! zero writes, flushes, reads that verify patterns, and the bytes that end up in the backing
//! file after a clean shutdown. A read-only export must refuse writes and keep its file intact.

use crate::support;

use std::process::{Command, Output};
use support::{UbcacheServer, make_file, require_tool, run_bounded, s};

/// Runs `qemu-io -f raw [extra] URI -c CMD...`.
fn qemu_io(uri: &str, extra: &[&str], commands: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).args(extra).arg(uri);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run_bounded(&mut cmd, support::TOOL_TIMEOUT)
}

fn assert_qemu_io_ok(output: &Output, what: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stdout.contains("verification failed") && !stdout.contains("failed:"),
        "{what}: qemu-io {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
}

#[test]
fn pattern_writes_with_fua_read_back_and_reach_the_backing_file() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 16 << 20);
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    let uri = server.uri().to_string();

    let writes = [
        "write -P 0xab -f 0 64k",    // FUA
        "write -P 0xcd 64k 4k",      // plain
        "write -P 0x11 -f 1M 1M",    // large FUA
        "write -P 0x22 3584 1024",   // sector-aligned, straddles a 4k boundary
        "write -P 0x33 16769024 8k", // the last 8 KiB of the device
        "write -z 2M 128k",          // zeroes over data written just before
        "flush",
    ];
    // Data first, so the zero write really has something to overwrite.
    let output = qemu_io(&uri, &[], &["write -P 0x44 2M 256k"]);
    assert_qemu_io_ok(&output, "prefill");
    let output = qemu_io(&uri, &[], &writes);
    assert_qemu_io_ok(&output, "writes");

    // A new connection reads everything back.
    let reads = [
        "read -P 0xab 0 3584",
        "read -P 0x22 3584 1024",
        "read -P 0xab 4608 60928",
        "read -P 0xcd 64k 4k",
        "read -P 0x11 1M 1M",
        "read -P 0 2M 128k",
        "read -P 0x44 2176k 128k",
        "read -P 0x33 16769024 8k",
        "read -P 0 68k 956k",
    ];
    let output = qemu_io(&uri, &[], &reads);
    assert_qemu_io_ok(&output, "reads");

    // A wrong pattern must be noticed, or the reads above prove nothing.
    let output = qemu_io(&uri, &[], &["read -P 0xee 0 4k"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("verification failed"), "{output:?}");

    let status = server.stop();
    assert!(status.success(), "{}", server.stderr.text());
    let image = std::fs::read(&backing).unwrap();
    assert!(image[..3584].iter().all(|&b| b == 0xab));
    assert!(image[3584..4608].iter().all(|&b| b == 0x22));
    assert!(image[64 << 10..68 << 10].iter().all(|&b| b == 0xcd));
    assert!(image[1 << 20..2 << 20].iter().all(|&b| b == 0x11));
    assert!(image[2 << 20..(2 << 20) + (128 << 10)].iter().all(|&b| b == 0));
    assert!(image[(2 << 20) + (128 << 10)..(2 << 20) + (256 << 10)].iter().all(|&b| b == 0x44));
    assert!(image[(16 << 20) - (8 << 10)..].iter().all(|&b| b == 0x33));
}

#[test]
fn writes_past_the_end_fail_without_harm() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    let output = qemu_io(server.uri(), &[], &["write -P 0x55 1020k 8k"]);
    assert!(
        !output.status.success() || String::from_utf8_lossy(&output.stdout).contains("failed"),
        "a write past the end must fail: {output:?}"
    );
    // The server survives and still serves.
    let output = qemu_io(server.uri(), &[], &["write -P 0x66 0 4k", "read -P 0x66 0 4k"]);
    assert_qemu_io_ok(&output, "after an out-of-range write");
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 1 << 20, "the file did not grow");
}

#[test]
fn read_only_export_refuses_writes() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("ro.img");
    std::fs::write(&backing, vec![0x77u8; 1 << 20]).unwrap();
    let mut server =
        UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0", "--read-only"]);

    let output = qemu_io(server.uri(), &[], &["write -P 0x00 0 4k"]);
    assert!(!output.status.success(), "qemu-io wrote to a read-only export: {output:?}");
    let output = qemu_io(server.uri(), &["-r"], &["write -P 0x00 0 4k"]);
    assert!(!output.status.success(), "qemu-io -r wrote to a read-only export: {output:?}");
    let output = qemu_io(server.uri(), &["-r"], &["read -P 0x77 0 1M"]);
    assert_qemu_io_ok(&output, "read-only reads");

    assert!(server.stop().success());
    assert!(std::fs::read(&backing).unwrap().iter().all(|&b| b == 0x77), "the read-only file changed");
}

/// `--direct` opens the backing file with O_DIRECT; qemu-io's unaligned and sub-block writes must
/// still land exactly (the device does aligned bounce I/O with read-modify-write).
#[test]
fn direct_io_backing_serves_unaligned_writes_exactly() {
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "direct.img", 8 << 20);
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--direct", "--listen", "127.0.0.1:0"]);
    let uri = server.uri().to_string();
    let output = qemu_io(
        &uri,
        &[],
        &["write -P 0x5a 512 1024", "write -P 0x6b -f 4096 8k", "write -P 0x7c 1048064 1024", "flush"],
    );
    assert_qemu_io_ok(&output, "direct writes");
    let output = qemu_io(
        &uri,
        &[],
        &["read -P 0 0 512", "read -P 0x5a 512 1024", "read -P 0x6b 4096 8k", "read -P 0x7c 1048064 1024"],
    );
    assert_qemu_io_ok(&output, "direct reads");
    assert!(server.stop().success());
    let bytes = std::fs::read(&backing).unwrap();
    assert!(bytes[512..1536].iter().all(|&b| b == 0x5a));
    assert!(bytes[4096..4096 + 8192].iter().all(|&b| b == 0x6b));
    assert!(bytes[1_048_064..1_048_064 + 1024].iter().all(|&b| b == 0x7c));
    assert!(bytes[..512].iter().all(|&b| b == 0));
}
