//! The guest agent: read every source at once, each until one shared deadline, name each holder
//! the manifest lists that no device answered for, and rebuild the secret from what arrived.
//!
//! Each source is read on its own thread. A source that has not answered by the deadline (plus
//! a short grace for its own timeout report to arrive) is reported unavailable and its thread is
//! left behind: a dead holder never delays the agent past the deadline.

use std::collections::BTreeSet;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use keyshard_core::manifest::Manifest;
use keyshard_core::quorum::{self, Candidate, QuorumOutcome};
use keyshard_core::{HolderClass, HolderId};

use crate::serial::FRAGMENT_SERIAL_PREFIX;
use crate::source::{SourceReport, VolumeSource};

/// How long the agent waits for the sources unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the deadline, how long a source's own timeout report may take to arrive.
const REPORT_GRACE: Duration = Duration::from_millis(200);

/// `10 s`, `0.5 s`: a timeout as the user gave it.
pub fn describe_timeout(timeout: Duration) -> String {
    if timeout.subsec_nanos() == 0 {
        format!("{} s", timeout.as_secs())
    } else {
        format!("{} s", timeout.as_secs_f64())
    }
}

/// Reads every source concurrently; returns one report per source, in the order given, within
/// about `timeout` whatever the sources do.
pub fn read_sources(sources: Vec<Box<dyn VolumeSource>>, timeout: Duration) -> Vec<SourceReport> {
    let deadline = Instant::now() + timeout;
    let (sender, receiver) = mpsc::channel();
    let mut reports: Vec<Option<SourceReport>> = Vec::with_capacity(sources.len());
    let mut names = Vec::with_capacity(sources.len());
    let mut pending = 0usize;
    for (index, source) in sources.into_iter().enumerate() {
        let name = (source.location(), source.known_serial());
        names.push(name.clone());
        let (location, known_serial) = name.clone();
        let sender = sender.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("source-{index}"))
            .spawn(move || {
                let read = source.read_volume(deadline);
                // The agent may have stopped listening; then the report is not wanted.
                let _ = sender.send((index, SourceReport::from_read(location, known_serial, read)));
            });
        reports.push(match spawned {
            Ok(_) => {
                pending += 1;
                None
            }
            Err(e) => Some(SourceReport::unavailable(
                name.0,
                name.1,
                format!("cannot start a reader thread: {e}"),
            )),
        });
    }
    drop(sender);
    let give_up = deadline + REPORT_GRACE;
    while pending > 0 {
        match receiver.recv_timeout(give_up.saturating_duration_since(Instant::now())) {
            Ok((index, report)) => {
                log::debug!("{}: answered", report.name());
                if let Some(slot) = reports.get_mut(index) {
                    *slot = Some(report);
                }
                pending -= 1;
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    reports
        .into_iter()
        .zip(names)
        .map(|(report, (location, serial))| {
            report.unwrap_or_else(|| {
                SourceReport::unavailable(
                    location,
                    serial,
                    format!("no answer within {}", describe_timeout(timeout)),
                )
            })
        })
        .collect()
}

/// The quorum candidates: every fragment read, every source that failed, and one unavailable
/// candidate per `vhd` holder of the manifest that no source answered for.
pub fn candidates(reports: &[SourceReport], manifest: &Manifest) -> Vec<Candidate> {
    let mut candidates: Vec<Candidate> =
        reports.iter().flat_map(SourceReport::candidates).collect();
    let seen: BTreeSet<HolderId> = reports.iter().flat_map(SourceReport::holder_ids).collect();
    candidates.extend(
        manifest
            .holders_missing(&seen)
            .filter(|holder| holder.class == HolderClass::Vhd)
            .map(|holder| {
                Candidate::unavailable(
                    holder.id.to_string(),
                    format!(
                        "no device with serial {FRAGMENT_SERIAL_PREFIX}{}",
                        holder.id
                    ),
                )
            }),
    );
    candidates
}

/// Reads `sources` and rebuilds the manifest's secret.
pub fn unlock(
    manifest: &Manifest,
    sources: Vec<Box<dyn VolumeSource>>,
    timeout: Duration,
) -> quorum::Result<QuorumOutcome> {
    let reports = read_sources(sources, timeout);
    for report in &reports {
        if let Err(why) = &report.fragments {
            log::info!("{}: {why}", report.name());
        }
    }
    quorum::rebuild(&manifest.quorum_request(), &candidates(&reports, manifest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{SourceError, VolumeRead};
    use crate::testing::{Dealt, dealt_fragments, vhd_volume};
    use crate::vhost_user::FrontendError;
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

    #[test]
    fn timeouts_read_as_given() {
        assert_eq!(describe_timeout(Duration::from_secs(10)), "10 s");
        assert_eq!(describe_timeout(Duration::from_millis(2500)), "2.5 s");
    }
}
