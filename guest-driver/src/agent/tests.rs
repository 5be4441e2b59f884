use super::*;
use crate::broker::mailbox::{self, Mailbox};
use crate::broker::shares::InProcessFetcher;
use crate::cli::CliError;
use crate::snp::ReportSource;
use crate::source::{SourceError, VolumeRead};
use crate::testing::{
    Dealt, FakeSnp, ScriptedMailbox, deal_over, dealt_fragments, refusing, releasing, vhd_volume,
};
use crate::vhost_user::FrontendError;
use keyshard_core::broker::RefusalCode;
use keyshard_core::quorum::{QuorumError, RejectReason, Rejection};
use zeroize::Zeroizing;

/// A source that answers after `delay`, whatever the deadline (a hung device when long):
/// with a volume and serial, or with a timeout error when `answer` is `None`.
struct ScriptedSource {
    location: String,
    known_serial: Option<String>,
    delay: Duration,
    answer: Option<(String, Vec<u8>)>,
}

impl VolumeSource for ScriptedSource {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn known_serial(&self) -> Option<String> {
        self.known_serial.clone()
    }

    fn read_volume(&self, _deadline: Instant) -> crate::source::Result<VolumeRead> {
        std::thread::sleep(self.delay);
        match &self.answer {
            Some((serial, volume)) => Ok(VolumeRead {
                serial: Some(serial.clone()),
                volume: Zeroizing::new(volume.clone()),
            }),
            None => Err(SourceError::Frontend(FrontendError::Timeout {
                request: "a read",
            })),
        }
    }
}

/// The device of holder `vhd-<index + 1>`, over a socket.
fn serving(dealt: &Dealt, index: usize, delay: Duration) -> Box<dyn VolumeSource> {
    Box::new(ScriptedSource {
        location: format!("socket /run/vhd-{}.sock", index + 1),
        known_serial: None,
        delay,
        answer: Some((format!("ksf-vhd-{}", index + 1), vhd_volume(dealt, index))),
    })
}

fn failing(location: &str, known_serial: Option<&str>) -> Box<dyn VolumeSource> {
    Box::new(ScriptedSource {
        location: location.into(),
        known_serial: known_serial.map(str::to_owned),
        delay: Duration::ZERO,
        answer: None,
    })
}

fn unavailable(rejected: &[Rejection]) -> Vec<(String, String)> {
    rejected
        .iter()
        .filter_map(|r| match &r.reason {
            RejectReason::Unavailable(why) => Some((r.source.clone(), why.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn rebuilds_from_k_sources_and_names_the_missing_holder() {
    let dealt = dealt_fragments(3);
    let sources = vec![
        serving(&dealt, 0, Duration::ZERO),
        serving(&dealt, 2, Duration::ZERO),
    ];
    let outcome = unlock(&dealt.manifest, sources, Duration::from_secs(5)).unwrap();
    assert_eq!(&outcome.secret[..], dealt.secret.as_slice());
    let used: Vec<_> = outcome.used.iter().map(|u| u.source.as_str()).collect();
    assert_eq!(
        used,
        [
            "ksf-vhd-1 (socket /run/vhd-1.sock)",
            "ksf-vhd-3 (socket /run/vhd-3.sock)"
        ]
    );
    assert_eq!(
        unavailable(&outcome.rejected),
        [("vhd-2".into(), "no device with serial ksf-vhd-2".into())]
    );
}

#[test]
fn too_few_sources_is_not_met_with_every_missing_holder_named() {
    let dealt = dealt_fragments(3);
    let sources = vec![
        serving(&dealt, 1, Duration::ZERO),
        failing("/dev/vdd", Some("ksf-vhd-3")),
    ];
    let error = unlock(&dealt.manifest, sources, Duration::from_secs(5)).unwrap_err();
    let QuorumError::NotMet {
        valid,
        needed,
        rejected,
    } = error
    else {
        panic!("{error:?}");
    };
    assert_eq!((valid, needed), (1, Some(2)));
    assert_eq!(
        unavailable(&rejected),
        [
            (
                "ksf-vhd-3 (/dev/vdd)".into(),
                "a read did not complete before the deadline (the device is still connected)"
                    .into()
            ),
            // vhd-3 has a device, which failed: it is not also called absent.
            ("vhd-1".into(), "no device with serial ksf-vhd-1".into()),
        ]
    );
}

#[test]
fn a_hung_source_is_reported_unavailable_at_the_deadline() {
    let dealt = dealt_fragments(3);
    let sources = vec![
        serving(&dealt, 0, Duration::ZERO),
        serving(&dealt, 1, Duration::from_secs(30)),
        serving(&dealt, 2, Duration::from_millis(50)),
    ];
    let start = Instant::now();
    let reports = read_sources(sources, Duration::from_millis(400));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2400),
        "{took:?}"
    );
    let outcomes: Vec<_> = reports
        .iter()
        .map(|r| (r.name(), r.fragments.as_ref().err().cloned()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("ksf-vhd-1 (socket /run/vhd-1.sock)".into(), None),
            (
                "socket /run/vhd-2.sock".into(),
                Some("no answer within 0.4 s".into())
            ),
            ("ksf-vhd-3 (socket /run/vhd-3.sock)".into(), None),
        ]
    );
    // And the two that answered still rebuild the key.
    let outcome = quorum::rebuild(
        &dealt.manifest.quorum_request(),
        &candidates(&reports, &dealt.manifest),
    )
    .unwrap();
    assert_eq!(&outcome.secret[..], dealt.secret.as_slice());
}

#[test]
fn with_no_sources_every_vhd_holder_is_missing() {
    let dealt = dealt_fragments(3);
    let start = Instant::now();
    let error = unlock(&dealt.manifest, Vec::new(), Duration::from_secs(5)).unwrap_err();
    // Far below the 5 s deadline: with nothing to wait for, the agent does not wait.
    assert!(start.elapsed() < Duration::from_secs(3));
    let QuorumError::NotMet { rejected, .. } = error else {
        panic!("{error:?}");
    };
    let missing: Vec<_> = unavailable(&rejected).into_iter().map(|(s, _)| s).collect();
    assert_eq!(missing, ["vhd-1", "vhd-2", "vhd-3"]);
}

/// Issue 9 item 8: a manifest with `host` holders (placed on shard hosts by `init --cms`)
/// reported a quorum not met without naming them.
#[test]
fn item8_host_holders_are_named_when_the_quorum_is_not_met() {
    let dealt = deal_over(
        HolderSlot::numbered(HolderClass::Vhd, 1)
            .chain(HolderSlot::numbered(HolderClass::Host, 2))
            .collect(),
        3,
    );
    let error = unlock(
        &dealt.manifest,
        vec![serving(&dealt, 0, Duration::ZERO)],
        Duration::from_secs(5),
    )
    .unwrap_err();
    let QuorumError::NotMet { rejected, .. } = error else {
        panic!("{error:?}");
    };
    let missing = unavailable(&rejected);
    let names: Vec<&str> = missing.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, ["host-1", "host-2"]);
    // They are the broker's to ask (the relay): without one, each says so.
    assert!(
        missing.iter().all(|(_, why)| why.contains("broker")),
        "{missing:?}"
    );
}

#[test]
fn timeouts_read_as_given() {
    assert_eq!(describe_timeout(Duration::from_secs(10)), "10 s");
    assert_eq!(describe_timeout(Duration::from_millis(2500)), "2.5 s");
}

/// vhd-1 .. vhd-<vhd>, then tpm-1 .. tpm-<tpm>, then sev-1 .. sev-<sev>, k of them needed.
fn mixed(vhd: u8, tpm: u8, sev: u8, k: u8) -> Dealt {
    deal_over(
        HolderSlot::numbered(HolderClass::Vhd, vhd)
            .chain(HolderSlot::numbered(HolderClass::Tpm, tpm))
            .chain(HolderSlot::numbered(HolderClass::Sev, sev))
            .collect(),
        k,
    )
}

fn inputs(
    sources: Vec<Box<dyn VolumeSource>>,
    broker: Option<Box<dyn Mailbox>>,
    snp: Option<Box<dyn ReportSource>>,
) -> Inputs {
    Inputs {
        sources,
        broker: broker
            .map(|mailbox| Box::new(InProcessFetcher::new(mailbox, snp)) as Box<dyn ShareFetcher>),
        discovery: None,
    }
}

fn report_lines(error: QuorumError) -> Vec<String> {
    CliError::Quorum(error).report()
}

#[test]
fn two_fragment_devices_and_the_brokered_tpm_share_rebuild_a_k3_key() {
    let dealt = mixed(2, 1, 0, 3);
    let broker = ScriptedMailbox::new(releasing(&dealt, Duration::from_millis(30)));
    let outcome = unlock_with(
        &dealt.manifest,
        inputs(
            vec![
                serving(&dealt, 0, Duration::ZERO),
                serving(&dealt, 1, Duration::from_millis(10)),
            ],
            Some(Box::new(broker)),
            None,
        ),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(&outcome.secret[..], dealt.secret.as_slice());
    let used: Vec<_> = outcome.used.iter().map(|u| u.source.as_str()).collect();
    assert_eq!(
        used,
        [
            "ksf-vhd-1 (socket /run/vhd-1.sock)",
            "ksf-vhd-2 (socket /run/vhd-2.sock)",
            "tpm-1 (broker scripted)"
        ]
    );
    assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
}

#[test]
fn the_agent_stops_waiting_as_soon_as_k_shares_are_in() {
    let dealt = mixed(2, 1, 0, 2);
    let broker = ScriptedMailbox::new(releasing(&dealt, Duration::from_millis(20)));
    let start = Instant::now();
    let outcome = unlock_with(
        &dealt.manifest,
        inputs(
            vec![
                serving(&dealt, 0, Duration::ZERO),
                // A device that would answer only long after the quorum is met.
                serving(&dealt, 1, Duration::from_secs(30)),
            ],
            Some(Box::new(broker)),
            None,
        ),
        Duration::from_secs(10),
    )
    .unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(&outcome.secret[..], dealt.secret.as_slice());
    let used: Vec<_> = outcome.used.iter().map(|u| u.source.as_str()).collect();
    assert_eq!(
        used,
        [
            "ksf-vhd-1 (socket /run/vhd-1.sock)",
            "tpm-1 (broker scripted)"
        ]
    );
}

#[test]
fn the_broker_is_not_waited_for_when_the_devices_already_make_k() {
    let dealt = mixed(2, 1, 0, 2);
    // The coordinator would take an hour.
    let broker = ScriptedMailbox::new(releasing(&dealt, Duration::from_secs(3600)));
    let requests = broker.requests.clone();
    let start = Instant::now();
    let outcome = unlock_with(
        &dealt.manifest,
        inputs(
            vec![
                serving(&dealt, 0, Duration::from_millis(100)),
                serving(&dealt, 1, Duration::from_millis(100)),
            ],
            Some(Box::new(broker)),
            None,
        ),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(start.elapsed() < Duration::from_secs(2));
    let used: Vec<_> = outcome.used.iter().map(|u| u.source.as_str()).collect();
    assert_eq!(
        used,
        [
            "ksf-vhd-1 (socket /run/vhd-1.sock)",
            "ksf-vhd-2 (socket /run/vhd-2.sock)"
        ]
    );
    // The coordinator was asked at once, alongside the devices, just not waited for.
    assert_eq!(requests.lock().unwrap().len(), 1);
}

#[test]
fn a_broker_that_stays_pending_is_named_at_the_deadline() {
    let dealt = mixed(2, 1, 0, 3);
    let broker = ScriptedMailbox::new(releasing(&dealt, Duration::from_secs(3600)));
    let start = Instant::now();
    let error = unlock_with(
        &dealt.manifest,
        inputs(
            vec![
                serving(&dealt, 0, Duration::ZERO),
                serving(&dealt, 1, Duration::ZERO),
            ],
            Some(Box::new(broker)),
            None,
        ),
        Duration::from_millis(400),
    )
    .unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2400),
        "{took:?}"
    );
    let lines = report_lines(error);
    assert_eq!(
        lines,
        [
            "missing tpm-1: no final answer from the coordinator before the deadline \
             (still pending)",
            "unused ksf-vhd-1 (socket /run/vhd-1.sock): epoch 1 has only 2 valid of the 3 shares \
             it needs",
            "unused ksf-vhd-2 (socket /run/vhd-2.sock): epoch 1 has only 2 valid of the 3 shares \
             it needs",
            "quorum not met: 2 valid fragment(s) of one epoch, 3 needed",
        ]
    );
}

/// A broker device that never completes a read: a dead device in a guest.
struct HungMailbox;

impl Mailbox for HungMailbox {
    fn location(&self) -> String {
        "/dev/vdd".into()
    }

    fn write_request(&mut self, _request: &[u8], _deadline: Instant) -> mailbox::Result<()> {
        Ok(())
    }

    fn read_answer(
        &mut self,
        _len: usize,
        _deadline: Instant,
    ) -> mailbox::Result<Zeroizing<Vec<u8>>> {
        std::thread::sleep(Duration::from_secs(30));
        Ok(Zeroizing::new(Vec::new()))
    }
}

#[test]
fn a_hung_broker_device_never_holds_the_boot_past_the_deadline() {
    let dealt = mixed(1, 1, 0, 2);
    let start = Instant::now();
    let error = unlock_with(
        &dealt.manifest,
        inputs(
            vec![serving(&dealt, 0, Duration::ZERO)],
            Some(Box::new(HungMailbox)),
            None,
        ),
        Duration::from_millis(300),
    )
    .unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(2300), "{took:?}");
    assert_eq!(
        report_lines(error)[0],
        "missing tpm-1: no answer from the coordinator within 0.3 s"
    );
}

#[test]
fn a_refusal_names_the_holder_and_the_coordinators_reason() {
    let dealt = mixed(2, 1, 0, 3);
    let broker = ScriptedMailbox::new(refusing(
        RefusalCode::HostAttestation,
        "PCR 7 differs from its golden value",
    ));
    let error = unlock_with(
        &dealt.manifest,
        inputs(
            vec![
                serving(&dealt, 0, Duration::ZERO),
                serving(&dealt, 1, Duration::ZERO),
            ],
            Some(Box::new(broker)),
            None,
        ),
        Duration::from_secs(5),
    )
    .unwrap_err();
    let lines = report_lines(error);
    assert_eq!(
        lines[0],
        "missing tpm-1: refused by the coordinator: PCR 7 differs from its golden value"
    );
    assert_eq!(
        lines.last().unwrap(),
        "quorum not met: 2 valid fragment(s) of one epoch, 3 needed"
    );
}

#[test]
fn sev_shares_need_snp_reports() {
    let dealt = mixed(1, 0, 1, 2);
    let sources = |dealt: &Dealt| vec![serving(dealt, 0, Duration::ZERO)];

    // Not an SNP guest: the coordinator is not even asked.
    let broker = ScriptedMailbox::new(releasing(&dealt, Duration::ZERO));
    let requests = broker.requests.clone();
    let error = unlock_with(
        &dealt.manifest,
        inputs(sources(&dealt), Some(Box::new(broker)), None),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert_eq!(
        report_lines(error)[0],
        "missing sev-1: not an SEV-SNP guest (no /dev/sev-guest)"
    );
    assert!(requests.lock().unwrap().is_empty());

    // An SNP guest (a firmware double): the report binds the nonce and key, the share comes.
    let broker = ScriptedMailbox::new(releasing(&dealt, Duration::from_millis(10)));
    let outcome = unlock_with(
        &dealt.manifest,
        inputs(
            sources(&dealt),
            Some(Box::new(broker)),
            Some(Box::new(FakeSnp::default())),
        ),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(&outcome.secret[..], dealt.secret.as_slice());
    assert_eq!(outcome.used[1].source, "sev-1 (broker scripted)");
}

#[test]
fn without_a_broker_device_the_attested_holders_are_missing() {
    let dealt = mixed(2, 1, 1, 3);
    let error = unlock(
        &dealt.manifest,
        vec![
            serving(&dealt, 0, Duration::ZERO),
            serving(&dealt, 1, Duration::ZERO),
        ],
        Duration::from_secs(5),
    )
    .unwrap_err();
    let lines = report_lines(error);
    assert_eq!(
        lines[..2],
        [
            "missing tpm-1: no broker device (no block device serial starts with ksb-)",
            "missing sev-1: no broker device (no block device serial starts with ksb-)",
        ]
    );
    assert_eq!(lines.len(), 5, "{lines:?}");
}

/// Issue 7, item 13: the manifest pins k. A dealer-signed, newer epoch of the same key (same key
/// id, same key check value) at a lower k must not be combined: a host that re-dealt the key
/// 2-of-n behind the guest's back would otherwise need only two host-visible shares.
#[test]
fn item_13_a_signed_epoch_of_the_same_key_at_a_lower_k_is_refused() {
    use keyshard_core::dealer::{self, DealPlan};
    use keyshard_core::volume;

    let dealt = mixed(3, 0, 0, 3);
    // The same dealer key is not at hand in `Dealt`; deal both epochs here with one key.
    let dealer_key = keyshard_core::keys::generate().unwrap();
    let mut manifest = dealt.manifest.clone();
    manifest.dealer = dealer_key.verifying_key();
    let deal = |epoch: u64, k: u8| -> Vec<Vec<u8>> {
        let plan = DealPlan {
            key_id: manifest.key_id.clone(),
            epoch,
            k,
            holders: manifest.holders.clone(),
        };
        dealer::deal(&dealt.secret, &plan, &dealer_key)
            .unwrap()
            .iter()
            .map(|f| f.encoded().to_vec())
            .collect()
    };
    let pinned = deal(1, 3);
    let lowered = deal(2, 2);
    let source = |index: usize, fragment: &[u8]| -> Box<dyn VolumeSource> {
        Box::new(ScriptedSource {
            location: format!("/dev/vd{}", char::from(b'b' + index as u8)),
            known_serial: None,
            delay: Duration::ZERO,
            answer: Some((
                format!("ksf-vhd-{}", index + 1),
                volume::encode(&[fragment]).unwrap(),
            )),
        })
    };
    // Two devices serve the lowered epoch: with k taken from the fragments, they would do.
    let error = unlock(
        &manifest,
        vec![source(0, &lowered[0]), source(1, &lowered[1])],
        Duration::from_secs(5),
    )
    .unwrap_err();
    let QuorumError::NotMet { rejected, .. } = &error else {
        panic!("{error:?}");
    };
    assert!(
        rejected.iter().any(|r| r.reason
            == RejectReason::ThresholdMismatch {
                found: 2,
                expected: 3
            }),
        "{rejected:?}"
    );
    // The pinned epoch still opens with its three shares, the lowered ones set aside.
    let outcome = unlock(
        &manifest,
        vec![
            source(0, &lowered[0]),
            source(1, &pinned[1]),
            source(2, &pinned[2]),
            source(0, &pinned[0]),
        ],
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!((outcome.epoch, outcome.k), (1, 3));
    assert_eq!(&outcome.secret[..], dealt.secret.as_slice());
}

/// Review of issue 7: once a released share meets the quorum, no further holder is asked. The
/// broker used to go straight on to the next holder while the agent rebuilt the key: one more
/// release (an unseal, an audit line) for a share nobody used.
#[test]
fn no_holder_is_asked_once_a_released_share_meets_the_quorum() {
    let dealt = mixed(2, 2, 0, 3);
    // The devices answer first; then tpm-1's share makes k.
    let broker = ScriptedMailbox::new(releasing(&dealt, Duration::from_millis(300)));
    let requests = broker.requests.clone();
    let outcome = unlock_with(
        &dealt.manifest,
        inputs(
            (0..2).map(|i| serving(&dealt, i, Duration::ZERO)).collect(),
            Some(Box::new(broker)),
            None,
        ),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(outcome.used.len(), 3);
    // Give a broker that would go on the time to do so.
    std::thread::sleep(Duration::from_millis(300));
    let released: Vec<String> = requests
        .lock()
        .unwrap()
        .iter()
        .filter_map(|request| match &request.body {
            keyshard_core::broker::Body::Release { holder_id, .. } => Some(holder_id.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(released, ["tpm-1"]);
}
