//! A VM volume key's `host` shares (issue 9 item 8) through the CMS: `keyshard init`'s deal of
//! vhd = 1, tpm = 1, host = 2, k = 3, its two `host` fragments placed by
//! `volume::put_volume_shares` on three registered shard hosts (each its own swtpm), fetched by
//! the VM (an instance with its own swtpm, enrolled and registered as `fetch.rs` does) over the
//! CMS's real TLS fetch endpoint, released by each host's TPM under its grant, and combined with
//! the VM's on-host shares into the volume key.

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

use ed25519_dalek::SigningKey;
use keyshard_attest::tpm::PcrSelection;
use keyshard_attest::tpm::public::sha256_name;
use keyshard_cms::credential::AdmittedInstance;
use keyshard_cms::enrolment::{self, EnrolmentKind, PinnedAk};
use keyshard_cms::instances::{self, InstanceRegistration};
use keyshard_cms::registry::HostRegistry;
use keyshard_cms::server::fetch::{FetchRequest, FetchResponse};
use keyshard_cms::server::{CmsServer, Limits, tls};
use keyshard_cms::shard_host::nonces::MemoryNonceBook;
use keyshard_cms::shard_host::{ShardHost as Releaser, ShardRequest};
use keyshard_cms::store::{Key, KeyPrefix, MAX_LIST_LIMIT, Repository, Store};
use keyshard_cms::volume::{VolumeError, VolumeSharesRequest, put_volume_shares};
use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::policy::PcrBank;
use keyshard_core::quorum::{self, Candidate, QuorumRequest};
use keyshard_core::{HolderClass, KeyId, VerifiedFragment};
use keyshard_shards::ecies::{SealedShard, ShardBinding};
use keyshard_shards::grant::Grant;
use keyshard_shards::instance::{FetchKey, InstanceEvidence, Nonce, qualifying_data};
use keyshard_shards::map::ClientKey;
use keyshard_shards::placement::PlacementSeed;
use keyshard_shards::{HostId, InstanceId};
use keyshard_tpm::Tpm;
use zeroize::Zeroizing;

use hosts::{HOSTS, ShardHost};
use swtpm::Swtpm;

const VOLUME_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn now() -> SystemTime {
    SystemTime::now()
}

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

/// A CMS on redb serving TLS, three shard hosts (eu/acme, eu/globex, us/acme) and the VM.
struct Lab {
    store: Store,
    cms: SigningKey,
    client: ClientKey,
    url: String,
    http: reqwest::Client,
    hosts: Vec<ShardHost>,
    vm: Tpm,
    vm_ak_name: [u8; 34],
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
    _swtpm: Swtpm,
}

impl Lab {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("redb:{}", dir.path().join("cms.redb").display()))
            .await
            .unwrap();
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
        let swtpm = Swtpm::start();
        let mut vm = Tpm::open(&swtpm.tcti()).unwrap();
        let vm_ak_name = pin(&store, EnrolmentKind::Instance, "vm-1", ak_of(&mut vm)).await;
        let id = instances::InstanceId::new("vm-1").unwrap();
        let challenge = instances::challenge(&store, &id).await.unwrap();
        let selection = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        let golden = vm.read_pcrs(&selection).unwrap();
        let quote = vm.quote(&selection, challenge.nonce.as_bytes()).unwrap();
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

        let cms = SigningKey::from_bytes(&[0x42; 32]);
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
            vm,
            vm_ak_name,
            stop: Some(stop),
            _dir: dir,
            _swtpm: swtpm,
        }
    }

    /// Every (key, value) in the store, and the redb file's bytes under the key "file".
    async fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let mut values = Vec::new();
        let mut after: Option<Key> = None;
        loop {
            let page = self
                .store
                .list(&KeyPrefix::all(), after.as_ref(), MAX_LIST_LIMIT)
                .await
                .unwrap();
            values.extend(
                page.entries
                    .iter()
                    .map(|(key, e)| (key.as_str().to_owned(), e.value.clone())),
            );
            match (page.more, page.entries.last()) {
                (true, Some((last, _))) => after = Some(last.clone()),
                _ => break,
            }
        }
        let file = std::fs::read(self._dir.path().join("cms.redb")).unwrap();
        values.push(("file".to_owned(), file));
        values
    }

    fn vm1(&self) -> AdmittedInstance {
        AdmittedInstance {
            id: InstanceId::new("vm-1").unwrap(),
            ak_name: self.vm_ak_name,
        }
    }

    async fn put(
        &self,
        key_id: &KeyId,
        dealer: &SigningKey,
        fragments: &[Zeroizing<Vec<u8>>],
    ) -> Result<keyshard_cms::credential::PutReceipt, VolumeError> {
        put_volume_shares(
            &self.store,
            &HostRegistry::default(),
            &self.cms,
            &VolumeSharesRequest {
                key_id,
                dealer: &dealer.verifying_key(),
                fragments,
                client: &self.client.public_key(),
                seed: PlacementSeed::from_bytes([9; 32]),
                allow_correlated: false,
                instances: &[self.vm1()],
            },
            now(),
        )
        .await
    }

    /// The VM's evidence for `nonce`, bound to `key`, over sha256:0,7.
    fn evidence(&mut self, nonce: &Nonce, key: &FetchKey) -> InstanceEvidence {
        let selection = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        let pcrs = self.vm.read_pcrs(&selection).unwrap();
        let quote = self
            .vm
            .quote(&selection, &qualifying_data(nonce, &key.public_key()))
            .unwrap();
        InstanceEvidence::new(*nonce, key.public_key(), quote, pcrs)
    }

    /// What `POST /v1/credentials/{key id}/fetch` answers the VM.
    async fn fetch(&mut self, key_id: &KeyId, key: &FetchKey) -> FetchResponse {
        let id = instances::InstanceId::new("vm-1").unwrap();
        let nonce = *instances::challenge(&self.store, &id)
            .await
            .unwrap()
            .nonce
            .as_bytes();
        let evidence = self.evidence(&nonce, key);
        let body = serde_json::to_string(&FetchRequest {
            instance: "vm-1".to_owned(),
            evidence: hex::encode(evidence.to_bytes()),
        })
        .unwrap();
        let answer = self
            .http
            .post(format!("{}/v1/credentials/{key_id}/fetch", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        let text = answer.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A test host's TPM as a release's key source.
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

/// `keyshard init`'s deal for vhd = 1, tpm = 1, host = 2, k = 3.
fn deal(key_id: &KeyId, dealer: &SigningKey) -> Vec<VerifiedFragment> {
    let holders = [HolderClass::Vhd, HolderClass::Tpm]
        .into_iter()
        .flat_map(|class| HolderSlot::numbered(class, 1))
        .chain(HolderSlot::numbered(HolderClass::Host, 2))
        .collect();
    let plan = DealPlan {
        key_id: key_id.clone(),
        epoch: 1,
        k: 3,
        holders,
    };
    dealer::deal(VOLUME_KEY, &plan, dealer).unwrap()
}

fn encoded(fragments: &[&VerifiedFragment]) -> Vec<Zeroizing<Vec<u8>>> {
    fragments
        .iter()
        .map(|f| Zeroizing::new(f.encoded().to_vec()))
        .collect()
}

fn of_class(fragments: &[VerifiedFragment], class: HolderClass) -> Vec<&VerifiedFragment> {
    fragments
        .iter()
        .filter(|f| f.header().class == class)
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_host_shares_of_a_volume_key_are_placed_fetched_by_the_vm_and_complete_its_quorum() {
    let mut lab = Lab::start().await;
    let dealer = SigningKey::from_bytes(&[0x17; 32]);
    let key_id = KeyId::new("vol-a1").unwrap();
    let fragments = deal(&key_id, &dealer);
    let host_fragments = of_class(&fragments, HolderClass::Host);
    let receipt = lab
        .put(&key_id, &dealer, &encoded(&host_fragments))
        .await
        .unwrap();
    // Two shares, in different regions and operators: of host-1 (eu/acme), host-2 (eu/globex)
    // and host-3 (us/acme), only host-2 and host-3 differ in both.
    let placed: Vec<&str> = receipt
        .placement
        .hosts()
        .iter()
        .map(HostId::as_str)
        .collect();
    assert_eq!(placed.len(), 2);
    let mut sorted = placed.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["host-2", "host-3"], "{placed:?}");

    // The store holds no share of the volume key in the clear, nor the key.
    let dump = lab.dump().await;
    for fragment in &host_fragments {
        for (_, value) in &dump {
            assert!(!contains(value, fragment.encoded()));
            assert!(!contains(value, VOLUME_KEY));
        }
    }

    // The VM fetches its grants and asks each host; each releases its slot to the VM's key.
    let fetch_key = FetchKey::generate().unwrap();
    let answer = lab.fetch(&key_id, &fetch_key).await;
    assert_eq!(answer.grants.len(), 2);
    let mut released = Vec::new();
    for entry in &answer.grants {
        let nonces = MemoryNonceBook::new();
        let host_nonce = nonces.issue().unwrap();
        let evidence = lab.evidence(&host_nonce, &fetch_key);
        let host = lab
            .hosts
            .iter()
            .find(|h| h.id.as_str() == entry.host)
            .unwrap();
        let grant = Grant::from_bytes(&hex::decode(&entry.grant).unwrap()).unwrap();
        let sealed = SealedShard::from_bytes(&hex::decode(&entry.sealed_shard).unwrap()).unwrap();
        let verified = grant
            .verify(&lab.cms.verifying_key(), &host.id, &sealed, now())
            .unwrap();
        let releaser = Releaser::new(host.id.clone(), HostKey(host));
        let shard = releaser
            .release(
                &ShardRequest {
                    credential: key_id.clone(),
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
            credential: key_id.clone(),
            epoch: verified.epoch(),
            index: verified.index(),
            host: host.id.clone(),
        };
        let bytes = fetch_key.open(&shard.shard, &binding).unwrap();
        released.push(Candidate::new(entry.host.clone(), bytes.to_vec()));
    }
    // What the hosts released are the dealer-signed host fragments (share indices 3 and 4).
    let request = QuorumRequest {
        dealer: &dealer.verifying_key(),
        key_id: Some(&key_id),
        threshold: Some(3),
        key_check_value: Some(&fragments[0].header().kcv),
    };
    let vhd = of_class(&fragments, HolderClass::Vhd)[0];
    let mut candidates = released.clone();
    candidates.push(Candidate::new("vhd-1", vhd.encoded().to_vec()));
    let outcome = quorum::rebuild(&request, &candidates).unwrap();
    assert_eq!(outcome.secret.as_slice(), VOLUME_KEY);
    let mut used: Vec<u8> = outcome.used.iter().map(|a| a.header.index).collect();
    used.sort_unstable();
    assert_eq!(used, [1, 3, 4]);
    // The two host shares alone are below k.
    assert!(quorum::rebuild(&request, &released).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_only_host_fragments_of_one_deal_signed_by_the_named_dealer_are_placed() {
    let lab = Lab::start().await;
    let dealer = SigningKey::from_bytes(&[0x17; 32]);
    let key_id = KeyId::new("vol-b2").unwrap();
    let fragments = deal(&key_id, &dealer);
    let hosts = of_class(&fragments, HolderClass::Host);
    let vhd = of_class(&fragments, HolderClass::Vhd);

    let other_dealer = SigningKey::from_bytes(&[0x18; 32]);
    let err = lab.put(&key_id, &other_dealer, &encoded(&hosts)).await;
    assert!(
        matches!(err, Err(VolumeError::Fragment { position: 1, .. })),
        "{err:?}"
    );

    let err = lab
        .put(&key_id, &dealer, &encoded(&[hosts[0], vhd[0]]))
        .await;
    assert!(
        matches!(
            err,
            Err(VolumeError::NotHostClass {
                position: 2,
                class: HolderClass::Vhd,
                ..
            })
        ),
        "{err:?}"
    );

    let err = lab
        .put(&key_id, &dealer, &encoded(&[hosts[0], hosts[0]]))
        .await;
    assert!(
        matches!(err, Err(VolumeError::DuplicateIndex { index: 3, .. })),
        "{err:?}"
    );

    let second_deal = deal(&key_id, &dealer);
    let other = of_class(&second_deal, HolderClass::Host);
    let err = lab
        .put(&key_id, &dealer, &encoded(&[hosts[0], other[1]]))
        .await;
    assert!(
        matches!(
            err,
            Err(VolumeError::Mixed {
                position: 2,
                field: "deal",
                ..
            })
        ),
        "{err:?}"
    );

    let err = lab.put(&key_id, &dealer, &encoded(&hosts[..1])).await;
    let text = err
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        matches!(err, Err(VolumeError::TooFew { count: 1, .. })),
        "{err:?}"
    );
    assert!(text.contains("at least 2"), "{text}");

    let foreign_key = KeyId::new("vol-c3").unwrap();
    let err = lab.put(&foreign_key, &dealer, &encoded(&hosts)).await;
    assert!(
        matches!(err, Err(VolumeError::OtherKey { position: 1, .. })),
        "{err:?}"
    );

    // Nothing was stored by any refusal; the good request is then stored, once.
    assert!(
        lab.dump()
            .await
            .iter()
            .all(|(key, _)| !key.contains("vol-")),
        "a refused put stored something"
    );
    lab.put(&key_id, &dealer, &encoded(&hosts)).await.unwrap();
    let again = lab.put(&key_id, &dealer, &encoded(&hosts)).await;
    assert!(matches!(err_of(again), Some(text) if text.contains("exists")),);
}

fn err_of<T>(result: Result<T, VolumeError>) -> Option<String> {
    result.err().map(|e| e.to_string())
}
