//! Mailbox tests through the medium interface the device engine uses: whole requests at offset 0,
//! answers in the answer area, nothing changed by reads, bad input answered and survived.

use std::sync::Condvar;
use std::time::{Duration, Instant};

use keyshard_core::HolderId;
use keyshard_core::broker::{Evidence, HEADER_LEN};
use keyshard_core::holder::HolderClass;

use super::*;

/// A handler that answers a nonce to nonce requests and refuses releases, after an optional
/// wait it is released from (to observe `pending`).
struct ScriptedHandler {
    gate: Mutex<bool>,
    opened: Condvar,
}

impl ScriptedHandler {
    fn new(open: bool) -> Arc<Self> {
        Arc::new(Self {
            gate: Mutex::new(open),
            opened: Condvar::new(),
        })
    }

    fn open(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl RequestHandler for ScriptedHandler {
    fn answer(&self, vm_id: &str, request: &Message) -> Body {
        let mut open = self.gate.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        match request.body {
            Body::NonceRequest => Body::Nonce {
                nonce: [request.request_id as u8; 32],
                valid_for_ms: 60_000,
            },
            _ => Body::Refused {
                code: RefusalCode::UnknownHolder,
                reason: format!("{vm_id} has no such holder"),
            },
        }
    }
}

fn read_answer(mailbox: &BrokerMailbox) -> Vec<u8> {
    let mut out = Vec::new();
    mailbox
        .read_into(ANSWER_OFFSET, AREA_LEN, &mut out)
        .unwrap();
    out
}

/// Reads the answer area until it stops saying `pending` (at most 5 s).
fn final_answer(mailbox: &BrokerMailbox) -> Message {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = Message::parse(&read_answer(mailbox)).unwrap();
        if answer.body != Body::Pending || Instant::now() > until {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn write(mailbox: &BrokerMailbox, message: &Message) {
    let mut bytes = message.encode().unwrap();
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    mailbox.write_at(0, &bytes).unwrap();
}

fn nonce_request(request_id: u64) -> Message {
    Message {
        request_id,
        body: Body::NonceRequest,
    }
}

#[test]
fn geometry_and_serial() {
    let mailbox = BrokerMailbox::new("vm1", ScriptedHandler::new(true)).unwrap();
    assert_eq!(mailbox.capacity_bytes(), 32 * 1024);
    assert!(!mailbox.read_only());
    assert_eq!(&mailbox.serial()[..8], b"ksb-vm1\0");
    // Before any request the answer area is all zeros: no answer names any request.
    assert!(read_answer(&mailbox).iter().all(|b| *b == 0));
}

#[test]
fn a_request_is_pending_then_answered_with_its_id() {
    let handler = ScriptedHandler::new(false);
    let mailbox = BrokerMailbox::new("vm1", handler.clone()).unwrap();
    write(&mailbox, &nonce_request(42));
    let pending = Message::parse(&read_answer(&mailbox)).unwrap();
    assert_eq!(
        pending,
        Message {
            request_id: 42,
            body: Body::Pending
        }
    );
    // Reads have no side effects: the same answer again.
    assert_eq!(Message::parse(&read_answer(&mailbox)).unwrap(), pending);
    handler.open();
    let answer = final_answer(&mailbox);
    assert_eq!(answer.request_id, 42);
    assert!(matches!(answer.body, Body::Nonce { nonce, .. } if nonce == [42; 32]));
}

#[test]
fn a_newer_request_supersedes_an_older_one() {
    let handler = ScriptedHandler::new(false);
    let mailbox = BrokerMailbox::new("vm1", handler.clone()).unwrap();
    write(&mailbox, &nonce_request(1));
    write(&mailbox, &nonce_request(2));
    handler.open();
    let answer = final_answer(&mailbox);
    assert_eq!(answer.request_id, 2);
    // The late answer to request 1 never replaces it.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        Message::parse(&read_answer(&mailbox)).unwrap().request_id,
        2
    );
}

#[test]
fn malformed_truncated_oversized_and_unknown_version_requests_are_refused_and_survived() {
    let mailbox = BrokerMailbox::new("vm1", ScriptedHandler::new(true)).unwrap();
    let good = nonce_request(7).encode().unwrap();
    let mut unknown_version = good.clone();
    unknown_version[4] = 9;
    let mut oversized = good.clone();
    oversized[16..20].copy_from_slice(&(AREA_LEN as u32).to_le_bytes());
    let release = Message {
        request_id: 7,
        body: Body::Release {
            class: HolderClass::Tpm,
            holder_id: HolderId::new("tpm-1").unwrap(),
            request_key: [1; 32],
            evidence: Evidence::None,
        },
    }
    .encode()
    .unwrap();
    let truncated = release[..release.len() - 5].to_vec();
    let mut answer_kind = Message {
        request_id: 7,
        body: Body::Pending,
    }
    .encode()
    .unwrap();
    answer_kind.resize(512, 0);
    let cases: Vec<(&str, Vec<u8>, RefusalCode)> = vec![
        ("garbage", vec![0xAB; 512], RefusalCode::Malformed),
        (
            "unknown version",
            unknown_version,
            RefusalCode::UnsupportedVersion,
        ),
        ("oversized", oversized, RefusalCode::TooLarge),
        ("truncated", truncated, RefusalCode::Malformed),
        ("an answer kind", answer_kind, RefusalCode::UnknownKind),
    ];
    for (what, bytes, code) in cases {
        mailbox.write_at(0, &bytes).unwrap();
        let answer = Message::parse(&read_answer(&mailbox)).unwrap();
        match answer.body {
            Body::Refused {
                code: got,
                ref reason,
            } => {
                assert_eq!(got, code, "{what}: {reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("{what}: answered {other:?}"),
        }
        if what != "garbage" {
            assert_eq!(
                answer.request_id, 7,
                "{what}: the refusal names the request"
            );
        }
        // The next good request is served as usual.
        write(&mailbox, &nonce_request(100));
        assert!(
            matches!(final_answer(&mailbox).body, Body::Nonce { .. }),
            "after {what}"
        );
    }
}

#[test]
fn writes_outside_the_request_area_fail_and_change_nothing() {
    let mailbox = BrokerMailbox::new("vm1", ScriptedHandler::new(true)).unwrap();
    write(&mailbox, &nonce_request(5));
    let before = final_answer(&mailbox);
    for (offset, len) in [(512, 512), (ANSWER_OFFSET, 512), (0, AREA_LEN + 512)] {
        assert!(
            mailbox.write_at(offset, &vec![0xCC; len]).is_err(),
            "{offset}+{len}"
        );
    }
    assert_eq!(Message::parse(&read_answer(&mailbox)).unwrap(), before);
    assert!(
        mailbox
            .read_into(CAPACITY - 512, 1024, &mut Vec::new())
            .is_err()
    );
}

#[test]
fn the_answer_area_is_zero_padded_and_the_request_area_reads_zero() {
    let mailbox = BrokerMailbox::new("vm1", ScriptedHandler::new(true)).unwrap();
    write(&mailbox, &nonce_request(3));
    let answer = final_answer(&mailbox);
    let encoded = answer.encode().unwrap();
    let area = read_answer(&mailbox);
    assert_eq!(&area[..encoded.len()], encoded.as_slice());
    assert!(area[encoded.len()..].iter().all(|b| *b == 0));
    assert!(encoded.len() > HEADER_LEN);
    let mut request_area = Vec::new();
    mailbox.read_into(0, 1024, &mut request_area).unwrap();
    assert!(request_area.iter().all(|b| *b == 0));
}

/// A clock that moves only when told.
struct ManualClock(Mutex<Instant>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl crate::nonces::Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

/// A `tpm` releaser that takes a TPM's time and counts its calls.
struct CountingReleaser {
    calls: std::sync::atomic::AtomicUsize,
}

impl crate::release::HolderReleaser for CountingReleaser {
    fn release(
        &self,
        _check: &crate::release::ReleaseCheck<'_>,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, crate::release::Refusal> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        Ok(zeroize::Zeroizing::new(b"a signed fragment".to_vec()))
    }
}

fn tpm_release(request_id: u64, key: &keyshard_core::envelope::RequestKey) -> Message {
    Message {
        request_id,
        body: Body::Release {
            class: HolderClass::Tpm,
            holder_id: HolderId::new("tpm-1").unwrap(),
            request_key: key.public_key(),
            evidence: Evidence::None,
        },
    }
}

/// Item 7: a guest looping writes of one request sent 8,091 requests in 60 s, each a quote and
/// an unseal and an audit line. Now the work and the log stay bounded, and a well-behaved
/// request after the flood is still answered.
#[test]
fn item7_a_flood_of_one_request_does_bounded_work_and_logging() {
    use crate::audit::AuditLog;
    use crate::release::Coordinator;

    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.log");
    let releaser = Arc::new(CountingReleaser {
        calls: Default::default(),
    });
    // The rate limiter's clock stands still during the flood, so the bound does not depend on
    // how fast a loaded machine writes 5,000 requests (real time let the last one through).
    let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
    let mut coordinator = Coordinator::new(
        clock.clone(),
        AuditLog::open(&audit_path).unwrap(),
        ["vm1".to_owned(), "vm2".to_owned()],
    );
    coordinator.add_holder(
        HolderId::new("tpm-1").unwrap(),
        HolderClass::Tpm,
        releaser.clone(),
    );
    let coordinator: Arc<dyn RequestHandler> = Arc::new(coordinator);
    let vm1 = BrokerMailbox::new("vm1", coordinator.clone()).unwrap();
    let vm2 = BrokerMailbox::new("vm2", coordinator).unwrap();
    let key = keyshard_core::envelope::RequestKey::generate().unwrap();

    let flood = tpm_release(0xf100d, &key);
    for _ in 0..5_000 {
        write(&vm1, &flood);
    }
    // Let the last one be worked on.
    let last = final_answer(&vm1);
    let calls = releaser.calls.load(std::sync::atomic::Ordering::SeqCst);
    // The burst (8), no refill while the clock stands.
    assert!(calls <= 8, "{calls} releases for 5,000 writes");
    assert!(calls >= 1);
    // The newest write is answered: released while the burst lasted (most writes were replaced
    // before the mailbox's thread took them), or refused for rate once it was spent.
    assert_eq!(last.request_id, 0xf100d);
    assert!(
        matches!(
            last.body,
            Body::Released { .. }
                | Body::Refused {
                    code: RefusalCode::RateLimited,
                    ..
                }
        ),
        "{last:?}"
    );
    let lines = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .count();
    assert!(lines <= 3, "{lines} audit lines during the flood");

    // Another VM is answered at once.
    write(&vm2, &tpm_release(2, &key));
    assert!(matches!(final_answer(&vm2).body, Body::Released { .. }));

    // The flooding VM itself, asking as the guest client does (again after a refusal for
    // rate), is answered once its allowance refills.
    let until = Instant::now() + Duration::from_secs(5);
    let mut request_id = 100;
    let answer = loop {
        request_id += 1;
        write(&vm1, &tpm_release(request_id, &key));
        let answer = final_answer(&vm1);
        let limited = matches!(
            answer.body,
            Body::Refused {
                code: RefusalCode::RateLimited,
                ..
            }
        );
        if !limited || Instant::now() > until {
            break answer;
        }
        clock.advance(Duration::from_millis(500));
    };
    assert_eq!(answer.request_id, request_id);
    assert!(matches!(answer.body, Body::Released { .. }), "{answer:?}");
    drop((vm1, vm2));
    let lines = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .count();
    assert!(lines <= 8, "{lines} audit lines in all");
}

/// A request replaced before the mailbox's thread took it is never worked on.
#[test]
fn item7_a_superseded_request_is_skipped_before_any_work() {
    let handler = ScriptedHandler::new(false);
    let counting = Arc::new(CountingHandler {
        inner: handler.clone(),
        seen: Mutex::new(Vec::new()),
    });
    let mailbox = BrokerMailbox::new("vm1", counting.clone()).unwrap();
    // The first is taken and held at the gate; 2..=100 replace each other in the slot.
    write(&mailbox, &nonce_request(1));
    std::thread::sleep(Duration::from_millis(50));
    for id in 2..=100 {
        write(&mailbox, &nonce_request(id));
    }
    handler.open();
    assert_eq!(final_answer(&mailbox).request_id, 100);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(*counting.seen.lock().unwrap(), [1, 100]);
}

struct CountingHandler {
    inner: Arc<ScriptedHandler>,
    seen: Mutex<Vec<u64>>,
}

impl RequestHandler for CountingHandler {
    fn answer(&self, vm_id: &str, request: &Message) -> Body {
        self.seen.lock().unwrap().push(request.request_id);
        self.inner.answer(vm_id, request)
    }
}

/// Panics on its first request, then answers a nonce.
struct PanickingOnce(Mutex<bool>);

impl RequestHandler for PanickingOnce {
    fn answer(&self, _vm_id: &str, request: &Message) -> Body {
        let first = std::mem::replace(&mut *self.0.lock().unwrap(), false);
        if first {
            panic!("a bug in a handler");
        }
        Body::Nonce {
            nonce: [request.request_id as u8; 32],
            valid_for_ms: 60_000,
        }
    }
}

/// Issue 9 item 8 found it: a handler that panicked (the relay's timer outside its runtime)
/// ended the mailbox's thread, and the guest then saw `pending` until its deadline.
#[test]
fn item8_a_panicking_handler_refuses_that_request_and_the_mailbox_goes_on() {
    let mailbox = BrokerMailbox::new("vm1", Arc::new(PanickingOnce(Mutex::new(true)))).unwrap();
    write(&mailbox, &nonce_request(1));
    let answer = final_answer(&mailbox);
    assert_eq!(answer.request_id, 1);
    assert!(
        matches!(
            answer.body,
            Body::Refused {
                code: RefusalCode::Internal,
                ..
            }
        ),
        "{answer:?}"
    );
    write(&mailbox, &nonce_request(2));
    let answer = final_answer(&mailbox);
    assert_eq!(answer.request_id, 2);
    assert!(matches!(answer.body, Body::Nonce { .. }), "{answer:?}");
}
