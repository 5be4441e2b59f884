//! Child processes that cannot outlive their test: [`ChildGuard`] kills the child's process group
//! when dropped (a passing test, a failed assertion, a panic), [`Daemon`] adds "wait until it
//! prints its readiness line", and [`run_tool`] runs a one-shot command and checks its status.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::{HarnessError, Result, io_context};

/// How long [`ChildGuard::terminate`] waits after SIGTERM before it sends SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(5);

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A running child in its own process group; dropping the guard kills the group and reaps the
/// child. The child also gets SIGKILL if the thread that spawned it dies (PR_SET_PDEATHSIG), so a
/// test runner killed from outside leaves nothing behind: spawn from the test's own thread.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> Result<Self> {
        command.process_group(0);
        // SAFETY: the hook runs in the forked child before exec and only calls prctl(2), which
        // is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        keyshard_lab::inherit::close_inherited_fds(command);
        let child = command.spawn().map_err(|source| HarnessError::Spawn {
            name: name.to_owned(),
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            child,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child has ended (it is reaped then), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(io_context(format!("waiting for {}", self.name)))?;
        }
        Ok(self.status)
    }

    /// Waits up to `limit` for the child to end on its own.
    pub fn wait_timeout(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until the child ends or `deadline` passes; its status, or None while it runs.
    /// Unlike [`Self::wait_timeout`], which looks every 50 ms, it wakes when the child exits
    /// (pidfd_open(2) and poll(2), Linux 5.3 and later; on an older kernel it falls back to
    /// looking every millisecond), so the moment it returns is the moment the child ended, to
    /// within scheduling: what a benchmark that times children needs.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.try_wait()? {
            return Ok(Some(status));
        }
        let Some(pidfd) = self.pidfd() else {
            loop {
                if let Some(status) = self.try_wait()? {
                    return Ok(Some(status));
                }
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                thread::sleep(Duration::from_millis(1));
            }
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up, so the wait never ends before the deadline.
            let millis = left.as_micros().div_ceil(1000);
            let timeout = libc::c_int::try_from(millis).unwrap_or(libc::c_int::MAX);
            let mut poll = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `poll` points to one valid pollfd for the duration of the call, and the
            // count says one.
            let ready = unsafe { libc::poll(&mut poll, 1, timeout) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(HarnessError::Io {
                    context: format!("waiting for {}", self.name),
                    source: error,
                });
            }
            if ready > 0 {
                // The pidfd is readable once the child has exited: this reaps it at once.
                let status = self
                    .child
                    .wait()
                    .map_err(io_context(format!("reaping {}", self.name)))?;
                self.status = Some(status);
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return self.try_wait();
            }
        }
    }

    /// A pidfd for the (unreaped) child, or None where the kernel has no pidfd_open(2).
    fn pidfd(&self) -> Option<OwnedFd> {
        let pid = libc::pid_t::try_from(self.child.id()).ok()?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1. The
        // child is not reaped yet (callers check), so `pid` still names it.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = RawFd::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: `fd` was just returned by pidfd_open, is open, and nothing else owns it.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// SIGTERM to the process group, then SIGKILL if the child has not ended after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal_group(libc::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.kill()
    }

    /// SIGKILL to the process group; returns once the child is reaped.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            // Reaped: its pid may belong to someone else by now, so it is not signalled again.
            return Ok(status);
        }
        self.signal_group(libc::SIGKILL);
        let status = self
            .child
            .wait()
            .map_err(io_context(format!("reaping {}", self.name)))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Sends `signal` to the child's process group, unless the child has been reaped.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        if self.try_wait()?.is_none() {
            self.signal_group(signal);
        }
        Ok(())
    }

    fn signal_group(&self, signal: libc::c_int) {
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) takes plain integers. The group id is the child's pid (process_group(0)
        // at spawn), and callers signal only while the child is not yet reaped, so the id still
        // names the group this guard started.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("keyshard-e2e: could not kill {}: {e}", self.name);
        }
    }
}

/// Describes an exit status for a message: "exit 2", "signal 9".
pub fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// A long-running child that announces readiness on stdout. Its stdout keeps being read (so it
/// never blocks on a full pipe) and its stderr goes to a log file.
#[derive(Debug)]
pub struct Daemon {
    guard: ChildGuard,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    stderr_log: PathBuf,
    ready_line: String,
}

impl Daemon {
    /// Starts `command` and waits up to `limit` for a stdout line starting with `ready_prefix`.
    /// Fails, with the daemon's stderr, if it exits or stays silent instead.
    pub fn start(
        name: &str,
        command: &mut Command,
        ready_prefix: &str,
        limit: Duration,
        stderr_log: &Path,
    ) -> Result<Self> {
        let stderr_file = File::create(stderr_log)
            .map_err(io_context(format!("creating {}", stderr_log.display())))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_file);
        let mut guard = ChildGuard::spawn(name, command)?;
        let stdout = guard
            .child_mut()
            .stdout
            .take()
            .ok_or_else(|| HarnessError::Io {
                context: format!("{name}: no stdout pipe"),
                source: io::Error::from(io::ErrorKind::BrokenPipe),
            })?;
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let lines = read_lines_in_background(stdout, stdout_lines.clone());
        let mut daemon = Self {
            guard,
            stdout_lines,
            stderr_log: stderr_log.to_owned(),
            ready_line: String::new(),
        };
        match wait_for_line(&lines, ready_prefix, limit) {
            LineWait::Found(line) => {
                daemon.ready_line = line;
                Ok(daemon)
            }
            LineWait::Closed => {
                // stdout closed: the daemon is exiting; give it a moment to report its status.
                let status = daemon
                    .guard
                    .wait_timeout(Duration::from_secs(2))?
                    .map_or_else(|| "still running".to_owned(), |s| describe_status(&s));
                Err(HarnessError::ExitedBeforeReady {
                    name: name.to_owned(),
                    prefix: ready_prefix.to_owned(),
                    status,
                    stderr: daemon.stderr(),
                })
            }
            LineWait::TimedOut => Err(HarnessError::NotReady {
                name: name.to_owned(),
                prefix: ready_prefix.to_owned(),
                seconds: limit.as_secs(),
                stderr: daemon.stderr(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        self.guard.name()
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The line that announced readiness.
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout_lines
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    /// Everything written on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Stops the daemon as an operator would (SIGTERM, SIGKILL after a grace period).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.guard.terminate(TERMINATE_GRACE)
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.guard.try_wait()
    }

    /// Sends `signal` (SIGSTOP: a device that hangs) to the daemon.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        self.guard.signal(signal)
    }

    /// SIGKILL, then reaped.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.guard.kill()
    }
}

/// What [`wait_for_line`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum LineWait {
    Found(String),
    /// The writer closed its end before such a line came.
    Closed,
    TimedOut,
}

/// Waits up to `limit` for a line starting with `prefix` from `lines`.
pub fn wait_for_line(lines: &Receiver<String>, prefix: &str, limit: Duration) -> LineWait {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return LineWait::Found(line),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => return LineWait::TimedOut,
            Err(RecvTimeoutError::Disconnected) => return LineWait::Closed,
        }
    }
}

/// Reads `reader` line by line on a thread until EOF: each line is kept in `store` and sent on
/// the returned channel (nobody needs to listen).
pub fn read_lines_in_background(
    reader: impl io::Read + Send + 'static,
    store: Arc<Mutex<Vec<String>>>,
) -> Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    if let Ok(mut lines) = store.lock() {
                        lines.push(line.clone());
                    }
                    let _ = sender.send(line);
                }
            }
        }
    });
    receiver
}

/// Runs a one-shot tool to completion; an unsuccessful exit is an error carrying its stderr.
pub fn run_tool(name: &str, command: &mut Command) -> Result<Output> {
    command.stdin(Stdio::null());
    let output = command.output().map_err(|source| HarnessError::Spawn {
        name: name.to_owned(),
        source,
    })?;
    if !output.status.success() {
        return Err(HarnessError::ToolFailed {
            name: name.to_owned(),
            status: describe_status(&output.status),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        let pid = libc::pid_t::try_from(pid).unwrap();
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        command
    }

    /// A shell whose stderr is dropped (it reports the jobs these tests kill).
    fn quiet_sh(script: &str) -> Command {
        let mut command = sh(script);
        command.stderr(Stdio::null());
        command
    }

    #[test]
    fn dropping_the_guard_kills_the_child_and_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let mut command = quiet_sh(&format!("sleep 60 & echo $! > {}; wait", pidfile.display()));
        let guard = ChildGuard::spawn("sleeper", &mut command).unwrap();
        let pid = guard.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the child never started its own child"
            );
            thread::sleep(POLL_INTERVAL);
        }
        let grandchild: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(alive(pid) && alive(grandchild));
        drop(guard);
        assert!(!alive(pid), "the child survived the guard");
        // The grandchild is reparented, not ours to reap; give init a moment to collect it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) {
            assert!(
                Instant::now() < deadline,
                "the grandchild survived the guard"
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    #[test]
    fn a_panicking_test_still_kills_its_child() {
        let pid = Arc::new(Mutex::new(0));
        let seen = pid.clone();
        let result = std::panic::catch_unwind(move || {
            let guard = ChildGuard::spawn("sleeper", Command::new("sleep").arg("60")).unwrap();
            *seen.lock().unwrap() = guard.pid();
            panic!("the test fails while the child runs");
        });
        assert!(result.is_err());
        let pid = *pid.lock().unwrap();
        assert_ne!(pid, 0);
        assert!(!alive(pid), "the child outlived the panicking test");
    }

    #[test]
    fn terminate_sends_sigterm_first() {
        let mut command = quiet_sh("trap 'exit 7' TERM; while :; do sleep 0.05; done");
        let mut guard = ChildGuard::spawn("trapper", &mut command).unwrap();
        thread::sleep(Duration::from_millis(200)); // let the shell install its trap
        let status = guard.terminate(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(7));
    }

    #[test]
    fn terminate_falls_back_to_sigkill() {
        let mut command = quiet_sh("trap '' TERM; while :; do sleep 0.05; done");
        let mut guard = ChildGuard::spawn("stubborn", &mut command).unwrap();
        thread::sleep(Duration::from_millis(200));
        let status = guard.terminate(Duration::from_millis(300)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn wait_until_returns_when_the_child_exits_and_not_after_the_deadline() {
        let mut guard = ChildGuard::spawn("short sleeper", &mut sh("sleep 0.3")).unwrap();
        let started = Instant::now();
        let status = guard
            .wait_until(started + Duration::from_secs(10))
            .unwrap()
            .expect("the child ended");
        let took = started.elapsed();
        assert!(status.success());
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );

        let mut guard = ChildGuard::spawn("long sleeper", Command::new("sleep").arg("60")).unwrap();
        let started = Instant::now();
        let status = guard
            .wait_until(started + Duration::from_millis(200))
            .unwrap();
        assert!(status.is_none(), "{status:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[test]
    fn daemon_is_ready_on_its_readiness_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut command =
            sh("echo starting; echo 'some log' >&2; sleep 0.2; echo 'ready: 1 device'; sleep 60");
        let daemon = Daemon::start(
            "fake daemon",
            &mut command,
            "ready",
            Duration::from_secs(10),
            &dir.path().join("stderr.log"),
        )
        .unwrap();
        assert_eq!(daemon.ready_line(), "ready: 1 device");
        assert_eq!(daemon.stdout(), vec!["starting", "ready: 1 device"]);
        assert!(daemon.stderr().contains("some log"));
    }

    #[test]
    fn daemon_that_exits_first_is_reported_with_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = sh("echo 'vhost-keyshard: no such fragment' >&2; exit 1");
        let err = Daemon::start(
            "failing daemon",
            &mut command,
            "ready",
            Duration::from_secs(10),
            &dir.path().join("stderr.log"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, HarnessError::ExitedBeforeReady { .. }),
            "{text}"
        );
        assert!(
            text.contains("exit 1") && text.contains("no such fragment"),
            "{text}"
        );
    }

    #[test]
    fn silent_daemon_times_out_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut command = sh(&format!("echo $$ > {}; exec sleep 60", pidfile.display()));
        let started = Instant::now();
        let err = Daemon::start(
            "silent daemon",
            &mut command,
            "ready",
            Duration::from_millis(500),
            &dir.path().join("stderr.log"),
        )
        .unwrap_err();
        assert!(matches!(err, HarnessError::NotReady { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            !alive(pid),
            "the daemon that never got ready is still running"
        );
    }

    #[test]
    fn run_tool_reports_a_failure_with_stderr() {
        let err = run_tool("failing tool", &mut sh("echo 'bad input' >&2; exit 3")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("failing tool") && text.contains("exit 3"),
            "{text}"
        );
        assert!(text.contains("bad input"), "{text}");
        let out = run_tool("echo", &mut sh("echo fine")).unwrap();
        assert_eq!(out.stdout, b"fine\n");
    }
}
