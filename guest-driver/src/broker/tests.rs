use std::sync::atomic::AtomicBool;

use keyshard_core::dealer::HolderSlot;
use keyshard_core::quorum::Candidate;

use super::shares::{self, candidate};
use super::*;
use crate::testing::{
    Coordinator, Dealt, FakeSnp, ScriptedMailbox, TEST_NONCE, TestHost, deal_over, refusing,
    releasing,
};

fn dealt() -> Dealt {
    deal_over(
        HolderSlot::numbered(HolderClass::Vhd, 1)
            .chain(HolderSlot::numbered(HolderClass::Tpm, 1))
            .chain(HolderSlot::numbered(HolderClass::Sev, 1))
            .collect(),
        2,
    )
}

fn id(text: &str) -> HolderId {
    HolderId::new(text).unwrap()
}

fn slot(class: HolderClass, text: &str) -> HolderSlot {
    HolderSlot {
        class,
        id: id(text),
    }
}

fn scripted(coordinator: Coordinator) -> (BrokerClient, Arc<std::sync::Mutex<Vec<Message>>>) {
    let mailbox = ScriptedMailbox::new(coordinator);
    let requests = mailbox.requests.clone();
    (BrokerClient::new(Box::new(mailbox)), requests)
}

/// The test manifests' pins of the host double.
fn host() -> HostAttestation {
    TestHost::honest().attestation()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[test]
fn a_tpm_share_comes_back_after_pending_and_opens_to_the_signed_fragment() {
    let dealt = dealt();
    let mailbox = ScriptedMailbox::new(releasing(&dealt, Duration::from_millis(60)));
    let requests = mailbox.requests.clone();
    let write_lens = mailbox.write_lens.clone();
    let mut client = BrokerClient::new(Box::new(mailbox));
    let start = Instant::now();
    let fragment = client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap();
    // It waited out the pending answer, and not much longer (polls are at most 20 ms apart).
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(60) && took < Duration::from_millis(1000),
        "{took:?}"
    );
    assert_eq!(fragment.as_slice(), dealt.fragment_of("tpm-1").unwrap());
    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    assert!(matches!(
        &requests[0].body,
        Body::Release {
            class: HolderClass::Tpm,
            evidence: Evidence::TpmNonce { .. },
            ..
        }
    ));
    assert_ne!(requests[0].request_id, 0);
    // One request, written whole in sectors.
    assert_eq!(*write_lens.lock().unwrap(), [512]);
}

#[test]
fn request_ids_are_random_and_a_release_answers_only_its_own_request() {
    let dealt = dealt();
    let (mut client, requests) = scripted(releasing(&dealt, Duration::ZERO));
    client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap();
    client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap();
    let requests = requests.lock().unwrap();
    assert_ne!(requests[0].request_id, requests[1].request_id);
}

#[test]
fn an_sev_share_binds_a_fresh_nonce_and_the_request_key_into_the_report() {
    let dealt = dealt();
    let (mut client, requests) = scripted(releasing(&dealt, Duration::from_millis(10)));
    let mut snp = FakeSnp::default();
    let fragment = client.release_sev(&id("sev-1"), &mut snp, soon()).unwrap();
    assert_eq!(fragment.as_slice(), dealt.fragment_of("sev-1").unwrap());
    assert_eq!(snp.calls, 1);
    let requests = requests.lock().unwrap();
    assert!(matches!(requests[0].body, Body::NonceRequest));
    let Body::Release {
        class,
        request_key,
        evidence: Evidence::Snp {
            nonce,
            report,
            vcek,
        },
        ..
    } = &requests[1].body
    else {
        panic!("{:?}", requests[1]);
    };
    assert_eq!(*class, HolderClass::Sev);
    assert_eq!(*nonce, TEST_NONCE);
    assert_eq!(
        report[16..],
        snp::report_data_binding(&TEST_NONCE, request_key)
    );
    assert!(vcek.is_empty(), "the coordinator uses its VCEK cache");
}

#[test]
fn a_refusal_carries_its_code_and_reason() {
    let (mut client, _) = scripted(refusing(
        RefusalCode::HostAttestation,
        "PCR 7 differs from its golden value",
    ));
    let error = client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap_err();
    assert!(
        matches!(
            &error,
            BrokerError::Refused {
                code: RefusalCode::HostAttestation,
                reason,
            } if reason == "PCR 7 differs from its golden value"
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "refused by the coordinator: PCR 7 differs from its golden value"
    );
}

#[test]
fn a_coordinator_that_stays_pending_costs_only_the_deadline() {
    let dealt = dealt();
    let (mut client, _) = scripted(releasing(&dealt, Duration::from_secs(3600)));
    let start = Instant::now();
    let error = client
        .release_tpm(
            &id("tpm-1"),
            Some(&host()),
            Instant::now() + Duration::from_millis(300),
        )
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            error,
            BrokerError::Timeout {
                last: LastSeen::Pending
            }
        ),
        "{error:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(600),
        "{took:?}"
    );
    assert_eq!(
        error.to_string(),
        "no final answer from the coordinator before the deadline (still pending)"
    );
}

#[test]
fn a_cancelled_client_stops_polling() {
    let dealt = dealt();
    let cancel = Arc::new(AtomicBool::new(false));
    let (client, _) = scripted(releasing(&dealt, Duration::from_secs(3600)));
    let mut client = client.with_cancel(cancel.clone());
    let flag = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        flag.store(true, Ordering::Relaxed);
    });
    let start = Instant::now();
    let error = client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap_err();
    assert!(matches!(error, BrokerError::Cancelled), "{error:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// A mailbox whose answer area holds fixed bytes, whatever is written.
struct FixedAnswer(Vec<u8>);

impl Mailbox for FixedAnswer {
    fn location(&self) -> String {
        "fixed".into()
    }

    fn write_request(&mut self, _request: &[u8], _deadline: Instant) -> mailbox::Result<()> {
        Ok(())
    }

    fn read_answer(
        &mut self,
        len: usize,
        _deadline: Instant,
    ) -> mailbox::Result<Zeroizing<Vec<u8>>> {
        let mut bytes = self.0.clone();
        bytes.resize(len, 0);
        Ok(Zeroizing::new(bytes))
    }
}

fn fixed(bytes: Vec<u8>) -> BrokerClient {
    BrokerClient::new(Box::new(FixedAnswer(bytes)))
}

#[test]
fn garbage_another_requests_answer_or_an_empty_area_are_told_apart() {
    let short = || Instant::now() + Duration::from_millis(100);
    let error = fixed(b"not a broker message".to_vec())
        .nonce(short())
        .unwrap_err();
    assert!(
        matches!(error, BrokerError::Answer(MessageError::BadMagic)),
        "{error:?}"
    );
    let error = fixed(Vec::new()).nonce(short()).unwrap_err();
    assert!(
        matches!(
            error,
            BrokerError::Timeout {
                last: LastSeen::Empty
            }
        ),
        "{error:?}"
    );
    // A final answer, but to another request (ids are random; this one is not ours).
    let other = Message {
        request_id: 0,
        body: Body::Nonce {
            nonce: [1; 32],
            valid_for_ms: 1,
        },
    };
    let error = fixed(other.encode().unwrap()).nonce(short()).unwrap_err();
    assert!(
        matches!(
            error,
            BrokerError::Timeout {
                last: LastSeen::OtherRequest
            }
        ),
        "{error:?}"
    );
}

/// A coordinator double that answers every request with `body`, sealed for nothing.
fn answering(make: impl Fn(&Message) -> Body + Send + 'static) -> Coordinator {
    Box::new(move |request| (Duration::ZERO, make(request)))
}

#[test]
fn a_wrong_kind_a_wrong_holder_or_a_foreign_envelope_is_refused() {
    let dealt = dealt();
    // A nonce where a share was asked for.
    let (mut client, _) = scripted(answering(|_| Body::Nonce {
        nonce: [0; 32],
        valid_for_ms: 1,
    }));
    let error = client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the coordinator broke the protocol: expected a released share, got a nonce"
    );

    // Another holder's share.
    let mut release_other = releasing(&dealt, Duration::ZERO);
    let (mut client, _) = scripted(Box::new(move |request: &Message| {
        let (delay, body) = release_other(request);
        let body = match body {
            Body::Released { envelope, .. } => Body::Released {
                class: HolderClass::Tpm,
                holder_id: HolderId::new("tpm-9").unwrap(),
                envelope,
                host_quote: None,
            },
            other => other,
        };
        (delay, body)
    }));
    let error = client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the coordinator broke the protocol: released tpm holder tpm-9 for a request for tpm \
         holder tpm-1"
    );

    // Sealed to another request id: replayed from an earlier exchange.
    let (mut client, _) = scripted(Box::new(move |request: &Message| {
        let Body::Release {
            request_key,
            evidence: Evidence::TpmNonce { nonce },
            ..
        } = &request.body
        else {
            panic!("{request:?}");
        };
        let quote = TestHost::honest().quote_for(nonce);
        let context = ReleaseContext {
            request_id: request.request_id ^ 1,
            class: HolderClass::Tpm,
            holder_id: HolderId::new("tpm-1").unwrap(),
        };
        let envelope = keyshard_core::envelope::seal(request_key, b"fragment", &context).unwrap();
        (
            Duration::ZERO,
            Body::Released {
                class: HolderClass::Tpm,
                holder_id: context.holder_id,
                envelope,
                host_quote: Some(quote),
            },
        )
    }));
    let error = client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap_err();
    assert!(
        matches!(error, BrokerError::Envelope(EnvelopeError::Open)),
        "{error:?}"
    );
}

#[test]
fn one_read_holds_the_longest_answer() {
    let longest = Message {
        request_id: u64::MAX,
        body: Body::Released {
            class: HolderClass::Tpm,
            holder_id: id("tpm-123456789012"),
            envelope: keyshard_core::envelope::Envelope {
                encapped_key: [3; 32],
                ciphertext: vec![
                    9;
                    keyshard_core::fragment::MAX_FRAGMENT_LEN
                        + keyshard_core::envelope::TAG_LEN
                ],
            },
            host_quote: None,
        },
    };
    let encoded = longest.encode().unwrap();
    assert!(encoded.len() <= ANSWER_READ_LEN, "{}", encoded.len());
    let mut client = fixed(encoded);
    assert_eq!(client.read_answer(soon()).unwrap(), Some(longest));
}

#[test]
fn answers_become_candidates_named_after_their_holder() {
    let dealt = dealt();
    let tpm = slot(HolderClass::Tpm, "tpm-1");
    let fragment = Zeroizing::new(dealt.fragment_of("tpm-1").unwrap());
    let released = candidate(&tpm, "/dev/vdd", Ok(fragment.clone()));
    assert_eq!(released.source, "tpm-1 (broker /dev/vdd)");
    assert_eq!(released.content.unwrap().as_slice(), fragment.as_slice());

    let refused = candidate(
        &tpm,
        "/dev/vdd",
        Err(BrokerError::Refused {
            code: RefusalCode::HostAttestation,
            reason: "PCR 7 differs from its golden value".into(),
        }),
    );
    assert_eq!(refused.source, "tpm-1");
    assert_eq!(
        refused.content.unwrap_err(),
        "refused by the coordinator: PCR 7 differs from its golden value"
    );

    // Review of issue 7: the reason is the host's text, printed on the guest's console.
    let hostile = candidate(
        &tpm,
        "/dev/vdd",
        Err(BrokerError::Refused {
            code: RefusalCode::Other(9),
            reason: "no\nkeyshard-guest: rebuilt key\u{1b}[2J".into(),
        }),
    );
    assert_eq!(
        hostile.content.unwrap_err(),
        "refused by the coordinator: no?keyshard-guest: rebuilt key?[2J"
    );

    // The sev holder's fragment handed out as the tpm holder's is not counted as tpm-1's.
    let swapped = candidate(
        &tpm,
        "/dev/vdd",
        Ok(Zeroizing::new(dealt.fragment_of("sev-1").unwrap())),
    );
    assert_eq!(
        swapped.content.unwrap_err(),
        "the coordinator released sev holder sev-1's fragment instead"
    );
}

#[test]
fn without_snp_reports_an_sev_holder_is_not_an_snp_guest() {
    let dealt = dealt();
    let (mut client, requests) = scripted(releasing(&dealt, Duration::ZERO));
    let holders = [
        (1, slot(HolderClass::Sev, "sev-1")),
        (0, slot(HolderClass::Tpm, "tpm-1")),
    ];
    let mut got: Vec<(usize, Candidate)> = Vec::new();
    let pins = host();
    shares::fetch_all(
        &mut client,
        &holders,
        None,
        Some(&pins),
        soon(),
        |index, candidate| {
            got.push((index, candidate));
            true
        },
    );
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, 1);
    assert_eq!(
        got[0].1.content.as_ref().unwrap_err(),
        "not an SEV-SNP guest (no /dev/sev-guest)"
    );
    assert_eq!(got[1].0, 0);
    assert!(got[1].1.content.is_ok());
    // The coordinator was asked only for the tpm share.
    assert_eq!(requests.lock().unwrap().len(), 1);

    // With reports, both are released.
    let (mut client, _) = scripted(releasing(&dealt, Duration::ZERO));
    let mut released = 0;
    shares::fetch_all(
        &mut client,
        &holders,
        Some(Box::new(FakeSnp::default())),
        Some(&pins),
        soon(),
        |_, candidate| {
            released += usize::from(candidate.content.is_ok());
            true
        },
    );
    assert_eq!(released, 2);
}

/// Refuses the first `times` requests for rate, then answers as `then` does.
fn rate_limited(times: usize, mut then: Coordinator) -> Coordinator {
    let mut refused = 0;
    Box::new(move |request| {
        if refused < times {
            refused += 1;
            return (
                Duration::from_millis(1),
                Body::Refused {
                    code: RefusalCode::RateLimited,
                    reason: "too many requests".into(),
                },
            );
        }
        then(request)
    })
}

/// Item 7: a refusal for rate is waited out and asked again within the deadline.
#[test]
fn item7_a_rate_limited_request_is_asked_again_and_released() {
    let dealt = dealt();
    let (mut client, requests) = scripted(rate_limited(2, releasing(&dealt, Duration::ZERO)));
    let start = Instant::now();
    let fragment = client
        .release_tpm(&id("tpm-1"), Some(&host()), soon())
        .unwrap();
    assert_eq!(fragment.as_slice(), dealt.fragment_of("tpm-1").unwrap());
    assert!(
        start.elapsed() >= 2 * RATE_LIMITED_PAUSE,
        "it waited between tries"
    );
    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 3);
    // Each try is a new request.
    assert_ne!(requests[0].request_id, requests[2].request_id);

    // The sev path: the nonce request itself limited, then the release.
    let (mut client, requests) = scripted(rate_limited(1, releasing(&dealt, Duration::ZERO)));
    let fragment = client
        .release_sev(&id("sev-1"), &mut FakeSnp::default(), soon())
        .unwrap();
    assert_eq!(fragment.as_slice(), dealt.fragment_of("sev-1").unwrap());
    assert_eq!(requests.lock().unwrap().len(), 3);
}

/// Item 7: still limited at the deadline: the refusal, not a hang.
#[test]
fn item7_rate_limited_until_the_deadline_is_the_refusal() {
    let dealt = dealt();
    let (mut client, requests) =
        scripted(rate_limited(usize::MAX, releasing(&dealt, Duration::ZERO)));
    let start = Instant::now();
    let err = client
        .release_tpm(
            &id("tpm-1"),
            Some(&host()),
            Instant::now() + Duration::from_millis(1200),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            BrokerError::Refused {
                code: RefusalCode::RateLimited,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(1300));
    let tries = requests.lock().unwrap().len();
    assert!((2..=3).contains(&tries), "{tries} tries");
}

/// A coordinator double that releases tpm-1's share with the quote `forge` makes for the
/// request's guest nonce.
fn quoting(
    dealt: &Dealt,
    forge: impl Fn(&[u8; NONCE_LEN]) -> keyshard_core::broker::HostQuote + Send + 'static,
) -> Coordinator {
    let mut honest = releasing(dealt, Duration::ZERO);
    Box::new(move |request: &Message| {
        let (delay, body) = honest(request);
        let body = match (body, &request.body) {
            (
                Body::Released {
                    class,
                    holder_id,
                    envelope,
                    ..
                },
                Body::Release {
                    evidence: Evidence::TpmNonce { nonce },
                    ..
                },
            ) => Body::Released {
                class,
                holder_id,
                envelope,
                host_quote: Some(forge(nonce)),
            },
            (other, _) => other,
        };
        (delay, body)
    })
}

fn host_check_error(coordinator: Coordinator) -> HostCheckError {
    let (mut client, _) = scripted(coordinator);
    match client.release_tpm(&id("tpm-1"), Some(&host()), soon()) {
        Err(BrokerError::HostCheck(e)) => e,
        other => panic!("not refused by the host check: {other:?}"),
    }
}

/// Issue 8 item 4: a quote signed by another key than the manifest's AK is refused.
#[test]
fn item4_a_quote_not_signed_by_the_manifests_ak_is_refused() {
    let dealt = dealt();
    let impostor = TestHost {
        key: p256::ecdsa::SigningKey::from_slice(&[0x13; 32]).unwrap(),
        ..TestHost::honest()
    };
    let error = host_check_error(quoting(&dealt, move |nonce| impostor.quote_for(nonce)));
    assert_eq!(error, HostCheckError::Signature);
    assert_eq!(
        error.to_string(),
        "the host quote is not signed by the manifest's attestation key"
    );
}

/// Issue 8 item 4: a quote by the right AK over PCRs that differ from the golden digest.
#[test]
fn item4_a_quote_with_a_wrong_pcr_digest_is_refused() {
    let dealt = dealt();
    let changed = TestHost {
        pcr_digest: [0x78; 32],
        ..TestHost::honest()
    };
    let error = host_check_error(quoting(&dealt, move |nonce| changed.quote_for(nonce)));
    assert!(
        matches!(&error, HostCheckError::PcrDigest { selection } if selection == "sha256:0,7"),
        "{error:?}"
    );
}

/// Issue 8 item 4: a genuine quote that does not include the guest's nonce (replayed, or
/// another request's) is refused.
#[test]
fn item4_a_quote_whose_root_lacks_the_guests_nonce_is_refused() {
    let dealt = dealt();
    let error = host_check_error(quoting(&dealt, |_| {
        TestHost::honest().quote_for(&[0xab; NONCE_LEN])
    }));
    assert_eq!(error, HostCheckError::Nonce);
    // A path that leads elsewhere: the guest's nonce, but a sibling that is not in the tree.
    let error = host_check_error(quoting(&dealt, |nonce| {
        let mut quote = TestHost::honest().quote_for(nonce);
        quote.path.push(keyshard_core::broker::merkle::PathStep {
            sibling_on_left: false,
            sibling: [0; 32],
        });
        quote
    }));
    assert_eq!(error, HostCheckError::Nonce);
}

/// Issue 8 item 4: no quote in the answer, or no pins in the manifest: no tpm share.
#[test]
fn item4_no_quote_or_no_pins_is_refused() {
    let dealt = dealt();
    let mut honest = releasing(&dealt, Duration::ZERO);
    let error = host_check_error(Box::new(move |request: &Message| {
        let (delay, body) = honest(request);
        let body = match body {
            Body::Released {
                class,
                holder_id,
                envelope,
                ..
            } => Body::Released {
                class,
                holder_id,
                envelope,
                host_quote: None,
            },
            other => other,
        };
        (delay, body)
    }));
    assert_eq!(error, HostCheckError::NoQuote);
    let (mut client, requests) = scripted(releasing(&dealt, Duration::ZERO));
    let error = client.release_tpm(&id("tpm-1"), None, soon()).unwrap_err();
    assert!(
        matches!(error, BrokerError::HostCheck(HostCheckError::NotPinned)),
        "{error:?}"
    );
    assert!(requests.lock().unwrap().is_empty(), "nothing is asked");
}
