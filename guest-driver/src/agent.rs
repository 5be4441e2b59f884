//! The guest agent: read every fragment source and ask the broker for every `tpm` and `sev`
//! holder at once, each until one shared deadline, and rebuild the secret as soon as k valid
//! shares of one epoch are in hand; with fewer, name each holder that failed and why.
//!
//! Each source is read on its own thread, and the broker's holders are asked one after another
//! on one more (the mailbox takes one request at a time). After every share that arrives the
//! quorum is tried; once it is met, the threads still working are left behind (the broker's is
//! told to stop). A source or holder that has not answered by the deadline (plus a short grace
//! for its own timeout report to arrive) is reported unavailable: a dead holder never delays the
//! agent past the deadline.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use keyshard_core::dealer::HolderSlot;
use keyshard_core::manifest::Manifest;
use keyshard_core::quorum::{self, Candidate, QuorumOutcome};
use keyshard_core::{HolderClass, HolderId};

use crate::broker::BrokerClient;
use crate::broker::mailbox::Mailbox;
use crate::broker::shares;
use crate::serial::{BROKER_SERIAL_PREFIX, FRAGMENT_SERIAL_PREFIX};
use crate::snp::{ReportSource, SnpError};
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

/// Everything the agent may get shares from.
pub struct Inputs {
    /// Fragment devices.
    pub sources: Vec<Box<dyn VolumeSource>>,
    /// The broker mailbox, when there is one.
    pub broker: Option<Box<dyn Mailbox>>,
    /// Where SNP reports come from; `None` when this is not an SEV-SNP guest.
    pub snp: Option<Box<dyn ReportSource>>,
}

impl Inputs {
    /// Fragment devices only: no broker, no SNP.
    pub fn fragments_only(sources: Vec<Box<dyn VolumeSource>>) -> Self {
        Self {
            sources,
            broker: None,
            snp: None,
        }
    }
}

/// What reaches the agent from its threads.
enum Arrival {
    /// Fragment source `index` was read (or failed).
    Source(usize, SourceReport),
    /// Brokered holder `index` answered.
    Share(usize, Candidate),
}

/// The fragment sources: their reports as they arrive.
struct SourceSlots {
    reports: Vec<Option<SourceReport>>,
    /// Location and known serial of each, to name one that never answered.
    names: Vec<(String, Option<String>)>,
    pending: usize,
}

impl SourceSlots {
    /// Starts one reader thread per source.
    fn start(
        sources: Vec<Box<dyn VolumeSource>>,
        deadline: Instant,
        sender: &Sender<Arrival>,
    ) -> Self {
        let mut slots = Self {
            reports: Vec::with_capacity(sources.len()),
            names: Vec::with_capacity(sources.len()),
            pending: 0,
        };
        for (index, source) in sources.into_iter().enumerate() {
            let (location, known_serial) = (source.location(), source.known_serial());
            slots.names.push((location.clone(), known_serial.clone()));
            let sender = sender.clone();
            let (thread_location, thread_serial) = (location.clone(), known_serial.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("source-{index}"))
                .spawn(move || {
                    let read = source.read_volume(deadline);
                    let report = SourceReport::from_read(thread_location, thread_serial, read);
                    // The agent may have stopped listening; then the report is not wanted.
                    let _ = sender.send(Arrival::Source(index, report));
                });
            slots.reports.push(match spawned {
                Ok(_) => {
                    slots.pending += 1;
                    None
                }
                Err(e) => Some(SourceReport::unavailable(
                    location,
                    known_serial,
                    format!("cannot start a reader thread: {e}"),
                )),
            });
        }
        slots
    }

    fn fill(&mut self, index: usize, report: SourceReport) {
        if let Some(slot @ None) = self.reports.get_mut(index) {
            log::debug!("{}: answered", report.name());
            *slot = Some(report);
            self.pending = self.pending.saturating_sub(1);
        }
    }

    fn received(&self) -> impl Iterator<Item = &SourceReport> {
        self.reports.iter().flatten()
    }

    /// Every report, a source that never answered reported unavailable.
    fn finish(self, timeout: Duration) -> Vec<SourceReport> {
        self.reports
            .into_iter()
            .zip(self.names)
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
}

/// The `tpm` and `sev` holders of the manifest: the coordinator's answers as they arrive.
struct ShareSlots {
    holders: Vec<HolderSlot>,
    answers: Vec<Option<Candidate>>,
    pending: usize,
}

impl ShareSlots {
    /// Answers at once what needs no broker (no SNP, no broker device) and starts the broker
    /// thread for the rest.
    fn start(
        manifest: &Manifest,
        broker: Option<Box<dyn Mailbox>>,
        snp: Option<Box<dyn ReportSource>>,
        deadline: Instant,
        sender: &Sender<Arrival>,
        cancel: &Arc<AtomicBool>,
    ) -> Self {
        let holders: Vec<HolderSlot> = manifest
            .holders
            .iter()
            .filter(|h| shares::is_brokered(h.class))
            .cloned()
            .collect();
        let mut answers: Vec<Option<Candidate>> = holders
            .iter()
            .map(|h| {
                (h.class == HolderClass::Sev && snp.is_none()).then(|| {
                    Candidate::unavailable(h.id.to_string(), SnpError::NoDevice.to_string())
                })
            })
            .collect();
        let to_ask: Vec<(usize, HolderSlot)> = holders
            .iter()
            .cloned()
            .enumerate()
            .filter(|(i, _)| answers.get(*i).is_some_and(Option::is_none))
            .collect();
        let asked = match broker {
            _ if to_ask.is_empty() => Ok(()),
            None => Err(format!(
                "no broker device (no block device serial starts with {BROKER_SERIAL_PREFIX})"
            )),
            Some(mailbox) => {
                let client = BrokerClient::new(mailbox).with_cancel(cancel.clone());
                spawn_broker(client, to_ask.clone(), snp, deadline, sender.clone())
            }
        };
        let pending = match asked {
            Ok(()) => to_ask.len(),
            Err(why) => {
                for (index, holder) in &to_ask {
                    if let Some(slot) = answers.get_mut(*index) {
                        *slot = Some(Candidate::unavailable(holder.id.to_string(), why.clone()));
                    }
                }
                0
            }
        };
        Self {
            holders,
            answers,
            pending,
        }
    }

    fn fill(&mut self, index: usize, candidate: Candidate) {
        if let Some(slot @ None) = self.answers.get_mut(index) {
            *slot = Some(candidate);
            self.pending = self.pending.saturating_sub(1);
        }
    }

    fn received(&self) -> impl Iterator<Item = &Candidate> {
        self.answers.iter().flatten()
    }

    /// Every holder's candidate, one that never answered reported unavailable.
    fn finish(self, timeout: Duration) -> Vec<Candidate> {
        self.answers
            .into_iter()
            .zip(self.holders)
            .map(|(answer, holder)| {
                answer.unwrap_or_else(|| {
                    Candidate::unavailable(
                        holder.id.to_string(),
                        format!(
                            "no answer from the coordinator within {}",
                            describe_timeout(timeout)
                        ),
                    )
                })
            })
            .collect()
    }
}

/// Starts the thread that asks the coordinator for each of `holders` in turn.
fn spawn_broker(
    mut client: BrokerClient,
    holders: Vec<(usize, HolderSlot)>,
    snp: Option<Box<dyn ReportSource>>,
    deadline: Instant,
    sender: Sender<Arrival>,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            shares::fetch_all(&mut client, &holders, snp, deadline, |index, candidate| {
                // False once the agent has stopped listening.
                sender.send(Arrival::Share(index, candidate)).is_ok()
            });
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the broker thread: {e}"))
}

/// Waits for the next arrival until `give_up`; `None` at `give_up`, or when no thread is left.
fn next(receiver: &Receiver<Arrival>, give_up: Instant) -> Option<Arrival> {
    receiver
        .recv_timeout(give_up.saturating_duration_since(Instant::now()))
        .ok()
}

/// Reads every source concurrently; returns one report per source, in the order given, within
/// about `timeout` whatever the sources do.
pub fn read_sources(sources: Vec<Box<dyn VolumeSource>>, timeout: Duration) -> Vec<SourceReport> {
    let deadline = Instant::now() + timeout;
    let (sender, receiver) = mpsc::channel();
    let mut slots = SourceSlots::start(sources, deadline, &sender);
    drop(sender);
    let give_up = deadline + REPORT_GRACE;
    while slots.pending > 0 {
        match next(&receiver, give_up) {
            Some(Arrival::Source(index, report)) => slots.fill(index, report),
            Some(Arrival::Share(..)) => {}
            None => break,
        }
    }
    slots.finish(timeout)
}

/// One unavailable candidate per `vhd` holder of the manifest that no source answered for.
fn missing_vhd_holders<'a>(
    reports: impl Iterator<Item = &'a SourceReport>,
    manifest: &Manifest,
) -> Vec<Candidate> {
    let seen: BTreeSet<HolderId> = reports.flat_map(SourceReport::holder_ids).collect();
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
        })
        .collect()
}

/// The quorum candidates: every fragment read, every source that failed, and one unavailable
/// candidate per `vhd` holder of the manifest that no source answered for.
pub fn candidates(reports: &[SourceReport], manifest: &Manifest) -> Vec<Candidate> {
    let mut candidates: Vec<Candidate> =
        reports.iter().flat_map(SourceReport::candidates).collect();
    candidates.extend(missing_vhd_holders(reports.iter(), manifest));
    candidates
}

/// Reads `sources` and rebuilds the manifest's secret (no broker).
pub fn unlock(
    manifest: &Manifest,
    sources: Vec<Box<dyn VolumeSource>>,
    timeout: Duration,
) -> quorum::Result<QuorumOutcome> {
    unlock_with(manifest, Inputs::fragments_only(sources), timeout)
}

/// Reads the fragment sources and asks the broker for the `tpm` and `sev` holders, all at once,
/// and rebuilds the manifest's secret as soon as the shares in hand allow it, or, once every
/// source and holder has answered or `timeout` has passed, says why not.
pub fn unlock_with(
    manifest: &Manifest,
    inputs: Inputs,
    timeout: Duration,
) -> quorum::Result<QuorumOutcome> {
    let deadline = Instant::now() + timeout;
    let request = manifest.quorum_request();
    let cancel = Arc::new(AtomicBool::new(false));
    let (sender, receiver) = mpsc::channel();
    let mut sources = SourceSlots::start(inputs.sources, deadline, &sender);
    let mut shares = ShareSlots::start(
        manifest,
        inputs.broker,
        inputs.snp,
        deadline,
        &sender,
        &cancel,
    );
    drop(sender);

    let give_up = deadline + REPORT_GRACE;
    while sources.pending + shares.pending > 0 {
        let usable = match next(&receiver, give_up) {
            Some(Arrival::Source(index, report)) => {
                if let Err(why) = &report.fragments {
                    log::info!("{}: {why}", report.name());
                }
                let usable = report.fragments.is_ok();
                sources.fill(index, report);
                usable
            }
            Some(Arrival::Share(index, candidate)) => {
                if let Err(why) = &candidate.content {
                    log::info!("{}: {why}", candidate.source);
                }
                let usable = candidate.content.is_ok();
                shares.fill(index, candidate);
                usable
            }
            None => break,
        };
        if !usable {
            continue;
        }
        // The holders no device answered for can be named only once every source has.
        let mut so_far: Vec<Candidate> = sources
            .received()
            .flat_map(SourceReport::candidates)
            .chain(shares.received().cloned())
            .collect();
        if sources.pending == 0 {
            so_far.extend(missing_vhd_holders(sources.received(), manifest));
        }
        if let Ok(outcome) = quorum::rebuild(&request, &so_far) {
            cancel.store(true, Ordering::Relaxed);
            if sources.pending + shares.pending > 0 {
                log::info!(
                    "quorum met; not waiting for {} more source(s) and {} more holder(s)",
                    sources.pending,
                    shares.pending
                );
            }
            return Ok(outcome);
        }
    }
    cancel.store(true, Ordering::Relaxed);
    let reports = sources.finish(timeout);
    let mut all = candidates(&reports, manifest);
    all.extend(shares.finish(timeout));
    quorum::rebuild(&request, &all)
}

#[cfg(test)]
mod tests;
