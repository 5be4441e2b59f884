//! `keyshard init` placing a VM volume key's `host` shares (issue 9 item 8) on real shard hosts:
//! a `keyshard cms` with `--ek-ca`, three `keyshard shard-host` processes and the VM's TPM, each
//! its own swtpm with EK certificates, and the host's own TPM for the `tpm` share. The VM is
//! enrolled with `keyshard instance enroll`; `init` deals vhd = 1, tpm = 1, host = 2, k = 3 and
//! places the two host shares through the CMS. The test then acts as the VM: it fetches grants
//! from the CMS, asks each placed host over HTTPS, and rebuilds the volume key from the two
//! released host fragments and the vhd fragment.
//!
//! The relay (item 8, step 3): the real `keyshard coordinator --vm-tcti` serves the VM's broker
//! socket and the guest agent (its library, over the vhost-user frontend `keyshard-guest
//! --vhost-user` uses) unlocks through it, the `host` shares coming from the shard hosts; with
//! the placed shard hosts stopped or hung it stays locked within its deadlines and names them.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "common/devices.rs"]
#[allow(dead_code)]
mod devices;
#[path = "common/cms.rs"]
#[allow(dead_code)]
mod harness;
#[allow(dead_code)]
#[path = "../../keyshard-tpm/tests/common/swtpm.rs"]
mod swtpm;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{Cms, Pki};
use keyshard_attest::tpm::PcrSelection;
use keyshard_cms::server::fetch::{FetchRequest, FetchResponse, GrantEntry};
use keyshard_cms::shard_host::server::{HostNonceResponse, ReleaseRequest, ReleaseResponse};
use keyshard_core::manifest::Manifest;
use keyshard_core::policy::PcrBank;
use keyshard_core::quorum::{self, Candidate, QuorumRequest};
use keyshard_core::{Fragment, HolderClass};
use keyshard_e2e::process::Daemon;
use keyshard_shards::HostId;
use keyshard_shards::ecies::ShardBinding;
use keyshard_shards::instance::{
    FetchKey, InstanceEvidence, Nonce, ReleasedShard, qualifying_data,
};
use keyshard_tpm::Tpm;
use swtpm::Swtpm;

const VOLUME_KEY: &[u8] = b"volume-key-0123456789abcdef01234";
const READY: &str = "ready: shard host ";
const HOSTS: [(&str, &str); 3] = [
    ("host-1", "region=eu,operator=acme"),
    ("host-2", "region=us,operator=globex"),
    ("host-3", "region=ap,operator=initech"),
];
const POLICY: &str = "allow_host_reachable_quorum = true\nthreshold = 3\n\
                      [holders]\nvhd = 1\ntpm = 1\nhost = 2\n\
                      [tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n";

fn keyshard(args: &[&OsStr]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_keyshard"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The CMS, three running shard hosts, the VM's TPM and the host's TPM.
struct Lab {
    pki: Pki,
    cms: Cms,
    cms_pub: PathBuf,
    http: reqwest::Client,
    _hosts: Vec<Daemon>,
    host_swtpms: Vec<Swtpm>,
    vm_swtpm: Swtpm,
    own_swtpm: Swtpm,
}

impl Lab {
    fn start() -> Self {
        let pki = Pki::new();
        let host_swtpms: Vec<Swtpm> = HOSTS
            .iter()
            .map(|_| Swtpm::start_with_ek_certificates(&pki.ek_ca_dir()))
            .collect();
        let vm_swtpm = Swtpm::start_with_ek_certificates(&pki.ek_ca_dir());
        let own_swtpm = Swtpm::start();
        let store = format!("redb:{}", pki.dir.path().join("cms.redb").display());
        let cms = Cms::start_enrolling(&pki, &store);
        let cms_pub = pki.dir.path().join("cms.pub");
        let signing = keyshard_core::keys::signing_key_from_pem(
            &std::fs::read_to_string(&pki.signing).unwrap(),
        )
        .unwrap();
        std::fs::write(
            &cms_pub,
            keyshard_core::keys::verifying_key_to_pem(&signing.verifying_key()).unwrap(),
        )
        .unwrap();
        let http = pki.client();
        let mut lab = Self {
            pki,
            cms,
            cms_pub,
            http,
            _hosts: Vec::new(),
            host_swtpms,
            vm_swtpm,
            own_swtpm,
        };
        lab._hosts = (0..HOSTS.len()).map(|n| lab.start_host(n)).collect();
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.pki.dir.path().join(name)
    }

    fn start_host(&self, n: usize) -> Daemon {
        let (id, domain) = HOSTS[n];
        let mut command = Command::new(env!("CARGO_BIN_EXE_keyshard"));
        command
            .env("RUST_LOG", "info")
            .arg("shard-host")
            .arg("--cms")
            .arg(self.cms.url(""))
            .arg("--ca")
            .arg(&self.pki.ca)
            .arg("--cms-key")
            .arg(&self.cms_pub)
            .arg("--listen=127.0.0.1:0")
            .arg("--host-id")
            .arg(id)
            .arg("--domain")
            .arg(domain)
            .arg("--tcti")
            .arg(self.host_swtpms[n].tcti())
            .arg("--state-dir")
            .arg(self.path(&format!("state-{id}")))
            .arg("--tls-cert")
            .arg(&self.pki.cert)
            .arg("--tls-key")
            .arg(&self.pki.key);
        let log = self.path(&format!("{id}.log"));
        Daemon::start(id, &mut command, READY, Duration::from_secs(60), &log)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `keyshard instance enroll` of the VM (vm-1, its own swtpm) over sha256:0,7; writes the
    /// instance policy admitting it and returns its path.
    fn enrol_vm(&self) -> PathBuf {
        let tcti = self.vm_swtpm.tcti();
        let (code, out, err) = keyshard(&[
            "instance".as_ref(),
            "enroll".as_ref(),
            "--cms".as_ref(),
            self.cms.url("").as_ref(),
            "--ca".as_ref(),
            self.pki.ca.as_os_str(),
            "--instance-id".as_ref(),
            "vm-1".as_ref(),
            "--tcti".as_ref(),
            tcti.as_ref(),
            "--pcrs".as_ref(),
            "sha256:0,7".as_ref(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let ak_name = out
            .split("ak name ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| panic!("{out}"));
        let policy = self.path("instances.json");
        std::fs::write(
            &policy,
            format!(r#"{{"instances": [{{"id": "vm-1", "ak_name": "{ak_name}"}}]}}"#),
        )
        .unwrap();
        policy
    }

    /// A client key pair for the host shares' map; the public key's path.
    fn client_pub(&self) -> PathBuf {
        let key = self.path("client.key");
        let (code, out, err) = keyshard(&[
            "credential".as_ref(),
            "keygen".as_ref(),
            "--out".as_ref(),
            key.as_os_str(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
        self.path("client.key.pub")
    }

    /// `keyshard init` of `policy` into `state` placing the host shares through the CMS.
    fn init(&self, policy: &str, state: &Path, extra: &[&OsStr]) -> (i32, String, String) {
        let policy_file = self.path("policy.toml");
        std::fs::write(&policy_file, policy).unwrap();
        let secret = self.path("volume.key");
        std::fs::write(&secret, VOLUME_KEY).unwrap();
        let tcti = self.own_swtpm.tcti();
        let cms = self.cms.url("");
        let mut args: Vec<&OsStr> = vec![
            "init".as_ref(),
            "--policy".as_ref(),
            policy_file.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--secret-file".as_ref(),
            secret.as_os_str(),
            "--tcti".as_ref(),
            tcti.as_ref(),
            "--vm-id".as_ref(),
            "vm-1".as_ref(),
            "--cms".as_ref(),
            cms.as_ref(),
            "--ca".as_ref(),
            self.pki.ca.as_os_str(),
        ];
        args.extend(extra);
        keyshard(&args)
    }

    async fn post<B: serde::Serialize>(&self, url: &str, body: &B) -> (u16, String) {
        let answer = self.http.post(url).json(body).send().await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    /// The VM's evidence for `nonce`, bound to `key`, quoted by its TPM.
    fn evidence(&self, nonce: &Nonce, key: &FetchKey) -> InstanceEvidence {
        let mut tpm = Tpm::open(&self.vm_swtpm.tcti()).unwrap();
        let selection = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        let pcrs = tpm.read_pcrs(&selection).unwrap();
        let quote = tpm
            .quote(&selection, &qualifying_data(nonce, &key.public_key()))
            .unwrap();
        InstanceEvidence::new(*nonce, key.public_key(), quote, pcrs)
    }

    /// The CMS's challenge for vm-1 and the fetch of `name`.
    async fn fetch(&self, name: &str, key: &FetchKey) -> FetchResponse {
        let (status, body) = self
            .post(
                &self.cms.url("/v1/instances/vm-1/challenge"),
                &serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let challenge: serde_json::Value = serde_json::from_str(&body).unwrap();
        let nonce = nonce_from(challenge["nonce"].as_str().unwrap());
        let evidence = self.evidence(&nonce, key);
        let (status, body) = self
            .post(
                &self.cms.url(&format!("/v1/credentials/{name}/fetch")),
                &FetchRequest {
                    instance: "vm-1".to_owned(),
                    evidence: hex::encode(evidence.to_bytes()),
                },
            )
            .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The host's release of `grant` to the VM, opened with `key`: the fragment's bytes.
    async fn release(&self, name: &str, grant: &GrantEntry, key: &FetchKey) -> Vec<u8> {
        let (status, body) = self
            .post(
                &format!("{}/v1/nonces", grant.endpoint),
                &serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let nonce: HostNonceResponse = serde_json::from_str(&body).unwrap();
        let evidence = self.evidence(&nonce_from(&nonce.nonce), key);
        let request = ReleaseRequest {
            grant: grant.grant.clone(),
            sealed_shard: grant.sealed_shard.clone(),
            evidence: hex::encode(evidence.to_bytes()),
        };
        let (status, body) = self
            .post(&format!("{}/v1/release", grant.endpoint), &request)
            .await;
        assert_eq!(status, 200, "{}: {body}", grant.host);
        let answer: ReleaseResponse = serde_json::from_str(&body).unwrap();
        let released = ReleasedShard::from_bytes(&hex::decode(answer.released).unwrap()).unwrap();
        let binding = ShardBinding {
            credential: keyshard_core::KeyId::new(name).unwrap(),
            epoch: 1,
            index: grant.index,
            host: HostId::new(grant.host.clone()).unwrap(),
        };
        key.open(&released, &binding).unwrap().to_vec()
    }
}

fn nonce_from(text: &str) -> Nonce {
    hex::decode(text).unwrap().try_into().unwrap()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_init_places_host_shares_on_shard_hosts_and_the_vm_rebuilds_its_key_with_them() {
    let lab = Lab::start();
    let instances = lab.enrol_vm();
    let client_pub = lab.client_pub();
    let state = lab.path("vm-1");
    let policy = format!("{POLICY}[host]\nevidence = \"vm-tpm\"\n");
    let (code, out, err) = lab.init(
        &policy,
        &state,
        &[
            "--client-pub".as_ref(),
            client_pub.as_os_str(),
            "--instance-policy".as_ref(),
            instances.as_os_str(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("2 host share(s) placed on shard hosts host-"),
        "{out}"
    );

    let manifest =
        Manifest::parse(&std::fs::read_to_string(state.join("manifest.toml")).unwrap()).unwrap();
    let host_holders: Vec<String> = manifest
        .holders
        .iter()
        .filter(|h| h.class == HolderClass::Host)
        .map(|h| h.id.to_string())
        .collect();
    assert_eq!(host_holders, ["host-1", "host-2"]);
    let key_id = manifest.key_id.to_string();

    // The map of where they went opens with the client key, and names the volume key's KCV.
    let (code, map, err) = keyshard(&[
        "credential".as_ref(),
        "map".as_ref(),
        "--cms".as_ref(),
        lab.cms.url("").as_ref(),
        "--ca".as_ref(),
        lab.pki.ca.as_os_str(),
        "--name".as_ref(),
        key_id.as_ref(),
        "--client-key".as_ref(),
        lab.path("client.key").as_os_str(),
        "--cms-key".as_ref(),
        lab.cms_pub.as_os_str(),
    ]);
    assert_eq!(code, 0, "{map}{err}");
    assert!(
        map.contains(&format!("credential {key_id}: epoch 1, 2 of 2 shares")),
        "{map}"
    );
    assert!(
        map.contains(&format!(
            "key check value: {}",
            manifest.key_check_value.to_hex()
        )),
        "{map}"
    );
    assert_eq!(map.matches("  share ").count(), 2, "{map}");

    // The VM fetches its grants and each placed host releases its fragment to the VM's TPM.
    let fetch_key = FetchKey::generate().unwrap();
    let fetched = lab.fetch(&key_id, &fetch_key).await;
    assert_eq!(fetched.grants.len(), 2);
    let mut candidates = Vec::new();
    for grant in &fetched.grants {
        let fragment = lab.release(&key_id, grant, &fetch_key).await;
        let verified = Fragment::parse(&fragment)
            .unwrap()
            .verify(&manifest.dealer)
            .unwrap();
        assert_eq!(verified.header().class, HolderClass::Host);
        // Not on the VM's host: no file of the state directory holds it.
        for file in files_under(&state) {
            assert!(
                !contains(&std::fs::read(&file).unwrap(), &fragment),
                "{} holds a host fragment",
                file.display()
            );
        }
        candidates.push(Candidate::new(grant.host.clone(), fragment));
    }
    let request = QuorumRequest {
        dealer: &manifest.dealer,
        key_id: Some(&manifest.key_id),
        threshold: Some(manifest.threshold),
        key_check_value: Some(&manifest.key_check_value),
    };
    // The two host shares are below k; with the vhd fragment they rebuild the volume key.
    assert!(quorum::rebuild(&request, &candidates).is_err());
    let vhd = std::fs::read(state.join("fragments/vhd-1.ksf")).unwrap();
    candidates.push(Candidate::new("vhd-1", vhd));
    let outcome = quorum::rebuild(&request, &candidates).unwrap();
    assert_eq!(outcome.secret.as_slice(), VOLUME_KEY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_init_refuses_host_shares_it_cannot_place_before_writing_anything() {
    let lab = Lab::start();
    let instances = lab.enrol_vm();
    let client_pub = lab.client_pub();
    let placing = [
        "--client-pub".as_ref(),
        client_pub.as_os_str(),
        "--instance-policy".as_ref(),
        instances.as_os_str(),
    ];

    // SEV-SNP evidence: shard hosts do not verify it yet.
    let state = lab.path("vm-snp");
    let policy = format!("{POLICY}[host]\nevidence = \"sev-snp\"\n");
    let policy = policy.replace("allow_host_reachable_quorum = true\n", "");
    let (code, out, err) = lab.init(&policy, &state, &placing);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("do not verify yet"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!state.exists());

    // Four host shares over three shard hosts: the CMS cannot place them, and init writes no
    // state (the new dealer key it made first is all the directory holds).
    let state = lab.path("vm-few");
    let policy = format!("{POLICY}[host]\nevidence = \"vm-tpm\"\n").replace("host = 2", "host = 4");
    let (code, out, err) = lab.init(&policy, &state, &placing);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("placing the host shares on shard hosts"),
        "{err}"
    );
    assert!(err.contains("placement_refused"), "{err}");
    // One line of error (after the software TPM's warning).
    let errors = err.lines().filter(|l| !l.contains(" warn: ")).count();
    assert_eq!(errors, 1, "{err}");
    for written in ["state.toml", "manifest.toml", "fragments", "sealed"] {
        assert!(!state.join(written).exists(), "init wrote {written}");
    }
}

/// Starts `keyshard coordinator` on `state` for vm-1, quoting the VM's TPM for host shares,
/// with a shard host deadline of `host_deadline_ms`; the broker socket's path.
fn start_coordinator(lab: &Lab, state: &Path, host_deadline_ms: u64) -> (Daemon, PathBuf) {
    let socket = lab.path("broker.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyshard"));
    command
        .env("RUST_LOG", "info")
        .arg("coordinator")
        .arg("--state-dir")
        .arg(state)
        .arg("--broker")
        .arg(format!("vm-1={}", socket.display()))
        .arg("--tcti")
        .arg(lab.own_swtpm.tcti())
        .arg("--vm-tcti")
        .arg(lab.vm_swtpm.tcti())
        .arg("--cms-deadline-ms=3000")
        .arg(format!("--host-deadline-ms={host_deadline_ms}"));
    let daemon = Daemon::start(
        "coordinator",
        &mut command,
        "ready: serving",
        Duration::from_secs(30),
        &lab.path("coordinator.log"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (daemon, socket)
}

/// vhd = 1, tpm = 1, host = 2, k = 3 placed for vm-1 (enrolled); the state directory and
/// the hosts the two host shares went to.
fn init_placed(lab: &Lab) -> (PathBuf, Vec<String>) {
    let instances = lab.enrol_vm();
    let client_pub = lab.client_pub();
    let state = lab.path("vm-1");
    let policy = format!("{POLICY}[host]\nevidence = \"vm-tpm\"\n");
    let (code, out, err) = lab.init(
        &policy,
        &state,
        &[
            "--client-pub".as_ref(),
            client_pub.as_os_str(),
            "--instance-policy".as_ref(),
            instances.as_os_str(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let placed: Vec<String> = out
        .split("placed on shard hosts ")
        .nth(1)
        .and_then(|rest| rest.split(" (").next())
        .unwrap_or_else(|| panic!("{out}"))
        .split(", ")
        .map(str::to_owned)
        .collect();
    assert_eq!(placed.len(), 2, "{out}");
    let text = std::fs::read_to_string(state.join("state.toml")).unwrap();
    assert!(
        text.contains("[cms]") && text.contains("instance_id = \"vm-1\""),
        "{text}"
    );
    (state, placed)
}

/// The guest agent's unlock: the vhd fragment on a vhost-user socket, the broker socket.
fn guest_unlock(
    state: &Path,
    broker: &Path,
) -> keyshard_core::quorum::Result<keyshard_core::quorum::QuorumOutcome> {
    let manifest =
        Manifest::parse(&std::fs::read_to_string(state.join("manifest.toml")).unwrap()).unwrap();
    guest_unlock_with(&manifest, state, broker)
}

/// [`guest_unlock`] with `manifest` as the guest's.
fn guest_unlock_with(
    manifest: &Manifest,
    state: &Path,
    broker: &Path,
) -> keyshard_core::quorum::Result<keyshard_core::quorum::QuorumOutcome> {
    use guest_driver::agent::{self, Inputs};
    use guest_driver::broker::mailbox::MailboxSpec;
    use guest_driver::broker::shares::InProcessFetcher;
    use guest_driver::source::SourceSpec;

    let vhd = std::fs::read(state.join("fragments/vhd-1.ksf")).unwrap();
    let mut served = devices::Devices::new();
    let volume = vhost_keyshard::fragment_volume::FragmentVolume::from_fragments(
        &[vhd],
        keyshard_core::HolderId::new("vhd-1").unwrap(),
    )
    .unwrap();
    let socket = served.serve("vhd-1", std::sync::Arc::new(volume));
    let inputs = Inputs {
        sources: vec![SourceSpec::VhostUser(socket).into_source(Path::new("/sys"))],
        broker: Some(Box::new(InProcessFetcher::new(
            MailboxSpec::VhostUser(broker.to_owned()).into_mailbox(Path::new("/sys")),
            None,
        ))),
        discovery: None,
    };
    let outcome = agent::unlock_with(manifest, inputs, Duration::from_secs(30));
    served.stop();
    outcome
}

/// The `host` holders the quorum's rejections name as missing, with why.
fn missing_host_holders(rejected: &[keyshard_core::quorum::Rejection]) -> Vec<(String, String)> {
    rejected
        .iter()
        .filter(|r| r.source.starts_with("host-"))
        .map(|r| (r.source.clone(), r.reason.to_string()))
        .collect()
}

#[test]
fn item8_the_guest_unlocks_with_host_shares_relayed_by_the_coordinator() {
    let lab = Lab::start();
    let (state, placed) = init_placed(&lab);
    let (coordinator, socket) = start_coordinator(&lab, &state, 5000);

    let outcome = guest_unlock(&state, &socket).unwrap_or_else(|e| {
        panic!(
            "{e:?}\n{}",
            std::fs::read_to_string(lab.path("coordinator.log")).unwrap_or_default()
        )
    });
    assert_eq!(outcome.secret.as_slice(), VOLUME_KEY);
    let used: Vec<&str> = outcome.used.iter().map(|u| u.source.as_str()).collect();
    // vhd-1 and tpm-1 are 2 of k = 3: the third is a host share, relayed.
    assert_eq!(used.len(), 3, "{used:?}");
    assert!(
        used.iter().any(|u| u.starts_with("host-1 (broker")),
        "{used:?}"
    );
    assert!(
        used.iter().any(|u| u.starts_with("tpm-1 (broker")),
        "{used:?}"
    );

    // The coordinator saw ciphertext only: its log says who released, never the share.
    let log = std::fs::read_to_string(lab.path("coordinator.log")).unwrap();
    assert!(log.contains("host-1 released by shard host"), "{log}");

    // A guest whose manifest pins no host TPM cannot take the tpm share: it needs both host
    // shares, so both slots are relayed from the two placed shard hosts.
    let mut manifest =
        Manifest::parse(&std::fs::read_to_string(state.join("manifest.toml")).unwrap()).unwrap();
    manifest.host_attestation = None;
    let outcome = guest_unlock_with(&manifest, &state, &socket).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.secret.as_slice(), VOLUME_KEY);
    let mut used: Vec<&str> = outcome
        .used
        .iter()
        .map(|u| u.source.split(' ').next().unwrap())
        .collect();
    used.sort_unstable();
    assert_eq!(used, ["host-1", "host-2", "ksf-vhd-1"]);
    let log = std::fs::read_to_string(lab.path("coordinator.log")).unwrap();
    for host in &placed {
        assert!(
            log.contains(&format!("released by shard host {host}")),
            "{log}"
        );
    }
    drop(coordinator);
}

#[test]
fn item8_with_its_shard_hosts_stopped_or_hung_the_guest_stays_locked_and_names_them() {
    let mut lab = Lab::start();
    let (state, placed) = init_placed(&lab);
    let (_coordinator, socket) = start_coordinator(&lab, &state, 1500);
    let index = |id: &str| HOSTS.iter().position(|(h, _)| *h == id).unwrap();
    let (dead, hung) = (index(&placed[0]), index(&placed[1]));
    // One placed host is stopped, the other hangs: it accepts connections and never answers.
    lab._hosts[dead].stop().unwrap();
    let hung_pid = libc::pid_t::try_from(lab._hosts[hung].pid()).unwrap();
    // SAFETY: kill(2) with the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(hung_pid, libc::SIGSTOP) }, 0);

    let started = std::time::Instant::now();
    let error = guest_unlock(&state, &socket).unwrap_err();
    let took = started.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(hung_pid, libc::SIGCONT) };
    let keyshard_core::quorum::QuorumError::NotMet {
        valid,
        needed,
        rejected,
    } = error
    else {
        panic!("{error:?}");
    };
    assert_eq!((valid, needed), (2, Some(3)), "{rejected:?}");
    let missing = missing_host_holders(&rejected);
    assert_eq!(missing.len(), 2, "{rejected:?}");
    let why: String = missing
        .iter()
        .map(|(holder, why)| format!("{holder}: {why}\n"))
        .collect();
    assert!(why.contains(&format!("shard host {}", placed[0])), "{why}");
    assert!(!why.contains("CMS"), "{why}");
    assert!(
        why.contains(&format!(
            "shard host {}: no answer within 1500 ms",
            placed[1]
        )),
        "{why}"
    );
    eprintln!("locked after {took:?}:\n{why}");
    // Two host requests, each bounded by the shard host deadline (1.5 s) after the CMS's part:
    // the boot waited for the deadlines, not for the hung host.
    assert!(took < Duration::from_secs(12), "took {took:?}");

    // A hung CMS: each host holder is refused after the CMS deadline (3 s), naming the CMS.
    let cms_pid = libc::pid_t::try_from(lab.cms.daemon.pid()).unwrap();
    // SAFETY: kill(2) with the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(cms_pid, libc::SIGSTOP) }, 0);
    let started = std::time::Instant::now();
    let error = guest_unlock(&state, &socket).unwrap_err();
    let took = started.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(cms_pid, libc::SIGCONT) };
    let keyshard_core::quorum::QuorumError::NotMet { rejected, .. } = error else {
        panic!("{error:?}");
    };
    let missing = missing_host_holders(&rejected);
    assert_eq!(missing.len(), 2, "{rejected:?}");
    let cms = format!("CMS {}: no answer within 3000 ms", lab.cms.url(""));
    assert!(
        missing.iter().all(|(_, why)| why.contains(&cms)),
        "{missing:?}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}
