//! The vhost-user-blk frontend and the agent against a real device process: qemu-storage-daemon
//! serving fragment volume images over vhost-user sockets. Every daemon is killed when its test
//! ends, whether the test passes or fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{Fixture, IMAGE_LEN, SECRET, keyshard_guest};
use guest_driver::agent;
use guest_driver::source::SourceSpec;
use guest_driver::vhost_user::{FrontendError, VhostUserBlk};
use keyshard_core::quorum::RejectReason;
use keyshard_core::volume::{self, MAX_VOLUME_LEN};

/// A qemu-storage-daemon serving one image read-only; killed on drop.
struct StorageDaemon {
    child: Child,
    socket: PathBuf,
}

impl StorageDaemon {
    fn serve(image: &Path, socket: &Path) -> Self {
        Self::start(image, socket, false)
    }

    fn start(image: &Path, socket: &Path, writable: bool) -> Self {
        let log = socket.with_extension("log");
        let (read_only, writable) = if writable {
            ("off", "on")
        } else {
            ("on", "off")
        };
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},read-only={read_only}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},\
                 writable={writable}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect(
                "qemu-storage-daemon must be installed (Debian: qemu-utils or qemu-system-common)",
            );
        let mut daemon = Self {
            child,
            socket: socket.to_owned(),
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!(
                    "qemu-storage-daemon exited ({status}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-storage-daemon did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Serves holder `vhd-<holder>`'s image on `vhd-<holder>.sock`.
fn serve(fixture: &Fixture, holder: usize) -> StorageDaemon {
    let socket = fixture.dir.path().join(format!("vhd-{holder}.sock"));
    StorageDaemon::serve(&fixture.images[holder - 1], &socket)
}

fn deadline(seconds: u64) -> Instant {
    Instant::now() + Duration::from_secs(seconds)
}

#[test]
fn reads_capacity_serial_and_bytes_over_the_socket() {
    let fixture = Fixture::new();
    let daemon = serve(&fixture, 1);
    let image = fs::read(&fixture.images[0]).unwrap();

    let mut device = VhostUserBlk::connect(&daemon.socket, deadline(10)).unwrap();
    assert_eq!(device.capacity_bytes(), IMAGE_LEN as u64);
    assert!(device.is_read_only());
    // qemu-storage-daemon's serial is fixed; fragment devices answer ksf-<holder-id>.
    assert_eq!(
        device.serial(deadline(10)).unwrap().as_deref(),
        Some("vhost_user_blk")
    );

    let volume = device.read_at(0, MAX_VOLUME_LEN, deadline(10)).unwrap();
    assert_eq!(&volume[..], &image[..MAX_VOLUME_LEN]);
    assert!(volume::decode(&volume).is_ok());
    // Unaligned ranges are cut out of whole sectors; large ones span several requests.
    for (offset, len) in [(1000, 3000), (IMAGE_LEN - 700, 700), (4096, 200 * 1024)] {
        let bytes = device.read_at(offset as u64, len, deadline(10)).unwrap();
        assert_eq!(&bytes[..], &image[offset..offset + len], "{offset}+{len}");
    }
    assert!(matches!(
        device.read_at(IMAGE_LEN as u64 - 512, 513, deadline(10)),
        Err(FrontendError::OutOfRange { .. })
    ));

    // A new connection works once the old one is gone (the daemon serves one at a time).
    let mut device = device.reconnect(deadline(10)).unwrap();
    assert_eq!(
        &device.read_at(0, 512, deadline(10)).unwrap()[..],
        &image[..512]
    );
}

#[test]
fn writes_whole_sectors_to_a_writable_device_and_reads_them_back() {
    let fixture = Fixture::new();
    let image = fixture.dir.path().join("rw.img");
    fs::write(&image, vec![0u8; 256 * 1024]).unwrap();
    let daemon = StorageDaemon::start(&image, &fixture.dir.path().join("rw.sock"), true);
    let mut device = VhostUserBlk::connect(&daemon.socket, deadline(10)).unwrap();
    assert!(!device.is_read_only());

    // One sector, and a span larger than the frontend's 64 KiB buffer (several requests).
    let sector: Vec<u8> = (0..512).map(|i| (i % 253) as u8).collect();
    let span: Vec<u8> = (0..150 * 1024).map(|i| (i % 241) as u8 | 1).collect();
    device.write_at(0, &sector, deadline(10)).unwrap();
    device.write_at(8192, &span, deadline(10)).unwrap();
    assert_eq!(
        &device.read_at(0, 512, deadline(10)).unwrap()[..],
        &sector[..]
    );
    assert_eq!(
        &device.read_at(8192, span.len(), deadline(10)).unwrap()[..],
        &span[..]
    );
    // The backend wrote through to the file.
    let on_disk = fs::read(&image).unwrap();
    assert_eq!(&on_disk[..512], &sector[..]);
    assert_eq!(&on_disk[8192..8192 + span.len()], &span[..]);
    assert!(on_disk[512..8192].iter().all(|b| *b == 0));

    // Partial sectors and writes past the end are refused before reaching the device.
    assert!(matches!(
        device.write_at(0, &[1; 100], deadline(10)),
        Err(FrontendError::Unaligned { len: 100, .. })
    ));
    assert!(matches!(
        device.write_at(256 * 1024 - 512, &[1; 1024], deadline(10)),
        Err(FrontendError::OutOfRange { .. })
    ));
    // And the connection is still good.
    assert_eq!(
        &device.read_at(0, 512, deadline(10)).unwrap()[..],
        &sector[..]
    );
}

#[test]
fn a_read_only_device_refuses_writes() {
    let fixture = Fixture::new();
    let daemon = serve(&fixture, 1);
    let mut device = VhostUserBlk::connect(&daemon.socket, deadline(10)).unwrap();
    assert!(matches!(
        device.write_at(0, &[0; 512], deadline(10)),
        Err(FrontendError::ReadOnly)
    ));
    let image = fs::read(&fixture.images[0]).unwrap();
    assert_eq!(
        &device.read_at(0, 512, deadline(10)).unwrap()[..],
        &image[..512]
    );
}

#[test]
fn the_agent_rebuilds_the_key_from_two_of_three_sockets() {
    let fixture = Fixture::new();
    let first = serve(&fixture, 1);
    let third = serve(&fixture, 3);
    let sources = [&first, &third]
        .iter()
        .map(|d| SourceSpec::VhostUser(d.socket.clone()).into_source(Path::new("/sys")))
        .collect();

    let outcome = agent::unlock(&fixture.manifest, sources, Duration::from_secs(10)).unwrap();
    assert_eq!(&outcome.secret[..], SECRET);
    let used: Vec<_> = outcome.used.iter().map(|u| u.source.clone()).collect();
    assert_eq!(
        used,
        [
            format!("vhost_user_blk (socket {})", first.socket.display()),
            format!("vhost_user_blk (socket {})", third.socket.display()),
        ]
    );
    let missing: Vec<_> = outcome
        .rejected
        .iter()
        .map(|r| (r.source.as_str(), r.reason.clone()))
        .collect();
    assert_eq!(
        missing,
        [(
            "vhd-2",
            RejectReason::Unavailable("no device with serial ksf-vhd-2".into())
        )]
    );
}

#[test]
fn keyshard_guest_unlock_writes_the_secret_or_exits_2_naming_what_is_missing() {
    let fixture = Fixture::new();
    let first = serve(&fixture, 1);
    let second = serve(&fixture, 2);
    let manifest = fixture.manifest_path();
    let out = fixture.dir.path().join("key");
    let socket = |d: &StorageDaemon| d.socket.to_str().unwrap().to_owned();

    // Two of three: the key, in a 0600 file, and nothing on stdout.
    let run = keyshard_guest(&[
        "unlock",
        "--manifest",
        manifest.to_str().unwrap(),
        "--vhost-user",
        &socket(&first),
        "--vhost-user",
        &socket(&second),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    assert!(run.stdout.is_empty());
    assert_eq!(fs::read(&out).unwrap(), SECRET);
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(stderr.contains("rebuilt key root (epoch 1)"), "{stderr}");

    // The same to a pipe: the raw secret and nothing else.
    let run = keyshard_guest(&[
        "unlock",
        "--manifest",
        manifest.to_str().unwrap(),
        "--vhost-user",
        &socket(&second),
        "--vhost-user",
        &socket(&first),
    ]);
    assert_eq!(run.status.code(), Some(0));
    assert_eq!(run.stdout, SECRET);

    // One of three: exit 2, nothing on stdout, and every missing holder named.
    let run = keyshard_guest(&[
        "unlock",
        "--manifest",
        manifest.to_str().unwrap(),
        "--vhost-user",
        &socket(&second),
        "--timeout",
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(run.stdout.is_empty());
    let expected = [
        "keyshard-guest: missing vhd-1: no device with serial ksf-vhd-1".to_owned(),
        "keyshard-guest: missing vhd-3: no device with serial ksf-vhd-3".to_owned(),
        format!(
            "keyshard-guest: unused vhost_user_blk (socket {}): \
             epoch 1 has only 1 valid of the 2 shares it needs",
            socket(&second)
        ),
        "keyshard-guest: quorum not met: 1 valid fragment(s) of one epoch, 2 needed".to_owned(),
    ];
    assert_eq!(stderr.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn keyshard_guest_read_lists_serial_and_fragment_metadata() {
    let fixture = Fixture::new();
    let daemon = serve(&fixture, 3);
    let run = keyshard_guest(&["read", "--vhost-user", daemon.socket.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(
        lines[0],
        format!(
            "socket {}: serial vhost_user_blk, 1 fragment",
            daemon.socket.display()
        )
    );
    assert!(
        lines[1].starts_with(
            "  #1: key root epoch 1 share 3 of 3 (k = 2), vhd holder vhd-3, 32-byte share, kcv "
        ),
        "{}",
        lines[1]
    );
}

#[test]
fn a_killed_backend_gives_a_timely_error_not_a_hang() {
    let fixture = Fixture::new();
    let mut daemon = serve(&fixture, 1);
    let mut device = VhostUserBlk::connect(&daemon.socket, deadline(10)).unwrap();
    device.read_at(0, 512, deadline(10)).unwrap();

    daemon.kill();
    let start = Instant::now();
    let error = device.read_at(0, 512, deadline(30)).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(error, FrontendError::Disconnected { .. }),
        "{error}"
    );
    // Found by the liveness check after about half a second of silence, not at the deadline.
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The connection is not used again.
    assert!(matches!(
        device.read_at(0, 512, deadline(10)),
        Err(FrontendError::Broken)
    ));

    // The socket file is still there but nobody listens: connecting fails at once.
    let start = Instant::now();
    let error = VhostUserBlk::connect(&daemon.socket, deadline(10)).unwrap_err();
    assert!(matches!(error, FrontendError::Connect(_)), "{error}");
    // Far below the 10 s deadline.
    assert!(start.elapsed() < Duration::from_secs(3));

    // Through the agent, the dead holder is one missing holder, named by its socket.
    let run = keyshard_guest(&[
        "unlock",
        "--manifest",
        fixture.manifest_path().to_str().unwrap(),
        "--vhost-user",
        daemon.socket.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "keyshard-guest: missing socket {}: cannot connect",
            daemon.socket.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_frozen_backend_costs_no_more_than_the_deadline() {
    let fixture = Fixture::new();
    let daemon = serve(&fixture, 2);
    let mut device = VhostUserBlk::connect(&daemon.socket, deadline(10)).unwrap();

    // While this client is connected the daemon answers no other: a second handshake waits.
    let start = Instant::now();
    let error = VhostUserBlk::connect(&daemon.socket, Instant::now() + Duration::from_millis(500))
        .unwrap_err();
    assert!(matches!(error, FrontendError::HandshakeTimeout), "{error}");
    assert!(start.elapsed() < Duration::from_millis(2500));

    // A stopped daemon neither completes requests nor answers the liveness check.
    daemon.signal(libc::SIGSTOP);
    let start = Instant::now();
    let error = device
        .read_at(0, 512, Instant::now() + Duration::from_millis(1500))
        .unwrap_err();
    let took = start.elapsed();
    daemon.signal(libc::SIGCONT);
    assert!(
        matches!(
            error,
            FrontendError::Unresponsive { .. } | FrontendError::Timeout { .. }
        ),
        "{error}"
    );
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(3500),
        "{took:?}"
    );
}
