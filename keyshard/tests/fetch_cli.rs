//! `keyshard credential fetch` end to end (issue 9, item 6): the real `keyshard cms`, four
//! `keyshard shard-host` processes each on its own swtpm with EK certificates, and an instance
//! swtpm enrolled with `keyshard instance enroll`. A 3-of-4 credential is put and fetched; one
//! host is stopped and it is fetched again; one more and the fetch exits 2 naming both; a
//! replayed quote is refused by the CMS and by a host.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "common/cms.rs"]
#[allow(dead_code)]
mod harness;
#[path = "common/shard_lab.rs"]
mod shard_lab;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use keyshard_shards::instance::{self, FetchKey, InstanceEvidence};
use keyshard_tpm::{TpmConfig, TpmService};
use shard_lab::{LabFiles, ShardLab};

const SECRET: &[u8] = b"postgres://svc:fetched-through-three-hosts@db/prod";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keyshard"))
}

pub fn lab_files(pki: &harness::Pki) -> LabFiles {
    let signing_pub = pki.dir.path().join("cms-signing.pem.pub");
    let signing =
        keyshard_core::keys::signing_key_from_pem(&std::fs::read_to_string(&pki.signing).unwrap())
            .unwrap();
    std::fs::write(
        &signing_pub,
        keyshard_core::keys::verifying_key_to_pem(&signing.verifying_key()).unwrap(),
    )
    .unwrap();
    LabFiles {
        dir: pki.dir.path().to_owned(),
        ca: pki.ca.clone(),
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        signing: pki.signing.clone(),
        signing_pub,
    }
}

/// Exit code, stdout, stderr of `keyshard args`.
fn keyshard(args: &[String]) -> (i32, String, String) {
    let output = Command::new(bin()).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn item6_fetch_rebuilds_3_of_4_then_survives_one_host_down_and_exits_2_naming_two() {
    let pki = harness::Pki::new();
    let files = lab_files(&pki);
    let store = format!("redb:{}", pki.dir.path().join("cms.redb").display());
    let domains = [
        ("eu", "acme"),
        ("us", "globex"),
        ("ap", "initech"),
        ("sa", "umbrella"),
    ];
    let mut lab = ShardLab::start(bin(), &files, &store, &domains);
    let put = lab.put("db", SECRET, 3, 4);
    assert!(
        put.contains("credential db: epoch 1, 3 of 4 shares"),
        "{put}"
    );

    // All four up: the credential, in a new 0600 file, from exactly 3 hosts.
    let out = pki.dir.path().join("db.1");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("db", &out));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), SECRET);
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert_eq!(lines[4], "fetched db epoch 1 from 3 of 4 hosts");
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(": released")).count(),
        3,
        "{stdout}"
    );

    // An existing --out is refused before anything is asked, and left as it was.
    std::fs::write(&out, b"keep me").unwrap();
    let (code, _, stderr) = keyshard(&lab.fetch_args("db", &out));
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");

    // n - k = 1 host down: still fetched, and the stopped host is named.
    lab.stop_host("host-2");
    let out = pki.dir.path().join("db.2");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("db", &out));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), SECRET);
    assert!(
        stdout.contains("host host-2: failed: cannot connect"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("fetched db epoch 1 from 3 of 4 hosts\n"),
        "{stdout}"
    );

    // One more: exit 2, both named on stderr, no file.
    lab.stop_host("host-3");
    let out = pki.dir.path().join("db.3");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("db", &out));
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(!out.exists());
    assert!(
        stderr.contains("quorum not met: 2 of 4 hosts released, 3 needed"),
        "{stderr}"
    );
    for host in ["host-2 (cannot connect", "host-3 (cannot connect"] {
        assert!(stderr.contains(host), "{stderr} lacks {host}");
    }
    assert!(
        stdout.contains("host host-2: failed:") && stdout.contains("host host-3: failed:"),
        "{stdout}"
    );
}

/// A quote replayed to the CMS, and one replayed to a shard host, are refused: each nonce is
/// single use.
#[test]
fn item6_a_replayed_quote_is_refused_by_the_cms_and_by_a_host() {
    let pki = harness::Pki::new();
    let files = lab_files(&pki);
    let store = format!("redb:{}", pki.dir.path().join("cms.redb").display());
    let domains = [("eu", "acme"), ("us", "globex"), ("ap", "initech")];
    let lab = ShardLab::start(bin(), &files, &store, &domains);
    lab.put("db", SECRET, 2, 3);
    let tpm = TpmService::spawn(TpmConfig::new(lab.instance.tcti())).unwrap();
    let http = pki.client();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let post = |url: String, body: serde_json::Value| {
            let http = http.clone();
            async move {
                let answer = http.post(url).json(&body).send().await.unwrap();
                let status = answer.status().as_u16();
                (status, answer.json::<serde_json::Value>().await.unwrap())
            }
        };
        let key = FetchKey::generate().unwrap();
        let evidence = |nonce: &str| {
            let nonce: [u8; 32] = hex::decode(nonce).unwrap().try_into().unwrap();
            let selection = "sha256:0,7".parse().unwrap();
            let quote = tpm
                .quote(
                    &selection,
                    &instance::qualifying_data(&nonce, &key.public_key()),
                )
                .unwrap();
            let pcrs = tpm.read_pcrs(&selection).unwrap();
            hex::encode(InstanceEvidence::new(nonce, key.public_key(), quote, pcrs).to_bytes())
        };
        let cms = lab.cms_url();
        let (status, challenge) = post(
            format!("{cms}/v1/instances/vm-1/challenge"),
            serde_json::json!({}),
        )
        .await;
        assert_eq!(status, 200, "{challenge}");
        let body = serde_json::json!({
            "instance": "vm-1",
            "evidence": evidence(challenge["nonce"].as_str().unwrap()),
        });
        let (status, fetched) = post(format!("{cms}/v1/credentials/db/fetch"), body.clone()).await;
        assert_eq!(status, 200, "{fetched}");
        let (status, replayed) = post(format!("{cms}/v1/credentials/db/fetch"), body).await;
        assert_eq!(
            (status, replayed["error"]["code"].as_str()),
            (403, Some("nonce_refused")),
            "{replayed}"
        );

        let grant = &fetched["grants"][0];
        let endpoint = lab
            .hosts
            .iter()
            .find(|h| h.id == grant["host"].as_str().unwrap())
            .unwrap()
            .endpoint
            .clone();
        let (status, nonce) = post(format!("{endpoint}/v1/nonces"), serde_json::json!({})).await;
        assert_eq!(status, 200, "{nonce}");
        let release = serde_json::json!({
            "grant": grant["grant"],
            "sealed_shard": grant["sealed_shard"],
            "evidence": evidence(nonce["nonce"].as_str().unwrap()),
        });
        let (status, released) = post(format!("{endpoint}/v1/release"), release.clone()).await;
        assert_eq!(status, 200, "{released}");
        let (status, replayed) = post(format!("{endpoint}/v1/release"), release).await;
        assert_eq!(
            (status, replayed["error"]["code"].as_str()),
            (403, Some("nonce_refused")),
            "{replayed}"
        );
    });
}

/// The CMS's refusals end a fetch with exit 1 and one line naming the CMS's code: a credential
/// the instance is not admitted to (put without --instance-policy), and, once the instance's
/// PCR 7 changed, evidence that no longer matches its golden values (the PCR named). Nothing
/// is written.
#[test]
fn item6_a_fetch_the_cms_refuses_exits_1_naming_why() {
    let pki = harness::Pki::new();
    let files = lab_files(&pki);
    let store = format!("redb:{}", pki.dir.path().join("cms.redb").display());
    let domains = [("eu", "acme"), ("us", "globex")];
    let lab = ShardLab::start(bin(), &files, &store, &domains);
    lab.put("db", SECRET, 2, 2);
    let secret = pki.dir.path().join("other.secret");
    std::fs::write(&secret, b"not for instances").unwrap();
    shard_lab::run_ok(
        bin(),
        &[
            "credential",
            "put",
            "--cms",
            &lab.cms_url(),
            "--ca",
            files.ca.to_str().unwrap(),
            "--name",
            "other",
            "--file",
            secret.to_str().unwrap(),
            "--client-pub",
            lab.client_pub.to_str().unwrap(),
            "--threshold",
            "2",
            "--shares",
            "2",
        ],
    );

    let out = pki.dir.path().join("other.out");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("other", &out));
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("(403, forbidden)"), "{stderr}");
    assert!(!out.exists());

    // The admitted credential fetches, until PCR 7 changes.
    let out = pki.dir.path().join("db.out");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("db", &out));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    lab.instance.extend_pcr(7, &[0x5a; 32]).unwrap();
    let out = pki.dir.path().join("db.after-pcr7.out");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("db", &out));
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("(403, evidence_refused)") && stderr.contains("sha256:7"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// Review of issue 9: an instance whose PCR 7 changed is refused, and running `keyshard
/// instance enroll` again on it (its own TPM, a fresh nonce: nothing an attacker on the
/// instance lacks) must not make its changed state golden. It did: the re-registration was
/// taken (200) and the next fetch released the credential.
#[test]
fn review9_an_instance_whose_pcr_changed_cannot_re_enrol_its_way_to_a_fetch() {
    let pki = harness::Pki::new();
    let files = lab_files(&pki);
    let store = format!("redb:{}", pki.dir.path().join("cms.redb").display());
    let domains = [("eu", "acme"), ("us", "globex")];
    let lab = ShardLab::start(bin(), &files, &store, &domains);
    lab.put("db", SECRET, 2, 2);
    lab.instance.extend_pcr(7, &[0x5a; 32]).unwrap();
    let refused = pki.dir.path().join("db.refused.out");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("db", &refused));
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("(403, evidence_refused)"), "{stderr}");

    let enroll = |pcrs: &str| {
        keyshard(&[
            "instance".to_owned(),
            "enroll".to_owned(),
            "--cms".to_owned(),
            lab.cms_url(),
            "--ca".to_owned(),
            files.ca.to_str().unwrap().to_owned(),
            "--instance-id".to_owned(),
            lab.instance_id.clone(),
            "--tcti".to_owned(),
            lab.instance.tcti(),
            "--pcrs".to_owned(),
            pcrs.to_owned(),
        ])
    };
    // The changed values, and a selection without PCR 7: both refused in one line.
    for (pcrs, names) in [("sha256:0,7", "sha256:7 differs"), ("sha256:0", "sha256:0")] {
        let (code, stdout, stderr) = enroll(pcrs);
        assert_eq!(code, 1, "{pcrs}: {stdout}\n{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("(409, conflict)") && stderr.contains(names),
            "{pcrs}: {stderr}"
        );
    }
    let out = pki.dir.path().join("db.out");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("db", &out));
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("(403, evidence_refused)"), "{stderr}");
    assert!(!out.exists());
}

/// Review of issue 9: a shard host kept every nonce it issued (4,096 at most) behind one rate
/// limit for all callers, so one client asking for nonces in a loop (no grant, no TPM) made the
/// host answer 429 to the instance and the fetch failed there (exit 2, naming the host).
/// Nonces are now MAC'd and stored only once spent, after the grant: the fetch goes through
/// while the flood runs.
#[test]
fn review9_a_nonce_flood_at_a_host_does_not_stop_a_fetch() {
    let pki = harness::Pki::new();
    let files = lab_files(&pki);
    let store = format!("redb:{}", pki.dir.path().join("cms.redb").display());
    let domains = [("eu", "acme"), ("us", "globex")];
    let lab = ShardLab::start(bin(), &files, &store, &domains);
    lab.put("db", SECRET, 2, 2);
    let flood = pki.dir.path().join("flood.cfg");
    let url = format!(
        "url = \"{}/v1/nonces\"\noutput = \"/dev/null\"\n",
        lab.hosts[0].endpoint
    );
    std::fs::write(&flood, url.repeat(200_000)).unwrap();
    let mut curl = Command::new("curl")
        .args([
            "-s",
            "--parallel",
            "--parallel-max",
            "16",
            "-X",
            "POST",
            "--cacert",
        ])
        .arg(&files.ca)
        .arg("-K")
        .arg(&flood)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Long enough for the old book to fill (4,096 at 1,000 a second).
    std::thread::sleep(std::time::Duration::from_secs(6));
    let out = pki.dir.path().join("db.out");
    let (code, stdout, stderr) = keyshard(&lab.fetch_args("db", &out));
    let still_flooding = curl.try_wait().unwrap().is_none();
    let _ = curl.kill();
    let _ = curl.wait();
    assert!(still_flooding, "the flood ended before the fetch");
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), SECRET);
}
