//! The `vhost-keyshard` daemon as a launcher sees it: ready only when listening, refuses what it
//! cannot serve, cleans up on SIGTERM. Reading devices through a frontend is in `frontend.rs`.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::fs;
use std::os::unix::net::UnixListener;
use std::process::Command;

use common::{Daemon, Setup};

#[test]
fn ready_line_names_every_device_and_sockets_exist_before_it() {
    let setup = Setup::new(2, 3);
    let daemon = Daemon::start(&setup.device_args(&[1, 2, 3]));
    let line = daemon.ready_line();
    assert!(
        line.starts_with("ready: serving 3 device(s): ksf-vhd-1 at "),
        "{line}"
    );
    assert!(line.contains("ksf-vhd-3 at "), "{line}");
    for i in 1..=3 {
        assert!(setup.socket(i).exists(), "socket {i} missing after ready");
    }
}

#[test]
fn sigterm_removes_sockets_and_pidfile_and_exits_0() {
    let setup = Setup::new(2, 2);
    let pidfile = setup.dir.path().join("daemon.pid");
    let mut args = setup.device_args(&[1, 2]);
    args.extend(["--pidfile".into(), pidfile.display().to_string()]);
    let mut daemon = Daemon::start(&args);
    daemon.ready_line();
    let pid: u32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, daemon.pid());
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(!setup.socket(1).exists() && !setup.socket(2).exists());
    assert!(!pidfile.exists());
}

#[test]
fn a_socket_served_by_another_process_is_not_taken_over() {
    let setup = Setup::new(2, 2);
    let first = Daemon::start(&setup.device_args(&[1]));
    first.ready_line();
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-keyshard"))
        .args(setup.device_args(&[1]))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another process is serving this socket"),
        "{stderr}"
    );
    assert!(
        setup.socket(1).exists(),
        "the first daemon's socket must survive"
    );
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let setup = Setup::new(2, 2);
    // A socket file nobody listens on, as a killed daemon leaves behind.
    drop(UnixListener::bind(setup.socket(1)).unwrap());
    assert!(setup.socket(1).exists());
    let daemon = Daemon::start(&setup.device_args(&[1]));
    assert!(
        daemon
            .ready_line()
            .starts_with("ready: serving 1 device(s)")
    );
}

#[test]
fn unreadable_or_invalid_fragments_refuse_to_start() {
    let setup = Setup::new(2, 2);
    fs::write(setup.dir.path().join("junk.ksf"), b"not a fragment").unwrap();
    for (fragment, expected) in [
        ("junk.ksf", "not a fragment: not a keyshard fragment"),
        ("missing.ksf", "No such file"),
    ] {
        let path = setup.dir.path().join(fragment);
        let out = Command::new(env!("CARGO_BIN_EXE_vhost-keyshard"))
            .args([
                "--socket-path",
                setup.socket(1).to_str().unwrap(),
                "--fragment",
                path.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{fragment}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{fragment}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "never ready: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!setup.socket(1).exists());
    }
}

#[test]
fn usage_errors_exit_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-keyshard"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device to serve"));
}
