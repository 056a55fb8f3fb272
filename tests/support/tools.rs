//! External tools a test drives: whether one is installed, and the rule for a missing one (fail
//! under `CI=true`, otherwise print `SKIPPED: ...` and let the test return early). Used by the
//! `interop` and `nbd` test crates.

use std::path::{Path, PathBuf};

/// True under CI, where a missing tool is a failure rather than a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether an executable named `tool` is on PATH (or in the sbin directories).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    // mkfs.ext4, losetup, e2fsck live in sbin, which a non-login PATH may lack.
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(tool)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Returns true when `tool` is installed. Otherwise fails the test under `CI=true`, or prints a
/// skip message and returns false so the caller can return early.
pub fn require_tool(tool: &str) -> bool {
    if find_tool(tool).is_some() {
        return true;
    }
    assert!(!under_ci(), "{tool} is required (CI=true) but not installed; run scripts/install-deps.sh");
    println!("SKIPPED: {tool} is not installed (run scripts/install-deps.sh); skipping this test");
    false
}
