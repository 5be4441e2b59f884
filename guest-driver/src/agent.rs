//! The guest agent: read every fragment source and ask the broker for every `tpm` and `sev`
//! holder at once, each until one shared deadline, and rebuild the secret as soon as k valid
//! shares of one epoch are in hand; with fewer, name each holder that failed and why.
//!
//! Nothing here waits on a device without a deadline, and the calling thread never touches one.
//! Named sources are read on threads of their own; in a guest, devices are found by listing
//! `<sysfs>/block` again and again (until every holder of the manifest has a device, or the
//! device wait has passed), and each device found is probed on its own thread by a
//! [`DeviceProber`], which reads it in a worker process. The broker's holders are asked one after
//! another by one more thread, through a [`ShareFetcher`]. After every share that arrives the
//! quorum is tried; once it is met, whatever is still working is left behind (workers are
//! killed). A source or holder that has not answered by the deadline (plus a short grace for its
//! own timeout report to arrive) is reported unavailable: a dead holder never delays the agent
//! past the deadline.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use keyshard_core::dealer::HolderSlot;
use keyshard_core::manifest::{HostAttestation, Manifest};
use keyshard_core::quorum::{self, Candidate, QuorumOutcome};
use keyshard_core::{HolderClass, HolderId};

use crate::broker::shares::{self, ShareFetcher};
use crate::discovery::{self, DeviceKind, Discovery, SCAN_INTERVAL};
use crate::serial::{BROKER_SERIAL_PREFIX, FRAGMENT_SERIAL_PREFIX};
use crate::snp::SnpError;
use crate::source::{SourceReport, VolumeSource};
use crate::worker::probe::{ProbeFailure, ProbeScope, Probed};

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
#[derive(Default)]
pub struct Inputs {
    /// Fragment sources named by the caller.
    pub sources: Vec<Box<dyn VolumeSource>>,
    /// The broker mailbox named by the caller, when there is one.
    pub broker: Option<Box<dyn ShareFetcher>>,
    /// Find fragment devices and the broker in sysfs (in a guest).
    pub discovery: Option<Discovery>,
}

impl Inputs {
    /// Fragment sources only: no broker, no discovery.
    pub fn fragments_only(sources: Vec<Box<dyn VolumeSource>>) -> Self {
        Self {
            sources,
            ..Self::default()
        }
    }
}

/// What reaches the agent from its threads.
enum Arrival {
    /// Named fragment source `index` was read (or failed).
    Source(usize, SourceReport),
    /// Discovered device `index` was probed.
    Probe(usize, Probed),
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

/// A device found in sysfs, and what its probe said.
struct FoundDevice {
    name: String,
    location: String,
    probed: Option<Probed>,
    /// A fragment device's report, made once when its probe answers.
    report: Option<SourceReport>,
}

/// Discovery at work: lists `<sysfs>/block` until every expected device is there or the device
/// wait is over, and probes each new device on a thread of its own.
struct Scanner {
    discovery: Discovery,
    scope: ProbeScope,
    /// The wait the user gave, to say how long a device that never answered was waited for.
    timeout: Duration,
    devices: Vec<FoundDevice>,
    pending: usize,
    /// No new device is looked for after this.
    scan_until: Instant,
    next_scan: Instant,
    scanning: bool,
    /// Why the last listing of `<sysfs>/block` failed, if it did (sysfs not mounted, say).
    listing_failed: Option<discovery::DiscoveryError>,
}

impl Scanner {
    fn new(discovery: Discovery, scope: ProbeScope, timeout: Duration, now: Instant) -> Self {
        let scan_until = now + discovery.device_wait;
        Self {
            discovery,
            scope,
            timeout,
            devices: Vec::new(),
            pending: 0,
            scan_until,
            next_scan: now,
            scanning: true,
            listing_failed: None,
        }
    }

    /// Lists the block devices again when it is time, and starts a probe for each new one.
    fn scan(&mut self, deadline: Instant, sender: &Sender<Arrival>) {
        let now = Instant::now();
        if !self.scanning || now < self.next_scan {
            return;
        }
        self.next_scan = now + SCAN_INTERVAL;
        let names = match discovery::block_devices(&self.discovery.sysfs_root) {
            Ok(names) => {
                self.listing_failed = None;
                names
            }
            Err(e) => {
                // The tree may appear late (sysfs mounted after us); say why if it never does.
                self.listing_failed = Some(e);
                Vec::new()
            }
        };
        for name in names {
            if self.devices.iter().any(|d| d.name == name) {
                continue;
            }
            let index = self.devices.len();
            let location = self.discovery.prober.location(&name);
            log::debug!("found block device {location}");
            let prober = self.discovery.prober.clone();
            let (thread_name, scope, sender) = (name.clone(), self.scope, sender.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("probe-{name}"))
                .spawn(move || {
                    let probed = prober.probe(&thread_name, scope, deadline);
                    let _ = sender.send(Arrival::Probe(index, probed));
                });
            let probed = match spawned {
                Ok(_) => {
                    self.pending += 1;
                    None
                }
                Err(e) => Some(Probed {
                    location: location.clone(),
                    serial: Err(ProbeFailure::Failed(format!(
                        "cannot start a probe thread: {e}"
                    ))),
                    volume: None,
                }),
            };
            self.devices.push(FoundDevice {
                name,
                location,
                probed,
                report: None,
            });
        }
    }

    /// Records a probe's answer; the device's name and serial when it was news.
    fn fill(&mut self, index: usize, probed: Probed) -> Option<(String, Option<String>)> {
        let device = self.devices.get_mut(index)?;
        if device.probed.is_some() {
            return None;
        }
        match probed.serial() {
            Some(serial) => log::info!("found {} ({serial})", device.location),
            None => log::debug!("{}: {:?}", device.location, probed.serial),
        }
        let serial = probed.serial().map(str::to_owned);
        device.report = serial
            .as_deref()
            .filter(|s| DeviceKind::of_serial(s) == DeviceKind::Fragment)
            .map(|serial| {
                let fragments = match &probed.volume {
                    Some(Ok(volume)) => SourceReport::from_volume(volume),
                    Some(Err(failure)) => Err(failure.describe(self.timeout)),
                    None => Err("not read".to_owned()),
                };
                SourceReport {
                    location: device.location.clone(),
                    serial: Some(serial.to_owned()),
                    fragments,
                }
            });
        device.probed = Some(probed);
        self.pending = self.pending.saturating_sub(1);
        Some((device.name.clone(), serial))
    }

    /// Stops looking for new devices when `done` or when the device wait is over.
    fn settle(&mut self, done: bool) {
        if self.scanning && (done || Instant::now() >= self.scan_until) {
            self.scanning = false;
            log::debug!(
                "discovery over: {} block device(s), {} still probed",
                self.devices.len(),
                self.pending
            );
        }
    }

    /// When the next listing is due, if any.
    fn wake_at(&self) -> Option<Instant> {
        self.scanning.then_some(self.next_scan.min(self.scan_until))
    }

    /// How many devices have not said what they are: still probed, or their probe failed.
    fn without_serial(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| d.probed.as_ref().is_none_or(|p| p.serial.is_err()))
            .count()
    }

    /// The serials seen so far.
    fn serials(&self) -> impl Iterator<Item = (&FoundDevice, &str)> {
        self.devices
            .iter()
            .filter_map(|d| Some((d, d.probed.as_ref()?.serial()?)))
    }

    /// The fragment devices probed so far, as source reports.
    fn fragment_reports(&self) -> impl Iterator<Item = &SourceReport> {
        self.devices.iter().filter_map(|d| d.report.as_ref())
    }

    /// When no device was ever found because `<sysfs>/block` could not be listed: that, as an
    /// unavailable source, so the report says why rather than only which holders are missing.
    fn listing_failure(&self) -> Option<SourceReport> {
        let discovery::DiscoveryError::ListBlockDevices { dir, source } = self
            .listing_failed
            .as_ref()
            .filter(|_| self.devices.is_empty())?;
        Some(SourceReport::unavailable(
            dir.display().to_string(),
            None,
            format!("cannot list block devices: {source}"),
        ))
    }

    /// The devices whose serial never came, as unavailable sources: any may have been a holder.
    fn unanswered(&self) -> impl Iterator<Item = SourceReport> + '_ {
        let timeout = self.timeout;
        self.devices.iter().filter_map(move |device| {
            let failure = match &device.probed {
                None => &ProbeFailure::NoAnswer,
                Some(probed) => probed.serial.as_ref().err()?,
            };
            let reason = match failure {
                ProbeFailure::NoAnswer => {
                    format!("{} (serial unknown)", failure.describe(timeout))
                }
                ProbeFailure::Failed(why) => why.clone(),
            };
            Some(SourceReport::unavailable(
                device.location.clone(),
                None,
                reason,
            ))
        })
    }
}

/// The `tpm`, `sev` and `host` holders of the manifest: the coordinator's answers as they
/// arrive.
struct ShareSlots {
    holders: Vec<HolderSlot>,
    /// The manifest's pins of the host TPM, which every `tpm` share's quote must pass.
    host: Option<HostAttestation>,
    answers: Vec<Option<Candidate>>,
    /// Holders not answered yet (asked, or waiting for a broker to be found).
    pending: usize,
    /// Whether a broker was given or found.
    attached: bool,
    /// Tells the broker thread to ask for the next holder; dropped (so: stop) when the agent
    /// returns.
    go_ahead: Option<Sender<()>>,
}

impl ShareSlots {
    fn new(manifest: &Manifest) -> Self {
        let holders: Vec<HolderSlot> = manifest
            .holders
            .iter()
            .filter(|h| shares::is_brokered(h.class))
            .cloned()
            .collect();
        Self {
            answers: vec![None; holders.len()],
            pending: holders.len(),
            holders,
            host: manifest.host_attestation.clone(),
            attached: false,
            go_ahead: None,
        }
    }

    /// Lets the broker go on to the next holder, after an answer that did not meet the quorum.
    fn go_ahead(&self) {
        if let Some(go_ahead) = &self.go_ahead {
            let _ = go_ahead.send(());
        }
    }

    /// Asks `fetcher` for every holder not answered yet, on a thread of its own. `sev` holders
    /// are answered at once when there are no SNP reports to offer.
    fn attach(
        &mut self,
        fetcher: Box<dyn ShareFetcher>,
        deadline: Instant,
        sender: &Sender<Arrival>,
        cancel: &Arc<AtomicBool>,
    ) {
        if self.attached {
            log::warn!(
                "ignoring a second broker device {}: one is expected",
                fetcher.location()
            );
            return;
        }
        self.attached = true;
        if !fetcher.has_snp() {
            self.fail_where(
                |h| h.class == HolderClass::Sev,
                &SnpError::NoDevice.to_string(),
            );
        }
        let to_ask: Vec<(usize, HolderSlot)> = self
            .holders
            .iter()
            .cloned()
            .enumerate()
            .filter(|(i, _)| self.answers.get(*i).is_some_and(Option::is_none))
            .collect();
        if to_ask.is_empty() {
            return;
        }
        let (sender, cancel, host) = (sender.clone(), cancel.clone(), self.host.clone());
        let (go_ahead, go_aheads) = mpsc::channel();
        self.go_ahead = Some(go_ahead);
        let spawned = std::thread::Builder::new()
            .name("broker".into())
            .spawn(move || {
                fetcher.fetch_all(to_ask, host, deadline, cancel, &mut |index, candidate| {
                    // False once the agent has stopped listening, or has what it needs: no
                    // holder is asked for a share that would not be used.
                    sender.send(Arrival::Share(index, candidate)).is_ok()
                        && go_aheads
                            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                            .is_ok()
                });
            });
        if let Err(e) = spawned {
            self.fail_where(|_| true, &format!("cannot start the broker thread: {e}"));
        }
    }

    /// Answers every holder still unanswered that `which` picks as unavailable for `why`.
    fn fail_where(&mut self, which: impl Fn(&HolderSlot) -> bool, why: &str) {
        for (holder, answer) in self.holders.iter().zip(self.answers.iter_mut()) {
            if answer.is_none() && which(holder) {
                *answer = Some(Candidate::unavailable(holder.id.to_string(), why));
                self.pending = self.pending.saturating_sub(1);
            }
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

/// Waits for the next arrival until `wake`; `None` then, or when no thread is left.
fn next(receiver: &Receiver<Arrival>, wake: Instant) -> Option<Arrival> {
    receiver
        .recv_timeout(wake.saturating_duration_since(Instant::now()))
        .ok()
}

/// What a survey found: every fragment source (named or discovered) and the broker, if any.
pub struct Survey {
    pub reports: Vec<SourceReport>,
    /// The broker device's location and serial, when discovery found one.
    pub broker: Option<(String, String)>,
}

/// Reads every named source and, with `discovery`, every fragment device sysfs lists (waiting
/// `discovery.device_wait` for devices to appear); one report per source within about `timeout`
/// whatever the devices do.
pub fn survey(inputs: Inputs, timeout: Duration) -> Survey {
    let deadline = Instant::now() + timeout;
    let (sender, receiver) = mpsc::channel();
    let mut sources = SourceSlots::start(inputs.sources, deadline, &sender);
    let mut scanner = inputs
        .discovery
        .map(|d| Scanner::new(d, ProbeScope::FragmentVolume, timeout, Instant::now()));
    let give_up = deadline + REPORT_GRACE;
    loop {
        if let Some(scanner) = scanner.as_mut() {
            scanner.scan(deadline, &sender);
            scanner.settle(false);
        }
        let scanning = scanner.as_ref().is_some_and(|s| s.scanning);
        let probing = scanner.as_ref().map_or(0, |s| s.pending);
        if !scanning && sources.pending + probing == 0 {
            break;
        }
        let wake = scanner
            .as_ref()
            .and_then(Scanner::wake_at)
            .map_or(give_up, |at| at.min(give_up));
        match next(&receiver, wake) {
            Some(Arrival::Source(index, report)) => sources.fill(index, report),
            Some(Arrival::Probe(index, probed)) => {
                if let Some(scanner) = scanner.as_mut() {
                    scanner.fill(index, probed);
                }
            }
            Some(Arrival::Share(..)) => {}
            None if Instant::now() >= give_up => break,
            None => {}
        }
    }
    let mut reports = sources.finish(timeout);
    let mut broker = None;
    if let Some(scanner) = &scanner {
        reports.extend(scanner.fragment_reports().cloned());
        reports.extend(scanner.unanswered());
        reports.extend(scanner.listing_failure());
        broker = scanner
            .serials()
            .find(|(_, serial)| DeviceKind::of_serial(serial) == DeviceKind::Broker)
            .map(|(device, serial)| (device.location.clone(), serial.to_owned()));
    }
    Survey { reports, broker }
}

/// One block device and its serial, or why it is not known.
pub type ListedDevice = (String, Result<String, String>);

/// The block devices sysfs lists and their serials, each read by `discovery`'s prober. With
/// `until_serial`, ends once a device with that serial is found and the others have answered
/// or `settle` has passed since; without, once the device wait is over and every device has
/// answered. Never later than `timeout`; a device that has not answered by then is listed with
/// the reason. An error when `<sysfs>/block` could never be listed (sysfs not mounted).
pub fn list_devices(
    discovery: Discovery,
    until_serial: Option<&str>,
    settle: Duration,
    timeout: Duration,
) -> discovery::Result<Vec<ListedDevice>> {
    let deadline = Instant::now() + timeout;
    let (sender, receiver) = mpsc::channel();
    let mut scanner = Scanner::new(discovery, ProbeScope::SerialOnly, timeout, Instant::now());
    let mut found_at: Option<Instant> = None;
    loop {
        scanner.scan(deadline, &sender);
        if found_at.is_none()
            && let Some(wanted) = until_serial
            && scanner.serials().any(|(_, serial)| serial == wanted)
        {
            found_at = Some(Instant::now());
        }
        scanner.settle(found_at.is_some());
        let now = Instant::now();
        let settled = found_at.is_some_and(|at| now >= at + settle);
        if now >= deadline || settled || (!scanner.scanning && scanner.pending == 0) {
            break;
        }
        let mut wake = scanner.wake_at().unwrap_or(deadline).min(deadline);
        if let Some(at) = found_at {
            wake = wake.min(at + settle);
        }
        if let Some(Arrival::Probe(index, probed)) = next(&receiver, wake) {
            scanner.fill(index, probed);
        }
    }
    if scanner.devices.is_empty()
        && let Some(error) = scanner.listing_failed
    {
        return Err(error);
    }
    Ok(scanner
        .devices
        .into_iter()
        .map(|device| {
            let serial = match device.probed {
                Some(probed) => probed.serial.map_err(|f| f.describe(timeout)),
                None => Err(ProbeFailure::NoAnswer.describe(timeout)),
            };
            (device.location, serial)
        })
        .collect())
}

/// Reads every named source concurrently; returns one report per source, in the order given,
/// within about `timeout` whatever the sources do.
pub fn read_sources(sources: Vec<Box<dyn VolumeSource>>, timeout: Duration) -> Vec<SourceReport> {
    survey(Inputs::fragments_only(sources), timeout).reports
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
/// candidate per `vhd` holder of the manifest that no source answered for (`tpm`, `sev` and
/// `host` holders are the broker's: [`ShareSlots`]).
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

/// Whether every `vhd` holder of the manifest has shown up among `reports`.
fn every_vhd_holder_seen<'a>(
    manifest: &Manifest,
    reports: impl Iterator<Item = &'a SourceReport>,
) -> bool {
    let seen: BTreeSet<HolderId> = reports.flat_map(|r| r.holder_ids()).collect();
    manifest
        .holders_missing(&seen)
        .all(|h| h.class != HolderClass::Vhd)
}

/// Reads the fragment sources (named, and found in sysfs) and asks the broker for the `tpm` and
/// `sev` holders, all at once, and rebuilds the manifest's secret as soon as the shares in hand
/// allow it, or, once every source and holder has answered or `timeout` has passed, says why not.
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
    let mut shares = ShareSlots::new(manifest);
    if let Some(fetcher) = inputs.broker {
        shares.attach(fetcher, deadline, &sender, &cancel);
    }
    let mut scanner = inputs
        .discovery
        .map(|d| Scanner::new(d, ProbeScope::FragmentVolume, timeout, Instant::now()));
    if scanner.is_none() && !shares.attached {
        shares.fail_where(
            |_| true,
            &format!(
                "no broker device (no block device serial starts with {BROKER_SERIAL_PREFIX})"
            ),
        );
    }

    let give_up = deadline + REPORT_GRACE;
    loop {
        if let Some(scanner) = scanner.as_mut() {
            scanner.scan(deadline, &sender);
            let all_there = every_vhd_holder_seen(
                manifest,
                sources.received().chain(scanner.fragment_reports()),
            ) && (shares.attached || shares.holders.is_empty());
            scanner.settle(all_there);
            if !scanner.scanning && !shares.attached {
                let why = match scanner.without_serial() {
                    0 => format!(
                        "no broker device (no block device serial starts with {BROKER_SERIAL_PREFIX})"
                    ),
                    n => format!(
                        "no broker device found ({n} block device(s) did not say what they are)"
                    ),
                };
                shares.fail_where(|_| true, &why);
                shares.attached = true;
            }
        }
        let scanning = scanner.as_ref().is_some_and(|s| s.scanning);
        let probing = scanner.as_ref().map_or(0, |s| s.pending);
        if !scanning && sources.pending + probing + shares.pending == 0 {
            break;
        }
        let wake = scanner
            .as_ref()
            .and_then(Scanner::wake_at)
            .map_or(give_up, |at| at.min(give_up));
        let mut share_arrived = false;
        let usable = match next(&receiver, wake) {
            Some(Arrival::Source(index, report)) => {
                if let Err(why) = &report.fragments {
                    log::info!("{}: {why}", report.name());
                }
                let usable = report.fragments.is_ok();
                sources.fill(index, report);
                usable
            }
            Some(Arrival::Probe(index, probed)) => {
                let Some(scanner) = scanner.as_mut() else {
                    continue;
                };
                let Some((name, serial)) = scanner.fill(index, probed) else {
                    continue;
                };
                match serial.as_deref().map(DeviceKind::of_serial) {
                    Some(DeviceKind::Broker) => {
                        let fetcher = scanner
                            .discovery
                            .prober
                            .broker(&name, serial.as_deref().unwrap_or_default());
                        shares.attach(fetcher, deadline, &sender, &cancel);
                        false
                    }
                    Some(DeviceKind::Fragment) => true,
                    _ => false,
                }
            }
            Some(Arrival::Share(index, candidate)) => {
                if let Err(why) = &candidate.content {
                    log::info!("{}: {why}", candidate.source);
                }
                let usable = candidate.content.is_ok();
                shares.fill(index, candidate);
                share_arrived = true;
                usable
            }
            None if Instant::now() >= give_up => break,
            None => false,
        };
        if !usable {
            if share_arrived {
                shares.go_ahead();
            }
            continue;
        }
        let found: Vec<&SourceReport> =
            scanner.iter().flat_map(Scanner::fragment_reports).collect();
        let mut so_far: Vec<Candidate> = sources
            .received()
            .chain(found.iter().copied())
            .flat_map(SourceReport::candidates)
            .chain(shares.received().cloned())
            .collect();
        // The holders no device answered for can be named only once no more devices can come.
        let devices_done = scanner
            .as_ref()
            .is_none_or(|s| !s.scanning && s.pending == 0);
        if sources.pending == 0 && devices_done {
            so_far.extend(missing_vhd_holders(
                sources.received().chain(found.iter().copied()),
                manifest,
            ));
        }
        if let Ok(outcome) = quorum::rebuild(&request, &so_far) {
            cancel.store(true, Ordering::Relaxed);
            let probing = scanner.as_ref().map_or(0, |s| s.pending);
            if sources.pending + probing + shares.pending > 0 {
                log::info!(
                    "quorum met; not waiting for {} more source(s), {probing} more device(s) \
                     and {} more holder(s)",
                    sources.pending,
                    shares.pending
                );
            }
            return Ok(outcome);
        }
        if share_arrived {
            shares.go_ahead();
        }
    }
    cancel.store(true, Ordering::Relaxed);
    let mut reports = sources.finish(timeout);
    if let Some(scanner) = &scanner {
        reports.extend(scanner.fragment_reports().cloned());
        reports.extend(scanner.unanswered());
        reports.extend(scanner.listing_failure());
    }
    let mut all = candidates(&reports, manifest);
    all.extend(shares.finish(timeout));
    quorum::rebuild(&request, &all)
}

#[cfg(test)]
mod tests;
