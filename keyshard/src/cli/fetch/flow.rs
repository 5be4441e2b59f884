//! The fetch itself (spec E, steps 1-3): attest to the CMS, open the map it returns, then ask
//! every host of the map at once, each under its own deadline, and stop as soon as k valid
//! shares rebuild the credential. Step 4 (the output file) is the command's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::VerifyingKey;
use keyshard_attest::tpm::{PcrError, PcrSelection};
use keyshard_core::KeyId;
use keyshard_shards::ecies::MAX_SEALED_LEN;
use keyshard_shards::instance::wire::MAX_POLICY_LEN;
use keyshard_shards::instance::{self, FetchKey, InstanceEvidence};
use keyshard_shards::map::{ClientKey, MAX_SEALED_MAP_LEN, SealedShardMap, ShardMap};
use keyshard_tpm::TpmService;
use tokio::task::JoinSet;
use zeroize::Zeroizing;

use super::api::{ChallengeResponse, FetchRequest, FetchResponse, GrantEntry};
use super::collect::{Collector, HostReport};
use super::host::{self, HostFailure, HostRequest, HostTimings, Round};
use super::{FetchError, Result};
use crate::cli::CliError;
use crate::cli::credential::{CmsConfig, CredentialCliError, parse, read_answer_within};

/// A grant as the CMS lists it: the host and endpoint names, the sealed shard (hex) and the
/// grant (hex) with room for the JSON.
const MAX_GRANT_ENTRY_LEN: usize = 2 * MAX_SEALED_LEN + 2 * (MAX_POLICY_LEN + 512) + 1024;
/// The largest answer read from the CMS's fetch endpoint: the sealed map in base64 and one
/// grant per share (at most 255).
pub const MAX_FETCH_ANSWER_LEN: usize =
    MAX_SEALED_MAP_LEN * 4 / 3 + 4096 + 255 * MAX_GRANT_ENTRY_LEN;

/// What one fetch needs besides its TPM.
#[derive(Debug)]
pub struct FetchParams {
    pub name: KeyId,
    /// The instance's id, as enrolled (`keyshard instance enroll`).
    pub instance: String,
    /// Opens the map.
    pub client: ClientKey,
    /// The CMS's verifying key: the map's and every fragment's signature.
    pub cms_key: VerifyingKey,
    /// Each host's deadline, from the start of the host rounds.
    pub host_deadline: Duration,
}

/// HTTPS clients for the CMS and for the hosts: both trust only `--ca`.
#[derive(Debug, Clone)]
pub struct Clients {
    pub cms: reqwest::Client,
    pub cms_base: String,
    pub cms_timeout: Duration,
    /// Its timeout is a second past the host deadline.
    pub hosts: reqwest::Client,
}

impl Clients {
    /// Clients for `cms`, the host client's timeout being `host_deadline`.
    pub fn new(cms: &CmsConfig, host_deadline: Duration) -> Result<Self> {
        // A second past the deadline: the deadline, which names the host, always ends first.
        let hosts = CmsConfig {
            base: cms.base.clone(),
            ca: cms.ca.clone(),
            timeout: host_deadline.saturating_add(Duration::from_secs(1)),
        };
        Ok(Self {
            cms: crate::cli::credential::https_client(cms)?,
            cms_base: cms.base.clone(),
            cms_timeout: cms.timeout,
            hosts: crate::cli::credential::https_client(&hosts)?,
        })
    }
}

/// Where a fetch's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchTimings {
    /// `POST /v1/instances/{id}/challenge`.
    pub challenge: Duration,
    /// The fetch key, the quote for the CMS and the PCR read.
    pub cms_quote: Duration,
    /// `POST /v1/credentials/{name}/fetch`.
    pub cms_fetch: Duration,
    /// Opening the map and checking the grants.
    pub open_map: Duration,
    /// From the first host request to the rebuilt credential (or the last failure).
    pub hosts: Duration,
    pub total: Duration,
}

/// A fetched credential and the account of its hosts.
#[derive(Debug)]
pub struct Fetched {
    pub secret: Zeroizing<Vec<u8>>,
    pub name: KeyId,
    pub epoch: u64,
    pub k: u8,
    pub n: u8,
    /// Per host, in share index order.
    pub hosts: Vec<HostReport>,
    pub timings: FetchTimings,
}

impl Fetched {
    /// How many hosts released a valid share.
    pub fn released(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| h.status == super::collect::HostStatus::Released)
            .count()
    }
}

/// Runs a fetch (steps 1-3 of the module documentation).
pub async fn fetch(params: &FetchParams, clients: &Clients, tpm: &TpmService) -> Result<Fetched> {
    let started = Instant::now();
    let mut timings = FetchTimings::default();

    // Step 1: the CMS's nonce, evidence for it, the map and the grants.
    let mark = Instant::now();
    let challenge: ChallengeResponse = cms_post(
        clients,
        &format!("/v1/instances/{}/challenge", params.instance),
        b"{}".to_vec(),
        "challenge answer",
    )
    .await?;
    let nonce =
        host::nonce_bytes(&challenge.nonce).ok_or_else(|| CredentialCliError::Malformed {
            what: "challenge answer",
            reason: "nonce is not 32 bytes of hex".to_owned(),
        })?;
    let selection: PcrSelection =
        challenge
            .pcrs
            .parse()
            .map_err(|e: PcrError| CredentialCliError::Malformed {
                what: "challenge answer",
                reason: e.to_string(),
            })?;
    timings.challenge = mark.elapsed();

    let mark = Instant::now();
    let key = Arc::new(FetchKey::generate().map_err(|e| CliError::Random(e.to_string()))?);
    let qualifying = instance::qualifying_data(&nonce, &key.public_key());
    let (quote, pcrs) = {
        let (tpm, selection) = (tpm.clone(), selection.clone());
        tokio::task::spawn_blocking(move || {
            tpm.call(move |t| -> std::result::Result<_, keyshard_tpm::TpmError> {
                Ok((t.quote(&selection, &qualifying)?, t.read_pcrs(&selection)?))
            })
        })
        .await
        .map_err(|e| FetchError::Task(e.to_string()))???
    };
    let evidence = InstanceEvidence::new(nonce, key.public_key(), quote, pcrs.clone());
    timings.cms_quote = mark.elapsed();

    let mark = Instant::now();
    let evidence = hex::encode(evidence.to_bytes());
    let body = serde_json::to_vec(&FetchRequest {
        instance: &params.instance,
        evidence: &evidence,
    })
    .map_err(|e| CredentialCliError::Client(e.to_string()))?;
    let answer: FetchResponse = cms_post(
        clients,
        &format!("/v1/credentials/{}/fetch", params.name),
        body,
        "fetch answer",
    )
    .await?;
    timings.cms_fetch = mark.elapsed();

    // Step 2: the map, and the grants checked against it.
    let mark = Instant::now();
    let sealed =
        STANDARD
            .decode(answer.map.as_bytes())
            .map_err(|_| CredentialCliError::Malformed {
                what: "fetch answer",
                reason: "map is not base64".to_owned(),
            })?;
    let map = SealedShardMap::from_bytes(&sealed)
        .and_then(|sealed| sealed.open(&params.client, &params.cms_key, &params.name))
        .map_err(CredentialCliError::Map)?;
    let requests = host_requests(&map, &answer.grants);
    timings.open_map = mark.elapsed();

    // Step 3: every host at once.
    let mark = Instant::now();
    let round = Arc::new(Round {
        http: clients.hosts.clone(),
        tpm: tpm.clone(),
        key,
        selection,
        pcrs,
        credential: params.name.clone(),
        epoch: map.epoch(),
        done: Arc::new(AtomicBool::new(false)),
    });
    let (outcome, hosts) =
        ask_hosts(&map, &params.cms_key, round, requests, params.host_deadline).await;
    timings.hosts = mark.elapsed();
    timings.total = started.elapsed();
    let threshold = map.threshold();
    match outcome {
        Some(secret) => Ok(Fetched {
            secret,
            name: params.name.clone(),
            epoch: map.epoch(),
            k: threshold.k(),
            n: threshold.n(),
            hosts,
            timings,
        }),
        None => Err(FetchError::QuorumNotMet {
            released: hosts
                .iter()
                .filter(|h| h.status == super::collect::HostStatus::Released)
                .count(),
            name: params.name.clone(),
            epoch: map.epoch(),
            k: threshold.k(),
            n: threshold.n(),
            hosts,
        }
        .into()),
    }
}

/// Asks every host of `requests` at once, each under `deadline`; returns the rebuilt secret
/// (or `None`) and the account of every host of the map.
async fn ask_hosts(
    map: &ShardMap,
    cms_key: &VerifyingKey,
    round: Arc<Round>,
    requests: BTreeMap<u8, std::result::Result<HostRequest, HostFailure>>,
    deadline: Duration,
) -> (Option<Zeroizing<Vec<u8>>>, Vec<HostReport>) {
    let mut collector = Collector::new(map, cms_key);
    let mut tasks = JoinSet::new();
    for (index, request) in requests {
        match request {
            Ok(request) => {
                let round = Arc::clone(&round);
                tasks.spawn(async move {
                    let started = Instant::now();
                    let mut timings = HostTimings::default();
                    let answer =
                        tokio::time::timeout(deadline, host::run(&round, &request, &mut timings))
                            .await
                            .unwrap_or(Err(HostFailure::Deadline {
                                ms: deadline.as_millis(),
                            }));
                    timings.round = started.elapsed();
                    (request.index, answer, timings)
                });
            }
            Err(why) => {
                if let Some(done) = collector.offer(index, Err(why), HostTimings::default()) {
                    return (Some(done.secret), collector.reports());
                }
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((index, answer, timings)) = joined else {
            // A host task that panicked or was cancelled: its host stays unanswered and is
            // named below.
            continue;
        };
        if let Some(done) = collector.offer(index, answer, timings) {
            // Late answers are dropped with the tasks, and their quotes skipped.
            round.done.store(true, Ordering::Relaxed);
            tasks.abort_all();
            return (Some(done.secret), collector.reports());
        }
    }
    collector.fail_unanswered(|_| {
        HostFailure::Transport("its round ended without an answer".to_owned())
    });
    (None, collector.reports())
}

/// Each share index of the map with its host's request, or why there is none: the CMS's grant
/// must name the map's host for that index, once. The endpoint used is the map's (signed by the
/// CMS), and must be https.
pub(super) fn host_requests(
    map: &ShardMap,
    grants: &[GrantEntry],
) -> BTreeMap<u8, std::result::Result<HostRequest, HostFailure>> {
    let mut seen = BTreeSet::new();
    let mut by_index: BTreeMap<u8, &GrantEntry> = BTreeMap::new();
    let mut duplicated = BTreeSet::new();
    for grant in grants {
        if !seen.insert(grant.index) {
            duplicated.insert(grant.index);
        }
        by_index.insert(grant.index, grant);
    }
    map.shards()
        .map(|(index, location)| {
            let grant_error = |reason: String| HostFailure::Grant { index, reason };
            let request = match by_index.get(&index) {
                None => Err(HostFailure::NoGrant { index }),
                Some(_) if duplicated.contains(&index) => {
                    Err(grant_error("appears more than once".to_owned()))
                }
                Some(grant) if grant.host != location.host.as_str() => Err(grant_error(format!(
                    "names host {:?}, the signed map {}",
                    grant.host, location.host
                ))),
                Some(grant) => {
                    let endpoint = location.endpoint.as_str().trim_end_matches('/');
                    if endpoint.strip_prefix("https://").is_none_or(str::is_empty) {
                        Err(grant_error(format!(
                            "is for endpoint {endpoint:?}, which is not https"
                        )))
                    } else {
                        Ok(HostRequest {
                            index,
                            host: location.host.clone(),
                            endpoint: endpoint.to_owned(),
                            grant: grant.grant.clone(),
                            sealed_shard: grant.sealed_shard.clone(),
                        })
                    }
                }
            };
            (index, request)
        })
        .collect()
}

async fn cms_post<T: serde::de::DeserializeOwned>(
    clients: &Clients,
    path: &str,
    body: Vec<u8>,
    what: &'static str,
) -> Result<T> {
    let url = format!("{}{path}", clients.cms_base);
    let sent = clients
        .cms
        .post(&url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let answer = read_answer_within(sent, &url, clients.cms_timeout, MAX_FETCH_ANSWER_LEN).await?;
    parse(&answer, what)
}
