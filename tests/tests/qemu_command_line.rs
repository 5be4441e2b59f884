//! `qemu-configs/run-qemu.sh --dry-run`: the QEMU command line a boot gets, checked without
//! QEMU (so this runs in `make unit`): shared memory for vhost-user, one device per live
//! fragment socket and the broker mailbox, dead sockets left out or refused.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-configs/run-qemu.sh")
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["vmlinuz", "initramfs.cpio", "volume.img"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn dry_run(&self, sockets: &[PathBuf], env: &[(&str, &str)]) -> Output {
        self.dry_run_with(sockets, &[], env)
    }

    fn dry_run_with(
        &self,
        sockets: &[PathBuf],
        brokers: &[PathBuf],
        env: &[(&str, &str)],
    ) -> Output {
        let mut command = Command::new(script());
        command
            .arg("--kernel")
            .arg(self.path("vmlinuz"))
            .arg("--initrd")
            .arg(self.path("initramfs.cpio"))
            .arg("--volume")
            .arg(self.path("volume.img"))
            .arg("--dry-run")
            .env_remove("KEYSHARD_ACCEL")
            .env_remove("KEYSHARD_QEMU_EXTRA_ARGS")
            .env_remove("KEYSHARD_MISSING_FRAGMENT")
            .env_remove("KEYSHARD_IOMMU_PLATFORM");
        for socket in sockets {
            command.arg("--fragment-socket").arg(socket);
        }
        for broker in brokers {
            command.arg("--broker-socket").arg(broker);
        }
        command.envs(env.iter().copied()).output().unwrap()
    }
}

/// The QEMU arguments `--dry-run` printed, one per line.
fn arguments(output: &Output) -> Vec<String> {
    assert!(
        output.status.success(),
        "run-qemu.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether `flag` is followed by `value` somewhere in `args`.
fn has(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

#[test]
fn attaches_each_live_fragment_socket_over_shared_memory() {
    let files = Files::new();
    let sockets = [files.path("vhd-1.sock"), files.path("vhd-2.sock")];
    let _listeners: Vec<UnixListener> = sockets
        .iter()
        .map(|s| UnixListener::bind(s).unwrap())
        .collect();
    let args = arguments(&files.dry_run(&sockets, &[]));

    assert!(has(&args, "-accel", "tcg"), "{args:?}");
    assert!(
        has(
            &args,
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on"
        ),
        "{args:?}"
    );
    assert!(has(&args, "-machine", "q35,memory-backend=mem"), "{args:?}");
    assert!(args.iter().any(|a| a == "-no-reboot"), "{args:?}");
    assert!(
        has(
            &args,
            "-device",
            "virtio-blk-pci,drive=volume,serial=ks-volume"
        ),
        "{args:?}"
    );
    for (index, socket) in sockets.iter().enumerate() {
        let chardev = format!(
            "socket,id=fragment{index},path={},reconnect=1",
            socket.display()
        );
        assert!(has(&args, "-chardev", &chardev), "{args:?}");
        let device = format!("vhost-user-blk-pci,chardev=fragment{index},num-queues=1");
        assert!(has(&args, "-device", &device), "{args:?}");
    }
}

#[test]
fn a_socket_nobody_listens_on_is_left_out_and_said_so() {
    let files = Files::new();
    let live = files.path("vhd-1.sock");
    let _listener = UnixListener::bind(&live).unwrap();
    // A stale socket file (its daemon was killed) and a missing one.
    let stale = files.path("vhd-2.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let missing = files.path("vhd-3.sock");

    let output = files.dry_run(&[live.clone(), stale.clone(), missing.clone()], &[]);
    let args = arguments(&output).join("\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(args.matches("vhost-user-blk-pci").count(), 1, "{args}");
    assert!(args.contains(&live.display().to_string()), "{args}");
    for dead in [&stale, &missing] {
        assert!(!args.contains(&dead.display().to_string()), "{args}");
        assert!(
            stderr.contains(&format!("{} does not accept connections", dead.display())),
            "{stderr}"
        );
    }
}

#[test]
fn attaches_the_broker_mailbox_like_a_fragment_device() {
    let files = Files::new();
    let fragment = files.path("vhd-1.sock");
    let broker = files.path("broker-vm1.sock");
    let _listeners: Vec<UnixListener> = [&fragment, &broker]
        .iter()
        .map(|s| UnixListener::bind(s).unwrap())
        .collect();
    let output = files.dry_run_with(
        std::slice::from_ref(&fragment),
        std::slice::from_ref(&broker),
        &[],
    );
    let args = arguments(&output);

    let chardev = format!("socket,id=broker,path={},reconnect=1", broker.display());
    assert!(has(&args, "-chardev", &chardev), "{args:?}");
    // Writable: no read-only knob anywhere, the device (the coordinator) does not offer RO.
    assert!(
        has(
            &args,
            "-device",
            "vhost-user-blk-pci,chardev=broker,num-queues=1"
        ),
        "{args:?}"
    );
    assert!(
        has(
            &args,
            "-device",
            "vhost-user-blk-pci,chardev=fragment0,num-queues=1"
        ),
        "{args:?}"
    );
    assert_eq!(
        args.iter()
            .filter(|a| a.starts_with("vhost-user-blk-pci"))
            .count(),
        2,
        "{args:?}"
    );
}

/// Item 9 of issue 7: KEYSHARD_IOMMU_PLATFORM=on puts iommu_platform=on (with
/// disable-legacy=on, which QEMU requires with it) on every virtio device, so an SEV guest can
/// negotiate VIRTIO_F_ACCESS_PLATFORM; off, or unset, leaves the devices as they were.
#[test]
fn item9_iommu_platform_goes_on_every_virtio_device() {
    let files = Files::new();
    let fragment = files.path("vhd-1.sock");
    let broker = files.path("broker-vm1.sock");
    let _listeners: Vec<UnixListener> = [&fragment, &broker]
        .iter()
        .map(|s| UnixListener::bind(s).unwrap())
        .collect();
    let run = |env: &[(&str, &str)]| {
        files.dry_run_with(
            std::slice::from_ref(&fragment),
            std::slice::from_ref(&broker),
            env,
        )
    };
    let devices = |args: &[String]| -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| w[1].clone())
            .collect()
    };

    let on = arguments(&run(&[("KEYSHARD_IOMMU_PLATFORM", "on")]));
    let on_devices = devices(&on);
    assert_eq!(on_devices.len(), 3, "{on:?}");
    for device in &on_devices {
        assert!(
            device.ends_with(",iommu_platform=on,disable-legacy=on"),
            "{device}"
        );
    }
    assert!(
        on_devices.contains(
            &"vhost-user-blk-pci,chardev=broker,num-queues=1,iommu_platform=on,disable-legacy=on"
                .to_owned()
        )
    );
    // No vIOMMU: the addresses stay guest-physical.
    assert!(!on.iter().any(|a| a.contains("intel-iommu")), "{on:?}");

    for env in [&[][..], &[("KEYSHARD_IOMMU_PLATFORM", "off")][..]] {
        let args = arguments(&run(env));
        assert!(
            devices(&args).iter().all(|d| !d.contains("iommu_platform")),
            "{args:?}"
        );
    }

    let bad = run(&[("KEYSHARD_IOMMU_PLATFORM", "yes")]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("KEYSHARD_IOMMU_PLATFORM is on or off"),
        "{stderr}"
    );
}

#[test]
fn a_dead_broker_socket_is_left_out_and_said_so_or_refused() {
    let files = Files::new();
    let broker = files.path("broker-vm1.sock");
    let output = files.dry_run_with(&[], std::slice::from_ref(&broker), &[]);
    let args = arguments(&output).join("\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!args.contains("vhost-user-blk-pci"), "{args}");
    assert!(
        stderr.contains(&format!(
            "broker socket {} does not accept connections; booting without it",
            broker.display()
        )),
        "{stderr}"
    );

    let output = files.dry_run_with(
        &[],
        std::slice::from_ref(&broker),
        &[("KEYSHARD_MISSING_FRAGMENT", "fail")],
    );
    assert!(!output.status.success());
}

#[test]
fn a_second_broker_socket_is_refused() {
    let files = Files::new();
    let (a, b) = (files.path("broker-a.sock"), files.path("broker-b.sock"));
    let _listeners: Vec<UnixListener> = [&a, &b]
        .iter()
        .map(|s| UnixListener::bind(s).unwrap())
        .collect();
    let output = files.dry_run_with(&[], &[a, b], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--broker-socket given twice"), "{stderr}");
}

#[test]
fn a_dead_socket_can_be_refused_instead() {
    let files = Files::new();
    let output = files.dry_run(
        &[files.path("vhd-1.sock")],
        &[("KEYSHARD_MISSING_FRAGMENT", "fail")],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not accept connections"));
}

#[test]
fn the_accelerator_comes_from_the_environment() {
    let files = Files::new();
    let args = arguments(&files.dry_run(&[], &[("KEYSHARD_ACCEL", "kvm")]));
    assert!(has(&args, "-accel", "kvm"), "{args:?}");
    assert!(!args.iter().any(|a| a.contains("vhost-user")), "{args:?}");
}

#[test]
fn missing_inputs_are_refused_before_qemu_runs() {
    let files = Files::new();
    std::fs::remove_file(files.path("volume.img")).unwrap();
    let output = files.dry_run(&[], &[]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no such file"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
