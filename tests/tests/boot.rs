//! The whole path under QEMU (TCG): a volume key split 3-of-3 onto fragment devices, a VM whose
//! initramfs runs `keyshard-guest unlock` and opens the LUKS2 volume with the rebuilt key.
//! `make e2e` builds the binaries, the static guest agent and the tools, then runs these.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use keyshard_e2e::scenario::Scenario;

/// Unwraps a harness result, failing with its message (which carries any tool's stderr).
fn ok<T>(result: keyshard_e2e::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs QEMU and built images; run by make e2e"]
fn guest_unlocks_the_volume_from_three_fragment_devices() {
    let scenario = ok(Scenario::split("unlock", 3, 3));
    let daemons = ok(scenario.start_daemons());
    for d in &daemons {
        assert!(
            d.daemon.ready_line().contains(&d.fragment.serial()),
            "{} announced {:?}, not its serial {}",
            d.daemon.name(),
            d.daemon.ready_line(),
            d.fragment.serial()
        );
    }

    let outcome = ok(scenario.boot(
        "unlock",
        daemons.iter().map(|d| d.socket.clone()).collect(),
        None,
    ));
    let report = outcome.report();
    eprintln!("unlock: boot took {:.1} s", outcome.elapsed.as_secs_f64());

    assert!(
        outcome.exited_cleanly(),
        "the VM did not end on its own\n{report}"
    );
    assert!(outcome.console.has_marker("poweroff"), "{report}");
    let mut serials = outcome.console.device_serials();
    serials.sort_unstable();
    assert_eq!(
        serials,
        ["ks-volume", "ksf-vhd-1", "ksf-vhd-2", "ksf-vhd-3"],
        "the guest does not see the volume and the three fragment devices\n{report}"
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
    for mut d in daemons {
        let status = ok(d.daemon.stop());
        assert!(
            status.success(),
            "{} did not stop cleanly ({status}): {}",
            d.daemon.name(),
            d.daemon.stderr()
        );
    }
}

#[test]
#[ignore = "needs QEMU and built images; run by make e2e"]
fn guest_stays_locked_and_names_the_holder_whose_daemon_is_stopped() {
    let scenario = ok(Scenario::split("missing", 3, 3));
    let mut daemons = ok(scenario.start_daemons());
    let stopped = daemons[1].fragment.holder_id.clone();
    let status = ok(daemons[1].daemon.stop());
    assert!(status.success(), "{}", daemons[1].daemon.stderr());
    assert!(
        !daemons[1].socket.exists(),
        "the stopped daemon left its socket behind"
    );
    assert!(ok(scenario.manifest_holders()).contains(&stopped));

    // All three sockets are given, as an operator's unchanged VM definition would.
    let outcome = ok(scenario.boot(
        "missing",
        daemons.iter().map(|d| d.socket.clone()).collect(),
        None,
    ));
    let report = outcome.report();
    eprintln!("missing: boot took {:.1} s", outcome.elapsed.as_secs_f64());

    assert!(
        outcome.exited_cleanly(),
        "the VM did not end on its own\n{report}"
    );
    assert!(outcome.console.has_marker("poweroff"), "{report}");
    assert!(
        !outcome
            .console
            .device_serials()
            .contains(&format!("ksf-{stopped}").as_str()),
        "{report}"
    );
    assert_eq!(
        outcome.console.marker_starting_with("locked"),
        Some("locked (keyshard-guest exit 2: quorum not met)"),
        "{report}"
    );
    let guest_stderr = outcome.console.guest_stderr().unwrap_or_default();
    assert!(
        guest_stderr.contains(&stopped),
        "keyshard-guest did not name the missing holder {stopped}\n{report}"
    );
    assert!(!outcome.console.has_marker("unlocked"), "{report}");
    assert!(
        !outcome.console.text().contains(&scenario.volume_content),
        "the volume's content reached the console\n{report}"
    );
    assert!(
        outcome.stderr.contains("booting without it"),
        "run-qemu.sh did not say it left the stopped device out\n{report}"
    );
}
