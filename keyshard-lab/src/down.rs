//! `keyshard lab down`: stops every process `lab.json` records (shard hosts, the CMS, etcd, then
//! the TPMs), or, when a `lab up` was killed before it wrote `lab.json`, every process its
//! journal `lab.starting.json` records with SIGTERM, then SIGKILL after a grace period, signalling only processes that are
//! still the ones the lab started (same pid, start time and program). The directory's data stays
//! unless `purge` is asked, which removes the whole lab directory once nothing of it runs (a
//! process that survives SIGKILL is an error, and nothing is removed then).

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::error::{LabError, Result, io_context};
use crate::labfile::{self, Lab};
use crate::process::{self, ProcessRecord, Stopped};
use crate::up::DirLock;

/// The grace period between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// Stops the lab in `dir`; one line per process, saying what was done.
pub fn down(dir: &Path, purge: bool, grace: Duration) -> Result<Vec<String>> {
    let dir = fs::canonicalize(dir).map_err(io_context(format!("--dir {}", dir.display())))?;
    let lock = DirLock::acquire(&dir)?;
    // A lab whose `up` was killed before it wrote lab.json: what it had started.
    let starting = labfile::read_starting(&dir)?;
    let lab = match (Lab::read(&dir), &starting) {
        (Ok(lab), _) => Some(lab),
        (Err(LabError::NoLab(_)), Some(_)) => None,
        (Err(e), _) => return Err(e),
    };
    let processes: Vec<&ProcessRecord> = match (&lab, &starting) {
        (Some(lab), _) => lab.processes(),
        (None, Some(records)) => records.iter().rev().collect(),
        (None, None) => return Err(LabError::NoLab(dir)),
    };
    // Daemons first, so no host loses its TPM or its CMS while it still serves.
    let (daemons, tpms): (Vec<_>, Vec<_>) = processes
        .into_iter()
        .partition(|p| !p.name.starts_with("swtpm-"));
    let mut lines = Vec::new();
    for group in [daemons, tpms] {
        let outcomes = process::stop(&group, grace)?;
        for (record, outcome) in group.iter().zip(outcomes) {
            let what = format!("{} (pid {})", record.name, record.pid);
            lines.push(match outcome {
                Stopped::Terminated => format!("stopped {what}"),
                Stopped::Killed => format!("killed {what}: it ignored SIGTERM for {grace:?}"),
                Stopped::NotRunning => format!("{what} was not running"),
                // The lab's process is gone and its pid reused: nothing of the lab runs there.
                Stopped::Replaced { reason } => {
                    format!("{what} was not running; not signalled: the pid {reason}")
                }
            });
        }
    }
    if starting.is_some() {
        let journal = dir.join(labfile::STARTING_FILE);
        fs::remove_file(&journal).map_err(io_context(format!("removing {}", journal.display())))?;
    }
    if purge {
        drop(lock);
        fs::remove_dir_all(&dir).map_err(io_context(format!("removing {}", dir.display())))?;
        lines.push(format!("removed {}", dir.display()));
    } else {
        lines.push(format!("data left in {}", dir.display()));
    }
    Ok(lines)
}
