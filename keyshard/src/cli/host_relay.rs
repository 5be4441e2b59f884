//! The coordinator's relay of `host` shares over HTTPS (issue 9 item 8; the design is in
//! `keyshard_core::host_class`): for one guest request, the CMS's challenge and fetch (the
//! grants), then the shard host holding the requested slot (`/v1/nonces`, `/v1/release`).
//! Each quote is the VM's TPM (`keyshard coordinator --vm-tcti`) over that party's nonce and
//! the guest's request key (`keyshard_shards::instance::qualifying_data`), so what the shard host
//! releases is sealed to the guest's key: the relay passes ciphertext on.
//!
//! Deadlines: the CMS exchange has its own, the shard host exchange its own, and each HTTPS
//! request the client's timeout besides; a dead, refusing or hung CMS or shard host is a
//! refusal ([`RefusalCode::HostShare`]) naming it, never a hung boot. Only the CA of the state
//! (`cms/ca.pem`) is trusted, for the CMS and the shard hosts alike.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use keyshard_attest::tpm::PcrSelection;
use keyshard_cms::server::fetch::{FetchRequest, FetchResponse, GrantEntry};
use keyshard_cms::server::instances::InstanceChallengeResponse;
use keyshard_cms::shard_host::server::{HostNonceResponse, ReleaseRequest, ReleaseResponse};
use keyshard_coordinator::host_relay::{HostShareRelay, HostShareRequest, RelayedShard};
use keyshard_coordinator::release::Refusal;
use keyshard_coordinator::state::{CmsLink, StateDir};
use keyshard_core::KeyId;
use keyshard_core::broker::RefusalCode;
use keyshard_shards::grant::Grant;
use keyshard_shards::instance::{FetchPublicKey, InstanceEvidence, Nonce, qualifying_data};
use keyshard_tpm::TpmService;
use tokio::time::Instant;

use super::credential::{CmsConfig, https_client, parse, read_answer};
use super::error::CliError;

/// How long the CMS's challenge and fetch may take together, by default.
pub const DEFAULT_CMS_DEADLINE: Duration = Duration::from_secs(5);
/// How long one shard host's nonce and release may take together, by default.
pub const DEFAULT_HOST_DEADLINE: Duration = Duration::from_secs(5);

/// How much longer than the longer deadline one HTTPS request may take, so that a hung party
/// always reads as the deadline's `no answer within N ms`.
const CLIENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

/// Relays one state's `host` releases.
pub struct CmsRelay {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    cms: String,
    instance: String,
    credential: KeyId,
    vm_tpm: TpmService,
    cms_deadline: Duration,
    host_deadline: Duration,
}

impl CmsRelay {
    /// The relay for the key in `dir`, placed through `link`, quoting with `vm_tpm`.
    pub fn new(
        dir: &StateDir,
        credential: KeyId,
        link: &CmsLink,
        vm_tpm: TpmService,
        cms_deadline: Duration,
        host_deadline: Duration,
    ) -> Result<Self, CliError> {
        let config = CmsConfig {
            base: link.url.trim_end_matches('/').to_owned(),
            ca: dir.cms_ca(),
            // A backstop only: the deadlines below fire first, with their own message.
            timeout: cms_deadline.max(host_deadline) + CLIENT_TIMEOUT_MARGIN,
        };
        let client = https_client(&config)?;
        // Each mailbox thread blocks on it in turn; one worker serves them all.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(CliError::Runtime)?;
        Ok(Self {
            runtime,
            client,
            cms: config.base,
            instance: link.instance_id.clone(),
            credential,
            vm_tpm,
            cms_deadline,
            host_deadline,
        })
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        body: &B,
        what: &'static str,
    ) -> Result<T, String> {
        let sent = self.client.post(url).json(body).send().await;
        let timeout = self.cms_deadline.max(self.host_deadline) + CLIENT_TIMEOUT_MARGIN;
        let answer = read_answer(sent, url, timeout)
            .await
            .map_err(|e| e.to_string())?;
        parse(&answer, what).map_err(|e| e.to_string())
    }

    /// The VM TPM's evidence for `nonce`, binding the guest's `key`.
    fn evidence(
        &self,
        selection: &PcrSelection,
        nonce: &Nonce,
        key: &FetchPublicKey,
    ) -> Result<InstanceEvidence, String> {
        let quote = self
            .vm_tpm
            .quote(selection, &qualifying_data(nonce, key))
            .map_err(|e| format!("the VM's TPM could not quote: {e}"))?;
        let pcrs = self
            .vm_tpm
            .read_pcrs(selection)
            .map_err(|e| format!("the VM's TPM could not read its PCRs: {e}"))?;
        Ok(InstanceEvidence::new(*nonce, *key, quote, pcrs))
    }

    /// The CMS's grant for `slot`, the PCR selection to quote, within the CMS deadline.
    fn grant(&self, key: &FetchPublicKey, slot: u8) -> Result<(GrantEntry, PcrSelection), String> {
        let deadline = Instant::now() + self.cms_deadline;
        let cms = &self.cms;
        let challenge: InstanceChallengeResponse = self.within(
            deadline,
            self.cms_deadline,
            self.post(
                &format!("{cms}/v1/instances/{}/challenge", self.instance),
                &serde_json::json!({}),
                "challenge",
            ),
        )?;
        let selection = PcrSelection::from_str(&challenge.pcrs)
            .map_err(|e| format!("the challenge's PCRs {:?}: {e}", challenge.pcrs))?;
        let nonce = nonce_from(&challenge.nonce)?;
        let evidence = self.evidence(&selection, &nonce, key)?;
        let fetched: FetchResponse = self.within(
            deadline,
            self.cms_deadline,
            self.post(
                &format!("{cms}/v1/credentials/{}/fetch", self.credential),
                &FetchRequest {
                    instance: self.instance.clone(),
                    evidence: hex::encode(evidence.to_bytes()),
                },
                "fetch answer",
            ),
        )?;
        let grant = fetched
            .grants
            .into_iter()
            .find(|g| g.index == slot)
            .ok_or_else(|| format!("the CMS granted no share in slot {slot}"))?;
        Ok((grant, selection))
    }

    /// The shard host's released shard (`KSRS` bytes) for `grant`, within the host deadline.
    fn release(
        &self,
        grant: &GrantEntry,
        selection: &PcrSelection,
        key: &FetchPublicKey,
    ) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.host_deadline;
        let endpoint = grant.endpoint.trim_end_matches('/');
        let nonce: HostNonceResponse = self.within(
            deadline,
            self.host_deadline,
            self.post(
                &format!("{endpoint}/v1/nonces"),
                &serde_json::json!({}),
                "nonce",
            ),
        )?;
        let evidence = self.evidence(selection, &nonce_from(&nonce.nonce)?, key)?;
        let released: ReleaseResponse = self.within(
            deadline,
            self.host_deadline,
            self.post(
                &format!("{endpoint}/v1/release"),
                &ReleaseRequest {
                    grant: grant.grant.clone(),
                    sealed_shard: grant.sealed_shard.clone(),
                    evidence: hex::encode(evidence.to_bytes()),
                },
                "release answer",
            ),
        )?;
        hex::decode(&released.released).map_err(|_| "the released shard is not hex".to_owned())
    }

    /// Runs `work` until `deadline`, the end of a phase of `budget` (named when it passes).
    fn within<T>(
        &self,
        deadline: Instant,
        budget: Duration,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        // The timer is made inside the runtime, which drives it.
        self.runtime
            .block_on(async { tokio::time::timeout_at(deadline, work).await })
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", budget.as_millis())))
    }
}

impl HostShareRelay for CmsRelay {
    fn relay(&self, request: &HostShareRequest<'_>) -> Result<RelayedShard, Refusal> {
        let key = FetchPublicKey::from_bytes(*request.request_key);
        let refused = |reason: String| Refusal::new(RefusalCode::HostShare, reason);
        let (grant, selection) = self
            .grant(&key, request.slot)
            .map_err(|e| refused(format!("CMS {}: {e}", self.cms)))?;
        let host = &grant.host;
        let epoch = hex::decode(&grant.grant)
            .ok()
            .and_then(|bytes| Grant::from_bytes(&bytes).ok())
            .map(|g| g.statement().epoch)
            .ok_or_else(|| refused(format!("CMS {}: an unreadable grant for {host}", self.cms)))?;
        let released = self
            .release(&grant, &selection, &key)
            .map_err(|e| refused(format!("shard host {host}: {}", about_the_host(&e))))?;
        log::info!(
            "{}: {} released by shard host {host} (relayed sealed to the guest)",
            request.vm_id,
            request.holder
        );
        Ok(RelayedShard {
            credential: self.credential.clone(),
            epoch,
            index: grant.index,
            host: grant.host,
            released,
        })
    }
}

/// The HTTPS client's errors name the CMS; in the shard host's part they are about the host.
fn about_the_host(error: &str) -> String {
    error.replace("the CMS's", "its").replace("the CMS", "it")
}

fn nonce_from(text: &str) -> Result<Nonce, String> {
    hex::decode(text)
        .ok()
        .and_then(|bytes| Nonce::try_from(bytes).ok())
        .ok_or_else(|| "a nonce that is not 32 bytes of hex".to_owned())
}
