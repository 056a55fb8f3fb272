//! `nbdinfo` (libnbd) against `ubcache serve`: the export's size, name, description, flags and
//! block sizes as a real client negotiates them, over TCP and a Unix socket.

use crate::support;

use std::process::Command;
use support::{UbcacheServer, make_file, require_tool, run_bounded, run_ok, s};

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run_ok(Command::new("nbdinfo").args(["--json", uri]));
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {e}:\n{out}"));
    let exports = json["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{out}");
    exports[0].clone()
}

#[test]
fn size_flags_and_block_sizes_over_tcp() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 48 << 20);
    let server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);

    let size = run_ok(Command::new("nbdinfo").args(["--size", server.uri()]));
    assert_eq!(size.trim(), (48u64 << 20).to_string());

    let export = nbdinfo_json(server.uri());
    assert_eq!(export["export-name"], "");
    assert_eq!(export["export-size"], 48u64 << 20);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_flush"], true, "a writable export must offer FLUSH: {export}");
    assert_eq!(export["can_fua"], true, "a writable export must offer FUA: {export}");
    let description = export["description"].as_str().unwrap_or_default();
    assert_eq!(description, "ubcache passthrough of b.img (mode none)", "{export}");

    // NBD_INFO_BLOCK_SIZE: min <= preferred <= max, powers of two, preferred at least a sector.
    let block = |key: &str| {
        export[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing: the server must send NBD_INFO_BLOCK_SIZE\n{export}"))
    };
    let (min, preferred, max) =
        (block("block_size_minimum"), block("block_size_preferred"), block("block_size_maximum"));
    for value in [min, preferred] {
        assert!(value.is_power_of_two(), "{export}");
    }
    assert!(min <= preferred && preferred <= max, "min {min} preferred {preferred} max {max}");
    assert!((1..=512).contains(&min), "minimum block size {min}");
    assert!(max >= 1 << 20, "maximum block size {max} is too small for real clients");
}

#[test]
fn read_only_export_is_flagged() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0", "--read-only"]);
    let export = nbdinfo_json(server.uri());
    assert_eq!(export["is_read_only"], true, "{export}");
    assert_eq!(export["export-size"], 1u64 << 20);
}

#[test]
fn named_export_over_unix_socket_is_listed_and_found_by_name() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "disk0.img", 2 << 20);
    let socket = dir.path().join("s.sock");
    let server =
        UbcacheServer::start(&["--backing", s(&backing), "--socket", s(&socket), "--export", "disk0"]);
    assert_eq!(server.uri(), format!("nbd+unix:///disk0?socket={}", s(&socket)));

    let size = run_ok(Command::new("nbdinfo").args(["--size", server.uri()]));
    assert_eq!(size.trim(), (2u64 << 20).to_string());

    let list_uri = format!("nbd+unix:///?socket={}", s(&socket));
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &list_uri]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exports = json["exports"].as_array().expect("exports array");
    let names: Vec<&str> = exports.iter().filter_map(|e| e["export-name"].as_str()).collect();
    assert_eq!(names, ["disk0"], "{out}");

    // An export name the server does not have is refused, not mapped to another export.
    let wrong = format!("nbd+unix:///nosuch?socket={}", s(&socket));
    let output = run_bounded(Command::new("nbdinfo").args(["--size", &wrong]), support::TOOL_TIMEOUT);
    assert!(!output.status.success(), "nbdinfo connected to an export that does not exist");
}

#[test]
fn list_shows_the_export_description() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "disk0.img", 1 << 20);
    let server =
        UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0", "--export", "disk0"]);
    let list_uri = server.uri().trim_end_matches("/disk0").to_string();
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &list_uri]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let description = json["exports"][0]["description"].as_str().unwrap_or_default();
    assert!(description.contains("disk0.img"), "the description names the backing file: {out}");
}

#[test]
fn several_exports_are_listed_and_served_separately() {
    if !require_tool("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let first = make_file(dir.path(), "first.img", 1 << 20);
    let second = make_file(dir.path(), "second.img", 3 << 20);
    let server = UbcacheServer::start_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backing",
            s(&first),
            "--export",
            "first",
            "--backing",
            s(&second),
            "--export",
            "second",
        ],
        2,
    );
    assert!(server.uris[0].ends_with("/first") && server.uris[1].ends_with("/second"), "{:?}", server.uris);

    let base = server.uris[0].trim_end_matches("/first").to_string();
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &base]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut listed: Vec<(String, u64)> = json["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| (e["export-name"].as_str().unwrap().to_string(), e["export-size"].as_u64().unwrap()))
        .collect();
    listed.sort();
    assert_eq!(listed, [("first".to_string(), 1u64 << 20), ("second".to_string(), 3u64 << 20)], "{out}");

    for (uri, size) in [(&server.uris[0], 1u64 << 20), (&server.uris[1], 3u64 << 20)] {
        let out = run_ok(Command::new("nbdinfo").args(["--size", uri]));
        assert_eq!(out.trim(), size.to_string(), "{uri}");
    }
}
