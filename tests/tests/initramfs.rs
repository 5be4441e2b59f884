//! `images/build-initramfs.sh` and the sev-guest driver (issue 7, item 9): the script looks the
//! driver up in the kernel's module tree, packs it when the manifest has `sev` holders, says
//! what it found, and refuses a kernel without it for such a manifest. Run against fake module
//! trees (empty `.ko` files and a `modules.dep`), so it needs no kernel and runs in `make unit`;
//! busybox-static, cryptsetup-bin and cpio must be installed (`make deps`).

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KVER: &str = "6.1.0-test-amd64";
const SEV_GUEST_KO: &str = "kernel/drivers/virt/coco/sev-guest/sev-guest.ko";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build-initramfs.sh")
}

/// Where the sev-guest driver is in a fake kernel.
#[derive(Clone, Copy)]
enum SevGuest {
    Module,
    BuiltIn,
    Absent,
}

/// A module tree with what build-initramfs.sh always wants, and sev-guest as asked.
fn module_tree(dir: &Path, sev_guest: SevGuest) -> PathBuf {
    let root = dir.join("modules");
    let mut dep = String::from(
        "kernel/drivers/virtio/virtio.ko:\n\
         kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko\n\
         kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\n\
         kernel/drivers/md/dm-mod.ko:\n\
         kernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko\n\
         kernel/crypto/xts.ko:\n\
         kernel/crypto/ecb.ko:\n",
    );
    let mut builtin = String::from("kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n");
    match sev_guest {
        SevGuest::Module => dep.push_str(&format!("{SEV_GUEST_KO}:\n")),
        SevGuest::BuiltIn => builtin.push_str(&format!("{SEV_GUEST_KO}\n")),
        SevGuest::Absent => {}
    }
    for line in dep.lines() {
        let module = root.join(line.split(':').next().unwrap());
        fs::create_dir_all(module.parent().unwrap()).unwrap();
        fs::write(module, b"").unwrap();
    }
    fs::write(root.join("modules.dep"), dep).unwrap();
    fs::write(root.join("modules.builtin"), builtin).unwrap();
    root
}

fn manifest(dir: &Path, classes: &[&str]) -> PathBuf {
    let mut text = String::from("version = 1\nkey_id = \"t\"\nthreshold = 2\n");
    for (i, class) in classes.iter().enumerate() {
        text.push_str(&format!(
            "\n[[holders]]\nclass = \"{class}\"\nid = \"{class}-{}\"\n",
            i + 1
        ));
    }
    let path = dir.join("manifest.toml");
    fs::write(&path, text).unwrap();
    path
}

fn build(dir: &Path, modules: &Path, manifest: &Path, extra: &[&str]) -> Output {
    Command::new(script())
        // Any static executable serves as the guest binary here: busybox-static's.
        .args(["--guest-bin", "/bin/busybox", "--kernel-version", KVER])
        .arg("--modules-dir")
        .arg(modules)
        .arg("--manifest")
        .arg(manifest)
        .arg("--out")
        .arg(dir.join("initramfs.cpio"))
        .args(extra)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The initramfs's file list and its modules.order.
fn contents(dir: &Path) -> (Vec<String>, String) {
    let cpio = fs::File::open(dir.join("initramfs.cpio")).unwrap();
    let list = Command::new("cpio")
        .args(["-it", "--quiet"])
        .stdin(cpio)
        .output()
        .unwrap();
    assert!(list.status.success(), "{}", text(&list.stderr));
    let cpio = fs::File::open(dir.join("initramfs.cpio")).unwrap();
    let order = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "etc/keyshard/modules.order"])
        .stdin(cpio)
        .output()
        .unwrap();
    (
        text(&list.stdout).lines().map(str::to_owned).collect(),
        text(&order.stdout),
    )
}

#[test]
fn item9_sev_holders_and_a_kernel_without_sev_guest_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let modules = module_tree(dir.path(), SevGuest::Absent);
    let manifest = manifest(dir.path(), &["vhd", "sev"]);
    let out = build(dir.path(), &modules, &manifest, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("has no sev-guest driver"), "{stderr}");
    assert!(stderr.contains("linux-image-amd64"), "{stderr}");
    assert!(stderr.contains("--allow-no-sev-guest"), "{stderr}");
    assert!(!dir.path().join("initramfs.cpio").exists());

    // Asked to build anyway: it does, and warns.
    let out = build(dir.path(), &modules, &manifest, &["--allow-no-sev-guest"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("WARNING"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("sev-guest driver: absent"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn item9_a_sev_guest_module_is_packed_and_loaded_for_sev_holders() {
    let dir = tempfile::tempdir().unwrap();
    let modules = module_tree(dir.path(), SevGuest::Module);
    let manifest = manifest(dir.path(), &["vhd", "sev"]);
    let out = build(dir.path(), &modules, &manifest, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "sev-guest driver: module {SEV_GUEST_KO} (packed and loaded"
        )),
        "{stdout}"
    );
    let (files, order) = contents(dir.path());
    let packed = format!("lib/modules/{KVER}/{SEV_GUEST_KO}");
    assert!(files.contains(&packed), "{files:?}");
    assert!(order.lines().any(|l| l == format!("/{packed}")), "{order}");
    assert!(files.contains(&"bin/virtio-report".to_owned()), "{files:?}");
}

#[test]
fn item9_without_sev_holders_the_driver_is_reported_not_packed() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest(dir.path(), &["vhd", "vhd", "tpm"]);

    let modules = module_tree(dir.path(), SevGuest::Module);
    let out = build(dir.path(), &modules, &manifest, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(not packed: the manifest has no sev holders)"),
        "{}",
        text(&out.stdout)
    );
    let (files, order) = contents(dir.path());
    assert!(!files.iter().any(|f| f.contains("sev-guest")), "{files:?}");
    assert!(!order.contains("sev-guest"), "{order}");

    // The Debian cloud kernel's case: no driver, and no sev holders to need it.
    fs::remove_dir_all(&modules).unwrap();
    let modules = module_tree(dir.path(), SevGuest::Absent);
    let out = build(dir.path(), &modules, &manifest, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("sev-guest driver: absent (no /dev/sev-guest"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn item9_a_built_in_sev_guest_is_reported_and_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let modules = module_tree(dir.path(), SevGuest::BuiltIn);
    let manifest = manifest(dir.path(), &["vhd", "sev"]);
    let out = build(dir.path(), &modules, &manifest, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("sev-guest driver: built in"),
        "{}",
        text(&out.stdout)
    );
}

/// Review of issue 7: a hand-written manifest may list its holders as inline tables with single
/// quotes (valid TOML, which the agent reads); its sev holder must be seen all the same, so a
/// kernel without sev-guest is refused rather than built into an image that can never ask it.
#[test]
fn review_sev_holders_in_any_toml_spelling_are_seen() {
    let dir = tempfile::tempdir().unwrap();
    let modules = module_tree(dir.path(), SevGuest::Absent);
    for holders in [
        "holders = [{ class = 'vhd', id = 'vhd-1' }, { class = 'sev', id = 'sev-1' }]",
        "holders = [ {id=\"sev-1\",class=\"sev\"} ]",
        "[[holders]]\n\"class\" = \"sev\"\nid = \"sev-1\"",
    ] {
        let path = dir.path().join("manifest.toml");
        fs::write(
            &path,
            format!("version = 1\nkey_id = \"t\"\nthreshold = 2\n{holders}\n"),
        )
        .unwrap();
        let out = build(dir.path(), &modules, &path, &[]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{holders}: {}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stderr).contains("has no sev-guest driver"),
            "{holders}: {}",
            text(&out.stderr)
        );
    }
    // A sev holder in a comment only is no sev holder.
    let path = manifest(dir.path(), &["vhd"]);
    let mut text_now = fs::read_to_string(&path).unwrap();
    text_now.push_str("# class = \"sev\"\n");
    fs::write(&path, text_now).unwrap();
    assert!(build(dir.path(), &modules, &path, &[]).status.success());
}
