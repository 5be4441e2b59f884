//! The lab's processes: started detached (their own session, stdin from /dev/null, stdout and
//! stderr appended to a log file), so they outlive `keyshard lab up`; known afterwards by pid,
//! start time and program name, so `keyshard lab down` never signals a process that merely
//! reuses a recorded pid; ready once a line appears in their log or a port answers; stopped
//! with SIGTERM, then SIGKILL after a grace period.

use std::fs::{self, File, OpenOptions};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result, io_context, one_line};

const POLL: Duration = Duration::from_millis(50);
/// How long a process may take to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Set by SIGINT or SIGTERM once [`watch_interrupts`] ran.
static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// From now on, SIGINT and SIGTERM no longer end this process: they make every wait of this
/// module fail with [`LabError::Interrupted`], so `lab up` stops what it started and returns.
pub fn watch_interrupts() -> Result<()> {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, flag.clone()).map_err(LabError::Signals)?;
    }
    Ok(())
}

/// Fails once SIGINT or SIGTERM came (after [`watch_interrupts`]).
pub fn check_interrupted() -> Result<()> {
    match INTERRUPTED.get() {
        Some(flag) if flag.load(Ordering::Relaxed) => Err(LabError::Interrupted),
        _ => Ok(()),
    }
}

/// A process the lab started, as `lab.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRecord {
    /// What it is in the lab: `cms`, `host-1`, `swtpm-host-1`, `etcd`.
    pub name: String,
    /// The file name of the program it runs (its argv\[0\]'s last component).
    pub program: String,
    pub pid: u32,
    /// Its start time in clock ticks since boot (/proc/PID/stat, field 22): with the pid, what
    /// names this process and no later one.
    pub start_time: u64,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// Whether a recorded process is still the one the lab started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Running, and it is the lab's process.
    Ours,
    /// Gone (or a zombie: it has exited).
    Gone,
    /// The pid now names another process (started later, or another program): never signalled.
    Replaced { reason: String },
}

/// The start time (field 22) and state (field 3) of `pid` from /proc/PID/stat; None when no
/// such process exists.
fn stat(pid: u32) -> Option<(u64, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses; the last ')' ends it.
    let rest = text.get(text.rfind(')')?.checked_add(1)?..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Fields after COMM start at field 3, so field 22 is index 19.
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

/// The last component of `pid`'s argv\[0\].
fn program_of(pid: u32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    let argv0 = String::from_utf8_lossy(argv0);
    Some(
        Path::new(argv0.as_ref())
            .file_name()?
            .to_string_lossy()
            .into_owned(),
    )
}

impl ProcessRecord {
    /// Whether this record still names a running process the lab started.
    pub fn liveness(&self) -> Liveness {
        let Some((start, state)) = stat(self.pid) else {
            return Liveness::Gone;
        };
        if start != self.start_time {
            return Liveness::Replaced {
                reason: format!(
                    "started at tick {start}, not {}: another process",
                    self.start_time
                ),
            };
        }
        if state == 'Z' || state == 'X' {
            return Liveness::Gone;
        }
        match program_of(self.pid) {
            Some(program) if program == self.program => Liveness::Ours,
            Some(program) => Liveness::Replaced {
                reason: format!("runs {program}, not {}", self.program),
            },
            // A kernel thread or a process exiting right now has no cmdline.
            None => Liveness::Gone,
        }
    }

    /// Sends `signal` if, and only if, the record still names the lab's process.
    fn signal(&self, signal: libc::c_int) -> bool {
        if self.liveness() != Liveness::Ours {
            return false;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        // SAFETY: kill(2) takes plain integers; the pid was checked just above to still name the
        // process the lab started (same start time and program).
        unsafe { libc::kill(pid, signal) == 0 }
    }
}

/// What [`stop`] did with one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// It ended after SIGTERM.
    Terminated,
    /// It ignored SIGTERM for the grace period and ended after SIGKILL.
    Killed,
    /// It was not running.
    NotRunning,
    /// The pid names another process now; nothing was signalled.
    Replaced { reason: String },
}

/// Stops every process in `records` (all at once): SIGTERM, up to `grace` to end, then SIGKILL.
/// The outcomes come in the order of `records`. An error when one survives SIGKILL.
pub fn stop(records: &[&ProcessRecord], grace: Duration) -> Result<Vec<Stopped>> {
    let mut outcomes: Vec<Option<Stopped>> = records
        .iter()
        .map(|record| match record.liveness() {
            Liveness::Ours => None,
            Liveness::Gone => Some(Stopped::NotRunning),
            Liveness::Replaced { reason } => Some(Stopped::Replaced { reason }),
        })
        .collect();
    for (record, outcome) in records.iter().zip(&mut outcomes) {
        if outcome.is_none() && !record.signal(libc::SIGTERM) {
            *outcome = Some(Stopped::NotRunning);
        }
    }
    let wait = |outcomes: &mut Vec<Option<Stopped>>, limit: Duration, done: Stopped| {
        let deadline = Instant::now() + limit;
        loop {
            for (record, outcome) in records.iter().zip(outcomes.iter_mut()) {
                if outcome.is_none() && record.liveness() != Liveness::Ours {
                    *outcome = Some(done.clone());
                }
            }
            if outcomes.iter().all(Option::is_some) || Instant::now() >= deadline {
                return;
            }
            thread::sleep(POLL);
        }
    };
    wait(&mut outcomes, grace, Stopped::Terminated);
    for (record, outcome) in records.iter().zip(&outcomes) {
        if outcome.is_none() {
            record.signal(libc::SIGKILL);
        }
    }
    wait(&mut outcomes, KILL_WAIT, Stopped::Killed);
    records
        .iter()
        .zip(outcomes)
        .map(|(record, outcome)| {
            outcome.ok_or_else(|| LabError::Unkillable {
                name: record.name.clone(),
                pid: record.pid,
            })
        })
        .collect()
}

/// A process `lab up` started and still holds as its child.
#[derive(Debug)]
pub struct Spawned {
    /// What `lab.json` records.
    pub record: ProcessRecord,
    child: Child,
}

impl Spawned {
    /// Starts `command` in its own session (it survives `lab up` and its terminal), stdin from
    /// /dev/null, stdout and stderr appended to `log`.
    pub fn start(name: &str, command: &mut Command, log: &Path) -> Result<Self> {
        let program = Path::new(command.get_program())
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_context(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_context(format!("opening {}", log.display())))?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the hook runs in the forked child before exec and only calls setsid(2), which
        // is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        crate::inherit::close_inherited_fds(command);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(missing(&program));
            }
            Err(e) => return Err(io_context(format!("starting {name} ({program})"))(e)),
        };
        let pid = child.id();
        let start_time = stat(pid).map(|(start, _)| start).unwrap_or(0);
        Ok(Self {
            record: ProcessRecord {
                name: name.to_owned(),
                program,
                pid,
                start_time,
                log: log.to_owned(),
            },
            child,
        })
    }

    /// Its record as `lab.json` keeps it: the program read again from /proc now that it runs
    /// (a `--bin` wrapper script that execs the real binary runs that binary, not the script).
    pub fn current_record(&self) -> ProcessRecord {
        let mut record = self.record.clone();
        if let Some(program) = program_of(record.pid) {
            record.program = program;
        }
        record
    }

    /// Its exit status once it has ended (reaped then), without blocking.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(io_context(format!("waiting for {}", self.record.name)))
    }

    /// The error for a process that ended before it was ready: its status and its log's last
    /// line.
    pub fn exited_early(&self, status: ExitStatus) -> LabError {
        LabError::ExitedEarly {
            name: self.record.name.clone(),
            status: describe_status(&status),
            last_line: one_line(&read_log(&self.record.log)),
            log: self.record.log.clone(),
        }
    }

    /// Stops it (SIGTERM, SIGKILL after `grace`) and reaps it: for a failed `lab up`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.exited(), Ok(Some(_))) {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(self.record.pid) else {
            return;
        };
        // SAFETY: kill(2) takes plain integers; the child is not reaped (checked above), so
        // its pid still names it.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.exited(), Ok(Some(_)) | Err(_)) {
                return;
            }
            thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first line of `log` that starts with `prefix`, if one was written.
pub fn find_line(log: &Path, prefix: &str) -> Option<String> {
    read_log(log)
        .lines()
        .find(|line| line.starts_with(prefix))
        .map(str::to_owned)
}

/// Waits for each process to write a line starting with its prefix to its log; the lines, in
/// order. Fails with the first process that exits first, or when `limit` passes.
pub fn wait_for_lines(
    processes: &mut [(&mut Spawned, &str)],
    limit: Duration,
) -> Result<Vec<String>> {
    let deadline = Instant::now() + limit;
    let mut found: Vec<Option<String>> = vec![None; processes.len()];
    loop {
        check_interrupted()?;
        for ((spawned, prefix), line) in processes.iter_mut().zip(found.iter_mut()) {
            if line.is_some() {
                continue;
            }
            if let Some(ready) = find_line(&spawned.record.log, prefix) {
                *line = Some(ready);
                continue;
            }
            if let Some(status) = spawned.exited()? {
                return Err(spawned.exited_early(status));
            }
        }
        if found.iter().all(Option::is_some) {
            return Ok(found.into_iter().flatten().collect());
        }
        if Instant::now() >= deadline {
            let waiting = processes
                .iter()
                .zip(&found)
                .find(|(_, line)| line.is_none())
                .map(|((spawned, _), _)| spawned.record.clone());
            return Err(match waiting {
                Some(record) => LabError::NotReady {
                    name: record.name,
                    seconds: limit.as_secs(),
                    log: record.log,
                },
                None => LabError::InvalidArgument("nothing to wait for".to_owned()),
            });
        }
        thread::sleep(POLL);
    }
}

/// Runs a one-shot command to its end (killed after `limit`), stdout and stderr appended to
/// `log`; what it printed on success, or its log's last line in the error.
pub fn run_tool(name: &str, command: &mut Command, log: &Path, limit: Duration) -> Result<String> {
    let before = read_log(log).len();
    let mut spawned = Spawned::start(name, command, log)?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Err(e) = check_interrupted() {
            spawned.stop(Duration::from_secs(1));
            return Err(e);
        }
        if let Some(status) = spawned.exited()? {
            break status;
        }
        if Instant::now() >= deadline {
            spawned.stop(Duration::from_secs(1));
            return Err(LabError::NotReady {
                name: name.to_owned(),
                seconds: limit.as_secs(),
                log: log.to_owned(),
            });
        }
        thread::sleep(POLL);
    };
    let text = read_log(log);
    let output = text.get(before..).unwrap_or_default().to_owned();
    if status.success() {
        Ok(output)
    } else {
        Err(LabError::ToolFailed {
            tool: format!("{name} (log: {})", log.display()),
            status: describe_status(&status),
            message: one_line(&output),
        })
    }
}

/// A log file's text (empty when it cannot be read).
pub fn read_log(log: &Path) -> String {
    File::open(log)
        .and_then(|mut file| {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes).map(|_| bytes)
        })
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// "exit 2", "signal 9".
pub fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// The error for a program that is not installed, naming its Debian package.
fn missing(program: &str) -> LabError {
    match program {
        "swtpm" => LabError::MissingTool {
            tool: "swtpm",
            package: "swtpm",
        },
        "etcd" => LabError::MissingTool {
            tool: "etcd",
            package: "etcd-server",
        },
        _ => LabError::Io {
            context: format!("starting {program}"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn sleeper(dir: &Path, name: &str, script: &str) -> Spawned {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        Spawned::start(name, &mut command, &dir.join(format!("{name}.log"))).unwrap()
    }

    #[test]
    fn a_detached_process_has_its_own_session_and_writes_to_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut spawned = sleeper(dir.path(), "s", "echo ready: yes; exec sleep 30");
        let lines =
            wait_for_lines(&mut [(&mut spawned, "ready:")], Duration::from_secs(5)).unwrap();
        assert_eq!(lines, ["ready: yes"]);
        // setsid: the child leads its own session and process group.
        // SAFETY: getsid(2) takes a plain integer.
        let sid = unsafe { libc::getsid(spawned.record.pid as libc::pid_t) };
        assert_eq!(sid, spawned.record.pid as libc::pid_t);
        // After `exec`, the process runs sleep: the record that says so is the lab's process.
        let mut record = spawned.record.clone();
        record.program = "sleep".to_owned();
        assert_eq!(record.liveness(), Liveness::Ours);
        spawned.stop(Duration::from_secs(2));
        assert_eq!(record.liveness(), Liveness::Gone);
    }

    #[test]
    fn a_recorded_pid_with_another_start_time_or_program_is_never_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let mut spawned = sleeper(dir.path(), "s", "exec sleep 30");
        // Give exec a moment, so argv[0] is sleep's.
        let deadline = Instant::now() + Duration::from_secs(5);
        while program_of(spawned.record.pid).as_deref() != Some("sleep") {
            assert!(Instant::now() < deadline);
            thread::sleep(POLL);
        }
        let mut record = spawned.record.clone();
        record.program = "sleep".to_owned();
        assert_eq!(record.liveness(), Liveness::Ours);
        let mut older = record.clone();
        older.start_time = older.start_time.saturating_sub(1);
        let mut other = record.clone();
        other.program = "swtpm".to_owned();
        let outcomes = stop(&[&older, &other], Duration::from_millis(200)).unwrap();
        assert!(
            matches!(outcomes[0], Stopped::Replaced { .. }),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[1], Stopped::Replaced { .. }),
            "{outcomes:?}"
        );
        assert!(
            spawned.exited().unwrap().is_none(),
            "a mismatched record was signalled"
        );
        // The true record stops it.
        assert_eq!(
            stop(&[&record], Duration::from_secs(5)).unwrap(),
            [Stopped::Terminated]
        );
        spawned.exited().unwrap();
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let mut spawned = sleeper(
            dir.path(),
            "stubborn",
            "trap '' TERM; echo up; while :; do sleep 0.1; done",
        );
        wait_for_lines(&mut [(&mut spawned, "up")], Duration::from_secs(5)).unwrap();
        let mut record = spawned.record.clone();
        record.program = "sh".to_owned();
        let started = Instant::now();
        let outcomes = stop(&[&record], Duration::from_millis(300)).unwrap();
        assert_eq!(outcomes, [Stopped::Killed]);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let status = spawned.child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_process_that_exits_before_its_line_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut spawned = sleeper(dir.path(), "quitter", "echo 'bad config: port' >&2; exit 3");
        let err = wait_for_lines(&mut [(&mut spawned, "ready:")], Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("quitter exited (exit 3)"), "{err}");
        assert!(err.contains("bad config: port"), "{err}");
        let err = run_tool(
            "tool",
            Command::new("sh").arg("-c").arg("echo nope; exit 1"),
            &dir.path().join("tool.log"),
            Duration::from_secs(5),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nope") && err.contains("exit 1"), "{err}");
    }
}
