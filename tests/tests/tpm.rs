//! The attested path under QEMU (TCG): `keyshard init` deals a volume key by
//! `examples/vhd-tpm.toml` (two `vhd` fragments, one share sealed to a software TPM, k = 3), and
//! the guest needs the coordinator's release, over its broker mailbox, on top of the two fragment
//! devices. The release follows the host's measured state: after a PCR 7 extend the coordinator
//! refuses it and the guest stays locked, naming the PCR. A guest whose manifest pins another
//! attestation key refuses the share itself and stays locked. `make e2e` runs these.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::PathBuf;

use keyshard_e2e::audit;
use keyshard_e2e::qemu::BootOutcome;
use keyshard_e2e::scenario::{FragmentDaemon, Scenario, VHD_TPM_POLICY};

/// What the coordinator says, and the guest repeats, once PCR 7 has moved.
const PCR7_REASON: &str = "PCR 7 (sha256) differs from its golden value";
const VM: &str = "vm1";
const TPM_HOLDER: &str = "tpm-1";

/// Unwraps a harness result, failing with its message (which carries any tool's stderr).
fn ok<T>(result: keyshard_e2e::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

fn sockets(daemons: &[FragmentDaemon]) -> Vec<PathBuf> {
    daemons.iter().map(|d| d.socket.clone()).collect()
}

/// The VM ended by itself, after the init's last word.
fn assert_powered_off(outcome: &BootOutcome) {
    let report = outcome.report();
    assert!(
        outcome.exited_cleanly(),
        "the VM did not end on its own\n{report}"
    );
    assert!(outcome.console.has_marker("poweroff"), "{report}");
}

/// Locked: quorum not met, nothing of the volume on the console.
fn assert_locked(outcome: &BootOutcome, scenario: &Scenario) {
    let report = outcome.report();
    assert_eq!(
        outcome.console.marker_starting_with("locked"),
        Some("locked (keyshard-guest exit 2: quorum not met)"),
        "{report}"
    );
    assert!(!outcome.console.has_marker("unlocked"), "{report}");
    assert!(
        !outcome.console.text().contains(&scenario.volume_content),
        "the volume's content reached the console\n{report}"
    );
}

#[test]
#[ignore = "needs QEMU, swtpm, tpm2-tools and built images; run by make e2e"]
fn the_tpm_share_unlocks_the_guest_until_pcr_7_changes() {
    let scenario = ok(Scenario::init("tpm", VHD_TPM_POLICY));
    assert_eq!(
        ok(scenario.manifest_holders()),
        ["vhd-1", "vhd-2", TPM_HOLDER],
        "examples/vhd-tpm.toml no longer deals two vhd and one tpm holder"
    );
    let daemons = ok(scenario.start_daemons());
    let mut coordinator = ok(scenario.start_coordinator(VM));
    assert!(
        coordinator
            .daemon
            .ready_line()
            .contains(&coordinator.serial()),
        "the coordinator announced {:?}, not the serial {}",
        coordinator.daemon.ready_line(),
        coordinator.serial()
    );

    // 1. The host's PCRs hold their golden values: released, and the volume opens.
    let outcome = ok(scenario.boot(
        "tpm-unlock",
        sockets(&daemons),
        Some(coordinator.socket.clone()),
    ));
    let report = outcome.report();
    eprintln!(
        "tpm-unlock: boot took {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
    assert_powered_off(&outcome);
    let mut serials = outcome.console.device_serials();
    serials.sort_unstable();
    assert_eq!(
        serials,
        ["ks-volume", "ksb-vm1", "ksf-vhd-1", "ksf-vhd-2"],
        "the guest does not see the volume, the broker and the two fragment devices\n{report}"
    );
    assert!(
        outcome.console.has_marker("unlocked"),
        "the volume stayed locked\n{report}"
    );
    assert_eq!(
        outcome.console.volume_file().as_deref(),
        Some(scenario.volume_content.as_str()),
        "the guest did not print the volume's file\n{report}"
    );
    let entries = ok(coordinator.audit());
    let releases = audit::releases(&entries);
    let summaries: Vec<String> = releases.iter().map(|e| e.summary()).collect();
    assert_eq!(
        summaries,
        [format!("{VM}: released {TPM_HOLDER}")],
        "audit log after the first boot"
    );

    // 2. The host's measured state changes (another boot component in PCR 7): refused.
    let swtpm = scenario.swtpm().expect("Scenario::init owns a TPM");
    let golden = ok(swtpm.read_pcr(7));
    ok(swtpm.extend_pcr(7, &[0xe2; 32]));
    assert_ne!(ok(swtpm.read_pcr(7)), golden);
    let outcome = ok(scenario.boot(
        "tpm-refused",
        sockets(&daemons),
        Some(coordinator.socket.clone()),
    ));
    let report = outcome.report();
    eprintln!(
        "tpm-refused: boot took {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
    assert_powered_off(&outcome);
    assert_locked(&outcome, &scenario);
    let guest_stderr = outcome.console.guest_stderr().unwrap_or_default();
    assert!(
        guest_stderr
            .lines()
            .any(|line| line.contains(TPM_HOLDER) && line.contains(PCR7_REASON)),
        "keyshard-guest did not name {TPM_HOLDER} with the coordinator's reason {PCR7_REASON:?}\n{report}"
    );
    let entries = ok(coordinator.audit());
    let releases = audit::releases(&entries);
    let summaries: Vec<String> = releases.iter().map(|e| e.summary()).collect();
    assert_eq!(
        summaries,
        [
            format!("{VM}: released {TPM_HOLDER}"),
            format!("{VM}: refused {TPM_HOLDER}: {PCR7_REASON}"),
        ],
        "audit log after the second boot"
    );
    assert!(
        releases
            .iter()
            .all(|e| e.class.as_deref() == Some("tpm") && e.vm == VM),
        "{entries:?}"
    );

    let status = ok(coordinator.daemon.stop());
    assert!(
        status.success(),
        "the coordinator did not stop cleanly ({status}): {}",
        coordinator.daemon.stderr()
    );
    assert!(
        !coordinator.socket.exists(),
        "the coordinator left its socket behind"
    );
    for mut d in daemons {
        let status = ok(d.daemon.stop());
        assert!(status.success(), "{}", d.daemon.stderr());
    }
}

#[test]
#[ignore = "needs QEMU, swtpm, tpm2-tools and built images; run by make e2e"]
fn without_the_coordinator_the_guest_stays_locked_and_names_the_tpm_holder() {
    let scenario = ok(Scenario::init("no-coordinator", VHD_TPM_POLICY));
    let daemons = ok(scenario.start_daemons());
    // The VM definition still names the broker socket, but no coordinator serves it.
    let broker = scenario.dir().join("broker-vm1.sock");

    let outcome = ok(scenario.boot("no-coordinator", sockets(&daemons), Some(broker)));
    let report = outcome.report();
    eprintln!(
        "no-coordinator: boot took {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
    assert_powered_off(&outcome);
    assert_locked(&outcome, &scenario);
    assert!(
        !outcome.console.device_serials().contains(&"ksb-vm1"),
        "{report}"
    );
    let guest_stderr = outcome.console.guest_stderr().unwrap_or_default();
    assert!(
        guest_stderr.contains(TPM_HOLDER),
        "keyshard-guest did not name the missing holder {TPM_HOLDER}\n{report}"
    );
    assert!(
        outcome.stderr.contains("broker socket") && outcome.stderr.contains("booting without it"),
        "run-qemu.sh did not say it left the broker out\n{report}"
    );
}

/// Issue 8 item 4 in QEMU: the guest's manifest pins another attestation key than the host
/// TPM's (the P-256 generator point). The coordinator releases as usual, but the guest refuses
/// the tpm share, naming why, and stays locked.
#[test]
#[ignore = "needs QEMU, swtpm, tpm2-tools and built images; run by make e2e"]
fn item4_a_guest_whose_manifest_pins_another_ak_stays_locked_naming_the_reason() {
    const P256_GENERATOR: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c2964fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
    let scenario = ok(Scenario::init_with_guest_manifest(
        "foreign-ak",
        VHD_TPM_POLICY,
        |manifest| {
            let host = manifest
                .host_attestation
                .as_mut()
                .expect("init pins the host");
            let ak = hex_bytes(P256_GENERATOR);
            assert_ne!(host.ak.as_slice(), ak.as_slice());
            host.ak.copy_from_slice(&ak);
        },
    ));
    let daemons = ok(scenario.start_daemons());
    let coordinator = ok(scenario.start_coordinator(VM));
    let outcome = ok(scenario.boot(
        "foreign-ak",
        sockets(&daemons),
        Some(coordinator.socket.clone()),
    ));
    let report = outcome.report();
    assert_powered_off(&outcome);
    assert_locked(&outcome, &scenario);
    let guest_stderr = outcome.console.guest_stderr().unwrap_or_default();
    assert!(
        guest_stderr.contains(
            "missing tpm-1: host check failed: the host quote is not signed by the manifest's attestation key"
        ),
        "the guest did not name the host check\n{report}"
    );
}

fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
