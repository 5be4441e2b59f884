//! Device I/O in worker processes, so that no device can hold the agent.
//!
//! A read from a virtio-blk device whose backend stopped answering (a fragment daemon that hangs,
//! or is stopped) waits in the kernel, uninterruptibly: the reading thread cannot be cancelled,
//! and a process with such a thread cannot even exit, so its stdout never closes and whoever
//! waits for it (the init script, then cryptsetup) hangs too. Reading a device's `serial` in
//! sysfs is such a read (a GET_ID request on the device's queue).
//!
//! So the agent never touches a guest block device itself. Each device is read by a worker: the
//! same `keyshard-guest` binary, run again as `keyshard-guest worker ...`, which reports what it
//! read as [`wire::Record`]s on a pipe. The agent reads that pipe with a deadline; a worker that
//! has not finished by then is killed and abandoned. A worker stuck in the kernel dies only when
//! its I/O ends, if ever, but it holds nothing the agent needs: its stderr is `/dev/null`, its
//! stdout a pipe only the agent reads, and its stdin `/dev/null` too, except for the broker's
//! worker, whose stdin is a pipe on which the agent says "go on" after each answer that did not
//! meet the quorum (so no holder is asked for a share that would not be used).

pub mod broker;
pub mod probe;
pub mod wire;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use self::wire::{HEADER_LEN, MAX_OUTPUT, MAX_PAYLOAD, Record, RecordError};

/// How much is read from a worker's pipe at a time.
const READ_CHUNK: usize = 16 * 1024;
/// What a worker's buffer holds at most: one record not yet whole, and one more read. Allocated
/// once, so the buffer never grows: a grown `Vec` would leave its old copy of a share behind,
/// freed but not wiped.
const BUFFER_CAPACITY: usize = HEADER_LEN + MAX_PAYLOAD + READ_CHUNK;

/// The subcommand a worker is run as.
pub const WORKER_SUBCOMMAND: &str = "worker";
/// The byte that tells a worker on its stdin to go on.
pub const GO_AHEAD: u8 = b'+';

/// The worker's side of a go-ahead: waits for one on stdin. False at its end (the agent dropped
/// it, or exited) or on anything else: then the worker stops.
pub fn wait_for_go_ahead(input: &mut impl Read) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match input.read(&mut byte) {
            Ok(1) => return byte == [GO_AHEAD],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start a worker process ({program}): {source}")]
    Spawn { program: String, source: io::Error },
    #[error("no answer within {}", crate::agent::describe_timeout(*.0))]
    Timeout(Duration),
    #[error("reading the worker's report: {0}")]
    Read(io::Error),
    #[error("the worker's report is unreadable: {0}")]
    Record(#[from] RecordError),
    #[error("the worker wrote more than {MAX_OUTPUT} bytes")]
    TooMuchOutput,
    #[error("the worker ended without reporting")]
    Ended,
}

/// One `--name=VALUE` argument for a worker. Joined, never two arguments: a value that starts
/// with `-` (a path such as `-img`) is then still the option's value, never read as an option of
/// its own, whatever the value holds.
pub fn option_arg(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut arg = OsString::from(format!("--{name}="));
    arg.push(value);
    arg
}

/// Starts workers: which program to run (this one, normally).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLauncher {
    program: PathBuf,
}

impl WorkerLauncher {
    /// Workers run `program worker ...`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
        }
    }

    /// Workers run this very binary: `/proc/self/exe` names it even if the file was replaced
    /// since it started.
    pub fn this_program() -> Self {
        let proc_self = Path::new("/proc/self/exe");
        if proc_self.exists() {
            return Self::new(proc_self);
        }
        // Without /proc: the path we were started by, when it is one; else PATH's.
        let started_as = std::env::args_os()
            .next()
            .map(PathBuf::from)
            .filter(|path| path.components().count() > 1);
        Self::new(
            std::env::current_exe()
                .ok()
                .or(started_as)
                .unwrap_or_else(|| PathBuf::from("keyshard-guest")),
        )
    }

    /// Starts `program worker <args>`, its stdout a pipe and nothing else shared with us. The
    /// worker is sent SIGKILL when the thread that started it ends, and so when the agent exits:
    /// once the agent has its key and leaves, no worker it left behind goes on asking the
    /// coordinator for shares or reading devices.
    pub fn spawn(&self, args: &[OsString]) -> Result<WorkerProcess, WorkerError> {
        self.start(args, false)
    }

    /// As [`Self::spawn`], with the worker's stdin a pipe from us: [`WorkerProcess::go_ahead`]
    /// tells it to go on, and its end (we dropped it, or exited) tells it to stop.
    pub fn spawn_with_go_ahead(&self, args: &[OsString]) -> Result<WorkerProcess, WorkerError> {
        self.start(args, true)
    }

    fn start(&self, args: &[OsString], go_ahead: bool) -> Result<WorkerProcess, WorkerError> {
        let spawn_error = |source| WorkerError::Spawn {
            program: self.program.display().to_string(),
            source,
        };
        let mut command = Command::new(&self.program);
        command
            .arg(WORKER_SUBCOMMAND)
            .args(args)
            .stdin(if go_ahead {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec, and calls only prctl, which
        // is async-signal-safe; it allocates nothing and touches no lock.
        unsafe {
            command.pre_exec(|| {
                // PR_SET_PDEATHSIG: the kernel sends this signal when the parent thread ends.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(spawn_error)?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            return Err(spawn_error(io::Error::other("no pipe to the worker")));
        };
        let stdin = child.stdin.take();
        Ok(WorkerProcess {
            child,
            stdin,
            stdout,
            buffer: Vec::with_capacity(BUFFER_CAPACITY),
            total: 0,
            eof: false,
        })
    }
}

/// A running worker and what it has written so far. Dropping it kills the worker.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    /// Where go-aheads are written, for a worker started with them.
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    buffer: Vec<u8>,
    total: usize,
    eof: bool,
}

impl WorkerProcess {
    /// Tells a worker started with [`WorkerLauncher::spawn_with_go_ahead`] to go on to its next
    /// step; false if it cannot be told (it has gone, or takes no go-aheads).
    pub fn go_ahead(&mut self) -> bool {
        self.stdin
            .as_mut()
            .is_some_and(|stdin| stdin.write_all(&[GO_AHEAD]).is_ok())
    }

    /// The next record, waiting for it until `deadline`; `None` once the worker closed its
    /// stdout (it ended) with nothing more to say.
    pub fn next_record(&mut self, deadline: Instant) -> Result<Option<Record>, WorkerError> {
        loop {
            if let Some(record) = Record::take(&mut self.buffer)? {
                return Ok(Some(record));
            }
            if self.eof {
                return Ok(None);
            }
            self.fill(deadline)?;
        }
    }

    /// Reads what the worker has written, waiting for something until `deadline`. Called only
    /// when the buffer holds no whole record, so what it holds and what is read fit in
    /// [`BUFFER_CAPACITY`].
    fn fill(&mut self, deadline: Instant) -> Result<(), WorkerError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        if !wait_readable(&self.stdout, timeout).map_err(WorkerError::Read)? {
            return Err(WorkerError::Timeout(timeout));
        }
        let mut chunk = zeroize::Zeroizing::new(vec![0u8; READ_CHUNK]);
        let read = match self.stdout.read(&mut chunk) {
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(WorkerError::Read(e)),
        };
        if read == 0 {
            self.eof = true;
            return Ok(());
        }
        self.total = self.total.saturating_add(read);
        if self.total > MAX_OUTPUT {
            return Err(WorkerError::TooMuchOutput);
        }
        self.buffer
            .extend_from_slice(chunk.get(..read).unwrap_or_default());
        Ok(())
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buffer);
        // A worker that finished has exited; one stuck in the kernel is killed as far as the
        // kernel allows and left behind. Neither is waited for.
        let _ = self.child.kill();
        let _ = self.child.try_wait();
    }
}

/// Whether `pipe` has something to read (or its end) within `timeout`.
fn wait_readable(pipe: &ChildStdout, timeout: Duration) -> io::Result<bool> {
    let mut fds = [libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let millis = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `fds` is a live array of one initialised pollfd for the whole call, and its
        // length is passed alongside.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, millis) };
        match ready {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// The worker's side: writes records on stdout, each flushed at once so the agent sees it even
/// if the worker then blocks.
pub struct RecordWriter<W: Write> {
    out: W,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// Writes one record; false once the agent has gone (nobody reads any more).
    pub fn emit(&mut self, record: &Record) -> bool {
        self.out
            .write_all(&record.encode())
            .and_then(|()| self.out.flush())
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A launcher whose "worker" is a shell script: `sh -c SCRIPT worker ...`.
    fn shell(script: &str) -> (WorkerLauncher, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        (WorkerLauncher::new(path), dir)
    }

    #[test]
    fn records_arrive_as_the_worker_writes_them_and_end_at_eof() {
        // Tag 1 (serial), length 3, "abc"; then the worker exits.
        let (launcher, _dir) = shell(r"printf '\001\003\000\000\000abc'");
        let mut worker = launcher.spawn(&[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            worker.next_record(deadline).unwrap(),
            Some(Record::Serial("abc".into()))
        );
        assert_eq!(worker.next_record(deadline).unwrap(), None);
    }

    #[test]
    fn a_worker_that_never_answers_times_out_at_the_deadline() {
        let (launcher, _dir) = shell("exec sleep 600");
        let mut worker = launcher.spawn(&[]).unwrap();
        let started = Instant::now();
        let error = worker
            .next_record(started + Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(error, WorkerError::Timeout(_)), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(error.to_string().starts_with("no answer within"), "{error}");
    }

    #[test]
    fn garbage_and_floods_are_errors() {
        let (launcher, _dir) = shell(r"printf '\011\000\000\000\000'");
        let mut worker = launcher.spawn(&[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(matches!(
            worker.next_record(deadline),
            Err(WorkerError::Record(RecordError::UnknownTag(9)))
        ));
        // A worker that writes forever is cut off.
        let (launcher, _dir) = shell(r"while :; do printf '\001\000\000\000\000'; done");
        let mut worker = launcher.spawn(&[]).unwrap();
        let error = loop {
            match worker.next_record(deadline) {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(matches!(error, WorkerError::TooMuchOutput), "{error:?}");
    }

    /// Review of issue 7 (item 11's unwiped copies): the largest record, arriving in pieces,
    /// never makes the buffer that shares pass through grow (and leave a copy behind).
    #[test]
    fn the_largest_record_fits_without_the_buffer_growing() {
        let (launcher, _dir) = shell(
            r"printf '\002\000\000\001\000'; head -c 65536 /dev/zero; printf '\001\001\000\000\000x'",
        );
        let mut worker = launcher.spawn(&[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let capacity = worker.buffer.capacity();
        assert!(capacity >= BUFFER_CAPACITY);
        assert_eq!(
            worker.next_record(deadline).unwrap(),
            Some(Record::Volume(zeroize::Zeroizing::new(vec![
                0;
                MAX_PAYLOAD
            ])))
        );
        assert_eq!(
            worker.next_record(deadline).unwrap(),
            Some(Record::Serial("x".into()))
        );
        assert_eq!(worker.buffer.capacity(), capacity);
    }

    /// Review of issue 7: a worker the agent left behind (the agent had its key and exited,
    /// or the thread that waited for it ended without its Drop) does not live on.
    #[test]
    fn a_worker_dies_with_the_thread_that_started_it() {
        let (launcher, _dir) = shell("exec sleep 600");
        let pid = std::thread::spawn(move || {
            let worker = launcher.spawn(&[]).unwrap();
            let pid = worker.child.id();
            // As if the agent exited: nothing of ours kills it.
            std::mem::forget(worker);
            pid
        })
        .join()
        .unwrap();
        let pid = libc::pid_t::try_from(pid).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = 0;
        // SAFETY: waitpid on our own child, with a live status pointer.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
            assert!(
                Instant::now() < deadline,
                "worker {pid} outlived its thread"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(libc::WIFSIGNALED(status), "{status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
    }

    #[test]
    fn a_program_that_cannot_start_is_named() {
        let launcher = WorkerLauncher::new("/nonexistent/keyshard-guest");
        let error = launcher.spawn(&[]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot start a worker process (/nonexistent/keyshard-guest)"),
            "{error}"
        );
    }
}
