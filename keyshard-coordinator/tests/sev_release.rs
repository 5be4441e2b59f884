#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The coordinator's SEV release path end to end, on test-signed chains: a nonce, a report bound
//! to it and to the request key, and a release that opens to the stored fragment; then every way
//! such a request can be wrong, each refused with its own code and reason, and nothing released.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::snp_chain::{MEASUREMENT, ReportSpec, TCB, TestCa, TestVcek, VcekSpec, build_report};
use keyshard_attest::snp::vcek::oid;
use keyshard_attest::snp::{
    Product, SnpPolicy, SnpVerifier, TrustAnchors, VcekStore, report_data_binding,
};
use keyshard_coordinator::at_rest;
use keyshard_coordinator::audit::AuditLog;
use keyshard_coordinator::mailbox::RequestHandler;
use keyshard_coordinator::nonces::Clock;
use keyshard_coordinator::release::Coordinator;
use keyshard_coordinator::sev_release::{SevHolder, SevReleaser};
use keyshard_core::broker::{Body, Evidence, Message, NONCE_LEN, RefusalCode};
use keyshard_core::envelope::{ReleaseContext, RequestKey};
use keyshard_core::{HolderClass, HolderId};

const VM: &str = "vm1";
const HOLDER: &str = "sev-1";
/// The fragment the holder stores; what a valid release must deliver, byte for byte.
const FRAGMENT: &[u8] = b"KSF1 test fragment of holder sev-1, opaque to the coordinator";
/// guest policy bit 19: debugging allowed.
const POLICY_DEBUG: u64 = 1 << 19;

/// One test CA per test binary: RSA key generation is the slow part.
fn ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| TestCa::new(2048, Product::Milan))
}

/// A VCEK with all of AMD's extensions, TCB [`TCB`].
fn vcek() -> &'static TestVcek {
    static VCEK: OnceLock<TestVcek> = OnceLock::new();
    VCEK.get_or_init(|| ca().issue_vcek(&VcekSpec::default()))
}

/// A VCEK issued by the same ASK but without the snpSPL TCB extension.
fn vcek_without_snp_spl() -> &'static TestVcek {
    static VCEK: OnceLock<TestVcek> = OnceLock::new();
    VCEK.get_or_init(|| {
        ca().issue_vcek(&VcekSpec {
            omit: vec![oid::SNP_SPL],
            ..VcekSpec::default()
        })
    })
}

/// The policy the coordinator enforces: the test measurement, min TCB the test VCEK's.
fn policy() -> SnpPolicy {
    let text = format!(
        "measurements = [\"{}\"]\n\n[min_tcb]\nbootloader = {}\ntee = {}\nsnp = {}\nmicrocode = {}\n",
        hex::encode(MEASUREMENT),
        TCB.bootloader,
        TCB.tee,
        TCB.snp,
        TCB.microcode,
    );
    SnpPolicy::parse(&text).unwrap()
}

/// A clock the test moves by hand.
struct TestClock(Mutex<Instant>);

impl TestClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

/// A coordinator serving one `sev` holder, with its audit log in a temporary directory.
struct Fixture {
    dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    coordinator: Coordinator,
}

impl Fixture {
    fn new() -> Self {
        Self::with_anchors(ca().anchors())
    }

    fn with_anchors(anchors: TrustAnchors) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vcek_dir = dir.path().join("vceks");
        std::fs::create_dir(&vcek_dir).unwrap();
        let clock = Arc::new(TestClock(Mutex::new(Instant::now())));
        let audit = AuditLog::open(&dir.path().join("audit.log")).unwrap();
        let mut coordinator = Coordinator::new(clock.clone(), audit, [VM.to_owned()]);
        let id = HolderId::new(HOLDER).unwrap();
        let key = at_rest::new_data_key().unwrap();
        let encrypted_fragment = at_rest::encrypt(&key, &id, FRAGMENT).unwrap();
        let releaser = SevReleaser::new(
            Arc::new(SnpVerifier::new(anchors)),
            Some(policy()),
            VcekStore::open(&vcek_dir).unwrap(),
            vec![SevHolder {
                id: id.clone(),
                key,
                encrypted_fragment,
            }],
        );
        coordinator.add_holder(id, HolderClass::Sev, Arc::new(releaser));
        Self {
            dir,
            clock,
            coordinator,
        }
    }

    fn nonce(&self, request_id: u64) -> [u8; NONCE_LEN] {
        let request = Message {
            request_id,
            body: Body::NonceRequest,
        };
        match self.coordinator.answer(VM, &request) {
            Body::Nonce {
                nonce,
                valid_for_ms,
            } => {
                assert_eq!(valid_for_ms, 60_000);
                nonce
            }
            other => panic!("no nonce: {other:?}"),
        }
    }

    fn release(
        &self,
        request_id: u64,
        key: &RequestKey,
        nonce: [u8; NONCE_LEN],
        report: Vec<u8>,
        vcek: &TestVcek,
    ) -> Body {
        let request = Message {
            request_id,
            body: Body::Release {
                class: HolderClass::Sev,
                holder_id: HolderId::new(HOLDER).unwrap(),
                request_key: key.public_key(),
                evidence: Evidence::Snp {
                    nonce,
                    report,
                    vcek: vcek.der.clone(),
                },
            },
        };
        self.coordinator.answer(VM, &request)
    }

    /// The audit log's lines so far.
    fn audit_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("audit.log"))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Nonce, key, a report from `spec` with REPORT_DATA bound to both, signed by `vcek`.
    fn attempt(&self, request_id: u64, spec: ReportSpec, vcek: &TestVcek) -> (RequestKey, Body) {
        let nonce = self.nonce(request_id);
        let key = RequestKey::generate().unwrap();
        let spec = ReportSpec {
            report_data: report_data_binding(&nonce, &key.public_key()),
            ..spec
        };
        let report = build_report(&spec, &vcek.key);
        let body = self.release(request_id + 1, &key, nonce, report, vcek);
        (key, body)
    }
}

fn context(request_id: u64) -> ReleaseContext {
    ReleaseContext {
        request_id,
        class: HolderClass::Sev,
        holder_id: HolderId::new(HOLDER).unwrap(),
    }
}

/// Asserts `body` released the holder's fragment to `key` for `request_id`.
fn assert_released(body: &Body, key: &RequestKey, request_id: u64) {
    let Body::Released {
        class,
        holder_id,
        envelope,
        ..
    } = body
    else {
        panic!("expected a release, got {body:?}");
    };
    assert_eq!(*class, HolderClass::Sev);
    assert_eq!(holder_id.as_str(), HOLDER);
    let opened = key.open(envelope, &context(request_id)).unwrap();
    assert_eq!(opened.as_slice(), FRAGMENT);
}

/// Asserts `body` is a refusal with `code` whose reason names every one of `words`, and that
/// the audit log's last line records it as refused.
fn assert_refused(fixture: &Fixture, body: &Body, code: RefusalCode, words: &[&str]) {
    let Body::Refused {
        code: found,
        reason,
    } = body
    else {
        panic!("expected a refusal ({code:?}), got {body:?}");
    };
    assert_eq!(*found, code, "{reason}");
    for word in words {
        assert!(reason.contains(word), "{reason:?} does not name {word:?}");
    }
    let lines = fixture.audit_lines();
    let last = lines.last().unwrap();
    assert!(last.contains("\"refused\""), "{last}");
    assert!(
        !lines.iter().any(|l| l.contains("\"released\"")),
        "{lines:?}"
    );
}

#[test]
fn a_valid_report_releases_the_fragment_to_the_request_key() {
    let fixture = Fixture::new();
    let (key, body) = fixture.attempt(1, ReportSpec::default(), vcek());
    assert_released(&body, &key, 2);
    // Sealed to this request: another request id, or another key, does not open it.
    let Body::Released { envelope, .. } = &body else {
        unreachable!()
    };
    assert!(key.open(envelope, &context(3)).is_err());
    let other = RequestKey::generate().unwrap();
    assert!(other.open(envelope, &context(2)).is_err());
    let lines = fixture.audit_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("\"released\""), "{lines:?}");
}

#[test]
fn a_wrong_measurement_is_refused() {
    let fixture = Fixture::new();
    let spec = ReportSpec {
        measurement: [0x33; 48],
        ..ReportSpec::default()
    };
    let (_, body) = fixture.attempt(1, spec, vcek());
    assert_refused(
        &fixture,
        &body,
        RefusalCode::SnpPolicy,
        &["measurement", &hex::encode([0x33; 48]), "allow-list"],
    );
}

#[test]
fn a_debug_guest_is_refused() {
    let fixture = Fixture::new();
    let spec = ReportSpec {
        policy: ReportSpec::default().policy | POLICY_DEBUG,
        ..ReportSpec::default()
    };
    let (_, body) = fixture.attempt(1, spec, vcek());
    assert_refused(&fixture, &body, RefusalCode::SnpPolicy, &["debugging"]);
}

#[test]
fn a_report_from_vmpl_1_is_refused() {
    let fixture = Fixture::new();
    let spec = ReportSpec {
        vmpl: 1,
        ..ReportSpec::default()
    };
    let (_, body) = fixture.attempt(1, spec, vcek());
    assert_refused(
        &fixture,
        &body,
        RefusalCode::SnpPolicy,
        &["VMPL 1", "VMPL 0 is required"],
    );
}

#[test]
fn a_report_bound_to_another_request_key_is_refused() {
    let fixture = Fixture::new();
    let nonce = fixture.nonce(1);
    let key = RequestKey::generate().unwrap();
    // The report binds the nonce to another key: a relayed report, the request key swapped.
    let other = RequestKey::generate().unwrap();
    let spec = ReportSpec {
        report_data: report_data_binding(&nonce, &other.public_key()),
        ..ReportSpec::default()
    };
    let report = build_report(&spec, &vcek().key);
    let body = fixture.release(2, &key, nonce, report, vcek());
    assert_refused(&fixture, &body, RefusalCode::SnpPolicy, &["REPORT_DATA"]);
}

#[test]
fn a_replayed_nonce_is_refused() {
    let fixture = Fixture::new();
    let nonce = fixture.nonce(1);
    let key = RequestKey::generate().unwrap();
    let spec = ReportSpec {
        report_data: report_data_binding(&nonce, &key.public_key()),
        ..ReportSpec::default()
    };
    let report = build_report(&spec, &vcek().key);
    let first = fixture.release(2, &key, nonce, report.clone(), vcek());
    assert_released(&first, &key, 2);
    // The same report and nonce again: good evidence, spent nonce.
    let body = fixture.release(3, &key, nonce, report, vcek());
    let Body::Refused { code, reason } = &body else {
        panic!("a replay was answered {body:?}");
    };
    assert_eq!(*code, RefusalCode::Nonce, "{reason}");
    assert!(reason.contains("already used"), "{reason}");
    let lines = fixture.audit_lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].contains("\"refused\""), "{lines:?}");
}

#[test]
fn an_expired_nonce_is_refused() {
    let fixture = Fixture::new();
    let nonce = fixture.nonce(1);
    let key = RequestKey::generate().unwrap();
    let spec = ReportSpec {
        report_data: report_data_binding(&nonce, &key.public_key()),
        ..ReportSpec::default()
    };
    let report = build_report(&spec, &vcek().key);
    fixture.clock.advance(Duration::from_secs(61));
    let body = fixture.release(2, &key, nonce, report, vcek());
    assert_refused(&fixture, &body, RefusalCode::Nonce, &["expired"]);
    // A fresh nonce, at the new time, still works: it was the age that was refused.
    let (key, body) = fixture.attempt(3, ReportSpec::default(), vcek());
    assert_released(&body, &key, 4);
}

#[test]
fn ark_and_ask_swapped_in_the_anchors_are_refused() {
    let swapped = TrustAnchors::none()
        .with(Product::Milan, &ca().ask_der(), &ca().ark_der())
        .unwrap();
    let fixture = Fixture::with_anchors(swapped);
    let (_, body) = fixture.attempt(1, ReportSpec::default(), vcek());
    assert_refused(
        &fixture,
        &body,
        RefusalCode::SnpEvidence,
        &["certificate chain", "ARK", "swapped"],
    );
}

#[test]
fn a_vcek_without_the_snp_tcb_extension_is_refused() {
    let fixture = Fixture::new();
    let (_, body) = fixture.attempt(1, ReportSpec::default(), vcek_without_snp_spl());
    assert_refused(
        &fixture,
        &body,
        RefusalCode::SnpEvidence,
        &["snpSPL", "no snpSPL extension"],
    );
}
