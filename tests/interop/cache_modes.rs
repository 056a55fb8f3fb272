//! Real clients on a cached export, in every cache mode: qemu-io pattern writes (with FUA) read
//! back on a new connection and again after a restart; fio with its NBD engine (random writes of
//! mixed sizes at QD16, crc32c verify) on a cache small enough to evict, then a verify-only pass
//! after a restart; `ubcache check` clean after every clean stop. Modes that write home
//! (writethrough, writearound, none) must also leave the data in the backing file itself, 8 KiB
//! into it (after the backing superblock).

use crate::support;

use std::path::Path;
use std::process::Command;
use support::{UbcacheServer, check_json, format_pair, require_tools, run_bounded, s};

/// Backing file and cache sizes: the 8 MiB cache (64 KiB buckets) is smaller than what fio and
/// qemu-io write, so buckets are reclaimed (and, in writeback, written back) during the run.
const BACKING_BYTES: u64 = 48 << 20;
const CACHE_BYTES: u64 = 8 << 20;
/// Where the qemu-io patterns go: past fio's 16 MiB region.
const QEMU_BASE: u64 = 32 << 20;

fn qemu_io(uri: &str, commands: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_bounded(&mut cmd, support::TOOL_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {commands:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (offset, len, pattern, fua) of the qemu-io writes; later ones overwrite parts of earlier ones.
fn qemu_writes() -> Vec<(u64, u64, u8, bool)> {
    vec![
        (QEMU_BASE, 256 << 10, 0xa1, true),
        (QEMU_BASE + (64 << 10), 4 << 10, 0xb2, false),
        (QEMU_BASE + (1 << 20), 1 << 20, 0xc3, true),
        (QEMU_BASE + (1 << 20) + 3584, 1024, 0xd4, true),
        // Not sector-aligned at either end: the engine's own read-modify-write (the server
        // advertises a 1-byte minimum block size, so qemu sends it as it is).
        (QEMU_BASE + (64 << 10) + 1001, 777, 0xf6, false),
        (QEMU_BASE + (1 << 20) + 510, 3, 0x17, true),
        // The last 8 KiB of the export.
        (BACKING_BYTES - 8192 - (8 << 10), 8 << 10, 0xe5, true),
    ]
}

/// The expected bytes of [QEMU_BASE, export end) after [`qemu_writes`].
fn qemu_model() -> Vec<u8> {
    let export = BACKING_BYTES - 8192;
    let mut model = vec![0u8; (export - QEMU_BASE) as usize];
    for (off, len, pattern, _) in qemu_writes() {
        let at = (off - QEMU_BASE) as usize;
        model[at..at + len as usize].fill(pattern);
    }
    model
}

/// qemu-io reads that check every run of equal bytes of the model.
fn qemu_reads() -> Vec<String> {
    let model = qemu_model();
    let mut reads = Vec::new();
    let mut start = 0;
    while start < model.len() {
        let mut end = start + 1;
        while end < model.len() && model[end] == model[start] {
            end += 1;
        }
        reads.push(format!("read -P {:#x} {} {}", model[start], QEMU_BASE + start as u64, end - start));
        start = end;
    }
    reads
}

fn fio_verify(uri: &str, extra: &[&str]) {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=cached",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randseed=4321",
        "--verify_state_save=0",
    ]);
    cmd.args(extra);
    let out = run_bounded(&mut cmd, support::TOOL_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("err= 0") && !stdout.contains("verify: bad"),
        "fio {extra:?} failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serves the pair; the control socket goes next to the files (`--data-dir`), so tests running
/// in parallel do not meet on the default one.
fn serve(cache: &Path, backing: &Path, mode: &str) -> UbcacheServer {
    let data_dir = cache.parent().unwrap();
    UbcacheServer::start(&[
        "--data-dir",
        s(data_dir),
        "--cache",
        s(cache),
        "--backing",
        s(backing),
        "--mode",
        mode,
        "--listen",
        "127.0.0.1:0",
    ])
}

fn stop_and_check(server: &mut UbcacheServer, cache: &Path, backing: &Path) {
    let status = server.stop();
    assert!(status.success(), "{}", server.stderr.text());
    assert!(server.stderr.text().contains("cache set closed cleanly"), "{}", server.stderr.text());
    let (code, report) = check_json(cache, backing);
    assert_eq!(code, 0, "ubcache check after a clean stop: {report}");
    assert_eq!(report["report"]["journal_entries_replayed"], 0, "a clean stop leaves nothing to replay");
}

fn clients_in_mode(mode: &str) {
    if !require_tools(&["qemu-io", "fio"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), BACKING_BYTES, CACHE_BYTES);
    let mut server = serve(&cache, &backing, mode);
    server.stderr_with(&format!("mode {mode}"));

    let writes: Vec<String> = qemu_writes()
        .into_iter()
        .map(|(off, len, p, fua)| format!("write -P {p:#x}{} {off} {len}", if fua { " -f" } else { "" }))
        .chain(["flush".to_string()])
        .collect();
    qemu_io(server.uri(), &writes);
    // A new connection reads back (from the cache, or from backing after eviction).
    qemu_io(server.uri(), &qemu_reads());
    // Twice: the second read of the same ranges hits what the first one filled.
    qemu_io(server.uri(), &qemu_reads());
    // A wrong pattern must fail, or the reads above prove nothing.
    let wrong = run_bounded(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            server.uri(),
            "-c",
            &format!("read -P 0x99 {QEMU_BASE} 4k"),
        ]),
        support::TOOL_TIMEOUT,
    );
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("verification failed"), "{wrong:?}");

    fio_verify(server.uri(), &[]);
    stop_and_check(&mut server, &cache, &backing);

    // Restart: the same data through a new server (after writeback mode: from the cache).
    let mut server = serve(&cache, &backing, mode);
    qemu_io(server.uri(), &qemu_reads());
    fio_verify(server.uri(), &["--verify_only"]);
    stop_and_check(&mut server, &cache, &backing);

    if mode != "writeback" {
        // The data went home: the backing file holds it after its 8 KiB superblock.
        let image = std::fs::read(&backing).unwrap();
        let home = &image[(8192 + QEMU_BASE) as usize..];
        assert!(home == qemu_model().as_slice(), "mode {mode}: the backing file lacks the qemu-io writes");
    }
}

#[test]
fn writethrough_serves_real_clients_and_checks_clean() {
    clients_in_mode("writethrough");
}

#[test]
fn writeback_serves_real_clients_and_checks_clean() {
    clients_in_mode("writeback");
}

#[test]
fn writearound_serves_real_clients_and_checks_clean() {
    clients_in_mode("writearound");
}

#[test]
fn none_serves_real_clients_and_checks_clean() {
    clients_in_mode("none");
}

#[test]
fn writeback_data_reaches_home_after_a_switch_to_writethrough() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), BACKING_BYTES, CACHE_BYTES);
    let mut server = serve(&cache, &backing, "writeback");
    let writes: Vec<String> =
        qemu_writes().into_iter().map(|(off, len, p, _)| format!("write -P {p:#x} -f {off} {len}")).collect();
    qemu_io(server.uri(), &writes);
    server.stop_with(libc::SIGKILL);
    // Restarted in writethrough, the writeback thread still owes the backing device the dirty
    // data left by the writeback run; it writes it home while serving.
    let mut server = serve(&cache, &backing, "writethrough");
    let log = server.stderr_with("recovery replayed");
    assert!(!log.contains(" 0 dirty bytes"), "the SIGKILLed writeback run left dirty data: {log}");
    // `ubcache flush` over the control socket writes it all home and waits for the end.
    let data_dir = s(dir.path());
    support::ubcache_ok(&["flush", "--data-dir", data_dir]);
    let image = std::fs::read(&backing).unwrap();
    assert!(
        &image[(8192 + QEMU_BASE) as usize..] == qemu_model().as_slice(),
        "after `ubcache flush` the backing file holds every write"
    );
    let stats = support::ubcache_ok(&["stats", "--json", "--data-dir", data_dir]);
    assert!(stats.contains("dirty"), "{stats}");
    support::ubcache_ok(&["set-mode", "writearound", "--data-dir", data_dir]);
    qemu_io(server.uri(), &qemu_reads());
    stop_and_check(&mut server, &cache, &backing);
}
