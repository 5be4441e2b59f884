//! What a test boots: a random key split with `keyshard split`, the LUKS2 volume it unlocks, the
//! initramfs that carries the manifest, and one `vhost-keyshard` daemon per fragment, all in one
//! temporary directory that goes away with the scenario (unless `KEYSHARD_E2E_KEEP=1`).

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyshard_core::Fragment;
use keyshard_core::manifest::Manifest;

use crate::env::E2eEnv;
use crate::images::{build_initramfs, make_volume};
use crate::process::{Daemon, run_tool};
use crate::qemu::{BootOutcome, QemuBoot};
use crate::{HarnessError, Result, io_context};

/// The line `vhost-keyshard` prints on stdout once its sockets listen.
pub const DAEMON_READY_PREFIX: &str = "ready";
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The LUKS2 key length: the secret that is split is the raw volume key file.
pub const VOLUME_KEY_LEN: usize = 32;

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

#[derive(Debug)]
pub struct Scenario {
    pub env: E2eEnv,
    work: tempfile::TempDir,
    pub secret: PathBuf,
    pub manifest: PathBuf,
    pub fragments: Vec<FragmentFile>,
    pub volume: PathBuf,
    /// The known file's content on the volume; random, so no other boot can print it.
    pub volume_content: String,
    pub initramfs: PathBuf,
}

impl Scenario {
    /// Splits a fresh random volume key k-of-n (`vhd` holders) and builds the volume and the
    /// initramfs for it.
    pub fn split(name: &str, k: u8, n: u8) -> Result<Self> {
        let env = E2eEnv::from_env()?;
        let mut work = tempfile::Builder::new()
            .prefix(&format!("keyshard-e2e-{name}-"))
            .tempdir()
            .map_err(io_context("creating a work directory"))?;
        if env.keep_workdirs {
            work.disable_cleanup(true);
            eprintln!("keyshard-e2e: {name}: keeping {}", work.path().display());
        }
        let dir = work.path();
        let keyshard = |args: &[&str]| {
            run_tool(
                "keyshard",
                Command::new(&env.keyshard).args(args).current_dir(dir),
            )
        };

        keyshard(&["keygen", "--out", "dealer.pem"])?;
        let secret = dir.join("volume.key");
        write_private(&secret, &random_bytes(VOLUME_KEY_LEN)?)?;
        let (k, n) = (k.to_string(), n.to_string());
        keyshard(&[
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
        let manifest = dir.join("manifest.toml");
        let fragments = read_fragments(&dir.join("fragments"))?;

        let volume_content = format!(
            "keyshard e2e {name}: volume {} opened",
            hex(&random_bytes(8)?)
        );
        let volume = dir.join("volume.img");
        make_volume(&env, &secret, &volume_content, &volume)?;
        let initramfs = dir.join("initramfs.cpio");
        build_initramfs(&env, &manifest, &initramfs)?;

        Ok(Self {
            env,
            work,
            secret,
            manifest,
            fragments,
            volume,
            volume_content,
            initramfs,
        })
    }

    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    /// The holders the manifest lists, in its order.
    pub fn manifest_holders(&self) -> Result<Vec<String>> {
        let text = fs::read_to_string(&self.manifest)
            .map_err(io_context(format!("reading {}", self.manifest.display())))?;
        let manifest = Manifest::parse(&text).map_err(|source| HarnessError::Manifest {
            path: self.manifest.clone(),
            source,
        })?;
        Ok(manifest
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

    /// Boots the guest with these fragment sockets through `qemu-configs/run-qemu.sh`; the
    /// console goes to `<label>.console.log` in the work directory.
    pub fn boot(&self, label: &str, fragment_sockets: Vec<PathBuf>) -> Result<BootOutcome> {
        QemuBoot {
            script: self.env.run_qemu_script(),
            kernel: self.env.kernel.clone(),
            initrd: self.initramfs.clone(),
            volume: self.volume.clone(),
            fragment_sockets,
            append: String::new(),
            timeout: self.env.boot_timeout,
            console_log: self.dir().join(format!("{label}.console.log")),
            stderr_log: self.dir().join(format!("{label}.qemu-stderr.log")),
        }
        .run()
    }
}

/// fragment-1.ksf ... fragment-N.ksf in `dir`, with the holder each names.
fn read_fragments(dir: &Path) -> Result<Vec<FragmentFile>> {
    let mut fragments = Vec::new();
    for index in 1.. {
        let path = dir.join(format!("fragment-{index}.ksf"));
        if !path.exists() {
            break;
        }
        let bytes = fs::read(&path).map_err(io_context(format!("reading {}", path.display())))?;
        let fragment = Fragment::parse(&bytes).map_err(|source| HarnessError::Fragment {
            path: path.clone(),
            source,
        })?;
        fragments.push(FragmentFile {
            holder_id: fragment.header().holder_id.as_str().to_owned(),
            path,
        });
    }
    if fragments.is_empty() {
        return Err(HarnessError::MissingFile {
            what: "fragments from keyshard split",
            path: dir.join("fragment-1.ksf"),
        });
    }
    Ok(fragments)
}

fn random_bytes(len: usize) -> Result<Vec<u8>> {
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
