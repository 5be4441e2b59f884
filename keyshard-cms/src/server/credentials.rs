//! The credential endpoints: put (wiring [`put_credential`]) and a client's sealed shard map
//! (wiring [`map_for`]).
//!
//! | method and path | request | answer |
//! |---|---|---|
//! | `POST /v1/credentials/{name}` | [`PutCredentialRequest`] | 201 [`PutCredentialResponse`]; 409 `exists` when the name is stored; 409 `placement_refused` naming the domains when no spread placement exists (or too few fresh hosts); 422 `invalid_request` for a bad threshold, key, seed or secret |
//! | `GET /v1/credentials/{name}/map?client=KEY` | none | 200 [`SealedMapResponse`]; 404 `not_found`; 403 `forbidden` when the map is sealed to another client key |
//!
//! A client key (`client` in the body or the query) is the X25519 public key: 64 hex digits,
//! or base64 (standard or URL-safe, padding optional; in a query use the URL-safe alphabet).
//!
//! # The secret in the request
//!
//! The credential travels in the put's body, base64, protected in transit by TLS only. The CMS
//! decodes it straight into a `Zeroizing` buffer (no intermediate `String`), the dealer reads
//! it, and the buffer is wiped when the handler returns; the request body's own buffer is wiped
//! too when the server holds its only reference. What that does not cover: copies in
//! hyper's and rustls' read buffers, and anyone who can read the CMS process's memory while a
//! put runs (root on the CMS host): the CMS sees every credential in the clear, once.

use std::time::SystemTime;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use keyshard_core::{KeyId, Threshold};
use keyshard_shards::map::ClientPublicKey;
use keyshard_shards::placement::{PlacementError, PlacementSeed};
use keyshard_shards::{HostId, InstanceId};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::api::AppState;
use super::error::ApiError;
use super::hosts::{invalid, path_segment, registry_error, store_error};
use super::request::WipedJson;
use crate::credential::{
    AK_NAME_LEN, AdmittedInstance, CredentialError, MAX_INSTANCES, PutRequest, map_for,
    put_credential,
};

/// The longest query string read, in bytes.
const MAX_QUERY_LEN: usize = 512;

/// A secret sent as base64, decoded into a `Zeroizing` buffer. Its `Debug` shows the length only.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBase64(pub Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SecretBase64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBase64({} bytes)", self.0.len())
    }
}

impl Serialize for SecretBase64 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let encoded = Zeroizing::new(STANDARD.encode(self.0.as_slice()));
        serializer.serialize_str(&encoded)
    }
}

impl<'de> Deserialize<'de> for SecretBase64 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SecretBase64;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the secret as standard base64")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<SecretBase64, E> {
                let mut out = Zeroizing::new(Vec::with_capacity(text.len() / 4 * 3 + 3));
                // The decoder's own error names an offending byte: a byte of the secret.
                STANDARD
                    .decode_vec(text, &mut out)
                    .map_err(|_| E::custom("secret: not standard base64"))?;
                Ok(SecretBase64(out))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// `POST /v1/credentials/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutCredentialRequest {
    /// The credential, standard base64 (1..=1024 bytes decoded).
    pub secret: SecretBase64,
    /// Shares needed, 2..=n.
    pub k: u8,
    /// Shares made, one per host.
    pub n: u8,
    /// Whom the shard map is sealed to: the client's X25519 public key (hex or base64).
    pub client: String,
    /// The placement seed, 64 hex digits; a random one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    /// Place even when no placement keeps every region and operator below k.
    #[serde(default)]
    pub allow_correlated: bool,
    /// The instances that may fetch the credential (at most 64); absent or empty: none may,
    /// the credential is reachable through its map only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceEntry>,
}

/// One instance of a put's instance policy (`keyshard credential put --instance-policy F`
/// reads `{"instances": [...]}` of these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceEntry {
    /// The instance's id (`a-z 0-9 . _ -`, 1..=64).
    pub id: String,
    /// The TPM name of the attestation key pinned at its enrolment (34 bytes, hex), as
    /// `keyshard instance enroll` prints it.
    pub ak_name: String,
}

impl InstanceEntry {
    /// The entry parsed into its types; a 422 naming the entry otherwise.
    pub fn parse(&self) -> Result<AdmittedInstance, ApiError> {
        let id = InstanceId::new(self.id.clone())
            .map_err(|e| invalid(format!("instances: instance id: {e}")))?;
        let ak_name = hex::decode(&self.ak_name)
            .ok()
            .and_then(|bytes| <[u8; AK_NAME_LEN]>::try_from(bytes).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "instances: {id}: ak_name must be {AK_NAME_LEN} bytes of hex"
                ))
            })?;
        Ok(AdmittedInstance { id, ak_name })
    }
}

/// A put request's fields parsed into their types.
#[derive(Debug)]
pub struct ParsedPut {
    pub threshold: Threshold,
    pub client: ClientPublicKey,
    pub seed: PlacementSeed,
    pub instances: Vec<AdmittedInstance>,
}

impl PutCredentialRequest {
    /// Parses the threshold, client key and seed (drawing a random seed when none is given).
    pub fn parse(&self) -> Result<ParsedPut, ApiError> {
        let threshold = Threshold::new(self.k, self.n).map_err(|e| invalid(e.to_string()))?;
        Ok(ParsedPut {
            threshold,
            client: parse_client_key(&self.client)?,
            seed: parse_seed(self.seed.as_deref())?,
            instances: parse_instances(&self.instances)?,
        })
    }
}

/// A placement seed of 64 hex digits, or a random one when none is given.
pub fn parse_seed(seed: Option<&str>) -> Result<PlacementSeed, ApiError> {
    match seed {
        None => PlacementSeed::random().map_err(|e| {
            log::error!("placement seed: {e}");
            ApiError::Internal
        }),
        Some(text) => {
            let bytes: [u8; 32] = hex::decode(text)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| invalid("seed: must be 64 hex digits"))?;
            Ok(PlacementSeed::from_bytes(bytes))
        }
    }
}

/// An instance policy: at most [`MAX_INSTANCES`] entries, each parsed.
pub fn parse_instances(entries: &[InstanceEntry]) -> Result<Vec<AdmittedInstance>, ApiError> {
    if entries.len() > MAX_INSTANCES {
        return Err(invalid(format!(
            "instances: {} entries, at most {MAX_INSTANCES} are allowed",
            entries.len()
        )));
    }
    entries.iter().map(InstanceEntry::parse).collect()
}

/// The answer to a put: the map's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutCredentialResponse {
    pub name: String,
    pub epoch: u64,
    pub k: u8,
    pub n: u8,
    /// The host of each share index, index 1 first.
    pub hosts: Vec<String>,
    /// The placement seed, hex: anyone can recompute the placement from it.
    pub seed: String,
    /// The domains holding k or more shares; empty unless allowed and needed.
    pub correlated: String,
    /// The record's store revision.
    pub revision: u64,
}

/// The answer to a map request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedMapResponse {
    pub name: String,
    /// The signed shard map sealed to the client's key (`SealedShardMap` bytes), standard base64.
    pub sealed_map: String,
}

/// `POST /v1/credentials/{name}`.
pub(super) async fn put(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    WipedJson(request): WipedJson<PutCredentialRequest>,
) -> Result<(StatusCode, axum::Json<PutCredentialResponse>), ApiError> {
    let name = credential_name(name)?;
    let parsed = request.parse()?;
    let receipt = put_credential(
        &*state.store,
        &state.registry,
        &state.signing_key,
        &PutRequest {
            name: &name,
            secret: request.secret.0.as_slice(),
            threshold: parsed.threshold,
            client: &parsed.client,
            seed: parsed.seed,
            allow_correlated: request.allow_correlated,
            instances: &parsed.instances,
        },
        SystemTime::now(),
    )
    .await
    .map_err(credential_error)?;
    drop(request);
    let answer = PutCredentialResponse {
        name: name.to_string(),
        epoch: receipt.epoch,
        k: parsed.threshold.k(),
        n: parsed.threshold.n(),
        hosts: receipt
            .placement
            .hosts()
            .iter()
            .map(HostId::to_string)
            .collect(),
        seed: hex::encode(parsed.seed.as_bytes()),
        correlated: receipt.placement.correlated().to_string(),
        revision: receipt.revision.get(),
    };
    Ok((StatusCode::CREATED, axum::Json(answer)))
}

/// `GET /v1/credentials/{name}/map?client=KEY`.
pub(super) async fn map(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<axum::Json<SealedMapResponse>, ApiError> {
    let name = credential_name(name)?;
    let client = parse_client_key(&client_query(uri.query())?)?;
    let sealed = map_for(&*state.store, &name, &client)
        .await
        .map_err(credential_error)?;
    Ok(axum::Json(SealedMapResponse {
        name: name.to_string(),
        sealed_map: STANDARD.encode(sealed.to_bytes()),
    }))
}

/// The `client` parameter of a query: exactly one, nothing else.
pub fn client_query(query: Option<&str>) -> Result<String, ApiError> {
    let query = query.unwrap_or_default();
    if query.len() > MAX_QUERY_LEN {
        return Err(invalid(format!(
            "the query is longer than {MAX_QUERY_LEN} bytes"
        )));
    }
    let mut client = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("client", value)) if client.is_none() => client = Some(value.to_owned()),
            Some(("client", _)) => return Err(invalid("client: given twice")),
            _ => return Err(invalid("the query may hold only client=KEY")),
        }
    }
    client.ok_or_else(|| invalid("the query needs client=KEY (the X25519 public key)"))
}

/// An X25519 public key: 64 hex digits, or base64 of 32 bytes (any of the four alphabets).
pub fn parse_client_key(text: &str) -> Result<ClientPublicKey, ApiError> {
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()
    } else {
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
    };
    let bytes: [u8; 32] = bytes
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| invalid("client: must be a 32-byte X25519 public key, hex or base64"))?;
    Ok(ClientPublicKey::from_bytes(bytes))
}

pub(super) fn credential_name(
    name: Result<Path<String>, PathRejection>,
) -> Result<KeyId, ApiError> {
    KeyId::new(path_segment(name)?).map_err(|e| invalid(format!("credential name: {e}")))
}

/// Credential errors as API errors (module documentation).
pub(super) fn credential_error(error: CredentialError) -> ApiError {
    match error {
        CredentialError::Store(e) => store_error(e),
        CredentialError::Registry(e) => registry_error(e),
        CredentialError::Placement { name, source } => match source {
            PlacementError::NotEnoughHosts { .. } | PlacementError::Correlated { .. } => {
                ApiError::PlacementRefused {
                    reason: format!("credential {name}: {source}"),
                }
            }
            other => {
                log::error!("credential {name}: placement: {other}");
                ApiError::Internal
            }
        },
        e @ CredentialError::Instances { .. } => invalid(e.to_string()),
        // The dealer's refusals are about the request (the secret's length); never its bytes.
        CredentialError::Deal { name, source } => invalid(format!("credential {name}: {source}")),
        e @ CredentialError::Exists { .. } => ApiError::Exists {
            reason: e.to_string(),
        },
        e @ CredentialError::NotFound { .. } => ApiError::NotFound {
            path: e.to_string(),
        },
        e @ CredentialError::OtherClient { .. } => ApiError::Forbidden {
            reason: e.to_string(),
        },
        e @ (CredentialError::PlacedUnknownHost { .. }
        | CredentialError::MissingFragment { .. }
        | CredentialError::Seal { .. }
        | CredentialError::Map { .. }
        | CredentialError::Record { .. }) => {
            log::error!("{e}");
            ApiError::Internal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::parse_body;
    use super::*;

    const JSON: Option<&[u8]> = Some(b"application/json");

    fn put(body: &str) -> Result<PutCredentialRequest, ApiError> {
        parse_body(JSON, body.as_bytes(), 4096)
    }

    #[test]
    fn a_put_body_parses_and_its_secret_is_never_printed() {
        let request = put(&format!(
            r#"{{"secret":"aHVudGVyMg==","k":2,"n":3,"client":"{}"}}"#,
            "ab".repeat(32)
        ))
        .unwrap();
        assert_eq!(request.secret.0.as_slice(), b"hunter2");
        assert!(!request.allow_correlated);
        assert!(!format!("{request:?}").contains("hunter2"));
        let parsed = request.parse().unwrap();
        assert_eq!(parsed.client.as_bytes(), &[0xab; 32]);
        let encoded = serde_json::to_vec(&request).unwrap();
        assert_eq!(
            put(std::str::from_utf8(&encoded).unwrap()).unwrap(),
            request
        );
    }

    #[test]
    fn bad_put_fields_are_refused_without_echoing_the_secret() {
        let client = "ab".repeat(32);
        for (body, says) in [
            (
                format!(r#"{{"secret":"aHVudGVy!!","k":2,"n":3,"client":"{client}"}}"#),
                "not standard base64",
            ),
            (
                format!(r#"{{"secret":7,"k":2,"n":3,"client":"{client}"}}"#),
                "invalid type",
            ),
            (
                format!(r#"{{"secret":"aGk=","k":2,"n":3,"client":"{client}","x":1}}"#),
                "unknown field",
            ),
            (
                format!(r#"{{"secret":"aGk=","k":2,"n":300,"client":"{client}"}}"#),
                "invalid value",
            ),
        ] {
            let err = put(&body).unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{body}");
            assert!(err.to_string().contains(says), "{body}: {err}");
            assert!(!err.to_string().contains("aHVudGVy"), "{err}");
        }
        for (k, n, client, seed, says) in [
            (1, 3, client.as_str(), None, "threshold"),
            (4, 3, client.as_str(), None, "4"),
            (2, 3, "abcd", None, "client"),
            (2, 3, client.as_str(), Some("zz"), "seed"),
        ] {
            let request = PutCredentialRequest {
                secret: SecretBase64(Zeroizing::new(b"x".to_vec())),
                k,
                n,
                client: client.to_owned(),
                seed: seed.map(str::to_owned),
                allow_correlated: false,
                instances: Vec::new(),
            };
            let err = request.parse().unwrap_err();
            assert_eq!(err.code(), "invalid_request");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn item3_a_puts_instance_policy_parses_into_ids_and_ak_names() {
        let client = "ab".repeat(32);
        let name = format!("000b{}", "cd".repeat(32));
        let request = put(&format!(
            r#"{{"secret":"aGk=","k":2,"n":3,"client":"{client}","instances":[{{"id":"vm-1","ak_name":"{name}"}}]}}"#
        ))
        .unwrap();
        let parsed = request.parse().unwrap();
        assert_eq!(parsed.instances.len(), 1);
        assert_eq!(parsed.instances[0].id.as_str(), "vm-1");
        assert_eq!(hex::encode(parsed.instances[0].ak_name), name);
        // Absent: none may fetch.
        let bare = put(&format!(
            r#"{{"secret":"aGk=","k":2,"n":3,"client":"{client}"}}"#
        ))
        .unwrap();
        assert!(bare.parse().unwrap().instances.is_empty());
        let entry = |id: &str, ak_name: &str| InstanceEntry {
            id: id.to_owned(),
            ak_name: ak_name.to_owned(),
        };
        for (entries, says) in [
            (vec![entry("VM-1", &name)], "instance id"),
            (vec![entry("vm-1", "000b")], "ak_name must be 34 bytes"),
            (vec![entry("vm-1", &"zz".repeat(34))], "ak_name"),
            (vec![entry("vm-1", &name); 65], "at most 64"),
        ] {
            let request = PutCredentialRequest {
                instances: entries,
                ..bare.clone()
            };
            let err = request.parse().unwrap_err();
            assert_eq!(err.code(), "invalid_request");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn client_keys_read_as_hex_or_any_base64() {
        let key = [0xfb_u8; 32];
        for text in [
            hex::encode(key),
            STANDARD.encode(key),
            STANDARD_NO_PAD.encode(key),
            URL_SAFE.encode(key),
            URL_SAFE_NO_PAD.encode(key),
        ] {
            assert_eq!(parse_client_key(&text).unwrap().as_bytes(), &key, "{text}");
        }
        for bad in ["", "00", &"0".repeat(63), &STANDARD.encode([1u8; 31])] {
            assert!(parse_client_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_map_query_holds_one_client_and_nothing_else() {
        assert_eq!(client_query(Some("client=abc")).unwrap(), "abc");
        for bad in [
            None,
            Some(""),
            Some("client=a&client=b"),
            Some("client=a&x=1"),
            Some("other=1"),
        ] {
            assert_eq!(client_query(bad).unwrap_err().code(), "invalid_request");
        }
        let long = format!("client={}", "a".repeat(MAX_QUERY_LEN));
        assert!(client_query(Some(&long)).is_err());
    }

    proptest::proptest! {
        /// What the fuzz target checks for these types, on every `cargo test`: any field values
        /// give a typed request or one bounded `invalid_request` line, never a panic.
        #[test]
        fn any_put_or_registration_fields_give_a_value_or_a_bounded_refusal(
            k in proptest::num::u8::ANY,
            n in proptest::num::u8::ANY,
            weight in proptest::num::u32::ANY,
            text in proptest::collection::vec("[0-9a-fA-F]{0,140}|[ -~]{0,70}", 10),
            id in "[ -~]{0,70}",
        ) {
            let put = PutCredentialRequest {
                secret: SecretBase64(Zeroizing::new(Vec::new())),
                k,
                n,
                client: text[0].clone(),
                seed: Some(text[1].clone()),
                allow_correlated: false,
                instances: vec![InstanceEntry {
                    id: id.clone(),
                    ak_name: text[2].clone(),
                }],
            };
            let host = super::super::hosts::HostRegistrationRequest {
                region: text[2].clone(),
                operator: text[3].clone(),
                endpoint: text[4].clone(),
                weight,
                ak: text[5].clone(),
                golden_pcrs: text[6].clone(),
                decrypt_key_public: text[7].clone(),
                certify_attest: text[8].clone(),
                certify_signature: text[9].clone(),
                nonce: text[0].clone(),
            };
            for error in [put.parse().err(), host.into_registration(&id).err()]
                .into_iter()
                .flatten()
            {
                let message = error.to_string();
                proptest::prop_assert_eq!(error.code(), "invalid_request");
                proptest::prop_assert!(!message.contains('\n'), "{}", message);
                proptest::prop_assert!(message.len() <= 400, "{}", message);
            }
        }
    }
}
