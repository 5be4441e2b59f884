//! A compute instance's fetch: `POST /v1/credentials/{name}/fetch`. The CMS checks the instance
//! (enrolled, admitted by the credential's instance policy, its evidence verifying against its
//! registered AK and golden PCRs) and answers with the client's sealed shard map and one grant
//! per shard, which the instance takes to each shard host.
//!
//! | request | answer |
//! |---|---|
//! | [`FetchRequest`]: `{"instance": ID, "evidence": hex KSIE}`, the evidence answering a nonce from `POST /v1/instances/{id}/challenge` | 200 [`FetchResponse`] |
//!
//! Checked in this order; the first failure is the answer:
//! 1. the name, the instance id and the evidence parse: else 422 `invalid_request`;
//! 2. the credential is stored: else 404 `not_found`;
//! 3. the nonce the evidence answers is spent in the store (single use across replicas): an
//!    unknown, used or expired nonce -> 403 `nonce_refused`; from here on it is used up;
//! 4. the instance is registered (`instances/<id>`): else 403 `not_enrolled`;
//! 5. the evidence verifies against the registered AK and golden PCRs, bound to the nonce and
//!    the instance's ephemeral key (`keyshard_shards::instance::verify`): else 403
//!    `evidence_refused` with the reason (which names changed PCRs);
//! 6. the credential's instance policy names the instance, with the AK name pinned for it now:
//!    else 403 `forbidden` (an instance enrolled again with another TPM since the put is not
//!    the instance the client admitted). After the evidence, so that whether an instance is
//!    admitted is told to that instance only, not to anyone holding a nonce who names it.
//!
//! Each grant (`keyshard_shards::grant`) names the credential, epoch, index, host, the
//! instance, its registered policy and the SHA-256 of the sealed shard, and is good for
//! [`grant::LIFETIME`]: a shard host releases only under it, to evidence that verifies against
//! that policy and answers the host's own nonce.

use std::time::SystemTime;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyshard_shards::InstanceId;
use keyshard_shards::grant::{self, GrantStatement};
use keyshard_shards::instance::wire::MAX_EVIDENCE_LEN;
use keyshard_shards::instance::{InstanceEvidence, verify};
use serde::{Deserialize, Serialize};

use super::api::AppState;
use super::credentials::{credential_error, credential_name};
use super::error::ApiError;
use super::hosts::{invalid, store_error};
use super::request::ApiJson;
use crate::credential::{self, CredentialError};
use crate::instances::get_instance;
use crate::shard_host::nonces::take_from_store;
use crate::store::StoreError;

/// `POST /v1/credentials/{name}/fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// The instance's id, as enrolled.
    pub instance: String,
    /// Its evidence (`KSIE`, hex) for a nonce from `POST /v1/instances/{id}/challenge`.
    pub evidence: String,
}

/// The answer to a fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchResponse {
    /// The credential's signed shard map sealed to its client key (`KSMS`), standard base64:
    /// what `GET /v1/credentials/{name}/map` gives the client.
    pub map: String,
    /// One grant per shard of the map, index 1 first.
    pub grants: Vec<GrantEntry>,
}

/// Where to take one shard, and the grant to take it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantEntry {
    pub host: String,
    /// The host's endpoint, as the map names it.
    pub endpoint: String,
    pub index: u8,
    /// The sealed shard (`KSSE`) the CMS stored for this index, hex.
    pub sealed_shard: String,
    /// The grant (`KSGR`), hex.
    pub grant: String,
}

impl FetchRequest {
    /// The instance id and the evidence parsed (bounded hex, then the strict `KSIE` format);
    /// a 422 `invalid_request` naming the field otherwise.
    pub fn parse(&self) -> Result<(InstanceId, InstanceEvidence), ApiError> {
        let instance = InstanceId::new(self.instance.clone())
            .map_err(|e| invalid(format!("instance: {e}")))?;
        if self.evidence.len() > MAX_EVIDENCE_LEN.saturating_mul(2) {
            return Err(invalid(format!(
                "evidence: longer than {MAX_EVIDENCE_LEN} bytes"
            )));
        }
        let evidence = hex::decode(&self.evidence)
            .map_err(|_| invalid("evidence: not hex"))
            .and_then(|bytes| {
                InstanceEvidence::from_bytes(&bytes).map_err(|e| invalid(format!("evidence: {e}")))
            })?;
        Ok((instance, evidence))
    }
}

/// `POST /v1/credentials/{name}/fetch` (module documentation).
pub(super) async fn fetch(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    ApiJson(request): ApiJson<FetchRequest>,
) -> Result<axum::Json<FetchResponse>, ApiError> {
    let name = credential_name(name)?;
    let (instance, evidence) = request.parse()?;
    let store = &*state.store;
    let stored = credential::load(store, &name)
        .await
        .map_err(credential_error)?
        .ok_or_else(|| credential_error(CredentialError::NotFound { name: name.clone() }))?;
    take_from_store(store, evidence.nonce())
        .await
        .map_err(|e| match e {
            StoreError::NonceUnknown | StoreError::NonceExpired { .. } => ApiError::NonceRefused {
                reason: e.to_string(),
            },
            other => store_error(other),
        })?;
    let record = get_instance(store, &instance)
        .await
        .map_err(|e| {
            log::error!("instance {instance}: {e}");
            ApiError::StoreUnavailable
        })?
        .ok_or_else(|| ApiError::NotEnrolled {
            reason: format!("instance {instance} is not registered"),
        })?;
    // The evidence first: whether an instance is admitted to a credential is told only to that
    // instance, not to whoever holds a nonce and names it.
    let policy = record.policy();
    verify(&evidence, &policy, evidence.nonce()).map_err(|e| ApiError::EvidenceRefused {
        reason: e.to_string(),
    })?;
    let Some(admitted) = stored.instances.iter().find(|a| a.id == instance) else {
        return Err(ApiError::Forbidden {
            reason: format!("instance {instance} may not fetch credential {name}"),
        });
    };
    if admitted.ak_name != record.ak_name {
        return Err(ApiError::Forbidden {
            reason: format!(
                "instance {instance} is enrolled with another attestation key (name {}) than \
                 credential {name}'s instance policy names",
                hex::encode(record.ak_name)
            ),
        });
    }
    let map = stored
        .signed_map
        .verify(&state.signing_key.verifying_key())
        .map_err(|e| {
            log::error!("credential {name}: the stored map: {e}");
            ApiError::Internal
        })?;
    let not_after_ms = grant::unix_ms(SystemTime::now() + grant::LIFETIME).map_err(|e| {
        log::error!("{e}");
        ApiError::Internal
    })?;
    let grants = stored
        .shards
        .iter()
        .map(|(index, host, sealed)| {
            let location = map
                .shard(*index)
                .filter(|l| &l.host == host)
                .ok_or_else(|| {
                    log::error!("credential {name}: the map and the shards disagree on {index}");
                    ApiError::Internal
                })?;
            let statement = GrantStatement {
                credential: name.clone(),
                epoch: stored.epoch,
                index: *index,
                host: host.clone(),
                instance: instance.clone(),
                policy: policy.clone(),
                shard_digest: grant::shard_digest(sealed),
                not_after_ms,
            };
            Ok(GrantEntry {
                host: host.to_string(),
                endpoint: location.endpoint.as_str().to_owned(),
                index: *index,
                sealed_shard: hex::encode(sealed.to_bytes()),
                grant: hex::encode(statement.sign(&state.signing_key).to_bytes()),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    log::info!(
        "credential {name}: {} grants to instance {instance}",
        grants.len()
    );
    Ok(axum::Json(FetchResponse {
        map: STANDARD.encode(stored.sealed_map.to_bytes()),
        grants,
    }))
}
