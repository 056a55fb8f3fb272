//! `ubcache format`, `ubcache show` and `ubcache check`: the offline tools around a cache set.
//!
//! They take the same `flock`s as `ubcache serve` (exclusive for format, shared for show and
//! check), so none of them runs on files a server is using: an offline check of a live cache
//! would read a state that is changing under it.

use super::{BackingLock, CheckArgs, FormatArgs, ServeError, ShowArgs, print_json, print_stdout};
use crate::cache::FormatOptions;
use crate::check::Report;
use crate::dev::{BlockDev, FileDev, FileDevOptions, SECTOR_SIZE};
use crate::format::{self, BackingState, CACHE_SB_MAGIC, SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// What `ubcache format` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct FormatRequest {
    pub cache: PathBuf,
    pub backing: Vec<PathBuf>,
    /// Bucket size in bytes; `None`: the engine's default (512 KiB).
    pub bucket_bytes: Option<u64>,
    /// Btree node size in bytes; `None`: the engine's default (256 KiB, at most the bucket).
    pub node_bytes: Option<u64>,
    /// Create the cache file with this size if it is missing (checked against an existing one).
    pub size: Option<u64>,
    /// Overwrite an existing ubcache cache or a cache device with data in its first MiB,
    /// re-attach backing devices of another set, and overwrite non-zero bytes at the start of a
    /// raw backing device.
    pub force: bool,
}

/// What `ubcache format` did.
#[derive(Debug, Clone, Serialize)]
pub struct FormatSummary {
    pub set_uuid: String,
    pub cache_bytes: u64,
    pub bucket_bytes: u64,
    pub node_bytes: u64,
    pub nbuckets: u64,
    /// (path, exported bytes) per backing device, in dev-id order.
    pub backing: Vec<(PathBuf, u64)>,
}

fn unusable(path: &Path, reason: impl Into<String>) -> ServeError {
    ServeError::CacheUnusable { path: path.to_path_buf(), reason: reason.into() }
}

fn refused(path: &Path, reason: impl Into<String>) -> ServeError {
    ServeError::Refused { path: path.to_path_buf(), reason: reason.into() }
}

/// Whether either cache superblock slot starts with the cache magic: the device already is (or
/// was) a ubcache cache, even if the rest of the superblock no longer reads back.
fn has_cache_magic(dev: &dyn BlockDev) -> Result<bool, crate::dev::DevError> {
    for offset in [SB_A_OFFSET_BYTES, SB_B_OFFSET_BYTES] {
        if dev.len() < offset + 8 {
            continue;
        }
        let mut magic = [0u8; 8];
        dev.read_at(&mut magic, offset)?;
        if magic == CACHE_SB_MAGIC {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Formats a cache set: cache superblocks, journal, empty btree on the cache device, and a
/// backing superblock (8 KiB header, state Clean) at the start of every backing device.
///
/// Refuses, unless `force`: a cache device that already carries a ubcache superblock, or that is
/// not a ubcache cache and has non-zero bytes in its first MiB; a backing
/// device attached to a cache set (its Dirty data, if any, would be lost); a raw backing device
/// whose first 8 KiB are not all zero (the header would overwrite them, and the export starts
/// 8 KiB later, so existing contents would appear shifted).
pub fn format_cache(req: &FormatRequest) -> Result<FormatSummary, ServeError> {
    if req.backing.iter().any(|b| super::exports::same_file(b, &req.cache)) {
        return Err(ServeError::Usage("the cache file is also given as a backing device".into()));
    }
    for (i, b) in req.backing.iter().enumerate() {
        if req.backing[..i].iter().any(|o| super::exports::same_file(o, b)) {
            return Err(ServeError::Usage(format!("backing device {} is given twice", b.display())));
        }
    }
    let opts = FormatOptions {
        bucket_bytes: req.bucket_bytes.unwrap_or(FormatOptions::default().bucket_bytes),
        node_bytes: req
            .node_bytes
            .unwrap_or_else(|| FormatOptions::default().node_bytes.min(req.bucket_bytes.unwrap_or(u64::MAX))),
    };
    let geometry_check = |len: u64| {
        format::Geometry::compute(len, opts.bucket_bytes, opts.node_bytes)
            .map(|_| ())
            .map_err(|e| ServeError::Usage(format!("cache geometry: {e}")))
    };
    let exists = req.cache.exists();
    // A new file: check the geometry before creating anything.
    if !exists && let Some(size) = req.size {
        geometry_check(size)?;
    }
    if !exists && req.size.is_none() {
        return Err(unusable(&req.cache, "it does not exist; pass --size (like --size 256M) to create it"));
    }
    let cache = FileDev::open(
        &req.cache,
        &FileDevOptions {
            read_only: false,
            create_with_size: (!exists).then_some(req.size).flatten(),
            direct: false,
        },
    )
    .map_err(|e| unusable(&req.cache, e.to_string()))?;
    if let Some(size) = req.size
        && size != cache.len()
    {
        return Err(unusable(
            &req.cache,
            format!("it has {} bytes but --size asks for {size}; refusing to resize it", cache.len()),
        ));
    }
    let _cache_lock = BackingLock::acquire_cache(&req.cache, false)?;
    if !req.force && has_cache_magic(&cache).map_err(|e| unusable(&req.cache, e.to_string()))? {
        let what = match format::read_cache_superblock(&cache) {
            Ok(read) => {
                format!("cache set {} with {} backing device(s)", read.sb.set_uuid, read.sb.backing.len())
            }
            Err(e) => format!("a ubcache cache whose superblock does not read back ({e})"),
        };
        return Err(refused(
            &req.cache,
            format!("it already holds {what}; pass --force to format over it (its cached data is lost)"),
        ));
    }
    if exists && !has_cache_magic(&cache).map_err(|e| unusable(&req.cache, e.to_string()))? {
        check_cache_head_for_format(&req.cache, &cache, req.force)?;
    }
    geometry_check(cache.len())?;
    let mut backings: Vec<Arc<dyn BlockDev>> = Vec::with_capacity(req.backing.len());
    let mut locks = Vec::with_capacity(req.backing.len());
    for path in &req.backing {
        let dev: Arc<dyn BlockDev> = if super::is_nbd_uri(path) {
            Arc::new(
                crate::nbd::NbdDev::connect(&path.to_string_lossy())
                    .map_err(|source| ServeError::Backing { path: path.clone(), source })?,
            )
        } else {
            let dev = FileDev::open(path, &FileDevOptions::default())
                .map_err(|source| ServeError::Backing { path: path.clone(), source })?;
            locks.push(BackingLock::acquire(path, false)?);
            Arc::new(dev)
        };
        if dev.len() <= format::BACKING_DATA_OFFSET_BYTES {
            return Err(ServeError::BackingUnusable {
                path: path.clone(),
                reason: format!(
                    "{} bytes is too small: the backing superblock alone takes {}",
                    dev.len(),
                    format::BACKING_DATA_OFFSET_BYTES
                ),
            });
        }
        check_backing_for_format(path, dev.as_ref(), req.force)?;
        backings.push(dev);
    }
    let cache: Arc<dyn BlockDev> = Arc::new(cache);
    let set_uuid = crate::cache::format(&cache, &backings, opts)
        .map_err(|source| ServeError::Cache { path: req.cache.clone(), source })?;
    let read = format::read_cache_superblock(cache.as_ref())
        .map_err(|e| unusable(&req.cache, format!("the new superblock does not read back: {e}")))?;
    let g = read.sb.geometry;
    Ok(FormatSummary {
        set_uuid: set_uuid.to_string(),
        cache_bytes: cache.len(),
        bucket_bytes: g.bucket_bytes(),
        node_bytes: g.node_bytes(),
        nbuckets: g.nbuckets,
        backing: req
            .backing
            .iter()
            .zip(&backings)
            .map(|(p, d)| {
                (p.clone(), (d.len() - format::BACKING_DATA_OFFSET_BYTES) / SECTOR_SIZE * SECTOR_SIZE)
            })
            .collect(),
    })
}

/// How much of an existing cache device must be zero (when it is not a ubcache cache) before
/// `format` overwrites it without `--force`: file system, partition table and LVM signatures all
/// live in the first MiB, so a device with data there is almost certainly someone's data.
const CACHE_HEAD_CHECK_BYTES: u64 = 1 << 20;

/// Refuses (unless `force`) to format a cache device that is not a ubcache cache and has data in
/// its first MiB: formatting writes superblocks, journal and btree over it.
fn check_cache_head_for_format(path: &Path, dev: &dyn BlockDev, force: bool) -> Result<(), ServeError> {
    let mut head = vec![0u8; CACHE_HEAD_CHECK_BYTES.min(dev.len()) as usize];
    dev.read_at(&mut head, 0).map_err(|e| unusable(path, e.to_string()))?;
    let Some(first) = head.iter().position(|&b| b != 0) else {
        return Ok(());
    };
    let problem = format!(
        "it is not a ubcache cache and holds data (a non-zero byte at offset {first}) that formatting \
         would destroy"
    );
    if force {
        eprintln!("ubcache: WARNING: --force: formatting {} although {problem}", path.display());
        return Ok(());
    }
    Err(refused(path, format!("{problem}; pass --force to format it anyway")))
}

fn check_backing_for_format(path: &Path, dev: &dyn BlockDev, force: bool) -> Result<(), ServeError> {
    let problem = match format::read_backing_superblock(dev) {
        Ok(Some(sb)) => match sb.state {
            BackingState::Dirty => Some(format!(
                "it is attached to cache set {} and Dirty: that cache holds writes it lacks, which \
                 formatting loses. Serve it with its cache and stop it after writeback, or detach it first",
                sb.set_uuid
            )),
            BackingState::Clean if !sb.set_uuid.is_nil() => Some(format!(
                "it is attached to cache set {}; formatting a new set over it orphans that one",
                sb.set_uuid
            )),
            BackingState::Clean | BackingState::Detached => None,
        },
        Ok(None) => {
            let mut head = vec![0u8; format::BACKING_DATA_OFFSET_BYTES as usize];
            dev.read_at(&mut head, 0)
                .map_err(|source| ServeError::Backing { path: path.to_path_buf(), source })?;
            head.iter().any(|&b| b != 0).then(|| {
                "it is a raw image with data in its first 8 KiB: the backing superblock would \
                 overwrite that, and the export starts 8 KiB into the device, so its contents would \
                 appear shifted. Use a new (or zeroed) device"
                    .to_string()
            })
        }
        Err(e) => Some(format!("it has a ubcache backing superblock that does not read back ({e})")),
    };
    match problem {
        None => Ok(()),
        Some(p) if force => {
            eprintln!("ubcache: WARNING: --force: formatting {} although {p}", path.display());
            Ok(())
        }
        Some(p) => Err(refused(path, format!("{p}; pass --force to format it anyway"))),
    }
}

/// Opens a file read-only under a shared lock (refused while a server uses it).
fn open_for_reading(path: &Path, cache: bool) -> Result<(FileDev, BackingLock), ServeError> {
    let dev = FileDev::open(path, &FileDevOptions { read_only: true, ..FileDevOptions::default() });
    let dev = match (dev, cache) {
        (Ok(d), _) => d,
        (Err(e), true) => return Err(unusable(path, e.to_string())),
        (Err(source), false) => return Err(ServeError::Backing { path: path.to_path_buf(), source }),
    };
    let lock =
        if cache { BackingLock::acquire_cache(path, true)? } else { BackingLock::acquire(path, true)? };
    Ok((dev, lock))
}

/// One backing device as `ubcache show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ShowBacking {
    pub dev_id: Option<u32>,
    pub uuid: String,
    pub path: Option<PathBuf>,
    pub size_bytes: u64,
    pub data_offset_bytes: u64,
    pub export_bytes: u64,
    /// From the device's own superblock (only when its path was given).
    pub state: Option<String>,
    pub set_uuid: Option<String>,
    pub dirty_bytes: Option<u64>,
}

/// Everything `ubcache show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ShowReport {
    pub cache: Option<ShowCache>,
    pub backing: Vec<ShowBacking>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShowCache {
    pub path: PathBuf,
    pub set_uuid: String,
    pub dev_uuid: String,
    pub version: String,
    pub superblock_seq: u64,
    pub superblock_copy: String,
    /// The other superblock copy's problem, if it is unreadable.
    pub other_copy_error: Option<String>,
    pub device_bytes: u64,
    pub bucket_bytes: u64,
    pub node_bytes: u64,
    pub nbuckets: u64,
    pub journal_buckets: u64,
    /// `clean` (stopped cleanly: nothing to replay), `needs-recovery` (journal entries to replay
    /// at the next open) or `unreadable` (see `error`).
    pub state: String,
    pub journal_entries_to_replay: Option<u64>,
    pub keys: Option<u64>,
    pub dirty_bytes: Option<u64>,
    pub error: Option<String>,
}

/// `ubcache show`: the cache superblock, geometry, state and registered backing devices (with
/// their own superblocks when their paths are given); or only backing superblocks without
/// `cache`.
pub fn show(cache: Option<&Path>, backing: &[PathBuf]) -> Result<ShowReport, ServeError> {
    if cache.is_none() && backing.is_empty() {
        return Err(ServeError::Usage("show needs --cache PATH and/or --backing PATH".into()));
    }
    let mut locks = Vec::new();
    let mut backing_devs: Vec<(PathBuf, Arc<dyn BlockDev>)> = Vec::new();
    for path in backing {
        let (dev, lock) = open_for_reading(path, false)?;
        locks.push(lock);
        backing_devs.push((path.clone(), Arc::new(dev)));
    }
    let mut shown_backing = Vec::new();
    let mut shown_cache = None;
    let mut own_sbs = Vec::new();
    for (path, dev) in &backing_devs {
        let sb = format::read_backing_superblock(dev.as_ref()).map_err(|e| ServeError::BackingUnusable {
            path: path.clone(),
            reason: format!("its backing superblock does not read back: {e}"),
        })?;
        own_sbs.push((path.clone(), sb));
    }
    if let Some(cache_path) = cache {
        let (dev, lock) = open_for_reading(cache_path, true)?;
        locks.push(lock);
        let dev: Arc<dyn BlockDev> = Arc::new(dev);
        let read = format::read_cache_superblock(dev.as_ref())
            .map_err(|e| unusable(cache_path, format!("not a readable ubcache cache: {e}")))?;
        let sb = &read.sb;
        // The journal replay (in memory, read-only) tells the state and the dirty data.
        let devs: Vec<Arc<dyn BlockDev>> = backing_devs.iter().map(|(_, d)| Arc::clone(d)).collect();
        let checked = crate::check::check(&dev, &devs);
        let g = sb.geometry;
        let (state, error) = match &checked {
            Ok(r) if r.journal_entries_replayed == 0 => ("clean", None),
            Ok(_) => ("needs-recovery", None),
            Err(e) => ("unreadable", Some(e.to_string())),
        };
        let report = checked.as_ref().ok();
        shown_cache = Some(ShowCache {
            path: cache_path.to_path_buf(),
            set_uuid: sb.set_uuid.to_string(),
            dev_uuid: sb.dev_uuid.to_string(),
            version: format!("{:?}", sb.version),
            superblock_seq: sb.seq,
            superblock_copy: format!("{:?}", read.copy),
            other_copy_error: read.other_copy_error.as_ref().map(ToString::to_string),
            device_bytes: g.device_bytes(),
            bucket_bytes: g.bucket_bytes(),
            node_bytes: g.node_bytes(),
            nbuckets: g.nbuckets,
            journal_buckets: g.journal.count,
            state: state.into(),
            journal_entries_to_replay: report.map(|r| r.journal_entries_replayed),
            keys: report.map(|r| r.keys),
            dirty_bytes: report.map(|r| r.dirty_sectors * SECTOR_SIZE),
            error,
        });
        for entry in &sb.backing {
            let own = own_sbs.iter().find(|(_, s)| s.as_ref().is_some_and(|s| s.uuid == entry.uuid));
            shown_backing.push(ShowBacking {
                dev_id: Some(entry.dev_id),
                uuid: entry.uuid.to_string(),
                path: own.map(|(p, _)| p.clone()),
                size_bytes: entry.size_bytes,
                data_offset_bytes: entry.data_offset_bytes,
                export_bytes: entry.size_bytes.saturating_sub(entry.data_offset_bytes) / SECTOR_SIZE
                    * SECTOR_SIZE,
                state: own.and_then(|(_, s)| s.as_ref()).map(|s| format!("{:?}", s.state)),
                set_uuid: own.and_then(|(_, s)| s.as_ref()).map(|s| s.set_uuid.to_string()),
                dirty_bytes: report
                    .map(|r| r.dirty_sectors_by_dev.get(&entry.dev_id).copied().unwrap_or(0) * SECTOR_SIZE),
            });
        }
    }
    // Backing devices given but not registered in the cache (or no cache given).
    for (path, sb) in own_sbs {
        if shown_backing.iter().any(|b| b.path.as_ref() == Some(&path)) {
            continue;
        }
        shown_backing.push(match sb {
            Some(sb) => ShowBacking {
                dev_id: None,
                uuid: sb.uuid.to_string(),
                path: Some(path),
                size_bytes: sb.size_bytes,
                data_offset_bytes: sb.data_offset_bytes,
                export_bytes: sb.export_bytes() / SECTOR_SIZE * SECTOR_SIZE,
                state: Some(format!("{:?}", sb.state)),
                set_uuid: Some(sb.set_uuid.to_string()),
                dirty_bytes: None,
            },
            None => ShowBacking {
                dev_id: None,
                uuid: String::new(),
                path: Some(path),
                size_bytes: 0,
                data_offset_bytes: 0,
                export_bytes: 0,
                state: Some("raw (no ubcache superblock)".into()),
                set_uuid: None,
                dirty_bytes: None,
            },
        });
    }
    drop(locks);
    Ok(ShowReport { cache: shown_cache, backing: shown_backing })
}

/// Human-readable `ubcache show` output.
#[must_use]
pub fn show_text(report: &ShowReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let opt = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    if let Some(c) = &report.cache {
        let _ = writeln!(out, "cache {}", c.path.display());
        let _ = writeln!(out, "  set uuid        {}", c.set_uuid);
        let _ = writeln!(out, "  device uuid     {}", c.dev_uuid);
        let _ = writeln!(
            out,
            "  format          {} (superblock seq {}, copy {})",
            c.version, c.superblock_seq, c.superblock_copy
        );
        if let Some(e) = &c.other_copy_error {
            let _ = writeln!(out, "  WARNING         the other superblock copy is unreadable: {e}");
        }
        let _ = writeln!(
            out,
            "  geometry        {} bytes, {} buckets of {} bytes, btree nodes of {} bytes, {} journal buckets",
            c.device_bytes, c.nbuckets, c.bucket_bytes, c.node_bytes, c.journal_buckets
        );
        let _ = writeln!(out, "  state           {}", c.state);
        if let Some(e) = &c.error {
            let _ = writeln!(out, "  error           {e}");
        }
        let _ = writeln!(out, "  journal replay  {} entries", opt(c.journal_entries_to_replay));
        let _ = writeln!(out, "  keys            {}", opt(c.keys));
        let _ = writeln!(out, "  dirty           {} bytes", opt(c.dirty_bytes));
    }
    for b in &report.backing {
        let name =
            b.path.as_ref().map_or_else(|| "(path not given)".to_string(), |p| p.display().to_string());
        let id = b.dev_id.map_or_else(|| "not registered".to_string(), |i| format!("dev id {i}"));
        let _ = writeln!(out, "backing {name} ({id})");
        if !b.uuid.is_empty() {
            let _ = writeln!(out, "  uuid            {}", b.uuid);
            let _ = writeln!(
                out,
                "  size            {} bytes, data offset {}, export {} bytes",
                b.size_bytes, b.data_offset_bytes, b.export_bytes
            );
        }
        if let Some(state) = &b.state {
            let _ = writeln!(out, "  state           {state}");
        }
        if let Some(set) = &b.set_uuid {
            let _ = writeln!(out, "  cache set       {set}");
        }
        if let Some(d) = b.dirty_bytes {
            let _ = writeln!(out, "  dirty           {d} bytes");
        }
    }
    out
}

/// `ubcache check`: the offline, read-only fsck. `Ok(report)` even when it found problems (the
/// caller decides the exit code from [`Report::is_clean`]); `Err` when the check could not run.
pub fn check(cache: &Path, backing: &[PathBuf]) -> Result<Report, ServeError> {
    let (dev, _lock) = open_for_reading(cache, true)?;
    let mut locks = Vec::new();
    let mut devs: Vec<Arc<dyn BlockDev>> = Vec::new();
    for path in backing {
        let (d, lock) = open_for_reading(path, false)?;
        locks.push(lock);
        devs.push(Arc::new(d));
    }
    let dev: Arc<dyn BlockDev> = Arc::new(dev);
    crate::check::check(&dev, &devs).map_err(|source| ServeError::Cache { path: cache.to_path_buf(), source })
}

/// Human-readable `ubcache check` output.
#[must_use]
pub fn check_text(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for p in &report.problems {
        let _ = writeln!(out, "PROBLEM: {p}");
    }
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(
        out,
        "{}: {} keys ({} stale, {} dirty, {} dirty bytes), {} btree nodes, {} journal entries to replay",
        if report.is_clean() { "clean" } else { "PROBLEMS FOUND" },
        report.keys,
        report.stale_keys,
        report.dirty_keys,
        report.dirty_sectors * SECTOR_SIZE,
        report.nodes,
        report.journal_entries_replayed
    );
    out
}

/// `ubcache format`: formats, then prints what it made.
pub(super) fn run_format(args: &FormatArgs) -> Result<ExitCode, ServeError> {
    let summary = format_cache(&FormatRequest {
        cache: args.cache.clone(),
        backing: args.backing.clone(),
        bucket_bytes: args.bucket_size,
        node_bytes: args.node_size,
        size: args.size,
        force: args.force,
    })?;
    if args.json {
        print_json(&summary)?;
    } else {
        let mut text = format!(
            "formatted cache set {} on {}: {} buckets of {} bytes, btree nodes of {} bytes\n",
            summary.set_uuid,
            args.cache.display(),
            summary.nbuckets,
            summary.bucket_bytes,
            summary.node_bytes
        );
        for (i, (path, export)) in summary.backing.iter().enumerate() {
            text.push_str(&format!(
                "backing dev {i}: {} (export {export} bytes, starting 8 KiB into the device)\n",
                path.display()
            ));
        }
        print_stdout(&text);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ubcache show`.
pub(super) fn run_show(args: &ShowArgs) -> Result<ExitCode, ServeError> {
    let report = show(args.cache.as_deref(), &args.backing)?;
    if args.json {
        print_json(&report)?;
    } else {
        print_stdout(&show_text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit code of `ubcache check` when it could not run at all.
const CHECK_COULD_NOT_RUN: u8 = 3;

/// `ubcache check`: exit 0 clean, 1 problems, 3 could not check.
pub(super) fn run_check(args: &CheckArgs) -> Result<ExitCode, ServeError> {
    match check(&args.cache, &args.backing) {
        Ok(report) => {
            if args.json {
                print_json(&serde_json::json!({ "clean": report.is_clean(), "report": report }))?;
            } else {
                print_stdout(&check_text(&report));
            }
            Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Err(err) if err.exit_code() == 2 => Err(err),
        Err(err) => {
            if args.json {
                print_json(&serde_json::json!({ "clean": false, "error": err.to_string() }))?;
            }
            eprintln!("ubcache: check could not run: {err}");
            Ok(ExitCode::from(CHECK_COULD_NOT_RUN))
        }
    }
}
