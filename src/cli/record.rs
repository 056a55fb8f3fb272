//! `ubcache serve --record [NAME=]LOG`: which export records to which log, and wrapping the
//! served devices in [`RecordingDev`].
//!
//! An existing LOG is always refused (there is no override): it is most likely an earlier
//! recording, the one thing a crash test cannot make again; remove it to record over it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ExportSpec, ServeError};
use crate::dev::{BlockDev, SECTOR_SIZE};
use crate::nbd::Export;
use crate::record::{Existing, LogHeader, LogWriter, RecordedExports, RecordingDev};

/// One `--record`: the export and its log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordPlan {
    pub export: String,
    pub log: PathBuf,
}

/// Resolves the `--record` arguments against the exports. `NAME=LOG` names an export when
/// NAME is one; otherwise the whole text is the log path of the only export (a path may
/// contain `=`). Refuses unknown or repeated exports, one log for two exports, and a log that
/// exists already; creates nothing.
pub fn plan(args: &[String], specs: &[ExportSpec]) -> Result<Vec<RecordPlan>, ServeError> {
    let names = || specs.iter().map(|s| format!("{:?}", s.name)).collect::<Vec<_>>().join(", ");
    let mut plans: Vec<RecordPlan> = Vec::with_capacity(args.len());
    for arg in args {
        let named = arg
            .split_once('=')
            .filter(|(name, _)| specs.iter().any(|s| s.name == *name))
            .map(|(name, log)| (name.to_owned(), PathBuf::from(log)));
        let (export, log) = match (named, specs) {
            (Some(pair), _) => pair,
            (None, [only]) => (only.name.clone(), PathBuf::from(arg)),
            (None, _) => {
                return Err(ServeError::Usage(format!(
                    "--record {arg}: with several exports, name one as --record NAME=LOG (exports: {})",
                    names()
                )));
            }
        };
        if log.as_os_str().is_empty() {
            return Err(ServeError::Usage(format!("--record {arg}: the log path is empty")));
        }
        if plans.iter().any(|p| p.export == export) {
            return Err(ServeError::Usage(format!("export {export:?} is given --record twice")));
        }
        if plans.iter().any(|p| p.log == log) {
            return Err(ServeError::Usage(format!("{} is the log of two exports", log.display())));
        }
        if log.symlink_metadata().is_ok() {
            return Err(ServeError::Refused {
                path: log,
                reason: "it exists (an earlier recording?); remove it or record to another path".into(),
            });
        }
        plans.push(RecordPlan { export, log });
    }
    Ok(plans)
}

/// Creates each planned log and wraps its export's device; returns every export with its log
/// (`None` when not recorded), for the control socket's `mark`.
pub fn start(plans: &[RecordPlan], exports: &mut [Export]) -> Result<RecordedExports, ServeError> {
    let mut logs: RecordedExports = exports.iter().map(|e| (e.name.clone(), None)).collect();
    for plan in plans {
        let Some(index) = exports.iter().position(|e| e.name == plan.export) else {
            return Err(ServeError::Usage(format!("--record: no export named {:?}", plan.export)));
        };
        let export = &mut exports[index];
        let header = LogHeader::new(&export.name, export.dev.len(), SECTOR_SIZE as u32);
        let log = LogWriter::create(&plan.log, &header, Existing::Refuse)
            .map_err(|e| refused(&plan.log, e.to_string()))?;
        let log = Arc::new(log);
        let inner: Arc<dyn BlockDev> = Arc::clone(&export.dev);
        export.dev = Arc::new(RecordingDev::new(inner, Arc::clone(&log)));
        log::info!("export {:?}: recording to {} (uuid {})", export.name, plan.log.display(), header.uuid);
        logs[index].1 = Some(log);
    }
    Ok(logs)
}

fn refused(path: &Path, reason: String) -> ServeError {
    ServeError::Refused { path: path.to_path_buf(), reason }
}
