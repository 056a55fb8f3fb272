//! The `ubcache` command line. Flags are parsed here; the work is done by library modules
//! (`ubcache::serve`, ...) so tests drive the same code.
//!
//! Exit codes: 0 success, 1 run-time error (a file, a port, an I/O failure, a refusal to lose
//! data), 2 usage error (bad flag or value). `ubcache check`: 0 clean, 1 problems found, 3 the
//! check could not run (unreadable cache, I/O error, locked by a running server).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use ubcache::nbd::server::DeviceCalls;
use ubcache::serve::admin::{self, FormatRequest};
use ubcache::serve::{self, CacheMode, ServeError, ServeOptions};

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

// Each subcommand maps its flags onto a library call (`ubcache::serve`, `ubcache::serve::admin`).
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
    Replay(ubcache::record::replay::cli::ReplayArgs),
    /// Control commands sent to a running cached `ubcache serve` over its control socket.
    #[command(flatten)]
    Ctl(ubcache::ctl::cli::CtlCommand),
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
    #[arg(long, value_name = "SIZE", value_parser = serve::parse_size)]
    bucket_size: Option<u64>,
    /// Btree node size (at most the bucket size) [default: 256K, or the bucket size if smaller].
    #[arg(long, value_name = "SIZE", value_parser = serve::parse_size)]
    node_size: Option<u64>,
    /// Create the cache file with this size (like 256M) if it is missing.
    #[arg(long, value_name = "SIZE", value_parser = serve::parse_size)]
    size: Option<u64>,
    /// Format over an existing ubcache cache, re-attach backing devices of another cache set, or
    /// overwrite data in the first 8 KiB of a raw backing device.
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
    #[arg(long, value_name = "HOST:PORT", value_parser = serve::parse_listen_addr)]
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
    #[arg(long, value_name = "DIR", default_value = serve::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,

    /// Size of the backing file when it is created (like 1G, 512M) [default: 1G for the default
    /// file]. With --backing, creates the file if missing. An existing file must already have
    /// this size.
    #[arg(long, value_name = "SIZE", value_parser = serve::parse_size)]
    size: Option<u64>,

    /// Control socket of a cached serve [default: <DATA_DIR>/ubcache.ctl].
    #[arg(long, value_name = "PATH")]
    ctl_socket: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (needs a cache).
    #[arg(long, value_name = "HOST:PORT", value_parser = serve::parse_listen_addr)]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Serve(args) => serve::run(&args.into()).map(|()| ExitCode::SUCCESS),
        Command::Format(args) => run_format(&args),
        Command::Show(args) => run_show(&args),
        Command::Check(args) => run_check(&args),
        Command::Ctl(command) => run_ctl(&command),
        Command::Replay(args) => {
            return match ubcache::record::replay::cli::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(failure) => {
                    eprintln!("ubcache: error: {}", failure.message);
                    ExitCode::from(failure.exit_code)
                }
            };
        }
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

fn run_ctl(command: &ubcache::ctl::cli::CtlCommand) -> Result<ExitCode, ServeError> {
    let mut out = std::io::stdout();
    let mut progress = std::io::stderr();
    match ubcache::ctl::cli::run_cli(
        command,
        std::path::Path::new(serve::DEFAULT_DATA_DIR),
        &mut out,
        &mut progress,
    ) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("ubcache: error: {}", e.message());
            Ok(ExitCode::from(1))
        }
    }
}

fn parse_mode(text: &str) -> Result<CacheMode, String> {
    text.parse()
}

/// Prints `value` as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> Result<(), ServeError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ServeError::Usage(format!("cannot encode the output as JSON: {e}")))?;
    print_stdout(&format!("{text}\n"));
    Ok(())
}

fn print_stdout(text: &str) {
    use std::io::Write;
    // A closed stdout (`ubcache show | head -1`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn run_format(args: &FormatArgs) -> Result<ExitCode, ServeError> {
    let summary = admin::format_cache(&FormatRequest {
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

fn run_show(args: &ShowArgs) -> Result<ExitCode, ServeError> {
    let report = admin::show(args.cache.as_deref(), &args.backing)?;
    if args.json {
        print_json(&report)?;
    } else {
        print_stdout(&admin::show_text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit code of `ubcache check` when it could not run at all.
const CHECK_COULD_NOT_RUN: u8 = 3;

fn run_check(args: &CheckArgs) -> Result<ExitCode, ServeError> {
    match admin::check(&args.cache, &args.backing) {
        Ok(report) => {
            if args.json {
                print_json(&serde_json::json!({ "clean": report.is_clean(), "report": report }))?;
            } else {
                print_stdout(&admin::check_text(&report));
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
