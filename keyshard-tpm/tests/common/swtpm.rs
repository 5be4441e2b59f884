//! A throw-away swtpm (TPM 2.0 simulator) on 127.0.0.1: state in a temporary directory, a
//! free port pair below the ephemeral range, killed on drop even when the test panics.
//! A missing `swtpm` fails the test with instructions; it never skips.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm. The TCTI uses `port` for TPM commands and `port + 1` for control.
pub struct Swtpm {
    child: Child,
    port: u16,
    state: PathBuf,
    // Declared last: removed after the process is gone.
    _dir: Option<tempfile::TempDir>,
}

impl Swtpm {
    /// A fresh TPM: new seeds, PCRs reset, no persistent keys.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_path_buf();
        let (child, port) = launch(&state);
        Self {
            child,
            port,
            state,
            _dir: Some(dir),
        }
    }

    /// "swtpm:host=127.0.0.1,port=P", for `Tpm::open` and `TPM2TOOLS_TCTI`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Stops swtpm (SIGTERM, so it saves its state) and starts it again on the same state and
    /// a new port: a reboot. Seeds and persistent keys survive; PCRs are reset.
    pub fn restart(&mut self) {
        stop(&mut self.child);
        let (child, port) = launch(&self.state);
        self.child = child;
        self.port = port;
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn stop(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on a child we spawned; if it was already reaped, try_wait below copes.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts swtpm on `state`, retrying on another port pair when it loses a port race.
fn launch(state: &Path) -> (Child, u16) {
    let mut last_failure = String::new();
    for attempt in 0..8u32 {
        let port = free_port_pair(attempt);
        let log = state.join("swtpm.log");
        let spawned = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .arg("--log")
            .arg(format!("file={},level=1", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "swtpm is not installed: the TPM tests need it (`make deps`, or \
                 `apt-get install swtpm libtss2-dev`)"
            ),
            Err(e) => panic!("cannot start swtpm: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                }
                last_failure = format!("swtpm exited with {status}: {}", stderr.trim());
                if stderr.contains("Address already in use") {
                    eprintln!("swtpm lost port {port} to another process; retrying");
                    break;
                }
                panic!("{last_failure}");
            }
            // The control port is bound after the server port: when it answers, both do.
            if TcpStream::connect(("127.0.0.1", port + 1)).is_ok() {
                return (child, port);
            }
            if Instant::now() > deadline {
                stop(&mut child);
                panic!(
                    "swtpm did not listen on ports {port}/{} within 10 s",
                    port + 1
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("could not start swtpm on a free port: {last_failure}");
}

/// P such that P and P+1 look free, from 20000..32000: below Linux's ephemeral range
/// (32768..60999), where the thousands of TIME_WAIT sockets the swtpm TCTI leaves (one TCP
/// connection per TPM command) would make collisions likely.
fn free_port_pair(salt: u32) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(salt.wrapping_mul(7919));
    for i in 0..500u32 {
        let offset = u16::try_from(seed.wrapping_add(i.wrapping_mul(37)) % 6000).unwrap();
        let port = 20000 + offset * 2;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port pair in 20000..32000");
}
