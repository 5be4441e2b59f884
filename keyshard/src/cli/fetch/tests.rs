//! Tests of the fetch: the quorum as hostile answers arrive, and whole fetches against a test
//! CMS and test shard hosts on loopback HTTPS (tokio-rustls, each request read and answered by
//! hand so a host can hang, answer garbage or too much, or release the wrong thing), with the
//! instance's TPM a real swtpm.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use keyshard_attest::tpm::PcrValues;
use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::{HolderClass, KeyCheckValue, KeyId, Threshold, VerifiedFragment};
use keyshard_shards::HostId;
use keyshard_shards::ecies::ShardBinding;
use keyshard_shards::instance::{self, InstanceEvidence, InstancePolicy, ReleasedShard};
use keyshard_shards::map::{ClientKey, Endpoint, KeyName, ShardLocation, ShardMap};
use keyshard_shards::placement::PlacementSeed;
use keyshard_tpm::{TpmConfig, TpmService};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use zeroize::Zeroizing;

use super::collect::{Collector, HostStatus};
use super::flow::{self, Clients, FetchParams};
use super::host::{HostFailure, HostTimings};
use super::{CliError, FetchError};
use crate::cli::credential::CmsConfig;

const SECRET: &[u8] = b"postgres://svc:correct-horse@db/prod";
const NAME: &str = "db";

fn deal(cms: &SigningKey, epoch: u64, k: u8, n: u8) -> Vec<VerifiedFragment> {
    let plan = DealPlan {
        key_id: KeyId::new(NAME).unwrap(),
        epoch,
        k,
        holders: HolderSlot::numbered(HolderClass::Host, n).collect(),
    };
    dealer::deal(SECRET, &plan, cms).unwrap()
}

fn map_with(endpoints: &[String], k: u8) -> ShardMap {
    let n = u8::try_from(endpoints.len()).unwrap();
    let name = KeyId::new(NAME).unwrap();
    let shards = endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| ShardLocation {
            host: HostId::new(format!("host-{}", i + 1)).unwrap(),
            endpoint: Endpoint::new(endpoint.clone()).unwrap(),
            key_name: KeyName::new(vec![0, 11, 1, 2, 3]).unwrap(),
        })
        .collect();
    ShardMap::new(
        name.clone(),
        1,
        Threshold::new(k, n).unwrap(),
        PlacementSeed::from_bytes([7; 32]),
        KeyCheckValue::compute(SECRET, &name),
        shards,
    )
    .unwrap()
}

fn bytes(fragment: &VerifiedFragment) -> Result<Zeroizing<Vec<u8>>, HostFailure> {
    Ok(Zeroizing::new(fragment.encoded().to_vec()))
}

fn endpoints(n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| format!("https://127.0.0.1:{}", 9000 + i))
        .collect()
}

/// Hostile answers do not stop the quorum: garbage, a share of another index, another key's
/// signature and another epoch are each that host's failure, and the third valid share
/// rebuilds the credential.
#[test]
fn fetch_quorum_rebuilds_from_k_valid_shares_among_hostile_answers() {
    let cms = keyshard_core::keys::generate().unwrap();
    let forger = keyshard_core::keys::generate().unwrap();
    let fragments = deal(&cms, 1, 3, 7);
    let forged = deal(&forger, 1, 3, 7);
    let later = deal(&cms, 2, 3, 7);
    let map = map_with(&endpoints(7), 3);
    let verifying = cms.verifying_key();
    let mut collector = Collector::new(&map, &verifying);
    let t = HostTimings::default();

    assert!(
        collector
            .offer(1, Ok(Zeroizing::new(b"garbage".to_vec())), t)
            .is_none()
    );
    // host-2 hands out host-3's share, correctly sealed for index 2.
    assert!(collector.offer(2, bytes(&fragments[2]), t).is_none());
    assert!(collector.offer(3, bytes(&forged[2]), t).is_none());
    assert!(collector.offer(4, bytes(&later[3]), t).is_none());
    assert!(collector.offer(5, bytes(&fragments[4]), t).is_none());
    assert!(collector.offer(6, bytes(&fragments[5]), t).is_none());
    assert_eq!(collector.valid(), 2);
    let done = collector.offer(7, bytes(&fragments[6]), t).unwrap();
    assert_eq!(done.secret.as_slice(), SECRET);

    let reports = collector.reports();
    let status: BTreeMap<u8, &HostStatus> = reports.iter().map(|r| (r.index, &r.status)).collect();
    assert!(matches!(
        status[&1],
        HostStatus::Failed(HostFailure::Fragment(_))
    ));
    assert!(
        matches!(status[&2], HostStatus::Failed(HostFailure::WrongShare(w)) if w.contains("index 3")),
        "{:?}",
        status[&2]
    );
    assert!(
        matches!(status[&3], HostStatus::Failed(HostFailure::Fragment(w)) if w.contains("signature")),
        "{:?}",
        status[&3]
    );
    assert!(
        matches!(status[&4], HostStatus::Failed(HostFailure::WrongShare(w)) if w.contains("epoch 2")),
        "{:?}",
        status[&4]
    );
    for index in 5..=7 {
        assert_eq!(status[&index], &HostStatus::Released);
    }
    assert_eq!(
        reports[0].to_string(),
        format!(
            "host host-1: failed: {}",
            match status[&1] {
                HostStatus::Failed(why) => why.to_string(),
                _ => unreachable!(),
            }
        )
    );
}

/// k - 1 valid shares rebuild nothing, however many failures come with them.
#[test]
fn fetch_quorum_is_not_met_with_k_minus_one_valid_shares() {
    let cms = keyshard_core::keys::generate().unwrap();
    let fragments = deal(&cms, 1, 3, 4);
    let map = map_with(&endpoints(4), 3);
    let verifying = cms.verifying_key();
    let mut collector = Collector::new(&map, &verifying);
    let t = HostTimings::default();
    assert!(collector.offer(1, bytes(&fragments[0]), t).is_none());
    assert!(
        collector
            .offer(2, Err(HostFailure::Deadline { ms: 10 }), t)
            .is_none()
    );
    // The same valid share offered again for its own index does not count twice.
    assert!(collector.offer(3, bytes(&fragments[0]), t).is_none());
    assert!(collector.offer(4, bytes(&fragments[3]), t).is_none());
    assert_eq!(collector.valid(), 2);
}

// ---------------------------------------------------------------------------------------------
// Loopback HTTPS: a test CMS and test shard hosts.

/// How a test host behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Verifies the evidence and releases its share.
    Good,
    /// Accepts the TCP connection and never answers.
    Hang,
    /// Answers 200 with a body that is not JSON.
    Garbage,
    /// Answers 200 with 8 MiB.
    Huge,
    /// Releases its share sealed as another index's.
    OtherIndex,
    /// Releases its share sealed for another epoch.
    OtherEpoch,
    /// Refuses with a JSON error.
    Refuse,
}

enum Reply {
    Json(u16, Vec<u8>),
    Huge,
}

type Handler = Arc<dyn Fn(&str, &[u8]) -> Reply + Send + Sync>;

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    tls: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let (ca, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("leaf.pem"),
        dir.path().join("leaf.key"),
    );
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    let tls = keyshard_cms::server::tls::server_config(&cert, &key).unwrap();
    Pki { _dir: dir, ca, tls }
}

/// Serves `handler` over TLS on a loopback port (keep-alive, one request after another per
/// connection); `hang`: accept TCP and never answer.
async fn serve(tls: Arc<rustls::ServerConfig>, handler: Handler, hang: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            if hang {
                held.push(tcp);
                continue;
            }
            let (acceptor, handler) = (acceptor.clone(), Arc::clone(&handler));
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                while let Some((path, body)) = read_request(&mut stream).await {
                    let reply = handler(&path, &body);
                    let (status, body) = match reply {
                        Reply::Json(status, body) => (status, body),
                        Reply::Huge => (200, vec![b'x'; 8 * 1024 * 1024]),
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if stream.write_all(head.as_bytes()).await.is_err()
                        || stream.write_all(&body).await.is_err()
                        || stream.flush().await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head.split(' ').nth(1)?.to_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    Some((path, body))
}

fn json(status: u16, value: serde_json::Value) -> Reply {
    Reply::Json(status, serde_json::to_vec(&value).unwrap())
}

/// The instance: a swtpm, its TpmService and the policy a verifier holds for it.
struct Instance {
    _swtpm: keyshard_e2e::swtpm::Swtpm,
    _dir: tempfile::TempDir,
    tpm: TpmService,
    policy: InstancePolicy,
}

fn instance() -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = keyshard_e2e::swtpm::Swtpm::start(dir.path()).unwrap();
    let tpm = TpmService::spawn(TpmConfig::new(swtpm.tcti())).unwrap();
    let golden: PcrValues = tpm.read_pcrs(&"sha256:0,7".parse().unwrap()).unwrap();
    let policy = InstancePolicy::new(tpm.ak_public().clone(), golden);
    Instance {
        _swtpm: swtpm,
        _dir: dir,
        tpm,
        policy,
    }
}

/// Verifies evidence (hex in a JSON field) against `policy` for a nonce this verifier issued.
fn verified(
    policy: &InstancePolicy,
    issued: &Mutex<Vec<[u8; 32]>>,
    evidence_hex: &str,
) -> Result<instance::VerifiedInstance, String> {
    let evidence =
        InstanceEvidence::from_bytes(&hex::decode(evidence_hex).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let mut issued = issued.lock().unwrap();
    let at = issued
        .iter()
        .position(|n| n == evidence.nonce())
        .ok_or("nonce not issued or used")?;
    let nonce = issued.remove(at);
    instance::verify(&evidence, policy, &nonce).map_err(|e| e.to_string())
}

fn issue(issued: &Mutex<Vec<[u8; 32]>>) -> String {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).unwrap();
    issued.lock().unwrap().push(nonce);
    hex::encode(nonce)
}

/// A test shard host holding `fragment` (share `index`), behaving as told.
fn host_handler(
    behaviour: Behaviour,
    index: u8,
    fragment: Zeroizing<Vec<u8>>,
    policy: InstancePolicy,
) -> Handler {
    let issued = Arc::new(Mutex::new(Vec::new()));
    Arc::new(move |path, body| match (behaviour, path) {
        (Behaviour::Garbage, _) => Reply::Json(200, b"this is not json".to_vec()),
        (Behaviour::Huge, _) => Reply::Huge,
        (Behaviour::Refuse, _) => json(
            403,
            serde_json::json!({"error": {"code": "grant_refused", "message": "no\ngrant"}}),
        ),
        (_, "/v1/nonces") => json(
            200,
            serde_json::json!({"nonce": issue(&issued), "expires_in_ms": 30000}),
        ),
        (_, "/v1/release") => {
            let request: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(request["grant"], format!("grant-{index}"));
            assert_eq!(request["sealed_shard"], format!("sealed-{index}"));
            let verified = match verified(&policy, &issued, request["evidence"].as_str().unwrap()) {
                Ok(v) => v,
                Err(e) => {
                    return json(
                        403,
                        serde_json::json!({"error": {"code": "evidence_refused", "message": e}}),
                    );
                }
            };
            let mut binding = ShardBinding {
                credential: KeyId::new(NAME).unwrap(),
                epoch: 1,
                index,
                host: HostId::new(format!("host-{index}")).unwrap(),
            };
            match behaviour {
                Behaviour::OtherIndex => binding.index = index % 5 + 1,
                Behaviour::OtherEpoch => binding.epoch = 2,
                _ => {}
            }
            let released = ReleasedShard::seal(&verified, &binding, &fragment).unwrap();
            json(
                200,
                serde_json::json!({"released": hex::encode(released.to_bytes())}),
            )
        }
        _ => json(
            404,
            serde_json::json!({"error": {"code": "not_found", "message": path}}),
        ),
    })
}

/// A test CMS: a challenge, then the map sealed to the client and a grant per host, once the
/// evidence verifies.
fn cms_handler(
    map: ShardMap,
    cms: SigningKey,
    client: &ClientKey,
    policy: InstancePolicy,
) -> Handler {
    let issued = Arc::new(Mutex::new(Vec::new()));
    let sealed = map.seal(&cms, &client.public_key()).unwrap().to_bytes();
    let sealed = base64::engine::general_purpose::STANDARD.encode(sealed);
    let grants: Vec<serde_json::Value> = map
        .shards()
        .map(|(index, location)| {
            serde_json::json!({
                "host": location.host.as_str(),
                "endpoint": location.endpoint.as_str(),
                "index": index,
                "sealed_shard": format!("sealed-{index}"),
                "grant": format!("grant-{index}"),
            })
        })
        .collect();
    Arc::new(move |path, body| match path {
        "/v1/instances/i-1/challenge" => json(
            200,
            serde_json::json!({"nonce": issue(&issued), "pcrs": "sha256:0,7", "expires_in_ms": 30000}),
        ),
        "/v1/credentials/db/fetch" => {
            let request: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(request["instance"], "i-1");
            match verified(&policy, &issued, request["evidence"].as_str().unwrap()) {
                Ok(_) => json(200, serde_json::json!({"map": sealed, "grants": grants})),
                Err(e) => json(
                    403,
                    serde_json::json!({"error": {"code": "evidence_refused", "message": e}}),
                ),
            }
        }
        _ => json(
            404,
            serde_json::json!({"error": {"code": "not_found", "message": path}}),
        ),
    })
}

struct Setup {
    pki: Pki,
    instance: Instance,
    cms_key: SigningKey,
    client: ClientKey,
    cms_addr: SocketAddr,
}

/// A test CMS and one test host per behaviour (share i + 1 on the i-th), k = `k`.
async fn setup(behaviours: &[Behaviour], k: u8) -> Setup {
    let pki = pki();
    let instance = instance();
    let cms_key = keyshard_core::keys::generate().unwrap();
    let client = ClientKey::generate().unwrap();
    let n = u8::try_from(behaviours.len()).unwrap();
    let fragments = deal(&cms_key, 1, k, n);
    let mut endpoints = Vec::new();
    for ((behaviour, fragment), index) in behaviours.iter().zip(&fragments).zip(1u8..) {
        let handler = host_handler(
            *behaviour,
            index,
            Zeroizing::new(fragment.encoded().to_vec()),
            instance.policy.clone(),
        );
        let addr = serve(pki.tls.clone(), handler, *behaviour == Behaviour::Hang).await;
        endpoints.push(format!("https://{addr}"));
    }
    let map = map_with(&endpoints, k);
    let handler = cms_handler(map, cms_key.clone(), &client, instance.policy.clone());
    let cms_addr = serve(pki.tls.clone(), handler, false).await;
    Setup {
        pki,
        instance,
        cms_key,
        client,
        cms_addr,
    }
}

async fn run_fetch(setup: &Setup, deadline: Duration) -> Result<flow::Fetched, CliError> {
    let cms = CmsConfig {
        base: format!("https://{}", setup.cms_addr),
        ca: setup.pki.ca.clone(),
        timeout: Duration::from_secs(10),
    };
    let params = FetchParams {
        name: KeyId::new(NAME).unwrap(),
        instance: "i-1".to_owned(),
        client: ClientKey::from_bytes(&setup.client.to_bytes()).unwrap(),
        cms_key: setup.cms_key.verifying_key(),
        host_deadline: deadline,
    };
    let clients = Clients::new(&cms, deadline).unwrap();
    flow::fetch(&params, &clients, &setup.instance.tpm).await
}

fn failure_of(hosts: &[super::collect::HostReport], index: u8) -> &HostFailure {
    match &hosts[usize::from(index - 1)].status {
        HostStatus::Failed(why) => why,
        other => panic!("host {index}: {other:?}"),
    }
}

/// Two hostile hosts of five (one hangs, one answers garbage) do not stop a 3-of-5 fetch, and
/// the fetch does not wait for the hung one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_rebuilds_with_a_hung_and_a_garbage_host() {
    use Behaviour::*;
    let setup = setup(&[Hang, Good, Garbage, Good, Good], 3).await;
    let deadline = Duration::from_secs(20);
    let started = Instant::now();
    let fetched = run_fetch(&setup, deadline).await.unwrap();
    assert!(started.elapsed() < deadline, "waited for the hung host");
    assert_eq!(fetched.secret.as_slice(), SECRET);
    assert_eq!((fetched.epoch, fetched.k, fetched.n), (1, 3, 5));
    assert_eq!(fetched.released(), 3);
    // The hung host was still working when the quorum was met; the garbage one failed.
    assert_eq!(fetched.hosts[0].status, HostStatus::NotNeeded);
    assert!(matches!(
        failure_of(&fetched.hosts, 3),
        HostFailure::Malformed { .. }
    ));
    let lines = super::host_lines(&fetched.hosts);
    assert_eq!(lines[1], "host host-2: released");
    assert!(
        lines[2].starts_with("host host-3: failed: answered a malformed nonce answer"),
        "{}",
        lines[2]
    );
}

/// Each hostile behaviour is its host's failure, named; with only two good hosts of 3 needed,
/// the fetch ends with quorum not met (exit 2), naming every failed host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_names_each_hostile_host_and_fails_with_exit_2() {
    use Behaviour::*;
    let setup = setup(&[Hang, Huge, OtherIndex, OtherEpoch, Refuse, Good, Good], 3).await;
    let deadline = Duration::from_millis(1500);
    let started = Instant::now();
    let error = run_fetch(&setup, deadline).await.unwrap_err();
    // The hung host costs one deadline, not more.
    assert!(started.elapsed() < deadline * 3, "{:?}", started.elapsed());
    assert_eq!(error.exit_code(), crate::cli::error::EXIT_QUORUM_NOT_MET);
    let CliError::Fetch(FetchError::QuorumNotMet {
        hosts, released, k, ..
    }) = &error
    else {
        panic!("{error}");
    };
    assert_eq!((*released, *k), (2, 3));
    assert_eq!(failure_of(hosts, 1), &HostFailure::Deadline { ms: 1500 });
    assert_eq!(
        failure_of(hosts, 2),
        &HostFailure::TooLarge {
            max: super::host::MAX_HOST_ANSWER_LEN
        }
    );
    assert_eq!(
        failure_of(hosts, 3),
        &HostFailure::DoesNotOpen { index: 3, epoch: 1 }
    );
    assert_eq!(
        failure_of(hosts, 4),
        &HostFailure::DoesNotOpen { index: 4, epoch: 1 }
    );
    assert!(
        matches!(failure_of(hosts, 5), HostFailure::Refused { status: 403, code, message } if code == "grant_refused" && message == "no grant"),
        "{:?}",
        failure_of(hosts, 5)
    );
    assert_eq!(hosts[5].status, HostStatus::Released);
    assert_eq!(hosts[6].status, HostStatus::Released);
    let line = error.to_string();
    eprintln!("{line}");
    for host in [
        "host-1 (no answer within 1500 ms)",
        "host-2 (answered more than",
        "host-3 (released a shard that does not open",
        "host-4",
        "host-5 (refused (403, grant_refused)",
    ] {
        assert!(line.contains(host), "{line} lacks {host}");
    }
    assert!(
        !line.contains("host-6") && !line.contains("host-7"),
        "{line}"
    );
}

/// A grant that names another host than the signed map for its index is that index's failure.
#[test]
fn a_grant_for_another_host_than_the_map_is_refused() {
    let map = map_with(&endpoints(3), 2);
    let grant = |index: u8, host: &str| super::api::GrantEntry {
        host: host.to_owned(),
        endpoint: "https://evil.example:1".to_owned(),
        index,
        sealed_shard: String::new(),
        grant: String::new(),
    };
    let requests = flow::host_requests(
        &map,
        &[grant(1, "host-1"), grant(2, "host-3"), grant(2, "host-2")],
    );
    let first = requests[&1].as_ref().unwrap();
    // The endpoint is the map's, not the grant's.
    assert_eq!(first.endpoint, "https://127.0.0.1:9001");
    assert!(matches!(
        &requests[&2],
        Err(HostFailure::Grant { index: 2, .. })
    ));
    assert_eq!(
        requests[&3].as_ref().unwrap_err(),
        &HostFailure::NoGrant { index: 3 }
    );
}

fn args(instance: &str, cms: &str) -> super::Args {
    super::Args {
        cms: crate::cli::credential::CmsArgs {
            cms: cms.to_owned(),
            ca: PathBuf::from("ca.pem"),
            timeout: 5,
        },
        cms_key: PathBuf::from("cms.pem.pub"),
        name: NAME.to_owned(),
        instance_id: instance.to_owned(),
        client_key: PathBuf::from("client.key"),
        tcti: Some("swtpm:host=127.0.0.1,port=1".to_owned()),
        out: PathBuf::from("out"),
        host_deadline_ms: 5000,
    }
}

/// An instance id outside the host id charset, and a CMS URL that is not https, are refused
/// when the arguments are read, before any file, TPM or network is touched.
#[test]
fn fetch_arguments_are_checked_before_anything_is_asked() {
    let config = super::Config::try_from(args("vm-1", "https://127.0.0.1:8443")).unwrap();
    assert_eq!(config.instance, "vm-1");
    assert_eq!(config.host_deadline, Duration::from_secs(5));
    for bad in ["VM/1", "", "vm 1", "../x"] {
        let error = super::Config::try_from(args(bad, "https://127.0.0.1:8443")).unwrap_err();
        assert!(error.to_string().starts_with("--instance-id"), "{error}");
    }
    assert!(super::Config::try_from(args("vm-1", "http://127.0.0.1:8443")).is_err());
}

/// An existing --out is refused before the TPM or the CMS is asked (neither exists here).
#[test]
fn fetch_refuses_an_existing_out_file_first() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("secret");
    std::fs::write(&out, b"keep").unwrap();
    let mut args = args("vm-1", "https://127.0.0.1:1");
    args.out = out.clone();
    let error = super::run(super::Config::try_from(args).unwrap()).unwrap_err();
    assert!(error.to_string().contains("exists"), "{error}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}
