//! What a test boots: a random volume key dealt onto holders, the LUKS2 volume it unlocks, the
//! initramfs that carries the manifest, and the processes that serve the shares: one
//! `vhost-keyshard` daemon per fragment and, for a key with `tpm` holders, `keyshard coordinator`
//! over a software TPM. Everything lives in one temporary directory that goes away with the
//! scenario (unless `KEYSHARD_E2E_KEEP=1`).
//!
//! Two ways to deal the key, as an operator would: [`Scenario::split`] (`keyshard split`, `vhd`
//! holders only) and [`Scenario::init`] (`keyshard init --policy`, which also seals shares to the
//! TPM and writes the coordinator's state directory).
//!
//! A host with many VMs is a [`StateRoot`]: one directory whose `<vmid>/` subdirectories are
//! state directories dealt by [`StateRoot::init_vm`] against one shared swtpm, each VM a
//! [`Scenario`] of its own (key, volume, initramfs, fragment daemons), all served by one
//! `keyshard coordinator --state-root` ([`StateRoot::start_coordinator`]).

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyshard_core::manifest::Manifest;
use keyshard_core::{Fragment, HolderClass};

use crate::audit::{self, AuditEntry};
use crate::env::E2eEnv;
use crate::images::{build_initramfs, make_volume};
use crate::process::{Daemon, run_tool};
use crate::qemu::{BootOutcome, QemuBoot, Reaction};
use crate::swtpm::Swtpm;
use crate::{HarnessError, Result, io_context};

/// The VM id [`Scenario::init`] binds the key's attested shares to (`keyshard init --vm-id`):
/// only a coordinator's broker for this VM is served them.
pub const VM_ID: &str = "vm1";

/// The line `vhost-keyshard` and `keyshard coordinator` print on stdout once their sockets listen.
pub const DAEMON_READY_PREFIX: &str = "ready";
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The LUKS2 key length: the secret that is split is the raw volume key file.
pub const VOLUME_KEY_LEN: usize = 32;

/// The shipped policy with two `vhd` holders and one `tpm` holder (k = 3), from the repository root.
pub const VHD_TPM_POLICY: &str = "examples/vhd-tpm.toml";

/// One fragment file and the holder it belongs to.
#[derive(Debug, Clone)]
pub struct FragmentFile {
    pub path: PathBuf,
    pub holder_id: String,
}

impl FragmentFile {
    /// The virtio-blk serial its device answers with.
    pub fn serial(&self) -> String {
        format!("ksf-{}", self.holder_id)
    }
}

/// A running fragment device.
#[derive(Debug)]
pub struct FragmentDaemon {
    pub fragment: FragmentFile,
    pub socket: PathBuf,
    pub daemon: Daemon,
}

/// A running `keyshard coordinator` serving one VM's broker mailbox.
#[derive(Debug)]
pub struct CoordinatorDaemon {
    pub vm_id: String,
    pub socket: PathBuf,
    pub audit_log: PathBuf,
    pub daemon: Daemon,
}

impl CoordinatorDaemon {
    /// The virtio-blk serial of the VM's broker mailbox.
    pub fn serial(&self) -> String {
        format!("ksb-{}", self.vm_id)
    }

    /// Everything in the audit log so far.
    pub fn audit(&self) -> Result<Vec<AuditEntry>> {
        audit::read(&self.audit_log)
    }
}

#[derive(Debug)]
pub struct Scenario {
    /// Declared before `work`: killed before the directory that holds its state is removed.
    swtpm: Option<Swtpm>,
    pub env: E2eEnv,
    work: tempfile::TempDir,
    pub secret: PathBuf,
    pub manifest: PathBuf,
    pub fragments: Vec<FragmentFile>,
    /// The coordinator's state directory, when `keyshard init` dealt the key.
    pub state_dir: Option<PathBuf>,
    /// The VM id `keyshard init` bound the attested shares to ([`VM_ID`] for [`Scenario::init`]).
    pub vm_id: String,
    /// The TCTI of the TPM the `tpm` shares are sealed to: the scenario's own swtpm, or a
    /// [`StateRoot`]'s.
    tcti: Option<String>,
    pub volume: PathBuf,
    /// The known file's content on the volume; random, so no other boot can print it.
    pub volume_content: String,
    pub initramfs: PathBuf,
}

/// A work directory, and a random volume key in it, before the key is dealt.
struct Dealing {
    env: E2eEnv,
    work: tempfile::TempDir,
    secret: PathBuf,
}

impl Dealing {
    fn new(name: &str) -> Result<Self> {
        let env = E2eEnv::from_env()?;
        let work = work_dir(name, &env)?;
        let secret = work.path().join("volume.key");
        write_private(&secret, &random_bytes(VOLUME_KEY_LEN)?)?;
        Ok(Self { env, work, secret })
    }

    fn dir(&self) -> &Path {
        self.work.path()
    }

    fn keyshard(&self, args: &[&str]) -> Result<()> {
        run_tool(
            "keyshard",
            Command::new(&self.env.keyshard)
                .args(args)
                .current_dir(self.dir()),
        )
        .map(drop)
    }

    /// Builds the volume for the key and the initramfs for `manifest`.
    fn finish(
        self,
        name: &str,
        manifest: PathBuf,
        fragments: Vec<FragmentFile>,
        dealt: Dealt,
    ) -> Result<Scenario> {
        let dir = self.dir();
        let volume_content = format!(
            "keyshard e2e {name}: volume {} opened",
            hex(&random_bytes(8)?)
        );
        let volume = dir.join("volume.img");
        make_volume(&self.env, &self.secret, &volume_content, &volume)?;
        let initramfs = dir.join("initramfs.cpio");
        build_initramfs(&self.env, &manifest, &initramfs)?;
        Ok(Scenario {
            swtpm: dealt.swtpm,
            env: self.env,
            work: self.work,
            secret: self.secret,
            manifest,
            fragments,
            state_dir: dealt.state_dir,
            vm_id: dealt.vm_id,
            tcti: dealt.tcti,
            volume,
            volume_content,
            initramfs,
        })
    }
}

impl Scenario {
    /// Splits a fresh random volume key k-of-n (`vhd` holders) with `keyshard split` and builds
    /// the volume and the initramfs for it.
    pub fn split(name: &str, k: u8, n: u8) -> Result<Self> {
        let dealing = Dealing::new(name)?;
        dealing.keyshard(&["keygen", "--out", "dealer.pem"])?;
        let (k, n) = (k.to_string(), n.to_string());
        dealing.keyshard(&[
            "split",
            "--secret-file",
            "volume.key",
            "--threshold",
            &k,
            "--shares",
            &n,
            "--signing-key",
            "dealer.pem",
            "--out-dir",
            "fragments",
            "--key-id",
            &format!("e2e-{name}"),
            "--manifest-out",
            "manifest.toml",
        ])?;
        let manifest = dealing.dir().join("manifest.toml");
        let fragments = read_split_fragments(&dealing.dir().join("fragments"))?;
        let dealt = Dealt {
            state_dir: None,
            vm_id: VM_ID.to_owned(),
            tcti: None,
            swtpm: None,
        };
        dealing.finish(name, manifest, fragments, dealt)
    }

    /// Deals a fresh random volume key by `policy` (a path under the repository root, e.g.
    /// [`VHD_TPM_POLICY`]) with `keyshard init` into the state directory `<work>/state`, sealing
    /// its `tpm` shares to a new swtpm that the scenario owns; then builds the volume and the
    /// initramfs with the manifest `init` wrote.
    pub fn init(name: &str, policy: &str) -> Result<Self> {
        Self::init_inner(name, policy, None)
    }

    /// Like [`Self::init`], but the guest's initramfs carries the manifest as `edit` leaves it
    /// (written to `<work>/guest-manifest.toml`; the state directory keeps `init`'s): a guest
    /// that pins something else than the host has.
    pub fn init_with_guest_manifest(
        name: &str,
        policy: &str,
        edit: impl FnOnce(&mut Manifest),
    ) -> Result<Self> {
        Self::init_inner(name, policy, Some(Box::new(edit)))
    }

    fn init_inner(name: &str, policy: &str, edit: Option<ManifestEdit<'_>>) -> Result<Self> {
        Self::init_inner_with(name, policy, edit, &[])
    }

    /// Like [`Self::init`], with `extra` arguments to `keyshard init` (e.g. `--cms ...`, which
    /// places the policy's `host` shares on shard hosts). `policy` may be an absolute path.
    pub fn init_with_args(name: &str, policy: &str, extra: &[String]) -> Result<Self> {
        Self::init_inner_with(name, policy, None, extra)
    }

    fn init_inner_with(
        name: &str,
        policy: &str,
        edit: Option<ManifestEdit<'_>>,
        extra: &[String],
    ) -> Result<Self> {
        let dealing = Dealing::new(name)?;
        let swtpm = Swtpm::start(&dealing.dir().join("swtpm"))?;
        let state_dir = dealing.dir().join("state");
        let dealt = Dealt {
            state_dir: Some(state_dir),
            vm_id: VM_ID.to_owned(),
            tcti: Some(swtpm.tcti()),
            swtpm: Some(swtpm),
        };
        Self::init_dealt(dealing, name, policy, edit, dealt, extra)
    }

    /// `keyshard init --policy P --state-dir D --tcti T --vm-id V [EXTRA]` as `dealt` says,
    /// then the volume and the initramfs.
    fn init_dealt(
        dealing: Dealing,
        name: &str,
        policy: &str,
        edit: Option<ManifestEdit<'_>>,
        dealt: Dealt,
        extra: &[String],
    ) -> Result<Self> {
        let (Some(state_dir), Some(tcti)) = (dealt.state_dir.clone(), dealt.tcti.clone()) else {
            return Err(HarnessError::NoCoordinatorState);
        };
        let policy = dealing.env.repo.join(policy);
        let (policy, state) = (policy.to_string_lossy(), state_dir.to_string_lossy());
        let mut args = vec![
            "init",
            "--policy",
            &policy,
            "--state-dir",
            &state,
            "--secret-file",
            "volume.key",
            "--tcti",
            &tcti,
            "--vm-id",
            &dealt.vm_id,
        ];
        args.extend(extra.iter().map(String::as_str));
        dealing.keyshard(&args)?;
        let manifest = state_dir.join("manifest.toml");
        let fragments = parse_manifest(&manifest)?
            .holders
            .iter()
            .filter(|h| h.class == HolderClass::Vhd)
            .map(|h| {
                let path = state_dir
                    .join("fragments")
                    .join(format!("{}.ksf", h.id.as_str()));
                read_fragment(&path)
            })
            .collect::<Result<Vec<_>>>()?;
        let manifest = match edit {
            None => manifest,
            Some(edit) => {
                let mut edited = parse_manifest(&manifest)?;
                edit(&mut edited);
                let path = dealing.dir().join("guest-manifest.toml");
                fs::write(&path, edited.to_toml())
                    .map_err(io_context(format!("writing {}", path.display())))?;
                path
            }
        };
        dealing.finish(name, manifest, fragments, dealt)
    }

    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    /// The software TPM the key's `tpm` shares are sealed to (scenarios made by [`Self::init`];
    /// a VM of a [`StateRoot`] has none of its own: see [`StateRoot::swtpm`]).
    pub fn swtpm(&self) -> Option<&Swtpm> {
        self.swtpm.as_ref()
    }

    /// The holders the manifest lists, in its order.
    pub fn manifest_holders(&self) -> Result<Vec<String>> {
        Ok(parse_manifest(&self.manifest)?
            .holders
            .iter()
            .map(|h| h.id.as_str().to_owned())
            .collect())
    }

    /// Starts `vhost-keyshard --socket-path S --fragment F` for one fragment and waits until it
    /// says it is ready.
    pub fn start_daemon(&self, fragment: &FragmentFile) -> Result<FragmentDaemon> {
        let socket = self.dir().join(format!("{}.sock", fragment.holder_id));
        let name = format!("vhost-keyshard {}", fragment.holder_id);
        let daemon = Daemon::start(
            &name,
            Command::new(&self.env.vhost_keyshard)
                .arg("--socket-path")
                .arg(&socket)
                .arg("--fragment")
                .arg(&fragment.path),
            DAEMON_READY_PREFIX,
            DAEMON_READY_TIMEOUT,
            &self
                .dir()
                .join(format!("{}.stderr.log", fragment.holder_id)),
        )?;
        Ok(FragmentDaemon {
            fragment: fragment.clone(),
            socket,
            daemon,
        })
    }

    /// One daemon per fragment.
    pub fn start_daemons(&self) -> Result<Vec<FragmentDaemon>> {
        self.fragments
            .iter()
            .map(|f| self.start_daemon(f))
            .collect()
    }

    /// Starts `keyshard coordinator --state-dir DIR --broker VM=SOCKET --tcti SWTPM` and waits
    /// until it says it is ready (scenarios made by [`Self::init`] or [`StateRoot::init_vm`]).
    pub fn start_coordinator(&self, vm_id: &str) -> Result<CoordinatorDaemon> {
        self.start_coordinator_with(vm_id, &[])
    }

    /// [`Self::start_coordinator`] with `extra` arguments (e.g. `--vm-tcti`).
    pub fn start_coordinator_with(
        &self,
        vm_id: &str,
        extra: &[String],
    ) -> Result<CoordinatorDaemon> {
        let (Some(state_dir), Some(tcti)) = (&self.state_dir, &self.tcti) else {
            return Err(HarnessError::NoCoordinatorState);
        };
        let socket = self.dir().join(format!("broker-{vm_id}.sock"));
        let daemon = Daemon::start(
            &format!("keyshard coordinator {vm_id}"),
            Command::new(&self.env.keyshard)
                .arg("coordinator")
                .arg("--state-dir")
                .arg(state_dir)
                .arg("--broker")
                .arg(format!("{vm_id}={}", socket.display()))
                .arg("--tcti")
                .arg(tcti)
                .args(extra),
            DAEMON_READY_PREFIX,
            DAEMON_READY_TIMEOUT,
            &self.dir().join(format!("coordinator-{vm_id}.stderr.log")),
        )?;
        Ok(CoordinatorDaemon {
            vm_id: vm_id.to_owned(),
            socket,
            audit_log: state_dir.join("audit.log"),
            daemon,
        })
    }

    /// Boots the guest with these fragment sockets, and the broker socket if given, through
    /// `qemu-configs/run-qemu.sh`; the console goes to `<label>.console.log` in the work directory.
    pub fn boot(
        &self,
        label: &str,
        fragment_sockets: Vec<PathBuf>,
        broker_socket: Option<PathBuf>,
    ) -> Result<BootOutcome> {
        self.qemu_boot(label, fragment_sockets, broker_socket).run()
    }

    /// Like [`Self::boot`], doing each reaction while the VM runs (see [`QemuBoot::run_reacting`]).
    pub fn boot_reacting(
        &self,
        label: &str,
        fragment_sockets: Vec<PathBuf>,
        broker_socket: Option<PathBuf>,
        reactions: Vec<Reaction<'_>>,
    ) -> Result<BootOutcome> {
        self.qemu_boot(label, fragment_sockets, broker_socket)
            .run_reacting(reactions)
    }

    fn qemu_boot(
        &self,
        label: &str,
        fragment_sockets: Vec<PathBuf>,
        broker_socket: Option<PathBuf>,
    ) -> QemuBoot {
        QemuBoot {
            script: self.env.run_qemu_script(),
            kernel: self.env.kernel.clone(),
            initrd: self.initramfs.clone(),
            volume: self.volume.clone(),
            fragment_sockets,
            broker_socket,
            append: String::new(),
            iommu_platform: false,
            timeout: self.env.boot_timeout,
            console_log: self.dir().join(format!("{label}.console.log")),
            stderr_log: self.dir().join(format!("{label}.qemu-stderr.log")),
        }
    }
}

/// Where `keyshard init` deals a key: the state directory, the VM id, the TPM (and the swtpm,
/// when the scenario owns it).
#[derive(Debug)]
struct Dealt {
    state_dir: Option<PathBuf>,
    vm_id: String,
    tcti: Option<String>,
    swtpm: Option<Swtpm>,
}

/// The state directories of many VMs under one root (`<root>/<vmid>/`, each made by
/// `keyshard init --state-dir <root>/<vmid> --vm-id <vmid>`), all sealed to one swtpm: a host
/// served by one `keyshard coordinator --state-root`. The root and the TPM live in a temporary
/// directory of their own; each VM's volume, initramfs and fragment sockets live in its
/// [`Scenario`]'s.
#[derive(Debug)]
pub struct StateRoot {
    /// Declared before `work`: killed before the directory that holds its state is removed.
    swtpm: Swtpm,
    env: E2eEnv,
    work: tempfile::TempDir,
}

impl StateRoot {
    /// An empty root and a fresh swtpm (its state beside the root, not in it).
    pub fn new(name: &str) -> Result<Self> {
        let env = E2eEnv::from_env()?;
        let work = work_dir(name, &env)?;
        let root = work.path().join("root");
        fs::create_dir(&root).map_err(io_context(format!("creating {}", root.display())))?;
        let swtpm = Swtpm::start(&work.path().join("swtpm"))?;
        Ok(Self { swtpm, env, work })
    }

    /// The directory `--state-root` names.
    pub fn path(&self) -> PathBuf {
        self.work.path().join("root")
    }

    /// `<root>/<vm_id>`.
    pub fn state_dir(&self, vm_id: &str) -> PathBuf {
        self.path().join(vm_id)
    }

    /// The TPM every VM's `tpm` shares are sealed to.
    pub fn swtpm(&self) -> &Swtpm {
        &self.swtpm
    }

    /// Deals a fresh random volume key for VM `vm_id` by `policy` into `<root>/<vm_id>`, sealed
    /// to the root's swtpm, and builds the VM's volume and initramfs in a work directory of its
    /// own (see [`Scenario::init`]).
    pub fn init_vm(&self, name: &str, policy: &str, vm_id: &str) -> Result<Scenario> {
        let dealing = Dealing::new(name)?;
        let dealt = Dealt {
            state_dir: Some(self.state_dir(vm_id)),
            vm_id: vm_id.to_owned(),
            tcti: Some(self.swtpm.tcti()),
            swtpm: None,
        };
        Scenario::init_dealt(dealing, name, policy, None, dealt, &[])
    }

    /// Starts `keyshard coordinator --state-root ROOT --tcti SWTPM` and waits until it says it
    /// is ready (every VM present then listens).
    pub fn start_coordinator(&self) -> Result<RootCoordinator> {
        let daemon = Daemon::start(
            "keyshard coordinator --state-root",
            Command::new(&self.env.keyshard)
                .arg("coordinator")
                .arg("--state-root")
                .arg(self.path())
                .arg("--tcti")
                .arg(self.swtpm.tcti()),
            DAEMON_READY_PREFIX,
            DAEMON_READY_TIMEOUT,
            &self.work.path().join("coordinator.stderr.log"),
        )?;
        Ok(RootCoordinator {
            root: self.path(),
            daemon,
        })
    }
}

/// A running `keyshard coordinator --state-root ROOT`: VM `<vmid>`'s broker socket is
/// `ROOT/<vmid>/broker.sock`, its audit log `ROOT/<vmid>/audit.log`.
#[derive(Debug)]
pub struct RootCoordinator {
    pub root: PathBuf,
    pub daemon: Daemon,
}

impl RootCoordinator {
    pub fn socket(&self, vm_id: &str) -> PathBuf {
        self.root.join(vm_id).join("broker.sock")
    }

    /// Everything in VM `vm_id`'s audit log so far.
    pub fn audit(&self, vm_id: &str) -> Result<Vec<AuditEntry>> {
        audit::read(&self.root.join(vm_id).join("audit.log"))
    }

    /// Stops it with SIGTERM (SIGKILL after a grace period), and reads the TPM operations it
    /// reports on its way out: `stopped: tpm operations: TOTAL (AT_READY before ready)`.
    pub fn stop(&mut self) -> Result<RootStopped> {
        let status = self.daemon.stop()?;
        // Its stdout is read on a thread of the harness, which may lag behind its exit a little.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let tpm_operations = loop {
            let found = self
                .daemon
                .stdout()
                .iter()
                .find_map(|line| parse_stopped_line(line));
            if found.is_some() || std::time::Instant::now() >= deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(RootStopped {
            status,
            tpm_operations,
        })
    }

    /// The VMs it announced (`serving <vmid> at <socket>`), with their sockets, in order.
    pub fn serving(&self) -> Vec<(String, PathBuf)> {
        self.daemon
            .stdout()
            .iter()
            .filter_map(|line| {
                let (vm, socket) = line.strip_prefix("serving ")?.split_once(" at ")?;
                Some((vm.to_owned(), PathBuf::from(socket)))
            })
            .collect()
    }
}

/// How a [`RootCoordinator`] ended.
#[derive(Debug)]
pub struct RootStopped {
    pub status: std::process::ExitStatus,
    /// `(total, before ready)` TPM operations (quotes, unseals and PCR reads sent to the TPM),
    /// if it printed its `stopped:` line.
    pub tpm_operations: Option<(u64, u64)>,
}

/// `stopped: tpm operations: TOTAL (AT_READY before ready)`.
fn parse_stopped_line(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("stopped: tpm operations: ")?;
    let (total, rest) = rest.split_once(" (")?;
    let at_ready = rest.strip_suffix(" before ready)")?;
    Some((total.parse().ok()?, at_ready.parse().ok()?))
}

/// A change to the guest's copy of the manifest.
type ManifestEdit<'a> = Box<dyn FnOnce(&mut Manifest) + 'a>;

fn parse_manifest(path: &Path) -> Result<Manifest> {
    let text =
        fs::read_to_string(path).map_err(io_context(format!("reading {}", path.display())))?;
    Manifest::parse(&text).map_err(|source| HarnessError::Manifest {
        path: path.to_owned(),
        source,
    })
}

/// A fragment file, with the holder it names.
fn read_fragment(path: &Path) -> Result<FragmentFile> {
    let bytes = fs::read(path).map_err(io_context(format!("reading {}", path.display())))?;
    let fragment = Fragment::parse(&bytes).map_err(|source| HarnessError::Fragment {
        path: path.to_owned(),
        source,
    })?;
    Ok(FragmentFile {
        holder_id: fragment.header().holder_id.as_str().to_owned(),
        path: path.to_owned(),
    })
}

/// fragment-1.ksf ... fragment-N.ksf in `dir` (what `keyshard split` writes).
fn read_split_fragments(dir: &Path) -> Result<Vec<FragmentFile>> {
    let mut fragments = Vec::new();
    for index in 1.. {
        let path = dir.join(format!("fragment-{index}.ksf"));
        if !path.exists() {
            break;
        }
        fragments.push(read_fragment(&path)?);
    }
    if fragments.is_empty() {
        return Err(HarnessError::MissingFile {
            what: "fragments from keyshard split",
            path: dir.join("fragment-1.ksf"),
        });
    }
    Ok(fragments)
}

/// A test's temporary directory, kept (and named on stderr) when KEYSHARD_E2E_KEEP=1.
fn work_dir(name: &str, env: &E2eEnv) -> Result<tempfile::TempDir> {
    let mut work = tempfile::Builder::new()
        .prefix(&format!("keyshard-e2e-{name}-"))
        .tempdir()
        .map_err(io_context("creating a work directory"))?;
    if env.keep_workdirs {
        work.disable_cleanup(true);
        eprintln!("keyshard-e2e: {name}: keeping {}", work.path().display());
    }
    Ok(work)
}

/// `len` bytes from the kernel's random source.
pub fn random_bytes(len: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_context("reading /dev/urandom"))?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(io_context(format!("writing {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(io_context(format!("chmod {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tpm_operations_of_the_stopped_line() {
        assert_eq!(
            parse_stopped_line("stopped: tpm operations: 12 (4 before ready)"),
            Some((12, 4))
        );
        for line in [
            "stopped serving vm-a: removed",
            "stopped: tpm operations: 12",
            "stopped: tpm operations: x (4 before ready)",
            "stopped: tpm operations: 12 (4 before ready) and more",
        ] {
            assert_eq!(parse_stopped_line(line), None, "{line}");
        }
    }
}
