//! The CMS's host registration, credential put and shard map endpoints (issue 9, items 1 to 5
//! over HTTPS): the real `keyshard cms` binary on loopback on a redb file, driven over TLS by
//! reqwest and curl, with six shard hosts that each have their own swtpm (with EK certificates
//! from the test's local CA), enrol with the CLI's enrolment, and register with real
//! TPM2_Certify output (keyshard-cms's test hosts). The maps are opened with the client's key
//! as a client does (keyshard-shards' map).

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[allow(dead_code)]
#[path = "common/cms.rs"]
mod harness;
#[path = "../../keyshard-cms/tests/common/hosts.rs"]
mod hosts;
#[allow(dead_code)]
#[path = "../../keyshard-tpm/tests/common/swtpm.rs"]
mod swtpm;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::VerifyingKey;
use harness::{Cms, Pki, curl};
use hosts::{HOSTS, ShardHost};
use keyshard_cms::credential;
use keyshard_cms::enrolment::EnrolmentKind;
use keyshard_cms::server::ErrorBody;
use keyshard_cms::server::NonceResponse;
use keyshard_cms::server::credentials::{PutCredentialResponse, SealedMapResponse};
use keyshard_cms::server::hosts::{HostList, HostRegistered, HostRegistrationRequest};
use keyshard_cms::store::{Nonce, Store};
use keyshard_core::{Fragment, KeyId};
use keyshard_shards::ecies::ShardBinding;
use keyshard_shards::map::{ClientKey, MapError, SealedShardMap};
use reqwest::StatusCode;
use serde_json::json;

const SECRET: &[u8] = b"postgres://app:s3cr3t-p4ssw0rd-0123456789@db.internal/prod";

/// A CMS on a fresh redb file.
struct Lab {
    pki: Pki,
    cms: Cms,
    client: reqwest::Client,
}

impl Lab {
    /// A CMS without `--ek-ca` (enrolment disabled) and no hosts.
    fn start() -> Self {
        let pki = Pki::new();
        let url = format!("redb:{}", pki.dir.path().join("cms.redb").display());
        let cms = Cms::start(&pki, &url);
        let client = pki.client();
        Self { pki, cms, client }
    }

    /// A CMS that enrols the TPMs of this test's EK CA, and the shard hosts `ids`, each on its
    /// own swtpm with EK certificates, enrolled (not registered yet).
    async fn start_with_hosts(ids: &[&str]) -> (Self, Vec<ShardHost>) {
        let pki = Pki::new();
        let mut hosts: Vec<ShardHost> = ids
            .iter()
            .map(|id| ShardHost::start_with_ek_certificates(id, &pki.ek_ca_dir()))
            .collect();
        let url = format!("redb:{}", pki.dir.path().join("cms.redb").display());
        let cms = Cms::start_enrolling(&pki, &url);
        let client = pki.client();
        let lab = Self { pki, cms, client };
        for host in &mut hosts {
            let id = host.id.to_string();
            lab.enrol(&id, host).await;
        }
        (lab, hosts)
    }

    /// Enrols `host`'s TPM as host `id` with the CLI's enrolment.
    async fn enrol(&self, id: &str, host: &mut ShardHost) {
        keyshard::cli::enrol::enrol(
            &self.pki.cms_client(&self.cms),
            EnrolmentKind::Host,
            id,
            host.tpm.get_mut().unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("enrolling {id}: {e}"));
    }

    /// The CMS's verifying key, from the key file it was started with.
    fn cms_key(&self) -> VerifyingKey {
        let pem = std::fs::read_to_string(&self.pki.signing).unwrap();
        keyshard_core::keys::signing_key_from_pem(&pem)
            .unwrap()
            .verifying_key()
    }

    async fn challenge(&self) -> Nonce {
        let response = self
            .client
            .post(self.cms.url("/v1/hosts/challenge"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let answer: NonceResponse = response.json().await.unwrap();
        Nonce::from_hex(&answer.nonce).unwrap()
    }

    /// PUT /v1/hosts/{id} with `body`: the status and the body's bytes.
    async fn put_host(&self, id: &str, body: &HostRegistrationRequest) -> (StatusCode, Vec<u8>) {
        let response = self
            .client
            .put(self.cms.url(&format!("/v1/hosts/{id}")))
            .json(body)
            .send()
            .await
            .unwrap();
        (response.status(), response.bytes().await.unwrap().to_vec())
    }

    /// Registers `host` in its lab domain over the API; the answer's status.
    async fn register(&self, host: &ShardHost) -> StatusCode {
        let (_, region, operator) = HOSTS
            .iter()
            .find(|(id, ..)| *id == host.id.as_str())
            .unwrap();
        let registration = host.registration(self.challenge().await, region, operator);
        let (status, body) = self
            .put_host(
                host.id.as_str(),
                &HostRegistrationRequest::from_registration(&registration),
            )
            .await;
        let answer: HostRegistered = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
        assert_eq!(answer.id, host.id.as_str());
        assert_eq!(answer.region, *region);
        status
    }

    async fn hosts(&self) -> HostList {
        let response = self
            .client
            .get(self.cms.url("/v1/hosts"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// POST /v1/credentials/{name} with a JSON body: the status and the body's bytes.
    async fn put_credential(&self, name: &str, body: &serde_json::Value) -> (StatusCode, Vec<u8>) {
        let response = self
            .client
            .post(self.cms.url(&format!("/v1/credentials/{name}")))
            .json(body)
            .send()
            .await
            .unwrap();
        (response.status(), response.bytes().await.unwrap().to_vec())
    }

    /// GET /v1/credentials/{name}/map for `client` (hex): the status and the body's bytes.
    async fn map(&self, name: &str, client: &str) -> (StatusCode, Vec<u8>) {
        let response = self
            .client
            .get(
                self.cms
                    .url(&format!("/v1/credentials/{name}/map?client={client}")),
            )
            .send()
            .await
            .unwrap();
        (response.status(), response.bytes().await.unwrap().to_vec())
    }

    /// A raw request: method, path, Content-Type and body; the status and the error code.
    async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, String) {
        let response = self
            .client
            .request(method, self.cms.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.bytes().await.unwrap();
        let error: ErrorBody = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)));
        assert!(!error.error.message.contains('\n'));
        (status, error.error.code)
    }
}

fn error_code(body: &[u8]) -> (String, String) {
    let error: ErrorBody = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    (error.error.code, error.error.message)
}

fn put_body(client: &ClientKey, k: u8, n: u8) -> serde_json::Value {
    json!({
        "secret": STANDARD.encode(SECRET),
        "k": k,
        "n": n,
        "client": hex::encode(client.public_key().as_bytes()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_put_3_of_4_over_https_and_the_map_opens_with_the_client_key_only() {
    let (lab, hosts) = Lab::start_with_hosts(&HOSTS.map(|(id, ..)| id)).await;
    for host in &hosts {
        assert_eq!(lab.register(host).await, StatusCode::CREATED);
    }
    // Registering again (a fresh challenge, the same TPM) renews the record: 200.
    assert_eq!(lab.register(&hosts[0]).await, StatusCode::OK);
    let listed = lab.hosts().await;
    let ids: Vec<_> = listed.hosts.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, HOSTS.map(|(id, ..)| id));
    assert!(listed.excluded.is_empty(), "{:?}", listed.excluded);

    let client = ClientKey::generate().unwrap();
    let (status, body) = lab.put_credential("db", &put_body(&client, 3, 4)).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let summary: PutCredentialResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!((summary.epoch, summary.k, summary.n), (1, 3, 4));
    assert_eq!(summary.hosts.len(), 4);
    assert!(summary.correlated.is_empty(), "{}", summary.correlated);
    assert!(!contains(&body, SECRET));

    // The map, over HTTPS, opens with the client's key and the CMS's verifying key...
    let client_hex = hex::encode(client.public_key().as_bytes());
    let (status, body) = lab.map("db", &client_hex).await;
    assert_eq!(status, StatusCode::OK);
    let answer: SealedMapResponse = serde_json::from_slice(&body).unwrap();
    let sealed = SealedShardMap::from_bytes(&STANDARD.decode(&answer.sealed_map).unwrap()).unwrap();
    let name = KeyId::new("db").unwrap();
    let map = sealed.open(&client, &lab.cms_key(), &name).unwrap();
    assert_eq!(map.epoch(), summary.epoch);
    assert_eq!((map.threshold().k(), map.threshold().n()), (3, 4));
    let mapped: Vec<_> = map.shards().map(|(_, s)| s.host.to_string()).collect();
    assert_eq!(mapped, summary.hosts);
    let map_hosts = mapped;
    // ...and not with another client's key,
    let other = ClientKey::generate().unwrap();
    assert!(matches!(
        sealed.open(&other, &lab.cms_key(), &name),
        Err(MapError::Open)
    ));
    // which the CMS does not hand it to (the same key in URL-safe base64 is the owner's).
    let (status, body) = lab
        .map("db", &hex::encode(other.public_key().as_bytes()))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body).0, "forbidden");
    let (status, _) = lab
        .map(
            "db",
            &URL_SAFE_NO_PAD.encode(client.public_key().as_bytes()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = lab.map("nope", &client_hex).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body).0, "not_found");

    // A second put of the name: 409, and the stored map is the first one still.
    let (status, body) = lab.put_credential("db", &put_body(&other, 2, 3)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&body).0, "exists");
    let (status, again) = lab.map("db", &client_hex).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<SealedMapResponse>(&again).unwrap(),
        answer
    );

    // 3 of 5 over two operators: one operator would hold 3 = k; refused, naming it.
    let (status, body) = lab.put_credential("db2", &put_body(&client, 3, 5)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (code, message) = error_code(&body);
    assert_eq!(code, "placement_refused");
    assert!(message.contains("operator"), "{message}");
    let (status, _) = lab.map("db2", &client_hex).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Allowed correlated placement, it is stored and says which domain holds k.
    let mut allowed = put_body(&client, 3, 5);
    allowed["allow_correlated"] = json!(true);
    let (status, body) = lab.put_credential("db2", &allowed).await;
    assert_eq!(status, StatusCode::CREATED);
    let summary: PutCredentialResponse = serde_json::from_slice(&body).unwrap();
    assert!(summary.correlated.contains("operator"), "{summary:?}");

    // curl reads the host list with the CA.
    let ca = lab.pki.ca.to_str().unwrap();
    let url = lab.cms.url("/v1/hosts");
    let (code, stdout, stderr) = curl(&[
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        "--cacert",
        ca,
        "--fail",
        &url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let listed: HostList = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.hosts.len(), 6);
    let Lab { pki, cms, .. } = lab;
    let log = cms.daemon.stderr();
    assert!(log.contains("credential db: stored epoch 1"), "{log}");
    for secret in [
        std::str::from_utf8(SECRET).unwrap().to_owned(),
        STANDARD.encode(SECRET),
    ] {
        assert!(!log.contains(&secret), "{log}");
    }
    cms.stop();

    // What the put stored: each shard opens in the TPM of the host the summary names, as a
    // CMS-signed fragment of index i; and the redb file does not hold the secret.
    let path = pki.dir.path().join("cms.redb");
    assert!(!contains(&std::fs::read(&path).unwrap(), SECRET));
    let store = Store::open(&format!("redb:{}", path.display()))
        .await
        .unwrap();
    let stored = credential::load(&store, &name).await.unwrap().unwrap();
    let cms_key = {
        let pem = std::fs::read_to_string(&pki.signing).unwrap();
        keyshard_core::keys::signing_key_from_pem(&pem)
            .unwrap()
            .verifying_key()
    };
    for (index, host, sealed) in &stored.shards {
        assert_eq!(host.as_str(), map_hosts[usize::from(*index) - 1]);
        let binding = ShardBinding {
            credential: name.clone(),
            epoch: 1,
            index: *index,
            host: host.clone(),
        };
        let owner = hosts.iter().find(|h| &h.id == host).unwrap();
        let opened = owner.open(&binding, sealed).unwrap();
        let fragment = Fragment::parse(&opened).unwrap().verify(&cms_key).unwrap();
        assert_eq!(fragment.header().index, *index);
        let other = hosts.iter().find(|h| &h.id != host).unwrap();
        assert!(other.open(&binding, sealed).is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_a_forged_certification_is_refused_and_nothing_is_stored() {
    let (lab, mut hosts) = Lab::start_with_hosts(&["host-1"]).await;
    let host = &mut hosts[0];
    let nonce = lab.challenge().await;
    let registration = host.registration(nonce, "eu", "acme");
    let good = HostRegistrationRequest::from_registration(&registration);

    // A flipped signature bit, and a certification over another challenge.
    let mut forged = good.clone();
    let mut signature = hex::decode(&forged.certify_signature).unwrap();
    signature[10] ^= 1;
    forged.certify_signature = hex::encode(signature);
    let mut other_nonce = good.clone();
    other_nonce.nonce = lab.challenge().await.to_hex();
    // A decrypt key the certification is not about: another TPM's.
    let elsewhere = ShardHost::start("host-2");
    let mut other_key = good.clone();
    other_key.decrypt_key_public = hex::encode(elsewhere.key.public_area());
    for bad in [&forged, &other_nonce, &other_key] {
        let (status, body) = lab.put_host("host-1", bad).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(error_code(&body).0, "certification_refused");
    }
    assert!(lab.hosts().await.hosts.is_empty());

    // The genuine registration with its challenge passes, once: the challenge is used up.
    let (status, _) = lab.put_host("host-1", &good).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = lab.put_host("host-1", &good).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body).0, "nonce_refused");
    // The same TPM under another id: its enrolment is refused (one TPM is one host), and so
    // is a registration without one.
    let err = keyshard::cli::enrol::enrol(
        &lab.pki.cms_client(&lab.cms),
        EnrolmentKind::Host,
        "host-9",
        host.tpm.get_mut().unwrap(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ak_conflict") && err.contains("enrolled as host host-1"),
        "{err}"
    );
    let again = host.registration(lab.challenge().await, "us", "globex");
    let (status, body) = lab
        .put_host(
            "host-9",
            &HostRegistrationRequest::from_registration(&again),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body).0, "not_enrolled");
    let listed = lab.hosts().await;
    assert_eq!(listed.hosts.len(), 1);
    assert_eq!(listed.hosts[0].id, "host-1");
    lab.cms.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_malformed_bodies_on_each_new_endpoint_get_json_errors_and_change_nothing() {
    use reqwest::Method;
    let lab = Lab::start();
    let client_hex = hex::encode([7u8; 32]);
    let good_put = serde_json::to_vec(&json!({
        "secret": STANDARD.encode(SECRET), "k": 2, "n": 3, "client": client_hex,
    }))
    .unwrap();
    let oversized = vec![b' '; 70 * 1024];
    let json = "application/json";
    /// Method, path, Content-Type, body; the status and code expected.
    type Case<'a> = (Method, &'a str, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/hosts/challenge",
            json,
            b"{".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/hosts/challenge",
            json,
            br#"{"x":1}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/hosts/challenge",
            json,
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::PUT,
            "/v1/hosts/host-1",
            json,
            b"[1]".to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::PUT,
            "/v1/hosts/host-1",
            json,
            br#"{"region":5}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::PUT,
            "/v1/hosts/host-1",
            "text/plain",
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::PUT,
            "/v1/hosts/host-1",
            json,
            oversized.clone(),
            413,
            "body_too_large",
        ),
        (
            Method::PUT,
            "/v1/hosts/Host_1!",
            json,
            b"{}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/hosts",
            json,
            b"{}".to_vec(),
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/v1/credentials/db",
            json,
            b"{\"secret\":".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/credentials/db",
            json,
            br#"{"secret":"!!","k":2,"n":3,"client":""}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/credentials/db",
            json,
            br#"{"secret":"aGk=","k":"2","n":3,"client":""}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/credentials/db",
            json,
            oversized,
            413,
            "body_too_large",
        ),
        (
            Method::POST,
            "/v1/credentials/no%20spaces",
            json,
            good_put.clone(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v2/credentials/db",
            json,
            good_put.clone(),
            404,
            "unsupported_version",
        ),
        // Well-formed, but no host is registered: refused, naming why.
        (
            Method::POST,
            "/v1/credentials/db",
            json,
            good_put,
            409,
            "placement_refused",
        ),
        (
            Method::GET,
            "/v1/credentials/db/map",
            json,
            vec![],
            422,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/credentials/db/map?client=zz",
            json,
            vec![],
            422,
            "invalid_request",
        ),
    ];
    for (method, path, content_type, body, status, code) in cases {
        let (got, got_code) = lab.raw(method.clone(), path, content_type, body).await;
        assert_eq!(
            (got.as_u16(), got_code.as_str()),
            (status, code),
            "{method} {path}"
        );
    }
    // Nothing changed: no host, no credential.
    let listed = lab.hosts().await;
    assert!(listed.hosts.is_empty() && listed.excluded.is_empty());
    let (status, _) = lab.map("db", &client_hex).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    lab.cms.stop();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
