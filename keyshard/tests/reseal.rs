//! Issue 7 item 8, against a real (software) TPM: a state directory with a recovery share; PCR 7
//! changes (a firmware update), the tpm share is refused; `reseal` with the recovery share seals
//! it to the current PCRs and the release works again, rebuilding the same key. Once through the
//! library with a recovery file, once through the `keyshard` binary with the printed code.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::swtpm::Swtpm;
use keyshard_coordinator::init::init;
use keyshard_coordinator::mailbox::RequestHandler;
use keyshard_coordinator::reseal::{RecoveryInput, ResealError, reseal};
use keyshard_coordinator::setup;
use keyshard_coordinator::state::StateDir;
use keyshard_core::broker::{Body, Evidence, Message, RefusalCode};
use keyshard_core::envelope::{ReleaseContext, RequestKey};
use keyshard_core::files::Overwrite;
use keyshard_core::manifest::Manifest;
use keyshard_core::policy::{PcrBank, Policy};
use keyshard_core::quorum::{self, Candidate};
use keyshard_core::{HolderClass, HolderId};
use keyshard_tpm::{Tpm, TpmConfig, TpmService};

const POLICY: &str = "allow_host_reachable_quorum = true\nthreshold = 3\n\
                      [holders]\nvhd = 2\ntpm = 1\nrecovery = 1\n\
                      [tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n";

/// Asks the coordinator of `dir` for tpm-1 and rebuilds the key with the vhd fragments; the
/// refusal when it is refused.
fn release_and_rebuild(dir: &StateDir, tcti: &str) -> Result<Vec<u8>, (RefusalCode, String)> {
    let state = setup::load_state(dir).unwrap();
    let service = TpmService::spawn(TpmConfig::new(tcti.to_owned())).unwrap();
    let coordinator = setup::coordinator(dir, &state, Some(service)).unwrap();
    let key = RequestKey::generate().unwrap();
    let answer = coordinator.answer(
        "vm1",
        &Message {
            request_id: 1,
            body: Body::Release {
                class: HolderClass::Tpm,
                holder_id: HolderId::new("tpm-1").unwrap(),
                request_key: key.public_key(),
                evidence: Evidence::None,
            },
        },
    );
    let envelope = match answer {
        Body::Released { envelope, .. } => envelope,
        Body::Refused { code, reason } => return Err((code, reason)),
        other => panic!("unexpected answer {other:?}"),
    };
    let context = ReleaseContext {
        request_id: 1,
        class: HolderClass::Tpm,
        holder_id: HolderId::new("tpm-1").unwrap(),
    };
    let fragment = key.open(&envelope, &context).unwrap();
    let mut candidates = vec![Candidate::new("broker tpm-1", fragment.to_vec())];
    for vhd in ["vhd-1", "vhd-2"] {
        let bytes = std::fs::read(dir.fragment(&HolderId::new(vhd).unwrap())).unwrap();
        candidates.push(Candidate::new(vhd, bytes));
    }
    let manifest = Manifest::parse(&std::fs::read_to_string(dir.manifest()).unwrap()).unwrap();
    let outcome = quorum::rebuild(&manifest.quorum_request(), &candidates).unwrap();
    Ok(outcome.secret.to_vec())
}

fn extend_pcr7(tcti: &str) {
    let mut tpm = Tpm::open(tcti).unwrap();
    tpm.extend_pcr(PcrBank::Sha256, 7, b"a firmware update")
        .unwrap();
}

fn assert_refused_for_pcr7(result: Result<Vec<u8>, (RefusalCode, String)>) {
    let Err((code, reason)) = result else {
        panic!("released after a PCR change");
    };
    assert_eq!(code, RefusalCode::HostAttestation);
    assert_eq!(reason, "PCR 7 (sha256) differs from its golden value");
}

#[test]
fn item8_reseal_with_the_recovery_file_after_a_pcr_change() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let work = tempfile::tempdir().unwrap();
    let dir = StateDir::new(work.path().join("state"));
    let secret = keyshard_core::keys::generate().unwrap().to_bytes().to_vec();
    let dealer = keyshard_core::keys::generate().unwrap();
    let report = {
        let mut tpm = Tpm::open(&tcti).unwrap();
        init(
            &dir,
            &Policy::parse(POLICY).unwrap(),
            &secret,
            &dealer,
            Some(&mut tpm),
            Overwrite::Refuse,
            &["vm1".to_owned()],
        )
        .unwrap()
    };
    let recovery = report.recovery.expect("a recovery fragment");
    assert_eq!(recovery.header().class, HolderClass::Recovery);
    assert_eq!(recovery.header().index, 4);
    // Not in the state directory, and not listed in the guest manifest.
    let manifest = Manifest::parse(&std::fs::read_to_string(dir.manifest()).unwrap()).unwrap();
    let listed: Vec<String> = manifest.holders.iter().map(|h| h.id.to_string()).collect();
    assert_eq!(listed, ["vhd-1", "vhd-2", "tpm-1"]);
    assert!(!dir.fragment(&recovery.header().holder_id).exists());
    let sealed_before =
        std::fs::read(dir.sealed_fragment(&HolderId::new("tpm-1").unwrap())).unwrap();

    assert_eq!(release_and_rebuild(&dir, &tcti).unwrap(), secret);
    extend_pcr7(&tcti);
    assert_refused_for_pcr7(release_and_rebuild(&dir, &tcti));

    // Another dealer key is refused before anything is written.
    let mut tpm = Tpm::open(&tcti).unwrap();
    let input = RecoveryInput::File(zeroize::Zeroizing::new(recovery.encoded().to_vec()));
    let wrong = reseal(
        &dir,
        &input,
        &keyshard_core::keys::generate().unwrap(),
        &mut tpm,
    );
    assert!(
        matches!(wrong, Err(ResealError::WrongDealerKey)),
        "{wrong:?}"
    );

    let report = reseal(&dir, &input, &dealer, &mut tpm).unwrap();
    drop(tpm);
    assert_eq!(report.resealed, ["tpm-1"]);
    assert_eq!(report.changed, [7]);
    assert_ne!(
        std::fs::read(dir.sealed_fragment(&HolderId::new("tpm-1").unwrap())).unwrap(),
        sealed_before,
        "the tpm fragment was not sealed again"
    );
    assert_eq!(release_and_rebuild(&dir, &tcti).unwrap(), secret);
    // Issue 8 item 4: the guest manifest's golden PCR digest follows the new golden values.
    let resealed = Manifest::parse(&std::fs::read_to_string(dir.manifest()).unwrap()).unwrap();
    let (before, after) = (
        manifest.host_attestation.unwrap(),
        resealed.host_attestation.unwrap(),
    );
    assert_ne!(before.pcr_digest, after.pcr_digest);
    assert_eq!((before.ak, before.pcrs), (after.ak, after.pcrs));
    assert_eq!(resealed.holders, manifest.holders);
}

#[test]
fn item8_a_recovery_share_of_another_deal_is_refused() {
    let swtpm = Swtpm::start();
    let tcti = swtpm.tcti();
    let work = tempfile::tempdir().unwrap();
    let dealer = keyshard_core::keys::generate().unwrap();
    let secret = [7u8; 32];
    let mut tpm = Tpm::open(&tcti).unwrap();
    let mut deal = |name: &str| {
        let dir = StateDir::new(work.path().join(name));
        let report = init(
            &dir,
            &Policy::parse(POLICY).unwrap(),
            &secret,
            &dealer,
            Some(&mut tpm),
            Overwrite::Refuse,
            &["vm1".to_owned()],
        )
        .unwrap();
        (dir, report.recovery.unwrap())
    };
    let (a, _) = deal("a");
    let (_, b_recovery) = deal("b");
    let input = RecoveryInput::File(zeroize::Zeroizing::new(b_recovery.encoded().to_vec()));
    let err = reseal(&a, &input, &dealer, &mut tpm).unwrap_err();
    assert!(
        matches!(&err, ResealError::RecoveryRejected(why) if why.contains("foreign key id")),
        "{err}"
    );
}

struct Cli<'a> {
    cwd: &'a Path,
    tcti: String,
}

impl Cli<'_> {
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyshard"))
            .args(args)
            .arg("--tcti")
            .arg(&self.tcti)
            .current_dir(self.cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn item8_keyshard_init_prints_a_recovery_code_and_reseal_reads_it() {
    let swtpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let cli = Cli {
        cwd: work.path(),
        tcti: swtpm.tcti(),
    };
    std::fs::write(work.path().join("p.toml"), POLICY).unwrap();
    std::fs::write(work.path().join("secret"), [0x5a; 32]).unwrap();

    // A recovery file inside the state directory is refused before anything is written.
    let inside = cli.run(
        &[
            "init",
            "--policy",
            "p.toml",
            "--state-dir",
            "state",
            "--secret-file",
            "secret",
            "--recovery-file",
            "state/../state/recovery.ksf",
        ],
        &[],
    );
    assert_eq!(inside.status.code(), Some(1));
    assert!(
        text(&inside.stderr).contains("inside the state directory"),
        "{}",
        text(&inside.stderr)
    );
    assert!(!work.path().join("state").exists());

    let out = cli.run(
        &[
            "init",
            "--policy",
            "p.toml",
            "--state-dir",
            "state",
            "--vm-id",
            "vm1",
            "--secret-file",
            "secret",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("shown once"),
        "{}",
        text(&out.stderr)
    );
    // Captured here, not on a terminal: init says the code may now be kept on this host.
    assert!(
        text(&out.stderr).contains("stdout is not a terminal"),
        "{}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let code: String = stdout
        .lines()
        .skip_while(|l| !l.contains("recovery code:"))
        .skip(1)
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(code.len() > 100, "{stdout}");
    // The code is nowhere in the state directory.
    let dir = StateDir::new(work.path().join("state"));
    assert!(!dir.root().join("recovery-1.ksf").exists());

    extend_pcr7(&cli.tcti);
    assert_refused_for_pcr7(release_and_rebuild(&dir, &cli.tcti));

    // A mistyped code is refused with the reason, and nothing changes.
    let typo = code.replacen(|c: char| c.is_ascii_uppercase(), "2", 1);
    let out = cli.run(
        &["reseal", "--state-dir", "state", "--recovery-code"],
        typo.as_bytes(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("checksum"),
        "{}",
        text(&out.stderr)
    );
    assert_refused_for_pcr7(release_and_rebuild(&dir, &cli.tcti));

    let out = cli.run(
        &["reseal", "--state-dir", "state", "--recovery-code"],
        code.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("resealed tpm-1 to the current PCRs sha256:0,7 (PCRs changed since they were last sealed: 7)"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(release_and_rebuild(&dir, &cli.tcti).unwrap(), [0x5a; 32]);
}

#[test]
fn item8_keyshard_init_writes_the_recovery_file_once_and_0600() {
    let swtpm = Swtpm::start();
    let work = tempfile::tempdir().unwrap();
    let cli = Cli {
        cwd: work.path(),
        tcti: swtpm.tcti(),
    };
    std::fs::write(work.path().join("p.toml"), POLICY).unwrap();
    std::fs::write(work.path().join("taken.ksf"), b"already here").unwrap();
    let args = |file: &'static str| {
        vec![
            "init",
            "--policy",
            "p.toml",
            "--state-dir",
            "state",
            "--recovery-file",
            file,
        ]
    };
    let out = cli.run(&args("taken.ksf"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(work.path().join("taken.ksf")).unwrap(),
        b"already here"
    );

    let out = cli.run(&args("recovery.ksf"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("recovery code"));
    let path = work.path().join("recovery.ksf");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let fragment = keyshard_core::Fragment::parse(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(fragment.header().class, HolderClass::Recovery);
}
