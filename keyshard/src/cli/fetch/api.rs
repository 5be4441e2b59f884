//! The JSON bodies `credential fetch` exchanges with the CMS and the shard hosts (issue 9 spec,
//! sections B, C and D), as the client sends and reads them. Byte strings are lowercase hex,
//! the sealed map base64. Answers are parsed leniently about fields added later (a newer server
//! may say more), strictly about the fields read: a missing or mistyped one is a refusal.

use serde::{Deserialize, Serialize};

/// `POST /v1/instances/{id}/challenge` (CMS) answer.
#[derive(Debug, Deserialize)]
pub struct ChallengeResponse {
    /// 32 bytes, hex.
    pub nonce: String,
    /// The PCR selection to quote, e.g. `sha256:0,7`.
    pub pcrs: String,
}

/// `POST /v1/credentials/{name}/fetch` (CMS) body.
#[derive(Debug, Serialize)]
pub struct FetchRequest<'a> {
    pub instance: &'a str,
    /// InstanceEvidence wire, hex.
    pub evidence: &'a str,
}

/// `POST /v1/credentials/{name}/fetch` (CMS) answer.
#[derive(Debug, Deserialize)]
pub struct FetchResponse {
    /// The SealedShardMap, base64.
    pub map: String,
    pub grants: Vec<GrantEntry>,
}

/// One shard's grant, as the CMS lists it; checked against the signed map before use.
#[derive(Debug, Clone, Deserialize)]
pub struct GrantEntry {
    pub host: String,
    pub endpoint: String,
    pub index: u8,
    /// The SealedShard, hex: passed on to the host as is.
    pub sealed_shard: String,
    /// The CMS-signed grant, hex: passed on to the host as is.
    pub grant: String,
}

/// `POST /v1/nonces` (shard host) answer.
#[derive(Debug, Deserialize)]
pub struct NonceResponse {
    /// 32 bytes, hex.
    pub nonce: String,
}

/// `POST /v1/release` (shard host) body.
#[derive(Debug, Serialize)]
pub struct ReleaseRequest<'a> {
    pub grant: &'a str,
    pub sealed_shard: &'a str,
    /// InstanceEvidence wire, hex.
    pub evidence: &'a str,
}

/// `POST /v1/release` (shard host) answer.
#[derive(Debug, Deserialize)]
pub struct ReleaseResponse {
    /// ReleasedShard wire, hex.
    pub released: String,
}
