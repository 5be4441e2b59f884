//! The volume endpoint: a VM volume key's `host` shares, dealt by `keyshard init`, placed on
//! shard hosts (wiring [`put_volume_shares`]). The VM then fetches them as an instance through
//! `POST /v1/credentials/{key id}/fetch` ([`super::fetch`]), the key id being their name.
//!
//! | method and path | request | answer |
//! |---|---|---|
//! | `POST /v1/volumes/{key id}/host-shares` | [`PutVolumeSharesRequest`] | 201 [`PutCredentialResponse`] (`k`, `n`: the map's, min(k, m) of the m host shares); 409 `exists`; 409 `placement_refused`; 422 `invalid_request` for a fragment that does not verify under `dealer`, is not a host share of this key, of one deal, or is given twice, fewer than 2 fragments, a bad key, seed or instance |
//!
//! The fragments travel in the body, hex, protected in transit by TLS only, like a put's secret
//! ([`super::credentials`]): decoded straight into `Zeroizing` buffers, never echoed in errors,
//! and the body's buffer is wiped when the handler holds its only reference.

use std::time::SystemTime;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ed25519_dalek::VerifyingKey;
use keyshard_shards::HostId;
use keyshard_shards::map::ClientPublicKey;
use keyshard_shards::placement::PlacementSeed;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::api::AppState;
use super::credentials::{
    InstanceEntry, PutCredentialResponse, credential_error, credential_name, parse_client_key,
    parse_instances, parse_seed,
};
use super::error::ApiError;
use super::hosts::invalid;
use super::request::WipedJson;
use crate::credential::AdmittedInstance;
use crate::volume::{VolumeError, VolumeSharesRequest, put_volume_shares};

/// The most fragments one request carries (a policy gives at most 255 shares).
pub const MAX_FRAGMENTS: usize = 255;

/// An encoded fragment sent as hex, decoded into a `Zeroizing` buffer. Its `Debug` shows the
/// length only.
#[derive(Clone, PartialEq, Eq)]
pub struct FragmentHex(pub Zeroizing<Vec<u8>>);

impl std::fmt::Debug for FragmentHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FragmentHex({} bytes)", self.0.len())
    }
}

impl Serialize for FragmentHex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let encoded = Zeroizing::new(hex::encode(self.0.as_slice()));
        serializer.serialize_str(&encoded)
    }
}

impl<'de> Deserialize<'de> for FragmentHex {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FragmentHex;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an encoded fragment as hex")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<FragmentHex, E> {
                let mut out = Zeroizing::new(vec![0u8; text.len() / 2]);
                // hex's own error names an offending character: a digit of the share.
                hex::decode_to_slice(text, out.as_mut_slice())
                    .map_err(|_| E::custom("fragments: not hex"))?;
                Ok(FragmentHex(out))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// `POST /v1/volumes/{key id}/host-shares`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutVolumeSharesRequest {
    /// The encoded `host` fragments (hex), 2..=255.
    pub fragments: Vec<FragmentHex>,
    /// The VM's dealer public key, which signed them: 32 bytes, hex.
    pub dealer: String,
    /// Whom the shard map is sealed to: the X25519 public key (hex or base64).
    pub client: String,
    /// The placement seed, 64 hex digits; a random one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    /// Place even when a region or operator would hold min(k, m) shares.
    #[serde(default)]
    pub allow_correlated: bool,
    /// The instances (the VM) that may fetch them; none: map only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceEntry>,
}

/// A volume request's fields, besides the fragments, parsed into their types.
#[derive(Debug)]
pub struct ParsedVolume {
    pub dealer: VerifyingKey,
    pub client: ClientPublicKey,
    pub seed: PlacementSeed,
    pub instances: Vec<AdmittedInstance>,
}

impl PutVolumeSharesRequest {
    /// Parses the fragment count, dealer key, client key, seed (drawing a random seed when none
    /// is given) and instances; a 422 naming the field otherwise. The fragments themselves are
    /// checked by [`put_volume_shares`].
    pub fn parse(&self) -> Result<ParsedVolume, ApiError> {
        if self.fragments.len() > MAX_FRAGMENTS {
            return Err(invalid(format!(
                "fragments: {} given, at most {MAX_FRAGMENTS}",
                self.fragments.len()
            )));
        }
        let dealer = hex::decode(&self.dealer)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok())
            .ok_or_else(|| invalid("dealer: must be an Ed25519 public key, 64 hex digits"))?;
        Ok(ParsedVolume {
            dealer,
            client: parse_client_key(&self.client)?,
            seed: parse_seed(self.seed.as_deref())?,
            instances: parse_instances(&self.instances)?,
        })
    }
}

/// `POST /v1/volumes/{key id}/host-shares`.
pub(super) async fn put_host_shares(
    State(state): State<AppState>,
    key_id: Result<Path<String>, PathRejection>,
    WipedJson(request): WipedJson<PutVolumeSharesRequest>,
) -> Result<(StatusCode, axum::Json<PutCredentialResponse>), ApiError> {
    let key_id = credential_name(key_id)?;
    let ParsedVolume {
        dealer,
        client,
        seed,
        instances,
    } = request.parse()?;
    let fragments: Vec<Zeroizing<Vec<u8>>> =
        request.fragments.iter().map(|f| f.0.clone()).collect();
    let receipt = put_volume_shares(
        &*state.store,
        &state.registry,
        &state.signing_key,
        &VolumeSharesRequest {
            key_id: &key_id,
            dealer: &dealer,
            fragments: &fragments,
            client: &client,
            seed,
            allow_correlated: request.allow_correlated,
            instances: &instances,
        },
        SystemTime::now(),
    )
    .await
    .map_err(volume_error)?;
    drop(fragments);
    drop(request);
    let answer = PutCredentialResponse {
        name: key_id.to_string(),
        epoch: receipt.epoch,
        k: receipt.threshold.k(),
        n: receipt.threshold.n(),
        hosts: receipt
            .placement
            .hosts()
            .iter()
            .map(HostId::to_string)
            .collect(),
        seed: hex::encode(seed.as_bytes()),
        correlated: receipt.placement.correlated().to_string(),
        revision: receipt.revision.get(),
    };
    Ok((StatusCode::CREATED, axum::Json(answer)))
}

/// Volume errors as API errors: the request's faults are 422, the rest as a put's.
fn volume_error(error: VolumeError) -> ApiError {
    match error {
        VolumeError::Credential(e) => credential_error(e),
        e => invalid(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::parse_body;
    use super::*;

    const JSON: Option<&[u8]> = Some(b"application/json");

    fn body(fragments: &str, dealer: &str) -> String {
        format!(
            r#"{{"fragments":{fragments},"dealer":"{dealer}","client":"{}"}}"#,
            "ab".repeat(32)
        )
    }

    fn request(text: &str) -> Result<PutVolumeSharesRequest, ApiError> {
        parse_body(JSON, text.as_bytes(), 64 * 1024)
    }

    #[test]
    fn a_volume_body_parses_and_never_prints_its_fragments() {
        let dealer = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[5; 32])
                .verifying_key()
                .as_bytes(),
        );
        let parsed = request(&body(r#"["c0ffee01","c0ffee02"]"#, &dealer)).unwrap();
        assert_eq!(parsed.fragments[1].0.as_slice(), [0xc0, 0xff, 0xee, 0x02]);
        let printed = format!("{parsed:?}");
        assert!(printed.contains("FragmentHex(4 bytes)"), "{printed}");
        assert!(
            !printed.contains("c0ffee") && !printed.contains("192, 255"),
            "{printed}"
        );
        assert_eq!(
            hex::encode(parsed.parse().unwrap().dealer.as_bytes()),
            dealer
        );
        let encoded = serde_json::to_string(&parsed).unwrap();
        assert_eq!(request(&encoded).unwrap(), parsed);
    }

    #[test]
    fn bad_volume_fields_are_refused_without_echoing_a_fragment() {
        let good_dealer = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[5; 32])
                .verifying_key()
                .as_bytes(),
        );
        for (text, says) in [
            (body(r#"["c0ffee0"]"#, &good_dealer), "fragments: not hex"),
            (body(r#"["c0ffeezz"]"#, &good_dealer), "fragments: not hex"),
            (body(r#"[7]"#, &good_dealer), "invalid type"),
            (
                body(r#"["c0ffee01"]"#, &good_dealer).replace('}', r#","extra":1}"#),
                "unknown field",
            ),
        ] {
            let error = request(&text).unwrap_err().to_string();
            assert!(error.contains(says), "{text}: {error}");
            assert!(!error.contains("c0ffee"), "{error}");
        }
        for (dealer, says) in [
            ("abcd", "dealer: must be an Ed25519 public key"),
            (&*"zz".repeat(32), "dealer: must be an Ed25519 public key"),
        ] {
            let error = request(&body(r#"["c0ffee01"]"#, dealer))
                .unwrap()
                .parse()
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{error}");
        }
        let many = format!("[{}]", vec![r#""00""#; MAX_FRAGMENTS + 1].join(","));
        let error = request(&body(&many, &good_dealer))
            .unwrap()
            .parse()
            .unwrap_err()
            .to_string();
        assert!(error.contains("at most 255"), "{error}");
    }
}
