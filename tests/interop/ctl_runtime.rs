//! The runtime controls of issue #5 through the real binary and a real NBD connection:
//! `ubcache knobs` shows the congestion thresholds and the replacement policy, `ubcache set`
//! changes them, `ubcache detach` / `ubcache attach` unbind and rebind the export while the
//! server runs (the data survives, writes are cached again), and after a restart without
//! `--mode` the export comes back in the mode `ubcache set-mode` chose and with the replacement
//! policy `ubcache set` chose (the congestion thresholds reset to their defaults). An export
//! detached before a restart is served alone by the restarted server and `ubcache attach` binds
//! it again.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use support::{UbcacheServer, format_pair, s, ubcache, ubcache_ok};
use ubcache::cache::CacheMode;
use ubcache::ctl::{CtlArgs, Request, request, run_ctl_command, socket_path};
use ubcache::dev::BlockDev;
use ubcache::nbd::NbdDev;

fn knobs(dir: &Path) -> BTreeMap<String, String> {
    let reply =
        request(&socket_path(dir), &Request::Knobs { export: None }, Duration::from_secs(30)).unwrap();
    reply["knobs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

fn mode(dir: &Path) -> CacheMode {
    let reply = request(&socket_path(dir), &Request::Modes, Duration::from_secs(30)).unwrap();
    serde_json::from_value(reply["modes"][0]["mode"].clone()).unwrap()
}

fn stats(dir: &Path) -> serde_json::Value {
    let reply = request(&socket_path(dir), &Request::Stats, Duration::from_secs(30)).unwrap();
    reply["stats"].clone()
}

fn serve(dir: &Path, cache: &Path, backing: &Path, extra: &[&str]) -> UbcacheServer {
    let args = [
        &["--data-dir", s(dir), "--cache", s(cache), "--backing", s(backing), "--listen", "127.0.0.1:0"][..],
        extra,
    ]
    .concat();
    UbcacheServer::start(&args)
}

#[test]
fn knobs_detach_attach_and_stored_settings_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), 8 << 20, 8 << 20);
    let d = ["--data-dir", s(dir.path())];
    let mut server = serve(dir.path(), &cache, &backing, &["--mode", "writeback"]);

    let k = knobs(dir.path());
    assert_eq!(k["congested_read_threshold_us"], "2000", "bcache's default");
    assert_eq!(k["congested_write_threshold_us"], "20000");
    assert_eq!(k["replacement_policy"], "lru");
    let out = ubcache_ok(&[&["set", "congested_read_threshold_us", "0"][..], &d].concat());
    assert!(out.contains("congested_read_threshold_us"), "{out}");
    ubcache_ok(&[&["set", "replacement_policy", "fifo"][..], &d].concat());
    let bad = ubcache(&[&["set", "replacement_policy", "mru"][..], &d].concat());
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("lru, fifo or random"), "{bad:?}");
    let k = knobs(dir.path());
    assert_eq!((k["congested_read_threshold_us"].as_str(), k["replacement_policy"].as_str()), ("0", "fifo"));

    let first: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    {
        let nbd = NbdDev::connect(server.uri()).unwrap();
        nbd.write_at(&first, 0).unwrap();
        nbd.sync().unwrap();
    }
    assert!(stats(dir.path())["gauges"]["dirty_bytes"].as_u64().unwrap() > 0);

    let out = ubcache_ok(&[&["detach", ""][..], &d].concat());
    assert!(out.contains("detached"), "{out}");
    // Detached, the export serves straight from the backing file (bcache's behaviour); a
    // write meanwhile is read back after the attach (the cache starts empty for it).
    let while_detached = vec![0xd7u8; 4096];
    {
        let nbd = NbdDev::connect(server.uri()).unwrap();
        let mut buf = vec![0u8; first.len()];
        nbd.read_at(&mut buf, 0).unwrap();
        assert!(buf == first, "a detached export serves the data written home");
        nbd.write_at(&while_detached, 32768).unwrap();
        nbd.sync().unwrap();
    }
    let mut first = first;
    first[32768..36864].copy_from_slice(&while_detached);
    let image = std::fs::read(&backing).unwrap();
    assert!(image[8192..8192 + first.len()] == first[..], "the detached export wrote the backing file");
    let again = ubcache(&[&["detach", ""][..], &d].concat());
    assert!(!again.status.success(), "{again:?}");
    ubcache_ok(&[&["attach", ""][..], &d].concat());
    let again = ubcache(&[&["attach", ""][..], &d].concat());
    assert!(!again.status.success(), "attaching an attached export is an error: {again:?}");

    let second = vec![0x5au8; 8192];
    let cached_before = stats(dir.path())["total"]["write_cached"].as_u64().unwrap();
    {
        let nbd = NbdDev::connect(server.uri()).unwrap();
        let mut buf = vec![0u8; first.len()];
        nbd.read_at(&mut buf, 0).unwrap();
        assert!(buf == first, "the data written before the detach reads back after attach");
        nbd.write_at(&second, 1 << 20).unwrap();
        nbd.sync().unwrap();
    }
    assert_eq!(stats(dir.path())["total"]["write_cached"].as_u64().unwrap(), cached_before + 1);
    ubcache_ok(&[&["set-mode", "writearound"][..], &d].concat());
    assert!(server.stop().success());

    // No --mode: the stored mode. The policy is stored too; the thresholds are not.
    let mut server = serve(dir.path(), &cache, &backing, &[]);
    assert_eq!(mode(dir.path()), CacheMode::Writearound);
    let k = knobs(dir.path());
    assert_eq!(k["replacement_policy"], "fifo");
    assert_eq!(k["congested_read_threshold_us"], "2000");
    {
        let nbd = NbdDev::connect(server.uri()).unwrap();
        let mut buf = vec![0u8; first.len()];
        nbd.read_at(&mut buf, 0).unwrap();
        assert!(buf == first);
        let mut buf = vec![0u8; second.len()];
        nbd.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf == second);
    }
    assert!(server.stop().success());
}

fn export_state(reply_list: &serde_json::Value) -> &str {
    reply_list[0]["state"].as_str().unwrap()
}

/// Regression: after `ubcache detach` and a restart with the same command line, `ubcache serve`
/// refused to start ("belongs to cache set 00000000-...") and the export could never be
/// attached again. Now the restarted server serves it straight from the backing file, shows it
/// detached, `ubcache attach` binds it (data intact, writes cached again), and the next restart
/// finds it attached.
#[test]
fn an_export_detached_before_a_restart_is_served_alone_and_attaches_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), 8 << 20, 8 << 20);
    let d = ["--data-dir", s(dir.path())];
    let mut server = serve(dir.path(), &cache, &backing, &["--mode", "writeback"]);
    let mut expected: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    {
        let nbd = NbdDev::connect(server.uri()).unwrap();
        nbd.write_at(&expected, 0).unwrap();
        nbd.sync().unwrap();
    }
    ubcache_ok(&[&["detach", ""][..], &d].concat());
    assert!(server.stop().success());
    // Used alone while no server runs (the export starts 8 KiB into the file).
    let mut image = std::fs::read(&backing).unwrap();
    image[8192 + 4096..8192 + 8192].fill(0xa1);
    std::fs::write(&backing, &image).unwrap();
    expected[4096..8192].fill(0xa1);

    let mut server = serve(dir.path(), &cache, &backing, &["--mode", "writeback"]);
    let modes = request(&socket_path(dir.path()), &Request::Modes, Duration::from_secs(30)).unwrap();
    assert_eq!(export_state(&modes["modes"]), "detached");
    let reply = request(&socket_path(dir.path()), &Request::Stats, Duration::from_secs(30)).unwrap();
    assert_eq!(export_state(&reply["exports"]), "detached");
    let text = ubcache_ok(&[&["stats"][..], &d].concat());
    assert!(text.contains("export \"\": mode writeback, detached"), "{text}");
    assert_eq!(
        run_ctl_command(&socket_path(dir.path()), &CtlArgs::Modes).unwrap(),
        "\twriteback\tdetached\n"
    );
    let while_detached = vec![0xd7u8; 4096];
    {
        let nbd = NbdDev::connect(server.uri()).unwrap();
        let mut buf = vec![0u8; expected.len()];
        nbd.read_at(&mut buf, 0).unwrap();
        assert!(buf == expected, "the detached export serves the backing file's data");
        nbd.write_at(&while_detached, 16384).unwrap();
        nbd.sync().unwrap();
    }
    expected[16384..20480].copy_from_slice(&while_detached);
    let image = std::fs::read(&backing).unwrap();
    assert!(image[8192..8192 + expected.len()] == expected[..], "detached writes go to the file");
    assert_eq!(stats(dir.path())["total"]["write_cached"].as_u64().unwrap(), 0, "nothing was cached");
    let again = ubcache(&[&["detach", ""][..], &d].concat());
    assert!(!again.status.success(), "detaching a detached export is an error: {again:?}");

    ubcache_ok(&[&["attach", ""][..], &d].concat());
    let modes = request(&socket_path(dir.path()), &Request::Modes, Duration::from_secs(30)).unwrap();
    assert_eq!(export_state(&modes["modes"]), "attached");
    let after_attach = vec![0x6eu8; 8192];
    {
        let nbd = NbdDev::connect(server.uri()).unwrap();
        let mut buf = vec![0u8; expected.len()];
        nbd.read_at(&mut buf, 0).unwrap();
        assert!(buf == expected, "attached, the export reads what was written while detached");
        nbd.write_at(&after_attach, 1 << 20).unwrap();
        nbd.sync().unwrap();
    }
    assert_eq!(stats(dir.path())["total"]["write_cached"].as_u64().unwrap(), 1, "cached again");
    assert!(stats(dir.path())["gauges"]["dirty_bytes"].as_u64().unwrap() > 0);
    assert!(server.stop().success());

    // Attached for good: the next start (stored mode) serves it through the cache.
    let mut server = serve(dir.path(), &cache, &backing, &[]);
    let modes = request(&socket_path(dir.path()), &Request::Modes, Duration::from_secs(30)).unwrap();
    assert_eq!(export_state(&modes["modes"]), "attached");
    assert_eq!(mode(dir.path()), CacheMode::Writeback);
    {
        let nbd = NbdDev::connect(server.uri()).unwrap();
        let mut buf = vec![0u8; expected.len()];
        nbd.read_at(&mut buf, 0).unwrap();
        assert!(buf == expected);
        let mut buf = vec![0u8; after_attach.len()];
        nbd.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf == after_attach, "the dirty data cached after the attach survives the restart");
    }
    assert!(server.stop().success());
}
