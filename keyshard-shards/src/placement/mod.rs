//! Placement: which shard host holds which share of a credential, recomputable by anyone.
//!
//! **Weighted rendezvous hashing** (highest random weight) on a recorded 32-byte seed. For share
//! index `i` and host `h` with weight `w` (1..=2^32-1):
//!
//! ```text
//! draw(i, h) = first 8 bytes, big-endian, of
//!              SHA-256( lp("keyshard/placement/v1") || seed || lp(credential) || i || lp(h) )
//! u(i, h)    = (2 * (draw >> 12) + 1) / 2^53          in (0, 1), never 0 or 1
//! score      = w / -log2 u                            (= ln 2 * w / -ln u)
//! ```
//!
//! `lp` is one length byte, then the bytes. The highest score wins; an exact tie goes to the
//! smaller host id. `-log2 u` is computed in integer fixed point (32 fractional bits, by
//! repeated squaring) and scores are compared by cross-multiplying in 128-bit integers, so the
//! result is the same on every machine: no floating point, no platform `ln`. A host's chance
//! to win an index alone is its weight over the sum of weights (the exponential-race form of
//! weighted rendezvous hashing); adding or removing a host moves only the indexes it wins or
//! held.
//!
//! **Failure domains.** With threshold k, no region and no operator may hold k or more shares
//! (each holds at most k - 1) whenever the candidates allow it. Shares are placed in index
//! order 1..=n; each index takes the best-scoring unused host *whose choice still leaves a
//! complete placement within the bound*. Whether one is left is a maximum flow (source ->
//! region, capacity k - 1 - its load; region -> operator, the number of unused hosts in that
//! pair; operator -> sink, k - 1 - its load): the remaining shares fit exactly when the flow
//! reaches their number, because hosts of one (region, operator) pair are interchangeable for the
//! bound and an integral flow picks distinct hosts. So if any valid placement exists the first
//! index has a choice, and by induction every later one: the result is valid whenever one
//! exists, and it is the plain rendezvous placement whenever that one is already valid.
//!
//! When no valid placement exists, placement is refused with the loads the plain placement
//! would have (every domain holding k or more), unless the caller allows correlated placement;
//! then the plain placement is returned with those loads attached.
//!
//! Which hosts are candidates (a fresh, affirming attestation) is the caller's decision; this
//! module only orders and spreads them.

mod flow;
#[cfg(test)]
mod tests;

use std::cmp::Ordering;
use std::fmt;
use std::num::NonZeroU32;

use keyshard_core::{KeyId, Threshold};
use sha2::{Digest, Sha256};

use crate::names::{DomainName, FailureDomain, HostId};

pub const SEED_LEN: usize = 32;
const LABEL: &[u8] = b"keyshard/placement/v1";
/// Fractional bits of the fixed-point `-log2 u`.
const FRACTION_BITS: u32 = 32;
/// `u` has this many bits: `u = x / 2^53` with `x` odd.
const DRAW_BITS: u64 = 53;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("{eligible} eligible hosts for {n} shares: each share needs a host of its own")]
    NotEnoughHosts { eligible: usize, n: u8 },
    #[error("host {0} is a candidate twice")]
    DuplicateHost(HostId),
    #[error(
        "the eligible hosts cannot spread {n} shares so that no region or operator holds {k}: \
         {loads} (allow correlated placement to override)"
    )]
    Correlated { k: u8, n: u8, loads: DomainLoads },
    #[error("no host keeps the placement within the domain bound at share {index} (a defect)")]
    NoChoice { index: u8 },
    #[error("no randomness from the operating system")]
    Random,
}

pub type Result<T> = std::result::Result<T, PlacementError>;

/// The seed placement hashes with, recorded in the shard map so anyone can recompute it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlacementSeed([u8; SEED_LEN]);

impl PlacementSeed {
    /// A fresh seed from the operating system's randomness.
    pub fn random() -> Result<Self> {
        let mut bytes = [0u8; SEED_LEN];
        getrandom::fill(&mut bytes).map_err(|_| PlacementError::Random)?;
        Ok(Self(bytes))
    }

    pub const fn from_bytes(bytes: [u8; SEED_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; SEED_LEN] {
        &self.0
    }
}

impl fmt::Debug for PlacementSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlacementSeed({})", hex::encode(self.0))
    }
}

/// An eligible shard host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub host: HostId,
    /// Relative capacity: a host of weight 2 wins an index twice as often as one of weight 1.
    pub weight: NonZeroU32,
    pub domain: FailureDomain,
}

/// What one placement is computed from; all of it is recorded or registered, so the placement
/// can be recomputed.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest<'a> {
    pub seed: &'a PlacementSeed,
    pub credential: &'a KeyId,
    pub threshold: Threshold,
    pub candidates: &'a [Candidate],
    /// Return a placement that breaks the domain bound when no other exists, instead of refusing.
    pub allow_correlated: bool,
}

/// Region or operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DomainKind {
    Region,
    Operator,
}

impl fmt::Display for DomainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Region => "region",
            Self::Operator => "operator",
        })
    }
}

/// How many shares one failure domain would hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainLoad {
    pub kind: DomainKind,
    pub name: DomainName,
    pub shares: u8,
}

/// The domains that would hold k or more shares, regions first, each by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainLoads(pub Vec<DomainLoad>);

impl fmt::Display for DomainLoads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, load) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} {} would hold {}", load.kind, load.name, load.shares)?;
        }
        Ok(())
    }
}

/// Where each share goes: `hosts()[i]` holds share index `i + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    hosts: Vec<HostId>,
    correlated: DomainLoads,
}

impl Placement {
    /// The host of each index, in index order (index 1 first).
    pub fn hosts(&self) -> &[HostId] {
        &self.hosts
    }

    /// (share index, host) pairs, index 1 first.
    pub fn assignments(&self) -> impl Iterator<Item = (u8, &HostId)> {
        (1..=u8::MAX).zip(self.hosts.iter())
    }

    /// The domains holding k or more shares: empty unless correlated placement was allowed and
    /// needed.
    pub fn correlated(&self) -> &DomainLoads {
        &self.correlated
    }
}

/// Places the n shares of a credential (see the module documentation).
pub fn place(request: &PlacementRequest<'_>) -> Result<Placement> {
    let candidates = request.candidates;
    let k = request.threshold.k();
    let n = request.threshold.n();
    check_candidates(candidates, n)?;
    let domains = Domains::of(candidates);
    let scores = Scores::compute(request);

    // Threshold guarantees k >= 2, so every domain may hold at least one share.
    let bound = usize::from(k).saturating_sub(1);
    let empty = Loads::new(&domains);
    if domains.fits(
        &empty,
        &vec![false; candidates.len()],
        bound,
        usize::from(n),
    ) {
        let chosen = choose(request, &domains, &scores, |loads, used, remaining| {
            domains.fits(loads, used, bound, remaining)
        })?;
        return Ok(Placement {
            hosts: host_ids(candidates, &chosen)?,
            correlated: DomainLoads::default(),
        });
    }

    let chosen = choose(request, &domains, &scores, |_, _, _| true)?;
    let loads = domains.overloads(&chosen, k);
    if !request.allow_correlated {
        return Err(PlacementError::Correlated { k, n, loads });
    }
    Ok(Placement {
        hosts: host_ids(candidates, &chosen)?,
        correlated: loads,
    })
}

fn check_candidates(candidates: &[Candidate], n: u8) -> Result<()> {
    if candidates.len() < usize::from(n) {
        return Err(PlacementError::NotEnoughHosts {
            eligible: candidates.len(),
            n,
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for candidate in candidates {
        if !seen.insert(&candidate.host) {
            return Err(PlacementError::DuplicateHost(candidate.host.clone()));
        }
    }
    Ok(())
}

/// The host ids of the chosen candidates, in index order.
fn host_ids(candidates: &[Candidate], chosen: &[usize]) -> Result<Vec<HostId>> {
    (1..=u8::MAX)
        .zip(chosen)
        .map(|(index, i)| {
            candidates
                .get(*i)
                .map(|c| c.host.clone())
                .ok_or(PlacementError::NoChoice { index })
        })
        .collect()
}

/// Places indexes 1..=n in order: each takes the best-scoring unused candidate that `keeps`
/// accepts (given the loads and used set after taking it, and the shares still to place).
fn choose(
    request: &PlacementRequest<'_>,
    domains: &Domains,
    scores: &Scores,
    keeps: impl Fn(&Loads, &[bool], usize) -> bool,
) -> Result<Vec<usize>> {
    let candidates = request.candidates;
    let n = request.threshold.n();
    let mut used = vec![false; candidates.len()];
    let mut loads = Loads::new(domains);
    let mut chosen = Vec::with_capacity(usize::from(n));
    for index in 1..=n {
        let remaining = usize::from(n - index);
        let mut choice = None;
        for candidate in scores.ranking(index, &used) {
            let (region, operator) = domains.of_candidate(candidate);
            loads.add(region, operator);
            set(&mut used, candidate, true);
            let ok = keeps(&loads, &used, remaining);
            if ok {
                choice = Some(candidate);
                break;
            }
            loads.remove(region, operator);
            set(&mut used, candidate, false);
        }
        chosen.push(choice.ok_or(PlacementError::NoChoice { index })?);
    }
    Ok(chosen)
}

fn set(flags: &mut [bool], i: usize, value: bool) {
    if let Some(flag) = flags.get_mut(i) {
        *flag = value;
    }
}

/// The candidates' regions and operators as small integers.
struct Domains {
    regions: Vec<DomainName>,
    operators: Vec<DomainName>,
    /// Per candidate: (region, operator).
    of: Vec<(usize, usize)>,
}

impl Domains {
    fn of(candidates: &[Candidate]) -> Self {
        let mut regions: Vec<DomainName> =
            candidates.iter().map(|c| c.domain.region.clone()).collect();
        regions.sort();
        regions.dedup();
        let mut operators: Vec<DomainName> = candidates
            .iter()
            .map(|c| c.domain.operator.clone())
            .collect();
        operators.sort();
        operators.dedup();
        let of = candidates
            .iter()
            .map(|c| {
                (
                    regions.binary_search(&c.domain.region).unwrap_or(0),
                    operators.binary_search(&c.domain.operator).unwrap_or(0),
                )
            })
            .collect();
        Self {
            regions,
            operators,
            of,
        }
    }

    fn of_candidate(&self, i: usize) -> (usize, usize) {
        self.of.get(i).copied().unwrap_or((0, 0))
    }

    /// Whether `remaining` more shares fit on unused candidates with no domain above `bound`.
    fn fits(&self, loads: &Loads, used: &[bool], bound: usize, remaining: usize) -> bool {
        if loads
            .regions
            .iter()
            .chain(&loads.operators)
            .any(|l| *l > bound)
        {
            return false;
        }
        if remaining == 0 {
            return true;
        }
        let regions = self.regions.len();
        let operators = self.operators.len();
        let source = 0;
        let sink = 1 + regions + operators;
        let mut network = flow::Network::new(sink + 1);
        for (r, load) in loads.regions.iter().enumerate() {
            network.add(source, 1 + r, bound.saturating_sub(*load));
        }
        for (o, load) in loads.operators.iter().enumerate() {
            network.add(1 + regions + o, sink, bound.saturating_sub(*load));
        }
        for ((region, operator), in_use) in self.of.iter().zip(used) {
            if !in_use {
                network.add(1 + region, 1 + regions + operator, 1);
            }
        }
        network.max_flow(source, sink, remaining) >= remaining
    }

    /// The domains that `hosts` load with `k` or more shares.
    fn overloads(&self, hosts: &[usize], k: u8) -> DomainLoads {
        let mut loads = Loads::new(self);
        for host in hosts {
            let (region, operator) = self.of_candidate(*host);
            loads.add(region, operator);
        }
        let heavy = |names: &[DomainName], counts: &[usize], kind| {
            names
                .iter()
                .zip(counts)
                .filter(|(_, count)| **count >= usize::from(k))
                .map(|(name, count)| DomainLoad {
                    kind,
                    name: name.clone(),
                    shares: u8::try_from(*count).unwrap_or(u8::MAX),
                })
                .collect::<Vec<_>>()
        };
        let mut out = heavy(&self.regions, &loads.regions, DomainKind::Region);
        out.extend(heavy(
            &self.operators,
            &loads.operators,
            DomainKind::Operator,
        ));
        DomainLoads(out)
    }
}

/// Shares per region and per operator.
struct Loads {
    regions: Vec<usize>,
    operators: Vec<usize>,
}

impl Loads {
    fn new(domains: &Domains) -> Self {
        Self {
            regions: vec![0; domains.regions.len()],
            operators: vec![0; domains.operators.len()],
        }
    }

    fn add(&mut self, region: usize, operator: usize) {
        if let Some(l) = self.regions.get_mut(region) {
            *l += 1;
        }
        if let Some(l) = self.operators.get_mut(operator) {
            *l += 1;
        }
    }

    fn remove(&mut self, region: usize, operator: usize) {
        if let Some(l) = self.regions.get_mut(region) {
            *l = l.saturating_sub(1);
        }
        if let Some(l) = self.operators.get_mut(operator) {
            *l = l.saturating_sub(1);
        }
    }
}

/// Every candidate's weight and `-log2 u` for every index.
struct Scores<'a> {
    candidates: &'a [Candidate],
    /// `neg_log2[(index - 1) * candidates + candidate]`.
    neg_log2: Vec<u64>,
}

impl<'a> Scores<'a> {
    fn compute(request: &PlacementRequest<'a>) -> Self {
        let mut neg_log2 = Vec::new();
        for index in 1..=request.threshold.n() {
            for candidate in request.candidates {
                let draw = draw(request.seed, request.credential, index, &candidate.host);
                neg_log2.push(neg_log2_of_draw(draw));
            }
        }
        Self {
            candidates: request.candidates,
            neg_log2,
        }
    }

    /// Unused candidates for `index`, best first.
    fn ranking(&self, index: u8, used: &[bool]) -> Vec<usize> {
        let row = usize::from(index.saturating_sub(1)) * self.candidates.len();
        let mut ranked: Vec<(usize, u64, u32, &HostId)> = self
            .candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.get(*i).copied().unwrap_or(true))
            .map(|(i, c)| {
                let l = self.neg_log2.get(row + i).copied().unwrap_or(u64::MAX);
                (i, l, c.weight.get(), &c.host)
            })
            .collect();
        ranked.sort_by(|a, b| compare_scores((a.2, a.1, a.3), (b.2, b.1, b.3)));
        ranked.into_iter().map(|(i, ..)| i).collect()
    }
}

/// Orders (weight, -log2 u, host) best first: higher `w / -log2 u`, then the smaller host id.
fn compare_scores(a: (u32, u64, &HostId), b: (u32, u64, &HostId)) -> Ordering {
    let (wa, la, ha) = a;
    let (wb, lb, hb) = b;
    // a beats b when wa / la > wb / lb, i.e. wa * lb > wb * la (all positive).
    let left = u128::from(wa) * u128::from(lb);
    let right = u128::from(wb) * u128::from(la);
    right.cmp(&left).then_with(|| ha.cmp(hb))
}

/// The 64-bit draw of host `host` for share `index` (module documentation).
pub fn draw(seed: &PlacementSeed, credential: &KeyId, index: u8, host: &HostId) -> u64 {
    let mut hash = Sha256::new();
    push_short(&mut hash, LABEL);
    hash.update(seed.as_bytes());
    push_short(&mut hash, credential.as_str().as_bytes());
    hash.update([index]);
    push_short(&mut hash, host.as_str().as_bytes());
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    if let Some(bytes) = digest.get(..8) {
        first.copy_from_slice(bytes);
    }
    u64::from_be_bytes(first)
}

fn push_short(hash: &mut Sha256, bytes: &[u8]) {
    hash.update([u8::try_from(bytes.len()).unwrap_or(u8::MAX)]);
    hash.update(bytes);
}

/// `-log2 u` for `u = (2 * (draw >> 12) + 1) / 2^53`, in fixed point with 32 fractional bits;
/// always at least 1 (u < 1).
pub fn neg_log2_of_draw(draw: u64) -> u64 {
    let x = 2 * (draw >> 12) + 1;
    (DRAW_BITS << FRACTION_BITS)
        .saturating_sub(log2_fixed(x))
        .max(1)
}

/// `log2 x` for `x >= 1` in fixed point with 32 fractional bits, truncated: the integer part
/// from the highest set bit, then one fractional bit per squaring of the mantissa in [1, 2).
fn log2_fixed(x: u64) -> u64 {
    if x == 0 {
        return 0;
    }
    let int = u64::from(63 - x.leading_zeros());
    // The mantissa in Q1.62: x / 2^int scaled to [2^62, 2^63).
    let mut m = if int <= 62 {
        u128::from(x) << (62 - int)
    } else {
        u128::from(x) >> (int - 62)
    };
    let mut fraction = 0u64;
    for bit in (0..FRACTION_BITS).rev() {
        m = (m * m) >> 62;
        if m >= 1 << 63 {
            m >>= 1;
            fraction |= 1 << bit;
        }
    }
    (int << FRACTION_BITS) | fraction
}
