//! The attested holders' shares as quorum candidates: one request to the coordinator per `tpm`,
//! `sev` or `host` holder of the manifest, one after another over the one mailbox, each answer (a signed
//! fragment, or why not) named after its holder.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use keyshard_core::HolderClass;
use keyshard_core::dealer::HolderSlot;
use keyshard_core::fragment::Fragment;
use keyshard_core::manifest::HostAttestation;
use keyshard_core::quorum::Candidate;
use zeroize::Zeroizing;

use super::mailbox::Mailbox;
use super::{BrokerClient, BrokerError, Result};
use crate::snp::{ReportSource, SnpError};

/// Asks the coordinator for attested holders' shares, one after another, handing each answer
/// over as it comes: in this process over a mailbox ([`InProcessFetcher`]), or in a worker
/// process when the mailbox is a guest block device (`worker::broker::WorkerBroker`).
pub trait ShareFetcher: Send {
    /// Where the mailbox is, for messages.
    fn location(&self) -> String;

    /// Whether `sev` shares can be asked for: there is a source of SNP reports.
    fn has_snp(&self) -> bool;

    /// Asks for each of `holders` (with their index in the caller's list) until `deadline`;
    /// stops early when `deliver` returns false or `cancel` is set.
    /// `host`: the manifest's pins, which every `tpm` share's host quote must pass.
    fn fetch_all(
        self: Box<Self>,
        holders: Vec<(usize, HolderSlot)>,
        host: Option<HostAttestation>,
        deadline: Instant,
        cancel: Arc<AtomicBool>,
        deliver: &mut dyn FnMut(usize, Candidate) -> bool,
    );
}

/// Asks through a mailbox in this process: a vhost-user socket on a host, an image file, or a
/// test double. A guest block device is asked through a worker instead.
pub struct InProcessFetcher {
    mailbox: Box<dyn Mailbox>,
    reports: Option<Box<dyn ReportSource>>,
}

impl InProcessFetcher {
    pub fn new(mailbox: Box<dyn Mailbox>, reports: Option<Box<dyn ReportSource>>) -> Self {
        Self { mailbox, reports }
    }
}

impl ShareFetcher for InProcessFetcher {
    fn location(&self) -> String {
        self.mailbox.location()
    }

    fn has_snp(&self) -> bool {
        self.reports.is_some()
    }

    fn fetch_all(
        self: Box<Self>,
        holders: Vec<(usize, HolderSlot)>,
        host: Option<HostAttestation>,
        deadline: Instant,
        cancel: Arc<AtomicBool>,
        deliver: &mut dyn FnMut(usize, Candidate) -> bool,
    ) {
        let mut client = BrokerClient::new(self.mailbox).with_cancel(cancel);
        fetch_all(
            &mut client,
            &holders,
            self.reports,
            host.as_ref(),
            deadline,
            deliver,
        );
    }
}

/// Whether the coordinator releases (or, for `host`, relays) this class's shares.
pub fn is_brokered(class: HolderClass) -> bool {
    matches!(
        class,
        HolderClass::Tpm | HolderClass::Sev | HolderClass::Host
    )
}

/// Asks for one holder's share: `tpm` with no evidence, `sev` with an SNP report from `reports`
/// (`None`: not an SNP guest).
pub fn fetch(
    client: &mut BrokerClient,
    holder: &HolderSlot,
    reports: Option<&mut (dyn ReportSource + '_)>,
    host: Option<&HostAttestation>,
    deadline: Instant,
) -> Result<Zeroizing<Vec<u8>>> {
    match (holder.class, reports) {
        (HolderClass::Tpm, _) => client.release_tpm(&holder.id, host, deadline),
        (HolderClass::Sev, Some(reports)) => client.release_sev(&holder.id, reports, deadline),
        (HolderClass::Sev, None) => Err(BrokerError::Snp(SnpError::NoDevice)),
        (HolderClass::Host, _) => client.release_host(&holder.id, deadline),
        (class, _) => Err(BrokerError::Protocol(format!(
            "{class} shares are not released by the coordinator"
        ))),
    }
}

/// What the coordinator's answer for `holder` contributes to the quorum: the fragment, named
/// `<holder> (broker <location>)`, or an unavailable candidate named `<holder>` with the reason.
/// A fragment that names another holder is not passed off as this one's.
pub fn candidate(
    holder: &HolderSlot,
    location: &str,
    fetched: Result<Zeroizing<Vec<u8>>>,
) -> Candidate {
    let id = holder.id.to_string();
    let bytes = match fetched {
        Ok(bytes) => bytes,
        Err(BrokerError::Refused { code, reason }) => {
            // The reason is the host's text: one printable line, so it can neither break the
            // report into lines nor write escape sequences to the console.
            let reason = crate::serial::printable(reason.as_bytes());
            // The quorum report names the holder with this reason; the code is for debugging.
            log::debug!("{id}: refused by the coordinator ({code:?}): {reason}");
            return Candidate::unavailable(id, format!("refused by the coordinator: {reason}"));
        }
        Err(error) => return Candidate::unavailable(id, error.to_string()),
    };
    // An unparseable fragment is the quorum's to reject, with its reason.
    if let Ok(fragment) = Fragment::parse(&bytes) {
        let header = fragment.header();
        if header.holder_id != holder.id || header.class != holder.class {
            return Candidate::unavailable(
                id,
                format!(
                    "the coordinator released {} holder {}'s fragment instead",
                    header.class, header.holder_id
                ),
            );
        }
    }
    log::info!("{id}: share released by the coordinator");
    Candidate::new(format!("{id} (broker {location})"), bytes.to_vec())
}

/// Asks for each of `holders` in turn until `deadline`, handing each candidate to `deliver`
/// as it comes (with the holder's index in `holders`); stops early when `deliver` returns
/// false or the client is cancelled.
pub fn fetch_all(
    client: &mut BrokerClient,
    holders: &[(usize, HolderSlot)],
    mut reports: Option<Box<dyn ReportSource>>,
    host: Option<&HostAttestation>,
    deadline: Instant,
    mut deliver: impl FnMut(usize, Candidate) -> bool,
) {
    let location = client.location();
    for (index, holder) in holders {
        let fetched = fetch(client, holder, reports.as_deref_mut(), host, deadline);
        if matches!(fetched, Err(BrokerError::Cancelled)) {
            return;
        }
        if !deliver(*index, candidate(holder, &location, fetched)) {
            return;
        }
    }
}
