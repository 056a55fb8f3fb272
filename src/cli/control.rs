//! The control commands of the `ubcache` command line (`stats`, `set-mode`, `flush`, ...), sent
//! to a running server over its control socket: the CLI flattens [`CtlCommand`] into its
//! subcommands and calls [`run`] (or [`run_cli`] with its own output streams). Flags map onto [`CtlArgs`]; the work is [`run_ctl_command`] and, for `flush`,
//! [`wait_for_flush`] with the progress bar.

use super::ServeError;
use super::defaults::DEFAULT_DATA_DIR;
use crate::ctl::client::{CtlArgs, render_flush_progress, run_ctl_command, wait_for_flush};
use crate::ctl::knobs::CacheMode;
use crate::ctl::{CtlError, FlushState, socket_path};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Where the control socket is.
#[derive(Debug, Clone, Args, PartialEq, Eq)]
pub struct SocketArgs {
    /// Control socket of the running server [default: <DATA_DIR>/ubcache.ctl].
    #[arg(long, value_name = "PATH")]
    pub ctl_socket: Option<PathBuf>,
    /// Data directory of the running server (its control socket is inside).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl SocketArgs {
    /// The socket path: `--ctl-socket`, else `--data-dir`, else `default_data_dir`.
    #[must_use]
    pub fn resolve(&self, default_data_dir: &Path) -> PathBuf {
        match (&self.ctl_socket, &self.data_dir) {
            (Some(socket), _) => socket.clone(),
            (None, Some(dir)) => socket_path(dir),
            (None, None) => socket_path(default_data_dir),
        }
    }
}

fn parse_mode(text: &str) -> Result<CacheMode, String> {
    crate::ctl::knobs::parse_mode(text).map_err(|e| e.to_string())
}

/// Control commands sent to a running server.
#[derive(Debug, Clone, Subcommand, PartialEq, Eq)]
pub enum CtlCommand {
    /// Show cache statistics (totals and the last 5 minutes, hour and day).
    Stats {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Switch the cache mode: writethrough, writeback, writearound or none.
    SetMode {
        #[arg(value_parser = parse_mode)]
        mode: CacheMode,
        /// Write all dirty data home before switching (leaving writeback safely).
        #[arg(long)]
        flush_first: bool,
        /// Only this export [default: every export].
        #[arg(long)]
        export: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Set a tuning knob, e.g. `ubcache set sequential_cutoff 8M`.
    Set {
        knob: String,
        value: String,
        /// Only this export [default: every export].
        #[arg(long)]
        export: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// List the tuning knobs and their values.
    Knobs {
        #[arg(long)]
        export: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Write all dirty data home, showing progress until done.
    Flush {
        /// Start the flush and return at once.
        #[arg(long)]
        no_wait: bool,
        /// Cancel a running flush instead.
        #[arg(long, conflicts_with = "no_wait")]
        cancel: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Write an export's dirty data home and detach it from the cache.
    Detach {
        export: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Attach a detached export to the cache again.
    Attach {
        export: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Put a named mark in the recording log (`serve --record`), e.g. `ubcache mark "after mkfs"`.
    Mark {
        name: String,
        /// Only this export's log [default: every recorded export].
        #[arg(long)]
        export: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

impl CtlCommand {
    fn socket(&self) -> &SocketArgs {
        match self {
            CtlCommand::Stats { socket, .. }
            | CtlCommand::SetMode { socket, .. }
            | CtlCommand::Set { socket, .. }
            | CtlCommand::Knobs { socket, .. }
            | CtlCommand::Flush { socket, .. }
            | CtlCommand::Detach { socket, .. }
            | CtlCommand::Attach { socket, .. }
            | CtlCommand::Mark { socket, .. } => socket,
        }
    }
}

/// How often `flush` polls progress.
pub const FLUSH_POLL: Duration = Duration::from_millis(500);

/// Width of the flush progress bar.
const BAR_WIDTH: usize = 30;

fn write_err(e: std::io::Error) -> CtlError {
    CtlError::io("write output", e)
}

/// Runs one control command: results go to `out`, the flush progress bar (redrawn in place
/// with `\r`) to `progress` (stderr in the CLI).
///
/// # Errors
/// What the server or the socket said; a flush that ends failed or cancelled is
/// [`CtlError::Failed`].
pub fn run_cli(
    command: &CtlCommand,
    default_data_dir: &Path,
    out: &mut dyn Write,
    progress: &mut dyn Write,
) -> Result<(), CtlError> {
    run_cli_polling(command, default_data_dir, out, progress, FLUSH_POLL)
}

/// [`run_cli`] with the flush poll interval given (tests poll fast).
///
/// # Errors
/// As [`run_cli`].
pub fn run_cli_polling(
    command: &CtlCommand,
    default_data_dir: &Path,
    out: &mut dyn Write,
    progress: &mut dyn Write,
    poll: Duration,
) -> Result<(), CtlError> {
    let socket = command.socket().resolve(default_data_dir);
    let args = match command {
        CtlCommand::Stats { json, .. } => CtlArgs::Stats { json: *json },
        CtlCommand::SetMode { mode, flush_first, export, .. } => {
            CtlArgs::SetMode { mode: *mode, flush_first: *flush_first, export: export.clone() }
        }
        CtlCommand::Set { knob, value, export, .. } => {
            CtlArgs::Set { knob: knob.clone(), value: value.clone(), export: export.clone() }
        }
        CtlCommand::Knobs { export, .. } => CtlArgs::Knobs { export: export.clone() },
        CtlCommand::Flush { cancel: true, .. } => CtlArgs::CancelFlush,
        CtlCommand::Flush { .. } => CtlArgs::Flush,
        CtlCommand::Detach { export, .. } => CtlArgs::Detach { export: export.clone() },
        CtlCommand::Attach { export, .. } => CtlArgs::Attach { export: export.clone() },
        CtlCommand::Mark { name, export, .. } => CtlArgs::Mark { name: name.clone(), export: export.clone() },
    };
    let text = run_ctl_command(&socket, &args).map_err(|e| match (command, e) {
        // A passthrough serve has a control socket only when it records.
        (CtlCommand::Mark { .. }, CtlError::Io { context, source }) => CtlError::Io {
            context: format!("{context} (is a `ubcache serve --record` running with this control socket?)"),
            source,
        },
        (_, e) => e,
    })?;
    writeln!(out, "{}", text.trim_end()).map_err(write_err)?;
    if let CtlCommand::Flush { no_wait: false, cancel: false, .. } = command {
        let mut draw_error = None;
        let last = wait_for_flush(&socket, poll, &mut |p| {
            if let Err(e) =
                write!(progress, "\r{}", render_flush_progress(p, BAR_WIDTH)).and_then(|()| progress.flush())
            {
                draw_error.get_or_insert(e);
            }
        })?;
        writeln!(progress).map_err(write_err)?;
        if let Some(e) = draw_error {
            return Err(write_err(e));
        }
        match last.state {
            // wait_for_flush returns only once the state is no longer Running.
            FlushState::Done | FlushState::Idle | FlushState::Running => {}
            FlushState::Failed => {
                return Err(CtlError::Failed(
                    "flush failed; dirty data is kept (see the server log)".to_owned(),
                ));
            }
            FlushState::Cancelled => return Err(CtlError::Failed("flush was cancelled".to_owned())),
        }
    }
    Ok(())
}

/// Runs one control command against the default data directory's socket unless the flags name
/// another; failures are printed here and exit with 1.
pub fn run(command: &CtlCommand) -> Result<ExitCode, ServeError> {
    let mut out = std::io::stdout();
    let mut progress = std::io::stderr();
    match run_cli(command, Path::new(DEFAULT_DATA_DIR), &mut out, &mut progress) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("ubcache: error: {}", e.message());
            Ok(ExitCode::from(1))
        }
    }
}
