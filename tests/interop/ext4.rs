//! ext4 end to end: `ubcache serve` → `nbdfuse` (the export as a file in a FUSE mount) →
//! `losetup` → `mkfs.ext4` → `mount` → write files → `umount` → `e2fsck -fn` must be clean →
//! remount → every file reads back byte for byte. After a clean server shutdown the backing file
//! itself must hold a clean file system.
//!
//! Needs root (loop devices, mount) and the tools; under `CI=true` their absence fails the test.
//! Everything set up is torn down by a guard, in reverse order, also when an assertion fails.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{
    UbcacheServer, find_tool, make_file, pseudo_random_bytes, require_root, require_tools, run_ok, s,
};

const TOOLS: &[&str] = &["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "e2fsck"];

/// Runs a tool found by [`find_tool`] (sbin may not be on PATH).
fn tool(name: &str) -> Command {
    Command::new(find_tool(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// Tears down, in reverse order of set-up, whatever was set up.
#[derive(Default)]
struct Teardown {
    mounted: Option<PathBuf>,
    loop_dev: Option<String>,
    fuse_dir: Option<PathBuf>,
    nbdfuse: Option<Child>,
}

impl Teardown {
    fn unmount(&mut self) {
        if let Some(mnt) = self.mounted.take() {
            run_ok(tool("umount").arg(&mnt));
        }
    }

    fn detach_loop(&mut self) {
        if let Some(dev) = self.loop_dev.take() {
            run_ok(tool("losetup").args(["-d", &dev]));
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        // Best effort and lazy: a failed test must not leave a mount or loop device behind.
        if let Some(mnt) = self.mounted.take() {
            let _ = tool("umount").arg("-l").arg(&mnt).status();
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = tool("losetup").args(["-d", &dev]).status();
        }
        if let Some(dir) = self.fuse_dir.take() {
            let _ = tool("fusermount3").arg("-u").arg(&dir).stderr(Stdio::null()).status();
        }
        if let Some(mut child) = self.nbdfuse.take() {
            if support::wait_bounded(&mut child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn wait_for_file(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Files of several sizes in nested directories, with content derived from their index.
fn test_files() -> Vec<(String, Vec<u8>)> {
    let sizes = [0usize, 1, 511, 4096, 70_000, 1 << 20, 3 << 20];
    let mut files = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        files.push((format!("dir{}/file{i}.bin", i % 3), pseudo_random_bytes(size, i as u64 + 7)));
    }
    for i in 0..50 {
        files.push((format!("many/small{i}.txt"), format!("small file {i}\n").repeat(i + 1).into_bytes()));
    }
    files
}

fn e2fsck_clean(target: &str) {
    let out = run_ok(tool("e2fsck").args(["-fn", target]));
    assert!(!out.contains("Fix?"), "e2fsck found problems:\n{out}");
}

#[test]
fn ext4_over_nbdfuse_and_loop_survives_umount_fsck_and_remount() {
    if !require_tools(TOOLS) || !require_root("the ext4 test (losetup, mount)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = make_file(dir.path(), "backing.img", 128 << 20);
    let socket = dir.path().join("s.sock");
    let mut server = UbcacheServer::start(&["--backing", s(&backing), "--socket", s(&socket)]);

    let mut teardown = Teardown::default();
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let fuse_file = fuse_dir.join("nbd");
    let child = Command::new("nbdfuse")
        .arg(&fuse_file)
        .arg(server.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn nbdfuse");
    teardown.nbdfuse = Some(child);
    teardown.fuse_dir = Some(fuse_dir.clone());
    wait_for_file(&fuse_file, Duration::from_secs(30));
    assert_eq!(std::fs::metadata(&fuse_file).unwrap().len(), 128 << 20);

    let loop_dev = run_ok(tool("losetup").args(["-f", "--show", s(&fuse_file)])).trim().to_string();
    assert!(loop_dev.starts_with("/dev/loop"), "losetup printed {loop_dev:?}");
    teardown.loop_dev = Some(loop_dev.clone());

    run_ok(tool("mkfs.ext4").args(["-q", "-F", &loop_dev]));
    run_ok(tool("mount").args(["-t", "ext4", &loop_dev, s(&mnt)]));
    teardown.mounted = Some(mnt.clone());

    let files = test_files();
    for (name, data) in &files {
        let path = mnt.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
    }
    // Overwrite and delete some, so the file system does more than append.
    std::fs::write(mnt.join("dir0/file0.bin"), b"rewritten").unwrap();
    std::fs::remove_file(mnt.join("many/small0.txt")).unwrap();
    let expect = |name: &str, data: &[u8]| -> Option<Vec<u8>> {
        match name {
            "dir0/file0.bin" => Some(b"rewritten".to_vec()),
            "many/small0.txt" => None,
            _ => Some(data.to_vec()),
        }
    };

    teardown.unmount();
    e2fsck_clean(&loop_dev);

    run_ok(tool("mount").args(["-t", "ext4", &loop_dev, s(&mnt)]));
    teardown.mounted = Some(mnt.clone());
    for (name, data) in &files {
        let path = mnt.join(name);
        match expect(name, data) {
            Some(want) => assert!(std::fs::read(&path).unwrap() == want, "{name} differs after remount"),
            None => assert!(!path.exists(), "{name} was deleted but is back"),
        }
    }
    teardown.unmount();
    teardown.detach_loop();
    run_ok(tool("fusermount3").arg("-u").arg(&fuse_dir));
    teardown.fuse_dir = None;
    if let Some(mut child) = teardown.nbdfuse.take() {
        let status =
            support::wait_bounded(&mut child, Duration::from_secs(30)).expect("nbdfuse exits after unmount");
        assert!(status.success(), "nbdfuse exited with {status}");
    }

    let status = server.stop();
    assert!(status.success(), "{}", server.stderr.text());
    // The file system reached the backing file itself.
    e2fsck_clean(s(&backing));
}

/// Tears down a loop device even when an assertion fails.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = tool("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_block_device_serves_as_backing() {
    if !require_tools(&["losetup", "qemu-io"]) || !require_root("the block-device backing test (losetup)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = make_file(dir.path(), "disk.img", 8 << 20);
    let loop_dev = LoopDevice(run_ok(tool("losetup").args(["-f", "--show", s(&image)])).trim().to_string());
    assert!(loop_dev.0.starts_with("/dev/loop"), "losetup printed {:?}", loop_dev.0);

    let mut server = UbcacheServer::start(&["--backing", &loop_dev.0, "--listen", "127.0.0.1:0"]);
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        server.uri(),
        "-c",
        "write -P 0x3c -f 7M 1M",
        "-c",
        "read -P 0x3c 7M 1M",
        "-c",
        "read -P 0 0 7M",
    ]));
    assert!(!out.contains("failed"), "{out}");
    assert!(server.stop().success(), "{}", server.stderr.text());
    assert!(
        server.stderr.text().contains("8388608 bytes"),
        "the size comes from the device: {}",
        server.stderr.text()
    );
    drop(loop_dev);
    let data = std::fs::read(&image).unwrap();
    assert!(data[7 << 20..].iter().all(|&b| b == 0x3c), "the write reached the file under the loop device");
}
