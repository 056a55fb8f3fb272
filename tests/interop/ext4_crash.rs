//! ext4 on a cached export in writeback mode, with the server SIGKILLed in the middle of a
//! write: `ubcache serve --mode writeback` → `nbdfuse` → `losetup` → `mkfs.ext4` → mount →
//! files written and fsynced (their checksums kept) → a writer keeps writing → SIGKILL of the
//! server → teardown → restart (cache recovery replays its journal) → mount (ext4 replays its
//! journal) → umount → `e2fsck -fn` must be clean → every fsynced file reads back intact.
//!
//! This is the durability contract seen by a real file system: what ext4 fsynced (FLUSH/FUA)
//! before the crash survives it, although the data lived only in the cache (writeback).
//!
//! Needs root (loop devices, mount) and the tools; under `CI=true` their absence fails the test.
//! Everything set up is torn down by guards (umount -l, losetup -d, fusermount3 -u), also when an
//! assertion fails.

use crate::support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{
    UbcacheServer, check_json, find_tool, format_pair, pseudo_random_bytes, require_root, require_tools,
    run_bounded, run_ok, s,
};

const TOOLS: &[&str] = &["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "e2fsck"];

fn tool(name: &str) -> Command {
    Command::new(find_tool(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// The client-side stack over one server: nbdfuse file → loop device → mount. Torn down in
/// reverse order on drop, lazily and best effort (the server may be dead).
struct Stack {
    nbdfuse: Option<Child>,
    fuse_dir: PathBuf,
    loop_dev: Option<String>,
    mounted: Option<PathBuf>,
}

impl Stack {
    fn attach(uri: &str, fuse_dir: &Path) -> Stack {
        std::fs::create_dir_all(fuse_dir).unwrap();
        let fuse_file = fuse_dir.join("nbd");
        let child = Command::new("nbdfuse")
            .arg(&fuse_file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let mut stack =
            Stack { nbdfuse: Some(child), fuse_dir: fuse_dir.to_path_buf(), loop_dev: None, mounted: None };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fuse_file.exists() {
            assert!(Instant::now() < deadline, "nbdfuse did not create {}", fuse_file.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        let dev = run_ok(tool("losetup").args(["-f", "--show", s(&fuse_file)])).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        stack.loop_dev = Some(dev);
        stack
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().unwrap()
    }

    fn mount(&mut self, mnt: &Path) {
        std::fs::create_dir_all(mnt).unwrap();
        run_ok(tool("mount").args(["-t", "ext4", self.dev(), s(mnt)]));
        self.mounted = Some(mnt.to_path_buf());
    }

    fn umount(&mut self) {
        if let Some(mnt) = self.mounted.take() {
            run_ok(tool("umount").arg(&mnt));
        }
    }

    /// Orderly teardown after a clean run; every step must succeed.
    fn detach(mut self) {
        self.umount();
        if let Some(dev) = self.loop_dev.take() {
            run_ok(tool("losetup").args(["-d", &dev]));
        }
        run_ok(tool("fusermount3").arg("-u").arg(&self.fuse_dir));
        if let Some(mut child) = self.nbdfuse.take() {
            let status = support::wait_bounded(&mut child, Duration::from_secs(30)).expect("nbdfuse exits");
            assert!(status.success(), "nbdfuse exited with {status}");
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mnt) = self.mounted.take() {
            let _ = tool("umount").arg("-l").arg(&mnt).stderr(Stdio::null()).status();
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = tool("losetup").args(["-d", &dev]).stderr(Stdio::null()).status();
        }
        let _ = tool("fusermount3").arg("-u").arg("-z").arg(&self.fuse_dir).stderr(Stdio::null()).status();
        if let Some(mut child) = self.nbdfuse.take()
            && support::wait_bounded(&mut child, Duration::from_secs(5)).is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A writer process that keeps writing (and now and then fsyncing) a file until killed.
struct Writer(Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, cache: &Path, backing: &Path) -> UbcacheServer {
    UbcacheServer::start(&[
        "--data-dir",
        s(dir),
        "--cache",
        s(cache),
        "--backing",
        s(backing),
        "--mode",
        "writeback",
        "--socket",
        s(&dir.join("nbd.sock")),
    ])
}

fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[test]
fn ext4_in_writeback_survives_a_sigkill_mid_write() {
    if !require_tools(TOOLS) || !require_root("the ext4 crash test (losetup, mount)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (backing, cache) = format_pair(dir.path(), 96 << 20, 32 << 20);
    let mut server = serve(dir.path(), &cache, &backing);
    let mnt = dir.path().join("mnt");
    let mut stack = Stack::attach(server.uri(), &dir.path().join("fuse"));
    run_ok(tool("mkfs.ext4").args(["-q", "-F", stack.dev()]));
    stack.mount(&mnt);

    // Files written and fsynced (file and directory): these must survive the crash.
    let mut synced = Vec::new();
    std::fs::create_dir_all(mnt.join("synced")).unwrap();
    for i in 0..24u64 {
        let data = pseudo_random_bytes(4096 * (1 + (i as usize * 7) % 64), i + 1);
        let name = format!("synced/f{i}.bin");
        let mut f = std::fs::File::create(mnt.join(&name)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        synced.push((name, data.len(), crc(&data)));
    }
    std::fs::File::open(mnt.join("synced")).unwrap().sync_all().unwrap();

    // A writer in flight when the server dies.
    let writer = Writer(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "i=0; while true; do dd if=/dev/urandom of={}/busy$i bs=64k count=16 conv=fsync 2>/dev/null; i=$((i+1)); done",
                s(&mnt)
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn writer"),
    );
    // Let it write a few files, then kill the server while it is busy.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mnt.join("busy3").exists() {
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.stop_with(libc::SIGKILL);
    drop(writer);
    // The client side is now broken; tear it down lazily.
    drop(stack);

    // Restart: the cache replays its journal; the dirty data is served from the cache.
    let mut server = serve(dir.path(), &cache, &backing);
    let log = server.stderr_with("recovery replayed");
    assert!(!log.contains(" 0 dirty bytes"), "writeback left dirty data in the cache: {log}");
    let mut stack = Stack::attach(server.uri(), &dir.path().join("fuse2"));
    // Mounting replays the ext4 journal; after a clean umount e2fsck must find nothing.
    stack.mount(&mnt);
    stack.umount();
    let out = run_bounded(tool("e2fsck").args(["-fn", stack.dev()]), support::TOOL_TIMEOUT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Fix?"),
        "e2fsck after the crash:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stack.mount(&mnt);
    for (name, len, sum) in &synced {
        let data = std::fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("fsynced {name} lost: {e}"));
        assert_eq!(data.len(), *len, "{name} length");
        assert_eq!(crc(&data), *sum, "{name} content");
    }
    stack.detach();
    let status = server.stop();
    assert!(status.success(), "{}", server.stderr.text());
    let (code, report) = check_json(&cache, &backing);
    assert_eq!(code, 0, "ubcache check after the clean stop: {report}");
}
