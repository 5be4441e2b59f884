//! The guest images, made by the project's own scripts so the tests prove them: the initramfs
//! (`images/build-initramfs.sh`) and the LUKS2 test volume (`images/make-volume.sh`).

use std::path::Path;
use std::process::Command;

use crate::Result;
use crate::env::E2eEnv;
use crate::process::run_tool;

/// Builds the initramfs for `env.kernel` with `env.guest` and `manifest` into `out`.
pub fn build_initramfs(env: &E2eEnv, manifest: &Path, out: &Path) -> Result<()> {
    run_tool(
        "images/build-initramfs.sh",
        Command::new(env.build_initramfs_script())
            .arg("--guest-bin")
            .arg(&env.guest)
            .arg("--manifest")
            .arg(manifest)
            .arg("--kernel")
            .arg(&env.kernel)
            .arg("--out")
            .arg(out),
    )?;
    Ok(())
}

/// Makes a LUKS2 volume unlocked by `key` whose filesystem holds the known file with `content`.
pub fn make_volume(env: &E2eEnv, key: &Path, content: &str, out: &Path) -> Result<()> {
    run_tool(
        "images/make-volume.sh",
        Command::new(env.make_volume_script())
            .arg("--key")
            .arg(key)
            .arg("--content")
            .arg(content)
            .arg("--out")
            .arg(out),
    )?;
    Ok(())
}
