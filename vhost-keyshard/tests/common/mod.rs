//! Shared by the daemon tests: a dealt key on disk, and a daemon process that is killed when the
//! test ends, pass or fail.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::{HolderClass, KeyId};
use keyshard_e2e::process::{LineWait, read_lines_in_background, wait_for_line};

/// A random 32-byte key split k of n, fragment files written to a temporary directory.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub secret: Vec<u8>,
    pub dealer: ed25519_dalek::SigningKey,
    pub k: u8,
}

impl Setup {
    pub fn new(k: u8, n: u8) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dealer = keyshard_core::keys::generate().unwrap();
        let secret = keyshard_core::keys::generate().unwrap().to_bytes().to_vec();
        let plan = DealPlan {
            key_id: KeyId::new("root").unwrap(),
            epoch: 1,
            k,
            holders: HolderSlot::numbered(HolderClass::Vhd, n).collect(),
        };
        for fragment in dealer::deal(&secret, &plan, &dealer).unwrap() {
            let path = dir
                .path()
                .join(format!("fragment-{}.ksf", fragment.header().index));
            std::fs::write(path, fragment.encoded()).unwrap();
        }
        Self {
            dir,
            secret,
            dealer,
            k,
        }
    }

    pub fn fragment(&self, index: u8) -> PathBuf {
        self.dir.path().join(format!("fragment-{index}.ksf"))
    }

    pub fn socket(&self, index: u8) -> PathBuf {
        self.dir.path().join(format!("vhd-{index}.sock"))
    }

    /// `--device socket=...,fragment=...` for each holder index.
    pub fn device_args(&self, indices: &[u8]) -> Vec<String> {
        indices
            .iter()
            .flat_map(|&i| {
                [
                    "--device".to_owned(),
                    format!(
                        "socket={},fragment={}",
                        self.socket(i).display(),
                        self.fragment(i).display()
                    ),
                ]
            })
            .collect()
    }
}

/// A running `vhost-keyshard`; killed on drop.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Its log lines (stderr), when started with [`Daemon::start_logged`].
    log: Option<mpsc::Receiver<String>>,
}

impl Daemon {
    pub fn start(args: &[String]) -> Self {
        Self::spawn(args, None)
    }

    /// Starts the daemon logging at `level`, its log lines kept for [`Daemon::wait_for_log`].
    pub fn start_logged(args: &[String], level: &str) -> Self {
        Self::spawn(args, Some(level))
    }

    /// Waits (at most `timeout`) for a log line containing `text`, skipping the lines before.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> Option<String> {
        let log = self.log.as_ref()?;
        let until = std::time::Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let line = log.recv_timeout(left).ok()?;
            if line.contains(text) {
                return Some(line);
            }
        }
    }

    fn spawn(args: &[String], log_level: Option<&str>) -> Self {
        let level = match log_level {
            Some(level) => level.to_owned(),
            None => std::env::var("DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_vhost-keyshard"))
            .args(args)
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(if log_level.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .unwrap();
        let log = child
            .stderr
            .take()
            .map(|stderr| read_lines_in_background(stderr, Arc::default()));
        // A thread drains stdout so the daemon never blocks on a full pipe, and so that a daemon
        // that never gets ready fails the test instead of hanging it.
        let stdout = child.stdout.take().unwrap();
        let lines = read_lines_in_background(stdout, Arc::default());
        Self { child, lines, log }
    }

    /// Waits (at most 10 s) for the daemon's first line, the ready line, and returns it.
    pub fn ready_line(&self) -> String {
        match wait_for_line(&self.lines, "", Duration::from_secs(10)) {
            LineWait::Found(line) => line,
            other => panic!("vhost-keyshard did not get ready within 10 s: {other:?}"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        self.child.wait().unwrap()
    }

    /// Kills the daemon the hard way, as a crash would: its sockets stay behind.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
