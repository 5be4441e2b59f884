//! The lab's errors: one line each, naming the file, process or tool that failed and where its
//! log is; never a key.

use std::io;
use std::path::PathBuf;

/// What can go wrong bringing a lab up or down.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{tool} is not installed: run `make deps` (Debian package {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{tool} failed ({status}): {message}")]
    ToolFailed {
        tool: String,
        status: String,
        message: String,
    },
    #[error("certificates: {0}")]
    Certificate(String),
    #[error("{name} exited ({status}) before it was ready: {last_line} (log: {})", log.display())]
    ExitedEarly {
        name: String,
        status: String,
        last_line: String,
        log: PathBuf,
    },
    #[error("{name} was not ready within {seconds} s (log: {})", log.display())]
    NotReady {
        name: String,
        seconds: u64,
        log: PathBuf,
    },
    #[error(
        "a lab is running in {}: {name} (pid {pid}) is up; run `keyshard lab down --dir {}` first",
        dir.display(), dir.display()
    )]
    Running {
        dir: PathBuf,
        name: String,
        pid: u32,
    },
    #[error(
        "{}: not empty; lab up needs a new or empty directory (`keyshard lab down --dir DIR --purge` removes a stopped lab)",
        .0.display()
    )]
    NotEmpty(PathBuf),
    #[error("{}: another keyshard lab up or down is working on this directory", .0.display())]
    Busy(PathBuf),
    #[error("{}: no lab here (no lab.json)", .0.display())]
    NoLab(PathBuf),
    #[error("{}: not a lab file: {reason}", path.display())]
    LabFile { path: PathBuf, reason: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no free {what} on 127.0.0.1")]
    NoFreePort { what: &'static str },
    #[error("{name} (pid {pid}) still runs after SIGKILL")]
    Unkillable { name: String, pid: u32 },
    #[error("interrupted (SIGINT or SIGTERM)")]
    Interrupted,
    #[error("cannot handle SIGINT/SIGTERM: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    File(#[from] keyshard_core::files::FileError),
}

/// The lab's result type.
pub type Result<T> = std::result::Result<T, LabError>;

/// Wraps an `io::Error` with what was being done.
pub(crate) fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}

/// Text from a tool or a log, as one printable line of at most 300 characters.
pub(crate) fn one_line(text: &str) -> String {
    const MAX: usize = 300;
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .unwrap_or("(no output)");
    let mut out: String = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX)
        .collect();
    if line.chars().count() > MAX {
        out.push('…');
    }
    out
}
