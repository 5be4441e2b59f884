//! One `keyshard coordinator --state-root` process for a whole host (issue 8, item 2), against a
//! software TPM: three VMs with their own keys and policies unlock through it; a fourth is added
//! and the first removed while the others keep unlocking, each within 2 s and without
//! disturbing them; a VM directory whose state is broken is refused with the reason while the
//! others are served.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::devices::Devices;
use common::swtpm::Swtpm;
use guest_driver::agent::{self, Inputs};
use guest_driver::broker::mailbox::{MailboxSpec, VhostUserMailbox};
use guest_driver::broker::shares::InProcessFetcher;
use guest_driver::broker::{BrokerClient, BrokerError};
use guest_driver::source::SourceSpec;
use keyshard_core::HolderClass;
use keyshard_core::manifest::Manifest;
use keyshard_e2e::process::{LineWait, read_lines_in_background, wait_for_line};
use vhost_keyshard::fragment_volume::FragmentVolume;

const VHD_TPM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/vhd-tpm.toml");
const VHD_ONLY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/vhd-only.toml");
/// A third policy: one fragment device and the TPM share, sealed to PCR 7 only.
const VHD1_TPM_PCR7: &str = "allow_host_reachable_quorum = true\nthreshold = 2\n\n[holders]\nvhd = 1\ntpm = 1\n\n[tpm]\npcr_bank = \"sha256\"\npcrs = [7]\n";
/// What the issue allows between a change under the root and the coordinator following it.
const FOLLOW_LIMIT: Duration = Duration::from_secs(2);

/// The coordinator process, killed on drop; its stdout lines as they come.
struct Coordinator {
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Coordinator {
    fn start(root: &Path, tcti: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyshard"))
            .arg("coordinator")
            .arg("--state-root")
            .arg(root)
            .arg("--tcti")
            .arg(tcti)
            .env("RUST_LOG", "off")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let lines = read_lines_in_background(child.stdout.take().unwrap(), seen.clone());
        Self { child, lines, seen }
    }

    /// The next line starting with `prefix`, within `limit`.
    fn expect(&self, prefix: &str, limit: Duration) -> String {
        match wait_for_line(&self.lines, prefix, limit) {
            LineWait::Found(line) => line,
            other => panic!(
                "no line {prefix:?} within {limit:?} ({other:?}); the coordinator said: {:?}",
                self.seen.lock().unwrap()
            ),
        }
    }

    fn said(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        self.child.wait().unwrap()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `keyshard init` of VM `name` under `root` with `policy` and its own secret.
fn init(root: &Path, name: &str, policy: &Path, tcti: &str) -> Vec<u8> {
    let secret: Vec<u8> = format!("the volume key of {name:>16}!")
        .into_bytes()
        .into_iter()
        .take(32)
        .collect();
    let secret_file = root.parent().unwrap().join(format!("{name}.secret"));
    std::fs::write(&secret_file, &secret).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyshard"));
    command
        .arg("init")
        .arg("--policy")
        .arg(policy)
        .arg("--state-dir")
        .arg(root.join(name))
        .arg("--secret-file")
        .arg(&secret_file)
        .arg("--tcti")
        .arg(tcti);
    if std::fs::read_to_string(policy)
        .unwrap()
        .contains("\nrecovery = 1")
    {
        let recovery = root.parent().unwrap().join(format!("{name}.recovery"));
        command.arg("--recovery-file").arg(recovery);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "init {name}: {out:?}");
    secret
}

/// A VM as its guest would see it: the fragment devices of its state directory served on
/// sockets, and its broker socket under the root.
struct Guest {
    name: String,
    manifest: Manifest,
    fragments: Vec<PathBuf>,
    broker: PathBuf,
    secret: Vec<u8>,
    _devices: Devices,
}

impl Guest {
    fn new(root: &Path, name: &str, secret: Vec<u8>) -> Self {
        let dir = root.join(name);
        let manifest =
            Manifest::parse(&std::fs::read_to_string(dir.join("manifest.toml")).unwrap()).unwrap();
        let mut devices = Devices::new();
        let fragments = manifest
            .holders
            .iter()
            .filter(|h| h.class == HolderClass::Vhd)
            .map(|h| {
                let file = dir.join("fragments").join(format!("{}.ksf", h.id));
                let volume = FragmentVolume::load(&[file], Some(h.id.clone())).unwrap();
                devices.serve(h.id.as_str(), Arc::new(volume))
            })
            .collect();
        Self {
            name: name.to_owned(),
            manifest,
            fragments,
            broker: dir.join("broker.sock"),
            secret,
            _devices: devices,
        }
    }

    /// Rebuilds the key as keyshard-guest does (fragments over vhost-user, the attested share
    /// through the broker) and checks it is this VM's.
    fn unlock(&self) -> Result<(), String> {
        let sources = self
            .fragments
            .iter()
            .map(|socket| SourceSpec::VhostUser(socket.clone()).into_source(Path::new("/sys")))
            .collect();
        let broker = MailboxSpec::VhostUser(self.broker.clone()).into_mailbox(Path::new("/sys"));
        let inputs = Inputs {
            sources,
            broker: Some(Box::new(InProcessFetcher::new(broker, None))),
            discovery: None,
        };
        let outcome = agent::unlock_with(&self.manifest, inputs, Duration::from_secs(10))
            .map_err(|e| format!("{}: {e}", self.name))?;
        if outcome.secret.as_slice() != self.secret.as_slice() {
            return Err(format!("{}: rebuilt another key", self.name));
        }
        Ok(())
    }
}

/// Unlocks `guest` again and again until `stop`, under twice a second (the coordinator's
/// per-VM rate), counting each in `done`; returns the first failure.
fn keep_unlocking(guest: &Guest, stop: &AtomicBool, done: &AtomicUsize) -> Result<(), String> {
    while !stop.load(Ordering::SeqCst) && done.load(Ordering::SeqCst) < 40 {
        guest.unlock()?;
        done.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(600));
    }
    Ok(())
}

/// Waits (at most 20 s) until each counter has gone past its value in `past`.
fn wait_past(counters: &[&AtomicUsize], past: &[usize]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while counters
        .iter()
        .zip(past)
        .any(|(now, past)| now.load(Ordering::SeqCst) <= *past)
    {
        assert!(Instant::now() < deadline, "the other VMs stopped unlocking");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_coordinator_serves_vms_added_and_removed_under_its_root_and_refuses_a_broken_one() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let third_policy = work.path().join("vhd1-tpm-pcr7.toml");
    std::fs::write(&third_policy, VHD1_TPM_PCR7).unwrap();

    let secret_a = init(&root, "vm-a", Path::new(VHD_TPM), &tcti);
    let secret_b = init(&root, "vm-b", Path::new(VHD_ONLY), &tcti);
    let secret_c = init(&root, "vm-c", &third_policy, &tcti);
    std::fs::create_dir(root.join("vm-x")).unwrap();
    std::fs::write(root.join("vm-x/state.toml"), "version = 1\nkey_id = \n").unwrap();

    let coordinator = Coordinator::start(&root, &tcti);
    let ready = coordinator.expect("ready:", Duration::from_secs(20));
    assert_eq!(
        ready,
        format!("ready: serving 3 VM(s) under {}", root.display())
    );
    let said = coordinator.said();
    for vm in ["vm-a", "vm-b", "vm-c"] {
        let line = format!(
            "serving {vm} at {}",
            root.join(vm).join("broker.sock").display()
        );
        assert!(said.contains(&line), "{line:?} not in {said:?}");
    }
    let refused = said
        .iter()
        .find(|l| l.starts_with("refused vm-x: "))
        .unwrap_or_else(|| panic!("vm-x not refused: {said:?}"));
    assert!(refused.contains("not a valid state file"), "{refused}");

    // The broken VM's guest hears the reason instead of waiting out its timeout.
    let mut client = BrokerClient::new(Box::new(VhostUserMailbox::new(
        root.join("vm-x/broker.sock"),
    )));
    match client.nonce(Instant::now() + Duration::from_secs(10)) {
        Err(BrokerError::Refused { reason, .. }) => {
            assert!(reason.contains("not a valid state file"), "{reason}")
        }
        other => panic!("vm-x's broker answered {other:?}"),
    }

    let vm_a = Guest::new(&root, "vm-a", secret_a);
    let vm_b = Guest::new(&root, "vm-b", secret_b);
    let vm_c = Guest::new(&root, "vm-c", secret_c);
    for guest in [&vm_a, &vm_b, &vm_c] {
        guest.unlock().unwrap();
    }

    // While vm-b and vm-c keep unlocking: vm-d is added, then vm-a removed.
    let stop = AtomicBool::new(false);
    let (done_b, done_c) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        let b = scope.spawn(|| keep_unlocking(&vm_b, &stop, &done_b));
        let c = scope.spawn(|| keep_unlocking(&vm_c, &stop, &done_c));
        wait_past(&[&done_b, &done_c], &[0, 0]);

        let secret_d = init(&root, "vm-d", Path::new(VHD_TPM), &tcti);
        let added = Instant::now();
        coordinator.expect("serving vm-d at ", FOLLOW_LIMIT);
        let followed = added.elapsed();
        let vm_d = Guest::new(&root, "vm-d", secret_d);
        vm_d.unlock().unwrap();

        std::fs::remove_dir_all(root.join("vm-a")).unwrap();
        let removed = Instant::now();
        let stopped = coordinator.expect("stopped serving vm-a: ", FOLLOW_LIMIT);
        assert!(stopped.contains("is gone"), "{stopped}");
        let error = vm_a.unlock().unwrap_err();
        assert!(error.contains("vm-a"), "{error}");
        eprintln!(
            "vm-d served {:.0} ms after its init ended, vm-a stopped {:.0} ms after its removal",
            followed.as_secs_f64() * 1e3,
            removed.elapsed().as_secs_f64() * 1e3
        );

        // Both keep unlocking after the changes, not only before.
        let after = [done_b.load(Ordering::SeqCst), done_c.load(Ordering::SeqCst)];
        wait_past(&[&done_b, &done_c], &after);
        stop.store(true, Ordering::SeqCst);
        b.join().unwrap().unwrap();
        c.join().unwrap().unwrap();
    });

    // Neither change restarted the VMs that stayed: each was announced once.
    let said = coordinator.said();
    for vm in ["vm-b", "vm-c", "vm-d"] {
        let announced = said
            .iter()
            .filter(|l| l.starts_with(&format!("serving {vm} ")))
            .count();
        assert_eq!(announced, 1, "{vm}: {said:?}");
    }
    assert!(!said.iter().any(|l| l.starts_with("reloaded")), "{said:?}");

    let status = coordinator.terminate();
    assert_eq!(status.code(), Some(0));
    for vm in ["vm-b", "vm-c", "vm-d", "vm-x"] {
        assert!(
            !root.join(vm).join("broker.sock").exists(),
            "{vm}'s socket left behind"
        );
    }
}

/// A second coordinator on the same root would fight the first over every socket: it is
/// refused, naming the lock, and the first keeps serving.
#[test]
fn a_second_coordinator_on_the_same_root_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    init(&root, "vm-b", Path::new(VHD_ONLY), "swtpm:port=1");
    let first = Coordinator::start(&root, "swtpm:port=1");
    first.expect("ready: serving 1 VM(s)", Duration::from_secs(20));
    let second = Command::new(env!("CARGO_BIN_EXE_keyshard"))
        .arg("coordinator")
        .arg("--state-root")
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another coordinator serves this state root"),
        "{stderr}"
    );
    assert!(root.join("vm-b/broker.sock").exists());
    assert_eq!(first.terminate().code(), Some(0));
}
