//! The broker mailbox end to end, without a VM: a real `BrokerMailbox` served over a vhost-user
//! socket by the device engine, a coordinator double behind it that releases a real signed
//! fragment sealed to the request key (or refuses), and the guest agent's broker client and
//! `unlock` on the other side, over the same userspace frontend `keyshard-guest --vhost-user`
//! uses. Fragment devices are served in-process the same way.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::devices::Devices;
use guest_driver::agent::{self, Inputs};
use guest_driver::broker::mailbox::{MailboxSpec, VhostUserMailbox};
use guest_driver::broker::shares::InProcessFetcher;
use guest_driver::broker::{BrokerClient, BrokerError};
use guest_driver::source::SourceSpec;
use guest_driver::vhost_user::{FrontendError, VhostUserBlk};
use keyshard_coordinator::mailbox::{BrokerMailbox, RequestHandler};
use keyshard_core::broker::{AREA_LEN, Body, Evidence, Message, RefusalCode};
use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::envelope::{self, ReleaseContext};
use keyshard_core::manifest::Manifest;
use keyshard_core::quorum::{QuorumError, QuorumOutcome, RejectReason, Rejection};
use keyshard_core::{HolderClass, HolderId, KeyCheckValue, KeyId, keys};
use keyshard_e2e::process::{LineWait, read_lines_in_background, wait_for_line};
use vhost_keyshard::device::media::BlockMedia;
use vhost_keyshard::fragment_volume::FragmentVolume;

const SECRET: &[u8] = b"a LUKS2 volume key of 32 bytes!!";
const VM_ID: &str = "vm-1";

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// A secret split 3 of 3 over vhd-1, vhd-2 and tpm-1, and the guest's manifest.
struct Dealt {
    manifest: Manifest,
    /// Encoded fragments in the manifest's holder order.
    fragments: Vec<Vec<u8>>,
}

fn deal() -> Dealt {
    let dealer_key = keys::generate().unwrap();
    let key_id = KeyId::new("root").unwrap();
    let holders: Vec<HolderSlot> = HolderSlot::numbered(HolderClass::Vhd, 2)
        .chain(HolderSlot::numbered(HolderClass::Tpm, 1))
        .collect();
    let plan = DealPlan {
        key_id: key_id.clone(),
        epoch: 1,
        k: 3,
        holders: holders.clone(),
    };
    let fragments = dealer::deal(SECRET, &plan, &dealer_key)
        .unwrap()
        .iter()
        .map(|f| f.encoded().to_vec())
        .collect();
    Dealt {
        manifest: Manifest {
            key_check_value: KeyCheckValue::compute(SECRET, &key_id),
            key_id,
            threshold: 3,
            dealer: dealer_key.verifying_key(),
            holders,
            host_attestation: Some(host_attestation()),
        },
        fragments,
    }
}

/// The host TPM double's attestation key.
fn host_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap()
}

const GOLDEN_DIGEST: [u8; 32] = [0x77; 32];

/// What the guest's manifest pins of the host double: its AK, sha256 PCRs 0 and 7, a digest.
fn host_attestation() -> keyshard_core::manifest::HostAttestation {
    let point = host_key().verifying_key().to_encoded_point(false);
    keyshard_core::manifest::HostAttestation {
        ak: point.as_bytes().try_into().unwrap(),
        pcr_bank: keyshard_core::policy::PcrBank::Sha256,
        pcrs: vec![0, 7],
        pcr_digest: GOLDEN_DIGEST,
    }
}

/// The host double's quote answering a lone request's `nonce`.
fn host_quote(nonce: &[u8; 32]) -> keyshard_core::broker::HostQuote {
    use keyshard_attest::tpm::{ClockInfo, QuoteAttest, QuotedBank};
    use p256::ecdsa::signature::Signer as _;
    let attest = QuoteAttest {
        signer_name: vec![0, 0x0b, 1, 2, 3],
        extra_data: keyshard_core::broker::merkle::leaf(nonce).to_vec(),
        clock: ClockInfo {
            clock: 1,
            reset_count: 0,
            restart_count: 0,
            safe: true,
        },
        firmware_version: 1,
        banks: vec![QuotedBank {
            alg: 0x000b,
            bitmap: vec![0x81, 0, 0],
        }],
        pcr_digest: GOLDEN_DIGEST.to_vec(),
    }
    .to_bytes()
    .unwrap();
    let signature: p256::ecdsa::Signature = host_key().sign(&attest);
    keyshard_core::broker::HostQuote {
        attest,
        signature: signature.to_bytes().into(),
        path: Vec::new(),
    }
}

/// The coordinator double: releases `fragment` to a `tpm-1` request (after `delay`, so the
/// guest sees `pending` first), sealed to the request's key and bound to its id; refuses the
/// rest. Counts the requests it saw.
struct ReleaseTpm1 {
    fragment: Vec<u8>,
    delay: Duration,
    seen: AtomicUsize,
}

impl RequestHandler for ReleaseTpm1 {
    fn answer(&self, vm_id: &str, request: &Message) -> Body {
        self.seen.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        match &request.body {
            Body::Release {
                class: HolderClass::Tpm,
                holder_id,
                request_key,
                evidence: Evidence::TpmNonce { nonce },
            } if holder_id.as_str() == "tpm-1" && vm_id == VM_ID => {
                let context = ReleaseContext {
                    request_id: request.request_id,
                    class: HolderClass::Tpm,
                    holder_id: holder_id.clone(),
                };
                Body::Released {
                    class: HolderClass::Tpm,
                    holder_id: holder_id.clone(),
                    envelope: envelope::seal(request_key, &self.fragment, &context).unwrap(),
                    host_quote: Some(host_quote(nonce)),
                }
            }
            _ => Body::Refused {
                code: RefusalCode::UnknownHolder,
                reason: "no such holder".into(),
            },
        }
    }
}

/// The coordinator double of a host whose own attestation fails.
struct PcrMismatch;

impl RequestHandler for PcrMismatch {
    fn answer(&self, _vm_id: &str, _request: &Message) -> Body {
        Body::Refused {
            code: RefusalCode::HostAttestation,
            reason: "PCR 7 differs from its golden value".into(),
        }
    }
}

fn serve_fragment(devices: &mut Devices, dealt: &Dealt, index: usize) -> PathBuf {
    let holder = dealt.manifest.holders[index].id.clone();
    let volume =
        FragmentVolume::from_fragments(&[&dealt.fragments[index]], holder.clone()).unwrap();
    devices.serve(holder.as_str(), Arc::new(volume))
}

fn serve_broker(devices: &mut Devices, handler: Arc<dyn RequestHandler>) -> PathBuf {
    let mailbox = BrokerMailbox::new(VM_ID, handler).unwrap();
    devices.serve("broker", Arc::new(mailbox) as Arc<dyn BlockMedia>)
}

fn client(socket: &Path) -> BrokerClient {
    BrokerClient::new(Box::new(VhostUserMailbox::new(socket.to_owned())))
}

#[test]
fn the_broker_client_gets_the_released_fragment_over_the_socket() {
    let dealt = deal();
    let handler = Arc::new(ReleaseTpm1 {
        fragment: dealt.fragments[2].clone(),
        delay: Duration::from_millis(30),
        seen: AtomicUsize::new(0),
    });
    let mut devices = Devices::new();
    let socket = serve_broker(&mut devices, handler.clone());

    // What the device says about itself.
    let mut device = VhostUserBlk::connect(&socket, deadline()).unwrap();
    assert_eq!(
        device.serial(deadline()).unwrap().as_deref(),
        Some("ksb-vm-1")
    );
    assert_eq!(device.capacity_bytes(), 2 * AREA_LEN as u64);
    assert!(!device.is_read_only());
    drop(device);

    let mut client = client(&socket);
    let fragment = client
        .release_tpm(
            &HolderId::new("tpm-1").unwrap(),
            Some(&host_attestation()),
            deadline(),
        )
        .unwrap();
    assert_eq!(fragment.as_slice(), dealt.fragments[2].as_slice());
    // A second request on the same connection is answered as its own.
    let again = client
        .release_tpm(
            &HolderId::new("tpm-1").unwrap(),
            Some(&host_attestation()),
            deadline(),
        )
        .unwrap();
    assert_eq!(again.as_slice(), dealt.fragments[2].as_slice());
    assert_eq!(handler.seen.load(Ordering::SeqCst), 2);
    let error = client
        .release_tpm(
            &HolderId::new("tpm-2").unwrap(),
            Some(&host_attestation()),
            deadline(),
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "refused by the coordinator: no such holder"
    );
    drop(client);
    devices.stop();
}

#[test]
fn a_refusal_comes_back_with_its_code_and_reason() {
    let mut devices = Devices::new();
    let socket = serve_broker(&mut devices, Arc::new(PcrMismatch));
    let error = client(&socket)
        .release_tpm(
            &HolderId::new("tpm-1").unwrap(),
            Some(&host_attestation()),
            deadline(),
        )
        .unwrap_err();
    let BrokerError::Refused { code, reason } = error else {
        panic!("{error:?}");
    };
    assert_eq!(code, RefusalCode::HostAttestation);
    assert_eq!(reason, "PCR 7 differs from its golden value");
    devices.stop();
}

#[test]
fn the_mailbox_takes_whole_requests_at_offset_0_only() {
    let mut devices = Devices::new();
    let socket = serve_broker(&mut devices, Arc::new(PcrMismatch));
    let mut device = VhostUserBlk::connect(&socket, deadline()).unwrap();
    // Elsewhere than offset 0: the device answers IOERR, and the connection stays usable.
    let error = device.write_at(512, &[0; 512], deadline()).unwrap_err();
    assert!(matches!(error, FrontendError::DeviceIo { .. }), "{error:?}");
    // Garbage at offset 0 is refused in the answer area, naming the request id it carried.
    let mut garbage = vec![0u8; 512];
    garbage[..4].copy_from_slice(b"KSBX");
    garbage[8..16].copy_from_slice(&77u64.to_le_bytes());
    device.write_at(0, &garbage, deadline()).unwrap();
    let answer = device.read_at(AREA_LEN as u64, 4096, deadline()).unwrap();
    let message = Message::parse(&answer).unwrap();
    assert_eq!(message.request_id, 77);
    assert!(
        matches!(
            message.body,
            Body::Refused {
                code: RefusalCode::Malformed,
                ..
            }
        ),
        "{message:?}"
    );
    drop(device);
    devices.stop();
}

fn unlock(
    dealt: &Dealt,
    devices: &mut Devices,
    handler: Arc<dyn RequestHandler>,
) -> keyshard_core::quorum::Result<QuorumOutcome> {
    let sources = (0..2)
        .map(|index| {
            SourceSpec::VhostUser(serve_fragment(devices, dealt, index))
                .into_source(Path::new("/sys"))
        })
        .collect();
    let broker = MailboxSpec::VhostUser(serve_broker(devices, handler));
    let inputs = Inputs {
        sources,
        broker: Some(Box::new(InProcessFetcher::new(
            broker.into_mailbox(Path::new("/sys")),
            None,
        ))),
        discovery: None,
    };
    agent::unlock_with(&dealt.manifest, inputs, Duration::from_secs(10))
}

#[test]
fn the_agent_rebuilds_a_vhd2_tpm1_k3_key_from_two_fragment_sockets_and_the_broker() {
    let dealt = deal();
    let mut devices = Devices::new();
    let handler = Arc::new(ReleaseTpm1 {
        fragment: dealt.fragments[2].clone(),
        delay: Duration::from_millis(20),
        seen: AtomicUsize::new(0),
    });
    let start = Instant::now();
    let outcome = unlock(&dealt, &mut devices, handler).unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(outcome.secret.as_slice(), SECRET);
    assert_eq!(outcome.k, 3);
    let used: Vec<String> = outcome.used.iter().map(|u| u.source.clone()).collect();
    let socket = |name: &str| devices.dir.path().join(format!("{name}.sock"));
    assert_eq!(
        used,
        [
            format!("ksf-vhd-1 (socket {})", socket("vhd-1").display()),
            format!("ksf-vhd-2 (socket {})", socket("vhd-2").display()),
            format!("tpm-1 (broker socket {})", socket("broker").display()),
        ]
    );
    assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
    devices.stop();
}

#[test]
fn a_refused_tpm_share_leaves_the_quorum_short_and_says_why() {
    let dealt = deal();
    let mut devices = Devices::new();
    let error = unlock(&dealt, &mut devices, Arc::new(PcrMismatch)).unwrap_err();
    let QuorumError::NotMet {
        valid,
        needed,
        rejected,
    } = error
    else {
        panic!("{error:?}");
    };
    assert_eq!((valid, needed), (2, Some(3)));
    let refusal = Rejection {
        source: "tpm-1".into(),
        reason: RejectReason::Unavailable(
            "refused by the coordinator: PCR 7 differs from its golden value".into(),
        ),
    };
    assert_eq!(
        refusal.to_string(),
        "missing tpm-1: refused by the coordinator: PCR 7 differs from its golden value"
    );
    assert!(rejected.contains(&refusal), "{rejected:?}");
    devices.stop();
}

/// A `keyshard` process (the coordinator), killed on drop.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Item 7 with the real `keyshard coordinator`: a guest flooding its broker socket with one
/// request is refused for rate, a well-behaved client is still answered, the broker socket is
/// 0600, and on SIGTERM the audit log gets the count of the folded repeats: a few lines in all.
#[test]
fn item7_the_coordinator_process_bounds_a_flooding_guest() {
    use std::os::unix::fs::PermissionsExt;

    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("vm1");
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/vhd-only.toml");
    let init = std::process::Command::new(env!("CARGO_BIN_EXE_keyshard"))
        .args(["init", "--policy", policy, "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let socket = work.path().join("broker.sock");
    let mut coordinator = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_keyshard"))
            .arg("coordinator")
            .arg("--state-dir")
            .arg(&state)
            .arg("--broker")
            .arg(format!("vm1={}", socket.display()))
            .env("RUST_LOG", "off")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = read_lines_in_background(coordinator.0.stdout.take().unwrap(), Arc::default());
    let ready = match wait_for_line(&stdout, "", Duration::from_secs(10)) {
        LineWait::Found(line) => line,
        other => panic!("keyshard coordinator did not get ready within 10 s: {other:?}"),
    };
    assert!(
        ready.starts_with("ready: serving 1 device(s): ksb-vm1"),
        "{ready}"
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The flood: one nonce request written over and over, as fast as the frontend goes.
    let mut device = VhostUserBlk::connect(&socket, deadline()).unwrap();
    let request = Message {
        request_id: 0xf100d,
        body: Body::NonceRequest,
    }
    .encode()
    .unwrap();
    let padded = guest_driver::broker::mailbox::padded(&request, device.block_size()).unwrap();
    for _ in 0..2_000 {
        device.write_at(0, &padded, deadline()).unwrap();
    }
    let answer = loop {
        let bytes = device.read_at(AREA_LEN as u64, 4096, deadline()).unwrap();
        let answer = Message::parse(&bytes).unwrap();
        if answer.body != Body::Pending {
            break answer;
        }
    };
    assert!(
        matches!(
            answer.body,
            Body::Refused {
                code: RefusalCode::RateLimited,
                ..
            }
        ),
        "{answer:?}"
    );
    drop(device);

    // A well-behaved client, asking again after a refusal for rate, gets its nonce.
    client(&socket).nonce(deadline()).unwrap();

    let pid = libc::pid_t::try_from(coordinator.0.id()).unwrap();
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(coordinator.0.wait().unwrap().code(), Some(0));
    let audit: Vec<serde_json::Value> = std::fs::read_to_string(state.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(audit.len() <= 6, "{} audit lines: {audit:?}", audit.len());
    let issued: u64 = audit
        .iter()
        .filter(|l| l["verdict"] == "issued")
        .map(|l| 1 + l["repeated"].as_u64().unwrap_or(0))
        .sum();
    let limited: u64 = audit
        .iter()
        .filter(|l| l["verdict"] == "refused")
        .map(|l| 1 + l["repeated"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        (2..=12).contains(&issued),
        "{issued} nonces issued: {audit:?}"
    );
    assert!(limited >= 1, "{audit:?}");
    assert!(
        audit.iter().any(|l| l["repeated"].as_u64().is_some()),
        "the folded count was not written on SIGTERM: {audit:?}"
    );
}
