//! `make bench-storm`: a host's boot storm, printed as figures. For each N (10, 50 and 100 unless
//! `KEYSHARD_STORM_N` says otherwise), on a fresh swtpm:
//! - N VMs dealt with `keyshard init --policy examples/vhd-tpm.toml` (vhd = 2, tpm = 1, k = 3),
//!   each into `ROOT/vm<i>` with its own random key, bound to VM id `vm<i>`;
//! - ONE `vhost-keyshard` process serving all 2N fragment devices, and ONE
//!   `keyshard coordinator --state-root ROOT` (or, with `KEYSHARD_STORM_COORDINATOR=per-vm`, one
//!   `keyshard coordinator --state-dir ROOT/vm<i> --broker ...` per VM: the host before issue 8);
//! - N host frontends, the real `keyshard-guest unlock --vhost-user ... --broker-vhost-user ...`
//!   processes, started together: each waits behind a shell `read` on one shared pipe, and
//!   closing that pipe is the common start. A VM's time runs from there until its process
//!   has exited, having written the key; every key written is compared with the one dealt.
//!
//! Figures per N: wall time until the last key, p50 and p99 per VM (nearest rank), TPM operations
//! per release from the coordinator's `stopped: tpm operations:` line, TPM commands per release
//! counted independently in swtpm's own command log, and VmRSS/VmHWM, threads and open files of
//! the coordinator and of the fragment daemon after the storm. Goals (issue 8) for N = 100:
//! every key within 2 s, at most 0.1 TPM commands per release after start-up, the coordinator
//! under 64 MiB resident.
//!
//! It needs the binaries `make bench-storm` builds (release `keyshard` and `vhost-keyshard`,
//! the static `keyshard-guest`), named by the `KEYSHARD_E2E_*_BIN` variables of `make e2e`. A
//! storm that has not finished within 60 s fails with what it saw; every process is stopped
//! when the benchmark ends, however it ends.
//!
//! `KEYSHARD_STORM_COORDINATOR=per-vm`: one coordinator per VM instead (the host before
//! `--state-root`). `KEYSHARD_STORM_TPM_DELAY_MS=D`: a relay ([`SlowTpm`]) between the
//! coordinator and swtpm holds every TPM response D ms during the storm, for a TPM as slow as a
//! hardware one.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use keyshard_e2e::HarnessError;
use keyshard_e2e::env::{GUEST_BIN, KEYSHARD_BIN, VHOST_KEYSHARD_BIN};
use keyshard_e2e::process::{ChildGuard, Daemon, describe_status, run_tool};
use keyshard_e2e::scenario::random_bytes;
use keyshard_e2e::swtpm::{Swtpm, TpmCommand};

const SIZES_VAR: &str = "KEYSHARD_STORM_N";
const MODE_VAR: &str = "KEYSHARD_STORM_COORDINATOR";
const TPM_DELAY_VAR: &str = "KEYSHARD_STORM_TPM_DELAY_MS";
const DEFAULT_SIZES: [usize; 3] = [10, 50, 100];
const MAX_VMS: usize = 1000;
const POLICY: &str = "examples/vhd-tpm.toml";
const KEY_LEN: usize = 32;

/// The storm's bound: what has not ended by then is killed and the storm fails.
const STORM_LIMIT: Duration = Duration::from_secs(60);
/// `keyshard-guest --timeout`: each frontend gives up by itself before the storm's bound.
const GUEST_TIMEOUT_SECS: u64 = 30;
/// How long the daemons may take to listen (the coordinator unseals every VM's key first).
const READY_LIMIT: Duration = Duration::from_secs(120);
/// How long the frontends may take to reach the gate.
const GATE_SETTLE_LIMIT: Duration = Duration::from_secs(10);
/// How many failing VMs (and kinds of log lines) a failed storm lists.
const REPORTED_FAILURES: usize = 10;
/// `sun_path` holds 108 bytes with the terminating NUL.
const SOCKET_PATH_MAX: usize = 107;

/// Each frontend's shell blocks reading the shared gate pipe; EOF (the benchmark drops the
/// write end) lets them all exec the frontend at once. `$0` is the frontend's path.
const GATE_SCRIPT: &str = "read -r gate; exec \"$0\" \"$@\"";

/// Goals for N = 100 (issue 8).
const GOAL_N: usize = 100;
const GOAL_WALL: Duration = Duration::from_secs(2);
const GOAL_TPM_PER_RELEASE: f64 = 0.1;
const GOAL_RSS_KIB: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
enum StormError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error("{var} is not set: run `make bench-storm`, which builds the binaries and sets it")]
    MissingEnv { var: &'static str },
    #[error("{var}: {reason}")]
    BadEnv { var: &'static str, reason: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(
        "{} is {len} bytes, over the {SOCKET_PATH_MAX} a UNIX socket path may have: set TMPDIR to a shorter directory",
        path.display()
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("{what} printed no {prefix:?} line; stdout:\n{stdout}\nstderr:\n{stderr}")]
    MissingLine {
        what: String,
        prefix: &'static str,
        stdout: String,
        stderr: String,
    },
    #[error("the coordinator refused VMs: {0}")]
    Refused(String),
    #[error("the storm failed for {failed} of {n} VMs:\n{report}")]
    Storm {
        failed: usize,
        n: usize,
        report: String,
    },
}

type Result<T> = std::result::Result<T, StormError>;

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> StormError {
    let context = context.into();
    move |source| StormError::Io { context, source }
}

/// How the VMs' brokers are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoordinatorMode {
    /// One `keyshard coordinator --state-root ROOT` for every VM.
    StateRoot,
    /// One `keyshard coordinator --state-dir ROOT/vm<i> --broker vm<i>=SOCKET` per VM.
    PerVm,
}

impl CoordinatorMode {
    fn from_env() -> Result<Self> {
        match std::env::var(MODE_VAR).as_deref() {
            Err(_) | Ok("state-root") => Ok(Self::StateRoot),
            Ok("per-vm") => Ok(Self::PerVm),
            Ok(other) => Err(StormError::BadEnv {
                var: MODE_VAR,
                reason: format!("{other:?}: expected state-root or per-vm"),
            }),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::StateRoot => "one --state-root coordinator",
            Self::PerVm => "one coordinator per VM",
        }
    }
}

struct Binaries {
    keyshard: PathBuf,
    vhost_keyshard: PathBuf,
    guest: PathBuf,
    policy: PathBuf,
}

impl Binaries {
    fn from_env() -> Result<Self> {
        let path = |var: &'static str| -> Result<PathBuf> {
            let path = std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .ok_or(StormError::MissingEnv { var })?;
            if path.is_file() {
                Ok(path)
            } else {
                Err(StormError::BadEnv {
                    var,
                    reason: format!("{} is not a file", path.display()),
                })
            }
        };
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new(".."));
        Ok(Self {
            keyshard: path(KEYSHARD_BIN)?,
            vhost_keyshard: path(VHOST_KEYSHARD_BIN)?,
            guest: path(GUEST_BIN)?,
            policy: repo.join(POLICY),
        })
    }
}

fn sizes_from_env() -> Result<Vec<usize>> {
    let Ok(text) = std::env::var(SIZES_VAR) else {
        return Ok(DEFAULT_SIZES.to_vec());
    };
    text.split([',', ' '])
        .filter(|part| !part.is_empty())
        .map(|part| match part.parse::<usize>() {
            Ok(n) if (1..=MAX_VMS).contains(&n) => Ok(n),
            _ => Err(StormError::BadEnv {
                var: SIZES_VAR,
                reason: format!("{part:?} is not a number of VMs in 1..={MAX_VMS}"),
            }),
        })
        .collect()
}

/// `KEYSHARD_STORM_TPM_DELAY_MS`: how long each TPM response is held during the storm (none
/// when unset or 0).
fn tpm_delay_from_env() -> Result<Option<Duration>> {
    let Ok(text) = std::env::var(TPM_DELAY_VAR) else {
        return Ok(None);
    };
    match text.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(ms) if ms <= 10_000 => Ok(Some(Duration::from_millis(ms))),
        _ => Err(StormError::BadEnv {
            var: TPM_DELAY_VAR,
            reason: format!("{text:?} is not a number of milliseconds up to 10000"),
        }),
    }
}

/// A relay in front of swtpm that, once armed, holds every TPM response for a fixed delay: a
/// TPM as slow as a hardware one (10 to 50 times slower than swtpm) without one. Its port P
/// relays whole TPM commands and responses to swtpm's port, P + 1 relays swtpm's control
/// channel untouched (the swtpm TCTI uses both). Armed after the coordinator is ready, so
/// start-up (every VM's unseal) is not slowed, only the storm.
struct SlowTpm {
    port: u16,
    armed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acceptors: Vec<thread::JoinHandle<()>>,
}

/// The largest TPM response relayed (TPM2 responses are at most a few KiB).
const MAX_TPM_RESPONSE: usize = 64 * 1024;
const TPM_HEADER_LEN: usize = 10;

impl SlowTpm {
    fn start(swtpm: &Swtpm, delay: Duration) -> Result<Self> {
        let (port, command, control) = bind_port_pair()?;
        let armed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = swtpm.port();
        let acceptors = vec![
            spawn_acceptor(
                command,
                upstream,
                Some((delay, armed.clone())),
                stop.clone(),
            ),
            spawn_acceptor(control, upstream + 1, None, stop.clone()),
        ];
        Ok(Self {
            port,
            armed,
            stop,
            acceptors,
        })
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

impl Drop for SlowTpm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake each acceptor with a connection it drops at once.
        for port in [self.port, self.port + 1] {
            let _ = TcpStream::connect(("127.0.0.1", port));
        }
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
    }
}

/// Two listeners on 127.0.0.1 ports P and P + 1, P even, in 20000..32000 (below the ephemeral
/// range, as the swtpm harness's).
fn bind_port_pair() -> Result<(u16, TcpListener, TcpListener)> {
    let seed = std::process::id().wrapping_mul(2_654_435_761) % 6000;
    for i in 0..6000u32 {
        let Ok(port) = u16::try_from(20_000 + ((seed + i * 7) % 6000) * 2) else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (
            TcpListener::bind(("127.0.0.1", port)),
            TcpListener::bind(("127.0.0.1", port + 1)),
        ) {
            return Ok((port, a, b));
        }
    }
    Err(StormError::Io {
        context: "no free port pair in 20000..32000 for the TPM relay".to_owned(),
        source: io::Error::from(io::ErrorKind::AddrInUse),
    })
}

fn spawn_acceptor(
    listener: TcpListener,
    upstream: u16,
    delay: Option<(Duration, Arc<AtomicBool>)>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for client in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let (Ok(client), Ok(server)) = (client, TcpStream::connect(("127.0.0.1", upstream)))
            else {
                continue;
            };
            let delay = delay.clone();
            thread::spawn(move || relay(client, server, delay));
        }
    })
}

/// Client bytes go to the server as they come; the server's answers go back whole, each held
/// for the delay while armed (or as they come, without a delay: the control channel).
fn relay(client: TcpStream, server: TcpStream, delay: Option<(Duration, Arc<AtomicBool>)>) {
    let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let forward = thread::spawn(move || {
        let _ = io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Write);
    });
    let (mut server_in, mut client_out) = (server, client);
    match delay {
        None => {
            let _ = io::copy(&mut server_in, &mut client_out);
        }
        Some((delay, armed)) => {
            while let Some(response) = read_tpm_response(&mut server_in) {
                if armed.load(Ordering::SeqCst) {
                    thread::sleep(delay);
                }
                if client_out.write_all(&response).is_err() {
                    break;
                }
            }
        }
    }
    let _ = client_out.shutdown(Shutdown::Write);
    let _ = forward.join();
}

/// One TPM response: tag (2 bytes), size (4, big-endian, the whole response), code (4), rest.
fn read_tpm_response(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut response = vec![0; TPM_HEADER_LEN];
    stream.read_exact(&mut response).ok()?;
    let size = response
        .get(2..6)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .and_then(|size| usize::try_from(size).ok())
        .filter(|size| (TPM_HEADER_LEN..=MAX_TPM_RESPONSE).contains(size))?;
    response.resize(size, 0);
    stream
        .read_exact(response.get_mut(TPM_HEADER_LEN..)?)
        .ok()?;
    Some(response)
}

/// One VM of the storm: its state directory, the key dealt to it and where its frontend writes
/// the key it rebuilds.
struct Vm {
    id: String,
    dir: PathBuf,
    secret: PathBuf,
    out: PathBuf,
    /// (socket, fragment file) of each of its fragment devices.
    devices: Vec<(PathBuf, PathBuf)>,
    log: PathBuf,
}

impl Vm {
    fn broker_socket(&self) -> PathBuf {
        self.dir.join("broker.sock")
    }

    fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.toml")
    }
}

/// Deals N keys with `keyshard init`, one after the other (setup, not measured).
fn deal(bins: &Binaries, work: &Path, root: &Path, n: usize, tcti: &str) -> Result<Vec<Vm>> {
    let private = work.join("private");
    let sockets = work.join("sock");
    let logs = work.join("log");
    for dir in [root, &private, &sockets, &logs] {
        fs::create_dir_all(dir).map_err(io_context(format!("creating {}", dir.display())))?;
    }
    let mut vms = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("vm{i}");
        let dir = root.join(&id);
        let secret = private.join(format!("{id}.key"));
        write_private(&secret, &random_bytes(KEY_LEN)?)?;
        run_tool(
            "keyshard init",
            Command::new(&bins.keyshard)
                .arg("init")
                .arg("--policy")
                .arg(&bins.policy)
                .arg("--state-dir")
                .arg(&dir)
                .arg("--vm-id")
                .arg(&id)
                .arg("--secret-file")
                .arg(&secret)
                .arg("--recovery-file")
                .arg(private.join(format!("{id}.recovery")))
                .arg("--tcti")
                .arg(tcti)
                .env("RUST_LOG", "error"),
        )?;
        let devices = fragment_files(&dir.join("fragments"))?
            .into_iter()
            .enumerate()
            .map(|(j, fragment)| (sockets.join(format!("{id}-{j}.sock")), fragment))
            .collect();
        vms.push(Vm {
            out: private.join(format!("{id}.out")),
            log: logs.join(format!("{id}.guest.log")),
            id,
            dir,
            secret,
            devices,
        });
    }
    for vm in &vms {
        let paths = vm.devices.iter().map(|(socket, _)| socket.clone());
        for path in paths.chain([vm.broker_socket()]) {
            let len = path.as_os_str().len();
            if len > SOCKET_PATH_MAX {
                return Err(StormError::SocketPathTooLong { path, len });
            }
        }
    }
    Ok(vms)
}

/// The `.ksf` files `keyshard init` wrote, in name order.
fn fragment_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_context(format!("listing {}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "ksf"))
        .collect();
    files.sort();
    Ok(files)
}

/// One `vhost-keyshard` serving every VM's fragment devices.
fn start_fragment_daemon(bins: &Binaries, vms: &[Vm], logs: &Path) -> Result<Daemon> {
    let mut command = Command::new(&bins.vhost_keyshard);
    for (socket, fragment) in vms.iter().flat_map(|vm| &vm.devices) {
        command.arg("--device").arg(format!(
            "socket={},fragment={}",
            socket.display(),
            fragment.display()
        ));
    }
    Ok(Daemon::start(
        "vhost-keyshard",
        &mut command,
        "ready",
        READY_LIMIT,
        &logs.join("vhost-keyshard.stderr.log"),
    )?)
}

fn start_coordinators(
    bins: &Binaries,
    mode: CoordinatorMode,
    root: &Path,
    vms: &[Vm],
    tcti: &str,
    logs: &Path,
) -> Result<Vec<Daemon>> {
    match mode {
        CoordinatorMode::StateRoot => {
            let daemon = Daemon::start(
                "keyshard coordinator --state-root",
                Command::new(&bins.keyshard)
                    .arg("coordinator")
                    .arg("--state-root")
                    .arg(root)
                    .arg("--tcti")
                    .arg(tcti),
                "ready:",
                READY_LIMIT,
                &logs.join("coordinator.stderr.log"),
            )?;
            let stdout = daemon.stdout();
            let refused: Vec<&String> = stdout
                .iter()
                .filter(|line| line.starts_with("refused "))
                .collect();
            if !refused.is_empty() {
                return Err(StormError::Refused(
                    refused
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join("; "),
                ));
            }
            let serving = stdout.iter().filter(|l| l.starts_with("serving ")).count();
            if serving != vms.len() {
                return Err(StormError::Refused(format!(
                    "it serves {serving} VMs, not {}: {}",
                    vms.len(),
                    daemon.ready_line()
                )));
            }
            Ok(vec![daemon])
        }
        CoordinatorMode::PerVm => vms
            .iter()
            .map(|vm| {
                Daemon::start(
                    &format!("keyshard coordinator {}", vm.id),
                    Command::new(&bins.keyshard)
                        .arg("coordinator")
                        .arg("--state-dir")
                        .arg(&vm.dir)
                        .arg("--broker")
                        .arg(format!("{}={}", vm.id, vm.broker_socket().display()))
                        .arg("--tcti")
                        .arg(tcti),
                    "ready",
                    READY_LIMIT,
                    &logs.join(format!("coordinator-{}.stderr.log", vm.id)),
                )
                .map_err(StormError::from)
            })
            .collect(),
    }
}

/// What one frontend did.
struct Unlock {
    status: Option<ExitStatus>,
    took: Duration,
}

/// Starts every VM's frontend behind the gate, opens it, and waits for all of them (at most
/// [`STORM_LIMIT`]). Returns the wall time and each VM's outcome, in `vms` order.
fn storm(bins: &Binaries, vms: &[Vm]) -> Result<(Duration, Vec<Unlock>)> {
    let (gate_reader, gate_writer) = io::pipe().map_err(io_context("creating the gate pipe"))?;
    let mut guards = Vec::with_capacity(vms.len());
    for vm in vms {
        let log = fs::File::create(&vm.log)
            .map_err(io_context(format!("creating {}", vm.log.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_context(format!("duplicating {}", vm.log.display())))?;
        let gate = gate_reader
            .try_clone()
            .map_err(io_context("duplicating the gate pipe"))?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(GATE_SCRIPT)
            .arg(&bins.guest)
            .arg("unlock")
            .arg("--manifest")
            .arg(vm.manifest());
        for (socket, _) in &vm.devices {
            command.arg("--vhost-user").arg(socket);
        }
        command
            .arg("--broker-vhost-user")
            .arg(vm.broker_socket())
            .arg("--timeout")
            .arg(GUEST_TIMEOUT_SECS.to_string())
            .arg("--out")
            .arg(&vm.out)
            .arg("--force")
            .stdin(Stdio::from(gate))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        guards.push(ChildGuard::spawn(
            &format!("keyshard-guest {}", vm.id),
            &mut command,
        )?);
    }
    drop(gate_reader);
    wait_at_gate(&guards);

    let start = Instant::now();
    drop(gate_writer);
    let deadline = start + STORM_LIMIT;
    let outcomes = thread::scope(|scope| {
        let waiters: Vec<_> = guards
            .iter_mut()
            .map(|guard| {
                scope.spawn(move || -> Result<Unlock> {
                    let status = guard.wait_until(deadline)?;
                    let took = start.elapsed();
                    if status.is_none() {
                        guard.kill()?;
                    }
                    Ok(Unlock { status, took })
                })
            })
            .collect();
        waiters
            .into_iter()
            .map(|waiter| {
                waiter.join().unwrap_or_else(|_| {
                    Err(StormError::Io {
                        context: "a waiter thread panicked".to_owned(),
                        source: io::Error::other("panic"),
                    })
                })
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let wall = outcomes.iter().map(|u| u.took).max().unwrap_or_default();
    Ok((wall, outcomes))
}

/// Waits (at most [`GATE_SETTLE_LIMIT`]) until every frontend's shell is blocked reading the
/// gate, so the start is not spread by process creation. Where the kernel does not show it
/// (`/proc/PID/wchan`), it goes on after the limit: the figures then include shell start-up.
fn wait_at_gate(guards: &[ChildGuard]) {
    let until = Instant::now() + GATE_SETTLE_LIMIT;
    while Instant::now() < until {
        let waiting = guards
            .iter()
            .filter(|guard| {
                fs::read_to_string(format!("/proc/{}/wchan", guard.pid()))
                    .is_ok_and(|wchan| wchan.contains("pipe_read") || wchan.contains("pipe_wait"))
            })
            .count();
        if waiting == guards.len() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "bench-storm: not every frontend was seen waiting at the gate within {} s; starting anyway",
        GATE_SETTLE_LIMIT.as_secs()
    );
}

/// Every VM's frontend exited 0 and wrote the key dealt to that VM. Otherwise the error names
/// the VMs that failed (the first [`REPORTED_FAILURES`]) with their exit status and what their
/// frontend said, and what the coordinators and the fragment daemon logged as going wrong (never
/// key bytes).
fn verify(vms: &[Vm], outcomes: &[Unlock], coordinators: &[Daemon], daemon: &Daemon) -> Result<()> {
    let mut failures = Vec::new();
    for (vm, unlock) in vms.iter().zip(outcomes) {
        let problem = match unlock.status {
            None => Some(format!(
                "still running after {} s (killed)",
                STORM_LIMIT.as_secs()
            )),
            Some(status) if !status.success() => Some(describe_status(&status)),
            Some(_) => match (fs::read(&vm.out), fs::read(&vm.secret)) {
                (Ok(got), Ok(dealt)) if got == dealt => None,
                (Ok(_), Ok(_)) => Some("the key it wrote is not the key dealt".to_owned()),
                (Err(e), _) => Some(format!("no key written to {}: {e}", vm.out.display())),
                (_, Err(e)) => Some(format!("cannot read {}: {e}", vm.secret.display())),
            },
        };
        if let Some(problem) = problem {
            let log = fs::read_to_string(&vm.log).unwrap_or_default();
            failures.push(format!(
                "  {} after {:.0} ms: {problem}:\n    {}",
                vm.id,
                ms(unlock.took),
                log.lines().take(12).collect::<Vec<_>>().join("\n    ")
            ));
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    let failed = failures.len();
    let mut report: Vec<String> = failures.into_iter().take(REPORTED_FAILURES).collect();
    if failed > REPORTED_FAILURES {
        report.push(format!("  ... and {} more", failed - REPORTED_FAILURES));
    }
    let coordinator_lines: Vec<String> = coordinators
        .iter()
        .flat_map(|c| c.stdout())
        .filter(|line| line.starts_with("refused ") || line.starts_with("stopped serving "))
        .collect();
    let mut logged = coordinator_lines;
    logged.extend(
        coordinators
            .iter()
            .map(Daemon::stderr)
            .chain([daemon.stderr()])
            .flat_map(|text| {
                text.lines()
                    .filter(|l| l.contains(": warn: ") || l.contains(": error: "))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            }),
    );
    report.push(format!(
        "the coordinator and vhost-keyshard logged {} refusals, warnings and errors{}",
        logged.len(),
        if logged.is_empty() { "" } else { ", kinds:" }
    ));
    report.extend(distinct_kinds(&logged));
    Err(StormError::Storm {
        failed,
        n: vms.len(),
        report: report.join("\n"),
    })
}

/// Log lines grouped by what they say once VM ids and paths are taken out, most frequent first,
/// each with its count and one example.
fn distinct_kinds(lines: &[String]) -> Vec<String> {
    let mut kinds: BTreeMap<String, (usize, &str)> = BTreeMap::new();
    for line in lines {
        let kind: String = line
            .split_whitespace()
            .filter(|word| !word.contains('/') && !word.starts_with("vm"))
            .collect::<Vec<_>>()
            .join(" ");
        kinds.entry(kind).or_insert((0, line)).0 += 1;
    }
    let mut kinds: Vec<(usize, &str)> = kinds.into_values().collect();
    kinds.sort_by_key(|kind| std::cmp::Reverse(kind.0));
    kinds
        .into_iter()
        .take(REPORTED_FAILURES)
        .map(|(count, example)| format!("  {count} x {example}"))
        .collect()
}

/// A process's memory, threads and open files, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct ProcFigures {
    rss_kib: u64,
    hwm_kib: u64,
    threads: u64,
    fds: u64,
}

impl ProcFigures {
    fn read(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path).map_err(io_context(format!("reading {path}")))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or(0)
        };
        let fds = fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| entries.count())
            .map_err(io_context(format!("listing /proc/{pid}/fd")))?;
        Ok(Self {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
            threads: field("Threads:"),
            fds: u64::try_from(fds).unwrap_or(u64::MAX),
        })
    }

    /// The sum over several processes (the per-VM coordinators).
    fn sum(all: impl IntoIterator<Item = Self>) -> Self {
        all.into_iter().fold(Self::default(), |a, b| Self {
            rss_kib: a.rss_kib + b.rss_kib,
            hwm_kib: a.hwm_kib + b.hwm_kib,
            threads: a.threads + b.threads,
            fds: a.fds + b.fds,
        })
    }

    fn describe(&self) -> String {
        format!(
            "VmRSS {:.1} MiB, VmHWM {:.1} MiB, {} threads, {} open files",
            mib(self.rss_kib),
            mib(self.hwm_kib),
            self.threads,
            self.fds
        )
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// CPU time (user and system) a process has used so far, from `/proc/PID/stat` (clock ticks,
/// usually 10 ms).
fn process_cpu(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).map_err(io_context(format!("reading {path}")))?;
    // The fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf(3) takes a constant and returns a number.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second)
        .ok()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Ok(Duration::from_micros(ticks * 1_000_000 / per_second))
}

/// CPU time (user and system) of this process's children that have been waited for.
fn reaped_children_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU time used by each part of the host during the storm.
#[derive(Debug, Clone, Copy, Default)]
struct StormCpu {
    frontends: Duration,
    coordinator: Duration,
    daemon: Duration,
    swtpm: Duration,
}

impl StormCpu {
    fn now(coordinators: &[Daemon], daemon: &Daemon, swtpm: &Swtpm) -> Result<Self> {
        let mut coordinator = Duration::ZERO;
        for c in coordinators {
            coordinator += process_cpu(c.pid())?;
        }
        Ok(Self {
            frontends: reaped_children_cpu(),
            coordinator,
            daemon: process_cpu(daemon.pid())?,
            swtpm: process_cpu(swtpm.pid())?,
        })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            frontends: self.frontends.saturating_sub(before.frontends),
            coordinator: self.coordinator.saturating_sub(before.coordinator),
            daemon: self.daemon.saturating_sub(before.daemon),
            swtpm: self.swtpm.saturating_sub(before.swtpm),
        }
    }
}

/// The coordinator's count from `stopped: tpm operations: TOTAL (AT_READY before ready)`.
#[derive(Debug, Clone, Copy)]
struct TpmOperations {
    total: u64,
    at_ready: u64,
}

impl TpmOperations {
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("stopped: tpm operations:")?.trim();
        let (total, rest) = rest.split_once(' ')?;
        let at_ready = rest.trim().strip_prefix('(')?.split_whitespace().next()?;
        Some(Self {
            total: total.parse().ok()?,
            at_ready: at_ready.parse().ok()?,
        })
    }

    fn after_ready(&self) -> u64 {
        self.total.saturating_sub(self.at_ready)
    }
}

const STOPPED_PREFIX: &str = "stopped: tpm operations:";

/// Stops the `--state-root` coordinator and reads its TPM operation count.
fn stop_coordinator(daemon: &mut Daemon) -> Result<TpmOperations> {
    daemon.stop()?;
    // Its stdout is read on a thread: give it a moment to reach the last line.
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let lines = daemon.stdout();
        if let Some(ops) = lines.iter().find_map(|line| TpmOperations::parse(line)) {
            return Ok(ops);
        }
        if Instant::now() >= until {
            return Err(StormError::MissingLine {
                what: daemon.name().to_owned(),
                prefix: STOPPED_PREFIX,
                stdout: lines.join("\n"),
                stderr: daemon.stderr(),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Everything measured for one N.
struct Figures {
    n: usize,
    mode: CoordinatorMode,
    deal: Duration,
    coordinator_ready: Duration,
    wall: Duration,
    p50: Duration,
    p99: Duration,
    first: Duration,
    cpu: StormCpu,
    /// TPM operations the coordinator counted after `ready:` (state-root mode only).
    operations: Option<TpmOperations>,
    /// Commands swtpm processed while the coordinators started, and during the storm.
    startup_commands: usize,
    storm_commands: Vec<TpmCommand>,
    coordinator_idle: ProcFigures,
    coordinator: ProcFigures,
    daemon: ProcFigures,
}

impl Figures {
    fn operations_per_release(&self) -> Option<f64> {
        self.operations
            .map(|ops| ops.after_ready() as f64 / self.n as f64)
    }

    fn commands_per_release(&self) -> f64 {
        self.storm_commands.len() as f64 / self.n as f64
    }

    fn command_breakdown(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for command in &self.storm_commands {
            *counts.entry(command.name()).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(name, count)| format!("{name} {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn line(&self) -> String {
        let operations = match (self.operations, self.operations_per_release()) {
            (Some(ops), Some(per)) => format!(
                "{} TPM operations ({per:.3} per release; {} before ready)",
                ops.after_ready(),
                ops.at_ready
            ),
            _ => "TPM operations not reported (per-VM coordinators)".to_owned(),
        };
        format!(
            "storm N={} ({}): all {} keys verified; wall {:.0} ms, first {:.0} ms, p50 {:.0} ms, \
             p99 {:.0} ms; CPU in the storm: frontends {:.0} ms ({:.1} ms each), coordinator \
             {:.0} ms, vhost-keyshard {:.0} ms, swtpm {:.0} ms, of {:.0} ms on {} CPUs; \
             {operations}; swtpm: {} commands in the storm ({:.3} per release: {}), {} while \
             the coordinator started; coordinator {} (at ready: VmRSS {:.1} MiB); vhost-keyshard \
             ({} devices) {}; dealing took {:.1} s, the coordinator was ready after {:.2} s",
            self.n,
            self.mode.label(),
            self.n,
            ms(self.wall),
            ms(self.first),
            ms(self.p50),
            ms(self.p99),
            ms(self.cpu.frontends),
            ms(self.cpu.frontends) / self.n as f64,
            ms(self.cpu.coordinator),
            ms(self.cpu.daemon),
            ms(self.cpu.swtpm),
            ms(self.wall) * cpus() as f64,
            cpus(),
            self.storm_commands.len(),
            self.commands_per_release(),
            self.command_breakdown(),
            self.startup_commands,
            self.coordinator.describe(),
            mib(self.coordinator_idle.rss_kib),
            2 * self.n,
            self.daemon.describe(),
            self.deal.as_secs_f64(),
            self.coordinator_ready.as_secs_f64(),
        )
    }
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// One storm of `n` VMs, set up from scratch and torn down after.
fn run(
    bins: &Binaries,
    mode: CoordinatorMode,
    tpm_delay: Option<Duration>,
    n: usize,
) -> Result<Figures> {
    let keep = std::env::var("KEYSHARD_E2E_KEEP").is_ok_and(|v| v == "1");
    let mut work = tempfile::Builder::new()
        .prefix("ks-storm-")
        .tempdir()
        .map_err(io_context("creating a work directory"))?;
    if keep {
        work.disable_cleanup(true);
        eprintln!("bench-storm: N={n}: keeping {}", work.path().display());
    }
    let root = work.path().join("root");
    let logs = work.path().join("log");
    // Declared first among the processes, so it is stopped last (after the coordinator).
    let swtpm = Swtpm::start_with_command_log(
        &work.path().join("swtpm"),
        &work.path().join("swtpm-commands.log"),
    )?;
    let dealing = Instant::now();
    let vms = deal(bins, work.path(), &root, n, &swtpm.tcti())?;
    let deal_time = dealing.elapsed();

    let daemon = start_fragment_daemon(bins, &vms, &logs)?;
    let slow_tpm = tpm_delay
        .map(|delay| SlowTpm::start(&swtpm, delay))
        .transpose()?;
    let tcti = slow_tpm
        .as_ref()
        .map_or_else(|| swtpm.tcti(), SlowTpm::tcti);
    let before_coordinator = swtpm.command_log_len()?;
    let starting = Instant::now();
    let mut coordinators = start_coordinators(bins, mode, &root, &vms, &tcti, &logs)?;
    let coordinator_ready = starting.elapsed();
    if let Some(slow_tpm) = &slow_tpm {
        slow_tpm.arm();
    }
    let at_ready = swtpm.command_log_len()?;
    let startup_commands = swtpm
        .commands_logged_since(before_coordinator)?
        .len()
        .saturating_sub(swtpm.commands_logged_since(at_ready)?.len());
    let coordinator_idle = coordinator_figures(&coordinators)?;

    let cpu_before = StormCpu::now(&coordinators, &daemon, &swtpm)?;
    let (wall, outcomes) = storm(bins, &vms)?;
    let cpu = StormCpu::now(&coordinators, &daemon, &swtpm)?.since(&cpu_before);
    let storm_commands = swtpm.commands_logged_since(at_ready)?;
    let coordinator = coordinator_figures(&coordinators)?;
    let daemon_figures = ProcFigures::read(daemon.pid())?;
    verify(&vms, &outcomes, &coordinators, &daemon)?;

    let operations = match (mode, coordinators.as_mut_slice()) {
        (CoordinatorMode::StateRoot, [coordinator]) => Some(stop_coordinator(coordinator)?),
        _ => None,
    };
    let mut took: Vec<Duration> = outcomes.iter().map(|u| u.took).collect();
    took.sort_unstable();
    Ok(Figures {
        n,
        mode,
        deal: deal_time,
        coordinator_ready,
        wall,
        p50: percentile(&took, 0.50),
        p99: percentile(&took, 0.99),
        first: took.first().copied().unwrap_or_default(),
        cpu,
        operations,
        startup_commands,
        storm_commands,
        coordinator_idle,
        coordinator,
        daemon: daemon_figures,
    })
}

/// The coordinator's figures, summed over the per-VM coordinators.
fn coordinator_figures(coordinators: &[Daemon]) -> Result<ProcFigures> {
    let each = coordinators
        .iter()
        .map(|c| ProcFigures::read(c.pid()))
        .collect::<Result<Vec<_>>>()?;
    Ok(ProcFigures::sum(each))
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn print_table(all: &[Figures]) {
    println!();
    println!(
        "{:>5} {:>9} {:>8} {:>8} {:>10} {:>11} {:>16} {:>16} {:>8}",
        "N",
        "wall ms",
        "p50 ms",
        "p99 ms",
        "tpm ops/r",
        "swtpm cmd/r",
        "coord RSS/HWM",
        "vhost RSS/HWM",
        "fds c/v"
    );
    for f in all {
        let ops = f
            .operations_per_release()
            .map_or_else(|| "-".to_owned(), |per| format!("{per:.3}"));
        println!(
            "{:>5} {:>9.0} {:>8.0} {:>8.0} {:>10} {:>11.3} {:>7.1}/{:<5.1}MiB {:>7.1}/{:<5.1}MiB {:>4}/{}",
            f.n,
            ms(f.wall),
            ms(f.p50),
            ms(f.p99),
            ops,
            f.commands_per_release(),
            mib(f.coordinator.rss_kib),
            mib(f.coordinator.hwm_kib),
            mib(f.daemon.rss_kib),
            mib(f.daemon.hwm_kib),
            f.coordinator.fds,
            f.daemon.fds,
        );
    }
    if let Some(f) = all.iter().find(|f| f.n == GOAL_N) {
        println!();
        println!("goals for N = {GOAL_N} ({}):", f.mode.label());
        println!(
            "  every key within {} s: {} (wall {:.0} ms)",
            GOAL_WALL.as_secs(),
            verdict(f.wall <= GOAL_WALL),
            ms(f.wall)
        );
        match f.operations_per_release() {
            Some(per) => println!(
                "  at most {GOAL_TPM_PER_RELEASE} TPM operations per release after start-up \
                 (coordinator's count): {} ({per:.3})",
                verdict(per <= GOAL_TPM_PER_RELEASE)
            ),
            None => println!("  TPM operations per release: not reported by per-VM coordinators"),
        }
        let per = f.commands_per_release();
        println!(
            "  at most {GOAL_TPM_PER_RELEASE} TPM commands per release after start-up \
             (swtpm's log): {} ({per:.3})",
            verdict(per <= GOAL_TPM_PER_RELEASE)
        );
        println!(
            "  coordinator under {} MiB resident (peak, VmHWM): {} ({:.1} MiB)",
            GOAL_RSS_KIB / 1024,
            verdict(f.coordinator.hwm_kib < GOAL_RSS_KIB),
            mib(f.coordinator.hwm_kib)
        );
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(io_context(format!("writing {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(io_context(format!("chmod {}", path.display())))
}

/// This process's soft and hard limits on open files, which the daemons inherit. Both daemons
/// raise their soft limit to the hard one themselves (at 100 VMs each needs more than the
/// usual default of 1,024 during a storm); the bench leaves its own alone, so that what it
/// measures is what an operator gets.
fn open_files_limit() -> Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(StormError::Io {
            context: "reading the open files limit".to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// What the environment asks for, and the open files limit.
struct Settings {
    bins: Binaries,
    mode: CoordinatorMode,
    sizes: Vec<usize>,
    tpm_delay: Option<Duration>,
    files_before: u64,
    files: u64,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let bins = Binaries::from_env()?;
        let mode = CoordinatorMode::from_env()?;
        let sizes = sizes_from_env()?;
        let tpm_delay = tpm_delay_from_env()?;
        let (files_before, files) = open_files_limit()?;
        Ok(Self {
            bins,
            mode,
            sizes,
            tpm_delay,
            files_before,
            files,
        })
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("bench-storm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Settings {
        bins,
        mode,
        sizes,
        tpm_delay,
        files_before,
        files,
    } = settings;
    let files = format!(
        "open files limit {files_before} (hard {files}; the daemons raise theirs to the hard one)"
    );
    let delay = tpm_delay.map_or_else(String::new, |d| {
        format!(
            ", every TPM response held {} ms during the storm",
            d.as_millis()
        )
    });
    println!(
        "bench-storm: N = {sizes:?}, {}{delay}, {} available CPUs, {files}, load average {}",
        mode.label(),
        cpus(),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut all = Vec::new();
    for n in sizes {
        match run(&bins, mode, tpm_delay, n) {
            Ok(figures) => {
                println!("{}", figures.line());
                all.push(figures);
            }
            Err(e) => {
                eprintln!("bench-storm: N={n}: {e}");
                print_table(&all);
                return ExitCode::FAILURE;
            }
        }
    }
    print_table(&all);
    ExitCode::SUCCESS
}
