//! Credential put and the shard map (issue 9, items 2 to 5, the CMS's side) against real shard
//! host keys: six hosts in three regions and two operators, each with its own swtpm (its own
//! AK and decrypt key: one swtpm per host costs a few milliseconds and makes "another host's
//! key" a real other TPM), registered through the registry with real TPM2_Certify output. The
//! tests open every sealed shard with the TPM of the host it was placed on (TPM2_ECDH_ZGen),
//! as a shard host will. The store is a redb file; the last test runs on a real etcd.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;
// The test shard hosts, shared with keyshard's `cms_credentials` test.
#[allow(dead_code)]
#[path = "common/hosts.rs"]
mod hosts;
// The one swtpm launcher of the workspace, as keyshard-tpm's tests use it.
#[allow(dead_code)]
#[path = "../../keyshard-tpm/tests/common/swtpm.rs"]
mod swtpm;

use std::time::{Duration, SystemTime};

use ed25519_dalek::SigningKey;
use keyshard_attest::tpm::CertifyError;
use keyshard_cms::credential::{
    self, CredentialError, FIRST_EPOCH, PutRequest, map_for, put_credential,
};
use keyshard_cms::registry::{Exclusion, HostRegistry, RegistryError};
use keyshard_cms::store::{Key, KeyPrefix, MAX_LIST_LIMIT, Repository, Store, StoreError};
use keyshard_core::sharing::{self, Share};
use keyshard_core::{Fragment, HolderClass, KeyId, Threshold, VerifiedFragment};
use keyshard_shards::HostId;
use keyshard_shards::ecies::{self, EciesError};
use keyshard_shards::map::{ClientKey, MapError};
use keyshard_shards::placement::{self, Candidate, PlacementError, PlacementSeed};

use common::etcd::EtcdServer;
use hosts::{HOSTS, ShardHost};

/// A store, the CMS key, the registry and six registered hosts.
struct Lab {
    store: Store,
    cms: SigningKey,
    registry: HostRegistry,
    hosts: Vec<ShardHost>,
    _dir: Option<tempfile::TempDir>,
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl Lab {
    async fn redb() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("redb:{}", dir.path().join("cms.redb").display());
        let store = Store::open(&url).await.unwrap();
        Self::with_store(store, Some(dir)).await
    }

    async fn with_store(store: Store, dir: Option<tempfile::TempDir>) -> Self {
        let mut lab = Self {
            store,
            cms: SigningKey::from_bytes(&[0x11; 32]),
            registry: HostRegistry::default(),
            hosts: Vec::new(),
            _dir: dir,
        };
        for (id, region, operator) in HOSTS {
            lab.add_host(id, region, operator, now()).await;
        }
        lab
    }

    async fn add_host(&mut self, id: &str, region: &str, operator: &str, at: SystemTime) {
        let host = ShardHost::start(id);
        let nonce = self.registry.challenge(&self.store).await.unwrap();
        let registration = host.registration(nonce, region, operator);
        self.registry
            .register(&self.store, registration, at)
            .await
            .unwrap();
        self.hosts.push(host);
    }

    fn host(&self, id: &HostId) -> &ShardHost {
        self.hosts.iter().find(|h| &h.id == id).unwrap()
    }

    async fn put(
        &self,
        name: &KeyId,
        secret: &[u8],
        k: u8,
        n: u8,
        client: &ClientKey,
        allow_correlated: bool,
    ) -> Result<credential::PutReceipt, CredentialError> {
        put_credential(
            &self.store,
            &self.registry,
            &self.cms,
            &PutRequest {
                name,
                secret,
                threshold: Threshold::new(k, n).unwrap(),
                client: &client.public_key(),
                seed: seed(name),
                allow_correlated,
                instances: &[],
            },
            now(),
        )
        .await
    }

    /// Every stored shard of `name`, opened in the TPM of the host it is stored for, and
    /// verified as a fragment signed by the CMS key.
    async fn open_all(&self, name: &KeyId) -> Vec<VerifiedFragment> {
        let stored = credential::load(&self.store, name).await.unwrap().unwrap();
        stored
            .shards
            .iter()
            .map(|(index, host, sealed)| {
                let opened = self
                    .host(host)
                    .open(&binding(name, *index, host), sealed)
                    .unwrap();
                let verified = Fragment::parse(&opened)
                    .unwrap()
                    .verify(&self.cms.verifying_key())
                    .unwrap();
                let header = verified.header();
                assert_eq!(header.index, *index);
                assert_eq!(header.epoch, FIRST_EPOCH);
                assert_eq!(header.class, HolderClass::Host);
                assert_eq!(&header.key_id, name);
                verified
            })
            .collect()
    }

    /// Every value in the store, and for redb the file's bytes as well.
    async fn dump(&self) -> Vec<Vec<u8>> {
        let mut values = Vec::new();
        let mut after: Option<Key> = None;
        loop {
            let page = self
                .store
                .list(&KeyPrefix::all(), after.as_ref(), MAX_LIST_LIMIT)
                .await
                .unwrap();
            values.extend(page.entries.iter().map(|(_, e)| e.value.clone()));
            match (page.more, page.entries.last()) {
                (true, Some((last, _))) => after = Some(last.clone()),
                _ => break,
            }
        }
        if let Some(dir) = &self._dir {
            values.push(std::fs::read(dir.path().join("cms.redb")).unwrap());
        }
        values
    }
}

fn name(text: &str) -> KeyId {
    KeyId::new(text).unwrap()
}

/// A seed fixed by the credential's name, so that a failure reproduces.
fn seed(name: &KeyId) -> PlacementSeed {
    let mut out = [0u8; 32];
    for (i, b) in name.as_str().bytes().cycle().take(32).enumerate() {
        out[i] = b.wrapping_mul(31).wrapping_add(i as u8);
    }
    PlacementSeed::from_bytes(out)
}

fn binding(name: &KeyId, index: u8, host: &HostId) -> ecies::ShardBinding {
    ecies::ShardBinding {
        credential: name.clone(),
        epoch: FIRST_EPOCH,
        index,
        host: host.clone(),
    }
}

/// The largest number of shares one region and one operator hold.
fn max_loads(hosts: &[HostId]) -> (usize, usize) {
    let domain = |id: &HostId| HOSTS.iter().find(|(h, ..)| *h == id.as_str()).unwrap();
    let count = |pick: fn(&(&'static str, &'static str, &'static str)) -> &'static str| {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for host in hosts {
            *counts.entry(pick(domain(host))).or_default() += 1;
        }
        counts.values().copied().max().unwrap_or(0)
    };
    (count(|d| d.1), count(|d| d.2))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const SECRET: &[u8] = b"postgres://app:s3cr3t-p4ssw0rd-0123456789@db.internal/prod";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_put_3_of_4_spreads_and_seals_each_shard_to_its_hosts_tpm_only() {
    let lab = Lab::redb().await;
    let client = ClientKey::generate().unwrap();
    let db = name("db-password");
    let receipt = lab.put(&db, SECRET, 3, 4, &client, false).await.unwrap();
    assert_eq!(receipt.epoch, FIRST_EPOCH);
    let hosts = receipt.placement.hosts().to_vec();
    assert_eq!(hosts.len(), 4);
    let (region, operator) = max_loads(&hosts);
    assert!(
        region < 3 && operator < 3,
        "{hosts:?} loads {region}/{operator}"
    );
    assert!(receipt.placement.correlated().0.is_empty());

    // Each shard opens in its host's TPM, is a fragment the CMS signed, and k of them rebuild.
    let fragments = lab.open_all(&db).await;
    let shares: Vec<Share> = fragments.iter().map(|f| f.share().clone()).collect();
    for three in [&shares[..3], &shares[1..]] {
        assert_eq!(&sharing::combine(three, 3).unwrap()[..], SECRET);
    }

    // Nowhere else: not in another host's TPM, not under another index, epoch or credential.
    let stored = credential::load(&lab.store, &db).await.unwrap().unwrap();
    let (index, host, sealed) = &stored.shards[0];
    assert_eq!(stored.shard_for(host), Some((*index, sealed)));
    let unplaced = lab.hosts.iter().find(|h| !hosts.contains(&h.id)).unwrap();
    assert_eq!(stored.shard_for(&unplaced.id), None);
    let other = lab.hosts.iter().find(|h| &h.id != host).unwrap();
    assert!(matches!(
        other.open(&binding(&db, *index, &other.id), sealed),
        Err(EciesError::Open)
    ));
    let owner = lab.host(host);
    assert!(matches!(
        owner.open(&binding(&db, index + 1, host), sealed),
        Err(EciesError::Open)
    ));
    let mut later = binding(&db, *index, host);
    later.epoch += 1;
    assert!(matches!(owner.open(&later, sealed), Err(EciesError::Open)));
    assert!(matches!(
        owner.open(&binding(&name("other"), *index, host), sealed),
        Err(EciesError::Open)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_put_3_of_5_is_refused_with_the_reason_unless_allow_correlated() {
    let lab = Lab::redb().await;
    let client = ClientKey::generate().unwrap();
    let api = name("api-token");
    // Two operators cannot hold 5 shares with at most 2 each.
    let err = lab
        .put(&api, SECRET, 3, 5, &client, false)
        .await
        .unwrap_err();
    let CredentialError::Placement {
        source: PlacementError::Correlated { k: 3, n: 5, loads },
        ..
    } = &err
    else {
        panic!("expected a correlated-placement refusal, got {err}");
    };
    assert!(!loads.0.is_empty());
    let text = err.to_string();
    assert!(
        text.contains("api-token") && text.contains("operator") && text.contains("would hold 3"),
        "{text}"
    );
    assert!(credential::load(&lab.store, &api).await.unwrap().is_none());

    let receipt = lab.put(&api, SECRET, 3, 5, &client, true).await.unwrap();
    let (_, operator) = max_loads(receipt.placement.hosts());
    assert_eq!(operator, 3);
    assert!(!receipt.placement.correlated().0.is_empty());
    assert_eq!(lab.open_all(&api).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_the_map_opens_with_the_client_key_and_not_another() {
    let lab = Lab::redb().await;
    let client = ClientKey::generate().unwrap();
    let db = name("db-password");
    let receipt = lab.put(&db, SECRET, 3, 4, &client, false).await.unwrap();
    let sealed = map_for(&lab.store, &db, &client.public_key())
        .await
        .unwrap();
    let map = sealed.open(&client, &lab.cms.verifying_key(), &db).unwrap();
    assert_eq!(map.epoch(), FIRST_EPOCH);
    assert_eq!((map.threshold().k(), map.threshold().n()), (3, 4));
    assert!(map.key_check_value().matches(SECRET, &db));
    assert!(map.follows(&receipt.placement));
    for (index, location) in map.shards() {
        let host = lab.host(&location.host);
        assert_eq!(
            location.key_name.as_bytes(),
            &host.key.name()[..],
            "{index}"
        );
        assert_eq!(
            location.endpoint.as_str(),
            format!("https://{}.invalid:8443", host.id)
        );
    }
    // Anyone can recompute the placement from the recorded seed and the registered hosts.
    let candidates: Vec<Candidate> = lab
        .registry
        .fresh_hosts(&lab.store, now())
        .await
        .unwrap()
        .fresh
        .iter()
        .map(|h| h.candidate())
        .collect();
    let recomputed = placement::place(&placement::PlacementRequest {
        seed: map.seed(),
        credential: &db,
        threshold: map.threshold(),
        candidates: &candidates,
        allow_correlated: true,
    })
    .unwrap();
    assert!(map.follows(&recomputed));

    // Another client's key does not open it, nor does the right key under another CMS key.
    let stranger = ClientKey::generate().unwrap();
    assert_eq!(
        sealed.open(&stranger, &lab.cms.verifying_key(), &db),
        Err(MapError::Open)
    );
    let other_cms = SigningKey::from_bytes(&[0x22; 32]).verifying_key();
    assert_eq!(
        sealed.open(&client, &other_cms, &db),
        Err(MapError::Signature)
    );
    // A secret the dealer refuses (empty) stores nothing.
    let empty = name("empty");
    assert!(matches!(
        lab.put(&empty, b"", 3, 4, &client, false).await,
        Err(CredentialError::Deal { .. })
    ));
    assert!(
        credential::load(&lab.store, &empty)
            .await
            .unwrap()
            .is_none()
    );
    // And the CMS hands the map only to the client it was put for.
    assert!(matches!(
        map_for(&lab.store, &db, &stranger.public_key()).await,
        Err(CredentialError::OtherClient { .. })
    ));
    assert!(matches!(
        map_for(&lab.store, &name("missing"), &client.public_key()).await,
        Err(CredentialError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_a_forged_or_foreign_certification_is_refused_at_registration() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("redb:{}", dir.path().join("cms.redb").display()))
        .await
        .unwrap();
    let registry = HostRegistry::default();
    let host = ShardHost::start("host-1");
    let elsewhere = ShardHost::start("host-2");
    let refused = |result: Result<_, RegistryError>| match result {
        Err(RegistryError::Certification { source, .. }) => source,
        Err(other) => panic!("expected a certification refusal, got {other}"),
        Ok(_) => panic!("a forged registration was accepted"),
    };

    // Signed by another TPM's AK, presented with this host's AK.
    let nonce = registry.challenge(&store).await.unwrap();
    let mut forged = host.registration(nonce, "eu", "acme");
    forged.certification = elsewhere.registration(nonce, "eu", "acme").certification;
    forged.decrypt_key_public = elsewhere.key.public_area().to_vec();
    assert_eq!(
        refused(registry.register(&store, forged, now()).await),
        CertifyError::Signature
    );
    // A certification of another key than the one presented.
    let mut swapped = host.registration(nonce, "eu", "acme");
    swapped.decrypt_key_public = elsewhere.key.public_area().to_vec();
    assert_eq!(
        refused(registry.register(&store, swapped, now()).await),
        CertifyError::Name
    );
    // A certification over another nonce than the challenge it claims to answer.
    let mut stale = host.registration(nonce, "eu", "acme");
    stale.nonce = registry.challenge(&store).await.unwrap();
    assert_eq!(
        refused(registry.register(&store, stale, now()).await),
        CertifyError::Nonce
    );
    // A certification over a nonce the CMS never issued.
    let invented = keyshard_cms::store::Nonce::from_bytes([7; 32]);
    assert!(matches!(
        registry
            .register(&store, host.registration(invented, "eu", "acme"), now())
            .await,
        Err(RegistryError::Nonce {
            source: StoreError::NonceUnknown,
            ..
        })
    ));
    // Nothing was stored by the refusals.
    assert!(registry.host(&store, &host.id).await.unwrap().is_none());

    // The genuine registration is accepted, once: its nonce is used up.
    let genuine = host.registration(nonce, "eu", "acme");
    let first = registry
        .register(&store, genuine.clone(), now())
        .await
        .unwrap();
    assert!(matches!(
        registry.register(&store, genuine, now()).await,
        Err(RegistryError::Nonce {
            source: StoreError::NonceUnknown,
            ..
        })
    ));
    // Re-registration with a new challenge is a compare-and-swap update.
    let again = host.registration(registry.challenge(&store).await.unwrap(), "eu", "acme");
    let second = registry.register(&store, again, now()).await.unwrap();
    assert!(second.revision() > first.revision());
    // Another TPM cannot take the registered id, even with a valid certification of its own.
    let mut takeover = elsewhere.registration(registry.challenge(&store).await.unwrap(), "eu", "x");
    takeover.id = host.id.clone();
    assert!(matches!(
        registry.register(&store, takeover, now()).await,
        Err(RegistryError::AkChanged { .. })
    ));
    // One TPM is one host: the other TPM, registered as host-2, cannot also be host-3, not
    // even with a decrypt key of its own.
    let as_two = elsewhere.registration(registry.challenge(&store).await.unwrap(), "us", "x");
    registry.register(&store, as_two, now()).await.unwrap();
    let second_key = elsewhere.tpm.lock().unwrap().create_decrypt_key().unwrap();
    let nonce = registry.challenge(&store).await.unwrap();
    let mut as_three = elsewhere.registration(nonce, "ap", "y");
    as_three.id = HostId::new("host-3").unwrap();
    as_three.certification = elsewhere
        .tpm
        .lock()
        .unwrap()
        .certify_decrypt_key(&second_key, nonce.as_bytes())
        .unwrap();
    as_three.decrypt_key_public = second_key.public_area().to_vec();
    let err = registry
        .register(&store, as_three, now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::TpmTaken { other, .. } if other.as_str() == "host-2"),
        "{err}"
    );
    assert!(
        registry
            .host(&store, &HostId::new("host-3").unwrap())
            .await
            .unwrap()
            .is_none()
    );
    let kept = registry.host(&store, &host.id).await.unwrap().unwrap();
    assert_eq!(kept.revision(), second.revision());
    assert_eq!(&kept.certified_key().point, host.key.point());
    // Once the operator removes host-1, the id is free again.
    assert!(registry.remove(&store, &host.id).await.unwrap());
    assert!(!registry.remove(&store, &host.id).await.unwrap());
    assert!(registry.host(&store, &host.id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_a_stale_host_is_not_placed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("redb:{}", dir.path().join("cms.redb").display()))
        .await
        .unwrap();
    let mut lab = Lab {
        store,
        cms: SigningKey::from_bytes(&[0x11; 32]),
        registry: HostRegistry {
            max_age: Duration::from_secs(3600),
            admission: None,
        },
        hosts: Vec::new(),
        _dir: Some(dir),
    };
    let (stale, fresh) = HOSTS.split_first().unwrap();
    for (id, region, operator) in fresh {
        lab.add_host(id, region, operator, now()).await;
    }
    let two_hours_ago = now() - Duration::from_secs(2 * 3600);
    lab.add_host(stale.0, stale.1, stale.2, two_hours_ago).await;

    let listing = lab.registry.fresh_hosts(&lab.store, now()).await.unwrap();
    assert_eq!(listing.fresh.len(), 5);
    assert!(matches!(
        listing.excluded.as_slice(),
        [(key, Exclusion::Stale { age })] if key == "hosts/host-1" && age.as_secs() >= 7200
    ));
    let client = ClientKey::generate().unwrap();
    // Six shares need six fresh hosts: refused, the stale one does not count.
    let err = lab
        .put(&name("six"), SECRET, 2, 6, &client, true)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CredentialError::Placement {
                source: PlacementError::NotEnoughHosts { eligible: 5, n: 6 },
                ..
            }
        ),
        "{err}"
    );
    // Every seed places on fresh hosts only.
    for i in 0..8 {
        let n = name(&format!("cred-{i}"));
        let receipt = lab.put(&n, SECRET, 3, 4, &client, false).await.unwrap();
        assert!(
            receipt
                .placement
                .hosts()
                .iter()
                .all(|h| h.as_str() != "host-1"),
            "{:?}",
            receipt.placement.hosts()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_the_store_holds_no_plaintext_share_or_secret() {
    let lab = Lab::redb().await;
    let client = ClientKey::generate().unwrap();
    let db = name("db-password");
    lab.put(&db, SECRET, 3, 4, &client, false).await.unwrap();
    let fragments = lab.open_all(&db).await;
    let dump = lab.dump().await;
    // The dump does hold the credential's record (its sealed shards and maps).
    assert!(dump.iter().any(|v| contains(v, b"\"sealed_map\"")));
    let mut needles: Vec<(String, Vec<u8>)> = vec![("the secret".into(), SECRET.to_vec())];
    for verified in fragments {
        let index = verified.header().index;
        needles.push((format!("share {index}"), verified.share().value().to_vec()));
        needles.push((format!("fragment {index}"), verified.encoded().to_vec()));
    }
    for (what, bytes) in needles {
        // As bytes, and as the hex a JSON record would carry.
        let hex_lower = hex::encode(&bytes).into_bytes();
        let hex_upper = hex::encode_upper(&bytes).into_bytes();
        for value in &dump {
            assert!(
                !contains(value, &bytes)
                    && !contains(value, &hex_lower)
                    && !contains(value, &hex_upper),
                "{what} is in the store"
            );
        }
    }
}

/// Two puts of one name, each on its own task (and, on etcd, its own connection): exactly one
/// is stored, the other is refused as existing, and the stored map is the winner's.
async fn concurrent_puts_do_not_both_win(lab: &Lab, second_store: Store) {
    let client = ClientKey::generate().unwrap();
    let shared = name("shared");
    let run = |store: Store, secret: &'static [u8]| {
        let registry = lab.registry.clone();
        let cms = lab.cms.clone();
        let client = client.public_key();
        let shared = shared.clone();
        tokio::spawn(async move {
            let result = put_credential(
                &store,
                &registry,
                &cms,
                &PutRequest {
                    name: &shared,
                    secret,
                    threshold: Threshold::new(3, 4).unwrap(),
                    client: &client,
                    seed: PlacementSeed::random().unwrap(),
                    allow_correlated: false,
                    instances: &[],
                },
                now(),
            )
            .await;
            (secret, result)
        })
    };
    let a = run(lab.store.clone(), b"first secret");
    let b = run(second_store, b"other secret");
    let results = [a.await.unwrap(), b.await.unwrap()];
    let winners: Vec<_> = results.iter().filter(|(_, r)| r.is_ok()).collect();
    assert_eq!(
        winners.len(),
        1,
        "both or neither won: {:?}",
        results
            .iter()
            .map(|(_, r)| r.as_ref().err())
            .collect::<Vec<_>>()
    );
    let loser = results.iter().find(|(_, r)| r.is_err()).unwrap();
    assert!(
        matches!(
            loser.1,
            Err(CredentialError::Exists {
                epoch: FIRST_EPOCH,
                ..
            })
        ),
        "{:?}",
        loser.1
    );
    let map = map_for(&lab.store, &shared, &client.public_key())
        .await
        .unwrap()
        .open(&client, &lab.cms.verifying_key(), &shared)
        .unwrap();
    assert!(map.key_check_value().matches(winners[0].0, &shared));
    // And a later put of the name is refused before it deals anything.
    assert!(matches!(
        lab.put(&shared, b"third", 3, 4, &client, false).await,
        Err(CredentialError::Exists { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_two_concurrent_puts_of_one_name_do_not_both_win() {
    let lab = Lab::redb().await;
    concurrent_puts_do_not_both_win(&lab, lab.store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_etcd_put_map_no_plaintext_and_one_winner() {
    let etcd = EtcdServer::start().await;
    let store = Store::open(&etcd.store_url()).await.unwrap();
    let lab = Lab::with_store(store, None).await;
    let client = ClientKey::generate().unwrap();
    let db = name("db-password");
    let receipt = lab.put(&db, SECRET, 3, 4, &client, false).await.unwrap();
    let (region, operator) = max_loads(receipt.placement.hosts());
    assert!(region < 3 && operator < 3);
    let map = map_for(&lab.store, &db, &client.public_key())
        .await
        .unwrap()
        .open(&client, &lab.cms.verifying_key(), &db)
        .unwrap();
    assert!(map.follows(&receipt.placement));
    let fragments = lab.open_all(&db).await;
    let shares: Vec<Share> = fragments.iter().map(|f| f.share().clone()).collect();
    assert_eq!(&sharing::combine(&shares[1..], 3).unwrap()[..], SECRET);
    let dump = lab.dump().await;
    for share in &shares {
        for value in &dump {
            assert!(!contains(value, share.value()));
            assert!(!contains(value, hex::encode(share.value()).as_bytes()));
        }
    }
    assert!(dump.iter().all(|v| !contains(v, SECRET)));
    let replica = Store::open(&etcd.store_url()).await.unwrap();
    concurrent_puts_do_not_both_win(&lab, replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_a_host_record_damaged_in_the_store_is_not_placed() {
    let lab = Lab::redb().await;
    // host-2's record now names host-3's decrypt key: its certification no longer matches.
    let key = Key::new("hosts/host-2").unwrap();
    let record = String::from_utf8(lab.store.get(&key).await.unwrap().unwrap().value).unwrap();
    let theirs = hex::encode(lab.hosts[1].key.public_area());
    let other = hex::encode(lab.hosts[2].key.public_area());
    assert!(record.contains(&theirs));
    lab.store
        .put(&key, record.replace(&theirs, &other).as_bytes())
        .await
        .unwrap();

    let listing = lab.registry.fresh_hosts(&lab.store, now()).await.unwrap();
    assert_eq!(listing.fresh.len(), 5);
    assert!(
        matches!(
            listing.excluded.as_slice(),
            [(key, Exclusion::Invalid(RegistryError::Certification {
                source: CertifyError::Name,
                ..
            }))] if key == "hosts/host-2"
        ),
        "{:?}",
        listing.excluded
    );
    let client = ClientKey::generate().unwrap();
    for i in 0..8 {
        let n = name(&format!("cred-{i}"));
        let receipt = lab.put(&n, SECRET, 3, 4, &client, false).await.unwrap();
        assert!(
            receipt
                .placement
                .hosts()
                .iter()
                .all(|h| h.as_str() != "host-2"),
            "{:?}",
            receipt.placement.hosts()
        );
    }
}
