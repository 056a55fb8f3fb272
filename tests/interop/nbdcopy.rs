//! `nbdcopy` (libnbd) round trip through `ubcache serve`: copy a random file in over several
//! connections with many requests in flight, copy it out, compare, and check the backing file
//! after a clean shutdown.

use crate::support;

use std::process::Command;
use support::{UbcacheServer, make_file, pseudo_random_bytes, require_tool, run_ok, s};

const SIZE: usize = 24 << 20;

#[test]
fn random_file_round_trips_over_a_unix_socket() {
    if !require_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", SIZE as u64);
    let socket = dir.path().join("s.sock");
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--socket", s(&socket)]);

    let mut input = pseudo_random_bytes(SIZE, 0x5eed);
    // A zero run in the middle: nbdcopy skips or zeroes it, and it must still read back as zeros.
    input[8 << 20..10 << 20].fill(0);
    let input_path = dir.path().join("in.bin");
    std::fs::write(&input_path, &input).unwrap();

    // Pre-fill the backing with non-zero bytes so a skipped zero run would be caught.
    std::fs::write(&backing, vec![0xffu8; SIZE]).unwrap();

    run_ok(Command::new("nbdcopy").args([
        "--connections=4",
        "--requests=32",
        "--flush",
        s(&input_path),
        server.uri(),
    ]));
    let output_path = dir.path().join("out.bin");
    run_ok(Command::new("nbdcopy").args(["--connections=2", server.uri(), s(&output_path)]));
    let output = std::fs::read(&output_path).unwrap();
    assert_eq!(output.len(), input.len());
    assert!(output == input, "copied-out data differs from what was copied in");

    assert!(server.stop().success(), "{}", server.stderr.text());
    assert!(std::fs::read(&backing).unwrap() == input, "the backing file differs from the input");
}

#[test]
fn round_trip_over_tcp_with_a_named_export_and_device_calls_on_a_pool() {
    if !require_tool("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 4 << 20);
    let server = UbcacheServer::start(&[
        "--backing",
        s(&backing),
        "--listen",
        "127.0.0.1:0",
        "--export",
        "data",
        "--device-calls",
        "pool",
    ]);
    assert!(server.uri().ends_with("/data"), "{}", server.uri());
    let input = pseudo_random_bytes(4 << 20, 42);
    let input_path = dir.path().join("in.bin");
    std::fs::write(&input_path, &input).unwrap();
    run_ok(Command::new("nbdcopy").args([s(&input_path), server.uri()]));
    let output_path = dir.path().join("out.bin");
    run_ok(Command::new("nbdcopy").args([server.uri(), s(&output_path)]));
    assert!(std::fs::read(&output_path).unwrap() == input);
}
