//! vhost-keyshard processes read over their sockets by the guest-driver frontend, exactly as the
//! guest agent does with `--vhost-user`: serials, volumes, the rebuilt key, and reconnects after
//! the daemon restarts. No QEMU.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Setup};
use guest_driver::agent;
use guest_driver::source::{SourceSpec, VolumeSource};
use guest_driver::vhost_user::{FrontendError, VhostUserBlk};
use keyshard_core::manifest::Manifest;
use keyshard_core::quorum::{QuorumError, RejectReason};
use keyshard_core::volume;
use keyshard_core::{Fragment, HolderClass, KeyCheckValue, KeyId, dealer::HolderSlot};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn manifest(setup: &Setup, n: u8) -> Manifest {
    let key_id = KeyId::new("root").unwrap();
    Manifest {
        key_check_value: KeyCheckValue::compute(&setup.secret, &key_id),
        key_id,
        threshold: setup.k,
        dealer: setup.dealer.verifying_key(),
        holders: HolderSlot::numbered(HolderClass::Vhd, n).collect(),
        host_attestation: None,
    }
}

fn sources(setup: &Setup, indices: &[u8]) -> Vec<Box<dyn VolumeSource>> {
    indices
        .iter()
        .map(|&i| SourceSpec::VhostUser(setup.socket(i)).into_source(std::path::Path::new("/sys")))
        .collect()
}

#[test]
fn the_frontend_reads_serial_and_fragments_over_the_socket() {
    let setup = Setup::new(2, 3);
    let daemon = Daemon::start(&setup.device_args(&[2]));
    daemon.ready_line();
    let mut device = VhostUserBlk::connect(&setup.socket(2), deadline()).unwrap();
    assert_eq!(
        device.serial(deadline()).unwrap().as_deref(),
        Some("ksf-vhd-2")
    );
    assert!(device.is_read_only());
    assert_eq!(device.capacity_bytes() % 512, 0);
    let bytes = device
        .read_at(0, device.capacity_bytes() as usize, deadline())
        .unwrap();
    let fragments = volume::decode(&bytes).unwrap();
    assert_eq!(fragments.len(), 1);
    assert_eq!(
        fragments[0],
        std::fs::read(setup.fragment(2)).unwrap().as_slice()
    );
    let fragment = Fragment::parse(fragments[0]).unwrap();
    assert!(fragment.verify(&setup.dealer.verifying_key()).is_ok());
}

#[test]
fn the_agent_rebuilds_the_key_from_daemon_sockets() {
    let setup = Setup::new(2, 3);
    let daemon = Daemon::start(&setup.device_args(&[1, 2, 3]));
    daemon.ready_line();
    let outcome = agent::unlock(
        &manifest(&setup, 3),
        sources(&setup, &[1, 2, 3]),
        agent::DEFAULT_TIMEOUT,
    )
    .unwrap();
    assert_eq!(outcome.secret.as_slice(), setup.secret.as_slice());
    // The agent stops at the first k shares to arrive: which two is up to timing.
    assert_eq!(outcome.used.len(), 2);
    assert_ne!(outcome.used[0].header.index, outcome.used[1].header.index);
    assert!(
        outcome
            .used
            .iter()
            .all(|u| u.source.starts_with("ksf-vhd-")),
        "{:?}",
        outcome.used
    );
}

#[test]
fn a_stopped_daemon_is_named_and_the_quorum_fails_without_it() {
    let setup = Setup::new(3, 3);
    let daemon = Daemon::start(&setup.device_args(&[1, 3]));
    daemon.ready_line();
    // A missing socket fails at once; the deadline only bounds a slow machine.
    let err = agent::unlock(
        &manifest(&setup, 3),
        sources(&setup, &[1, 2, 3]),
        agent::DEFAULT_TIMEOUT,
    )
    .unwrap_err();
    let QuorumError::NotMet {
        valid,
        needed,
        rejected,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!((valid, needed), (2, Some(3)), "{rejected:?}");
    let missing: Vec<_> = rejected
        .iter()
        .filter(|r| matches!(r.reason, RejectReason::Unavailable(_)))
        .map(|r| r.source.clone())
        .collect();
    assert!(missing.iter().any(|s| s.contains("vhd-2")), "{rejected:?}");
}

#[test]
fn the_frontend_reconnects_after_the_daemon_restarts() {
    let setup = Setup::new(2, 2);
    let mut daemon = Daemon::start(&setup.device_args(&[1]));
    daemon.ready_line();
    let mut device = VhostUserBlk::connect(&setup.socket(1), deadline()).unwrap();
    let before = device.read_at(0, 512, deadline()).unwrap();

    // A crash: the socket file stays behind, requests stop being answered.
    daemon.crash();
    let err = device.read_at(0, 512, deadline()).unwrap_err();
    assert!(
        matches!(
            err,
            FrontendError::Disconnected { .. }
                | FrontendError::Unresponsive { .. }
                | FrontendError::Broken
        ),
        "{err:?}"
    );

    let restarted = Daemon::start(&setup.device_args(&[1]));
    restarted.ready_line();
    let mut device = device.reconnect(deadline()).unwrap();
    assert_eq!(device.read_at(0, 512, deadline()).unwrap(), before);
    assert_eq!(
        device.serial(deadline()).unwrap().as_deref(),
        Some("ksf-vhd-1")
    );
}

#[test]
fn the_daemon_listens_again_after_a_clean_disconnect() {
    let setup = Setup::new(2, 2);
    let daemon = Daemon::start(&setup.device_args(&[1]));
    daemon.ready_line();
    for _ in 0..5 {
        // A VM reboot: the frontend goes away and a new one connects to the same socket.
        let mut device = VhostUserBlk::connect(&setup.socket(1), deadline()).unwrap();
        assert_eq!(
            device.serial(deadline()).unwrap().as_deref(),
            Some("ksf-vhd-1")
        );
    }
}

/// QEMU with the device attached as the documented configuration does it (a memfd, and
/// `reconnect=1` on the chardev), no kernel: the firmware alone; killed on drop.
struct Qemu(std::process::Child);

impl Qemu {
    fn attach(socket: &std::path::Path) -> Self {
        let child = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "128M",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
            .args(["-machine", "q35,memory-backend=mem"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=fragment0,path={},reconnect=1",
                socket.display()
            ))
            .args([
                "-device",
                "vhost-user-blk-pci,chardev=fragment0,num-queues=1",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (make deps installs it)");
        Self(child)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Item 15: QEMU's `reconnect=1`, not a fresh frontend: the daemon is killed and restarted
/// under a running QEMU, and the same QEMU process connects again and sets the device up anew.
#[test]
fn item15_qemu_with_reconnect_1_connects_again_after_the_daemon_restarts() {
    let setup = Setup::new(2, 2);
    let mut daemon = Daemon::start_logged(&setup.device_args(&[1]), "debug");
    daemon.ready_line();
    let qemu = Qemu::attach(&setup.socket(1));
    let connected = format!("frontend connected: pid {} ", qemu.0.id());
    let slow = Duration::from_secs(20);
    assert!(
        daemon.wait_for_log(&connected, slow).is_some(),
        "QEMU never connected"
    );
    // The firmware drives the device: features are set (EVENT_IDX is one of them).
    assert!(daemon.wait_for_log("EVENT_IDX", slow).is_some());

    daemon.crash();
    let restarted = Daemon::start_logged(&setup.device_args(&[1]), "debug");
    restarted.ready_line();
    assert!(
        restarted.wait_for_log(&connected, slow).is_some(),
        "QEMU did not connect to the restarted daemon"
    );
    // Connected again and set up again, with no new QEMU and no guest action.
    assert!(
        restarted.wait_for_log("EVENT_IDX", slow).is_some(),
        "QEMU connected again but did not restart the device"
    );
}
