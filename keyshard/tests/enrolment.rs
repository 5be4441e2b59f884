//! Enrolment and compute instances (issue 9, items 2 and 6) through the real binaries: `keyshard
//! cms --ek-ca` on loopback (redb), swtpms manufactured by swtpm_setup with EK certificates
//! from a local CA made per test, the CLI's enrolment (`keyshard::cli::enrol`) and `keyshard
//! instance enroll`. What must be refused is: a wrong activation answer, an EK certificate of
//! another CA, a replayed enrolment, an id pinned to another AK, a host registration without
//! enrolment, and an instance registration whose quote is by another AK, over another nonce,
//! over other PCRs or other values; malformed bodies on the new endpoints change nothing.

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
#[allow(dead_code)]
#[path = "../../keyshard-cms/tests/common/hosts.rs"]
mod hosts;
#[allow(dead_code)]
#[path = "../../keyshard-tpm/tests/common/swtpm.rs"]
mod swtpm;

use std::path::PathBuf;
use std::process::Command;

use harness::{Cms, Pki};
use hosts::ShardHost;
use keyshard_attest::tpm::credential::{EkKind, MadeCredential};
use keyshard_attest::tpm::{PcrSelection, sha256_name};
use keyshard_cms::enrolment::{EnrolmentKind, parse_ek_kind};
use keyshard_cms::instances::quote_to_wire;
use keyshard_cms::server::ErrorBody;
use keyshard_cms::server::NonceResponse;
use keyshard_cms::server::enrolment::{Enrolled, EnrolmentChallenge};
use keyshard_cms::server::hosts::HostRegistrationRequest;
use keyshard_cms::server::instances::{InstanceChallengeResponse, InstanceSummary};
use keyshard_cms::store::{KeyPrefix, Nonce, Repository, Store};
use keyshard_core::policy::PcrBank;
use keyshard_tpm::{Tpm, TpmConfig, TpmService};
use reqwest::StatusCode;
use serde_json::json;
use swtpm::Swtpm;

/// A CMS that enrols TPMs of this test's EK CA, on a redb file.
struct Lab {
    pki: Pki,
    cms: Cms,
    http: reqwest::Client,
}

impl Lab {
    /// The CMS, started once a TPM made the test's EK CA (the caller's first swtpm).
    fn start(pki: Pki) -> Self {
        let cms = Cms::start_enrolling(&pki, &redb_url(&pki));
        let http = pki.client();
        Self { pki, cms, http }
    }

    /// `method path` with a JSON body: the status and the body.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> (StatusCode, Vec<u8>) {
        let response = self
            .http
            .request(method, self.cms.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        (response.status(), response.bytes().await.unwrap().to_vec())
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> (StatusCode, Vec<u8>) {
        self.call(reqwest::Method::POST, path, &body).await
    }

    /// `POST /v1/enrolments` for `tpm` as `kind` `id`, with its RSA 2048 EK certificate.
    async fn begin(&self, tpm: &mut Tpm, kind: &str, id: &str) -> (StatusCode, Vec<u8>) {
        let certificate = tpm
            .endorsement_key(EkKind::Rsa2048)
            .unwrap()
            .certificate
            .expect("swtpm_setup wrote an EK certificate");
        let ak = tpm.ak_public_area().unwrap();
        self.post(
            "/v1/enrolments",
            json!({
                "kind": kind, "id": id,
                "ek_certificate": hex::encode(certificate), "ak_public": hex::encode(ak),
            }),
        )
        .await
    }

    /// The challenge a begun enrolment answered (201 expected).
    async fn challenge(&self, tpm: &mut Tpm, kind: &str, id: &str) -> EnrolmentChallenge {
        let (status, body) = self.begin(tpm, kind, id).await;
        assert_eq!(status, StatusCode::CREATED, "{}", text(&body));
        serde_json::from_slice(&body).unwrap()
    }

    async fn activate(&self, enrolment: &str, credential: &[u8]) -> (StatusCode, Vec<u8>) {
        self.post(
            &format!("/v1/enrolments/{enrolment}/activate"),
            json!({ "credential": hex::encode(credential) }),
        )
        .await
    }

    /// Enrols `tpm` as `kind` `id` with the CLI's enrolment; its AK name.
    async fn enrol<T: keyshard::cli::enrol::EnrolmentTpm>(
        &self,
        tpm: &mut T,
        kind: EnrolmentKind,
        id: &str,
    ) -> [u8; 34] {
        keyshard::cli::enrol::enrol(&self.pki.cms_client(&self.cms), kind, id, tpm)
            .await
            .unwrap_or_else(|e| panic!("enrolling {kind} {id}: {e}"))
    }

    /// `PUT /v1/hosts/{id}` with `host`'s registration over a fresh challenge.
    async fn register_host(&self, id: &str, host: &ShardHost) -> (StatusCode, Vec<u8>) {
        let (status, body) = self.post("/v1/hosts/challenge", json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let nonce: NonceResponse = serde_json::from_slice(&body).unwrap();
        let registration = host.registration(Nonce::from_hex(&nonce.nonce).unwrap(), "eu", "acme");
        let body = serde_json::to_value(HostRegistrationRequest::from_registration(&registration))
            .unwrap();
        self.call(reqwest::Method::PUT, &format!("/v1/hosts/{id}"), &body)
            .await
    }

    async fn instance_challenge(&self, id: &str) -> InstanceChallengeResponse {
        let (status, body) = self
            .post(&format!("/v1/instances/{id}/challenge"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{}", text(&body));
        serde_json::from_slice(&body).unwrap()
    }

    async fn get_instance(&self, id: &str) -> (StatusCode, Vec<u8>) {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/instances/{id}"),
            &json!(null),
        )
        .await
    }
}

fn redb_url(pki: &Pki) -> String {
    format!("redb:{}", redb_path(pki).display())
}

fn redb_path(pki: &Pki) -> PathBuf {
    pki.dir.path().join("cms.redb")
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// The error's code and message.
fn error(body: &[u8]) -> (String, String) {
    let body: ErrorBody = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    (body.error.code, body.error.message)
}

fn assert_refused(got: (StatusCode, Vec<u8>), status: u16, code: &str, says: &str) {
    let (got_status, body) = got;
    assert_eq!(got_status.as_u16(), status, "{}", text(&body));
    let (got_code, message) = error(&body);
    assert_eq!(got_code, code, "{message}");
    assert!(message.contains(says), "{message} should say {says}");
}

fn made(challenge: &EnrolmentChallenge) -> MadeCredential {
    MadeCredential {
        ek: parse_ek_kind(&challenge.ek).unwrap(),
        id_object: hex::decode(&challenge.id_object).unwrap(),
        encrypted_secret: hex::decode(&challenge.encrypted_secret).unwrap(),
    }
}

/// The store keys under `prefix` in the (stopped) CMS's redb file.
async fn keys_in(pki: &Pki, prefix: &str) -> Vec<String> {
    let store = Store::open(&redb_url(pki)).await.unwrap();
    let listing = store
        .list(&KeyPrefix::new(prefix).unwrap(), None, 100)
        .await
        .unwrap();
    listing
        .entries
        .into_iter()
        .map(|(key, _)| key.as_str().to_owned())
        .collect()
}

/// `keyshard ARGS`: exit code, stdout, stderr.
fn keyshard(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_keyshard"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// Review of issue 9: without a list, a host's id, region, operator and weight were whatever it
/// claimed (three genuine TPMs claiming three domains and weight 2^32-1 won 3 of 4 shares of
/// every 3-of-4 credential put after them). `keyshard cms --hosts FILE` admits only the listed
/// ids, in their listed domains, up to their weights, and with `ek_sha256` only by that TPM:
/// each refusal is 403 `forbidden`, and nothing is stored; a host registered before the list
/// is left out of placement until it registers as listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review9_the_cms_admits_only_listed_hosts_in_their_domain_and_weight() {
    let pki = Pki::new();
    let mut host = ShardHost::start_with_ek_certificates("host-1", &pki.ek_ca_dir());
    let mut stranger = ShardHost::start_with_ek_certificates("host-9", &pki.ek_ca_dir());
    async fn register_as(
        lab: &Lab,
        host: &ShardHost,
        region: &str,
        operator: &str,
        weight: u32,
    ) -> (StatusCode, Vec<u8>) {
        let (status, body) = lab.post("/v1/hosts/challenge", json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let nonce: NonceResponse = serde_json::from_slice(&body).unwrap();
        let mut registration =
            host.registration(Nonce::from_hex(&nonce.nonce).unwrap(), region, operator);
        registration.weight = std::num::NonZeroU32::new(weight).unwrap();
        let body = serde_json::to_value(HostRegistrationRequest::from_registration(&registration))
            .unwrap();
        lab.call(reqwest::Method::PUT, "/v1/hosts/host-1", &body)
            .await
    }
    async fn listing(lab: &Lab) -> String {
        let (status, body) = lab
            .call(reqwest::Method::GET, "/v1/hosts", &json!(null))
            .await;
        assert_eq!(status, StatusCode::OK);
        text(&body)
    }

    // Without a list: host-1 claims region ap and the largest weight, and is placed on.
    let lab = Lab::start(pki);
    lab.enrol(host.tpm.get_mut().unwrap(), EnrolmentKind::Host, "host-1")
        .await;
    let (status, body) = register_as(&lab, &host, "ap", "acme", u32::MAX).await;
    assert_eq!(status, StatusCode::CREATED, "{}", text(&body));
    assert!(listing(&lab).await.contains(r#""weight":4294967295"#));

    // The same store, with the operator's list.
    let Lab { pki, cms, http } = lab;
    cms.stop();
    let hosts = pki.dir.path().join("hosts.json");
    std::fs::write(
        &hosts,
        json!({"hosts": [
            {"id": "host-1", "region": "eu", "operator": "acme"},
            {"id": "host-2", "region": "us", "operator": "globex", "max_weight": 4,
             "ek_sha256": "11".repeat(32)},
        ]})
        .to_string(),
    )
    .unwrap();
    let bundle = pki.ek_bundle();
    let cms = Cms::start_with(
        &pki,
        &redb_url(&pki),
        &[
            "--ek-ca".as_ref(),
            bundle.as_os_str(),
            "--hosts".as_ref(),
            hosts.as_os_str(),
        ],
    );
    let lab = Lab { pki, cms, http };
    // The record from before the list is left out, with the reason.
    let listed = listing(&lab).await;
    assert!(
        listed.contains(r#""hosts":[]"#) && listed.contains("admitted in region eu"),
        "{listed}"
    );

    let stranger_tpm = stranger.tpm.get_mut().unwrap();
    assert_refused(
        lab.begin(stranger_tpm, "host", "host-9").await,
        403,
        "forbidden",
        "host host-9 is not on the CMS's list",
    );
    assert_refused(
        lab.begin(stranger_tpm, "host", "host-2").await,
        403,
        "forbidden",
        "admitted for another TPM",
    );
    // Instances are not hosts: the list does not apply to them.
    let challenge = lab.challenge(stranger_tpm, "instance", "vm-1").await;
    assert_eq!(challenge.ek, "rsa2048");

    for (region, operator, weight, says) in [
        (
            "ap",
            "acme",
            1,
            "admitted in region eu, operator acme, not region ap",
        ),
        ("eu", "globex", 1, "not region eu, operator globex"),
        ("eu", "acme", u32::MAX, "at most 1"),
    ] {
        assert_refused(
            register_as(&lab, &host, region, operator, weight).await,
            403,
            "forbidden",
            says,
        );
    }
    assert!(listing(&lab).await.contains(r#""hosts":[]"#));
    let (status, body) = register_as(&lab, &host, "eu", "acme", 1).await;
    assert_eq!(status, StatusCode::OK, "{}", text(&body));
    let listed = listing(&lab).await;
    assert!(
        listed.contains(r#""id":"host-1""#) && listed.contains(r#""excluded":[]"#),
        "{listed}"
    );
}

/// Closed host admission by default: a CMS with `--ek-ca` (host enrolment on) and neither
/// `--hosts` nor `--allow-any-host` does not start, and says why in one line; before, it only
/// logged a warning and let every genuine TPM register in the domain and weight it claimed.
#[test]
fn admission_a_cms_with_ek_ca_and_no_host_list_refuses_to_start() {
    let pki = Pki::new();
    let _ca_maker = Swtpm::start_with_ek_certificates(&pki.ek_ca_dir());
    let bundle = pki.ek_bundle();
    let mut output = Command::new(env!("CARGO_BIN_EXE_keyshard"))
        .env_remove("RUST_LOG")
        .arg("cms")
        .arg("--listen=127.0.0.1:0")
        .arg(format!("--store={}", redb_url(&pki)))
        .arg("--tls-cert")
        .arg(&pki.cert)
        .arg("--tls-key")
        .arg(&pki.key)
        .arg("--signing-key")
        .arg(&pki.signing)
        .arg("--ek-ca")
        .arg(&bundle)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A CMS that starts serves until stopped: give it 20 s to exit, then fail the test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while output.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            output.kill().unwrap();
            let started = output.wait_with_output().unwrap();
            panic!("the CMS started: {}", text(&started.stdout));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = output.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!text(&output.stdout).contains(harness::READY));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines.iter().all(|line| line.contains("--hosts")
            && line.contains("--allow-any-host")
            && line.contains("weight")),
        "{stderr}"
    );
    // It refused before opening anything.
    assert!(!redb_path(&pki).exists());
}

/// Closed host admission by default: `--allow-any-host` is the explicit way to open host
/// enrolment; the CMS starts, prints on stdout what that leaves open (a host claims its own
/// domain and weight), and a host enrols and registers in a domain and weight nobody gave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_allow_any_host_starts_and_says_what_it_leaves_open() {
    let pki = Pki::new();
    let mut host = ShardHost::start_with_ek_certificates("host-1", &pki.ek_ca_dir());
    let lab = Lab::start(pki);
    let stdout = lab.cms.daemon.stdout();
    let notice: Vec<&String> = stdout
        .iter()
        .filter(|line| line.contains("--allow-any-host"))
        .collect();
    assert_eq!(notice.len(), 1, "{stdout:?}");
    assert!(
        notice
            .iter()
            .all(|line| line.contains("region") && line.contains("weight")),
        "{notice:?}"
    );
    lab.enrol(host.tpm.get_mut().unwrap(), EnrolmentKind::Host, "host-1")
        .await;
    let (status, body) = lab.post("/v1/hosts/challenge", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let nonce: NonceResponse = serde_json::from_slice(&body).unwrap();
    let mut registration =
        host.registration(Nonce::from_hex(&nonce.nonce).unwrap(), "ap", "anyone");
    registration.weight = std::num::NonZeroU32::new(u32::MAX).unwrap();
    let body =
        serde_json::to_value(HostRegistrationRequest::from_registration(&registration)).unwrap();
    let (status, body) = lab
        .call(reqwest::Method::PUT, "/v1/hosts/host-1", &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{}", text(&body));
}

/// Review of issue 9: one TPM (one EK) enrols one id. A host's swtpm, enrolled as host-1,
/// asking to enrol as host-2 or as instance vm-1 is refused at the challenge (409
/// `ak_conflict` naming host-1); before, both were pinned, so one machine stood as several
/// holders (the registry only compared AKs, and a TPM makes as many AKs as it likes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review9_one_tpm_enrols_as_one_host_or_instance_only() {
    let pki = Pki::new();
    let host = ShardHost::start_with_ek_certificates("host-1", &pki.ek_ca_dir());
    let lab = Lab::start(pki);
    let mut host = host;
    let tpm = host.tpm.get_mut().unwrap();
    lab.enrol(tpm, EnrolmentKind::Host, "host-1").await;
    for (kind, id) in [("host", "host-2"), ("instance", "vm-1")] {
        assert_refused(
            lab.begin(tpm, kind, id).await,
            409,
            "ak_conflict",
            "enrolled as host host-1",
        );
    }
    // Its own id again is still fine.
    let challenge = lab.challenge(tpm, "host", "host-1").await;
    let activated = tpm.activate_credential(&made(&challenge)).unwrap();
    let (status, body) = lab.activate(&challenge.enrolment, &activated).await;
    assert_eq!(status, StatusCode::OK, "{}", text(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_enrolment_and_item6_instance_enroll_through_the_real_binaries() {
    let pki = Pki::new();
    let host = ShardHost::start_with_ek_certificates("host-1", &pki.ek_ca_dir());
    let instance = Swtpm::start_with_ek_certificates(&pki.ek_ca_dir());
    let intruder = Swtpm::start_with_ek_certificates(&pki.ek_ca_dir());
    let lab = Lab::start(pki);
    let mut host = host;

    // A host enrols, then registers: 201, listed.
    let ak_name = lab
        .enrol(host.tpm.get_mut().unwrap(), EnrolmentKind::Host, "host-1")
        .await;
    let area = host.tpm.get_mut().unwrap().ak_public_area().unwrap();
    assert_eq!(ak_name, sha256_name(&area));
    let (status, body) = lab.register_host("host-1", &host).await;
    assert_eq!(status, StatusCode::CREATED, "{}", text(&body));
    // Enrolling the same TPM again keeps its pin.
    let again = lab
        .enrol(host.tpm.get_mut().unwrap(), EnrolmentKind::Host, "host-1")
        .await;
    assert_eq!(again, ak_name);

    // An instance enrols and registers its PCRs 0 and 7 with `keyshard instance enroll`.
    let base = lab.cms.url("");
    let ca = lab.pki.ca.to_str().unwrap().to_owned();
    let tcti = instance.tcti();
    let enroll = |pcrs: Option<&str>| {
        let mut args = vec![
            "instance",
            "enroll",
            "--cms",
            &base,
            "--ca",
            &ca,
            "--instance-id",
            "vm-1",
            "--tcti",
            &tcti,
        ];
        if let Some(pcrs) = pcrs {
            args.extend(["--pcrs", pcrs]);
        }
        keyshard(&args)
    };
    let (code, stdout, stderr) = enroll(Some("sha256:7,0"));
    assert_eq!(code, 0, "{stderr}");
    let instance_ak = {
        let mut tpm = Tpm::open(&tcti).unwrap();
        hex::encode(sha256_name(&tpm.ak_public_area().unwrap()))
    };
    assert_eq!(
        stdout.trim_end(),
        format!("instance vm-1 enrolled: ak name {instance_ak}, golden sha256:0,7")
    );
    let (status, body) = lab.get_instance("vm-1").await;
    assert_eq!(status, StatusCode::OK);
    let summary: InstanceSummary = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (
            summary.id.as_str(),
            summary.ak_name.as_str(),
            summary.pcrs.as_str()
        ),
        ("vm-1", instance_ak.as_str(), "sha256:0,7")
    );
    // Run again without --pcrs: the CMS asks for the registered selection.
    let (code, stdout, stderr) = enroll(None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.ends_with("golden sha256:0,7\n"), "{stdout}");
    // A new instance is asked for PCRs 0 to 7.
    assert_eq!(
        lab.instance_challenge("vm-2").await.pcrs,
        "sha256:0,1,2,3,4,5,6,7"
    );

    // Another TPM cannot take the instance's id: it is pinned to the instance's AK.
    let (code, _, stderr) = keyshard(&[
        "instance",
        "enroll",
        "--cms",
        &base,
        "--ca",
        &ca,
        "--instance-id",
        "vm-1",
        "--tcti",
        &intruder.tcti(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("ak_conflict"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // A TPM without EK certificates cannot prove it is genuine: one line, before any request.
    let bare = Swtpm::start();
    let (code, _, stderr) = keyshard(&[
        "instance",
        "enroll",
        "--cms",
        &base,
        "--ca",
        &ca,
        "--instance-id",
        "vm-3",
        "--tcti",
        &bare.tcti(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no EK certificate"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let Lab { pki, cms, .. } = lab;
    cms.stop();
    // Pinned AKs for both, the instance's record, and no enrolment left pending.
    assert_eq!(
        keys_in(&pki, "aks/").await,
        ["aks/host/host-1", "aks/instance/vm-1"]
    );
    assert_eq!(keys_in(&pki, "instances/").await, ["instances/vm-1"]);
    assert!(keys_in(&pki, "enrolments/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_enrolment_refuses_wrong_answers_foreign_eks_replays_and_other_aks() {
    let pki = Pki::new();
    let mut a = ShardHost::start_with_ek_certificates("host-1", &pki.ek_ca_dir());
    let mut b = ShardHost::start_with_ek_certificates("host-2", &pki.ek_ca_dir());
    let other_ca = tempfile::tempdir().unwrap();
    let foreign = Swtpm::start_with_ek_certificates(other_ca.path());
    let lab = Lab::start(pki);
    let tpm_a = a.tpm.get_mut().unwrap();

    // A wrong activation answer: 403, and the enrolment is used up (the right answer after it
    // is refused too), so nothing is pinned and the host cannot register.
    let challenge = lab.challenge(tpm_a, "host", "host-1").await;
    assert_eq!(challenge.ek, "rsa2048");
    assert_refused(
        lab.activate(&challenge.enrolment, &[0; 32]).await,
        403,
        "activation_refused",
        "not the one made to its EK",
    );
    let right = tpm_a.activate_credential(&made(&challenge)).unwrap();
    assert_refused(
        lab.activate(&challenge.enrolment, &right).await,
        403,
        "enrolment_refused",
        "unknown, already answered",
    );
    // A credential made for A's TPM does not come out of B's.
    let for_a = lab.challenge(tpm_a, "host", "host-1").await;
    assert!(
        b.tpm
            .get_mut()
            .unwrap()
            .activate_credential(&made(&for_a))
            .is_err()
    );
    assert_refused(
        lab.register_host("host-1", &a).await,
        403,
        "not_enrolled",
        "not enrolled",
    );

    // The right answer pins the AK; the same answer again is a replay: refused.
    let tpm_a = a.tpm.get_mut().unwrap();
    let right = tpm_a.activate_credential(&made(&for_a)).unwrap();
    let (status, body) = lab.activate(&for_a.enrolment, &right).await;
    assert_eq!(status, StatusCode::OK, "{}", text(&body));
    let enrolled: Enrolled = serde_json::from_slice(&body).unwrap();
    let area = tpm_a.ak_public_area().unwrap();
    assert_eq!(
        (enrolled.kind.as_str(), enrolled.id.as_str()),
        ("host", "host-1")
    );
    assert_eq!(enrolled.ak_name, hex::encode(sha256_name(&area)));
    assert_refused(
        lab.activate(&for_a.enrolment, &right).await,
        403,
        "enrolment_refused",
        "unknown, already answered",
    );

    // An EK certificate from another CA: refused before any credential is made.
    let mut foreign_tpm = Tpm::open(&foreign.tcti()).unwrap();
    assert_refused(
        lab.begin(&mut foreign_tpm, "host", "host-3").await,
        403,
        "enrolment_refused",
        "EK certificate",
    );

    // host-1 is pinned to A's AK: B is refused at either step.
    let tpm_b = b.tpm.get_mut().unwrap();
    assert_refused(
        lab.begin(tpm_b, "host", "host-1").await,
        409,
        "ak_conflict",
        &enrolled.ak_name,
    );
    // The instance name space is separate: B may enrol as instance host-1.
    lab.enrol(tpm_b, EnrolmentKind::Instance, "host-1").await;

    // Registering without enrolment, or with an AK other than the pinned one: 403.
    assert_refused(
        lab.register_host("host-2", &b).await,
        403,
        "not_enrolled",
        "host host-2 is not enrolled",
    );
    assert_refused(
        lab.register_host("host-1", &b).await,
        403,
        "not_enrolled",
        "not the one enrolled",
    );
    // A registers.
    let (status, body) = lab.register_host("host-1", &a).await;
    assert_eq!(status, StatusCode::CREATED, "{}", text(&body));

    let Lab { pki, cms, .. } = lab;
    cms.stop();
    assert_eq!(
        keys_in(&pki, "aks/").await,
        ["aks/host/host-1", "aks/instance/host-1"]
    );
    assert_eq!(keys_in(&pki, "hosts/").await, ["hosts/host-1"]);
    // Every enrolment was answered or refused: none is left pending.
    assert!(keys_in(&pki, "enrolments/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_instance_enroll_refuses_quotes_by_another_ak_over_another_nonce_or_other_pcrs() {
    let pki = Pki::new();
    let instance = Swtpm::start_with_ek_certificates(&pki.ek_ca_dir());
    let other = Swtpm::start_with_ek_certificates(&pki.ek_ca_dir());
    let lab = Lab::start(pki);
    let mut tpm = Tpm::open(&instance.tcti()).unwrap();
    // The other TPM runs behind a TpmService (its own thread), as a long-running process
    // holds it: enrolment takes either.
    let mut other_tpm = TpmService::spawn(TpmConfig::new(other.tcti())).unwrap();
    let selection: PcrSelection = "sha256:0,7".parse().unwrap();
    let golden = tpm.read_pcrs(&selection).unwrap();
    let golden_hex = hex::encode(golden.to_bytes());

    let register = |nonce: &str, quote: &keyshard_attest::tpm::Quote, golden: &str| {
        json!({
            "golden_pcrs": golden, "nonce": nonce,
            "quote": hex::encode(quote_to_wire(quote)),
        })
    };
    let put = |body: serde_json::Value| {
        let lab = &lab;
        async move {
            lab.call(reqwest::Method::PUT, "/v1/instances/vm-1", &body)
                .await
        }
    };

    // Not enrolled yet: 403 not_enrolled, even with a good quote.
    let c = lab.instance_challenge("vm-1").await;
    let nonce = Nonce::from_hex(&c.nonce).unwrap();
    let quote = tpm.quote(&selection, nonce.as_bytes()).unwrap();
    assert_refused(
        put(register(&c.nonce, &quote, &golden_hex)).await,
        403,
        "not_enrolled",
        "instance vm-1 is not enrolled",
    );
    lab.enrol(&mut tpm, EnrolmentKind::Instance, "vm-1").await;
    lab.enrol(&mut other_tpm, EnrolmentKind::Instance, "vm-2")
        .await;

    // Another AK (enrolled, but for vm-2), another nonce, other PCRs, other values.
    let c = lab.instance_challenge("vm-1").await;
    let nonce = Nonce::from_hex(&c.nonce).unwrap();
    let by_other = other_tpm.quote(&selection, nonce.as_bytes()).unwrap();
    assert_refused(
        put(register(&c.nonce, &by_other, &golden_hex)).await,
        403,
        "evidence_refused",
        "signature does not verify",
    );
    let first = lab.instance_challenge("vm-1").await;
    let second = lab.instance_challenge("vm-1").await;
    let over_first = tpm
        .quote(
            &selection,
            Nonce::from_hex(&first.nonce).unwrap().as_bytes(),
        )
        .unwrap();
    assert_refused(
        put(register(&second.nonce, &over_first, &golden_hex)).await,
        403,
        "evidence_refused",
        "another nonce",
    );
    let c = lab.instance_challenge("vm-1").await;
    let pcr0: PcrSelection = "sha256:0".parse().unwrap();
    let over_pcr0 = tpm
        .quote(&pcr0, Nonce::from_hex(&c.nonce).unwrap().as_bytes())
        .unwrap();
    assert_refused(
        put(register(&c.nonce, &over_pcr0, &golden_hex)).await,
        403,
        "evidence_refused",
        "the quote covers",
    );
    // PCR 7 changes after the golden values were read: they are no longer what the TPM holds.
    tpm.extend_pcr(PcrBank::Sha256, 7, b"a changed boot")
        .unwrap();
    let c = lab.instance_challenge("vm-1").await;
    let changed = tpm
        .quote(&selection, Nonce::from_hex(&c.nonce).unwrap().as_bytes())
        .unwrap();
    assert_refused(
        put(register(&c.nonce, &changed, &golden_hex)).await,
        403,
        "evidence_refused",
        "does not match the golden values of sha256:0,7",
    );
    assert_eq!(lab.get_instance("vm-1").await.0, StatusCode::NOT_FOUND);

    // What the TPM holds now, quoted over a fresh nonce: 201; the same body again: its nonce
    // is used up.
    let now = hex::encode(tpm.read_pcrs(&selection).unwrap().to_bytes());
    let c = lab.instance_challenge("vm-1").await;
    let good = tpm
        .quote(&selection, Nonce::from_hex(&c.nonce).unwrap().as_bytes())
        .unwrap();
    let body = register(&c.nonce, &good, &now);
    let (status, answer) = put(body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{}", text(&answer));
    assert_refused(
        put(body).await,
        403,
        "nonce_refused",
        "unknown or already used",
    );
    let (status, body) = lab.get_instance("vm-1").await;
    assert_eq!(status, StatusCode::OK);
    let summary: InstanceSummary = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        summary.ak_name,
        hex::encode(sha256_name(&tpm.ak_public_area().unwrap()))
    );
    lab.cms.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_item6_malformed_bodies_on_the_new_endpoints_change_nothing() {
    let pki = Pki::new();
    // One TPM makes the EK CA; it never enrols.
    let _maker = Swtpm::start_with_ek_certificates(&pki.ek_ca_dir());
    let lab = Lab::start(pki);
    let json = "application/json";
    let enrolment = "ab".repeat(32);
    let activate = format!("/v1/enrolments/{enrolment}/activate");
    let nonce = "00".repeat(32);
    /// Method, path, Content-Type, body; the status and code expected.
    type Case<'a> = (reqwest::Method, &'a str, &'a str, Vec<u8>, u16, &'a str);
    use reqwest::Method;
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/enrolments",
            json,
            b"{".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            json,
            b"[]".to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            json,
            br#"{"kind":"host","id":"h","ek_certificate":"00","ak_public":"00","x":1}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            json,
            br#"{"kind":"vm","id":"h","ek_certificate":"00","ak_public":"00"}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            json,
            br#"{"kind":"host","id":"H 1","ek_certificate":"00","ak_public":"00"}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            json,
            br#"{"kind":"host","id":"h","ek_certificate":"zz","ak_public":"00"}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            json,
            br#"{"kind":"host","id":"h","ek_certificate":"3000","ak_public":"00"}"#.to_vec(),
            403,
            "enrolment_refused",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            json,
            br#"{"kind":5}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            "text/plain",
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/enrolments",
            json,
            vec![b' '; 70 * 1024],
            413,
            "body_too_large",
        ),
        (
            Method::GET,
            "/v1/enrolments",
            json,
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            &activate,
            json,
            br#"{"credential":"zz"}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            &activate,
            json,
            br#"{"credential":5}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            &activate,
            json,
            b"{}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            &activate,
            json,
            br#"{"credential":"00"}"#.to_vec(),
            403,
            "enrolment_refused",
        ),
        (
            Method::POST,
            "/v1/enrolments/xyz/activate",
            json,
            br#"{"credential":"00"}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/instances/vm-1/challenge",
            json,
            br#"{"x":1}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/instances/VM!/challenge",
            json,
            vec![],
            422,
            "invalid_request",
        ),
        (
            Method::PUT,
            "/v1/instances/vm-1",
            json,
            b"{".to_vec(),
            400,
            "malformed_json",
        ),
        (
            Method::PUT,
            "/v1/instances/vm-1",
            json,
            b"{}".to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::PUT,
            "/v1/instances/vm-1",
            json,
            format!(r#"{{"golden_pcrs":"00","nonce":"{nonce}","quote":"00"}}"#).into_bytes(),
            422,
            "invalid_request",
        ),
        (
            Method::PUT,
            "/v1/instances/vm-1",
            json,
            br#"{"golden_pcrs":"","nonce":"00","quote":""}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/instances/vm-1",
            json,
            vec![],
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/instances/VM!",
            json,
            vec![],
            422,
            "invalid_request",
        ),
        (
            Method::DELETE,
            "/v1/instances/vm-1",
            json,
            vec![],
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, content_type, body, status, code) in cases {
        let response = lab
            .http
            .request(method.clone(), lab.cms.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let got = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        assert_eq!(got, status, "{method} {path}: {}", text(&bytes));
        let (got_code, message) = error(&bytes);
        assert_eq!(got_code, code, "{method} {path}: {message}");
        assert!(!message.contains('\n'));
    }
    let Lab { pki, cms, .. } = lab;
    cms.stop();
    for prefix in ["enrolments/", "aks/", "instances/", "hosts/"] {
        assert!(keys_in(&pki, prefix).await.is_empty(), "{prefix}");
    }

    // Without --ek-ca the enrolment endpoints say so.
    let cms = Cms::start(&pki, &redb_url(&pki));
    let http = pki.client();
    let response = http
        .post(cms.url("/v1/enrolments"))
        .json(&json!({"kind": "host", "id": "h", "ek_certificate": "00", "ak_public": "00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (code, message) = error(&response.bytes().await.unwrap());
    assert_eq!(code, "enrolment_disabled");
    assert!(message.contains("--ek-ca"), "{message}");
    cms.stop();
}
