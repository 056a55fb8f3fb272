//! Building the NBD exports `ubcache serve` serves: pairing export names with backing devices,
//! opening them (local files, block devices or remote NBD exports), and serving each either
//! alone (a passthrough) or through the cache set.

use super::defaults::{
    CacheChoice, DEFAULT_BACKING_FILE, DEFAULT_BACKING_SIZE, DEFAULT_CACHED_MODE, ensure_default_pair,
};
use super::{BackingLock, ServeError, ServeOptions, cache_choice, validate};
use crate::cache::{CacheConfig, CacheSet, CachedDev, RecoveryReport};
use crate::dev::{BlockDev, DevError, FileDev, FileDevOptions, OffsetDev, SECTOR_SIZE};
use crate::format::{BackingState, BackingSuperblock};
use crate::nbd::Export;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One export to build: its name and its backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub backing: PathBuf,
    /// The backing path is the default file in the data directory (created when missing).
    pub is_default_file: bool,
}

/// Pairs `--export` names with `--backing` paths, in order. One backing may go unnamed (the
/// default export `""`); several need a name each, all different, on different files: two
/// exports over one file would be two unsynchronised views of one disk (and, once cached, two
/// caches of it).
pub fn export_specs(opts: &ServeOptions) -> Result<Vec<ExportSpec>, ServeError> {
    let specs: Vec<ExportSpec> = if opts.backing.is_empty() {
        let name = match opts.export_names.as_slice() {
            [] => String::new(),
            [name] => name.clone(),
            _ => {
                return Err(ServeError::Usage(
                    "several --export names need one --backing each (in the same order)".into(),
                ));
            }
        };
        vec![ExportSpec { name, backing: opts.data_dir.join(DEFAULT_BACKING_FILE), is_default_file: true }]
    } else {
        let names = match (opts.backing.len(), opts.export_names.len()) {
            (1, 0) => vec![String::new()],
            (backings, names) if backings == names => opts.export_names.clone(),
            (backings, names) => {
                return Err(ServeError::Usage(format!(
                    "{backings} --backing but {names} --export: with several backing files, name each \
                     export with --export, in the same order"
                )));
            }
        };
        names
            .into_iter()
            .zip(&opts.backing)
            .map(|(name, backing)| ExportSpec { name, backing: backing.clone(), is_default_file: false })
            .collect()
    };
    for (i, spec) in specs.iter().enumerate() {
        if let Some(other) = specs[..i].iter().find(|o| o.name == spec.name) {
            return Err(ServeError::Usage(format!(
                "export name {:?} is used twice ({} and {})",
                spec.name,
                other.backing.display(),
                spec.backing.display()
            )));
        }
        if let Some(other) = specs[..i].iter().find(|o| same_file(&o.backing, &spec.backing)) {
            return Err(ServeError::Usage(format!(
                "exports {:?} and {:?} would share the backing file {}",
                other.name,
                spec.name,
                spec.backing.display()
            )));
        }
    }
    Ok(specs)
}

/// Whether two paths name the same file (following links), or are equal when they do not exist.
pub(super) fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Opens the backing device of `spec`, creating it (sparse) when it is the default file or
/// `--size` was given. An existing file whose size differs from `--size` is refused rather than
/// resized: growing or shrinking a disk under a file system is never what a typo should do.
pub fn open_backing(spec: &ExportSpec, opts: &ServeOptions) -> Result<FileDev, ServeError> {
    let path = spec.backing.clone();
    let exists = match std::fs::metadata(&path) {
        Ok(meta) => {
            let file_type = meta.file_type();
            let is_block_dev = {
                use std::os::unix::fs::FileTypeExt;
                file_type.is_block_device()
            };
            if !file_type.is_file() && !is_block_dev {
                return Err(ServeError::BackingUnusable {
                    path,
                    reason: "not a regular file or block device".into(),
                });
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(ServeError::BackingIo { path, op: "stat", source: e });
        }
    };
    let create_with_size = if exists {
        None
    } else if spec.is_default_file || opts.size.is_some() {
        if spec.is_default_file {
            std::fs::create_dir_all(&opts.data_dir)
                .map_err(|source| ServeError::DataDir { path: opts.data_dir.clone(), source })?;
        }
        Some(opts.size.unwrap_or(DEFAULT_BACKING_SIZE))
    } else {
        return Err(ServeError::BackingMissing {
            path,
            default: opts.data_dir.join(DEFAULT_BACKING_FILE).display().to_string(),
        });
    };
    if let Some(size) = create_with_size {
        log::info!("creating backing file {} ({size} bytes, sparse)", path.display());
    }
    let dev = FileDev::open(
        &path,
        &FileDevOptions { read_only: opts.read_only, create_with_size, direct: opts.direct },
    )
    .map_err(|source| match source {
        DevError::Io { op, source, .. } => ServeError::BackingIo { path: path.clone(), op, source },
        source => ServeError::Backing { path: path.clone(), source },
    })?;
    if dev.is_empty() {
        return Err(ServeError::BackingUnusable { path, reason: "it is empty (0 bytes)".into() });
    }
    match opts.size {
        Some(size) if size != dev.len() => Err(ServeError::BackingUnusable {
            path,
            reason: format!(
                "it has {} bytes but --size asks for {size}; refusing to resize an existing disk",
                dev.len()
            ),
        }),
        _ => Ok(dev),
    }
}

/// Whether a `--backing` argument is an NBD URI (a remote backing device) rather than a path.
#[must_use]
pub fn is_nbd_uri(backing: &Path) -> bool {
    backing.to_str().is_some_and(|s| s.starts_with("nbd://") || s.starts_with("nbd+unix://"))
}

/// Opens the backing device of `spec`: a local file or block device (locked, see
/// [`BackingLock`]), or a remote NBD export through [`crate::nbd::NbdDev`] (no lock: the remote
/// server owns it).
pub fn open_backing_dev(
    spec: &ExportSpec,
    opts: &ServeOptions,
) -> Result<(Arc<dyn BlockDev>, Option<BackingLock>), ServeError> {
    if is_nbd_uri(&spec.backing) {
        let uri = spec.backing.to_string_lossy();
        let dev = crate::nbd::NbdDev::connect(&uri)
            .map_err(|source| ServeError::Backing { path: spec.backing.clone(), source })?;
        if dev.is_empty() {
            return Err(ServeError::BackingUnusable {
                path: spec.backing.clone(),
                reason: "the export is empty".into(),
            });
        }
        return Ok((Arc::new(dev), None));
    }
    let dev = open_backing(spec, opts)?;
    let lock = BackingLock::acquire(dev.path(), opts.read_only)?;
    Ok((Arc::new(dev), Some(lock)))
}

/// The exports to serve, with the locks that keep other ubcache processes off their files for
/// as long as this value lives, and the cache set behind them (if any).
#[derive(Debug)]
pub struct PreparedExports {
    pub exports: Vec<Export>,
    locks: Vec<BackingLock>,
    /// The open cache set; [`CacheSet::close`] it after serving so the next start replays nothing.
    pub cache_set: Option<CacheSet>,
    /// The cached devices by export name (for the control socket).
    pub cached: Vec<(String, Arc<CachedDev>)>,
}

impl PreparedExports {
    /// Hands the exports to the server; the returned locks must outlive serving, and the cache
    /// set must be closed after it.
    #[must_use]
    pub fn into_parts(self) -> (Vec<Export>, Vec<BackingLock>, Option<CacheSet>) {
        (self.exports, self.locks, self.cache_set)
    }
}

/// Builds the exports the options describe. Everything that needs no file is checked before
/// the first file is created, so a usage error leaves nothing behind.
pub fn build_exports(opts: &ServeOptions) -> Result<PreparedExports, ServeError> {
    validate(opts)?;
    let specs = export_specs(opts)?;
    match cache_choice(opts) {
        None => build_passthrough(opts, &specs),
        Some(cache) => build_cached(opts, &specs, &cache),
    }
}

/// The file name only: export descriptions go to every client, the server's directory layout
/// need not.
fn file_name(path: &Path) -> String {
    path.file_name().unwrap_or(path.as_os_str()).to_string_lossy().into_owned()
}

fn build_passthrough(opts: &ServeOptions, specs: &[ExportSpec]) -> Result<PreparedExports, ServeError> {
    let mut exports = Vec::with_capacity(specs.len());
    let mut locks = Vec::with_capacity(specs.len());
    for spec in specs {
        let (dev, lock) = open_backing_dev(spec, opts)?;
        locks.extend(lock);
        let path = spec.backing.clone();
        let sb = crate::format::read_backing_superblock(dev.as_ref()).map_err(|e| {
            ServeError::BackingUnusable {
                path: path.clone(),
                reason: format!(
                    "it starts with a ubcache backing superblock that does not read back ({e}); refusing \
                 to guess where its data starts"
                ),
            }
        })?;
        let (served, kind): (Arc<dyn BlockDev>, String) = match sb {
            None => (dev, "raw image".to_string()),
            Some(sb) => {
                refuse_without_cache(&path, &sb, opts)?;
                let window = OffsetDev::new(dev, sb.data_offset_bytes)
                    .map_err(|source| ServeError::Backing { path: path.clone(), source })?;
                (
                    Arc::new(window),
                    format!("data offset {} bytes, state {:?}", sb.data_offset_bytes, sb.state),
                )
            }
        };
        log::info!(
            "export {:?}: {} ({} bytes, mode none, {kind}{})",
            spec.name,
            path.display(),
            served.len(),
            if opts.read_only { ", read-only" } else { "" }
        );
        exports.push(Export {
            name: spec.name.clone(),
            description: format!("ubcache passthrough of {} (mode none)", file_name(&path)),
            dev: served,
            read_only: opts.read_only,
        });
    }
    Ok(PreparedExports { exports, locks, cache_set: None, cached: Vec::new() })
}

/// A backing device with a superblock served without its cache: refused when that loses data
/// (Dirty: the cache holds writes it lacks) or makes the cache stale (attached and writable:
/// writes here would not invalidate what the cache holds, which would be served again once the
/// cache is back). `--force` overrides, loudly.
fn refuse_without_cache(path: &Path, sb: &BackingSuperblock, opts: &ServeOptions) -> Result<(), ServeError> {
    let problem = match sb.state {
        BackingState::Dirty => Some(format!(
            "its superblock says Dirty: cache set {} holds writes this device does not have. Serve it \
             with that cache (--cache PATH), or pass --force to serve it alone and LOSE those writes",
            sb.set_uuid
        )),
        BackingState::Clean if !sb.set_uuid.is_nil() && !opts.read_only => Some(format!(
            "it is attached to cache set {}: writing it without the cache would leave stale data in \
             the cache. Serve it with its cache (--cache PATH), read-only (--read-only), or pass \
             --force (then reformat or never reuse that cache)",
            sb.set_uuid
        )),
        BackingState::Clean | BackingState::Detached => None,
    };
    let Some(problem) = problem else { return Ok(()) };
    if !opts.force {
        return Err(ServeError::Refused { path: path.to_path_buf(), reason: problem });
    }
    let warning =
        format!("WARNING: --force: serving {} without its cache although {problem}", path.display());
    // On stderr directly as well as in the log: a data-loss warning must not depend on RUST_LOG.
    eprintln!("ubcache: {warning}");
    log::warn!("{warning}");
    Ok(())
}

/// Opens an existing cache file (created only by [`ensure_default_pair`] or `ubcache format`).
fn open_cache_file(path: &Path, direct: bool, read_only: bool) -> Result<FileDev, ServeError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(ServeError::CacheUnusable {
                path: path.to_path_buf(),
                reason: "it is a directory".into(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ServeError::CacheUnusable {
                path: path.to_path_buf(),
                reason: "it does not exist; create and format it with `ubcache format --cache PATH \
                         --backing PATH --size 256M`"
                    .into(),
            });
        }
        Err(e) => {
            return Err(ServeError::CacheUnusable {
                path: path.to_path_buf(),
                reason: format!("cannot stat it: {e}"),
            });
        }
    }
    FileDev::open(path, &FileDevOptions { read_only, create_with_size: None, direct })
        .map_err(|e| ServeError::CacheUnusable { path: path.to_path_buf(), reason: e.to_string() })
}

/// One line for the log: what recovery found when the cache set was opened.
#[must_use]
pub fn recovery_line(cache: &Path, set: &CacheSet, report: &RecoveryReport) -> String {
    format!(
        "cache set {} ({}): recovery replayed {} journal entries{}, {} keys, {} dirty bytes, {} btree nodes",
        set.uuid(),
        cache.display(),
        report.replayed_entries,
        if report.torn_tail { " (dropped a torn last record)" } else { "" },
        report.keys,
        report.dirty_sectors * SECTOR_SIZE,
        report.nodes
    )
}

fn build_cached(
    opts: &ServeOptions,
    specs: &[ExportSpec],
    cache: &CacheChoice,
) -> Result<PreparedExports, ServeError> {
    if cache.is_default
        && let Some(spec) = specs.first()
    {
        ensure_default_pair(opts, &spec.backing, &cache.path)?;
    }
    // The engine writes at open (recovery ends with a checkpoint), so files are opened writable
    // even for a read-only export; `read_only` then only refuses the clients' writes.
    let cache_dev = open_cache_file(&cache.path, opts.direct, false)?;
    let mut locks = vec![BackingLock::acquire_cache(&cache.path, false)?];
    if let Err(e) = crate::format::read_cache_superblock(&cache_dev) {
        return Err(ServeError::CacheUnusable {
            path: cache.path.clone(),
            reason: format!(
                "it is not a formatted ubcache cache ({e}); format it with `ubcache format --cache \
                 PATH --backing PATH`"
            ),
        });
    }
    let mut backings: Vec<Arc<dyn BlockDev>> = Vec::with_capacity(specs.len());
    let writable = ServeOptions { read_only: false, ..opts.clone() };
    for spec in specs {
        let (dev, lock) = open_backing_dev(spec, &writable)?;
        locks.extend(lock);
        match crate::format::read_backing_superblock(dev.as_ref()) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(ServeError::Refused {
                    path: spec.backing.clone(),
                    reason: format!(
                        "it is a raw image (no ubcache backing superblock), so it cannot be cached. \
                         Either serve it alone (`ubcache serve --backing {}`, mode none), or attach it \
                         with `ubcache format --cache {} --backing {}`: that writes an 8 KiB header at \
                         its start and the export then begins 8 KiB into the device (like bcache's \
                         make-bcache -B), so do it on a new or empty device",
                        spec.backing.display(),
                        cache.path.display(),
                        spec.backing.display()
                    ),
                });
            }
            Err(e) => {
                return Err(ServeError::BackingUnusable {
                    path: spec.backing.clone(),
                    reason: format!("its ubcache backing superblock does not read back: {e}"),
                });
            }
        }
        backings.push(dev);
    }
    // Without --mode each device opens in the mode its superblock stores (the last set-mode);
    // an explicit --mode wins and is stored. Congestion bypass with bcache's thresholds.
    let cfg = CacheConfig {
        mode: opts.mode.unwrap_or(DEFAULT_CACHED_MODE),
        stored_mode: opts.mode.is_none(),
        congested_read_threshold_us: crate::ctl::knobs::DEFAULT_CONGESTED_READ_US,
        congested_write_threshold_us: crate::ctl::knobs::DEFAULT_CONGESTED_WRITE_US,
        ..CacheConfig::default()
    };
    let cache_dev: Arc<dyn BlockDev> = Arc::new(cache_dev);
    let set = CacheSet::open(cache_dev, &backings, cfg)
        .map_err(|source| ServeError::Cache { path: cache.path.clone(), source })?;
    log::info!("{}", recovery_line(&cache.path, &set, set.recovery()));
    let devices = set.devices();
    let mut exports = Vec::with_capacity(specs.len());
    let mut cached = Vec::with_capacity(specs.len());
    // `CacheSet::open` returns the devices in the order the backings were given.
    for (spec, dev) in specs.iter().zip(devices) {
        let dev = Arc::new(dev);
        let mode = dev.mode();
        cached.push((spec.name.clone(), Arc::clone(&dev)));
        // A device detached before this start (its superblock says Detached) is served straight
        // from the device until `ubcache attach` binds it to this cache set.
        let detached = if dev.is_detached() { ", detached: served alone until `ubcache attach`" } else { "" };
        log::info!(
            "export {:?}: {} cached by {} ({} bytes, mode {mode}, dev id {}{detached}{})",
            spec.name,
            spec.backing.display(),
            cache.path.display(),
            dev.len(),
            dev.dev_id(),
            if opts.read_only { ", read-only" } else { "" }
        );
        exports.push(Export {
            name: spec.name.clone(),
            description: format!(
                "ubcache: {} cached by {} (mode {mode}{})",
                file_name(&spec.backing),
                file_name(&cache.path),
                if dev.is_detached() { ", detached" } else { "" }
            ),
            dev,
            read_only: opts.read_only,
        });
    }
    Ok(PreparedExports { exports, locks, cache_set: Some(set), cached })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{CacheMode, DEFAULT_BACKING_FILE, DEFAULT_CACHE_FILE, ServeError};

    #[test]
    fn a_raw_backing_with_a_cache_is_refused_with_a_format_hint() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("d");
        let opts = ServeOptions { data_dir: data_dir.clone(), size: Some(16 << 20), ..Default::default() };
        drop(build_exports(&opts).unwrap());
        let raw = dir.path().join("raw.img");
        std::fs::write(&raw, vec![1u8; 1 << 20]).unwrap();
        let opts = ServeOptions {
            cache: Some(data_dir.join(DEFAULT_CACHE_FILE)),
            backing: vec![raw.clone()],
            ..Default::default()
        };
        let err = build_exports(&opts).unwrap_err();
        assert!(err.to_string().contains("raw image") && err.to_string().contains("ubcache format"), "{err}");
        assert_eq!(std::fs::read(&raw).unwrap(), vec![1u8; 1 << 20], "nothing written to the raw image");
    }

    #[test]
    fn an_attached_backing_alone_is_refused_unless_read_only_or_forced() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("d");
        let opts = ServeOptions { data_dir: data_dir.clone(), size: Some(16 << 20), ..Default::default() };
        drop(build_exports(&opts).unwrap());
        let backing = data_dir.join(DEFAULT_BACKING_FILE);
        let alone = ServeOptions { backing: vec![backing], ..Default::default() };
        let err = build_exports(&alone).unwrap_err();
        assert!(err.to_string().contains("attached to cache set"), "{err}");
        let ro = build_exports(&ServeOptions { read_only: true, ..alone.clone() }).unwrap();
        assert_eq!(ro.exports[0].dev.len(), (16 << 20) - 8192, "served from the data offset");
        drop(ro);
        assert!(build_exports(&ServeOptions { force: true, ..alone }).is_ok());
    }

    #[test]
    fn a_dirty_backing_alone_is_refused_even_read_only_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("d");
        let cached = ServeOptions {
            data_dir: data_dir.clone(),
            size: Some(16 << 20),
            mode: Some(CacheMode::Writeback),
            ..Default::default()
        };
        let (exports, locks, set) = build_exports(&cached).unwrap().into_parts();
        exports[0].dev.write_at(&[0xd1; 4096], 0).unwrap();
        exports[0].dev.sync().unwrap();
        set.unwrap().close().unwrap();
        drop((exports, locks));
        let backing = data_dir.join(DEFAULT_BACKING_FILE);
        for read_only in [false, true] {
            let alone = ServeOptions { backing: vec![backing.clone()], read_only, ..Default::default() };
            let err = build_exports(&alone).unwrap_err();
            assert!(err.to_string().contains("Dirty") && err.to_string().contains("--force"), "{err}");
        }
        let forced = ServeOptions { backing: vec![backing], force: true, ..Default::default() };
        let exports = build_exports(&forced).unwrap().exports;
        let mut buf = [0u8; 4096];
        exports[0].dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 4096], "the write lives only in the cache: exactly what --force loses");
        drop(exports);
        // With its cache the data is there.
        let (exports, _locks, _set) = build_exports(&cached).unwrap().into_parts();
        exports[0].dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0xd1; 4096]);
    }

    #[test]
    fn explicit_backing_must_exist_unless_size_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.img");
        let opts = ServeOptions { backing: vec![path.clone()], ..Default::default() };
        let err = build_exports(&opts).unwrap_err();
        assert!(matches!(err, ServeError::BackingMissing { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!path.exists());

        let opts = ServeOptions { backing: vec![path.clone()], size: Some(1 << 20), ..Default::default() };
        assert_eq!(build_exports(&opts).unwrap().exports[0].dev.len(), 1 << 20);
        let opts = ServeOptions { backing: vec![path], size: Some(2 << 20), ..Default::default() };
        let err = build_exports(&opts).unwrap_err();
        assert!(err.to_string().contains("refusing to resize"), "{err}");
    }

    #[test]
    fn pairs_export_names_with_backing_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        std::fs::write(&a, vec![1u8; 4096]).unwrap();
        std::fs::write(&b, vec![2u8; 8192]).unwrap();
        let opts = ServeOptions {
            backing: vec![a.clone(), b.clone()],
            export_names: vec!["first".into(), "second".into()],
            ..Default::default()
        };
        let exports = build_exports(&opts).unwrap().exports;
        let summary: Vec<(&str, u64)> = exports.iter().map(|e| (e.name.as_str(), e.dev.len())).collect();
        assert_eq!(summary, [("first", 4096), ("second", 8192)]);

        let unnamed = ServeOptions { backing: vec![a.clone(), b.clone()], ..Default::default() };
        assert!(export_specs(&unnamed).unwrap_err().to_string().contains("name each export"));
        let twice = ServeOptions {
            backing: vec![a.clone(), b],
            export_names: vec!["x".into(), "x".into()],
            ..Default::default()
        };
        assert!(export_specs(&twice).unwrap_err().to_string().contains("used twice"));
        let same_file = ServeOptions {
            backing: vec![a, dir.path().join(".").join("a.img")],
            export_names: vec!["x".into(), "y".into()],
            ..Default::default()
        };
        assert!(export_specs(&same_file).unwrap_err().to_string().contains("share the backing file"));
        let names_without_files = ServeOptions {
            export_names: vec!["x".into(), "y".into()],
            data_dir: dir.path().join("d"),
            ..Default::default()
        };
        assert_eq!(build_exports(&names_without_files).unwrap_err().exit_code(), 2);
        assert!(!dir.path().join("d").exists(), "a usage error creates nothing");
    }

    #[test]
    fn refuses_directories_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ServeOptions { backing: vec![dir.path().to_path_buf()], ..Default::default() };
        assert!(build_exports(&opts).unwrap_err().to_string().contains("not a regular file"));
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let opts = ServeOptions { backing: vec![empty], ..Default::default() };
        assert!(build_exports(&opts).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn read_only_export_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.img");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let opts = ServeOptions { backing: vec![path], read_only: true, ..Default::default() };
        let exports = build_exports(&opts).unwrap().exports;
        assert!(exports[0].read_only);
        assert!(matches!(exports[0].dev.write_at(&[0; 512], 0), Err(DevError::ReadOnly)));
    }
}
