//! `keyshard shard-host` as a process (issue 9, items 2, 3 and 6): a real `keyshard cms` with
//! `--ek-ca`, three `keyshard shard-host` processes and a compute instance, each with its own
//! swtpm with EK certificates. The hosts enrol and register themselves; the instance enrols
//! with `keyshard instance enroll`; the credential is put with `--instance-policy`. The test
//! then acts as the instance: it fetches grants from the CMS and asks each host over HTTPS,
//! and the shares it gets rebuild the credential.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "common/cms.rs"]
#[allow(dead_code)]
mod harness;
#[allow(dead_code)]
#[path = "../../keyshard-tpm/tests/common/swtpm.rs"]
mod swtpm;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{Cms, Pki};
use keyshard_attest::tpm::PcrSelection;
use keyshard_cms::server::ErrorBody;
use keyshard_cms::server::fetch::{FetchRequest, FetchResponse, GrantEntry};
use keyshard_cms::server::hosts::HostList;
use keyshard_cms::shard_host::server::{HostNonceResponse, ReleaseRequest, ReleaseResponse};
use keyshard_core::policy::PcrBank;
use keyshard_core::sharing::{self, Share};
use keyshard_core::{Fragment, KeyId};
use keyshard_e2e::process::Daemon;
use keyshard_shards::HostId;
use keyshard_shards::ecies::ShardBinding;
use keyshard_shards::grant::{self, Grant, GrantStatement};
use keyshard_shards::instance::{
    FetchKey, InstanceEvidence, Nonce, ReleasedShard, qualifying_data,
};
use keyshard_tpm::Tpm;
use swtpm::Swtpm;

const SECRET: &[u8] = b"postgres://app:s3cr3t-p4ssw0rd@db.internal/prod";
const READY: &str = "ready: shard host ";
const HOSTS: [(&str, &str); 3] = [
    ("host-1", "region=eu,operator=acme"),
    ("host-2", "region=us,operator=globex"),
    ("host-3", "region=ap,operator=initech"),
];

fn keyshard(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
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

/// A running `keyshard shard-host`.
struct Host {
    id: String,
    daemon: Daemon,
    url: String,
}

/// The CMS, the hosts' swtpms and state dirs, and the instance's TPM.
struct Lab {
    pki: Pki,
    cms: Cms,
    cms_pub: PathBuf,
    http: reqwest::Client,
    host_swtpms: Vec<Swtpm>,
    instance_swtpm: Swtpm,
}

impl Lab {
    fn start() -> Self {
        let pki = Pki::new();
        // The TPMs first: the first one made creates the EK CA the CMS is started with.
        let host_swtpms: Vec<Swtpm> = HOSTS
            .iter()
            .map(|_| Swtpm::start_with_ek_certificates(&pki.ek_ca_dir()))
            .collect();
        let instance_swtpm = Swtpm::start_with_ek_certificates(&pki.ek_ca_dir());
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
        Self {
            pki,
            cms,
            cms_pub,
            http,
            host_swtpms,
            instance_swtpm,
        }
    }

    fn state_dir(&self, id: &str) -> PathBuf {
        self.pki.dir.path().join(format!("state-{id}"))
    }

    fn host_command(&self, n: usize, state_dir: &Path, listen: &str) -> Command {
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
            .arg(format!("--listen={listen}"))
            .arg("--host-id")
            .arg(id)
            .arg("--domain")
            .arg(domain)
            .arg("--tcti")
            .arg(self.host_swtpms[n].tcti())
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--tls-cert")
            .arg(&self.pki.cert)
            .arg("--tls-key")
            .arg(&self.pki.key);
        command
    }

    fn start_host(&self, n: usize) -> Host {
        self.start_host_on(n, "127.0.0.1:0")
    }

    fn start_host_on(&self, n: usize, listen: &str) -> Host {
        let id = HOSTS[n].0;
        let log = self.pki.dir.path().join(format!(
            "{id}-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = self.host_command(n, &self.state_dir(id), listen);
        let daemon = Daemon::start(id, &mut command, READY, Duration::from_secs(60), &log)
            .unwrap_or_else(|e| panic!("{e}"));
        let line = daemon.ready_line().to_owned();
        let prefix = format!("ready: shard host {id} serving on ");
        let url = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{line}"))
            .to_owned();
        assert!(url.starts_with("https://127.0.0.1:"), "{line}");
        Host {
            id: id.to_owned(),
            daemon,
            url,
        }
    }

    /// `keyshard instance enroll` for vm-1 over sha256:0,7; the AK name it prints.
    fn enrol_instance(&self) -> String {
        let tcti = self.instance_swtpm.tcti();
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
        out.split("ak name ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| panic!("{out}"))
            .to_owned()
    }

    /// `keyshard credential keygen` and `put` of SECRET as `name`, 2 of 3, admitting vm-1.
    fn put(&self, name: &str, ak_name: &str) -> PathBuf {
        let dir = self.pki.dir.path();
        let client = dir.join("client.key");
        if !client.exists() {
            let (code, out, err) = keyshard(&[
                "credential".as_ref(),
                "keygen".as_ref(),
                "--out".as_ref(),
                client.as_os_str(),
            ]);
            assert_eq!(code, 0, "{out}{err}");
        }
        let secret = dir.join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        let policy = dir.join("policy.json");
        std::fs::write(
            &policy,
            format!(r#"{{"instances": [{{"id": "vm-1", "ak_name": "{ak_name}"}}]}}"#),
        )
        .unwrap();
        let (code, out, err) = keyshard(&[
            "credential".as_ref(),
            "put".as_ref(),
            "--cms".as_ref(),
            self.cms.url("").as_ref(),
            "--ca".as_ref(),
            self.pki.ca.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--file".as_ref(),
            secret.as_os_str(),
            "--client-pub".as_ref(),
            dir.join("client.key.pub").as_os_str(),
            "--threshold".as_ref(),
            "2".as_ref(),
            "--shares".as_ref(),
            "3".as_ref(),
            "--instance-policy".as_ref(),
            policy.as_os_str(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("instances that may fetch it: vm-1"), "{out}");
        client
    }

    async fn post<B: serde::Serialize>(&self, url: &str, body: &B) -> (u16, String) {
        let answer = self.http.post(url).json(body).send().await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    /// The instance's evidence for `nonce`, bound to `key`, quoted by its TPM.
    fn evidence(&self, nonce: &Nonce, key: &FetchKey) -> InstanceEvidence {
        let mut tpm = Tpm::open(&self.instance_swtpm.tcti()).unwrap();
        let selection = PcrSelection::new(PcrBank::Sha256, &[0, 7]).unwrap();
        let pcrs = tpm.read_pcrs(&selection).unwrap();
        let quote = tpm
            .quote(&selection, &qualifying_data(nonce, &key.public_key()))
            .unwrap();
        InstanceEvidence::new(*nonce, key.public_key(), quote, pcrs)
    }

    /// The CMS's challenge for vm-1, evidence for it, and the fetch: status and body.
    async fn fetch(&self, name: &str, key: &FetchKey) -> (u16, String) {
        let (status, body) = self
            .post(
                &self.cms.url("/v1/instances/vm-1/challenge"),
                &serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let challenge: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(challenge["pcrs"], "sha256:0,7", "{body}");
        let nonce = nonce_from(challenge["nonce"].as_str().unwrap());
        let evidence = self.evidence(&nonce, key);
        self.post(
            &self.cms.url(&format!("/v1/credentials/{name}/fetch")),
            &FetchRequest {
                instance: "vm-1".to_owned(),
                evidence: hex::encode(evidence.to_bytes()),
            },
        )
        .await
    }

    /// The release body for `grant` with fresh evidence for a nonce from the host at `url`.
    async fn release_body(&self, url: &str, grant: &GrantEntry, key: &FetchKey) -> ReleaseRequest {
        let (status, body) = self
            .post(&format!("{url}/v1/nonces"), &serde_json::json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
        let nonce: HostNonceResponse = serde_json::from_str(&body).unwrap();
        let evidence = self.evidence(&nonce_from(&nonce.nonce), key);
        ReleaseRequest {
            grant: grant.grant.clone(),
            sealed_shard: grant.sealed_shard.clone(),
            evidence: hex::encode(evidence.to_bytes()),
        }
    }
}

fn nonce_from(text: &str) -> Nonce {
    hex::decode(text).unwrap().try_into().unwrap()
}

fn code_of(body: &str) -> (String, String) {
    let error = serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("{e}: {body}"))
        .error;
    (error.code, error.message)
}

/// Opens a released shard as the instance does and checks the fragment's CMS signature.
fn open_share(lab: &Lab, key: &FetchKey, grant: &GrantEntry, body: &str) -> Share {
    let answer: ReleaseResponse = serde_json::from_str(body).unwrap();
    let released = ReleasedShard::from_bytes(&hex::decode(answer.released).unwrap()).unwrap();
    let binding = ShardBinding {
        credential: KeyId::new("db").unwrap(),
        epoch: 1,
        index: grant.index,
        host: HostId::new(grant.host.clone()).unwrap(),
    };
    let opened = key.open(&released, &binding).unwrap();
    let signing = keyshard_core::keys::signing_key_from_pem(
        &std::fs::read_to_string(&lab.pki.signing).unwrap(),
    )
    .unwrap();
    let fragment = Fragment::parse(&opened)
        .unwrap()
        .verify(&signing.verifying_key())
        .unwrap();
    assert_eq!(fragment.header().index, grant.index);
    fragment.share().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_shard_host_processes_enrol_register_and_release_to_a_verified_instance() {
    let lab = Lab::start();
    let mut hosts: Vec<Host> = (0..HOSTS.len()).map(|n| lab.start_host(n)).collect();

    // Each host enrolled and registered itself, at the endpoint it serves on.
    let (status, body) = {
        let answer = lab.http.get(lab.cms.url("/v1/hosts")).send().await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    };
    assert_eq!(status, 200, "{body}");
    let listed: HostList = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.hosts.len(), 3, "{body}");
    for host in &hosts {
        assert!(
            body.contains(&host.url),
            "{} not at {}: {body}",
            host.id,
            host.url
        );
        let status: serde_json::Value = lab
            .http
            .get(format!("{}/v1/status", host.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["host"], host.id.as_str());
    }
    // Its state dir holds the decrypt key, 0600, in a 0700 directory.
    let state = lab.state_dir("host-1");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let key_file = state.join("decrypt-key");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_before = std::fs::read(&key_file).unwrap();

    let ak_name = lab.enrol_instance();
    lab.put("db", &ak_name);
    let key = FetchKey::generate().unwrap();
    let (status, body) = lab.fetch("db", &key).await;
    assert_eq!(status, 200, "{body}");
    let fetched: FetchResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(fetched.grants.len(), 3);

    // Every host releases its shard to the instance; any two rebuild the credential.
    let mut shares = Vec::new();
    let mut replay = None;
    for grant in &fetched.grants {
        let request = lab.release_body(&grant.endpoint, grant, &key).await;
        let (status, body) = lab
            .post(&format!("{}/v1/release", grant.endpoint), &request)
            .await;
        assert_eq!(status, 200, "{}: {body}", grant.host);
        shares.push(open_share(&lab, &key, grant, &body));
        replay.get_or_insert((grant.clone(), request));
    }
    for pair in [&shares[..2], &shares[1..]] {
        assert_eq!(&sharing::combine(pair, 2).unwrap()[..], SECRET);
    }
    let (first, request) = replay.unwrap();
    // A replayed release is refused by the host.
    let (status, body) = lab
        .post(&format!("{}/v1/release", first.endpoint), &request)
        .await;
    assert_eq!(
        (status, code_of(&body).0.as_str()),
        (403, "nonce_refused"),
        "{body}"
    );
    // The shard and grant of one host, taken to another host: refused there.
    let other = fetched
        .grants
        .iter()
        .find(|g| g.host != first.host)
        .unwrap();
    let copied = lab.release_body(&other.endpoint, &first, &key).await;
    let (status, body) = lab
        .post(&format!("{}/v1/release", other.endpoint), &copied)
        .await;
    assert_eq!(
        (status, code_of(&body).0.as_str()),
        (403, "grant_refused"),
        "{body}"
    );
    // The first host's grant re-signed by another key, or by the CMS key but expired; its
    // grant with the other host's sealed shard; its evidence re-used with another key.
    let cms_key = keyshard_core::keys::signing_key_from_pem(
        &std::fs::read_to_string(&lab.pki.signing).unwrap(),
    )
    .unwrap();
    let statement = Grant::from_bytes(&hex::decode(&first.grant).unwrap())
        .unwrap()
        .statement()
        .clone();
    let forged = statement.sign(&ed25519_dalek::SigningKey::from_bytes(&[0x77; 32]));
    let expired = GrantStatement {
        not_after_ms: grant::unix_ms(std::time::SystemTime::now()).unwrap() - 1,
        ..statement
    }
    .sign(&cms_key);
    for (what, grant, sealed, says) in [
        (
            "another key",
            hex::encode(forged.to_bytes()),
            &first.sealed_shard,
            "signature",
        ),
        (
            "expired",
            hex::encode(expired.to_bytes()),
            &first.sealed_shard,
            "expired",
        ),
        (
            "another shard",
            first.grant.clone(),
            &other.sealed_shard,
            "SHA-256",
        ),
    ] {
        let mut request = lab.release_body(&first.endpoint, &first, &key).await;
        request.grant = grant;
        request.sealed_shard = sealed.clone();
        let (status, body) = lab
            .post(&format!("{}/v1/release", first.endpoint), &request)
            .await;
        let (code, message) = code_of(&body);
        assert_eq!(
            (status, code.as_str()),
            (403, "grant_refused"),
            "{what}: {body}"
        );
        assert!(message.contains(says), "{what}: {message}");
    }
    let mut request = lab.release_body(&first.endpoint, &first, &key).await;
    let honest = InstanceEvidence::from_bytes(&hex::decode(&request.evidence).unwrap()).unwrap();
    let swapped = InstanceEvidence::new(
        *honest.nonce(),
        FetchKey::generate().unwrap().public_key(),
        honest.quote().clone(),
        honest.pcrs().clone(),
    );
    request.evidence = hex::encode(swapped.to_bytes());
    let (status, body) = lab
        .post(&format!("{}/v1/release", first.endpoint), &request)
        .await;
    assert_eq!(
        (status, code_of(&body).0.as_str()),
        (403, "evidence_refused"),
        "{body}"
    );
    // Each host printed one line per release and refusal.
    let host_1 = hosts.iter().find(|h| h.id == first.host).unwrap();
    let lines = host_1.daemon.stdout();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("released shard") && l.contains("to instance vm-1")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("refused (nonce_refused)")),
        "{lines:?}"
    );

    // SIGTERM stops a host (exit 0); started again on the same state dir (and address: the
    // map names the endpoint the host had at the put) it reuses its key, so the shard sealed
    // to it before the restart is released by it after.
    let n = hosts.iter().position(|h| h.id == "host-1").unwrap();
    let mut stopped = hosts.remove(n);
    let status = stopped.daemon.stop().unwrap();
    assert!(status.success(), "{status:?}: {}", stopped.daemon.stderr());
    let address = stopped.url.trim_start_matches("https://").to_owned();
    let restarted = lab.start_host_on(n, &address);
    assert_eq!(std::fs::read(&key_file).unwrap(), key_before);
    let key = FetchKey::generate().unwrap();
    let (status, body) = lab.fetch("db", &key).await;
    assert_eq!(status, 200, "{body}");
    let fetched: FetchResponse = serde_json::from_str(&body).unwrap();
    let grant = fetched.grants.iter().find(|g| g.host == "host-1").unwrap();
    assert_eq!(grant.endpoint, restarted.url);
    let request = lab.release_body(&restarted.url, grant, &key).await;
    let (status, body) = lab
        .post(&format!("{}/v1/release", restarted.url), &request)
        .await;
    assert_eq!(status, 200, "{body}");
    open_share(&lab, &key, grant, &body);

    // The instance's PCR 7 changes: the CMS refuses its fetch, and a host asked directly with
    // a grant it still holds refuses its evidence, both naming the PCR.
    {
        let mut tpm = Tpm::open(&lab.instance_swtpm.tcti()).unwrap();
        tpm.extend_pcr(PcrBank::Sha256, 7, b"another bootloader")
            .unwrap();
    }
    let (status, body) = lab.fetch("db", &key).await;
    let (code, message) = code_of(&body);
    assert_eq!((status, code.as_str()), (403, "evidence_refused"), "{body}");
    assert!(message.contains("sha256:7"), "{message}");
    let request = lab.release_body(&restarted.url, grant, &key).await;
    let (status, body) = lab
        .post(&format!("{}/v1/release", restarted.url), &request)
        .await;
    let (code, message) = code_of(&body);
    assert_eq!((status, code.as_str()), (403, "evidence_refused"), "{body}");
    assert!(message.contains("sha256:7"), "{message}");
    hosts.push(restarted);
    for mut host in hosts {
        let status = host.daemon.stop().unwrap();
        assert!(status.success(), "{}: {status:?}", host.id);
    }
}

#[test]
fn item4_a_state_dir_another_user_may_write_is_refused_at_start() {
    let lab = Lab::start();
    let dir = lab.state_dir("host-1");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = lab.host_command(0, &dir, "127.0.0.1:0").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("writable by group or others"), "{stderr}");
    assert!(stderr.contains("--state-dir"), "{stderr}");
    assert!(!dir.join("decrypt-key").exists());
    assert!(output.stdout.is_empty());
}
