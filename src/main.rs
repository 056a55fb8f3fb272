//! The `ubcache` command line. Flags are parsed here; the work is done by library modules
//! (`ubcache::serve`, ...) so tests drive the same code.
//!
//! Exit codes: 0 success, 1 run-time error (a file, a port, an I/O failure), 2 usage error (bad
//! flag or value, or a feature not built yet).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use ubcache::nbd::server::DeviceCalls;
use ubcache::serve::{self, CacheMode, ServeOptions};

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

// More subcommands (format, show, check, stats, set-mode, detach) join this enum as the cache
// engine grows; each one maps its flags onto a library call.
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a backing file (later: cached by a cache set) as an NBD export.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Backing file or block device [default: <DATA_DIR>/backing.img, created sparse if missing].
    /// Repeat with --export for several exports (paired in order).
    #[arg(long, value_name = "PATH")]
    backing: Vec<PathBuf>,

    /// Cache file or device (not supported yet).
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

    /// Cache mode. Only `none` (passthrough) works until the cache exists.
    #[arg(long, value_enum, value_name = "MODE")]
    mode: Option<CacheMode>,

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

    /// Worker threads of the server [default: one per CPU].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Where device I/O runs: `workers` (a task per request on the server's worker threads;
    /// cheap while data is in the page cache), `pool` (on a pool of blocking threads, so a slow
    /// read or an fsync does not stall other requests) or `inline` (reads and writes run in the
    /// connection's own task, one at a time per connection; flush, trim and zeroing as tasks).
    #[arg(long, value_enum, value_name = "WHERE", default_value = "workers")]
    device_calls: DeviceCallsArg,
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
            read_only: args.read_only,
            direct: args.direct,
            data_dir: args.data_dir,
            size: args.size,
            threads: args.threads,
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
        Command::Serve(args) => serve::run(&args.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Not through the logger: the reason must reach the user even with RUST_LOG=off.
            eprintln!("ubcache: error: {err}");
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(1))
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
