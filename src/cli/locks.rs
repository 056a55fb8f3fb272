//! Advisory locks on the files a server or an offline tool uses.

use super::ServeError;
use std::path::Path;

/// An advisory `flock` on a backing or cache file: exclusive for a writable export, shared for a
/// read-only one (and for `ubcache show`/`check`). Two ubcache processes writing one disk would
/// each trust their own view of it (and each its own cache), so the second one is refused at
/// start-up. Released when dropped (the descriptor is closed).
#[derive(Debug)]
pub struct BackingLock {
    _file: std::fs::File,
}

impl BackingLock {
    /// Takes the lock without waiting.
    pub fn acquire(path: &Path, read_only: bool) -> Result<Self, ServeError> {
        Self::try_acquire(path, read_only).map_err(|(op, source, reason)| match reason {
            Some(reason) => ServeError::BackingUnusable { path: path.to_path_buf(), reason },
            None => ServeError::BackingIo { path: path.to_path_buf(), op, source },
        })
    }

    /// Like [`BackingLock::acquire`] for a cache file.
    pub fn acquire_cache(path: &Path, shared: bool) -> Result<Self, ServeError> {
        Self::try_acquire(path, shared).map_err(|(op, source, reason)| ServeError::CacheUnusable {
            path: path.to_path_buf(),
            reason: reason.unwrap_or_else(|| format!("cannot {op}: {source}")),
        })
    }

    /// `Err((op, io error, reason))`: `reason` is set when the file is locked by someone else.
    fn try_acquire(
        path: &Path,
        shared: bool,
    ) -> Result<Self, (&'static str, std::io::Error, Option<String>)> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).map_err(|e| ("open for locking", e, None))?;
        let mode = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock only takes an integer fd and flags; the fd is owned by `file`, which is
        // open for the whole call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Self { _file: file });
        }
        let err = std::io::Error::last_os_error();
        let reason = if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            "it is in use by another ubcache process (locked)".to_string()
        } else {
            format!("cannot lock it: {err}")
        };
        Err(("lock", err, Some(reason)))
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{ServeOptions, build_exports};

    #[test]
    fn a_backing_file_is_served_by_one_writer_or_several_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let writer = ServeOptions { backing: vec![path], ..Default::default() };
        let reader = ServeOptions { read_only: true, ..writer.clone() };

        let first = build_exports(&writer).unwrap();
        let err = build_exports(&writer).unwrap_err();
        assert!(err.to_string().contains("in use by another ubcache process"), "{err}");
        assert!(build_exports(&reader).is_err(), "no reader next to a writer");
        drop(first);

        let read_a = build_exports(&reader).unwrap();
        let read_b = build_exports(&reader).unwrap();
        assert!(build_exports(&writer).is_err(), "no writer next to readers");
        drop((read_a, read_b));
        assert!(build_exports(&writer).is_ok(), "the locks are released on drop");
    }
}
