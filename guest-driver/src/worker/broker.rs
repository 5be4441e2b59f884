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
use keyshard_core::quorum::Candidate;
use keyshard_core::{HolderClass, HolderId};

use super::wire::Record;
use super::{RecordWriter, WorkerError, WorkerLauncher};
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
    fn args(&self, holders: &[(usize, HolderSlot)], deadline: Instant) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["broker".into(), "--path".into(), (&self.path).into()];
        if let Some(serial) = &self.serial {
            args.extend(["--serial".into(), serial.into()]);
        }
        args.extend(["--sysfs-root".into(), (&self.sysfs_root).into()]);
        let millis = deadline
            .saturating_duration_since(Instant::now())
            .as_millis();
        args.extend(["--timeout-ms".into(), millis.to_string().into()]);
        if self.snp {
            args.push("--snp".into());
        }
        for (index, holder) in holders {
            if let Ok(index) = u16::try_from(*index) {
                let arg = HolderArg {
                    index,
                    holder: holder.clone(),
                };
                args.extend(["--holder".into(), arg.to_string().into()]);
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
        deadline: Instant,
        cancel: Arc<AtomicBool>,
        deliver: &mut dyn FnMut(usize, Candidate) -> bool,
    ) {
        let location = self.location();
        let fail_all = |why: String, deliver: &mut dyn FnMut(usize, Candidate) -> bool| {
            for (index, holder) in &holders {
                if !deliver(
                    *index,
                    Candidate::unavailable(holder.id.to_string(), why.clone()),
                ) {
                    return;
                }
            }
        };
        let mut worker = match self.launcher.spawn(&self.args(&holders, deadline)) {
            Ok(worker) => worker,
            Err(e) => return fail_all(e.to_string(), deliver),
        };
        let mut answered = 0;
        let give_up = deadline + REPORT_GRACE;
        while answered < holders.len() && !cancel.load(Ordering::Relaxed) {
            let wake = give_up.min(Instant::now() + CANCEL_CHECK);
            let (index, candidate) = match worker.next_record(wake) {
                Ok(Some(Record::Share { index, fragment })) => {
                    let Some((_, holder)) = holders.iter().find(|(i, _)| *i == usize::from(index))
                    else {
                        continue;
                    };
                    let name = format!("{} (broker {location})", holder.id);
                    (usize::from(index), Candidate::new(name, fragment.to_vec()))
                }
                Ok(Some(Record::ShareFailed { index, reason })) => {
                    let Some((_, holder)) = holders.iter().find(|(i, _)| *i == usize::from(index))
                    else {
                        continue;
                    };
                    let id = holder.id.to_string();
                    (usize::from(index), Candidate::unavailable(id, reason))
                }
                Ok(Some(Record::Failed(why))) => return fail_all(why, deliver),
                Ok(Some(_)) => continue,
                Ok(None) => return fail_all(WorkerError::Ended.to_string(), deliver),
                // The agent names holders that never answered at its own deadline.
                Err(WorkerError::Timeout(_)) if Instant::now() < give_up => continue,
                Err(WorkerError::Timeout(_)) => return,
                Err(e) => return fail_all(e.to_string(), deliver),
            };
            answered += 1;
            if !deliver(index, candidate) {
                return;
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
    deadline: Instant,
    out: &mut RecordWriter<impl std::io::Write>,
) {
    let location = mailbox.location();
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
        deadline,
        |index, candidate| {
            let index = u16::try_from(index).unwrap_or(u16::MAX);
            let record = match candidate.content {
                Ok(fragment) => Record::Share { index, fragment },
                Err(reason) => Record::ShareFailed { index, reason },
            };
            log::debug!("{location}: {record:?}");
            out.emit(&record)
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

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
