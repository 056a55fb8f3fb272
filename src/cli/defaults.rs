//! The default data directory and the backing/cache pair in it: `ubcache serve` with no
//! arguments serves `<DATA_DIR>/backing.img` cached by `<DATA_DIR>/cache.img`, creating and
//! formatting both on the first start.

use super::{CacheMode, ServeError, ServeOptions};
use crate::cache::FormatOptions;
use crate::dev::{BlockDev, FileDev, FileDevOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The data directory when `--data-dir` is not given, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "ubcache-data";

/// The name of the backing file created in the data directory when `--backing` is not given.
pub const DEFAULT_BACKING_FILE: &str = "backing.img";

/// Size of the default backing file: 1 GiB, created sparse so it costs no disk space up front.
pub const DEFAULT_BACKING_SIZE: u64 = 1 << 30;

/// The name of the cache file created in the data directory when no argument names the files.
pub const DEFAULT_CACHE_FILE: &str = "cache.img";

/// Size of the default cache file: 256 MiB, created sparse.
pub const DEFAULT_CACHE_SIZE: u64 = 256 << 20;

/// The mode of a cached export when `--mode` is not given (bcache's default too).
pub const DEFAULT_CACHED_MODE: CacheMode = CacheMode::Writethrough;

/// The cache a `serve` uses, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheChoice {
    pub path: PathBuf,
    /// The default `<data-dir>/cache.img` (created and formatted with the default backing file
    /// when both are missing).
    pub is_default: bool,
}

/// `--cache` if given; the default cache file when no backing device is named either; none
/// (a passthrough) for `--backing` alone.
#[must_use]
pub fn cache_choice(opts: &ServeOptions) -> Option<CacheChoice> {
    match (&opts.cache, opts.backing.is_empty()) {
        (Some(path), _) => Some(CacheChoice { path: path.clone(), is_default: false }),
        (None, true) => Some(CacheChoice { path: opts.data_dir.join(DEFAULT_CACHE_FILE), is_default: true }),
        (None, false) => None,
    }
}

/// First start without arguments: creates the default backing file and cache file and formats
/// them as a pair. Only when *both* are missing: one without the other (a raw `backing.img` from
/// a passthrough-only ubcache, or a lost cache) is refused with a hint, never overwritten.
pub(super) fn ensure_default_pair(
    opts: &ServeOptions,
    backing: &Path,
    cache: &Path,
) -> Result<(), ServeError> {
    match (backing.exists(), cache.exists()) {
        (true, true) => return Ok(()),
        (false, false) => {}
        (true, false) => {
            return Err(ServeError::CacheUnusable {
                path: cache.to_path_buf(),
                reason: format!(
                    "it is missing but the default backing file {} exists. Serve that file alone with \
                     `ubcache serve --backing {}` (mode none), or pair it with a cache using `ubcache \
                     format --cache {} --backing {} --size 256M` (writes an 8 KiB header at its start)",
                    backing.display(),
                    backing.display(),
                    cache.display(),
                    backing.display()
                ),
            });
        }
        (false, true) => {
            return Err(ServeError::BackingMissing {
                path: backing.to_path_buf(),
                default: format!("{} with its cache {}", backing.display(), cache.display()),
            });
        }
    }
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|source| ServeError::DataDir { path: opts.data_dir.clone(), source })?;
    let backing_size = opts.size.unwrap_or(DEFAULT_BACKING_SIZE);
    log::info!(
        "first start: creating {} ({backing_size} bytes) and its cache {} ({DEFAULT_CACHE_SIZE} bytes), sparse",
        backing.display(),
        cache.display()
    );
    // The cache is formatted under a temporary name and renamed into place last, so a crash
    // during the first start leaves no half-formatted `cache.img` behind.
    let tmp = cache.with_extension("img.formatting");
    let _ = std::fs::remove_file(&tmp);
    let create = |path: &Path, size: u64| {
        FileDev::open(path, &FileDevOptions { read_only: false, create_with_size: Some(size), direct: false })
    };
    let backing_dev: Arc<dyn BlockDev> = Arc::new(
        create(backing, backing_size)
            .map_err(|source| ServeError::Backing { path: backing.to_path_buf(), source })?,
    );
    let cache_dev: Arc<dyn BlockDev> = Arc::new(
        create(&tmp, DEFAULT_CACHE_SIZE)
            .map_err(|e| ServeError::CacheUnusable { path: tmp.clone(), reason: e.to_string() })?,
    );
    let set = crate::cache::format(&cache_dev, &[backing_dev], FormatOptions::default())
        .map_err(|source| ServeError::Cache { path: cache.to_path_buf(), source })?;
    std::fs::rename(&tmp, cache).map_err(|e| ServeError::CacheUnusable {
        path: cache.to_path_buf(),
        reason: format!("cannot rename {} into place: {e}", tmp.display()),
    })?;
    log::info!("formatted cache set {set}: {} caches {}", cache.display(), backing.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{ServeOptions, build_exports};

    #[test]
    fn creates_and_formats_the_default_pair_sparse_and_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("nested").join("data");
        let opts = ServeOptions { data_dir: data_dir.clone(), size: Some(64 << 20), ..Default::default() };
        let prepared = build_exports(&opts).unwrap();
        let (exports, locks, set) = prepared.into_parts();
        assert_eq!(exports.len(), 1);
        assert_eq!(exports[0].name, "");
        // The backing superblock takes the first 8 KiB of the backing file.
        assert_eq!(exports[0].dev.len(), (64 << 20) - crate::format::BACKING_DATA_OFFSET_BYTES);
        let set = set.expect("the default pair is cached");
        assert_eq!(set.devices()[0].mode(), DEFAULT_CACHED_MODE);
        for (name, size) in [(DEFAULT_BACKING_FILE, 64 << 20), (DEFAULT_CACHE_FILE, DEFAULT_CACHE_SIZE)] {
            let meta = std::fs::metadata(data_dir.join(name)).unwrap();
            assert_eq!(meta.len(), size, "{name}");
            use std::os::unix::fs::MetadataExt;
            assert!(meta.blocks() * 512 < size / 2, "{name} must be created sparse");
        }
        // Unaligned writes work through the cached export (the engine takes whole sectors).
        exports[0].dev.write_at(&[0x5a; 700], 4097).unwrap();
        exports[0].dev.sync().unwrap();
        drop(exports);
        set.close().unwrap();
        drop(locks);
        // A second start opens the same pair and keeps what was written.
        let (again, _locks, set) = build_exports(&opts).unwrap().into_parts();
        assert_eq!(set.as_ref().unwrap().recovery().replayed_entries, 0, "a clean close replays nothing");
        let mut buf = [0; 702];
        again[0].dev.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf[0], 0);
        assert_eq!(buf[1..701], [0x5a; 700]);
        assert_eq!(buf[701], 0);
    }

    #[test]
    fn a_half_present_default_pair_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DEFAULT_BACKING_FILE), vec![3u8; 1 << 20]).unwrap();
        let opts = ServeOptions { data_dir: dir.path().to_path_buf(), ..Default::default() };
        let err = build_exports(&opts).unwrap_err();
        assert!(err.to_string().contains("serve --backing"), "{err}");
        assert!(!dir.path().join(DEFAULT_CACHE_FILE).exists());
        assert_eq!(std::fs::read(dir.path().join(DEFAULT_BACKING_FILE)).unwrap(), vec![3u8; 1 << 20]);
    }
}
