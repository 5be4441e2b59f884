//! A device that never answers must not hold the agent (issue 7, item 1). A guest's sysfs and
//! /dev are stood in for by two directories; a device that hangs is a FIFO nobody writes to, so
//! that opening its serial (the GET_ID a hung virtio-blk device never completes) or its data
//! blocks forever. `keyshard-guest` must still rebuild the key from the devices that answer,
//! close its stdout and exit, long before the harness gives up on it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, SECRET};

/// How long the harness waits for keyshard-guest before it kills it and fails the test: well
/// past every deadline the tests give, so only a hang reaches it.
const HARNESS_LIMIT: Duration = Duration::from_secs(30);

/// A stand-in for a guest's /sys and /dev.
struct Guest {
    sys: PathBuf,
    dev: PathBuf,
}

impl Guest {
    fn new(root: &Path) -> Self {
        let guest = Self {
            sys: root.join("sys"),
            dev: root.join("dev"),
        };
        fs::create_dir_all(guest.sys.join("block")).unwrap();
        fs::create_dir_all(&guest.dev).unwrap();
        guest
    }

    /// A device that answers: its serial, and its data copied from `image`.
    fn device(&self, name: &str, serial: &str, image: Option<&Path>) {
        let dir = self.sys.join("block").join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("serial"), serial).unwrap();
        match image {
            Some(image) => fs::copy(image, self.dev.join(name)).map(drop).unwrap(),
            None => fs::write(self.dev.join(name), [0u8; 512]).unwrap(),
        }
    }

    /// A device whose serial read never completes.
    fn hung_device(&self, name: &str) {
        let dir = self.sys.join("block").join(name);
        fs::create_dir_all(&dir).unwrap();
        fifo(&dir.join("serial"));
        fifo(&self.dev.join(name));
    }

    /// A device that answers GET_ID but whose data read never completes.
    fn device_hung_after_serial(&self, name: &str, serial: &str) {
        let dir = self.sys.join("block").join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("serial"), serial).unwrap();
        fifo(&self.dev.join(name));
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--sysfs-root".into(),
            self.sys.display().to_string(),
            "--dev-root".into(),
            self.dev.display().to_string(),
        ]
    }
}

fn fifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo does not keep it.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
}

/// What a run gave: exit code, stdout (read to its end), stderr, and how long until stdout
/// closed and the process exited.
struct Run {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    took: Duration,
}

/// Runs keyshard-guest; kills it and fails the test if it is still running after
/// `HARNESS_LIMIT`. Stdout is read until it closes: a worker that inherited it would keep it
/// open after keyshard-guest exits.
fn run_guest(args: &[String]) -> Run {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyshard-guest"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut err = String::new();
        stdout.read_to_end(&mut out).unwrap();
        stderr.read_to_string(&mut err).unwrap();
        let _ = sender.send((out, err));
    });
    let Ok((stdout, stderr)) = receiver.recv_timeout(HARNESS_LIMIT) else {
        let _ = child.kill();
        panic!("keyshard-guest {args:?} still had its stdout open after {HARNESS_LIMIT:?}");
    };
    let status = child.wait().unwrap();
    Run {
        code: status.code(),
        stdout,
        stderr,
        took: started.elapsed(),
    }
}

fn unlock_args(fixture: &Fixture, guest: &Guest, timeout: &str) -> Vec<String> {
    let mut args = vec![
        "unlock".to_owned(),
        "--manifest".into(),
        fixture.manifest_path().display().to_string(),
        "--timeout".into(),
        timeout.into(),
    ];
    args.extend(guest.args());
    args
}

#[test]
fn item_1_a_hung_fragment_device_does_not_hold_the_unlock() {
    let fixture = Fixture::new();
    let guest = Guest::new(fixture.dir.path());
    guest.device("vda", "ks-volume", None);
    guest.device("vdb", "ksf-vhd-1", Some(&fixture.images[0]));
    guest.hung_device("vdc");
    guest.device("vdd", "ksf-vhd-3", Some(&fixture.images[2]));

    let run = run_guest(&unlock_args(&fixture, &guest, "20"));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, SECRET);
    // The quorum was met by the two devices that answer: no wait for the hung one's deadline.
    assert!(run.took < Duration::from_secs(10), "took {:?}", run.took);
}

#[test]
fn item_1_a_needed_device_that_hangs_is_named_at_the_deadline() {
    let fixture = Fixture::new();
    let guest = Guest::new(fixture.dir.path());
    guest.device("vdb", "ksf-vhd-1", Some(&fixture.images[0]));
    guest.hung_device("vdc");
    guest.device_hung_after_serial("vdd", "ksf-vhd-3");

    let run = run_guest(&unlock_args(&fixture, &guest, "2"));
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert!(
        run.took < Duration::from_secs(6),
        "a 2 s deadline took {:?}",
        run.took
    );
    let dev = guest.dev.display();
    for line in [
        format!("keyshard-guest: missing {dev}/vdc: no answer within 2 s (serial unknown)"),
        format!("keyshard-guest: missing ksf-vhd-3 ({dev}/vdd): no answer within 2 s"),
        "keyshard-guest: quorum not met: 1 valid fragment(s) of one epoch, 2 needed".to_owned(),
    ] {
        assert!(
            run.stderr.lines().any(|l| l == line),
            "no {line:?} in:\n{}",
            run.stderr
        );
    }
}

#[test]
fn item_1_devices_lists_serials_without_waiting_for_a_hung_device() {
    let fixture = Fixture::new();
    let guest = Guest::new(fixture.dir.path());
    guest.device("vda", "ks-volume", None);
    guest.device("vdb", "ksf-vhd-1", Some(&fixture.images[0]));
    guest.hung_device("vdc");
    let mut args = vec![
        "devices".to_owned(),
        "--until-serial".into(),
        "ks-volume".into(),
        "--timeout".into(),
        "20".into(),
    ];
    args.extend(guest.args());
    let run = run_guest(&args);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.took < Duration::from_secs(10), "took {:?}", run.took);
    let dev = guest.dev.display();
    let stdout = String::from_utf8(run.stdout).unwrap();
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            format!("{dev}/vda ks-volume"),
            format!("{dev}/vdb ksf-vhd-1"),
            format!("{dev}/vdc ?"),
        ]
    );

    // A serial that never shows up: exit 1 at the timeout, with what was found.
    let mut args = vec![
        "devices".to_owned(),
        "--until-serial".into(),
        "no-such-disk".into(),
        "--timeout".into(),
        "1".into(),
    ];
    args.extend(guest.args());
    let run = run_guest(&args);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("no block device with serial no-such-disk within 1 s"),
        "{}",
        run.stderr
    );
}

#[test]
fn item_1_a_hung_device_that_may_be_the_broker_costs_only_the_deadline() {
    use keyshard_core::HolderClass;
    use keyshard_core::dealer::HolderSlot;

    let holders = HolderSlot::numbered(HolderClass::Vhd, 2)
        .chain(HolderSlot::numbered(HolderClass::Tpm, 1))
        .collect();
    let fixture = Fixture::dealt(holders, 3);
    let guest = Guest::new(fixture.dir.path());
    guest.device("vdb", "ksf-vhd-1", Some(&fixture.images[0]));
    guest.device("vdc", "ksf-vhd-2", Some(&fixture.images[1]));
    // The broker device never answers GET_ID: nothing says it is the broker.
    guest.hung_device("vdd");

    let run = run_guest(&unlock_args(&fixture, &guest, "2"));
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.took < Duration::from_secs(6), "took {:?}", run.took);
    assert!(
        run.stderr.lines().any(|l| l
            == "keyshard-guest: missing tpm-1: no broker device found (1 block device(s) \
                          did not say what they are)"),
        "{}",
        run.stderr
    );
}

/// Review of issue 7: a guest whose sysfs is not mounted (a confused init) lists no device.
/// `devices` said nothing and exited 0, and `unlock` named only the missing holders; both now
/// say that the block devices could not be listed, and why.
#[test]
fn review_a_sysfs_that_cannot_be_listed_is_named() {
    let fixture = Fixture::new();
    let root = fixture.dir.path().join("unmounted");
    let guest = Guest {
        sys: root.join("sys"),
        dev: root.join("dev"),
    };
    let why = format!(
        "cannot list block devices in {}/block: No such file or directory",
        guest.sys.display()
    );
    let mut args = vec!["devices".to_owned(), "--timeout".into(), "1".into()];
    args.extend(guest.args());
    let run = run_guest(&args);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert!(run.stderr.contains(&why), "{}", run.stderr);

    let mut args = unlock_args(&fixture, &guest, "1");
    args.extend(["--device-wait".into(), "0.5".into()]);
    let run = run_guest(&args);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let line = format!(
        "keyshard-guest: missing {}/block: cannot list block devices: No such file or directory \
         (os error 2)",
        guest.sys.display()
    );
    assert!(
        run.stderr.lines().any(|l| l == line),
        "no {line:?} in:\n{}",
        run.stderr
    );
}
