//! Asking the coordinator through a guest's broker block device, in a worker: the worker runs the
//! broker client (and, in an SNP guest, asks `/dev/sev-guest` for reports) and reports each
//! holder's answer as it comes; the agent reads them with a deadline.

use std::ffi::OsString;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyshard_core::dealer::HolderSlot;
use keyshard_core::manifest::HostAttestation;
use keyshard_core::quorum::Candidate;
use keyshard_core::{HolderClass, HolderId};

use super::wire::Record;
use super::{RecordWriter, WorkerError, WorkerLauncher, option_arg};
use crate::broker::BrokerClient;
use crate::broker::mailbox::MailboxSpec;
use crate::broker::shares::{self, ShareFetcher};
use crate::snp::{ReportSource, SevGuestFirmware};

/// How often the agent's side looks whether it is still wanted while the worker is silent.
const CANCEL_CHECK: Duration = Duration::from_millis(100);
/// How long after the deadline the worker's own timeout report is waited for (the agent waits
/// a little longer still).
const REPORT_GRACE: Duration = Duration::from_millis(150);

/// One holder to ask for, as the worker's `--holder INDEX:CLASS:ID` argument says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderArg {
    pub index: u16,
    pub holder: HolderSlot,
}

impl std::fmt::Display for HolderArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.index, self.holder.class, self.holder.id)
    }
}

impl FromStr for HolderArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.splitn(3, ':');
        let (Some(index), Some(class), Some(id)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("{text:?}: expected INDEX:CLASS:ID"));
        };
        Ok(Self {
            index: index
                .parse()
                .map_err(|_| format!("{text:?}: bad index {index:?}"))?,
            holder: HolderSlot {
                class: HolderClass::from_str(class).map_err(|e| format!("{text:?}: {e}"))?,
                id: HolderId::new(id).map_err(|e| format!("{text:?}: {e}"))?,
            },
        })
    }
}

/// The broker mailbox as a guest block device, asked through a worker.
#[derive(Debug, Clone)]
pub struct WorkerBroker {
    pub launcher: WorkerLauncher,
    pub path: PathBuf,
    pub serial: Option<String>,
    pub sysfs_root: PathBuf,
    /// Whether the worker asks `/dev/sev-guest` for SNP reports.
    pub snp: bool,
}

impl WorkerBroker {
    fn args(
        &self,
        holders: &[(usize, HolderSlot)],
        host: Option<&HostAttestation>,
        deadline: Instant,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["broker".into(), option_arg("path", &self.path)];
        if let Some(serial) = &self.serial {
            args.push(option_arg("serial", serial));
        }
        args.push(option_arg("sysfs-root", &self.sysfs_root));
        let millis = deadline
            .saturating_duration_since(Instant::now())
            .as_millis();
        args.push(option_arg("timeout-ms", millis.to_string()));
        if self.snp {
            args.push("--snp".into());
        }
        if let Some(host) = host {
            args.push(option_arg("host-attestation", host.to_string()));
        }
        for (index, holder) in holders {
            if let Ok(index) = u16::try_from(*index) {
                let arg = HolderArg {
                    index,
                    holder: holder.clone(),
                };
                args.push(option_arg("holder", arg.to_string()));
            }
        }
        args
    }
}

impl ShareFetcher for WorkerBroker {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn has_snp(&self) -> bool {
        self.snp
    }

    fn fetch_all(
        self: Box<Self>,
        holders: Vec<(usize, HolderSlot)>,
        host: Option<HostAttestation>,
        deadline: Instant,
        cancel: Arc<AtomicBool>,
        deliver: &mut dyn FnMut(usize, Candidate) -> bool,
    ) {
        let location = self.location();
        let mut unanswered: Vec<(usize, HolderSlot)> = holders.clone();
        // Every holder not answered yet gets `why`.
        let fail_rest =
            |unanswered: &mut Vec<(usize, HolderSlot)>,
             why: String,
             deliver: &mut dyn FnMut(usize, Candidate) -> bool| {
                for (index, holder) in unanswered.drain(..) {
                    if !deliver(
                        index,
                        Candidate::unavailable(holder.id.to_string(), why.clone()),
                    ) {
                        return;
                    }
                }
            };
        // The worker asks the coordinator for the next holder only once told to: the agent says
        // so after each answer, unless that answer met the quorum (then nobody is asked for a
        // share that would not be used).
        let mut worker =
            match self
                .launcher
                .spawn_with_go_ahead(&self.args(&holders, host.as_ref(), deadline))
            {
                Ok(worker) => worker,
                Err(e) => return fail_rest(&mut unanswered, e.to_string(), deliver),
            };
        let give_up = deadline + REPORT_GRACE;
        while !unanswered.is_empty() && !cancel.load(Ordering::Relaxed) {
            let wake = give_up.min(Instant::now() + CANCEL_CHECK);
            let (index, answer) = match worker.next_record(wake) {
                Ok(Some(Record::Share { index, fragment })) => (index, Ok(fragment)),
                Ok(Some(Record::ShareFailed { index, reason })) => (index, Err(reason)),
                Ok(Some(Record::Failed(why))) => {
                    return fail_rest(&mut unanswered, why, deliver);
                }
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return fail_rest(&mut unanswered, WorkerError::Ended.to_string(), deliver);
                }
                // The agent names holders that never answered at its own deadline.
                Err(WorkerError::Timeout(_)) if Instant::now() < give_up => continue,
                Err(WorkerError::Timeout(_)) => return,
                Err(e) => return fail_rest(&mut unanswered, e.to_string(), deliver),
            };
            // Only a holder that was asked and has not answered yet; anything else is ignored.
            let Some(at) = unanswered
                .iter()
                .position(|(i, _)| *i == usize::from(index))
            else {
                continue;
            };
            let (index, holder) = unanswered.remove(at);
            let candidate = match answer {
                Ok(fragment) => Candidate::new(
                    format!("{} (broker {location})", holder.id),
                    fragment.to_vec(),
                ),
                Err(reason) => Candidate::unavailable(holder.id.to_string(), reason),
            };
            if !deliver(index, candidate) {
                return;
            }
            // A worker that cannot be told has ended: what it wrote before is still read.
            if !unanswered.is_empty() {
                worker.go_ahead();
            }
        }
    }
}

/// The worker's side: asks for each holder through the mailbox device at `path` and reports
/// each answer.
pub fn run(
    mailbox: MailboxSpec,
    sysfs_root: &std::path::Path,
    holders: &[HolderArg],
    snp: bool,
    host: Option<&HostAttestation>,
    deadline: Instant,
    out: &mut RecordWriter<impl std::io::Write>,
) {
    let location = mailbox.location();
    let mut go_aheads = std::io::stdin().lock();
    let mut client = BrokerClient::new(mailbox.into_mailbox(sysfs_root));
    let reports = snp.then(|| Box::new(SevGuestFirmware) as Box<dyn ReportSource>);
    let holders: Vec<(usize, HolderSlot)> = holders
        .iter()
        .map(|h| (usize::from(h.index), h.holder.clone()))
        .collect();
    shares::fetch_all(
        &mut client,
        &holders,
        reports,
        host,
        deadline,
        |index, candidate| {
            let index = u16::try_from(index).unwrap_or(u16::MAX);
            let record = match candidate.content {
                Ok(fragment) => Record::Share { index, fragment },
                Err(reason) => Record::ShareFailed { index, reason },
            };
            log::debug!("{location}: {record:?}");
            out.emit(&record) && super::wait_for_go_ahead(&mut go_aheads)
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(index: usize, class: HolderClass, id: &str) -> (usize, HolderSlot) {
        let id = HolderId::new(id).unwrap();
        (index, HolderSlot { class, id })
    }

    /// A broker whose worker is a shell script.
    fn scripted(script: &str) -> (Box<WorkerBroker>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("worker.sh");
        std::fs::write(&program, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let broker = WorkerBroker {
            launcher: WorkerLauncher::new(&program),
            path: "/dev/vdd".into(),
            serial: Some("ksb-vm1".into()),
            sysfs_root: "/sys".into(),
            snp: false,
        };
        (Box::new(broker), dir)
    }

    fn fetch(broker: Box<WorkerBroker>, timeout: Duration) -> (Vec<(usize, Candidate)>, Duration) {
        let started = Instant::now();
        let mut got = Vec::new();
        broker.fetch_all(
            vec![
                holder(2, HolderClass::Tpm, "tpm-1"),
                holder(3, HolderClass::Sev, "sev-1"),
            ],
            None,
            started + timeout,
            Arc::new(AtomicBool::new(false)),
            &mut |index, candidate| {
                got.push((index, candidate));
                true
            },
        );
        (got, started.elapsed())
    }

    #[test]
    fn a_worker_stuck_on_the_device_costs_the_deadline_and_no_more() {
        let (broker, _dir) = scripted("exec sleep 600");
        let (got, took) = fetch(broker, Duration::from_millis(500));
        // Nothing delivered: the agent names the holders at its own deadline.
        assert!(got.is_empty(), "{got:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn answers_are_named_after_their_holders_and_unknown_indices_ignored() {
        // A share for holder 2, a refusal for holder 3, and one for an index never asked for.
        let (broker, _dir) = scripted(
            r"printf '\004\005\000\000\000\002\000abc'
printf '\005\013\000\000\000\011\000bad index'
printf '\005\012\000\000\000\003\000refused!'",
        );
        let (got, _) = fetch(broker, Duration::from_secs(5));
        let summary: Vec<(usize, String, Result<Vec<u8>, String>)> = got
            .into_iter()
            .map(|(i, c)| (i, c.source, c.content.map(|b| b.to_vec())))
            .collect();
        assert_eq!(
            summary,
            [
                (2, "tpm-1 (broker /dev/vdd)".to_owned(), Ok(b"abc".to_vec())),
                (3, "sev-1".to_owned(), Err("refused!".to_owned())),
            ]
        );
    }

    #[test]
    fn a_worker_that_dies_fails_every_holder_with_the_reason() {
        let (broker, _dir) = scripted("exit 3");
        let (got, _) = fetch(broker, Duration::from_secs(5));
        let reasons: Vec<_> = got
            .iter()
            .map(|(_, c)| c.content.clone().unwrap_err())
            .collect();
        assert_eq!(reasons, ["the worker ended without reporting"; 2]);
    }

    #[test]
    fn holder_arguments_round_trip_and_bad_ones_are_refused() {
        let arg = HolderArg {
            index: 4,
            holder: HolderSlot {
                class: HolderClass::Tpm,
                id: HolderId::new("tpm-1").unwrap(),
            },
        };
        assert_eq!(arg.to_string(), "4:tpm:tpm-1");
        assert_eq!("4:tpm:tpm-1".parse::<HolderArg>().unwrap(), arg);
        for bad in ["", "4", "4:tpm", "x:tpm:tpm-1", "4:usb:u-1", "4:tpm:TPM 1"] {
            assert!(bad.parse::<HolderArg>().is_err(), "{bad:?}");
        }
    }
}
