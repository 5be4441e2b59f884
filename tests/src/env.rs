//! Where the end-to-end tests find what they run. `make e2e` builds everything and sets:
//!
//! | variable | what |
//! |---|---|
//! | `KEYSHARD_E2E_KEYSHARD_BIN` | the `keyshard` CLI (keygen, split, init, coordinator) |
//! | `KEYSHARD_E2E_VHOST_KEYSHARD_BIN` | the fragment device daemon `vhost-keyshard` |
//! | `KEYSHARD_E2E_GUEST_BIN` | `keyshard-guest`, statically linked, for the initramfs |
//! | `KEYSHARD_E2E_KERNEL` | the guest kernel (default: the newest `/boot/vmlinuz-*-cloud-amd64`) |
//! | `KEYSHARD_E2E_BOOT_TIMEOUT` | seconds before a boot is killed (default 240) |
//! | `KEYSHARD_E2E_KEEP` | `1` keeps each test's work directory (keys, images, logs) |
//!
//! `swtpm` and `tpm2_pcrextend` (Debian packages swtpm and tpm2-tools) are run from `PATH`.
//!
//! `qemu-configs/run-qemu.sh` also reads `KEYSHARD_ACCEL` (default `tcg`), `KEYSHARD_QEMU`,
//! `KEYSHARD_CPU` and `KEYSHARD_QEMU_EXTRA_ARGS` from the same environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{HarnessError, Result};

pub const KEYSHARD_BIN: &str = "KEYSHARD_E2E_KEYSHARD_BIN";
pub const VHOST_KEYSHARD_BIN: &str = "KEYSHARD_E2E_VHOST_KEYSHARD_BIN";
pub const GUEST_BIN: &str = "KEYSHARD_E2E_GUEST_BIN";
pub const KERNEL: &str = "KEYSHARD_E2E_KERNEL";
pub const BOOT_TIMEOUT: &str = "KEYSHARD_E2E_BOOT_TIMEOUT";
pub const KEEP: &str = "KEYSHARD_E2E_KEEP";

const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(240);

#[derive(Debug, Clone)]
pub struct E2eEnv {
    pub keyshard: PathBuf,
    pub vhost_keyshard: PathBuf,
    pub guest: PathBuf,
    pub kernel: PathBuf,
    pub boot_timeout: Duration,
    pub keep_workdirs: bool,
    /// The repository root: `images/` and `qemu-configs/` are found from here.
    pub repo: PathBuf,
}

impl E2eEnv {
    pub fn from_env() -> Result<Self> {
        let kernel = match std::env::var_os(KERNEL) {
            Some(path) => PathBuf::from(path),
            None => newest_cloud_kernel(Path::new("/boot"))?,
        };
        let boot_timeout = match std::env::var(BOOT_TIMEOUT) {
            Ok(text) => {
                Duration::from_secs(text.trim().parse().map_err(|_| HarnessError::BadEnv {
                    var: BOOT_TIMEOUT,
                    reason: format!("{text:?} is not a number of seconds"),
                })?)
            }
            Err(_) => DEFAULT_BOOT_TIMEOUT,
        };
        let env = Self {
            keyshard: path_var(KEYSHARD_BIN)?,
            vhost_keyshard: path_var(VHOST_KEYSHARD_BIN)?,
            guest: path_var(GUEST_BIN)?,
            kernel,
            boot_timeout,
            keep_workdirs: std::env::var(KEEP).is_ok_and(|v| v == "1"),
            repo: Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or(Path::new(".."))
                .to_owned(),
        };
        for (what, path) in [
            ("keyshard", &env.keyshard),
            ("vhost-keyshard", &env.vhost_keyshard),
            ("keyshard-guest", &env.guest),
            ("guest kernel", &env.kernel),
        ] {
            if !path.is_file() {
                return Err(HarnessError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(env)
    }

    pub fn build_initramfs_script(&self) -> PathBuf {
        self.repo.join("images/build-initramfs.sh")
    }

    pub fn make_volume_script(&self) -> PathBuf {
        self.repo.join("images/make-volume.sh")
    }

    pub fn run_qemu_script(&self) -> PathBuf {
        self.repo.join("qemu-configs/run-qemu.sh")
    }
}

fn path_var(var: &'static str) -> Result<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or(HarnessError::MissingEnv { var })
}

/// The newest `vmlinuz-*-cloud-amd64` in `boot`, by version order.
pub fn newest_cloud_kernel(boot: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(boot).map_err(crate::io_context(format!(
        "listing {} for a cloud kernel",
        boot.display()
    )))?;
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?;
            version
                .ends_with("-cloud-amd64")
                .then(|| (version_key(version), entry.path()))
        })
        .max()
        .map(|(_, path)| path)
        .ok_or(HarnessError::MissingFile {
            what: "a Debian cloud kernel (apt-get install linux-image-cloud-amd64)",
            path: boot.join("vmlinuz-*-cloud-amd64"),
        })
}

/// Orders `6.1.0-56-cloud-amd64` after `6.1.0-9-cloud-amd64`: numbers compare as numbers.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .filter_map(|part| part.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_cloud_kernel_by_version() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "vmlinuz-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-56-cloud-amd64",
            "vmlinuz-6.9.0-1-amd64",
            "config-6.1.0-99-cloud-amd64",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(
            newest_cloud_kernel(dir.path()).unwrap(),
            dir.path().join("vmlinuz-6.1.0-56-cloud-amd64")
        );
    }

    #[test]
    fn no_cloud_kernel_is_an_error_that_says_what_to_install() {
        let dir = tempfile::tempdir().unwrap();
        let err = newest_cloud_kernel(dir.path()).unwrap_err();
        assert!(err.to_string().contains("linux-image-cloud-amd64"), "{err}");
    }
}
