//! The `ubcache` command-line application: the clap definitions, and one module per command
//! group. The binary's `main.rs` only calls [`main`]; tests call the same functions (like
//! [`build_exports`] or [`admin::format_cache`]) without spawning a process.
//!
//! Nothing in the library below imports this module: the CLI sits on top of the NBD server,
//! the control socket and the cache engine, and only turns flags into calls to them.
//!
//! - [`options`]: `ubcache serve`'s options and their parsing and validation.
//! - [`defaults`]: the default data directory and its backing/cache pair, created on the first
//!   start.
//! - [`exports`]: building the NBD exports (passthrough or cached) from the options.
//! - [`locks`]: the `flock`s that keep two ubcache processes off one file.
//! - [`serve`]: running the server until a signal, with the control plane next to it.
//! - [`admin`]: `ubcache format`, `show` and `check`, the offline tools.
//! - [`control`]: the commands sent to a running server over its control socket.
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
//! Exit codes: 0 success, 1 run-time error (a file, a port, an I/O failure, a refusal to lose
//! data), 2 usage error (bad flag or value). `ubcache check`: 0 clean, 1 problems found, 3 the
//! check could not run (unreadable cache, I/O error, locked by a running server).

pub mod admin;
pub mod control;
pub mod defaults;
pub mod exports;
pub mod locks;
pub mod options;
pub mod record;
pub mod replay;
pub mod serve;

pub use crate::cache::CacheMode;
pub use defaults::{
    CacheChoice, DEFAULT_BACKING_FILE, DEFAULT_BACKING_SIZE, DEFAULT_CACHE_FILE, DEFAULT_CACHE_SIZE,
    DEFAULT_CACHED_MODE, DEFAULT_DATA_DIR, cache_choice,
};
pub use exports::{
    ExportSpec, PreparedExports, build_exports, export_specs, is_nbd_uri, open_backing, open_backing_dev,
    recovery_line,
};
pub use locks::BackingLock;
pub use options::{
    DEFAULT_LISTEN, DEFAULT_PORT, MAX_EXPORT_NAME_BYTES, MAX_SIZE, ServeOptions, listen_addrs,
    parse_listen_addr, parse_size, validate,
};
pub use serve::{ready_line, run};

use crate::cache::CacheError;
use crate::dev::DevError;
use crate::nbd::ServerError;
use crate::nbd::server::DeviceCalls;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "ubcache", version, about = "A userspace bcache-style caching block device served over NBD")]
struct Cli {
    /// Log level: error, warn, info, debug or trace (or a RUST_LOG-style filter). Overrides
    /// RUST_LOG; the default is info.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_log_level)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

// Each subcommand maps its flags onto a library call ([`serve`], [`admin`], [`control`]).
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve backing devices cached by a cache set (or a passthrough without a cache) over NBD.
    /// With no arguments: <DATA_DIR>/backing.img cached by <DATA_DIR>/cache.img, both created
    /// and formatted on the first start.
    Serve(ServeArgs),
    /// Format a cache set: cache superblocks and journal on the cache device, and an 8 KiB
    /// backing superblock at the start of each backing device (the export begins after it).
    Format(FormatArgs),
    /// Show a cache set: superblocks, geometry, state, backing devices, dirty bytes.
    Show(ShowArgs),
    /// Check a cache set offline (read-only fsck). Exit 0 clean, 1 problems, 3 could not check.
    Check(CheckArgs),
    /// Replay a recording log (`serve --record`): list it, rebuild the export at a flush, FUA
    /// write or mark, build the crash states a power cut allows, or check every such point.
    Replay(replay::ReplayArgs),
    /// Control commands sent to a running cached `ubcache serve` over its control socket.
    #[command(flatten)]
    Ctl(control::CtlCommand),
}

#[derive(Debug, Args)]
struct FormatArgs {
    /// Cache file or device to format.
    #[arg(long, value_name = "PATH")]
    cache: PathBuf,
    /// Backing file or device to attach (repeat for several; dev ids 0, 1, ... in this order).
    /// Its first 8 KiB become the backing superblock.
    #[arg(long, value_name = "PATH")]
    backing: Vec<PathBuf>,
    /// Bucket size (like 512K; a power of two from 4K to 64M) [default: 512K].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    bucket_size: Option<u64>,
    /// Btree node size (at most the bucket size) [default: 256K, or the bucket size if smaller].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    node_size: Option<u64>,
    /// Create the cache file with this size (like 256M) if it is missing.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
    /// Format over an existing ubcache cache or a cache device with other data in its first MiB,
    /// re-attach backing devices of another cache set, or overwrite data in the first 8 KiB of a
    /// raw backing device.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// Cache file or device.
    #[arg(long, value_name = "PATH")]
    cache: Option<PathBuf>,
    /// Backing devices whose own superblocks to show too.
    #[arg(long, value_name = "PATH")]
    backing: Vec<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Cache file or device.
    #[arg(long, value_name = "PATH")]
    cache: PathBuf,
    /// Backing devices to check against the cache (set uuid, Clean/Dirty state).
    #[arg(long, value_name = "PATH")]
    backing: Vec<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Backing file or block device [default: <DATA_DIR>/backing.img, created sparse if missing].
    /// Repeat with --export for several exports (paired in order).
    #[arg(long, value_name = "PATH")]
    backing: Vec<PathBuf>,

    /// Cache file or device, formatted with `ubcache format` (needs --backing).
    #[arg(long, value_name = "PATH")]
    cache: Option<PathBuf>,

    /// TCP address to listen on; repeat for several [default: 127.0.0.1:10809 unless --socket is
    /// given]. Port 0 picks a free port (the printed URI has the real one).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_listen_addr)]
    listen: Vec<std::net::SocketAddr>,

    /// Unix socket to listen on (alone, or in addition to --listen).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Export name clients ask for [default: "", the default export]. With several --backing,
    /// one --export per backing file, in the same order.
    #[arg(long = "export", value_name = "NAME")]
    export_names: Vec<String>,

    /// Cache mode: writethrough, writeback, writearound or none [default with a cache: the mode
    /// the backing superblock stores (the last set-mode or --mode), writethrough for a new one;
    /// without a cache only none]. An explicit mode is stored for the next start.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    mode: Option<CacheMode>,

    /// Serve a backing device without its cache although its superblock says Dirty (LOSES the
    /// writes only the cache holds) or although it is attached (leaves the cache stale).
    #[arg(long)]
    force: bool,

    /// Serve read-only: every write is refused.
    #[arg(long)]
    read_only: bool,

    /// Open backing files with O_DIRECT (no page cache) where the file system allows it.
    #[arg(long)]
    direct: bool,

    /// Directory for default files.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,

    /// Size of the backing file when it is created (like 1G, 512M) [default: 1G for the default
    /// file]. With --backing, creates the file if missing. An existing file must already have
    /// this size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,

    /// Control socket of a cached serve [default: <DATA_DIR>/ubcache.ctl].
    #[arg(long, value_name = "PATH")]
    ctl_socket: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (needs a cache).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_listen_addr)]
    metrics: Option<std::net::SocketAddr>,

    /// Worker threads of the server [default: one per CPU].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Where device I/O runs: `workers` (a task per request on the server's worker threads;
    /// cheap while data is in the page cache), `pool` (on a pool of blocking threads, so a slow
    /// read or an fsync does not stall other requests) or `inline` (reads and writes run in the
    /// connection's own task, one at a time per connection; flush, trim and zeroing as tasks).
    #[arg(long, value_enum, value_name = "WHERE", default_value = "workers")]
    device_calls: DeviceCallsArg,

    /// Record every write, trim, zeroing, flush and FUA of the export to LOG, for `ubcache
    /// replay` (with several exports: NAME=LOG, repeated). LOG must not exist yet.
    #[arg(long, value_name = "[NAME=]LOG")]
    record: Vec<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DeviceCallsArg {
    Workers,
    Pool,
    Inline,
}

impl From<ServeArgs> for ServeOptions {
    fn from(args: ServeArgs) -> Self {
        ServeOptions {
            backing: args.backing,
            cache: args.cache,
            listen: args.listen,
            socket: args.socket,
            export_names: args.export_names,
            mode: args.mode,
            force: args.force,
            read_only: args.read_only,
            direct: args.direct,
            data_dir: args.data_dir,
            size: args.size,
            threads: args.threads,
            ctl_socket: args.ctl_socket,
            metrics: args.metrics,
            record: args.record,
            device_calls: match args.device_calls {
                DeviceCallsArg::Workers => DeviceCalls::OnWorkers,
                DeviceCallsArg::Pool => DeviceCalls::BlockingPool,
                DeviceCallsArg::Inline => DeviceCalls::Inline,
            },
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

/// Runs the `ubcache` command line: parses the arguments, does the work, and returns the exit
/// code (see the module docs). `main.rs` is only this call.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Replay(args) => {
            return match replay::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(failure) => {
                    eprintln!("ubcache: error: {}", failure.message);
                    ExitCode::from(failure.exit_code)
                }
            };
        }
        Command::Serve(args) => serve::run(&args.into()).map(|()| ExitCode::SUCCESS),
        Command::Format(args) => admin::run_format(&args),
        Command::Show(args) => admin::run_show(&args),
        Command::Check(args) => admin::run_check(&args),
        Command::Ctl(command) => control::run(&command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // Not through the logger: the reason must reach the user even with RUST_LOG=off.
            eprintln!("ubcache: error: {err}");
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(1))
        }
    }
}

fn parse_mode(text: &str) -> Result<CacheMode, String> {
    text.parse()
}

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<(), ServeError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ServeError::Usage(format!("cannot encode the output as JSON: {e}")))?;
    print_stdout(&format!("{text}\n"));
    Ok(())
}

pub(crate) fn print_stdout(text: &str) {
    use std::io::Write;
    // A closed stdout (`ubcache show | head -1`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Accepts a level name, or a `RUST_LOG`-style filter with `module=level` parts. A bare word
/// that is not a level would silently become a module filter and hide every log, so it is
/// refused.
fn parse_log_level(text: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if LEVELS.contains(&text.to_ascii_lowercase().as_str()) || text.contains('=') {
        Ok(text.to_string())
    } else {
        Err(format!(
            "bad log level {text:?}: use one of {}, or a filter like ubcache=debug",
            LEVELS.join(", ")
        ))
    }
}

fn init_logging(level: Option<&str>) {
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(level) = level {
        builder.parse_filters(level);
    }
    builder.init();
}
