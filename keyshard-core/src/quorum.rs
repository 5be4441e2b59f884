//! Quorum: from whatever fragments turned up, rebuild the secret or say exactly why not.
//!
//! Each candidate is parsed and its dealer signature checked; fragments of another key, or that
//! disagree with the rest of their deal, are set aside with a reason. Fragments are grouped by
//! (epoch, deal id): two splits are never mixed. The newest epoch that has a deal with k valid
//! shares is combined and the result checked against the key check value; when the check fails,
//! other k-subsets of that deal are tried in a fixed order: first each one that leaves out one of
//! the k + 1 lowest shares (so one bad share is always got round when a spare exists), then the
//! rest in lexicographic order, at most [`MAX_SUBSETS_TRIED`] (or k + 2) in all. An
//! invalid fragment is never fatal while a quorum remains, and the outcome never depends on the
//! order of the candidates.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ed25519_dalek::VerifyingKey;
use zeroize::Zeroizing;

use crate::fragment::{DealId, Fragment, FragmentError, FragmentHeader, VerifiedFragment};
use crate::holder::KeyId;
use crate::kcv::KeyCheckValue;
use crate::sharing::{self, Share};

/// The most k-subsets of one deal combined when the first fails the key check (or k + 2, when
/// more): a bound on the work a set of bad but dealer-signed fragments can cause (each try is one
/// interpolation). k itself comes from the manifest, or from the dealer's signed fragments.
pub const MAX_SUBSETS_TRIED: usize = 32;

/// What the combiner trusts: the dealer key, and optionally the key id and k from a manifest.
#[derive(Debug, Clone, Copy)]
pub struct QuorumRequest<'a> {
    pub dealer: &'a VerifyingKey,
    /// The secret wanted. `None`: every valid fragment must name the same key id.
    pub key_id: Option<&'a KeyId>,
    /// The threshold the caller expects. `None`: take the fragments' own.
    pub threshold: Option<u8>,
    /// The key check value of the one secret wanted (from a manifest). `None`: any.
    pub key_check_value: Option<&'a KeyCheckValue>,
}

/// One expected fragment, named by where it came from (a file, a device serial): its bytes, or
/// why they could not be read.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub source: String,
    pub content: std::result::Result<Zeroizing<Vec<u8>>, String>,
}

impl Candidate {
    pub fn new(source: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            source: source.into(),
            content: Ok(Zeroizing::new(bytes)),
        }
    }

    /// A holder that could not be read (missing device, I/O error, timeout).
    pub fn unavailable(source: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            content: Err(reason.into()),
        }
    }
}

/// Why a fragment was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    Unavailable(String),
    Malformed(FragmentError),
    BadSignature,
    ForeignKeyId {
        found: KeyId,
        expected: KeyId,
    },
    ThresholdMismatch {
        found: u8,
        expected: u8,
    },
    /// Signed by the dealer for the same key id, but for another secret than the one wanted.
    ForeignSecret,
    InconsistentThreshold {
        epoch: u64,
        k: u8,
        n: u8,
        epoch_k: u8,
        epoch_n: u8,
    },
    InconsistentKeyCheck {
        epoch: u64,
    },
    DuplicateIndex {
        epoch: u64,
        index: u8,
        first_source: String,
    },
    IncompleteEpoch {
        epoch: u64,
        valid: usize,
        k: u8,
    },
    Superseded {
        epoch: u64,
        used_epoch: u64,
    },
    /// Valid, of the epoch used, but of another split (deal) of it than the one combined.
    OtherDeal {
        epoch: u64,
        deal: DealId,
        used_deal: DealId,
    },
    KeyCheckFailed {
        epoch: u64,
    },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "unavailable: {why}"),
            Self::Malformed(e) => write!(f, "unparseable: {e}"),
            Self::BadSignature => {
                f.write_str("bad signature: tampered, or not signed by the trusted dealer key")
            }
            Self::ForeignKeyId { found, expected } => {
                write!(f, "foreign key id {found:?} (expected {expected:?})")
            }
            Self::ThresholdMismatch { found, expected } => {
                write!(f, "k = {found}, but k = {expected} is expected")
            }
            Self::ForeignSecret => f.write_str(
                "key check value differs from the expected one: a share of another secret",
            ),
            Self::InconsistentThreshold {
                epoch,
                k,
                n,
                epoch_k,
                epoch_n,
            } => write!(
                f,
                "k/n = {k}/{n} disagrees with the other fragments of epoch {epoch} ({epoch_k}/{epoch_n})"
            ),
            Self::InconsistentKeyCheck { epoch } => write!(
                f,
                "key check value disagrees with the other fragments of epoch {epoch}"
            ),
            Self::DuplicateIndex {
                epoch,
                index,
                first_source,
            } => write!(
                f,
                "duplicate share index {index} of epoch {epoch} (already taken from {first_source})"
            ),
            Self::IncompleteEpoch { epoch, valid, k } => write!(
                f,
                "epoch {epoch} has only {valid} valid of the {k} shares it needs"
            ),
            Self::Superseded { epoch, used_epoch } => {
                write!(f, "stale: epoch {epoch}, newer epoch {used_epoch} was used")
            }
            Self::OtherDeal {
                epoch,
                deal,
                used_deal,
            } => write!(
                f,
                "another split of epoch {epoch}: deal {deal}, deal {used_deal} was used"
            ),
            Self::KeyCheckFailed { epoch } => write!(
                f,
                "the shares of epoch {epoch} rebuild a secret that fails the key check"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub source: String,
    pub reason: RejectReason,
}

/// "missing vhd-2: ...", "unused ksf-vhd-1 (/dev/vdb): ...", "rejected f.ksf: ...": one line
/// that says whether the holder was absent, fine but not enough, or at fault.
impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            RejectReason::Unavailable(why) => write!(f, "missing {}: {why}", self.source),
            RejectReason::IncompleteEpoch { .. }
            | RejectReason::Superseded { .. }
            | RejectReason::OtherDeal { .. } => {
                write!(f, "unused {}: {}", self.source, self.reason)
            }
            reason => write!(f, "rejected {}: {reason}", self.source),
        }
    }
}

/// A valid fragment and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub source: String,
    pub header: FragmentHeader,
}

/// The rebuilt secret, and an account of every candidate.
#[derive(Debug)]
pub struct QuorumOutcome {
    pub secret: Zeroizing<Vec<u8>>,
    pub key_id: KeyId,
    pub epoch: u64,
    /// The deal (split) the combined fragments belong to.
    pub deal: DealId,
    pub k: u8,
    /// The k fragments combined.
    pub used: Vec<Accepted>,
    /// Valid fragments of the same deal beyond the k combined.
    pub spare: Vec<Accepted>,
    pub rejected: Vec<Rejection>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuorumError {
    #[error("quorum not met: {valid} valid fragment(s) of one epoch, {} needed", needed.map_or_else(|| "k (unknown)".to_owned(), |k| k.to_string()))]
    NotMet {
        /// Valid fragments in the best epoch.
        valid: usize,
        /// k, when any valid fragment or the caller said it.
        needed: Option<u8>,
        rejected: Vec<Rejection>,
    },
    #[error("fragments of several keys ({}); name the one wanted", key_ids.iter().map(KeyId::as_str).collect::<Vec<_>>().join(", "))]
    AmbiguousKeyId { key_ids: Vec<KeyId> },
}

pub type Result<T> = std::result::Result<T, QuorumError>;

struct Valid {
    source: String,
    fragment: VerifiedFragment,
}

/// Rebuilds the secret from `candidates`, or reports why it cannot.
pub fn rebuild(request: &QuorumRequest<'_>, candidates: &[Candidate]) -> Result<QuorumOutcome> {
    let mut rejected = Vec::new();
    let mut reject = |source: &str, reason| {
        rejected.push(Rejection {
            source: source.to_owned(),
            reason,
        })
    };

    let mut valid = Vec::new();
    for candidate in candidates {
        let verified = candidate
            .content
            .as_ref()
            .map_err(|why| RejectReason::Unavailable(why.clone()))
            .and_then(|bytes| Fragment::parse(bytes).map_err(RejectReason::Malformed))
            .and_then(|f| {
                f.verify(request.dealer)
                    .map_err(|_| RejectReason::BadSignature)
            });
        match verified {
            Ok(fragment) => valid.push(Valid {
                source: candidate.source.clone(),
                fragment,
            }),
            Err(reason) => reject(&candidate.source, reason),
        }
    }

    let key_id = match request.key_id {
        Some(id) => id.clone(),
        None => {
            let ids: BTreeSet<&KeyId> = valid.iter().map(|v| &v.fragment.header().key_id).collect();
            if ids.len() > 1 {
                return Err(QuorumError::AmbiguousKeyId {
                    key_ids: ids.into_iter().cloned().collect(),
                });
            }
            match ids.into_iter().next() {
                Some(id) => id.clone(),
                None => {
                    return Err(QuorumError::NotMet {
                        valid: 0,
                        needed: request.threshold,
                        rejected,
                    });
                }
            }
        }
    };

    // Keep the fragments of the wanted key, k and secret.
    let mut kept = Vec::new();
    for v in valid {
        let header = v.fragment.header();
        if header.key_id != key_id {
            let found = header.key_id.clone();
            reject(
                &v.source,
                RejectReason::ForeignKeyId {
                    found,
                    expected: key_id.clone(),
                },
            );
            continue;
        }
        if let Some(expected) = request.threshold.filter(|k| *k != header.threshold.k()) {
            let found = header.threshold.k();
            reject(
                &v.source,
                RejectReason::ThresholdMismatch { found, expected },
            );
            continue;
        }
        if request
            .key_check_value
            .is_some_and(|kcv| *kcv != header.kcv)
        {
            reject(&v.source, RejectReason::ForeignSecret);
            continue;
        }
        kept.push(v);
    }

    // From here on, nothing depends on the order the candidates came in: sort by what the
    // fragments are (then by source, for identical copies), and group by (epoch, deal).
    kept.sort_by(|a, b| {
        let (ha, hb) = (a.fragment.header(), b.fragment.header());
        (ha.epoch, ha.deal, ha.index, a.fragment.encoded(), &a.source).cmp(&(
            hb.epoch,
            hb.deal,
            hb.index,
            b.fragment.encoded(),
            &b.source,
        ))
    });
    let mut deals: BTreeMap<(u64, DealId), Vec<Valid>> = BTreeMap::new();
    for v in kept {
        let header = v.fragment.header();
        let members = deals.entry((header.epoch, header.deal)).or_default();
        match disagreement(members, &v) {
            Some(reason) => reject(&v.source, reason),
            None => members.push(v),
        }
    }
    // Newest epoch first (an older complete epoch is the fallback while a rotation is under
    // way); within an epoch, the deal with the most valid fragments, then the lowest deal id.
    let mut deals: Vec<((u64, DealId), Vec<Valid>)> = deals.into_iter().collect();
    deals.sort_by(|((ea, da), ma), ((eb, db), mb)| {
        eb.cmp(ea).then(mb.len().cmp(&ma.len())).then(da.cmp(db))
    });

    let mut best: Option<(usize, u8)> = None;
    let mut outcome: Option<QuorumOutcome> = None;
    // Members of incomplete deals: renamed OtherDeal when another deal of their epoch is used.
    let mut incomplete: Vec<(String, u64, DealId)> = Vec::new();
    for ((epoch, deal), members) in deals {
        let k = members
            .first()
            .map_or(0, |v| v.fragment.header().threshold.k());
        if best.is_none_or(|(count, _)| members.len() > count) {
            best = Some((members.len(), k));
        }
        if let Some(used) = &outcome {
            let reason = if used.epoch == epoch {
                RejectReason::OtherDeal {
                    epoch,
                    deal,
                    used_deal: used.deal,
                }
            } else {
                RejectReason::Superseded {
                    epoch,
                    used_epoch: used.epoch,
                }
            };
            for v in &members {
                reject(&v.source, reason.clone());
            }
            continue;
        }
        if members.len() < usize::from(k) {
            for v in &members {
                let valid = members.len();
                reject(&v.source, RejectReason::IncompleteEpoch { epoch, valid, k });
                incomplete.push((v.source.clone(), epoch, deal));
            }
            continue;
        }
        match combine_some_subset(&members, &key_id, k) {
            Some((secret, positions)) => {
                let (used, spare): (Vec<_>, Vec<_>) = members
                    .iter()
                    .enumerate()
                    .partition(|(pos, _)| positions.contains(pos));
                outcome = Some(QuorumOutcome {
                    secret,
                    key_id: key_id.clone(),
                    epoch,
                    deal,
                    k,
                    used: used.into_iter().map(|(_, v)| accepted(v)).collect(),
                    spare: spare.into_iter().map(|(_, v)| accepted(v)).collect(),
                    rejected: Vec::new(),
                });
            }
            None => {
                for v in &members {
                    reject(&v.source, RejectReason::KeyCheckFailed { epoch });
                }
            }
        }
    }

    match outcome {
        Some(mut outcome) => {
            for rejection in &mut rejected {
                let RejectReason::IncompleteEpoch { epoch, .. } = rejection.reason else {
                    continue;
                };
                let deal = incomplete
                    .iter()
                    .find(|(source, e, _)| *source == rejection.source && *e == epoch)
                    .map(|(_, _, deal)| *deal);
                if let Some(deal) = deal.filter(|_| epoch == outcome.epoch) {
                    rejection.reason = RejectReason::OtherDeal {
                        epoch,
                        deal,
                        used_deal: outcome.deal,
                    };
                }
            }
            outcome.rejected = rejected;
            Ok(outcome)
        }
        None => Err(QuorumError::NotMet {
            valid: best.map_or(0, |(count, _)| count),
            needed: request.threshold.or(best.map(|(_, k)| k)),
            rejected,
        }),
    }
}

/// Why `candidate` cannot join the fragments already accepted for its deal, if it cannot. The
/// dealer signs one k/n and one key check value per deal, so a disagreement is a dealer fault.
fn disagreement(members: &[Valid], candidate: &Valid) -> Option<RejectReason> {
    let header = candidate.fragment.header();
    let first = members.first()?.fragment.header();
    if first.threshold != header.threshold {
        return Some(RejectReason::InconsistentThreshold {
            epoch: header.epoch,
            k: header.threshold.k(),
            n: header.threshold.n(),
            epoch_k: first.threshold.k(),
            epoch_n: first.threshold.n(),
        });
    }
    if first.kcv != header.kcv {
        return Some(RejectReason::InconsistentKeyCheck {
            epoch: header.epoch,
        });
    }
    members
        .iter()
        .find(|m| m.fragment.header().index == header.index)
        .map(|m| RejectReason::DuplicateIndex {
            epoch: header.epoch,
            index: header.index,
            first_source: m.source.clone(),
        })
}

/// Combines k-subsets of `members` (sorted by index) until one rebuilds a secret that passes the
/// key check: the k lowest; then each that leaves out one of the k + 1 lowest; then the rest in
/// lexicographic order of positions; at most `max(MAX_SUBSETS_TRIED, k + 2)` in all. Returns the
/// secret and the positions used.
fn combine_some_subset(
    members: &[Valid],
    key_id: &KeyId,
    threshold: u8,
) -> Option<(Zeroizing<Vec<u8>>, Vec<usize>)> {
    let k = usize::from(threshold);
    let lowest: Vec<usize> = (0..k).collect();
    // With a spare, leaving out one share at a time gets round any one bad share among the
    // k + 1 lowest, whatever its place.
    let leave_one_out = (members.len() > k)
        .then(|| {
            (0..=k)
                .rev()
                .map(move |out| (0..=k).filter(|p| *p != out).collect())
        })
        .into_iter()
        .flatten();
    let mut lexicographic = lowest.clone();
    let rest = std::iter::from_fn(move || {
        next_combination(&mut lexicographic, members.len()).then(|| lexicographic.clone())
    });
    let mut tried = BTreeSet::new();
    let limit = MAX_SUBSETS_TRIED.max(k + 2);
    for positions in std::iter::once(lowest).chain(leave_one_out).chain(rest) {
        if tried.len() >= limit {
            break;
        }
        if !tried.insert(positions.clone()) {
            continue;
        }
        let subset: Vec<&Valid> = positions.iter().filter_map(|p| members.get(*p)).collect();
        if let Some(secret) = combine_checked(&subset, key_id, threshold) {
            return Some((secret, positions));
        }
    }
    None
}

/// Advances `positions` (k increasing positions below `m`) to the next k-combination in
/// lexicographic order; false after the last.
fn next_combination(positions: &mut [usize], m: usize) -> bool {
    let k = positions.len();
    // The rightmost position that can still move right: p < m - k + i.
    let Some(i) = (0..k)
        .rev()
        .find(|&i| positions.get(i).is_some_and(|&p| p + k < m + i))
    else {
        return false;
    };
    let start = positions.get(i).map_or(0, |p| p + 1);
    for (next, p) in (start..).zip(positions.iter_mut().skip(i)) {
        *p = next;
    }
    true
}

fn combine_checked(members: &[&Valid], key_id: &KeyId, k: u8) -> Option<Zeroizing<Vec<u8>>> {
    let shares: Vec<Share> = members.iter().map(|v| v.fragment.share().clone()).collect();
    let secret = sharing::combine(&shares, k).ok()?;
    let kcv = members.first()?.fragment.header().kcv;
    kcv.matches(&secret, key_id).then_some(secret)
}

fn accepted(v: &Valid) -> Accepted {
    Accepted {
        source: v.source.clone(),
        header: v.fragment.header().clone(),
    }
}

#[cfg(test)]
mod tests;
