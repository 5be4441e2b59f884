//! Boots a guest through `qemu-configs/run-qemu.sh` (the same script users run) under a
//! wall-clock limit, with its serial console captured to a file.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::console::Console;
use crate::process::{ChildGuard, describe_status};
use crate::{Result, io_context};

/// One boot: what to attach, how long it may take, and where its logs go.
#[derive(Debug, Clone)]
pub struct QemuBoot {
    /// `qemu-configs/run-qemu.sh`, or anything that takes its arguments.
    pub script: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub volume: PathBuf,
    pub fragment_sockets: Vec<PathBuf>,
    /// The VM's broker mailbox (`keyshard coordinator --broker VM=SOCKET`), if it has one.
    pub broker_socket: Option<PathBuf>,
    /// Extra kernel command line.
    pub append: String,
    /// Sets `KEYSHARD_IOMMU_PLATFORM=on` for run-qemu.sh: every virtio device gets
    /// `iommu_platform=on`, so the guest negotiates VIRTIO_F_ACCESS_PLATFORM. When false the
    /// variable is inherited, so `KEYSHARD_IOMMU_PLATFORM=on make e2e` runs every boot with it.
    pub iommu_platform: bool,
    pub timeout: Duration,
    /// The serial console (the script's stdout).
    pub console_log: PathBuf,
    /// The script's and QEMU's stderr.
    pub stderr_log: PathBuf,
}

/// Kernel command line that starts `images/virtio-report.sh` before `/init`: the console then
/// carries a `virtio ...` marker per virtio device (see [`virtio_devices`]).
pub const VIRTIO_REPORT_APPEND: &str = "rdinit=/bin/virtio-report";

/// VIRTIO_F_ACCESS_PLATFORM: the device accesses memory through the platform's DMA rules (an
/// IOMMU or, in an SEV guest, shared bounce buffers); SEV guests require it of every device.
pub const VIRTIO_F_ACCESS_PLATFORM: usize = 33;

/// One virtio device as `images/virtio-report.sh` reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioDevice {
    /// `virtio0`, ...
    pub name: String,
    /// The virtio device id, e.g. `0x0002` for a block device.
    pub device: String,
    /// The negotiated feature bits, bit 0 first, as the kernel's sysfs `features` shows them.
    pub features: String,
}

impl VirtioDevice {
    /// Whether the guest negotiated feature `bit`.
    pub fn has_feature(&self, bit: usize) -> bool {
        self.features.as_bytes().get(bit) == Some(&b'1')
    }
}

/// The `virtio NAME device=ID features=BITS` markers of a boot, in order; malformed ones are
/// left out (a test then finds too few devices).
pub fn virtio_devices(console: &Console) -> Vec<VirtioDevice> {
    console
        .markers()
        .into_iter()
        .filter_map(|marker| {
            let mut words = marker.strip_prefix("virtio ")?.split(' ');
            let name = words.next()?;
            let device = words.next()?.strip_prefix("device=")?;
            let features = words.next()?.strip_prefix("features=")?;
            let well_formed = words.next().is_none()
                && !features.is_empty()
                && features.bytes().all(|b| b == b'0' || b == b'1');
            well_formed.then(|| VirtioDevice {
                name: name.to_owned(),
                device: device.to_owned(),
                features: features.to_owned(),
            })
        })
        .collect()
}

/// How a boot ended.
#[derive(Debug)]
pub struct BootOutcome {
    /// None when the harness killed QEMU at the time limit.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
    pub console: Console,
    pub stderr: String,
}

impl BootOutcome {
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    /// QEMU exited by itself and with status 0: the guest powered off (QEMU exits 0 on a guest
    /// poweroff, and also after a kernel panic with panic=-1 -no-reboot, so callers check the
    /// console's `poweroff` marker too).
    pub fn exited_cleanly(&self) -> bool {
        self.status.as_ref().is_some_and(ExitStatus::success)
    }

    /// A summary for assertion messages: status, time, QEMU's stderr, the end of the console.
    pub fn report(&self) -> String {
        format!(
            "qemu: {} after {:.1} s\n--- stderr ---\n{}\n--- console (last 60 lines) ---\n{}",
            self.status
                .as_ref()
                .map_or_else(|| "killed at the time limit".to_owned(), describe_status),
            self.elapsed.as_secs_f64(),
            self.stderr.trim_end(),
            self.console.tail(60)
        )
    }
}

impl QemuBoot {
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.script);
        command
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(&self.initrd)
            .arg("--volume")
            .arg(&self.volume);
        for socket in &self.fragment_sockets {
            command.arg("--fragment-socket").arg(socket);
        }
        if let Some(socket) = &self.broker_socket {
            command.arg("--broker-socket").arg(socket);
        }
        if !self.append.is_empty() {
            command.arg("--append").arg(&self.append);
        }
        if self.iommu_platform {
            command.env("KEYSHARD_IOMMU_PLATFORM", "on");
        }
        command
    }

    /// Runs the boot to its end, or kills it (the whole process group) at the time limit.
    pub fn run(&self) -> Result<BootOutcome> {
        self.run_reacting(Vec::new())
    }

    /// Like [`Self::run`], and while the VM runs, does each reaction's action once the console
    /// shows its marker (checked every few milliseconds, in the order given).
    pub fn run_reacting(&self, mut reactions: Vec<Reaction<'_>>) -> Result<BootOutcome> {
        let console = File::create(&self.console_log).map_err(io_context(format!(
            "creating {}",
            self.console_log.display()
        )))?;
        let stderr = File::create(&self.stderr_log).map_err(io_context(format!(
            "creating {}",
            self.stderr_log.display()
        )))?;
        let mut command = self.command();
        command.stdin(Stdio::null()).stdout(console).stderr(stderr);
        let started = Instant::now();
        let mut qemu = ChildGuard::spawn("qemu-configs/run-qemu.sh", &mut command)?;
        let deadline = started + self.timeout;
        let status = loop {
            if let Some(status) = qemu.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                qemu.kill()?;
                break None;
            }
            if let Some(next) = reactions.first()
                && let Ok(bytes) = std::fs::read(&self.console_log)
                && Console::from_bytes(&bytes).has_marker(next.marker)
            {
                let reaction = reactions.remove(0);
                (reaction.action)();
                continue;
            }
            std::thread::sleep(REACTION_POLL);
        };
        let elapsed = started.elapsed();
        drop(qemu);
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(io_context(format!("reading {}", path.display())))
        };
        Ok(BootOutcome {
            status,
            elapsed,
            console: Console::from_bytes(&read(&self.console_log)?),
            stderr: String::from_utf8_lossy(&read(&self.stderr_log)?).into_owned(),
        })
    }
}

/// How often a running boot's console is looked at for a reaction's marker.
const REACTION_POLL: Duration = Duration::from_millis(5);

/// Something a test does to the world while the VM boots, once the console shows `marker`.
pub struct Reaction<'a> {
    pub marker: &'a str,
    pub action: Box<dyn FnOnce() + 'a>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_script(dir: &std::path::Path, body: &str) -> PathBuf {
        let path = dir.join("fake-qemu.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn boot(dir: &std::path::Path, script: PathBuf, timeout: Duration) -> QemuBoot {
        QemuBoot {
            script,
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd"),
            volume: dir.join("volume"),
            fragment_sockets: vec![dir.join("a.sock"), dir.join("b.sock")],
            broker_socket: Some(dir.join("broker.sock")),
            append: "keyshard.device_wait=1".to_owned(),
            iommu_platform: true,
            timeout,
            console_log: dir.join("console.log"),
            stderr_log: dir.join("stderr.log"),
        }
    }

    #[test]
    fn passes_the_boot_to_the_script_and_captures_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let script = fake_script(
            dir.path(),
            "echo \"args: $*\"; echo \"iommu: $KEYSHARD_IOMMU_PLATFORM\"; printf 'KEYSHARD-E2E: unlocked\\r\\n'; echo oops >&2",
        );
        let outcome = boot(dir.path(), script, Duration::from_secs(30))
            .run()
            .unwrap();
        assert!(outcome.exited_cleanly(), "{}", outcome.report());
        assert!(outcome.console.has_marker("unlocked"));
        let d = dir.path().display();
        let expected = format!(
            "args: --kernel {d}/vmlinuz --initrd {d}/initrd --volume {d}/volume \
             --fragment-socket {d}/a.sock --fragment-socket {d}/b.sock \
             --broker-socket {d}/broker.sock --append keyshard.device_wait=1"
        );
        assert!(
            outcome.console.text().contains(&expected),
            "{}",
            outcome.console.text()
        );
        assert_eq!(outcome.stderr, "oops\n");
        assert!(outcome.console.text().contains("iommu: on\n"));
    }

    #[test]
    fn reads_the_virtio_feature_markers() {
        let bits = |set: &[usize]| -> String {
            (0..64)
                .map(|i| if set.contains(&i) { '1' } else { '0' })
                .collect()
        };
        let console = Console::from_bytes(
            format!(
                "[    1.0] virtio_blk virtio0: [vda] 8 512-byte logical blocks\r\n\
                 KEYSHARD-E2E: virtio virtio0 device=0x0002 features={}\r\n\
                 KEYSHARD-E2E: virtio virtio1 device=0x0002 features={}\n\
                 KEYSHARD-E2E: virtio virtio2 device=0x0002 features=01x\n\
                 KEYSHARD-E2E: virtio virtio3 device=0x0002\n\
                 KEYSHARD-E2E: unlocked\n",
                bits(&[5, 32, 33]),
                bits(&[5, 32])
            )
            .as_bytes(),
        );
        let devices = virtio_devices(&console);
        assert_eq!(devices.len(), 2, "{devices:?}");
        assert_eq!(devices[0].name, "virtio0");
        assert_eq!(devices[0].device, "0x0002");
        assert!(devices[0].has_feature(VIRTIO_F_ACCESS_PLATFORM));
        assert!(devices[0].has_feature(32));
        assert!(!devices[1].has_feature(VIRTIO_F_ACCESS_PLATFORM));
        assert!(!devices[1].has_feature(64));
    }

    #[test]
    fn a_boot_that_hangs_is_killed_at_the_time_limit() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = fake_script(
            dir.path(),
            &format!(
                "echo booting; sleep 60 & echo $! > {}; wait",
                pidfile.display()
            ),
        );
        let started = Instant::now();
        let outcome = boot(dir.path(), script, Duration::from_millis(700))
            .run()
            .unwrap();
        assert!(outcome.timed_out());
        assert!(!outcome.exited_cleanly());
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(outcome.console.text().contains("booting"));
        assert!(outcome.report().contains("killed at the time limit"));
        let pid: libc::pid_t = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The script's own child (QEMU's place in a real run) is in its process group: gone too.
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "the hung boot's child survived");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
