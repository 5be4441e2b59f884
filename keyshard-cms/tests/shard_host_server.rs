//! The shard host's HTTPS service (issue 9, items 2 and 6) against real TPMs and real TLS: the
//! service bound on loopback with a self-signed certificate, its decrypt key in one swtpm, the
//! compute instance's attestation key in another, and reqwest as the client. The CMS's part
//! (sealing the shard, signing the grant) is done here with a CMS key the test holds.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "../../keyshard-tpm/tests/common/swtpm.rs"]
#[allow(dead_code)]
mod swtpm;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use ed25519_dalek::SigningKey;
use keyshard_attest::tpm::PcrSelection;
use keyshard_cms::server::{ErrorBody, Limits, tls};
use keyshard_cms::shard_host::ShardHost;
use keyshard_cms::shard_host::nonces::MemoryNonceBook;
use keyshard_cms::shard_host::server::{
    HostNonceResponse, HostState, HostStatusResponse, ReleaseRequest, ReleaseResponse,
    ShardHostServer,
};
use keyshard_cms::shard_host::tpm_key::TpmDecryptKey;
use keyshard_core::KeyId;
use keyshard_core::policy::PcrBank;
use keyshard_shards::ecies::{self, SealedShard, ShardBinding, SharedPointSource};
use keyshard_shards::grant::{self, GrantStatement};
use keyshard_shards::instance::{
    FetchKey, FetchPublicKey, InstanceEvidence, InstancePolicy, Nonce, ReleasedShard,
    qualifying_data,
};
use keyshard_shards::{HostId, InstanceId};
use keyshard_tpm::{Tpm, TpmConfig, TpmService};
use swtpm::Swtpm;

const HOST: &str = "host-eu-1";
const EPOCH: u64 = 1;
const INDEX: u8 = 2;

/// A shard host serving over HTTPS, the instance's TPM, the CMS key and one sealed shard.
struct World {
    url: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<()>>,
    cms: SigningKey,
    host_key: ecies::P256Point,
    instance: Tpm,
    selection: PcrSelection,
    policy: InstancePolicy,
    shard: Vec<u8>,
    sealed: SealedShard,
    _dir: tempfile::TempDir,
    // Declared last: the TPM contexts above close before their simulators stop.
    _swtpms: (Swtpm, Swtpm),
}

fn binding(host: &str) -> ShardBinding {
    ShardBinding {
        credential: KeyId::new("db-password").unwrap(),
        epoch: EPOCH,
        index: INDEX,
        host: HostId::new(host).unwrap(),
    }
}

impl World {
    async fn new() -> Self {
        let host_swtpm = Swtpm::start();
        let instance_swtpm = Swtpm::start();
        let host_tpm = TpmService::spawn(TpmConfig::new(host_swtpm.tcti())).unwrap();
        let decrypt_key = host_tpm.create_decrypt_key().unwrap();
        let key = TpmDecryptKey::new(host_tpm, decrypt_key).unwrap();
        let host_key = key.public_key();
        let host = ShardHost::new(HostId::new(HOST).unwrap(), key);
        let cms = SigningKey::from_bytes(&[0x5c; 32]);

        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("host.pem"), dir.path().join("host.key"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let limits = Limits {
            max_body: 16 * 1024,
            ..Limits::default()
        };
        let state = HostState::new(host, cms.verifying_key(), MemoryNonceBook::new());
        let server = ShardHostServer::bind(
            "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            state,
            tls::server_config(&cert, &key).unwrap(),
            limits,
        )
        .await
        .unwrap();
        let url = format!("https://{}", server.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder()
            .tls_certs_only([
                reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap(),
            ])
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();

        let mut instance = Tpm::open(&instance_swtpm.tcti()).unwrap();
        let selection = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        let golden = instance.read_pcrs(&selection).unwrap();
        let policy = InstancePolicy::new(instance.ak_public().clone(), golden);
        let mut shard = vec![0u8; 181];
        getrandom::fill(&mut shard).unwrap();
        let sealed = ecies::seal(&host_key, &binding(HOST), &shard).unwrap();
        Self {
            url,
            http,
            stop: Some(stop),
            serving: Some(serving),
            cms,
            host_key,
            instance,
            selection,
            policy,
            shard,
            sealed,
            _dir: dir,
            _swtpms: (host_swtpm, instance_swtpm),
        }
    }

    /// What the CMS grants for this host's shard to instance `vm-1`, good for 120 s.
    fn statement(&self) -> GrantStatement {
        GrantStatement {
            credential: KeyId::new("db-password").unwrap(),
            epoch: EPOCH,
            index: INDEX,
            host: HostId::new(HOST).unwrap(),
            instance: InstanceId::new("vm-1").unwrap(),
            policy: self.policy.clone(),
            shard_digest: grant::shard_digest(&self.sealed),
            not_after_ms: grant::unix_ms(SystemTime::now() + grant::LIFETIME).unwrap(),
        }
    }

    fn grant(&self) -> String {
        hex::encode(self.statement().sign(&self.cms).to_bytes())
    }

    async fn post(&self, path: &str, body: String) -> (u16, String) {
        let answer = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    async fn nonce(&self) -> Nonce {
        let (status, body) = self.post("/v1/nonces", String::new()).await;
        assert_eq!(status, 200, "{body}");
        let answer: HostNonceResponse = serde_json::from_str(&body).unwrap();
        assert!(answer.expires_in_ms > 0);
        hex::decode(answer.nonce).unwrap().try_into().unwrap()
    }

    /// The instance's evidence for `nonce` and `key`, quoted by its own TPM.
    fn evidence(&mut self, nonce: &Nonce, key: &FetchPublicKey) -> InstanceEvidence {
        let pcrs = self.instance.read_pcrs(&self.selection).unwrap();
        let quote = self
            .instance
            .quote(&self.selection, &qualifying_data(nonce, key))
            .unwrap();
        InstanceEvidence::new(*nonce, *key, quote, pcrs)
    }

    fn body(grant: &str, sealed: &SealedShard, evidence: &InstanceEvidence) -> String {
        serde_json::to_string(&ReleaseRequest {
            grant: grant.to_owned(),
            sealed_shard: hex::encode(sealed.to_bytes()),
            evidence: hex::encode(evidence.to_bytes()),
        })
        .unwrap()
    }

    async fn release(&self, body: String) -> (u16, String) {
        self.post("/v1/release", body).await
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            tokio::time::timeout(Duration::from_secs(15), serving)
                .await
                .unwrap()
                .unwrap();
        }
    }
}

fn code(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("{e}: {body}"))
        .error
        .code
}

fn message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap()
        .error
        .message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_a_release_over_https_opens_with_the_fetch_key_only() {
    let mut world = World::new().await;
    let status = world
        .http
        .get(format!("{}/v1/status", world.url))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status().as_u16(), 200);
    let status: HostStatusResponse = status.json().await.unwrap();
    assert_eq!(status.host, HOST);

    let fetch = FetchKey::generate().unwrap();
    let nonce = world.nonce().await;
    let evidence = world.evidence(&nonce, &fetch.public_key());
    let (status, body) = world
        .release(World::body(&world.grant(), &world.sealed, &evidence))
        .await;
    assert_eq!(status, 200, "{body}");
    let answer: ReleaseResponse = serde_json::from_str(&body).unwrap();
    let released = ReleasedShard::from_bytes(&hex::decode(answer.released).unwrap()).unwrap();
    let opened = fetch.open(&released, &binding(HOST)).unwrap();
    assert_eq!(opened.as_slice(), world.shard.as_slice());
    // Another key, or the binding of another host, opens nothing.
    assert!(
        FetchKey::generate()
            .unwrap()
            .open(&released, &binding(HOST))
            .is_err()
    );
    assert!(fetch.open(&released, &binding("host-us-1")).is_err());
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_each_host_refuses_bad_grants_replays_changed_pcrs_and_swapped_keys() {
    let mut world = World::new().await;
    let fetch = FetchKey::generate().unwrap();

    // (what is wrong, the grant, the sealed shard) -> 403 grant_refused, naming why.
    let forged = hex::encode(
        world
            .statement()
            .sign(&SigningKey::from_bytes(&[0x5d; 32]))
            .to_bytes(),
    );
    let other_host = hex::encode(
        GrantStatement {
            host: HostId::new("host-us-1").unwrap(),
            ..world.statement()
        }
        .sign(&world.cms)
        .to_bytes(),
    );
    let expired = hex::encode(
        GrantStatement {
            not_after_ms: grant::unix_ms(SystemTime::now()).unwrap() - 1000,
            ..world.statement()
        }
        .sign(&world.cms)
        .to_bytes(),
    );
    // The same slot sealed again: a valid shard of this host, but not the one granted.
    let resealed = ecies::seal(&world.host_key, &binding(HOST), &world.shard).unwrap();
    let granted = world.sealed.clone();
    for (what, grant, sealed, says) in [
        ("another CMS key", forged, &granted, "signature"),
        ("another host", other_host, &granted, "host-us-1"),
        ("expired", expired, &granted, "expired"),
        ("another sealed shard", world.grant(), &resealed, "SHA-256"),
    ] {
        let nonce = world.nonce().await;
        let evidence = world.evidence(&nonce, &fetch.public_key());
        let (status, body) = world.release(World::body(&grant, sealed, &evidence)).await;
        assert_eq!(status, 403, "{what}: {body}");
        assert_eq!(code(&body), "grant_refused", "{what}: {body}");
        assert!(message(&body).contains(says), "{what}: {body}");
        // The grant is checked before the nonce is spent (so only granted requests fill the
        // nonce book): the same evidence with the good grant is released, once.
        let good = World::body(&world.grant(), &world.sealed, &evidence);
        let (status, body) = world.release(good.clone()).await;
        assert_eq!(status, 200, "{what} then good: {body}");
        let (status, body) = world.release(good).await;
        assert_eq!(status, 403, "{what} then again: {body}");
        assert_eq!(code(&body), "nonce_refused", "{what} then again: {body}");
    }

    // A replayed request: released once, refused the second time.
    let nonce = world.nonce().await;
    let evidence = world.evidence(&nonce, &fetch.public_key());
    let good = World::body(&world.grant(), &world.sealed, &evidence);
    assert_eq!(world.release(good.clone()).await.0, 200);
    let (status, body) = world.release(good).await;
    assert_eq!(
        (status, code(&body)),
        (403, "nonce_refused".to_owned()),
        "{body}"
    );
    assert!(message(&body).contains("already used"), "{body}");
    // A nonce this host never issued.
    let made_up = world.evidence(&[0x42; 32], &fetch.public_key());
    let (status, body) = world
        .release(World::body(&world.grant(), &world.sealed, &made_up))
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "nonce_refused".to_owned()),
        "{body}"
    );

    // Evidence re-used with another ephemeral key (a relay swapping in its own).
    let nonce = world.nonce().await;
    let honest = world.evidence(&nonce, &fetch.public_key());
    let attacker = FetchKey::generate().unwrap();
    let stolen = InstanceEvidence::new(
        nonce,
        attacker.public_key(),
        honest.quote().clone(),
        honest.pcrs().clone(),
    );
    let (status, body) = world
        .release(World::body(&world.grant(), &world.sealed, &stolen))
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "evidence_refused".to_owned()),
        "{body}"
    );
    assert!(message(&body).contains("another key"), "{body}");

    // The instance's PCR 7 changes (another bootloader): refused, naming the PCR.
    world
        .instance
        .extend_pcr(PcrBank::Sha256, 7, b"another bootloader")
        .unwrap();
    let nonce = world.nonce().await;
    let evidence = world.evidence(&nonce, &fetch.public_key());
    let (status, body) = world
        .release(World::body(&world.grant(), &world.sealed, &evidence))
        .await;
    assert_eq!(
        (status, code(&body)),
        (403, "evidence_refused".to_owned()),
        "{body}"
    );
    assert!(message(&body).contains("sha256:7"), "{body}");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_malformed_bodies_on_every_endpoint_change_nothing() {
    let mut world = World::new().await;
    let fetch = FetchKey::generate().unwrap();
    let nonce = world.nonce().await;
    let evidence = world.evidence(&nonce, &fetch.public_key());
    let grant = world.grant();
    let sealed = hex::encode(world.sealed.to_bytes());
    let evidence_hex = hex::encode(evidence.to_bytes());
    let release = |grant: &str, sealed: &str, evidence: &str| {
        format!(r#"{{"grant":"{grant}","sealed_shard":"{sealed}","evidence":"{evidence}"}}"#)
    };
    let short_grant = &grant[..grant.len() - 2];
    let short_evidence = &evidence_hex[..evidence_hex.len() - 2];
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/nonces", "{".into(), 400, "malformed_json"),
        (
            "/v1/nonces",
            r#"{"ttl_ms": 5}"#.into(),
            422,
            "invalid_request",
        ),
        ("/v1/nonces", "[]".into(), 422, "invalid_request"),
        ("/v1/release", "".into(), 422, "invalid_request"),
        ("/v1/release", "{".into(), 400, "malformed_json"),
        ("/v1/release", "null".into(), 422, "invalid_request"),
        (
            "/v1/release",
            r#"{"grant": 1, "sealed_shard": "", "evidence": ""}"#.into(),
            422,
            "invalid_request",
        ),
        (
            "/v1/release",
            format!(
                r#"{{"grant":"{grant}","sealed_shard":"{sealed}","evidence":"{evidence_hex}","x":1}}"#
            ),
            422,
            "invalid_request",
        ),
        (
            "/v1/release",
            release("zz", &sealed, &evidence_hex),
            422,
            "invalid_request",
        ),
        (
            "/v1/release",
            release(short_grant, &sealed, &evidence_hex),
            422,
            "invalid_request",
        ),
        (
            "/v1/release",
            release(&grant, "4b535345", &evidence_hex),
            422,
            "invalid_request",
        ),
        (
            "/v1/release",
            release(&grant, &sealed, short_evidence),
            422,
            "invalid_request",
        ),
        (
            "/v1/release",
            release(&grant, &sealed, &"00".repeat(5000)),
            422,
            "invalid_request",
        ),
        ("/v1/release", "x".repeat(17 * 1024), 413, "body_too_large"),
        ("/v2/release", "{}".into(), 404, "unsupported_version"),
        ("/v1/status", "{}".into(), 405, "method_not_allowed"),
    ];
    for (path, body, status, expected) in cases {
        let (got, answer) = world.post(path, body.clone()).await;
        assert_eq!(got, status, "{path} {:.60}: {answer}", body);
        assert_eq!(code(&answer), expected, "{path} {:.60}: {answer}", body);
        assert!(!message(&answer).contains('\n'));
    }
    // Wrong Content-Type.
    let answer = world
        .http
        .post(format!("{}/v1/release", world.url))
        .header("content-type", "text/plain")
        .body(release(&grant, &sealed, &evidence_hex))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 415);
    // Nothing was spent: the nonce of the evidence every bad body carried still releases.
    let (status, body) = world.release(release(&grant, &sealed, &evidence_hex)).await;
    assert_eq!(status, 200, "{body}");
    world.stop().await;
}
