//! The `ubcache replay` command: flags, and how each mode prints its result.
//!
//! Exit status: 0 success (a listing, images written, every checked point passed); 1 a run-time
//! failure (damaged log, image I/O, a check point failed); 2 a usage error.

use crate::record::replay::check::{self, CheckObserver, CheckRequest, Each, PointResult};
use crate::record::replay::crash::Unflushed;
use crate::record::replay::image::ImageOptions;
use crate::record::replay::index::{LogEnd, LogIndex};
use crate::record::replay::{EndPoint, ReplayError, ReplayRequest};
use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// `ubcache replay` flags.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("end").multiple(false))]
pub struct ReplayArgs {
    /// The recording log (`ubcache serve --record LOG`).
    #[arg(value_name = "LOG")]
    pub log: PathBuf,

    /// List the entries, flush/FUA/mark points and totals.
    #[arg(long, conflicts_with_all = ["out", "check"])]
    pub list: bool,
    /// With --list: print JSON.
    #[arg(long, requires = "list")]
    pub json: bool,

    /// Write the replayed image here (with --check: the image the command checks).
    #[arg(long, value_name = "IMAGE")]
    pub out: Option<PathBuf>,
    /// Replay through the first mark with this name.
    #[arg(long, value_name = "NAME", group = "end")]
    pub to_mark: Option<String>,
    /// Replay through the Nth FLUSH (1 for the first).
    #[arg(long, value_name = "N", group = "end")]
    pub to_flush: Option<u64>,
    /// Replay through the Nth FUA write (1 for the first).
    #[arg(long, value_name = "N", group = "end")]
    pub to_fua: Option<u64>,
    /// Replay through entry N (entry numbers as --list prints them).
    #[arg(long, value_name = "N", group = "end")]
    pub to_entry: Option<u64>,
    /// Replay the whole log.
    #[arg(long, group = "end")]
    pub all: bool,
    /// Start from a copy of this image (the export's contents when recording began) instead
    /// of zeros.
    #[arg(long, value_name = "IMAGE0")]
    pub start_from: Option<PathBuf>,
    /// Overwrite an existing --out.
    #[arg(long)]
    pub force: bool,

    /// A crash state instead of the prefix: which writes after the end point's last FLUSH
    /// reached the disk: none, all, random (each whole or not) or torn (also sector-granular
    /// parts). FUA writes are always kept.
    #[arg(long, value_name = "MODE", value_parser = parse_unflushed)]
    pub unflushed: Option<Unflushed>,
    /// Seed of random and torn states (state i of --states uses SEED+i) [default: from the
    /// clock, printed].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Write K states: IMAGE with {n} replaced by 0..K-1, or IMAGE.0 .. IMAGE.K-1.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub states: u32,

    /// Run this command (with sh -c; {image} becomes the quoted image path) at every point of
    /// --each, replaying forward onto one image. Stops at the first failure.
    #[arg(long, value_name = "CMD", conflicts_with_all = ["end", "unflushed", "states", "seed"])]
    pub check: Option<String>,
    /// The points --check runs at.
    #[arg(long, value_enum, value_name = "KIND", requires = "check")]
    pub each: Option<Each>,
    /// With --check: check every point and count the failures instead of stopping.
    #[arg(long, requires = "check")]
    pub keep_going: bool,
}

fn parse_unflushed(text: &str) -> Result<Unflushed, String> {
    text.parse()
}

/// Why `ubcache replay` stopped: the error, and the exit status it means.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub exit_code: u8,
}

impl From<ReplayError> for Failure {
    fn from(e: ReplayError) -> Self {
        let exit_code = if matches!(e, ReplayError::Usage(_)) { 2 } else { 1 };
        Failure { message: e.to_string(), exit_code }
    }
}

fn usage(message: &str) -> Failure {
    Failure { message: message.to_string(), exit_code: 2 }
}

fn out(text: &str) {
    // A closed stdout (`ubcache replay --list | head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Runs `ubcache replay`.
pub fn run(args: &ReplayArgs) -> Result<(), Failure> {
    if args.list {
        return list(args);
    }
    if let Some(command) = &args.check {
        let each = args.each.ok_or_else(|| usage("--check needs --each flush, fua or mark"))?;
        return run_check(args, command, each);
    }
    let Some(out_path) = &args.out else {
        return Err(usage(
            "say what to do: --list, --out IMAGE with an end point, or --check CMD --each KIND",
        ));
    };
    let end = end_point(args).ok_or_else(|| {
        usage("--out needs one end point: --to-mark NAME, --to-flush N, --to-fua N, --to-entry N or --all")
    })?;
    let seed = match (args.unflushed, args.seed) {
        (_, Some(seed)) => seed,
        (Some(mode), None) if mode.is_random() => {
            let seed = clock_seed();
            eprintln!("ubcache: --unflushed {} uses seed {seed}", mode.name());
            seed
        }
        _ => 0,
    };
    let req = ReplayRequest {
        log: args.log.clone(),
        out: out_path.clone(),
        end: end.clone(),
        unflushed: args.unflushed,
        seed,
        states: args.states,
        image: ImageOptions { force: args.force, start_from: args.start_from.clone() },
    };
    for state in crate::record::replay::replay(&req)? {
        let mut line = format!("wrote {}: {end}", state.path.display());
        if let Some(mode) = args.unflushed {
            line.push_str(&format!(
                ", unflushed {}{}: {} entries applied, {} of them torn, {} unflushed dropped",
                mode.name(),
                state.seed.map_or(String::new(), |s| format!(" seed {s}")),
                state.applied,
                state.torn,
                state.dropped
            ));
        } else {
            line.push_str(&format!(", {} entries applied", state.applied));
        }
        out(&format!("{line}\n"));
    }
    Ok(())
}

fn end_point(args: &ReplayArgs) -> Option<EndPoint> {
    if let Some(name) = &args.to_mark {
        Some(EndPoint::Mark(name.clone()))
    } else if let Some(n) = args.to_flush {
        Some(EndPoint::Flush(n))
    } else if let Some(n) = args.to_fua {
        Some(EndPoint::Fua(n))
    } else if let Some(n) = args.to_entry {
        Some(EndPoint::Entry(n))
    } else {
        args.all.then_some(EndPoint::All)
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
}

fn list(args: &ReplayArgs) -> Result<(), Failure> {
    let index = LogIndex::scan(&args.log)?;
    if args.json {
        let text = serde_json::to_string_pretty(&crate::record::replay::list::json(&index))
            .map_err(|e| Failure { message: format!("cannot encode the listing: {e}"), exit_code: 1 })?;
        out(&format!("{text}\n"));
    } else {
        out(&crate::record::replay::list::text(&index));
    }
    damage_is_an_error(&args.log, &index.end)
}

/// After listing what precedes it, damage in the middle of a log is an error (a torn tail is not).
fn damage_is_an_error(log: &std::path::Path, end: &LogEnd) -> Result<(), Failure> {
    match end {
        LogEnd::Corrupt { entry, offset, detail } => Err(ReplayError::Corrupt {
            path: log.to_path_buf(),
            entry: *entry,
            offset: *offset,
            detail: detail.clone(),
        }
        .into()),
        LogEnd::Clean | LogEnd::TornTail { .. } => Ok(()),
    }
}

/// Shows check progress: a bar with an ETA on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl CheckObserver for Progress {
    fn start(&mut self, points: u64) {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(points);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} points, {elapsed} elapsed, ETA {eta}",
            ) {
                bar.set_style(style);
            }
            self.bar = Some(bar);
        }
    }

    fn point(&mut self, result: &PointResult) {
        let mut text = format!("{}\n", result.line());
        if !result.ok {
            // The tail of what the command said is usually the reason.
            let lines: Vec<&str> = result.output.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                text.push_str(&format!("    {l}\n"));
            }
        }
        match &self.bar {
            Some(bar) => {
                bar.suspend(|| out(&text));
                bar.inc(1);
            }
            None => out(&text),
        }
    }
}

fn run_check(args: &ReplayArgs, command: &str, each: Each) -> Result<(), Failure> {
    let req = CheckRequest {
        log: args.log.clone(),
        command: command.to_string(),
        each,
        keep_going: args.keep_going,
        image: args.out.clone(),
        image_opts: ImageOptions { force: args.force, start_from: args.start_from.clone() },
    };
    let mut progress = Progress { bar: None };
    let summary = check::run_check(&req, &mut progress);
    if let Some(bar) = progress.bar.take() {
        bar.finish_and_clear();
    }
    let summary = summary?;
    let kind = match each {
        Each::Flush => "flush",
        Each::Fua => "FUA",
        Each::Mark => "mark",
    };
    match &summary.first_failure {
        None => {
            out(&format!("checked {} {kind} points: all passed\n", summary.checked));
            // Points after damage in the log were not checked: that is not a pass.
            damage_is_an_error(&args.log, &summary.log_end)
        }
        Some(first) if args.keep_going => Err(Failure {
            message: format!(
                "{} of {} {kind} points failed; the first: {}",
                summary.failures,
                summary.checked,
                first.line()
            ),
            exit_code: 1,
        }),
        Some(first) => Err(Failure {
            message: format!(
                "check failed at {} ({} of {} points checked)",
                first.line(),
                summary.checked,
                summary.points
            ),
            exit_code: 1,
        }),
    }
}
