//! Replay of a recorded log (`ubcache replay`): list it, rebuild the export as it was at any
//! point, build the crash states a power cut at that point allows, and run a check command at
//! every flush, FUA write or mark.
//!
//! # What "the disk at a point" means
//! The log holds the client's requests in completion order, with each FLUSH where it fell
//! (dm-log-writes semantics, see `docs/record-format.md`): a plain write is durable at the first
//! FLUSH after it in the log, a FUA write at once. Entry numbers, flush numbers (the Nth FLUSH of
//! the log, from 1) and FUA numbers (the Nth FUA write, from 1) are the ones `--list` prints.
//! - `--to-entry N`, `--to-flush N`, `--to-fua N`, `--to-mark NAME` (its first occurrence),
//!   `--all`: the end point is that entry (`--all`: the last one); the *prefix* state applies
//!   every entry up to and including it, in log order.
//! - With `--unflushed`, the end point's last FLUSH (the last FLUSH at or before it) is the
//!   durable base, and the *crash window* is what follows it up to the crash: up to the end point
//!   itself for `--to-entry`, `--to-fua` and `--to-mark` (the crash came right after it), up to
//!   the next FLUSH (exclusive) or the end of the log for `--to-flush` and `--all` (the crash came
//!   some time before that FLUSH completed). See [`crash`] for which states are chosen.
//!
//! # Layout
//! - [`index`]: one pass over the log: entry kinds, numbers, offsets, and where it ends.
//! - [`crash`]: the pure choice of a crash state.
//! - [`image`]: the output image and how entries are applied to it.
//! - [`list`]: `--list` as text or JSON.
//! - [`check`]: the `--check` loop.

pub mod check;
pub mod crash;
pub mod image;
pub mod index;
pub mod list;
pub mod source;

use crash::{Apply, Choice, Unflushed, WindowWrite};
use image::{Image, ImageOptions};
use index::{EntryInfo, LogIndex, Op};
use std::path::{Path, PathBuf};

/// Everything that can stop a replay. Each says what, where (entry, byte offset, path) and why.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The file is not a recording log this build reads.
    #[error("{path} is not a ubcache recording log: {reason}")]
    NotALog { path: PathBuf, reason: String },
    /// The log could not be opened or read.
    #[error("cannot read log {path}: {source}")]
    LogIo { path: PathBuf, source: std::io::Error },
    /// The log is damaged (or not a log) at this entry and byte offset; what precedes is intact.
    #[error("{path}: {detail} at entry {entry}, byte offset {offset}")]
    Corrupt { path: PathBuf, entry: u64, offset: u64, detail: String },
    /// The end point is not in the log.
    #[error("{0}")]
    PastEnd(String),
    /// `--out` exists and `--force` was not given.
    #[error("{0} exists: refusing to overwrite it without --force")]
    OutExists(PathBuf),
    /// The start image (or the output device) has the wrong size.
    #[error("{path} has {len} bytes but the recorded export has {size}")]
    StartSize { path: PathBuf, len: u64, size: u64 },
    /// Creating or copying an image failed.
    #[error("cannot {what} {path}: {source}")]
    Image { path: PathBuf, what: &'static str, source: std::io::Error },
    /// Writing the image failed.
    #[error("{path}: {source}")]
    Dev { path: PathBuf, source: crate::dev::DevError },
    /// A request that makes no sense (flags that do not go together).
    #[error("{0}")]
    Usage(String),
    /// The check command wrote to the image it was given, which the next points build on.
    #[error(
        "the check command changed the image at {point} (entry {entry}): the next points are built on it, so the \
         command must only read it (e2fsck -n, debugfs; or copy the image first and mount or recover the copy)"
    )]
    CommandChangedImage { point: String, entry: u64 },
    /// The check command could not be started.
    #[error("cannot run the check command: {0}")]
    Spawn(std::io::Error),
}

/// Where a replay stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndPoint {
    /// Through entry N.
    Entry(u64),
    /// Through the Nth FLUSH.
    Flush(u64),
    /// Through the Nth FUA write.
    Fua(u64),
    /// Through the first mark with this name.
    Mark(String),
    /// Through the last entry.
    All,
}

impl std::fmt::Display for EndPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Entry(n) => write!(f, "entry {n}"),
            Self::Flush(n) => write!(f, "flush {n}"),
            Self::Fua(n) => write!(f, "FUA write {n}"),
            Self::Mark(name) => write!(f, "mark {name:?}"),
            Self::All => f.write_str("the end of the log"),
        }
    }
}

/// The entries a crash state is built from: the base (applied whole) and the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashWindow {
    /// Position in [`LogIndex::entries`] of the last entry of the durable base (`None`: the base
    /// is the start image).
    pub base_end: Option<usize>,
    /// The data-changing entries after the base up to the crash.
    pub writes: Vec<WindowWrite>,
}

impl LogIndex {
    /// Position in [`Self::entries`] of the end point's entry, or why there is none.
    pub fn resolve(&self, end: &EndPoint) -> Result<usize, ReplayError> {
        let found = match end {
            EndPoint::Entry(n) => self.entries.iter().position(|e| e.number == *n),
            EndPoint::Flush(n) => self.entries.iter().position(|e| e.flush == Some(*n)),
            EndPoint::Fua(n) => self.entries.iter().position(|e| e.fua == Some(*n)),
            EndPoint::Mark(name) => {
                self.entries.iter().position(|e| matches!(&e.op, Op::Mark { name: m } if m == name))
            }
            EndPoint::All => self.entries.len().checked_sub(1),
        };
        found.ok_or_else(|| ReplayError::PastEnd(self.past_end_message(end)))
    }

    fn past_end_message(&self, end: &EndPoint) -> String {
        let t = self.totals();
        let have = match end {
            EndPoint::Entry(_) | EndPoint::All => match self.entries.last() {
                Some(last) => format!("its entries are {}..={}", self.entries[0].number, last.number),
                None => "it has no entries".to_string(),
            },
            EndPoint::Flush(_) => format!("it has {} flushes", t.flushes),
            EndPoint::Fua(_) => format!("it has {} FUA points", t.fua_points),
            EndPoint::Mark(_) => {
                let names: Vec<String> = self.marks().map(|(_, name)| format!("{name:?}")).collect();
                if names.is_empty() {
                    "it has no marks".to_string()
                } else {
                    format!("its marks are {}", names.join(", "))
                }
            }
        };
        let damage = match &self.end {
            index::LogEnd::Clean => String::new(),
            other => format!(" ({})", other.describe()),
        };
        format!("{end} is not in the log: {have}{damage}")
    }

    /// The durable base and crash window for a crash at `end` (see the module documentation).
    pub fn crash_window(&self, end: &EndPoint, at: usize) -> CrashWindow {
        let base_end = self.entries[..=at].iter().rposition(|e| matches!(e.op, Op::Flush));
        let window_end = match end {
            EndPoint::Flush(_) | EndPoint::All => self.entries[at + 1..]
                .iter()
                .position(|e| matches!(e.op, Op::Flush))
                .map_or(self.entries.len(), |p| at + 1 + p),
            _ => at + 1,
        };
        let start = base_end.map_or(0, |b| b + 1);
        let writes = self.entries[start..window_end].iter().filter_map(EntryInfo::window_write).collect();
        CrashWindow { base_end, writes }
    }
}

/// A replay to one end point, as `--out` asks for it.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// The log.
    pub log: PathBuf,
    /// The image to write (with several states: see [`state_paths`]).
    pub out: PathBuf,
    /// Where to stop.
    pub end: EndPoint,
    /// Crash state beyond the prefix (`None`: the prefix).
    pub unflushed: Option<Unflushed>,
    /// Seed of the first random state; state i uses `seed + i`.
    pub seed: u64,
    /// How many states to write.
    pub states: u32,
    /// How the image is created.
    pub image: ImageOptions,
}

/// One image a replay wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenState {
    /// Its path.
    pub path: PathBuf,
    /// The seed that rebuilds it (random modes).
    pub seed: Option<u64>,
    /// Entries applied (whole or torn), the durable base included.
    pub applied: u64,
    /// Window entries applied torn.
    pub torn: u64,
    /// Window entries dropped.
    pub dropped: u64,
}

/// The paths of `states` images for `--out out`: `out` itself for one; for several, `out` with
/// `{n}` replaced by the state number, or `out.N` when it has no `{n}`.
pub fn state_paths(out: &Path, states: u32) -> Vec<PathBuf> {
    if states <= 1 {
        return vec![out.to_path_buf()];
    }
    let text = out.to_string_lossy();
    (0..states)
        .map(|i| {
            if text.contains("{n}") {
                PathBuf::from(text.replace("{n}", &i.to_string()))
            } else {
                let mut p = out.as_os_str().to_owned();
                p.push(format!(".{i}"));
                PathBuf::from(p)
            }
        })
        .collect()
}

/// Writes the image(s) `req` asks for and says what each holds.
pub fn replay(req: &ReplayRequest) -> Result<Vec<WrittenState>, ReplayError> {
    if req.states == 0 {
        return Err(ReplayError::Usage("--states must be at least 1".into()));
    }
    if req.states > 1 && !req.unflushed.is_some_and(Unflushed::is_random) {
        return Err(ReplayError::Usage(
            "--states above 1 needs --unflushed random or torn (the other states are all the same)".into(),
        ));
    }
    let index = LogIndex::scan(&req.log)?;
    let at = index.resolve(&req.end)?;
    let paths = state_paths(&req.out, req.states);
    if !req.image.force {
        if let Some(p) = paths.iter().find(|p| p.exists()) {
            return Err(ReplayError::OutExists(p.clone()));
        }
    }
    for p in &paths {
        image::refuse_same_file(p, &req.log, "log")?;
    }
    let mut written = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let image = Image::create(path, index.header.export_size, &req.image)?;
        let state = match req.unflushed {
            None => {
                let last = index.entries[at].number;
                let applied =
                    image::apply_log(&req.log, &image, |e| (e.number <= last).then_some(Apply::Whole), last)?;
                WrittenState { path: path.clone(), seed: None, applied, torn: 0, dropped: 0 }
            }
            Some(mode) => {
                let seed = req.seed.wrapping_add(i as u64);
                let window = index.crash_window(&req.end, at);
                let choice = crash::choose(&window.writes, mode, seed, u64::from(index.header.sector_size));
                apply_crash_state(
                    &req.log,
                    &index,
                    &image,
                    &window,
                    &choice,
                    path,
                    mode.is_random().then_some(seed),
                )?
            }
        };
        image.sync()?;
        written.push(state);
    }
    Ok(written)
}

fn apply_crash_state(
    log: &Path,
    index: &LogIndex,
    image: &Image,
    window: &CrashWindow,
    choice: &Choice,
    path: &Path,
    seed: Option<u64>,
) -> Result<WrittenState, ReplayError> {
    let base_last = window.base_end.map(|b| index.entries[b].number);
    let torn = choice.iter().filter(|(_, a)| matches!(a, Apply::Parts(_))).count() as u64;
    let dropped = (window.writes.len() - choice.len()) as u64;
    if base_last.is_none() && choice.is_empty() {
        // Nothing to apply: the state is the start image.
        return Ok(WrittenState { path: path.to_path_buf(), seed, applied: 0, torn, dropped });
    }
    let chosen: std::collections::HashMap<u64, &Apply> = choice.iter().map(|(n, a)| (*n, a)).collect();
    let last = window.writes.last().map(|w| w.entry).or(base_last).unwrap_or(0);
    let applied = image::apply_log(
        log,
        image,
        |e| {
            if base_last.is_some_and(|b| e.number <= b) {
                Some(Apply::Whole)
            } else {
                chosen.get(&e.number).map(|a| (*a).clone())
            }
        },
        last,
    )?;
    Ok(WrittenState { path: path.to_path_buf(), seed, applied, torn, dropped })
}
