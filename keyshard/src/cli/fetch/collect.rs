//! The quorum of a fetch, as host answers arrive: each opened share is checked (a fragment the
//! CMS signed, of this credential, epoch, threshold and key check value, at the index the host
//! was asked for), and as soon as k checked shares are in hand they are combined
//! (keyshard-core's quorum, which checks the result against the map's key check value). No
//! network, no TPM: the fetch feeds it, the tests feed it hostile answers.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use keyshard_core::quorum::{self, Candidate, QuorumOutcome, QuorumRequest};
use keyshard_core::{Fragment, HolderClass};
use keyshard_shards::HostId;
use keyshard_shards::map::ShardMap;
use zeroize::Zeroizing;

use super::host::{HostFailure, HostTimings};

/// What became of one host of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostStatus {
    /// Its share was valid (and, once the fetch succeeded, part of what rebuilt it or spare).
    Released,
    Failed(HostFailure),
    /// Still working when k shares had rebuilt the credential: its answer was not waited for.
    NotNeeded,
}

/// One host's line of the fetch's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub index: u8,
    pub host: HostId,
    pub status: HostStatus,
    /// Where its time went (zero for what it never reached).
    pub timings: HostTimings,
}

impl std::fmt::Display for HostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.status {
            HostStatus::Released => write!(f, "host {}: released", self.host),
            HostStatus::Failed(why) => write!(f, "host {}: failed: {why}", self.host),
            HostStatus::NotNeeded => write!(
                f,
                "host {}: not needed: k shares rebuilt the credential first",
                self.host
            ),
        }
    }
}

/// Collects the shares of one fetch.
pub struct Collector<'m> {
    map: &'m ShardMap,
    cms: &'m VerifyingKey,
    /// Checked shares, named by host.
    valid: Vec<Candidate>,
    /// Per share index, what its host did so far.
    reports: BTreeMap<u8, HostReport>,
}

impl<'m> Collector<'m> {
    /// A collector for `map`'s shares, trusting fragments signed by `cms` only. Every host of
    /// the map starts as [`HostStatus::NotNeeded`] until it answers.
    pub fn new(map: &'m ShardMap, cms: &'m VerifyingKey) -> Self {
        let reports = map
            .shards()
            .map(|(index, location)| {
                let report = HostReport {
                    index,
                    host: location.host.clone(),
                    status: HostStatus::NotNeeded,
                    timings: HostTimings::default(),
                };
                (index, report)
            })
            .collect();
        Self {
            map,
            cms,
            valid: Vec::new(),
            reports,
        }
    }

    /// How many valid shares are in hand.
    pub fn valid(&self) -> usize {
        self.valid.len()
    }

    /// Takes share `index`'s answer (ignored for an index not in the map). Returns the rebuilt
    /// credential once k valid shares combine to it; `None` while they do not (yet).
    pub fn offer(
        &mut self,
        index: u8,
        answer: Result<Zeroizing<Vec<u8>>, HostFailure>,
        timings: HostTimings,
    ) -> Option<QuorumOutcome> {
        let report = self.reports.get_mut(&index)?;
        report.timings = timings;
        let checked = answer.and_then(|share| check_share(self.map, self.cms, index, share));
        match checked {
            Ok(share) => {
                report.status = HostStatus::Released;
                self.valid.push(Candidate {
                    source: report.host.to_string(),
                    content: Ok(share),
                });
            }
            Err(why) => {
                report.status = HostStatus::Failed(why);
                return None;
            }
        }
        if self.valid.len() < usize::from(self.map.threshold().k()) {
            return None;
        }
        let request = QuorumRequest {
            dealer: self.cms,
            key_id: Some(self.map.credential()),
            threshold: Some(self.map.threshold().k()),
            key_check_value: Some(self.map.key_check_value()),
        };
        quorum::rebuild(&request, &self.valid).ok()
    }

    /// The per-host account, in share index order.
    pub fn reports(&self) -> Vec<HostReport> {
        self.reports.values().cloned().collect()
    }

    /// Marks every host that has not answered yet as failed with `why` (the fetch is over).
    pub fn fail_unanswered(&mut self, why: impl Fn(u8) -> HostFailure) {
        for (index, report) in &mut self.reports {
            if report.status == HostStatus::NotNeeded {
                report.status = HostStatus::Failed(why(*index));
            }
        }
    }
}

/// Checks that `share` is a fragment the CMS signed, for the map's credential, epoch, threshold
/// and key check value, of class `host`, at `index`.
fn check_share(
    map: &ShardMap,
    cms: &VerifyingKey,
    index: u8,
    share: Zeroizing<Vec<u8>>,
) -> Result<Zeroizing<Vec<u8>>, HostFailure> {
    let fragment = Fragment::parse(&share)
        .and_then(|f| f.verify(cms))
        .map_err(|e| HostFailure::Fragment(e.to_string()))?;
    let header = fragment.header();
    let wrong = |what: String| Err(HostFailure::WrongShare(what));
    if &header.key_id != map.credential() {
        return wrong(format!("of credential {}", header.key_id));
    }
    if header.epoch != map.epoch() {
        return wrong(format!(
            "of epoch {} (the map's is {})",
            header.epoch,
            map.epoch()
        ));
    }
    if header.index != index {
        return wrong(format!("with index {} (asked for {index})", header.index));
    }
    if header.threshold != map.threshold() {
        return wrong(format!(
            "of a {} of {} sharing (the map's is {} of {})",
            header.threshold.k(),
            header.threshold.n(),
            map.threshold().k(),
            map.threshold().n()
        ));
    }
    if header.class != HolderClass::Host {
        return wrong(format!("of class {} (expected host)", header.class));
    }
    if &header.kcv != map.key_check_value() {
        return wrong("of another secret (its key check value is not the map's)".to_owned());
    }
    Ok(share)
}
