//! `ubcache serve`: turns command-line options into NBD exports and runs the server until
//! SIGINT or SIGTERM asks it to stop.
//!
//! Until the cache set exists every export is a passthrough of its backing file (mode `none`);
//! asking for a cache or a caching mode is refused with [`ServeError::NotYetSupported`] rather
//! than silently serving something else than what was asked for.
//!
//! The library half of the CLI lives here (validation, default files, building exports, running
//! the server) so it can be unit-tested without spawning a process; `main.rs` only parses flags.

use crate::dev::{BlockDev, DevError, FileDev, FileDevOptions, SECTOR_SIZE};
use crate::nbd::server::DeviceCalls;
use crate::nbd::{Export, ListenAddr, Server, ServerConfig, ServerError, build_runtime};
use std::fmt;
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

/// How writes use the cache. Only [`CacheMode::None`] works until the cache set exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    /// Write the backing device and the cache; acknowledge when both are done.
    Writethrough,
    /// Write the cache only; a background thread copies dirty data home later.
    Writeback,
    /// Write the backing device and invalidate the cached range; reads still populate the cache.
    Writearound,
    /// Backing device only: a passthrough.
    None,
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writeback => "writeback",
            CacheMode::Writearound => "writearound",
            CacheMode::None => "none",
        })
    }
}

/// Everything `ubcache serve` needs, already parsed.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The backing files or block devices, one per export; empty means `<data_dir>/backing.img`.
    pub backing: Vec<PathBuf>,
    /// The cache file or device (not supported yet).
    pub cache: Option<PathBuf>,
    /// TCP addresses to listen on. Empty with no `socket` means [`DEFAULT_LISTEN`].
    pub listen: Vec<SocketAddr>,
    /// A Unix socket to listen on.
    pub socket: Option<PathBuf>,
    /// The export names clients ask for, one per `backing`, in the same order. Empty means one
    /// export named `""` (the default export).
    pub export_names: Vec<String>,
    /// The cache mode; `None` picks `none` (the only mode that works without a cache).
    pub mode: Option<CacheMode>,
    /// Refuse writes.
    pub read_only: bool,
    /// Where default files are created.
    pub data_dir: PathBuf,
    /// Size of the backing file when it is created; checked against an existing file.
    pub size: Option<u64>,
    /// Server worker threads; `None` means one per CPU.
    pub threads: Option<usize>,
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
            read_only: false,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            size: None,
            threads: None,
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
    /// A feature that is planned but not built yet.
    #[error(
        "{0} is not yet supported: the cache is not implemented yet; only --mode none (passthrough) works"
    )]
    NotYetSupported(String),
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
            ServeError::Usage(_) | ServeError::NotYetSupported(_) => 2,
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
    if let Some(cache) = &opts.cache {
        return Err(ServeError::NotYetSupported(format!("--cache {}", cache.display())));
    }
    match opts.mode {
        None | Some(CacheMode::None) => {}
        Some(mode) => return Err(ServeError::NotYetSupported(format!("--mode {mode}"))),
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
    let dev =
        FileDev::open(&path, &FileDevOptions { read_only: opts.read_only, create_with_size, direct: false })
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

/// The exports to serve, with the locks that keep other ubcache processes off their backing
/// files for as long as this value lives.
#[derive(Debug)]
pub struct PreparedExports {
    pub exports: Vec<Export>,
    locks: Vec<BackingLock>,
}

impl PreparedExports {
    /// Hands the exports to the server; the returned locks must outlive serving.
    #[must_use]
    pub fn into_parts(self) -> (Vec<Export>, Vec<BackingLock>) {
        (self.exports, self.locks)
    }
}

/// An advisory `flock` on a backing file: exclusive for a writable export, shared for a
/// read-only one. Two ubcache processes writing one disk would each trust their own view of it
/// (and, once cached, each its own cache), so the second one is refused at start-up. Released
/// when dropped (the descriptor is closed).
#[derive(Debug)]
pub struct BackingLock {
    _file: std::fs::File,
}

impl BackingLock {
    /// Takes the lock without waiting.
    pub fn acquire(path: &Path, read_only: bool) -> Result<Self, ServeError> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).map_err(|source| ServeError::BackingIo {
            path: path.to_path_buf(),
            op: "open for locking",
            source,
        })?;
        let mode = if read_only { libc::LOCK_SH } else { libc::LOCK_EX };
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
        Err(ServeError::BackingUnusable { path: path.to_path_buf(), reason })
    }
}

/// Builds the exports the options describe: a passthrough export per backing file. Everything
/// is checked before the first file is created, so a usage error leaves nothing behind.
pub fn build_exports(opts: &ServeOptions) -> Result<PreparedExports, ServeError> {
    validate(opts)?;
    let specs = export_specs(opts)?;
    let mut exports = Vec::with_capacity(specs.len());
    let mut locks = Vec::with_capacity(specs.len());
    for spec in &specs {
        let dev = open_backing(spec, opts)?;
        locks.push(BackingLock::acquire(dev.path(), opts.read_only)?);
        // The file name only: the description goes to every client, the server's directory
        // layout need not.
        let file_name = dev.path().file_name().unwrap_or(dev.path().as_os_str()).to_string_lossy();
        let description = format!("ubcache passthrough of {file_name} (mode none)");
        log::info!(
            "export {:?}: {} ({} bytes, mode none{})",
            spec.name,
            dev.path().display(),
            dev.len(),
            if opts.read_only { ", read-only" } else { "" }
        );
        exports.push(Export {
            name: spec.name.clone(),
            description,
            dev: Arc::new(dev),
            read_only: opts.read_only,
        });
    }
    Ok(PreparedExports { exports, locks })
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
    let (exports, _locks) = build_exports(opts)?.into_parts();
    let listen = listen_addrs(opts);
    let runtime = build_runtime(opts.threads).map_err(ServeError::Runtime)?;
    let config = ServerConfig { exports, device_calls: opts.device_calls, ..ServerConfig::default() };
    runtime.block_on(serve_until_signal(config, &listen))
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
    fn caching_modes_and_cache_are_refused_until_the_cache_exists() {
        for mode in [CacheMode::Writethrough, CacheMode::Writeback, CacheMode::Writearound] {
            let opts = ServeOptions { mode: Some(mode), ..Default::default() };
            let err = validate(&opts).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(&format!("--mode {mode} is not yet supported")), "{err}");
        }
        let opts = ServeOptions { cache: Some("c.img".into()), ..Default::default() };
        assert!(validate(&opts).unwrap_err().to_string().contains("--cache c.img is not yet supported"));
        assert!(validate(&ServeOptions { mode: Some(CacheMode::None), ..Default::default() }).is_ok());
    }

    #[test]
    fn default_listen_only_without_listen_or_socket() {
        let default = listen_addrs(&ServeOptions::default());
        assert!(matches!(default.as_slice(), [ListenAddr::Tcp(a)] if a.to_string() == DEFAULT_LISTEN));
        let socket_only = listen_addrs(&ServeOptions { socket: Some("s.sock".into()), ..Default::default() });
        assert!(matches!(socket_only.as_slice(), [ListenAddr::Unix(p)] if p == Path::new("s.sock")));
    }

    #[test]
    fn creates_the_default_backing_file_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("nested").join("data");
        let opts = ServeOptions { data_dir: data_dir.clone(), ..Default::default() };
        let exports = build_exports(&opts).unwrap().exports;
        assert_eq!(exports.len(), 1);
        assert_eq!(exports[0].name, "");
        assert_eq!(exports[0].dev.len(), DEFAULT_BACKING_SIZE);
        let meta = std::fs::metadata(data_dir.join(DEFAULT_BACKING_FILE)).unwrap();
        assert_eq!(meta.len(), DEFAULT_BACKING_SIZE);
        {
            use std::os::unix::fs::MetadataExt;
            assert!(meta.blocks() * 512 < 1 << 20, "the default backing file must be sparse");
        }
        // A second start reuses the file and keeps what was written.
        exports[0].dev.write_at(&[0x5a; 512], 4096).unwrap();
        exports[0].dev.sync().unwrap();
        drop(exports);
        let again = build_exports(&opts).unwrap().exports;
        let mut buf = [0; 512];
        again[0].dev.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0x5a; 512]);
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
