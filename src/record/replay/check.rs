//! `ubcache replay LOG --check 'CMD {image}' --each flush|fua|mark`: replay the log forward onto
//! one image and run a command at every point of one kind.
//!
//! The image is built incrementally: each entry is applied once, and the command sees the prefix
//! state at each point (every entry up to and including it). Commands read the image through the
//! page cache (a file read, a loop device), so no sync is needed between points.
//!
//! The command must not change the image: the next point's state is built on top of it. A
//! command that mounts a journalling file system read-write, or `e2fsck -y`, would, so the
//! loop compares the image's modification time and size before and after every command and stops with an
//! error when it moved (a verifier that must mount can copy the image first:
//! `cp --sparse=always {image} /tmp/x`).

use super::ReplayError;
use super::crash::Apply;
use super::image::{self, Image, ImageOptions};
use super::index::{EntryInfo, LogEnd, LogIndex, Op};
use super::list::point;
use super::source::LogSource;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

/// Which entries are check points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Each {
    /// Every FLUSH.
    Flush,
    /// Every FUA write, trim or zeroing.
    Fua,
    /// Every mark.
    Mark,
}

impl Each {
    fn matches(self, e: &EntryInfo) -> bool {
        match self {
            Each::Flush => e.flush.is_some(),
            Each::Fua => e.fua.is_some(),
            Each::Mark => matches!(e.op, Op::Mark { .. }),
        }
    }
}

/// A check run.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub log: PathBuf,
    /// Run by `sh -c` with every `{image}` replaced by the shell-quoted image path.
    pub command: String,
    pub each: Each,
    /// Count failures and go on instead of stopping at the first.
    pub keep_going: bool,
    /// The image to build (`None`: a temporary file, removed at the end).
    pub image: Option<PathBuf>,
    pub image_opts: ImageOptions,
}

/// The outcome at one point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointResult {
    /// 1 for the first point checked.
    pub index: u64,
    /// The entry number of the point.
    pub entry: u64,
    /// Its byte offset in the log.
    pub log_offset: u64,
    /// "flush 3", "fua 2", "mark \"name\"".
    pub point: String,
    /// The last mark at or before the point.
    pub last_mark: Option<String>,
    pub ok: bool,
    /// "ok", "exit status 8", "killed by signal 9".
    pub status: String,
    /// The command's stdout then stderr (kept for failures only).
    pub output: String,
}

impl PointResult {
    /// The one line printed for this point.
    pub fn line(&self) -> String {
        // A mark point is its own last mark: naming it twice says nothing.
        let mark = match &self.last_mark {
            Some(m) if self.point != format!("mark {m:?}") => format!(", after mark {m:?}"),
            _ => String::new(),
        };
        format!(
            "{} (entry {}, log offset {}{mark}): {}",
            self.point,
            self.entry,
            self.log_offset,
            if self.ok { "ok".to_string() } else { format!("FAILED ({})", self.status) }
        )
    }
}

/// What a check run found.
#[derive(Debug, Clone, Default)]
pub struct CheckSummary {
    /// How the log ends: points after damage were not checked.
    pub log_end: LogEnd,
    /// Points in the log.
    pub points: u64,
    /// Points checked.
    pub checked: u64,
    pub failures: u64,
    pub first_failure: Option<PointResult>,
}

/// Receives progress of a check run (a progress bar, plain lines, a test's list).
pub trait CheckObserver {
    /// Called once, before the first point, with the number of points.
    fn start(&mut self, points: u64);
    /// Called after every point.
    fn point(&mut self, result: &PointResult);
}

/// Puts `text` in single quotes for `sh`, so any path is one word.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Runs the check loop. An `Err` is a failure of the loop itself (unreadable log, image I/O,
/// a command that cannot start or that changed the image); failing points are in the summary.
pub fn run_check(req: &CheckRequest, observer: &mut dyn CheckObserver) -> Result<CheckSummary, ReplayError> {
    let index = LogIndex::scan(&req.log)?;
    let points: Vec<&EntryInfo> = index.entries.iter().filter(|e| req.each.matches(e)).collect();
    let mut summary =
        CheckSummary { points: points.len() as u64, log_end: index.end.clone(), ..CheckSummary::default() };
    observer.start(summary.points);
    let Some(last_point) = points.last().map(|e| e.number) else { return Ok(summary) };

    let temp = req.image.is_none().then(|| TempImage(temp_image_path()));
    let image_path = req.image.clone().or_else(|| temp.as_ref().map(|t| t.0.clone())).unwrap_or_default();
    image::refuse_same_file(&image_path, &req.log, "log")?;
    let opts = ImageOptions { force: req.image_opts.force || temp.is_some(), ..req.image_opts.clone() };
    let image = Image::create(&image_path, index.header.export_size, &opts)?;
    let quoted = shell_quote(&image_path.to_string_lossy());
    let command = req.command.replace("{image}", &quoted);

    let mut source = LogSource::open(&req.log)?;
    let mut last_mark: Option<String> = None;
    let mut next_point = points.iter().peekable();
    while let Some(entry) = source.next_entry()? {
        image::apply_entry(&image, &entry, &Apply::Whole)?;
        if let Op::Mark { name } = &entry.op {
            last_mark = Some(name.clone());
        }
        let Some(info) = next_point.next_if(|p| p.number == entry.number) else { continue };
        summary.checked += 1;
        let result = run_point(&command, &image_path, info, summary.checked, last_mark.as_deref())?;
        observer.point(&result);
        if !result.ok {
            summary.failures += 1;
            if summary.first_failure.is_none() {
                summary.first_failure = Some(result);
            }
            if !req.keep_going {
                break;
            }
        }
        if entry.number >= last_point {
            break;
        }
    }
    Ok(summary)
}

fn run_point(
    command: &str,
    image_path: &Path,
    info: &EntryInfo,
    index: u64,
    last_mark: Option<&str>,
) -> Result<PointResult, ReplayError> {
    let point = point(info);
    let before = modified(image_path);
    // The point is also given in the environment, so a verifier can tell which state it sees.
    let output = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("UBCACHE_IMAGE", image_path)
        .env("UBCACHE_ENTRY", info.number.to_string())
        .env("UBCACHE_POINT", &point)
        .env("UBCACHE_MARK", last_mark.unwrap_or(""))
        .stdin(Stdio::null())
        .output()
        .map_err(ReplayError::Spawn)?;
    if modified(image_path) != before {
        return Err(ReplayError::CommandChangedImage { point, entry: info.number });
    }
    let ok = output.status.success();
    let status = if ok {
        "ok".to_string()
    } else {
        use std::os::unix::process::ExitStatusExt;
        match (output.status.code(), output.status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => output.status.to_string(),
        }
    };
    let text = if ok {
        String::new()
    } else {
        let mut t = String::from_utf8_lossy(&output.stdout).into_owned();
        t.push_str(&String::from_utf8_lossy(&output.stderr));
        t
    };
    Ok(PointResult {
        index,
        entry: info.number,
        log_offset: info.log_offset,
        point,
        last_mark: last_mark.map(str::to_string),
        ok,
        status,
        output: text,
    })
}

/// The image's modification time (with nanoseconds where the file system keeps them) and size.
fn modified(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn temp_image_path() -> PathBuf {
    std::env::temp_dir().join(format!("ubcache-replay-check-{}.img", std::process::id()))
}

/// Removes the temporary image however the run ends.
#[derive(Debug)]
struct TempImage(PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
