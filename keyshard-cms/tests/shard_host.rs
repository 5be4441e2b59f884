//! A shard host's release against real TPMs (issue 9, item 6): one swtpm is the shard host's TPM
//! (its P-256 decrypt key does the ECDH), another is the compute instance's TPM (its attestation
//! key quotes). The CMS's part, sealing a shard to the host's key, is done in software here, as
//! the CMS does it; the instance's part (evidence, opening the answer) uses keyshard-shards'
//! `instance` module over its own TPM.

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

use std::time::Instant;

use keyshard_attest::tpm::PcrSelection;
use keyshard_cms::shard_host::nonces::{MemoryNonceBook, NonceError};
use keyshard_cms::shard_host::tpm_key::TpmDecryptKey;
use keyshard_cms::shard_host::{ReleaseError, Released, ShardHost, ShardRequest};
use keyshard_core::KeyId;
use keyshard_core::policy::PcrBank;
use keyshard_shards::HostId;
use keyshard_shards::ecies::{self, EciesError, P256Point, SealedShard, ShardBinding};
use keyshard_shards::instance::{
    FetchKey, FetchPublicKey, InstanceEvidence, InstancePolicy, Nonce, ReleasedShard, VerifyError,
    qualifying_data,
};
use keyshard_tpm::{Tpm, TpmConfig, TpmService};
use swtpm::Swtpm;

const HOST: &str = "host-eu-1";
const EPOCH: u64 = 3;

/// The shard host (its swtpm and its release), the instance (its swtpm, opened as a `Tpm`),
/// the policy the CMS registered for the instance, and one shard sealed to the host.
struct World {
    host: ShardHost<TpmDecryptKey>,
    nonces: MemoryNonceBook,
    host_tpm: TpmService,
    instance: Tpm,
    selection: PcrSelection,
    policy: InstancePolicy,
    shard: Vec<u8>,
    // Declared last: the TPM contexts above close before their simulators stop.
    _swtpms: (Swtpm, Swtpm),
}

fn credential() -> KeyId {
    KeyId::new("db-password").unwrap()
}

fn binding(index: u8, host: &str) -> ShardBinding {
    ShardBinding {
        credential: credential(),
        epoch: EPOCH,
        index,
        host: HostId::new(host).unwrap(),
    }
}

impl World {
    fn new() -> Self {
        let host_swtpm = Swtpm::start();
        let instance_swtpm = Swtpm::start();
        let host_tpm = TpmService::spawn(TpmConfig::new(host_swtpm.tcti())).unwrap();
        let decrypt_key = host_tpm.create_decrypt_key().unwrap();
        let host = ShardHost::new(
            HostId::new(HOST).unwrap(),
            TpmDecryptKey::new(host_tpm.clone(), decrypt_key).unwrap(),
        );
        // Enrolment, as `keyshard instance enroll` will register it: the instance's AK and
        // its golden PCR values, read from its TPM in its known-good state.
        let mut instance = Tpm::open(&instance_swtpm.tcti()).unwrap();
        let selection = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        let golden = instance.read_pcrs(&selection).unwrap();
        let policy = InstancePolicy::new(instance.ak_public().clone(), golden);
        // The policy travels as bytes from the CMS.
        let policy = InstancePolicy::from_bytes(&policy.to_bytes()).unwrap();
        let mut shard = vec![0u8; 181];
        getrandom::fill(&mut shard).unwrap();
        Self {
            host,
            nonces: MemoryNonceBook::new(),
            host_tpm,
            instance,
            selection,
            policy,
            shard,
            _swtpms: (host_swtpm, instance_swtpm),
        }
    }

    /// What the CMS stores for (credential, epoch, `index`, `host`): the shard sealed in
    /// software to `recipient`.
    fn sealed_to(&self, recipient: &P256Point, index: u8, host: &str) -> SealedShard {
        let sealed = ecies::seal(recipient, &binding(index, host), &self.shard).unwrap();
        SealedShard::from_bytes(&sealed.to_bytes()).unwrap()
    }

    /// This host's shard of index 2, sealed to its TPM key.
    fn sealed(&self) -> SealedShard {
        self.sealed_to(
            &keyshard_shards::ecies::SharedPointSource::public_key(self.host.key()),
            2,
            HOST,
        )
    }

    /// A challenge from the host: a fresh nonce.
    fn challenge(&self) -> Nonce {
        self.nonces.issue().unwrap()
    }

    /// What the host process does with a request: spend the nonce its evidence answers, then
    /// release.
    fn ask(&self, request: &ShardRequest, sealed: &SealedShard) -> Result<Released, Refusal> {
        let spent = self
            .nonces
            .consume(request.evidence.nonce())
            .map_err(Refusal::Nonce)?;
        self.host
            .release(request, sealed, &self.policy, spent)
            .map_err(Refusal::Release)
    }

    /// The instance's evidence for `nonce` and `key`, quoted by its own TPM, as it goes over
    /// the wire.
    fn evidence(&mut self, nonce: &Nonce, key: &FetchPublicKey) -> InstanceEvidence {
        let pcrs = self.instance.read_pcrs(&self.selection).unwrap();
        let quote = self
            .instance
            .quote(&self.selection, &qualifying_data(nonce, key))
            .unwrap();
        let evidence = InstanceEvidence::new(*nonce, *key, quote, pcrs);
        InstanceEvidence::from_bytes(&evidence.to_bytes()).unwrap()
    }
}

/// Why the host said no: its nonce book, or the release.
#[derive(Debug)]
enum Refusal {
    Nonce(NonceError),
    Release(ReleaseError),
}

/// The instance's request to this host for share `index`.
fn shard_request(index: u8, evidence: InstanceEvidence) -> ShardRequest {
    ShardRequest {
        credential: credential(),
        epoch: EPOCH,
        index,
        evidence,
    }
}

#[test]
fn item6_a_shard_released_by_the_host_tpm_opens_on_the_instance_byte_for_byte() {
    let mut world = World::new();
    let sealed = world.sealed();
    for _ in 0..3 {
        let fetch = FetchKey::generate().unwrap();
        let nonce = world.challenge();
        let evidence = world.evidence(&nonce, &fetch.public_key());
        let started = Instant::now();
        let released = world.ask(&shard_request(2, evidence), &sealed).unwrap();
        let took = started.elapsed();
        eprintln!(
            "release on swtpm: {took:?} (plaintext held {:?})",
            released.plaintext_held
        );
        // The answer goes over the wire as bytes, and opens only as this host's index 2.
        let answer = ReleasedShard::from_bytes(&released.shard.to_bytes()).unwrap();
        let opened = fetch.open(&answer, &binding(2, HOST)).unwrap();
        assert_eq!(opened.as_slice(), world.shard.as_slice());
        assert!(fetch.open(&answer, &binding(2, "host-eu-2")).is_err());
        // No byte run of the shard shows in the answer.
        assert!(
            !answer
                .to_bytes()
                .windows(16)
                .any(|w| world.shard.windows(16).any(|s| s == w))
        );
    }
}

#[test]
fn item6_a_replayed_nonce_is_refused() {
    let mut world = World::new();
    let sealed = world.sealed();
    let fetch = FetchKey::generate().unwrap();
    let nonce = world.challenge();
    let first = shard_request(2, world.evidence(&nonce, &fetch.public_key()));
    world.ask(&first, &sealed).unwrap();
    // The same request again: the evidence is still good, the nonce is spent.
    assert!(matches!(
        world.ask(&first, &sealed),
        Err(Refusal::Nonce(NonceError::Replayed))
    ));
    // Evidence for a nonce this host never issued (another host's, or made up).
    let request = shard_request(2, world.evidence(&[0x42; 32], &fetch.public_key()));
    assert!(matches!(
        world.ask(&request, &sealed),
        Err(Refusal::Nonce(NonceError::Unknown))
    ));
    // A nonce spent for one exchange does not carry evidence made for another, even one this
    // host issued: the old, already spent request's evidence with a fresh nonce spent for it.
    let fresh = world.nonces.consume(&world.challenge()).unwrap();
    let refused = world.host.release(&first, &sealed, &world.policy, fresh);
    assert!(
        matches!(refused, Err(ReleaseError::Evidence(VerifyError::Nonce))),
        "{refused:?}"
    );
}

#[test]
fn item6_an_instance_whose_pcr_changed_is_refused_naming_the_pcr() {
    let mut world = World::new();
    let sealed = world.sealed();
    world
        .instance
        .extend_pcr(PcrBank::Sha256, 7, b"another bootloader")
        .unwrap();
    let fetch = FetchKey::generate().unwrap();
    let nonce = world.challenge();
    let request = shard_request(2, world.evidence(&nonce, &fetch.public_key()));
    let refused = world.ask(&request, &sealed);
    assert!(
        matches!(
            &refused,
            Err(Refusal::Release(ReleaseError::Evidence(VerifyError::PcrsChanged { changed }))) if changed == "sha256:7"
        ),
        "{refused:?}"
    );
}

#[test]
fn item6_a_quote_by_another_tpms_ak_is_refused() {
    let mut world = World::new();
    let sealed = world.sealed();
    let fetch = FetchKey::generate().unwrap();
    let nonce = world.challenge();
    // A quote made exactly as the instance makes it, bound to the right nonce and key, over the
    // same (all-zero) PCR values, but by another TPM: the shard host's own.
    let honest = world.evidence(&nonce, &fetch.public_key());
    let quote = world
        .host_tpm
        .quote(
            &world.selection,
            &qualifying_data(&nonce, &fetch.public_key()),
        )
        .unwrap();
    let foreign = InstanceEvidence::new(nonce, fetch.public_key(), quote, honest.pcrs().clone());
    let refused = world.ask(&shard_request(2, foreign), &sealed);
    assert!(
        matches!(
            refused,
            Err(Refusal::Release(ReleaseError::Evidence(
                VerifyError::AttestationKey
            )))
        ),
        "{refused:?}"
    );
}

#[test]
fn item6_evidence_bound_to_another_ephemeral_key_is_refused() {
    let mut world = World::new();
    let sealed = world.sealed();
    let fetch = FetchKey::generate().unwrap();
    let nonce = world.challenge();
    let honest = world.evidence(&nonce, &fetch.public_key());
    // An attacker who sees the honest evidence (a relay, a log) swaps in its own key to have
    // the shard sealed to itself.
    let attacker = FetchKey::generate().unwrap();
    let stolen = InstanceEvidence::new(
        nonce,
        attacker.public_key(),
        honest.quote().clone(),
        honest.pcrs().clone(),
    );
    let refused = world.ask(&shard_request(2, stolen), &sealed);
    assert!(
        matches!(
            refused,
            Err(Refusal::Release(ReleaseError::Evidence(
                VerifyError::NotBound
            )))
        ),
        "{refused:?}"
    );
}

#[test]
fn item6_a_shard_sealed_to_another_host_does_not_decrypt_here() {
    let mut world = World::new();
    // Another host's TPM decrypt key: made in the instance's swtpm, another TPM.
    let other = world.instance.create_decrypt_key().unwrap();
    let other = P256Point::from_uncompressed(other.point()).unwrap();
    // Sealed to the other host's key, even with this host's name in the binding; and the other
    // host's genuine shard, copied here.
    for sealed in [
        world.sealed_to(&other, 2, HOST),
        world.sealed_to(&other, 2, "host-us-1"),
    ] {
        let fetch = FetchKey::generate().unwrap();
        let nonce = world.challenge();
        let request = shard_request(2, world.evidence(&nonce, &fetch.public_key()));
        let refused = world.ask(&request, &sealed);
        assert!(
            matches!(
                refused,
                Err(Refusal::Release(ReleaseError::Shard(EciesError::Open)))
            ),
            "{refused:?}"
        );
    }
}

#[test]
fn item6_a_shard_for_another_index_presented_as_this_one_is_refused() {
    let mut world = World::new();
    let host_key = keyshard_shards::ecies::SharedPointSource::public_key(world.host.key());
    let index_3 = world.sealed_to(&host_key, 3, HOST);
    let fetch = FetchKey::generate().unwrap();
    let nonce = world.challenge();
    let request = shard_request(2, world.evidence(&nonce, &fetch.public_key()));
    let refused = world.ask(&request, &index_3);
    assert!(
        matches!(
            refused,
            Err(Refusal::Release(ReleaseError::Shard(EciesError::Open)))
        ),
        "{refused:?}"
    );
    // The same ciphertext asked for as what it is, index 3, is released.
    let nonce = world.challenge();
    let request = shard_request(3, world.evidence(&nonce, &fetch.public_key()));
    let released = world.ask(&request, &index_3).unwrap();
    let opened = fetch.open(&released.shard, &binding(3, HOST)).unwrap();
    assert_eq!(opened.as_slice(), world.shard.as_slice());
}

/// p50, p90 and min over 50 exchanges on swtpm, in milliseconds: the instance's evidence
/// (PCR read and quote), the host's release (verification, ZGen, HPKE), the plaintext window,
/// and the instance opening the answer. Not a regression test: run it with
/// `cargo test -p keyshard-cms --test shard_host timings -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn timings() {
    const RUNS: usize = 50;
    fn report(name: &str, mut samples: Vec<std::time::Duration>) {
        samples.sort();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} |",
            samples.len(),
            ms(samples[samples.len() / 2]),
            ms(samples[samples.len() * 9 / 10]),
            ms(samples[0]),
        );
    }
    let mut world = World::new();
    let sealed = world.sealed();
    let (mut evidence_t, mut release_t, mut held_t, mut open_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let fetch = FetchKey::generate().unwrap();
        let nonce = world.challenge();
        let start = Instant::now();
        let evidence = world.evidence(&nonce, &fetch.public_key());
        evidence_t.push(start.elapsed());
        let request = shard_request(2, evidence);
        let start = Instant::now();
        let released = world.ask(&request, &sealed).unwrap();
        release_t.push(start.elapsed());
        held_t.push(released.plaintext_held);
        let start = Instant::now();
        let opened = fetch.open(&released.shard, &binding(2, HOST)).unwrap();
        open_t.push(start.elapsed());
        assert_eq!(opened.as_slice(), world.shard.as_slice());
    }
    println!("| step | runs | p50 ms | p90 ms | min ms |");
    report("instance evidence (PCR read + quote)", evidence_t);
    report("host release (verify, ZGen, HPKE)", release_t);
    report("plaintext held on the host", held_t);
    report("instance opens the answer", open_t);
}
