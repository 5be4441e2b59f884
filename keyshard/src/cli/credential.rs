//! `keyshard credential keygen|put|map`: the client side of the credential service (CMS): a
//! client key pair, a credential put over HTTPS, and the client's shard map fetched and opened.
//!
//! Transport: reqwest over rustls, trusting only the CA certificate(s) in `--ca` (no system
//! roots: a CMS is reached through its own CA, and a public CA must not be able to stand in
//! for it). Every request has a timeout (`--timeout`, 10 s by default, connect included) and
//! every answer body is read to a bound before it is parsed.
//!
//! Client key files (`credential keygen --out F`): F holds the X25519 private key as 64 hex
//! digits and a newline (mode 0600); F.pub the public key the same way (mode 0644), which is
//! what `put --client-pub` reads and what the CMS takes as `client`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyshard_cms::credential::MAX_INSTANCES;
use keyshard_cms::server::ErrorBody;
use keyshard_cms::server::credentials::{
    InstanceEntry, PutCredentialRequest, PutCredentialResponse, SealedMapResponse, SecretBase64,
};
use keyshard_core::KeyId;
use keyshard_core::files::{self, Overwrite};
use keyshard_shards::map::{ClientKey, MAX_SEALED_MAP_LEN, SealedShardMap, ShardMap, X25519_LEN};
use zeroize::Zeroizing;

use super::{CliError, load};

/// The largest credential `put` sends (the CMS takes 1..=1024 bytes).
pub const MAX_CREDENTIAL_LEN: usize = 1024;
/// The largest answer body read from the CMS: a sealed map in base64 with room for the JSON.
pub const MAX_RESPONSE_LEN: usize = MAX_SEALED_MAP_LEN * 4 / 3 + 4096;
/// The longest CMS error message shown.
const MAX_MESSAGE_SHOWN: usize = 300;
/// A client key file: 64 hex digits and a newline, with slack for CRLF.
const MAX_CLIENT_KEY_FILE_LEN: usize = 2 * X25519_LEN + 4;

/// What can go wrong talking to the CMS; one line each, never a secret byte.
#[derive(Debug, thiserror::Error)]
pub enum CredentialCliError {
    #[error("--cms {0}: must be an https:// URL")]
    CmsUrl(String),
    #[error("--ca {}: no usable PEM certificate: {reason}", path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("{}: not a client key (64 hex digits expected)", .0.display())]
    ClientKeyFile(PathBuf),
    #[error("{}: {reason}", path.display())]
    ClientKey { path: PathBuf, reason: String },
    #[error("credential name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("{}: the credential is empty", .0.display())]
    EmptyCredential(PathBuf),
    #[error("--seed: must be 64 hex digits")]
    Seed,
    #[error("--instance-policy {}: {reason}", path.display())]
    InstancePolicy { path: PathBuf, reason: String },
    #[error("cannot build the HTTPS client: {0}")]
    Client(String),
    #[error("TLS handshake with the CMS at {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("no answer from the CMS at {url} within {seconds} s")]
    Timeout { url: String, seconds: u64 },
    #[error("cannot connect to the CMS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("request to the CMS at {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("the CMS's answer is larger than {max} bytes")]
    ResponseTooLarge { max: usize },
    #[error("the CMS refused ({status}, {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the CMS answered HTTP {status} without a readable error")]
    UnreadableError { status: u16 },
    #[error("the CMS's answer is not a valid {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("shard map: {0}")]
    Map(keyshard_shards::map::MapError),
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make a client key pair (X25519, hex): FILE (0600) and FILE.pub.
    Keygen(KeygenArgs),
    /// Send a credential to the CMS, which shards it over the registered hosts; prints the map's summary.
    Put(PutArgs),
    /// Fetch this client's shard map from the CMS, open it and check the CMS signature; print it.
    Map(MapArgs),
    /// As an enrolled instance: attest to the CMS and the shard hosts, rebuild the credential from k shares.
    Fetch(super::fetch::Args),
}

/// How to reach the CMS.
#[derive(Debug, clap::Args)]
pub struct CmsArgs {
    /// The CMS's base URL, https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub cms: String,
    /// The CA certificate(s) (PEM) that signed the CMS's TLS certificate; the only roots trusted.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Seconds each request may take, connecting included.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout: u64,
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Private key file (64 hex digits, mode 0600); the public key goes to FILE.pub.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct PutArgs {
    #[command(flatten)]
    pub cms: CmsArgs,
    /// The credential's name.
    #[arg(long)]
    pub name: String,
    /// The credential (1..=1024 bytes); `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// The client's public key file (FILE.pub of `credential keygen`): whom the map is sealed to.
    #[arg(long, value_name = "FILE")]
    pub client_pub: PathBuf,
    /// Shares needed to rebuild the credential.
    #[arg(long)]
    pub threshold: u8,
    /// Shares made, one per shard host.
    #[arg(long)]
    pub shares: u8,
    /// The placement seed, 64 hex digits (random when absent).
    #[arg(long, value_name = "HEX")]
    pub seed: Option<String>,
    /// Place even when a region or operator would hold k shares.
    #[arg(long)]
    pub allow_correlated: bool,
    /// The instances that may fetch the credential: JSON `{"instances": [{"id": ID,
    /// "ak_name": HEX}, ...]}` (1..=64; the AK name `keyshard instance enroll` printed).
    /// Without it no instance may: the credential is reachable through its map only.
    #[arg(long, value_name = "FILE")]
    pub instance_policy: Option<PathBuf>,
}

/// The file of `put --instance-policy`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancePolicyFile {
    pub instances: Vec<InstanceEntry>,
}

/// The largest `--instance-policy` file read: 64 entries with room to spare.
const MAX_INSTANCE_POLICY_FILE_LEN: usize = 64 * 1024;

/// Reads and checks an `--instance-policy` file: 1..=64 entries, each a valid id and AK name,
/// no id twice.
pub fn read_instance_policy(path: &Path) -> Result<Vec<InstanceEntry>, CliError> {
    let bad = |reason: String| CredentialCliError::InstancePolicy {
        path: path.to_owned(),
        reason,
    };
    let text = files::read_text(path, MAX_INSTANCE_POLICY_FILE_LEN)?;
    let file: InstancePolicyFile =
        serde_json::from_str(&text).map_err(|e| bad(format!("not an instance policy: {e}")))?;
    if file.instances.is_empty() || file.instances.len() > MAX_INSTANCES {
        return Err(bad(format!(
            "{} instances; 1..={MAX_INSTANCES} are allowed",
            file.instances.len()
        ))
        .into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for entry in &file.instances {
        let admitted = entry.parse().map_err(|e| bad(e.to_string()))?;
        if !seen.insert(admitted.id.clone()) {
            return Err(bad(format!("instance {} is named twice", admitted.id)).into());
        }
    }
    Ok(file.instances)
}

#[derive(Debug, clap::Args)]
pub struct MapArgs {
    #[command(flatten)]
    pub cms: CmsArgs,
    /// The credential's name.
    #[arg(long)]
    pub name: String,
    /// The client's private key file (of `credential keygen`).
    #[arg(long, value_name = "FILE")]
    pub client_key: PathBuf,
    /// The CMS's verifying key (FILE.pub of `keyshard keygen`, PEM).
    #[arg(long, value_name = "FILE")]
    pub cms_key: PathBuf,
    /// Print the map as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A validated CMS endpoint.
#[derive(Debug)]
pub struct CmsConfig {
    pub base: String,
    pub ca: PathBuf,
    pub timeout: Duration,
}

impl TryFrom<CmsArgs> for CmsConfig {
    type Error = CliError;

    fn try_from(args: CmsArgs) -> Result<Self, CliError> {
        let base = args.cms.trim_end_matches('/').to_owned();
        let authority_ok = base
            .strip_prefix("https://")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(['/', '?', '#', ' ', '@']));
        if !authority_ok {
            return Err(CredentialCliError::CmsUrl(args.cms).into());
        }
        Ok(Self {
            base,
            ca: args.ca,
            timeout: Duration::from_secs(args.timeout),
        })
    }
}

/// A validated `credential put`.
#[derive(Debug)]
pub struct PutConfig {
    pub cms: CmsConfig,
    pub name: KeyId,
    pub file: PathBuf,
    pub client_pub: PathBuf,
    pub k: u8,
    pub n: u8,
    pub seed: Option<String>,
    pub allow_correlated: bool,
    pub instance_policy: Option<PathBuf>,
}

impl TryFrom<PutArgs> for PutConfig {
    type Error = CliError;

    fn try_from(args: PutArgs) -> Result<Self, CliError> {
        let name = credential_name(&args.name)?;
        if let Some(seed) = &args.seed
            && (seed.len() != 64 || hex::decode(seed).is_err())
        {
            return Err(CredentialCliError::Seed.into());
        }
        Ok(Self {
            cms: args.cms.try_into()?,
            name,
            file: args.file,
            client_pub: args.client_pub,
            k: args.threshold,
            n: args.shares,
            seed: args.seed,
            allow_correlated: args.allow_correlated,
            instance_policy: args.instance_policy,
        })
    }
}

/// A validated `credential map`.
#[derive(Debug)]
pub struct MapConfig {
    pub cms: CmsConfig,
    pub name: KeyId,
    pub client_key: PathBuf,
    pub cms_key: PathBuf,
    pub json: bool,
}

impl TryFrom<MapArgs> for MapConfig {
    type Error = CliError;

    fn try_from(args: MapArgs) -> Result<Self, CliError> {
        Ok(Self {
            cms: args.cms.try_into()?,
            name: credential_name(&args.name)?,
            client_key: args.client_key,
            cms_key: args.cms_key,
            json: args.json,
        })
    }
}

pub(crate) fn credential_name(name: &str) -> Result<KeyId, CredentialCliError> {
    KeyId::new(name).map_err(|e| CredentialCliError::Name {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

/// Runs a `credential` subcommand.
pub fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Keygen(args) => keygen(&args.out, args.force),
        Command::Put(args) => put(args.try_into()?),
        Command::Map(args) => map(args.try_into()?),
        Command::Fetch(args) => super::fetch::run(args.try_into()?),
    }
}

fn keygen(out: &Path, force: bool) -> Result<(), CliError> {
    let overwrite = if force {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    };
    let mut public_path = out.to_owned().into_os_string();
    public_path.push(".pub");
    let public_path = PathBuf::from(public_path);
    files::check_writable(out, overwrite)?;
    files::check_writable(&public_path, overwrite)?;
    let key = ClientKey::generate().map_err(|e| CliError::Random(e.to_string()))?;
    let private = Zeroizing::new(format!("{}\n", hex::encode(key.to_bytes().as_slice())));
    let public = format!("{}\n", hex::encode(key.public_key().as_bytes()));
    files::write_private(out, private.as_bytes(), overwrite)?;
    files::write_atomic(&public_path, public.as_bytes(), 0o644, overwrite)?;
    println!(
        "client key written: private {}, public {} ({})",
        out.display(),
        public_path.display(),
        public.trim_end()
    );
    Ok(())
}

/// Reads 32 bytes written as 64 hex digits (surrounding whitespace allowed).
fn read_hex_key(path: &Path) -> Result<Zeroizing<[u8; X25519_LEN]>, CliError> {
    let text = files::read_text(path, MAX_CLIENT_KEY_FILE_LEN)?;
    let mut out = Zeroizing::new([0u8; X25519_LEN]);
    hex::decode_to_slice(text.trim(), out.as_mut_slice())
        .map_err(|_| CredentialCliError::ClientKeyFile(path.to_owned()))?;
    Ok(out)
}

pub(crate) fn client_key(path: &Path) -> Result<ClientKey, CliError> {
    let bytes = read_hex_key(path)?;
    ClientKey::from_bytes(&bytes).map_err(|e| {
        CredentialCliError::ClientKey {
            path: path.to_owned(),
            reason: e.to_string(),
        }
        .into()
    })
}

fn put(config: PutConfig) -> Result<(), CliError> {
    let instances = match &config.instance_policy {
        Some(path) => read_instance_policy(path)?,
        None => Vec::new(),
    };
    let public = read_hex_key(&config.client_pub)?;
    let secret = files::read_limited(&config.file, MAX_CREDENTIAL_LEN)?;
    if secret.is_empty() {
        return Err(CredentialCliError::EmptyCredential(config.file.clone()).into());
    }
    let request = PutCredentialRequest {
        secret: SecretBase64(secret),
        k: config.k,
        n: config.n,
        client: hex::encode(public.as_slice()),
        seed: config.seed.clone(),
        allow_correlated: config.allow_correlated,
        instances: instances.clone(),
    };
    // The body holds the secret's base64: written into one Zeroizing buffer sized up front (no
    // growing copies), handed to the HTTP client as its owner, and wiped when the client drops it.
    let capacity = secret_len_base64(request.secret.0.len()).saturating_add(1024);
    let mut body = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(&mut *body, &request)
        .map_err(|e| CredentialCliError::Client(e.to_string()))?;
    drop(request);
    let body = bytes::Bytes::from_owner(body);
    let path = format!("/v1/credentials/{}", config.name);
    let answer = runtime()?.block_on(async {
        let client = https_client(&config.cms)?;
        let url = format!("{}{path}", config.cms.base);
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        read_answer(sent, &url, config.cms.timeout).await
    })?;
    let summary: PutCredentialResponse = parse(&answer, "put answer")?;
    let mut lines = put_summary(&summary);
    lines.push(instances_line(&instances));
    print_lines(&lines)
}

/// Which instances may fetch what was put.
pub fn instances_line(instances: &[InstanceEntry]) -> String {
    if instances.is_empty() {
        "instances that may fetch it: none (map only; --instance-policy admits instances)"
            .to_owned()
    } else {
        format!(
            "instances that may fetch it: {}",
            instances
                .iter()
                .map(|entry| entry.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The length of `len` bytes in padded base64.
fn secret_len_base64(len: usize) -> usize {
    len.div_ceil(3).saturating_mul(4)
}

/// The lines `put` prints: name, epoch, k of n, each index's host, the seed, correlated domains.
pub fn put_summary(summary: &PutCredentialResponse) -> Vec<String> {
    let mut lines = vec![format!(
        "credential {}: epoch {}, {} of {} shares",
        summary.name, summary.epoch, summary.k, summary.n
    )];
    lines.extend(
        summary
            .hosts
            .iter()
            .zip(1u32..)
            .map(|(host, index)| format!("  share {index}: {host}")),
    );
    lines.push(format!("placement seed: {}", summary.seed));
    lines.push(format!(
        "correlated domains: {}",
        if summary.correlated.is_empty() {
            "none"
        } else {
            summary.correlated.as_str()
        }
    ));
    lines
}

fn map(config: MapConfig) -> Result<(), CliError> {
    let client = client_key(&config.client_key)?;
    let cms_key = load::verifying_key(&config.cms_key)?;
    let public = hex::encode(client.public_key().as_bytes());
    let path = format!("/v1/credentials/{}/map?client={public}", config.name);
    let answer = runtime()?.block_on(async {
        let http = https_client(&config.cms)?;
        let url = format!("{}{path}", config.cms.base);
        let sent = http.get(&url).send().await;
        read_answer(sent, &url, config.cms.timeout).await
    })?;
    let answer: SealedMapResponse = parse(&answer, "map answer")?;
    let sealed = STANDARD.decode(answer.sealed_map.as_bytes()).map_err(|_| {
        CredentialCliError::Malformed {
            what: "map answer",
            reason: "sealed_map is not base64".to_owned(),
        }
    })?;
    let map = SealedShardMap::from_bytes(&sealed)
        .and_then(|sealed| sealed.open(&client, &cms_key, &config.name))
        .map_err(CredentialCliError::Map)?;
    if config.json {
        let text = serde_json::to_string_pretty(&map_json(&map))
            .map_err(|e| CredentialCliError::Client(e.to_string()))?;
        print_lines(&[text])
    } else {
        print_lines(&map_lines(&map))
    }
}

/// The map as readable lines.
pub fn map_lines(map: &ShardMap) -> Vec<String> {
    let threshold = map.threshold();
    let mut lines = vec![
        format!(
            "credential {}: epoch {}, {} of {} shares",
            map.credential(),
            map.epoch(),
            threshold.k(),
            threshold.n()
        ),
        format!("key check value: {}", map.key_check_value().to_hex()),
    ];
    lines.extend(map.shards().map(|(index, shard)| {
        format!(
            "  share {index}: {} at {} (key {})",
            shard.host,
            shard.endpoint.as_str(),
            hex::encode(shard.key_name.as_bytes())
        )
    }));
    lines
}

/// The map as JSON.
pub fn map_json(map: &ShardMap) -> serde_json::Value {
    let shards: Vec<_> = map
        .shards()
        .map(|(index, shard)| {
            serde_json::json!({
                "index": index,
                "host": shard.host.as_str(),
                "endpoint": shard.endpoint.as_str(),
                "key_name": hex::encode(shard.key_name.as_bytes()),
            })
        })
        .collect();
    serde_json::json!({
        "credential": map.credential().to_string(),
        "epoch": map.epoch(),
        "k": map.threshold().k(),
        "n": map.threshold().n(),
        "key_check_value": map.key_check_value().to_hex(),
        "shards": shards,
    })
}

pub(crate) fn print_lines(lines: &[String]) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}").map_err(CredentialCliError::Stdout)?;
    }
    out.flush().map_err(CredentialCliError::Stdout)?;
    Ok(())
}

/// A current-thread runtime for one command's requests.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

/// A client trusting only the certificates in the CA file, with the timeouts.
pub(super) fn https_client(cms: &CmsConfig) -> Result<reqwest::Client, CredentialCliError> {
    let pem = files::read_limited(&cms.ca, 1024 * 1024).map_err(|e| CredentialCliError::Ca {
        path: cms.ca.clone(),
        reason: e.to_string(),
    })?;
    let certificates =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| CredentialCliError::Ca {
            path: cms.ca.clone(),
            reason: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(CredentialCliError::Ca {
            path: cms.ca.clone(),
            reason: "no certificate in the file".to_owned(),
        });
    }
    reqwest::Client::builder()
        .tls_certs_only(certificates)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(cms.timeout)
        .timeout(cms.timeout)
        .build()
        .map_err(|e| CredentialCliError::Client(chain(&e)))
}

/// The answer's body when the status is a success; the CMS's error otherwise.
pub(super) async fn read_answer(
    sent: Result<reqwest::Response, reqwest::Error>,
    url: &str,
    timeout: Duration,
) -> Result<Vec<u8>, CliError> {
    read_answer_within(sent, url, timeout, MAX_RESPONSE_LEN).await
}

/// [`read_answer`] for answers of at most `max` bytes.
pub(crate) async fn read_answer_within(
    sent: Result<reqwest::Response, reqwest::Error>,
    url: &str,
    timeout: Duration,
    max: usize,
) -> Result<Vec<u8>, CliError> {
    let mut response = sent.map_err(|e| transport_error(&e, url, timeout))?;
    let status = response.status();
    if response
        .content_length()
        .is_some_and(|len| len > max as u64)
    {
        return Err(CredentialCliError::ResponseTooLarge { max }.into());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(&e, url, timeout))?
    {
        if body.len().saturating_add(chunk.len()) > max {
            return Err(CredentialCliError::ResponseTooLarge { max }.into());
        }
        body.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return Ok(body);
    }
    let error: ErrorBody =
        serde_json::from_slice(&body).map_err(|_| CredentialCliError::UnreadableError {
            status: status.as_u16(),
        })?;
    Err(CredentialCliError::Refused {
        status: status.as_u16(),
        code: one_line(&error.error.code, 64),
        message: one_line(&error.error.message, MAX_MESSAGE_SHOWN),
    }
    .into())
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, CliError> {
    serde_json::from_slice(body).map_err(|e| {
        CredentialCliError::Malformed {
            what,
            reason: e.to_string(),
        }
        .into()
    })
}

/// Text from the server, as one printable line of at most `max` characters.
pub(crate) fn one_line(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// A transport failure classified: TLS, timeout, connection, other.
fn transport_error(error: &reqwest::Error, url: &str, timeout: Duration) -> CliError {
    let url = url.split('?').next().unwrap_or(url).to_owned();
    if error.is_timeout() {
        return CredentialCliError::Timeout {
            url,
            seconds: timeout.as_secs(),
        }
        .into();
    }
    if let Some(tls) = rustls_error(error) {
        return CredentialCliError::Tls { url, reason: tls }.into();
    }
    // reqwest's own line repeats the URL; its sources say what failed.
    let reason = std::error::Error::source(error).map_or_else(|| chain(error), chain);
    if error.is_connect() {
        CredentialCliError::Connect { url, reason }.into()
    } else {
        CredentialCliError::Request { url, reason }.into()
    }
}

/// The rustls error in an error's source chain. An `io::Error` hides the error it wraps from
/// `source` (it returns the wrapped error's source), so the walk steps into it with `get_ref`.
pub(crate) fn rustls_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = next {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        next = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

/// An error and its sources, joined by ": ", without repeats.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = next {
        let text = current.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = current.source();
    }
    one_line(&parts.join(": "), MAX_MESSAGE_SHOWN)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn cms_args(url: &str) -> CmsArgs {
        CmsArgs {
            cms: url.to_owned(),
            ca: PathBuf::from("ca.pem"),
            timeout: 5,
        }
    }

    #[test]
    fn item3_instance_policy_files_are_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("000b{}", "ab".repeat(32));
        let write = |text: String| {
            let path = dir.path().join("policy.json");
            std::fs::write(&path, text).unwrap();
            path
        };
        let good = write(format!(
            r#"{{"instances": [{{"id": "vm-1", "ak_name": "{name}"}}, {{"id": "vm-2", "ak_name": "{name}"}}]}}"#
        ));
        let entries = read_instance_policy(&good).unwrap();
        assert_eq!(
            instances_line(&entries),
            "instances that may fetch it: vm-1, vm-2"
        );
        assert!(instances_line(&[]).contains("none (map only"));
        let many: Vec<String> = (0..65)
            .map(|i| format!(r#"{{"id": "vm-{i}", "ak_name": "{name}"}}"#))
            .collect();
        for (text, says) in [
            (r#"{"instances": []}"#.to_owned(), "0 instances"),
            (
                format!(r#"{{"instances": [{}]}}"#, many.join(",")),
                "65 instances",
            ),
            (
                format!(
                    r#"{{"instances": [{{"id": "vm-1", "ak_name": "{name}"}}, {{"id": "vm-1", "ak_name": "{name}"}}]}}"#
                ),
                "named twice",
            ),
            (
                r#"{"instances": [{"id": "vm-1", "ak_name": "00"}]}"#.to_owned(),
                "ak_name",
            ),
            (
                format!(r#"{{"instances": [{{"id": "vm-1", "ak_name": "{name}", "x": 1}}]}}"#),
                "unknown field",
            ),
            ("[]".to_owned(), "not an instance policy"),
        ] {
            let path = write(text.clone());
            let err = read_instance_policy(&path).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains("--instance-policy"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn only_https_base_urls_are_accepted() {
        assert!(CmsConfig::try_from(cms_args("https://127.0.0.1:8443")).is_ok());
        assert_eq!(
            CmsConfig::try_from(cms_args("https://127.0.0.1:8443/"))
                .unwrap()
                .base,
            "https://127.0.0.1:8443"
        );
        for bad in ["http://127.0.0.1:8443", "https://", "https://h/v1", "h:1"] {
            assert!(CmsConfig::try_from(cms_args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_text_becomes_one_bounded_line() {
        assert_eq!(one_line("a\nb\rc", 10), "a b c");
        assert_eq!(one_line(&"x".repeat(20), 5), "xxxxx…");
    }

    #[test]
    fn keygen_files_read_back_as_the_same_key_pair() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("client.key");
        keygen(&out, false).unwrap();
        let key = client_key(&out).unwrap();
        let public = read_hex_key(&dir.path().join("client.key.pub")).unwrap();
        assert_eq!(public.as_slice(), key.public_key().as_bytes());
        // An existing key is not replaced without --force.
        assert!(keygen(&out, false).is_err());
        assert_eq!(client_key(&out).unwrap().public_key(), key.public_key());
    }

    #[test]
    fn a_client_key_file_that_is_not_64_hex_digits_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("short", "00ff\n"),
            ("nothex", &"zz".repeat(32)),
            ("long", &"00".repeat(40)),
            ("empty", ""),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let error = client_key(&path).unwrap_err().to_string();
            assert!(error.contains(name), "{error}");
        }
    }

    #[test]
    fn a_bad_seed_is_refused_before_any_request() {
        let args = PutArgs {
            cms: cms_args("https://127.0.0.1:1"),
            name: "db".to_owned(),
            file: PathBuf::from("-"),
            client_pub: PathBuf::from("c.pub"),
            threshold: 2,
            shares: 3,
            seed: Some("zz".to_owned()),
            allow_correlated: false,
            instance_policy: None,
        };
        assert!(PutConfig::try_from(args).is_err());
    }
}
