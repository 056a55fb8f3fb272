//! The `ubcache serve` command line as a user meets it: defaults, the printed URI, clean
//! shutdown on signals, and clear errors (no panic, the right exit code) for bad flags, missing
//! files and a port already in use. These tests need no external tool.

use crate::support;

use std::io::Read;
use std::time::Duration;
use support::{UbcacheServer, make_file, s, serve_expect_failure};

/// Reads the first 8 bytes a fresh NBD connection gets: the newstyle greeting starts with
/// "NBDMAGIC". Proves something that speaks NBD listens at the printed address.
fn greeting(mut stream: impl Read) -> [u8; 8] {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).unwrap();
    magic
}

fn tcp_port(uri: &str) -> u16 {
    let rest = uri.strip_prefix("nbd://127.0.0.1:").unwrap_or_else(|| panic!("unexpected URI {uri}"));
    rest.split('/').next().unwrap().parse().unwrap()
}

#[test]
fn port_zero_prints_the_real_port_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 4 << 20);
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    let port = tcp_port(server.uri());
    assert_ne!(port, 0, "the URI must carry the port the OS picked");
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(&greeting(stream), b"NBDMAGIC");
    let status = server.stop();
    assert!(status.success(), "SIGTERM must be a clean shutdown, got {status}\n{}", server.stderr.text());
    assert!(server.stderr.text().contains("stopped cleanly"), "{}", server.stderr.text());
}

#[test]
fn sigint_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    let status = server.stop_with(libc::SIGINT);
    assert!(status.success(), "SIGINT must be a clean shutdown, got {status}\n{}", server.stderr.text());
}

#[test]
fn unix_socket_and_tcp_together_print_one_uri_each() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let socket = dir.path().join("ubcache.sock");
    let server = UbcacheServer::start_with(
        &["--backing", s(&backing), "--listen", "127.0.0.1:0", "--socket", s(&socket), "--export", "disk"],
        2,
    );
    let tcp = server.uris.iter().find(|u| u.starts_with("nbd://")).expect("a TCP URI");
    assert!(tcp.ends_with("/disk"), "the URI names the export: {tcp}");
    let unix = server.uris.iter().find(|u| u.starts_with("nbd+unix://")).expect("a Unix URI");
    assert_eq!(unix, &format!("nbd+unix:///disk?socket={}", s(&socket)));
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(&greeting(stream), b"NBDMAGIC");
}

#[test]
fn default_pair_is_created_formatted_and_served_cached() {
    let dir = tempfile::tempdir().unwrap();
    // No arguments but a listener: the default data dir is relative to the working directory,
    // and the first start creates and formats backing.img (1 GiB) with cache.img (256 MiB).
    let mut server = UbcacheServer::start_in(Some(dir.path()), &["--listen", "127.0.0.1:0"], 1);
    let data_dir = dir.path().join("ubcache-data");
    for (name, size) in [("backing.img", 1u64 << 30), ("cache.img", 256 << 20)] {
        let meta = std::fs::metadata(data_dir.join(name)).expect("default file");
        assert_eq!(meta.len(), size, "{name}");
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 16 << 20, "{name} must be created sparse");
    }
    let stderr = server.stderr_with("recovery replayed");
    assert!(stderr.contains("first start: creating"), "{stderr}");
    assert!(stderr.contains("mode writethrough"), "the default mode with a cache: {stderr}");
    assert!(stderr.contains("recovery replayed 0 journal entries"), "{stderr}");
    // The backing superblock takes the first 8 KiB: the export is 8 KiB smaller than the file.
    assert!(stderr.contains(&format!("{} bytes", (1u64 << 30) - 8192)), "{stderr}");
    assert!(server.stop().success(), "{}", server.stderr.text());
    assert!(server.stderr.text().contains("cache set closed cleanly"), "{}", server.stderr.text());

    // The second start opens the same pair instead of creating it.
    let mut again = UbcacheServer::start_in(Some(dir.path()), &["--listen", "127.0.0.1:0"], 1);
    assert!(!again.stderr_with("recovery replayed").contains("first start"));
    assert!(again.stop().success());

    let data_dir = dir.path().join("elsewhere");
    let mut server = UbcacheServer::start(&[
        "--data-dir",
        s(&data_dir),
        "--size",
        "8M",
        "--mode",
        "writeback",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(std::fs::metadata(data_dir.join("backing.img")).unwrap().len(), 8 << 20);
    server.stderr_with("mode writeback");
    assert!(server.stop().success());
}

#[test]
fn missing_backing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    let (code, stderr) = serve_expect_failure(&["--backing", s(&missing), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("does not exist") && stderr.contains("nope.img"), "{stderr}");
    assert!(!missing.exists(), "a missing --backing must not be created without --size");
}

#[test]
fn directory_as_backing_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = serve_expect_failure(&["--backing", s(dir.path()), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not a regular file or block device"), "{stderr}");
}

#[test]
fn port_in_use_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--listen", &addr]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.to_lowercase().contains("in use"), "{stderr}");
    assert!(stderr.contains(&addr), "the error names the address: {stderr}");
}

#[test]
fn bad_sizes_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (size, reason) in [("12Q", "unknown unit"), ("0", "greater than zero"), ("1000", "not a multiple")] {
        let data_dir = dir.path().join(format!("d-{size}"));
        let (code, stderr) = serve_expect_failure(&["--data-dir", s(&data_dir), "--size", size]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(reason), "--size {size}: {stderr}");
        assert!(!data_dir.exists(), "nothing is created on a usage error");
    }
}

#[test]
fn size_mismatch_with_an_existing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--size", "2M"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("refusing to resize"), "{stderr}");
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 1 << 20, "the file is left alone");
}

#[test]
fn bad_listen_addresses_are_usage_errors() {
    for addr in ["127.0.0.1", "127.0.0.1:99999", ":10809", "not an address"] {
        let (code, stderr) = serve_expect_failure(&["--listen", addr]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("bad listen address"), "--listen {addr}: {stderr}");
    }
}

#[test]
fn caching_modes_need_a_cache_and_a_cache_must_be_formatted() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    for mode in ["writeback", "writethrough", "writearound"] {
        let (code, stderr) =
            serve_expect_failure(&["--backing", s(&backing), "--listen", "127.0.0.1:0", "--mode", mode]);
        assert_eq!(code, 2, "{mode}: {stderr}");
        assert!(stderr.contains(&format!("--mode {mode} needs a cache")), "{mode}: {stderr}");
    }
    let missing = dir.path().join("cache.img");
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--cache", s(&missing)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("does not exist") && stderr.contains("ubcache format"), "{stderr}");
    assert!(!missing.exists(), "serve never creates an explicit cache file");
    let unformatted = make_file(dir.path(), "zero.img", 8 << 20);
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--cache", s(&unformatted)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not a formatted ubcache cache"), "{stderr}");
    let (code, stderr) = serve_expect_failure(&["--cache", s(&unformatted)]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--cache needs the backing"), "{stderr}");
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--mode", "fast"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid value 'fast'"), "{stderr}");
}

#[test]
fn mode_none_threads_and_quiet_logging_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let mut server = UbcacheServer::start(&[
        "--backing",
        s(&backing),
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "none",
        "--threads",
        "1",
        "--log-level",
        "error",
    ]);
    assert!(server.stop().success());
    // The ready line is on stdout whatever the log level; the info logs are gone.
    assert!(server.stdout.text().contains("ubcache: serving export \"\" at nbd://127.0.0.1:"));
    assert!(!server.stderr.text().contains("INFO"), "{}", server.stderr.text());
}

#[test]
fn zero_threads_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--threads", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--threads must be at least 1"), "{stderr}");
}

#[test]
fn several_backing_files_need_one_distinct_name_each() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_file(dir.path(), "a.img", 1 << 20);
    let b = make_file(dir.path(), "b.img", 1 << 20);
    let (code, stderr) = serve_expect_failure(&["--backing", s(&a), "--backing", s(&b), "--export", "a"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("name each export"), "{stderr}");
    let (code, stderr) =
        serve_expect_failure(&["--backing", s(&a), "--export", "x", "--backing", s(&b), "--export", "x"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("used twice"), "{stderr}");
    let (code, stderr) =
        serve_expect_failure(&["--backing", s(&a), "--export", "x", "--backing", s(&a), "--export", "y"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("share the backing file"), "{stderr}");
}

#[test]
fn unusable_socket_paths_are_clear_errors_and_nothing_is_clobbered() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let missing_dir = dir.path().join("no").join("such").join("s.sock");
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--socket", s(&missing_dir)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot listen on") && stderr.contains("s.sock"), "{stderr}");

    let regular = dir.path().join("not-a-socket");
    std::fs::write(&regular, b"keep me").unwrap();
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--socket", s(&regular)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&regular).unwrap(), b"keep me");

    // A live server's socket is not stolen by a second server.
    let socket = dir.path().join("live.sock");
    let server = UbcacheServer::start(&["--backing", s(&backing), "--socket", s(&socket)]);
    let other = make_file(dir.path(), "other.img", 1 << 20);
    let (code, stderr) = serve_expect_failure(&["--backing", s(&other), "--socket", s(&socket)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("another server is listening"), "{stderr}");
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(&greeting(stream), b"NBDMAGIC", "the first server still serves");
    drop(server);
}

#[test]
fn a_second_writer_on_the_same_backing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "b.img", 1 << 20);
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    let (code, stderr) = serve_expect_failure(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("in use by another ubcache process"), "{stderr}");
    assert!(server.stop().success());
    // Released at exit: the next server starts.
    let mut again = UbcacheServer::start(&["--backing", s(&backing), "--listen", "127.0.0.1:0"]);
    assert!(again.stop().success());
}

#[test]
fn bad_log_level_is_a_usage_error() {
    let (code, stderr) = serve_expect_failure(&["--log-level", "loud"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("bad log level"), "{stderr}");
}

#[test]
fn unreadable_backing_file_is_a_clear_error() {
    if !support::require_tool("setpriv")
        || !support::require_root("the unreadable-file test (runs as nobody)")
    {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let backing = make_file(dir.path(), "secret.img", 1 << 20);
    std::fs::set_permissions(&backing, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A copy of the binary the unprivileged user can reach (the build directory may be under a
    // home directory it cannot enter).
    let bin = dir.path().join("ubcache");
    std::fs::copy(support::ubcache_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    // As an unprivileged user, so the permission bits apply.
    let output = support::run_bounded(
        std::process::Command::new(support::find_tool("setpriv").unwrap())
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", s(&bin), "serve"])
            .args(["--backing", s(&backing), "--listen", "127.0.0.1:0"]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("secret.img: cannot open: Permission denied"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
