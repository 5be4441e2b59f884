//! Issue 7, item 9: SEV and SEV-SNP guest kernels require VIRTIO_F_ACCESS_PLATFORM (bit 33) of
//! every virtio device. A TCG guest booted with `iommu_platform=on` on every virtio device (no
//! vIOMMU, as an SEV guest runs) negotiates it with the fragment devices and the broker mailbox,
//! and still unlocks. Before the devices offered the bit, QEMU refused to start
//! ("iommu_platform=true is not supported by the device"). `make e2e` runs this.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use keyshard_e2e::qemu::{
    QemuBoot, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_REPORT_APPEND, virtio_devices,
};
use keyshard_e2e::scenario::{Scenario, VHD_TPM_POLICY};

/// virtio device id of a block device.
const VIRTIO_ID_BLOCK: &str = "0x0002";

/// Unwraps a harness result, failing with its message (which carries any tool's stderr).
fn ok<T>(result: keyshard_e2e::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs QEMU, swtpm and built images; run by make e2e"]
fn item9_guest_negotiates_access_platform_with_every_device_and_unlocks() {
    // Two fragment devices and the broker mailbox (for the tpm share, k = 3): the volume opens
    // only if both kinds of device work with ACCESS_PLATFORM negotiated.
    let scenario = ok(Scenario::init("access-platform", VHD_TPM_POLICY));
    let daemons = ok(scenario.start_daemons());
    let coordinator = ok(scenario.start_coordinator("vm1"));

    let outcome = ok(QemuBoot {
        script: scenario.env.run_qemu_script(),
        kernel: scenario.env.kernel.clone(),
        initrd: scenario.initramfs.clone(),
        volume: scenario.volume.clone(),
        fragment_sockets: daemons.iter().map(|d| d.socket.clone()).collect(),
        broker_socket: Some(coordinator.socket.clone()),
        append: VIRTIO_REPORT_APPEND.to_owned(),
        iommu_platform: true,
        timeout: scenario.env.boot_timeout,
        console_log: scenario.dir().join("access-platform.console.log"),
        stderr_log: scenario.dir().join("access-platform.qemu-stderr.log"),
    }
    .run());
    let report = outcome.report();
    eprintln!(
        "access-platform: boot took {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
    assert!(
        outcome.stderr.contains("iommu_platform on"),
        "run-qemu.sh did not turn iommu_platform on\n{report}"
    );
    assert!(
        outcome.exited_cleanly(),
        "the VM did not end on its own\n{report}"
    );
    assert!(outcome.console.has_marker("poweroff"), "{report}");

    // The volume, two fragment devices and the broker: every one negotiated bit 33.
    let devices = virtio_devices(&outcome.console);
    assert_eq!(
        devices.len(),
        2 + daemons.len(),
        "expected the volume, {} fragment devices and the broker in the guest\n{report}",
        daemons.len()
    );
    for device in &devices {
        assert_eq!(device.device, VIRTIO_ID_BLOCK, "{device:?}\n{report}");
        assert!(
            device.has_feature(VIRTIO_F_ACCESS_PLATFORM),
            "{} did not negotiate VIRTIO_F_ACCESS_PLATFORM: {}\n{report}",
            device.name,
            device.features
        );
    }

    assert!(
        outcome.console.has_marker("unlocked"),
        "the volume stayed locked\n{report}"
    );
    assert_eq!(
        outcome.console.volume_file().as_deref(),
        Some(scenario.volume_content.as_str()),
        "the guest did not print the volume's file\n{report}"
    );
}
