//! `ubcache serve`: turns command-line options into NBD exports and runs the server until
//! SIGINT or SIGTERM asks it to stop.
//!
//! Three ways to serve (decided by [`cache_choice`]):
//! - **no arguments**: the default pair in the data directory, `backing.img` (1 GiB) cached by
//!   `cache.img` (256 MiB); both are created and formatted on the first start (only when both are
//!   missing: a half-present pair is refused with a hint, never silently replaced).
//! - **`--cache C --backing B...`**: a formatted cache set (see `ubcache format`) serving each
//!   backing device through the cache, default mode writethrough (like bcache). A backing
//!   device whose superblock says Detached (detached before this start) is served straight
//!   from the device as a detached export of the set until `ubcache attach` binds it; one bound
//!   to another cache set is refused.
//! - **`--backing B...` without a cache**: a passthrough (mode `none`). A raw image is served
//!   whole; a device with a ubcache backing superblock is served from its data offset (8 KiB),
//!   and refused when its cache may hold data it lacks (state Dirty) or would go stale (attached,
//!   writable), unless `--force`.
//!
//! A raw backing image (no ubcache superblock) given with `--cache` is refused with a hint to run
//! `ubcache format`: formatting writes an 8 KiB header at its start and shifts the export, which
//! must be a deliberate act, never a side effect of serving.
//!
//! The library half of the CLI lives here (validation, default files, building exports, running
//! the server) so it can be unit-tested without spawning a process; `main.rs` only parses flags.
//! `ubcache format`, `show` and `check` live in [`admin`].

pub mod admin;
pub mod devs;

pub use crate::cache::CacheMode;
use crate::cache::writeback::{WritebackConfig, WritebackThread};
use crate::cache::{CacheConfig, CacheError, CacheSet, CachedDev, FormatOptions, RecoveryReport};
use crate::ctl::metrics::MetricsServer;
use crate::ctl::server::{CtlServer, CtlServerConfig};
use crate::format::{BackingState, BackingSuperblock};
use devs::OffsetDev;

use crate::dev::{BlockDev, DevError, FileDev, FileDevOptions, SECTOR_SIZE};
use crate::nbd::server::DeviceCalls;
use crate::nbd::{Export, ListenAddr, Server, ServerConfig, ServerError, build_runtime};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the server listens when neither `--listen` nor `--socket` is given: the IANA NBD port
/// on loopback only, so a default run never exposes a disk to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// The port of [`DEFAULT_LISTEN`].
pub const DEFAULT_PORT: u16 = 10809;
/// The data directory when `--data-dir` is not given, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "ubcache-data";
/// The name of the backing file created in the data directory when `--backing` is not given.
pub const DEFAULT_BACKING_FILE: &str = "backing.img";
/// Size of the default backing file: 1 GiB, created sparse so it costs no disk space up front.
pub const DEFAULT_BACKING_SIZE: u64 = 1 << 30;
/// Longest export name the NBD protocol allows (proto.md: "MUST NOT exceed 4096 bytes").
pub const MAX_EXPORT_NAME_BYTES: usize = 4096;
/// Largest size we accept: file offsets are `off_t`, a signed 64-bit integer.
pub const MAX_SIZE: u64 = i64::MAX as u64;
/// The name of the cache file created in the data directory when no argument names the files.
pub const DEFAULT_CACHE_FILE: &str = "cache.img";
/// Size of the default cache file: 256 MiB, created sparse.
pub const DEFAULT_CACHE_SIZE: u64 = 256 << 20;
/// The mode of a cached export when `--mode` is not given (bcache's default too).
pub const DEFAULT_CACHED_MODE: CacheMode = CacheMode::Writethrough;

/// Everything `ubcache serve` needs, already parsed.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The backing files or block devices, one per export; empty means `<data_dir>/backing.img`.
    pub backing: Vec<PathBuf>,
    /// The cache file or device (formatted with `ubcache format`). `None` with an empty
    /// `backing` means the default pair in `data_dir`; `None` with `backing` is a passthrough.
    pub cache: Option<PathBuf>,
    /// TCP addresses to listen on. Empty with no `socket` means [`DEFAULT_LISTEN`].
    pub listen: Vec<SocketAddr>,
    /// A Unix socket to listen on.
    pub socket: Option<PathBuf>,
    /// The export names clients ask for, one per `backing`, in the same order. Empty means one
    /// export named `""` (the default export).
    pub export_names: Vec<String>,
    /// The cache mode; `None` picks the mode each backing superblock stores with a cache (the
    /// last `set-mode`; [`DEFAULT_CACHED_MODE`] after format), `none` without.
    pub mode: Option<CacheMode>,
    /// Serve what would otherwise be refused to protect data: a Dirty backing device without
    /// its cache (its cached writes are lost), an attached one writable without its cache.
    pub force: bool,
    /// Refuse writes.
    pub read_only: bool,
    /// Open backing files with O_DIRECT where the file system allows it (bypasses the page cache;
    /// falls back to buffered I/O with a warning where it cannot).
    pub direct: bool,
    /// Where default files are created.
    pub data_dir: PathBuf,
    /// Size of the backing file when it is created; checked against an existing file.
    pub size: Option<u64>,
    /// Server worker threads; `None` means one per CPU.
    pub threads: Option<usize>,
    /// The control socket of a cached serve; `None` means `<data_dir>/ubcache.ctl`.
    pub ctl_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address (needs a cache).
    pub metrics: Option<SocketAddr>,
    /// Where device calls run: on the workers (cheap for page-cache hits) or on a blocking pool
    /// (a slow call, like an fsync, does not hold a worker).
    pub device_calls: DeviceCalls,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            backing: Vec::new(),
            cache: None,
            listen: Vec::new(),
            socket: None,
            export_names: Vec::new(),
            mode: None,
            force: false,
            read_only: false,
            direct: false,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            size: None,
            threads: None,
            ctl_socket: None,
            metrics: None,
            device_calls: DeviceCalls::default(),
        }
    }
}

/// Why `ubcache serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The options contradict each other or are out of range.
    #[error("{0}")]
    Usage(String),
    /// Serving this would lose or hide data; `--force` overrides where that is allowed.
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    /// The cache file cannot be used (missing, not formatted, locked, a system call failed).
    #[error("cache file {path}: {reason}")]
    CacheUnusable { path: PathBuf, reason: String },
    /// The control socket or the metrics listener could not start.
    #[error("control plane: {0}")]
    Ctl(#[from] crate::ctl::CtlError),
    /// The cache engine refused or failed to open the set, or failed on shutdown.
    #[error("cache set {path}: {source}")]
    Cache { path: PathBuf, source: CacheError },
    /// The backing file named with `--backing` does not exist.
    #[error(
        "backing file {path} does not exist (pass --size to create it, or omit --backing to use {default})"
    )]
    BackingMissing { path: PathBuf, default: String },
    /// The backing path exists but is not something we can serve.
    #[error("backing file {path}: {reason}")]
    BackingUnusable { path: PathBuf, reason: String },
    /// A system call on the backing file failed while opening, creating or locking it.
    #[error("backing file {path}: cannot {op}: {source}")]
    BackingIo { path: PathBuf, op: &'static str, source: std::io::Error },
    /// Opening the backing device failed for another reason.
    #[error("backing file {path}: {source}")]
    Backing { path: PathBuf, source: DevError },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    /// The tokio runtime or the signal handlers could not be set up.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// Binding a listener or serving failed.
    #[error("{0}")]
    Server(#[from] ServerError),
}

impl ServeError {
    /// The process exit code: 2 for a usage problem (like clap's own errors), 1 for everything
    /// that went wrong at run time.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Parses a size such as `4096`, `512K`, `100M`, `1G`, `1GiB`, `2T` (binary units, case does not
/// matter). The size must be a positive multiple of the 512-byte sector.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("bad size {text:?}: expected a number with an optional unit, like 1G or 512M"));
    }
    let number: u64 = digits.parse().map_err(|_| format!("bad size {text:?}: number too large"))?;
    let unit = unit.trim();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(format!("bad size {text:?}: unknown unit {unit:?} (use K, M, G, T or P)")),
    };
    let bytes = number
        .checked_mul(1u64 << shift)
        .filter(|&b| b <= MAX_SIZE)
        .ok_or_else(|| format!("bad size {text:?}: larger than the maximum {MAX_SIZE} bytes"))?;
    if bytes == 0 {
        return Err(format!("bad size {text:?}: must be greater than zero"));
    }
    if bytes % SECTOR_SIZE != 0 {
        return Err(format!(
            "bad size {text:?}: {bytes} bytes is not a multiple of the {SECTOR_SIZE}-byte sector"
        ));
    }
    Ok(bytes)
}

/// Parses a `HOST:PORT` listen address (`127.0.0.1:10809`, `[::1]:10809`, `localhost:0`).
/// Port 0 asks the OS for a free port; the URI printed at start-up carries the real one.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("bad listen address {text:?}: expected HOST:PORT, like 127.0.0.1:10809"))?;
    if host.is_empty() {
        return Err(format!("bad listen address {text:?}: the host is missing (like 127.0.0.1:{port})"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("bad listen address {text:?}: port {port:?} is not a number from 0 to 65535"))?;
    // A host name: resolve it now so a typo fails at start-up, not later.
    let mut addrs = text.to_socket_addrs().map_err(|e| format!("bad listen address {text:?}: {e}"))?;
    addrs.next().ok_or_else(|| format!("bad listen address {text:?}: the host name resolves to no address"))
}

/// Checks the options that need no file system access.
pub fn validate(opts: &ServeOptions) -> Result<(), ServeError> {
    if opts.cache.is_some() && opts.backing.is_empty() {
        return Err(ServeError::Usage(
            "--cache needs the backing device(s) it caches: add --backing PATH (or give neither \
             to serve the default pair in the data directory)"
                .into(),
        ));
    }
    if cache_choice(opts).is_none() {
        match opts.mode {
            None | Some(CacheMode::None) => {}
            Some(mode) => {
                return Err(ServeError::Usage(format!(
                    "--mode {mode} needs a cache: add --cache PATH (format one with `ubcache format \
                     --cache PATH --backing PATH --size 256M`); without a cache only --mode none works"
                )));
            }
        }
    }
    if opts.metrics.is_some() && cache_choice(opts).is_none() {
        return Err(ServeError::Usage(
            "--metrics needs a cache (the metrics are the cache's statistics); add --cache PATH".into(),
        ));
    }
    if let Some(cache) = &opts.cache
        && let Some(backing) = opts.backing.iter().find(|b| same_file(b, cache))
    {
        return Err(ServeError::Usage(format!(
            "{} is given as both the cache and a backing device",
            backing.display()
        )));
    }
    for name in &opts.export_names {
        if name.len() > MAX_EXPORT_NAME_BYTES {
            return Err(ServeError::Usage(format!(
                "export name is {} bytes long; NBD allows at most {MAX_EXPORT_NAME_BYTES}",
                name.len()
            )));
        }
        if name.contains('\0') {
            return Err(ServeError::Usage(format!("export name {name:?} contains a NUL byte")));
        }
    }
    if opts.threads == Some(0) {
        return Err(ServeError::Usage("--threads must be at least 1".into()));
    }
    if let Some(size) = opts.size {
        // The CLI parses with `parse_size`; library callers get the same rule.
        if size == 0 || size % SECTOR_SIZE != 0 || size > MAX_SIZE {
            return Err(ServeError::Usage(format!(
                "bad size {size}: must be a positive multiple of {SECTOR_SIZE} bytes"
            )));
        }
    }
    Ok(())
}

/// The listeners the options ask for: every `--listen`, plus `--socket`; the default TCP address
/// only when neither is given.
#[must_use]
pub fn listen_addrs(opts: &ServeOptions) -> Vec<ListenAddr> {
    let mut addrs: Vec<ListenAddr> = opts.listen.iter().copied().map(ListenAddr::Tcp).collect();
    if let Some(socket) = &opts.socket {
        addrs.push(ListenAddr::Unix(socket.clone()));
    }
    if addrs.is_empty() {
        addrs.push(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))));
    }
    addrs
}

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
fn same_file(a: &Path, b: &Path) -> bool {
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
/// [`BackingLock`]), or a remote NBD export through [`crate::dev::NbdDev`] (no lock: the remote
/// server owns it).
pub fn open_backing_dev(
    spec: &ExportSpec,
    opts: &ServeOptions,
) -> Result<(Arc<dyn BlockDev>, Option<BackingLock>), ServeError> {
    if is_nbd_uri(&spec.backing) {
        let uri = spec.backing.to_string_lossy();
        let dev = crate::dev::NbdDev::connect(&uri)
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

/// First start without arguments: creates the default backing file and cache file and formats
/// them as a pair. Only when *both* are missing: one without the other (a raw `backing.img` from
/// a passthrough-only ubcache, or a lost cache) is refused with a hint, never overwritten.
fn ensure_default_pair(opts: &ServeOptions, backing: &Path, cache: &Path) -> Result<(), ServeError> {
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

/// The URI a client uses to reach `export_name` through `addr` (the NBD URI specification:
/// `nbd://HOST:PORT/NAME`, `nbd+unix:///NAME?socket=PATH`). The default export `""` has no path.
#[must_use]
pub fn export_uri(addr: &ListenAddr, export_name: &str) -> String {
    let name = percent_encode(export_name, false);
    match addr {
        ListenAddr::Tcp(sock) if export_name.is_empty() => format!("nbd://{sock}"),
        ListenAddr::Tcp(sock) => format!("nbd://{sock}/{name}"),
        ListenAddr::Unix(path) => {
            format!("nbd+unix:///{name}?socket={}", percent_encode(&path.to_string_lossy(), true))
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/` in paths), so export
/// names and socket paths with spaces, `?` or `&` survive inside a URI.
fn percent_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        let unreserved = byte.is_ascii_alphanumeric() || b"-._~".contains(&byte);
        if unreserved || (keep_slash && byte == b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The line printed on stdout for every URI once the server listens. Scripts and tests wait for
/// it, so its wording is stable: `ubcache: serving export "NAME" at URI`.
#[must_use]
pub fn ready_line(export_name: &str, uri: &str) -> String {
    format!("ubcache: serving export {export_name:?} at {uri}")
}

/// Runs `ubcache serve`: validates, opens the backing file, binds, prints the URIs, and serves
/// until SIGINT or SIGTERM. On the first signal the server stops accepting, finishes in-flight
/// requests and syncs every export; a second signal exits at once.
pub fn run(opts: &ServeOptions) -> Result<(), ServeError> {
    let mut prepared = build_exports(opts)?;
    let cached = std::mem::take(&mut prepared.cached);
    let (exports, _locks, cache_set) = prepared.into_parts();
    let listen = listen_addrs(opts);
    let plane = match &cache_set {
        Some(set) => match ControlPlane::start(opts, set, cached) {
            Ok(plane) => Some(plane),
            Err(e) => {
                // Nothing was served: close the set so the next start replays nothing.
                if let Err(close) = set.clone().close() {
                    log::error!("closing the cache set after a failed start: {close}");
                }
                return Err(e);
            }
        },
        None => None,
    };
    let served = build_runtime(opts.threads).map_err(ServeError::Runtime).and_then(|runtime| {
        let config = ServerConfig { exports, device_calls: opts.device_calls, ..ServerConfig::default() };
        runtime.block_on(serve_until_signal(config, &listen))
    });
    if let Some(plane) = plane {
        plane.stop();
    }
    if let Some(set) = cache_set {
        let path = opts.cache.clone().unwrap_or_else(|| opts.data_dir.join(DEFAULT_CACHE_FILE));
        let dirty = set.stats().dirty_bytes;
        set.close().map_err(|source| ServeError::Cache { path, source })?;
        log::info!(
            "cache set closed cleanly (checkpointed, nothing to replay); {dirty} dirty bytes stay cached"
        );
    }
    served
}

/// What runs next to a cached export: the writeback thread, the control socket and, if asked,
/// the metrics endpoint.
struct ControlPlane {
    writeback: WritebackThread,
    ctl: CtlServer,
    metrics: Option<MetricsServer>,
}

impl ControlPlane {
    fn start(
        opts: &ServeOptions,
        set: &CacheSet,
        cached: Vec<(String, Arc<CachedDev>)>,
    ) -> Result<Self, ServeError> {
        let set = Arc::new(set.clone());
        // The writeback thread runs whenever there is a cache: it idles while nothing is dirty,
        // and writes back dirty data left by an earlier run in writeback mode whatever the mode
        // is now (or after `ubcache set-mode`).
        let writeback = WritebackThread::start(Arc::clone(&set), WritebackConfig::default());
        let target = crate::ctl::engine::control_target(set, cached);
        let socket = opts.ctl_socket.clone().unwrap_or_else(|| crate::ctl::socket_path(&opts.data_dir));
        if let Some(dir) = socket.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|source| ServeError::DataDir { path: dir.to_path_buf(), source })?;
        }
        let ctl = CtlServer::start(&socket, Arc::clone(&target), CtlServerConfig::default())?;
        log::info!(
            "control socket at {} (ubcache stats|set-mode|set|knobs|flush|detach|attach)",
            socket.display()
        );
        let metrics = match opts.metrics {
            Some(addr) => {
                let server = MetricsServer::start(addr, target)?;
                log::info!("metrics at http://{}/metrics", server.local_addr());
                Some(server)
            }
            None => None,
        };
        Ok(Self { writeback, ctl, metrics })
    }

    /// Stops the control plane, then writeback (before the set is closed: close checkpoints,
    /// and a writeback step racing it would only redo work).
    fn stop(self) {
        self.ctl.stop();
        if let Some(m) = self.metrics {
            m.stop();
        }
        if let Err(e) = self.writeback.stop() {
            log::error!("the writeback thread stopped with an error: {e}");
        }
    }
}

async fn serve_until_signal(config: ServerConfig, listen: &[ListenAddr]) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Install the handlers before binding, so a signal that arrives as soon as the URI is
    // printed is a clean shutdown rather than the default (immediate) termination.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServeError::Runtime)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(ServeError::Runtime)?;

    let names: Vec<String> = config.exports.iter().map(|e| e.name.clone()).collect();
    let server = Server::bind(config, listen).await?;
    for addr in server.local_addrs() {
        for name in &names {
            let uri = export_uri(&addr, name);
            log::info!("serving export {name:?} at {uri}");
            print_ready_line(&ready_line(name, &uri));
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        log::info!("{name}: shutting down (finishing in-flight requests, then syncing)");
        let _ = stop_tx.send(());
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        log::warn!("second signal: exiting at once, without waiting for in-flight requests or syncing");
        std::process::exit(130);
    });
    // A dropped sender (the task ended) also stops the server: nothing could signal it anymore.
    server
        .run(async move {
            let _ = stop_rx.await;
        })
        .await?;
    log::info!("stopped cleanly; every export was synced");
    Ok(())
}

fn print_ready_line(line: &str) {
    use std::io::Write;
    // Not `println!`: it panics when stdout is a closed pipe (`ubcache serve | head -1`), and a
    // reader that went away must not take the server down. Stdout is line-buffered, so the line
    // is flushed at once even into a pipe; the explicit flush makes that independent of it.
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        log::debug!("cannot print the ready line on stdout: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
    }

    #[test]
    fn rejects_bad_sizes_with_a_reason() {
        for (text, reason) in [
            ("", "expected a number"),
            ("G", "expected a number"),
            ("-1G", "expected a number"),
            ("1X", "unknown unit"),
            ("0", "greater than zero"),
            ("1000", "not a multiple"),
            ("99999999999999999999", "too large"),
            ("9000000P", "larger than the maximum"),
        ] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(parse_listen_addr("127.0.0.1:0").unwrap(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(parse_listen_addr("[::1]:10809").unwrap(), "[::1]:10809".parse().unwrap());
        assert!(parse_listen_addr("localhost:10809").unwrap().ip().is_loopback());
        for (text, reason) in [
            ("127.0.0.1", "expected HOST:PORT"),
            (":10809", "host is missing"),
            ("127.0.0.1:99999", "not a number"),
            ("127.0.0.1:http", "not a number"),
        ] {
            let err = parse_listen_addr(text).unwrap_err();
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }

    #[test]
    fn caching_modes_need_a_cache_and_a_cache_needs_backing() {
        let dir = tempfile::tempdir().unwrap();
        let backing = vec![dir.path().join("b.img")];
        for mode in [CacheMode::Writethrough, CacheMode::Writeback, CacheMode::Writearound] {
            let opts = ServeOptions { mode: Some(mode), backing: backing.clone(), ..Default::default() };
            let err = validate(&opts).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(&format!("--mode {mode} needs a cache")), "{err}");
            // The default pair has a cache, so every mode is fine there.
            assert!(validate(&ServeOptions { mode: Some(mode), ..Default::default() }).is_ok());
        }
        let opts = ServeOptions { cache: Some("c.img".into()), ..Default::default() };
        assert!(validate(&opts).unwrap_err().to_string().contains("--cache needs the backing"));
        let same = ServeOptions { cache: Some(backing[0].clone()), backing, ..Default::default() };
        assert!(validate(&same).unwrap_err().to_string().contains("both the cache and a backing"));
    }

    #[test]
    fn default_listen_only_without_listen_or_socket() {
        let default = listen_addrs(&ServeOptions::default());
        assert!(matches!(default.as_slice(), [ListenAddr::Tcp(a)] if a.to_string() == DEFAULT_LISTEN));
        let socket_only = listen_addrs(&ServeOptions { socket: Some("s.sock".into()), ..Default::default() });
        assert!(matches!(socket_only.as_slice(), [ListenAddr::Unix(p)] if p == Path::new("s.sock")));
    }

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

    #[test]
    fn uris_name_the_export_and_encode_odd_characters() {
        let tcp = ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(export_uri(&tcp, ""), "nbd://127.0.0.1:10809");
        assert_eq!(export_uri(&tcp, "disk 1"), "nbd://127.0.0.1:10809/disk%201");
        let v6 = ListenAddr::Tcp("[::1]:5".parse().unwrap());
        assert_eq!(export_uri(&v6, ""), "nbd://[::1]:5");
        let unix = ListenAddr::Unix("/tmp/a b/s.sock".into());
        assert_eq!(export_uri(&unix, ""), "nbd+unix:///?socket=/tmp/a%20b/s.sock");
        assert_eq!(export_uri(&unix, "d?x"), "nbd+unix:///d%3Fx?socket=/tmp/a%20b/s.sock");
    }

    #[test]
    fn ready_line_is_stable() {
        assert_eq!(
            ready_line("", "nbd://127.0.0.1:10809"),
            "ubcache: serving export \"\" at nbd://127.0.0.1:10809"
        );
        assert_eq!(
            ready_line("disk", "nbd+unix:///disk?socket=/s"),
            "ubcache: serving export \"disk\" at nbd+unix:///disk?socket=/s"
        );
    }
}
