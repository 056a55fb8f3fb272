//! The replayed image: a file (or block device) the size of the recorded export, written by
//! applying log entries to it.
//!
//! Trims and zeroings must read back as zeros in the result (dm-log-writes' replay leaves the
//! old data under a discard unless it replays onto dm-thin), so both go through
//! [`BlockDev::write_zeroes`] with unmapping allowed: a punched hole where the file system
//! can, zeroed extents or written zeros where it cannot.

use super::ReplayError;
use super::crash::Apply;
use super::index::Op;
use super::source::{LogSource, SourceEntry};
use crate::dev::{BlockDev, DevError};
use crate::dev::{FileDev, FileDevOptions};
use std::fs::OpenOptions;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The image being replayed onto.
#[derive(Debug)]
pub struct Image {
    dev: FileDev,
}

/// How to create an image.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// Replace an existing file (without it, an existing `--out` is refused: it may be the only
    /// copy of something).
    pub force: bool,
    /// Start from a copy of this image instead of zeros (`--start-from`).
    pub start_from: Option<PathBuf>,
}

impl Image {
    /// Creates `path` with `size` bytes: zeros (a sparse file), or a copy of the start image.
    pub fn create(path: &Path, size: u64, opts: &ImageOptions) -> Result<Self, ReplayError> {
        let io = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| ReplayError::Image { path, what, source }
        };
        let is_block_device = path_is_block_device(path);
        if let Some(start) = &opts.start_from {
            refuse_same_file(path, start, "start image")?;
        }
        if path.exists() && !opts.force {
            return Err(ReplayError::OutExists(path.to_path_buf()));
        }
        if let Some(start) = &opts.start_from {
            let start_len = std::fs::metadata(start)
                .map_err(|source| ReplayError::Image { path: start.clone(), what: "stat", source })?
                .len();
            if start_len != size {
                return Err(ReplayError::StartSize { path: start.clone(), len: start_len, size });
            }
        }
        if !is_block_device {
            // Truncate first: stale data beyond what the start image or the log covers must not
            // survive into the result.
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(io("create"))?;
            if let Some(start) = &opts.start_from {
                drop(file);
                std::fs::copy(start, path).map_err(io("copy the start image to"))?;
            } else {
                file.set_len(size).map_err(io("size"))?;
            }
        }
        let dev = FileDev::open(path, &FileDevOptions::default()).map_err(|e| dev_error(path, e))?;
        if dev.len() < size {
            return Err(ReplayError::StartSize { path: path.to_path_buf(), len: dev.len(), size });
        }
        let image = Self { dev };
        if is_block_device {
            match &opts.start_from {
                Some(start) => image.copy_in(start, size)?,
                None => image.zero(0..size)?,
            }
        }
        Ok(image)
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ReplayError> {
        self.dev.write_at(data, offset).map_err(|e| dev_error(self.dev.path(), e))
    }

    /// Makes `range` read back as zeros.
    pub fn zero(&self, range: Range<u64>) -> Result<(), ReplayError> {
        self.dev
            .write_zeroes(range.start, range.end - range.start, true)
            .map_err(|e| dev_error(self.dev.path(), e))
    }

    /// Flushes the image to stable storage, so a command run on it next (possibly through
    /// another open of the file, a loop device) sees every byte.
    pub fn sync(&self) -> Result<(), ReplayError> {
        self.dev.sync().map_err(|e| dev_error(self.dev.path(), e))
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        self.dev.path()
    }

    fn copy_in(&self, start: &Path, size: u64) -> Result<(), ReplayError> {
        let src = FileDev::open(start, &FileDevOptions { read_only: true, ..FileDevOptions::default() })
            .map_err(|e| dev_error(start, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < size {
            let n = (size - offset).min(buf.len() as u64) as usize;
            src.read_at(&mut buf[..n], offset).map_err(|e| dev_error(start, e))?;
            self.write(offset, &buf[..n])?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Refuses to write the image over `other` (the log, the start image): `--force` is for a stale
/// image, not for destroying the input of the replay.
pub fn refuse_same_file(out: &Path, other: &Path, what: &str) -> Result<(), ReplayError> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(out), std::fs::metadata(other)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(ReplayError::Usage(format!(
                "--out {} is the {what}: refusing to overwrite it",
                out.display()
            )));
        }
    }
    Ok(())
}

fn path_is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

fn dev_error(path: &Path, source: DevError) -> ReplayError {
    ReplayError::Dev { path: path.to_path_buf(), source }
}

/// Applies `entry` (or the parts `how` keeps of it) to `image`. Flushes and marks change
/// nothing: the replay orders by applying entries one after another.
pub fn apply_entry(image: &Image, entry: &SourceEntry, how: &Apply) -> Result<(), ReplayError> {
    let Some(range) = entry.op.range() else { return Ok(()) };
    let parts: Vec<Range<u64>> = match how {
        Apply::Whole => vec![range.clone()],
        Apply::Parts(parts) => parts.clone(),
    };
    for part in parts {
        // A torn part outside the entry's range would be a bug in the chooser; never write it.
        if part.start < range.start || part.end > range.end || part.start >= part.end {
            continue;
        }
        match (&entry.op, &entry.data) {
            (Op::Write { .. }, Some(data)) => {
                let from = (part.start - range.start) as usize;
                let to = (part.end - range.start) as usize;
                image.write(part.start, &data[from..to])?;
            }
            _ => image.zero(part)?,
        }
    }
    Ok(())
}

/// Streams the log through `decide`, applying what it returns, until entry `last` has been seen.
/// Returns how many entries were applied. The log must still hold `last` intact (it did when it
/// was indexed); if it no longer does, that is an error, not a short replay.
pub fn apply_log(
    log: &Path,
    image: &Image,
    mut decide: impl FnMut(&SourceEntry) -> Option<Apply>,
    last: u64,
) -> Result<u64, ReplayError> {
    let mut source = LogSource::open(log)?;
    let mut applied = 0;
    while let Some(entry) = source.next_entry()? {
        if let Some(how) = decide(&entry) {
            apply_entry(image, &entry, &how)?;
            applied += 1;
        }
        if entry.number >= last {
            return Ok(applied);
        }
    }
    Err(ReplayError::Corrupt {
        path: log.to_path_buf(),
        entry: last,
        offset: 0,
        detail: format!("the log changed while it was replayed: {}", source.end().describe()),
    })
}
