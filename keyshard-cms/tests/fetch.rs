//! The CMS's fetch endpoint (issue 9, items 3 and 6, spec C) over real TLS: the CMS server in
//! process on a redb store, three registered shard hosts and a compute instance, each with its
//! own swtpm. The instance's AK is pinned as enrolment pins it (`enrolment::pin_ak`; the EK
//! proof before it is enrolment's own test) and registered through `instances::register` with
//! a real quote. The grants a fetch returns are checked as a shard host checks them, and one
//! shard is released by its host's TPM and opened with the instance's fetch key.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[allow(dead_code)]
#[path = "common/hosts.rs"]
mod hosts;
#[allow(dead_code)]
#[path = "../../keyshard-tpm/tests/common/swtpm.rs"]
mod swtpm;

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::SigningKey;
use keyshard_attest::tpm::PcrSelection;
use keyshard_attest::tpm::public::sha256_name;
use keyshard_cms::credential::{AdmittedInstance, PutRequest, put_credential};
use keyshard_cms::enrolment::{self, EnrolmentKind, PinnedAk};
use keyshard_cms::instances::{self, InstanceRegistration};
use keyshard_cms::registry::HostRegistry;
use keyshard_cms::server::fetch::{FetchRequest, FetchResponse};
use keyshard_cms::server::{CmsServer, ErrorBody, Limits, tls};
use keyshard_cms::shard_host::ShardHost as Releaser;
use keyshard_cms::shard_host::ShardRequest;
use keyshard_cms::shard_host::nonces::MemoryNonceBook;
use keyshard_cms::store::Store;
use keyshard_core::policy::PcrBank;
use keyshard_core::{KeyId, Threshold};
use keyshard_shards::ecies::ShardBinding;
use keyshard_shards::grant::Grant;
use keyshard_shards::instance::{FetchKey, InstanceEvidence, Nonce, qualifying_data};
use keyshard_shards::map::{ClientKey, SealedShardMap};
use keyshard_shards::placement::PlacementSeed;
use keyshard_shards::{HostId, InstanceId};
use keyshard_tpm::Tpm;

use hosts::{HOSTS, ShardHost};
use swtpm::Swtpm;

const SECRET: &[u8] = b"postgres://app:s3cr3t@db.internal/prod";

struct Lab {
    store: Store,
    cms: SigningKey,
    client: ClientKey,
    url: String,
    http: reqwest::Client,
    hosts: Vec<ShardHost>,
    instance: Tpm,
    ak_name: [u8; 34],
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
    _swtpm: Swtpm,
}

fn now() -> SystemTime {
    SystemTime::now()
}

/// The AK of `tpm` and its name, as enrolment reads them.
fn ak_of(tpm: &mut Tpm) -> (keyshard_attest::tpm::AkPublic, [u8; 34]) {
    let ak_name = sha256_name(&tpm.ak_public_area().unwrap());
    (tpm.ak_public().clone(), ak_name)
}

async fn pin(
    store: &Store,
    kind: EnrolmentKind,
    id: &str,
    (ak, ak_name): (keyshard_attest::tpm::AkPublic, [u8; 34]),
) -> [u8; 34] {
    enrolment::pin_ak(
        store,
        PinnedAk {
            kind,
            id: id.to_owned(),
            ak,
            ak_name,
            ek_root: "keyshard test CA".to_owned(),
            enrolled_at_ms: 1,
        },
    )
    .await
    .unwrap();
    ak_name
}

impl Lab {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("redb:{}", dir.path().join("cms.redb").display()))
            .await
            .unwrap();
        let cms = SigningKey::from_bytes(&[0x31; 32]);
        let registry = HostRegistry::default();
        let mut hosts = Vec::new();
        for (id, region, operator) in HOSTS.iter().take(3) {
            let host = ShardHost::start(id);
            let ak = ak_of(&mut host.tpm.lock().unwrap());
            pin(&store, EnrolmentKind::Host, id, ak).await;
            let nonce = registry.challenge(&store).await.unwrap();
            registry
                .register(&store, host.registration(nonce, region, operator), now())
                .await
                .unwrap();
            hosts.push(host);
        }
        // The instance: enrolled (pinned) and registered with its PCRs now as golden values.
        let swtpm = Swtpm::start();
        let mut instance = Tpm::open(&swtpm.tcti()).unwrap();
        let ak_name = pin(
            &store,
            EnrolmentKind::Instance,
            "vm-1",
            ak_of(&mut instance),
        )
        .await;
        let id = instances::InstanceId::new("vm-1").unwrap();
        let challenge = instances::challenge(&store, &id).await.unwrap();
        let selection = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        let golden = instance.read_pcrs(&selection).unwrap();
        let quote = instance
            .quote(&selection, challenge.nonce.as_bytes())
            .unwrap();
        instances::register(
            &store,
            InstanceRegistration {
                id,
                golden,
                nonce: challenge.nonce,
                quote,
            },
            now(),
        )
        .await
        .unwrap();

        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("cms.pem"), dir.path().join("cms.key"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let server = CmsServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            store.clone(),
            tls::server_config(&cert, &key).unwrap(),
            Limits::default(),
            cms.clone(),
        )
        .await
        .unwrap();
        let url = format!("https://{}", server.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder()
            .tls_certs_only([
                reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap(),
            ])
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Self {
            store,
            cms,
            client: ClientKey::generate().unwrap(),
            url,
            http,
            hosts,
            instance,
            ak_name,
            stop: Some(stop),
            _dir: dir,
            _swtpm: swtpm,
        }
    }

    /// Puts `name` 2 of 3 over the three hosts, fetchable by `instances`.
    async fn put(&self, name: &str, instances: &[AdmittedInstance]) {
        put_credential(
            &self.store,
            &HostRegistry::default(),
            &self.cms,
            &PutRequest {
                name: &KeyId::new(name).unwrap(),
                secret: SECRET,
                threshold: Threshold::new(2, 3).unwrap(),
                client: &self.client.public_key(),
                seed: PlacementSeed::from_bytes([7; 32]),
                allow_correlated: true,
                instances,
            },
            now(),
        )
        .await
        .unwrap();
    }

    fn vm1(&self) -> AdmittedInstance {
        AdmittedInstance {
            id: InstanceId::new("vm-1").unwrap(),
            ak_name: self.ak_name,
        }
    }

    /// A challenge for `id`, as `POST /v1/instances/{id}/challenge` issues it.
    async fn challenge(&self, id: &str) -> Nonce {
        let id = instances::InstanceId::new(id).unwrap();
        *instances::challenge(&self.store, &id)
            .await
            .unwrap()
            .nonce
            .as_bytes()
    }

    /// The instance's evidence for `nonce`, bound to `key`, over sha256:0,7.
    fn evidence(&mut self, nonce: &Nonce, key: &FetchKey) -> InstanceEvidence {
        let selection = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        let pcrs = self.instance.read_pcrs(&selection).unwrap();
        let quote = self
            .instance
            .quote(&selection, &qualifying_data(nonce, &key.public_key()))
            .unwrap();
        InstanceEvidence::new(*nonce, key.public_key(), quote, pcrs)
    }

    async fn fetch(&self, name: &str, body: String) -> (u16, String) {
        let answer = self
            .http
            .post(format!("{}/v1/credentials/{name}/fetch", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    fn body(instance: &str, evidence: &InstanceEvidence) -> String {
        serde_json::to_string(&FetchRequest {
            instance: instance.to_owned(),
            evidence: hex::encode(evidence.to_bytes()),
        })
        .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn refusal(body: &str) -> (String, String) {
    let error = serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("{e}: {body}"))
        .error;
    (error.code, error.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_a_verified_instance_gets_the_map_and_a_grant_per_shard_that_its_hosts_honour() {
    let mut lab = Lab::start().await;
    lab.put("db", &[lab.vm1()]).await;
    let fetch_key = FetchKey::generate().unwrap();
    let nonce = lab.challenge("vm-1").await;
    let evidence = lab.evidence(&nonce, &fetch_key);
    let (status, body) = lab.fetch("db", Lab::body("vm-1", &evidence)).await;
    assert_eq!(status, 200, "{body}");
    let answer: FetchResponse = serde_json::from_str(&body).unwrap();

    // The map is the client's sealed map: it opens with the client key and the CMS key.
    let sealed = SealedShardMap::from_bytes(&STANDARD.decode(&answer.map).unwrap()).unwrap();
    let name = KeyId::new("db").unwrap();
    let map = sealed
        .open(&lab.client, &lab.cms.verifying_key(), &name)
        .unwrap();
    assert_eq!(answer.grants.len(), 3);
    for (entry, (index, location)) in answer.grants.iter().zip(map.shards()) {
        assert_eq!(entry.index, index);
        assert_eq!(entry.host, location.host.as_str());
        assert_eq!(entry.endpoint, location.endpoint.as_str());
        // Each grant verifies as its host verifies it, for its sealed shard, and names vm-1.
        let grant = Grant::from_bytes(&hex::decode(&entry.grant).unwrap()).unwrap();
        let sealed = keyshard_shards::ecies::SealedShard::from_bytes(
            &hex::decode(&entry.sealed_shard).unwrap(),
        )
        .unwrap();
        let verified = grant
            .verify(&lab.cms.verifying_key(), &location.host, &sealed, now())
            .unwrap();
        assert_eq!(verified.instance().as_str(), "vm-1");
        assert_eq!(verified.index(), index);
        let not_after = grant.statement().not_after_ms;
        let ahead = not_after - keyshard_shards::grant::unix_ms(now()).unwrap();
        assert!((110_000..=120_000).contains(&ahead), "{ahead} ms");
        // Not for another host.
        assert!(
            grant
                .verify(
                    &lab.cms.verifying_key(),
                    &HostId::new("host-9").unwrap(),
                    &sealed,
                    now()
                )
                .is_err()
        );
    }

    // Host of index 1 releases under its grant to the instance, which opens its share.
    let nonces = MemoryNonceBook::new();
    let host_nonce = nonces.issue().unwrap();
    let evidence = lab.evidence(&host_nonce, &fetch_key);
    let entry = &answer.grants[0];
    let host = lab
        .hosts
        .iter()
        .find(|h| h.id.as_str() == entry.host)
        .unwrap();
    let releaser = Releaser::new(host.id.clone(), HostKey(host));
    let grant = Grant::from_bytes(&hex::decode(&entry.grant).unwrap()).unwrap();
    let sealed =
        keyshard_shards::ecies::SealedShard::from_bytes(&hex::decode(&entry.sealed_shard).unwrap())
            .unwrap();
    let verified = grant
        .verify(&lab.cms.verifying_key(), &host.id, &sealed, now())
        .unwrap();
    let released = releaser
        .release(
            &ShardRequest {
                credential: name.clone(),
                epoch: verified.epoch(),
                index: verified.index(),
                evidence,
            },
            &sealed,
            verified.policy(),
            nonces.consume(&host_nonce).unwrap(),
        )
        .unwrap();
    let binding = ShardBinding {
        credential: name,
        epoch: verified.epoch(),
        index: verified.index(),
        host: host.id.clone(),
    };
    let share = fetch_key.open(&released.shard, &binding).unwrap();
    assert!(!share.is_empty());
}

/// A test host's TPM as a release's key source, by reference.
struct HostKey<'a>(&'a ShardHost);

impl keyshard_shards::ecies::SharedPointSource for HostKey<'_> {
    type Error = hosts::ZGenFailed;

    fn public_key(&self) -> keyshard_shards::ecies::P256Point {
        self.0.public_key()
    }

    fn z_gen(
        &self,
        ephemeral: &keyshard_shards::ecies::P256Point,
    ) -> Result<keyshard_shards::ecies::SharedPoint, hosts::ZGenFailed> {
        self.0.z_gen(ephemeral)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_the_cms_refuses_fetches_as_spec_c_says_and_spends_nothing_on_malformed_ones() {
    let mut lab = Lab::start().await;
    lab.put("db", &[lab.vm1()]).await;
    lab.put("map-only", &[]).await;
    let mut other_ak = lab.vm1();
    other_ak.ak_name[33] ^= 1;
    lab.put("other-ak", &[other_ak]).await;
    let key = FetchKey::generate().unwrap();

    // Malformed bodies: 422/400, and the nonce they carry is not spent.
    let nonce = lab.challenge("vm-1").await;
    let evidence = lab.evidence(&nonce, &key);
    let good = Lab::body("vm-1", &evidence);
    let evidence_hex = hex::encode(evidence.to_bytes());
    for (body, status, code) in [
        ("{".to_owned(), 400, "malformed_json"),
        (r#"{"instance":"vm-1"}"#.to_owned(), 422, "invalid_request"),
        (
            format!(r#"{{"instance":"VM 1","evidence":"{evidence_hex}"}}"#),
            422,
            "invalid_request",
        ),
        (
            r#"{"instance":"vm-1","evidence":"zz"}"#.to_owned(),
            422,
            "invalid_request",
        ),
        (
            format!(
                r#"{{"instance":"vm-1","evidence":"{}"}}"#,
                &evidence_hex[..evidence_hex.len() - 2]
            ),
            422,
            "invalid_request",
        ),
        (
            format!(r#"{{"instance":"vm-1","evidence":"{evidence_hex}","x":1}}"#),
            422,
            "invalid_request",
        ),
    ] {
        let (got, answer) = lab.fetch("db", body.clone()).await;
        assert_eq!(got, status, "{body:.60}: {answer}");
        assert_eq!(refusal(&answer).0, code, "{body:.60}: {answer}");
    }
    // An unknown credential: 404, before the nonce is touched.
    let (status, answer) = lab.fetch("nope", good.clone()).await;
    assert_eq!(
        (status, refusal(&answer).0.as_str()),
        (404, "not_found"),
        "{answer}"
    );
    // The good body still fetches: nothing above spent its nonce.
    let (status, answer) = lab.fetch("db", good.clone()).await;
    assert_eq!(status, 200, "{answer}");
    // Replayed: the nonce is used.
    let (status, answer) = lab.fetch("db", good).await;
    assert_eq!(
        (status, refusal(&answer).0.as_str()),
        (403, "nonce_refused"),
        "{answer}"
    );
    // A nonce the CMS never issued.
    let made_up = lab.evidence(&[0x42; 32], &key);
    let (status, answer) = lab.fetch("db", Lab::body("vm-1", &made_up)).await;
    assert_eq!(
        (status, refusal(&answer).0.as_str()),
        (403, "nonce_refused"),
        "{answer}"
    );

    // An instance that is not registered.
    let nonce = lab.challenge("vm-2").await;
    let evidence = lab.evidence(&nonce, &key);
    let (status, answer) = lab.fetch("db", Lab::body("vm-2", &evidence)).await;
    assert_eq!(
        (status, refusal(&answer).0.as_str()),
        (403, "not_enrolled"),
        "{answer}"
    );

    // Not in the credential's instance policy; in it, but with another AK name.
    for (name, says) in [
        ("map-only", "may not fetch"),
        ("other-ak", "another attestation key"),
    ] {
        let nonce = lab.challenge("vm-1").await;
        let evidence = lab.evidence(&nonce, &key);
        let (status, answer) = lab.fetch(name, Lab::body("vm-1", &evidence)).await;
        let (code, message) = refusal(&answer);
        assert_eq!(
            (status, code.as_str()),
            (403, "forbidden"),
            "{name}: {answer}"
        );
        assert!(message.contains(says), "{name}: {message}");
    }

    // Evidence that does not verify learns nothing of the instance policy: a credential that
    // admits vm-1 and one that does not answer alike.
    for name in ["db", "map-only"] {
        let nonce = lab.challenge("vm-1").await;
        let honest = lab.evidence(&nonce, &key);
        let forged = InstanceEvidence::new(
            nonce,
            FetchKey::generate().unwrap().public_key(),
            honest.quote().clone(),
            honest.pcrs().clone(),
        );
        let (status, answer) = lab.fetch(name, Lab::body("vm-1", &forged)).await;
        assert_eq!(
            (status, refusal(&answer).0.as_str()),
            (403, "evidence_refused"),
            "{name}: {answer}"
        );
    }

    // Evidence re-used with another ephemeral key.
    let nonce = lab.challenge("vm-1").await;
    let honest = lab.evidence(&nonce, &key);
    let swapped = InstanceEvidence::new(
        nonce,
        FetchKey::generate().unwrap().public_key(),
        honest.quote().clone(),
        honest.pcrs().clone(),
    );
    let (status, answer) = lab.fetch("db", Lab::body("vm-1", &swapped)).await;
    assert_eq!(
        (status, refusal(&answer).0.as_str()),
        (403, "evidence_refused"),
        "{answer}"
    );

    // The instance's PCR 7 changed: refused naming it.
    lab.instance
        .extend_pcr(PcrBank::Sha256, 7, b"another bootloader")
        .unwrap();
    let nonce = lab.challenge("vm-1").await;
    let evidence = lab.evidence(&nonce, &key);
    let (status, answer) = lab.fetch("db", Lab::body("vm-1", &evidence)).await;
    let (code, message) = refusal(&answer);
    assert_eq!(
        (status, code.as_str()),
        (403, "evidence_refused"),
        "{answer}"
    );
    assert!(message.contains("sha256:7"), "{message}");
}
