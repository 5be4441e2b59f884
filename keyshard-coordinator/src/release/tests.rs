//! Coordinator tests with test-double releasers: the class-independent checks (holder, class,
//! nonce), the sealed answer, and the audit log.

use std::time::Instant;

use keyshard_core::envelope::RequestKey;

use super::*;
use crate::nonces::SystemClock;

const FRAGMENT: &[u8] = b"pretend this is a signed fragment";

/// Releases the fixed fragment, or refuses with `refusal` when it has one.
struct FixedReleaser {
    refusal: Option<Refusal>,
    calls: Mutex<usize>,
}

impl FixedReleaser {
    fn new(refusal: Option<Refusal>) -> Arc<Self> {
        Arc::new(Self {
            refusal,
            calls: Mutex::new(0),
        })
    }
}

impl HolderReleaser for FixedReleaser {
    fn release(&self, _check: &ReleaseCheck<'_>) -> Result<Zeroizing<Vec<u8>>, Refusal> {
        *self.calls.lock().unwrap() += 1;
        match &self.refusal {
            Some(refusal) => Err(refusal.clone()),
            None => Ok(Zeroizing::new(FRAGMENT.to_vec())),
        }
    }
}

struct Setup {
    coordinator: Coordinator,
    audit_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn setup(tpm: Arc<FixedReleaser>, sev: Arc<FixedReleaser>) -> Setup {
    setup_limited(tpm, sev, DEFAULT_RATE_LIMIT)
}

/// A coordinator bound to vm1 and vm2, with `limit` per VM.
fn setup_limited(tpm: Arc<FixedReleaser>, sev: Arc<FixedReleaser>, limit: RateLimit) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.log");
    let mut coordinator = Coordinator::new(
        Arc::new(SystemClock),
        AuditLog::open(&audit_path).unwrap(),
        ["vm1".to_owned(), "vm2".to_owned()],
    )
    .with_rate_limit(limit);
    coordinator.add_holder(HolderId::new("tpm-1").unwrap(), HolderClass::Tpm, tpm);
    coordinator.add_holder(HolderId::new("sev-1").unwrap(), HolderClass::Sev, sev);
    Setup {
        coordinator,
        audit_path,
        _dir: dir,
    }
}

fn release(
    request_id: u64,
    class: HolderClass,
    holder: &str,
    key: &RequestKey,
    evidence: Evidence,
) -> Message {
    Message {
        request_id,
        body: Body::Release {
            class,
            holder_id: HolderId::new(holder).unwrap(),
            request_key: key.public_key(),
            evidence,
        },
    }
}

fn snp(nonce: [u8; 32]) -> Evidence {
    Evidence::Snp {
        nonce,
        report: vec![0; 1184],
        vcek: Vec::new(),
    }
}

fn refusal_code(body: &Body) -> RefusalCode {
    match body {
        Body::Refused { code, .. } => *code,
        other => panic!("not refused: {other:?}"),
    }
}

fn audit_lines(setup: &Setup) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&setup.audit_path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn a_tpm_release_is_sealed_to_the_request_key_and_audited() {
    let s = setup(FixedReleaser::new(None), FixedReleaser::new(None));
    let key = RequestKey::generate().unwrap();
    let body = s.coordinator.answer(
        "vm1",
        &release(9, HolderClass::Tpm, "tpm-1", &key, Evidence::None),
    );
    let Body::Released {
        class,
        holder_id,
        envelope,
        host_quote: None,
    } = body
    else {
        panic!("{body:?}");
    };
    assert_eq!((class, holder_id.as_str()), (HolderClass::Tpm, "tpm-1"));
    let context = ReleaseContext {
        request_id: 9,
        class,
        holder_id,
    };
    assert_eq!(key.open(&envelope, &context).unwrap().as_slice(), FRAGMENT);
    let lines = audit_lines(&s);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["verdict"], "released");
    assert_eq!(lines[0]["holder"], "tpm-1");
    assert_eq!(lines[0]["request"], "9");
    let text = std::fs::read_to_string(&s.audit_path).unwrap();
    assert!(
        !text.contains("pretend"),
        "the audit log holds no fragment bytes"
    );
}

#[test]
fn unknown_holders_and_wrong_classes_are_refused_without_asking_the_releaser() {
    let tpm = FixedReleaser::new(None);
    let s = setup(tpm.clone(), FixedReleaser::new(None));
    let key = RequestKey::generate().unwrap();
    let unknown = s.coordinator.answer(
        "vm1",
        &release(1, HolderClass::Tpm, "tpm-9", &key, Evidence::None),
    );
    assert_eq!(refusal_code(&unknown), RefusalCode::UnknownHolder);
    let wrong_class = s.coordinator.answer(
        "vm1",
        &release(2, HolderClass::Sev, "tpm-1", &key, snp([0; 32])),
    );
    assert_eq!(refusal_code(&wrong_class), RefusalCode::UnknownHolder);
    assert_eq!(*tpm.calls.lock().unwrap(), 0);
    assert_eq!(audit_lines(&s).len(), 2);
}

#[test]
fn a_refusing_releaser_is_passed_on_with_its_reason() {
    let refusal = Refusal::new(
        RefusalCode::HostAttestation,
        "PCR 7 differs from its golden value",
    );
    let s = setup(
        FixedReleaser::new(Some(refusal.clone())),
        FixedReleaser::new(None),
    );
    let key = RequestKey::generate().unwrap();
    let body = s.coordinator.answer(
        "vm1",
        &release(3, HolderClass::Tpm, "tpm-1", &key, Evidence::None),
    );
    assert_eq!(
        body,
        Body::Refused {
            code: refusal.code,
            reason: refusal.reason.clone()
        }
    );
    assert_eq!(
        audit_lines(&s)[0]["reason"],
        "PCR 7 differs from its golden value"
    );
}

#[test]
fn snp_releases_need_a_nonce_issued_to_the_same_vm_and_unused() {
    let sev = FixedReleaser::new(None);
    let s = setup(FixedReleaser::new(None), sev.clone());
    let key = RequestKey::generate().unwrap();
    let Body::Nonce {
        nonce,
        valid_for_ms,
    } = s.coordinator.answer(
        "vm1",
        &Message {
            request_id: 1,
            body: Body::NonceRequest,
        },
    )
    else {
        panic!("no nonce");
    };
    assert_eq!(valid_for_ms, 60_000);

    // Another VM cannot spend vm1's nonce.
    let relayed = s.coordinator.answer(
        "vm2",
        &release(2, HolderClass::Sev, "sev-1", &key, snp(nonce)),
    );
    assert_eq!(refusal_code(&relayed), RefusalCode::Nonce);
    let made_up = s.coordinator.answer(
        "vm1",
        &release(3, HolderClass::Sev, "sev-1", &key, snp([7; 32])),
    );
    assert_eq!(refusal_code(&made_up), RefusalCode::Nonce);
    assert_eq!(
        *sev.calls.lock().unwrap(),
        0,
        "bad nonces never reach the SNP checks"
    );

    let released = s.coordinator.answer(
        "vm1",
        &release(4, HolderClass::Sev, "sev-1", &key, snp(nonce)),
    );
    assert!(matches!(released, Body::Released { .. }), "{released:?}");
    let replayed = s.coordinator.answer(
        "vm1",
        &release(5, HolderClass::Sev, "sev-1", &key, snp(nonce)),
    );
    assert_eq!(refusal_code(&replayed), RefusalCode::Nonce);
    let verdicts: Vec<String> = audit_lines(&s)
        .iter()
        .map(|l| l["verdict"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        verdicts,
        ["issued", "refused", "refused", "released", "refused"]
    );
}

#[test]
fn a_bad_request_key_is_refused_not_sealed_to() {
    let s = setup(FixedReleaser::new(None), FixedReleaser::new(None));
    let started = Instant::now();
    let body = s.coordinator.answer(
        "vm1",
        &Message {
            request_id: 1,
            body: Body::Release {
                class: HolderClass::Tpm,
                holder_id: HolderId::new("tpm-1").unwrap(),
                // The all-zero point is not a usable X25519 public key.
                request_key: [0; 32],
                evidence: Evidence::None,
            },
        },
    );
    assert!(started.elapsed().as_secs() < 5);
    // X25519 with a low-order point gives an all-zero secret, which HPKE must refuse.
    assert_eq!(refusal_code(&body), RefusalCode::Malformed);
}

/// Item 4: a VM the key is not bound to is refused, audited, and costs no releaser call.
#[test]
fn item4_an_unbound_vm_is_refused_before_any_check_and_audited() {
    let tpm = FixedReleaser::new(None);
    let s = setup(tpm.clone(), FixedReleaser::new(None));
    let key = RequestKey::generate().unwrap();
    let body = s.coordinator.answer(
        "vm3",
        &release(1, HolderClass::Tpm, "tpm-1", &key, Evidence::None),
    );
    assert_eq!(refusal_code(&body), RefusalCode::VmNotBound);
    let nonce = s.coordinator.answer(
        "vm3",
        &Message {
            request_id: 2,
            body: Body::NonceRequest,
        },
    );
    assert_eq!(refusal_code(&nonce), RefusalCode::VmNotBound);
    assert_eq!(*tpm.calls.lock().unwrap(), 0);
    let lines = audit_lines(&s);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (&lines[0]["vm"], &lines[0]["verdict"], &lines[0]["holder"]),
        (&"vm3".into(), &"refused".into(), &"tpm-1".into())
    );
    assert_eq!(lines[1]["kind"], "nonce");
}

/// Item 7: past its burst a VM is refused for rate before the releaser runs; another VM is not.
#[test]
fn item7_a_vm_past_its_burst_is_refused_for_rate_before_the_releaser() {
    let tpm = FixedReleaser::new(None);
    let s = setup_limited(
        tpm.clone(),
        FixedReleaser::new(None),
        RateLimit {
            burst: 3,
            per_second: 1,
        },
    );
    let key = RequestKey::generate().unwrap();
    let codes: Vec<Option<RefusalCode>> = (0..10)
        .map(|i| {
            match s.coordinator.answer(
                "vm1",
                &release(i, HolderClass::Tpm, "tpm-1", &key, Evidence::None),
            ) {
                Body::Refused { code, .. } => Some(code),
                _ => None,
            }
        })
        .collect();
    assert_eq!(codes[..3], [None, None, None]);
    assert!(
        codes[3..]
            .iter()
            .all(|c| *c == Some(RefusalCode::RateLimited)),
        "{codes:?}"
    );
    assert_eq!(*tpm.calls.lock().unwrap(), 3);
    assert!(matches!(
        s.coordinator.answer(
            "vm2",
            &release(99, HolderClass::Tpm, "tpm-1", &key, Evidence::None)
        ),
        Body::Released { .. }
    ));
}

/// Item 7 (review): a guest past its rate limit that names a new holder in every request must not
/// get an audit line per request. The holder and class it names are its own choice, so they do
/// not open a new folded run; a refusal before the holder is known carries neither.
#[test]
fn item7_a_flood_naming_new_holders_folds_into_a_bounded_audit_log() {
    let s = setup_limited(
        FixedReleaser::new(None),
        FixedReleaser::new(None),
        RateLimit {
            burst: 2,
            per_second: 1,
        },
    );
    let key = RequestKey::generate().unwrap();
    let flood = 1000u64;
    for i in 0..flood {
        let class = if i % 2 == 0 {
            HolderClass::Tpm
        } else {
            HolderClass::Sev
        };
        let holder = format!("h{i}");
        let body = s
            .coordinator
            .answer("vm1", &release(i, class, &holder, &key, Evidence::None));
        assert!(matches!(body, Body::Refused { .. }), "{body:?}");
    }
    drop(s.coordinator);
    let lines = std::fs::read_to_string(&s.audit_path).unwrap();
    let lines: Vec<serde_json::Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(
        lines.len() <= 6,
        "{} audit lines for {flood} refused requests",
        lines.len()
    );
    let counted: u64 = lines
        .iter()
        .map(|l| l["repeated"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(counted, flood, "every request is counted once: {lines:?}");
    let rate_limited = lines
        .iter()
        .find(|l| {
            l["reason"]
                .as_str()
                .is_some_and(|r| r.contains("too many requests"))
        })
        .unwrap();
    assert!(rate_limited.get("holder").is_none(), "{rate_limited}");
}

/// What a relay was asked: vm, holder, slot, request key.
type Asked = (String, String, u8, [u8; 32]);

/// Answers every `host` request with a fixed shard, or refuses; records what it was asked.
struct FixedRelay {
    refusal: Option<Refusal>,
    asked: Mutex<Vec<Asked>>,
}

impl HostShareRelay for FixedRelay {
    fn relay(
        &self,
        request: &HostShareRequest<'_>,
    ) -> Result<crate::host_relay::RelayedShard, Refusal> {
        self.asked.lock().unwrap().push((
            request.vm_id.to_owned(),
            request.holder.to_string(),
            request.slot,
            *request.request_key,
        ));
        match &self.refusal {
            Some(refusal) => Err(refusal.clone()),
            None => Ok(crate::host_relay::RelayedShard {
                credential: keyshard_core::KeyId::new("vm-key").unwrap(),
                epoch: 1,
                index: request.slot,
                host: "shard-eu".into(),
                released: b"KSRS sealed bytes".to_vec(),
            }),
        }
    }
}

fn host_setup(relay: Option<Arc<FixedRelay>>) -> Setup {
    let mut s = setup(FixedReleaser::new(None), FixedReleaser::new(None));
    s.coordinator
        .add_host_holder(HolderId::new("host-1").unwrap(), 1);
    s.coordinator
        .add_host_holder(HolderId::new("host-2").unwrap(), 2);
    if let Some(relay) = relay {
        s.coordinator.set_host_relay(relay);
    }
    s
}

#[test]
fn item8_a_host_release_is_relayed_for_its_slot_and_passed_on_as_released() {
    let relay = Arc::new(FixedRelay {
        refusal: None,
        asked: Mutex::new(Vec::new()),
    });
    let s = host_setup(Some(relay.clone()));
    let key = RequestKey::generate().unwrap();
    let answer = s.coordinator.answer(
        "vm1",
        &release(1, HolderClass::Host, "host-2", &key, Evidence::VmTpm),
    );
    match answer {
        Body::HostReleased {
            holder_id,
            index,
            host,
            released,
            ..
        } => {
            assert_eq!(holder_id.as_str(), "host-2");
            assert_eq!(index, 2);
            assert_eq!(host, "shard-eu");
            assert_eq!(released, b"KSRS sealed bytes");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        *relay.asked.lock().unwrap(),
        [("vm1".to_owned(), "host-2".to_owned(), 2, key.public_key())]
    );

    // Other evidence, an unknown host holder and an unbound VM never reach the relay.
    for (vm, holder, evidence, code) in [
        ("vm1", "host-1", Evidence::None, RefusalCode::Malformed),
        ("vm1", "host-9", Evidence::VmTpm, RefusalCode::UnknownHolder),
        ("vm9", "host-1", Evidence::VmTpm, RefusalCode::VmNotBound),
    ] {
        let answer = s
            .coordinator
            .answer(vm, &release(2, HolderClass::Host, holder, &key, evidence));
        assert!(
            matches!(answer, Body::Refused { code: c, .. } if c == code),
            "{holder}: {answer:?}"
        );
    }
    assert_eq!(relay.asked.lock().unwrap().len(), 1);
}

#[test]
fn item8_without_a_relay_or_when_it_fails_a_host_release_is_refused_naming_why() {
    let key = RequestKey::generate().unwrap();
    let request = release(1, HolderClass::Host, "host-1", &key, Evidence::VmTpm);
    let s = host_setup(None);
    match s.coordinator.answer("vm1", &request) {
        Body::Refused { code, reason } => {
            assert_eq!(code, RefusalCode::HostShare);
            assert!(reason.contains("--vm-tcti"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let failing = Arc::new(FixedRelay {
        refusal: Some(Refusal::new(
            RefusalCode::HostShare,
            "shard host shard-eu: no answer within 2000 ms",
        )),
        asked: Mutex::new(Vec::new()),
    });
    let s = host_setup(Some(failing));
    match s.coordinator.answer("vm1", &request) {
        Body::Refused { code, reason } => {
            assert_eq!(code, RefusalCode::HostShare);
            assert!(reason.contains("shard-eu"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
