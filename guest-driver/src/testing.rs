//! Test fixtures: a dealt secret with its manifest, fragment volumes holding its fragments, and
//! doubles for the coordinator behind a broker mailbox and for the SNP firmware.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyshard_attest::tpm::{ClockInfo, QuoteAttest, QuotedBank};
use keyshard_core::broker::{Body, Evidence, Message, RefusalCode};
use keyshard_core::broker::{HostQuote, NONCE_LEN, merkle};
use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::envelope::{self, ReleaseContext};
use keyshard_core::manifest::{HOST_AK_LEN, HostAttestation, Manifest};
use keyshard_core::policy::PcrBank;
use keyshard_core::{HolderClass, KeyCheckValue, KeyId, keys, volume};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use zeroize::Zeroizing;

use crate::broker::mailbox::{self, Mailbox};
use crate::snp::{self, REPORT_DATA_LEN, ReportSource};

/// A secret split k of n, and what a guest would hold.
#[derive(Debug, Clone)]
pub struct Dealt {
    pub secret: Vec<u8>,
    pub manifest: Manifest,
    /// Encoded fragment i is `manifest.holders[i]`'s.
    pub fragments: Vec<Vec<u8>>,
}

impl Dealt {
    /// The encoded fragment of holder `id`.
    pub fn fragment_of(&self, id: &str) -> Option<Vec<u8>> {
        self.manifest
            .holders
            .iter()
            .position(|h| h.id.as_str() == id)
            .and_then(|i| self.fragments.get(i).cloned())
    }
}

/// A secret split 2 of n over holders `vhd-1` ... `vhd-n`.
pub fn dealt_fragments(n: u8) -> Dealt {
    deal_over(HolderSlot::numbered(HolderClass::Vhd, n).collect(), 2)
}

/// A secret split `k` of `holders.len()` over `holders`.
pub fn deal_over(holders: Vec<HolderSlot>, k: u8) -> Dealt {
    let secret = b"0123456789abcdef0123456789abcdef".to_vec();
    let dealer_key = keys::generate().unwrap();
    let key_id = KeyId::new("root").unwrap();
    let plan = DealPlan {
        key_id: key_id.clone(),
        epoch: 1,
        k,
        holders: holders.clone(),
    };
    let fragments = dealer::deal(&secret, &plan, &dealer_key)
        .unwrap()
        .iter()
        .map(|f| f.encoded().to_vec())
        .collect();
    let manifest = Manifest {
        key_check_value: KeyCheckValue::compute(&secret, &key_id),
        key_id,
        threshold: k,
        dealer: dealer_key.verifying_key(),
        holders,
        host_attestation: Some(TestHost::honest().attestation()),
    };
    Dealt {
        secret,
        manifest,
        fragments,
    }
}

/// The fragment volume of holder `vhd-<index + 1>`.
pub fn vhd_volume(dealt: &Dealt, index: usize) -> Vec<u8> {
    volume::encode(&[&dealt.fragments[index]]).unwrap()
}

/// How a coordinator double answers a request: pending for how long, then what.
pub type Coordinator = Box<dyn FnMut(&Message) -> (Duration, Body) + Send>;

/// A broker mailbox with a coordinator double behind it, behaving as the device does: a
/// written request reads back `pending` until its answer is ready, and a newer request
/// replaces an older one. Every request written is kept for the test to look at.
pub struct ScriptedMailbox {
    coordinator: Coordinator,
    current: Option<(u64, Instant, Body)>,
    pub requests: Arc<Mutex<Vec<Message>>>,
    /// The length of each write, padding included.
    pub write_lens: Arc<Mutex<Vec<usize>>>,
}

impl ScriptedMailbox {
    pub fn new(coordinator: Coordinator) -> Self {
        Self {
            coordinator,
            current: None,
            requests: Arc::default(),
            write_lens: Arc::default(),
        }
    }
}

impl Mailbox for ScriptedMailbox {
    fn location(&self) -> String {
        "scripted".into()
    }

    fn write_request(&mut self, request: &[u8], _deadline: Instant) -> mailbox::Result<()> {
        let request = mailbox::padded(request, 512)?;
        self.write_lens.lock().unwrap().push(request.len());
        let message = Message::parse(&request).unwrap();
        let (pending_for, answer) = (self.coordinator)(&message);
        self.current = Some((message.request_id, Instant::now() + pending_for, answer));
        self.requests.lock().unwrap().push(message);
        Ok(())
    }

    fn read_answer(
        &mut self,
        len: usize,
        _deadline: Instant,
    ) -> mailbox::Result<Zeroizing<Vec<u8>>> {
        let mut bytes = match &self.current {
            None => Vec::new(),
            Some((request_id, ready_at, answer)) => Message {
                request_id: *request_id,
                body: if Instant::now() < *ready_at {
                    Body::Pending
                } else {
                    answer.clone()
                },
            }
            .encode()
            .unwrap(),
        };
        bytes.resize(len, 0);
        Ok(Zeroizing::new(bytes))
    }
}

/// The nonce the coordinator double hands out.
pub const TEST_NONCE: [u8; 32] = [0x5a; 32];

/// A coordinator double that releases the dealt fragment of every `tpm` holder, and of every
/// `sev` holder whose evidence is a [`FakeSnp`] report binding [`TEST_NONCE`] and the request
/// key, after `pending_for`; it refuses everything else. A `tpm` release with a guest nonce is
/// answered with [`TestHost::honest`]'s quote for it.
pub fn releasing(dealt: &Dealt, pending_for: Duration) -> Coordinator {
    let dealt = dealt.clone();
    Box::new(move |request| {
        let body = match &request.body {
            Body::NonceRequest => Body::Nonce {
                nonce: TEST_NONCE,
                valid_for_ms: 30_000,
            },
            Body::Release {
                class,
                holder_id,
                request_key,
                evidence,
            } => {
                let evidence_ok = match evidence {
                    Evidence::None | Evidence::TpmNonce { .. } => *class == HolderClass::Tpm,
                    // host shares come through the relay: keyshard/tests/host_class.rs.
                    Evidence::VmTpm => false,
                    Evidence::Snp {
                        nonce,
                        report,
                        vcek,
                    } => {
                        let binding = snp::report_data_binding(nonce, request_key);
                        *class == HolderClass::Sev
                            && *nonce == TEST_NONCE
                            && *report == FakeSnp::report_for(&binding)
                            && vcek.is_empty()
                    }
                };
                match dealt.fragment_of(holder_id.as_str()) {
                    Some(fragment) if evidence_ok => Body::Released {
                        class: *class,
                        holder_id: holder_id.clone(),
                        envelope: envelope::seal(
                            request_key,
                            &fragment,
                            &ReleaseContext {
                                request_id: request.request_id,
                                class: *class,
                                holder_id: holder_id.clone(),
                            },
                        )
                        .unwrap(),
                        host_quote: match evidence {
                            Evidence::TpmNonce { nonce } => {
                                Some(TestHost::honest().quote_for(nonce))
                            }
                            _ => None,
                        },
                    },
                    Some(_) => Body::Refused {
                        code: RefusalCode::SnpEvidence,
                        reason: "the evidence does not verify".into(),
                    },
                    None => Body::Refused {
                        code: RefusalCode::UnknownHolder,
                        reason: format!("no holder {holder_id}"),
                    },
                }
            }
            other => panic!("a guest does not send {other:?}"),
        };
        (pending_for, body)
    })
}

/// A coordinator double that refuses every request with `code` and `reason`.
pub fn refusing(code: RefusalCode, reason: &str) -> Coordinator {
    let reason = reason.to_owned();
    Box::new(move |_| {
        (
            Duration::from_millis(5),
            Body::Refused {
                code,
                reason: reason.clone(),
            },
        )
    })
}

/// An SNP firmware double: its "report" is a marker followed by the REPORT_DATA.
#[derive(Debug, Default)]
pub struct FakeSnp {
    pub calls: usize,
}

impl FakeSnp {
    pub fn report_for(report_data: &[u8; REPORT_DATA_LEN]) -> Vec<u8> {
        let mut report = b"TEST-SNP-REPORT:".to_vec();
        report.extend_from_slice(report_data);
        report
    }
}

impl ReportSource for FakeSnp {
    fn report(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> snp::Result<Vec<u8>> {
        self.calls += 1;
        Ok(Self::report_for(report_data))
    }
}

/// A host TPM double: an attestation key and the PCR digest its quotes report.
pub struct TestHost {
    pub key: SigningKey,
    pub pcr_digest: [u8; 32],
}

/// The golden PCR digest of the test manifests.
pub const TEST_PCR_DIGEST: [u8; 32] = [0x77; 32];

impl TestHost {
    /// The host the test manifests pin.
    pub fn honest() -> Self {
        Self {
            key: SigningKey::from_slice(&[0x42; 32]).unwrap(),
            pcr_digest: TEST_PCR_DIGEST,
        }
    }

    /// The manifest's pins of this host: its AK, sha256 PCRs 0 and 7, its digest.
    pub fn attestation(&self) -> HostAttestation {
        let point = self.key.verifying_key().to_encoded_point(false);
        HostAttestation {
            ak: <[u8; HOST_AK_LEN]>::try_from(point.as_bytes()).unwrap(),
            pcr_bank: PcrBank::Sha256,
            pcrs: vec![0, 7],
            pcr_digest: TEST_PCR_DIGEST,
        }
    }

    /// A quote over sha256 PCRs 0 and 7 with `qualifying` as its nonce, signed by this AK.
    pub fn quote(&self, qualifying: &[u8; 32], path: Vec<merkle::PathStep>) -> HostQuote {
        let attest = QuoteAttest {
            signer_name: vec![0, 0x0b, 1, 2, 3],
            extra_data: qualifying.to_vec(),
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
            pcr_digest: self.pcr_digest.to_vec(),
        }
        .to_bytes()
        .unwrap();
        let signature: Signature = self.key.sign(&attest);
        HostQuote {
            attest,
            signature: signature.to_bytes().into(),
            path,
        }
    }

    /// The quote an honest coordinator answers a lone request's `nonce` with.
    pub fn quote_for(&self, nonce: &[u8; NONCE_LEN]) -> HostQuote {
        self.quote(&merkle::leaf(nonce), Vec::new())
    }
}
