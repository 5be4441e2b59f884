//! Issue 9 item 8 under QEMU (TCG): a volume key dealt vhd = 1, tpm = 1, host = 2, k = 3 by
//! `keyshard init --cms`, its two `host` shares placed through a real `keyshard cms` on two
//! real `keyshard shard-host` processes (each its own swtpm with EK certificates), the VM
//! enrolled as an instance against its own swtpm. The guest gets its `host` shares through the
//! broker relay of `keyshard coordinator --vm-tcti` and unlocks; with the shard hosts stopped it
//! stays locked and names them. `make e2e` runs these.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyshard_e2e::env::E2eEnv;
use keyshard_e2e::process::Daemon;
use keyshard_e2e::scenario::Scenario;
use keyshard_e2e::swtpm::{Swtpm, ek_ca_certificates};

const VM: &str = "vm1";
const POLICY: &str = "allow_host_reachable_quorum = true\nthreshold = 3\n\
                      [holders]\nvhd = 1\ntpm = 1\nhost = 2\n\
                      [tpm]\npcr_bank = \"sha256\"\npcrs = [0, 7]\n\
                      [host]\nevidence = \"vm-tpm\"\n";
const HOSTS: [(&str, &str); 2] = [
    ("shard-a", "region=eu,operator=acme"),
    ("shard-b", "region=us,operator=globex"),
];

fn ok<T>(result: keyshard_e2e::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// The CMS with its PKI, the shard hosts and the VM's TPM, in one directory.
struct Lab {
    dir: tempfile::TempDir,
    keyshard: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    cms_pub: PathBuf,
    cms_url: String,
    hosts: Vec<Daemon>,
    _host_tpms: Vec<Swtpm>,
    vm_tpm: Swtpm,
    _cms: Daemon,
}

impl Lab {
    fn start(env: &E2eEnv) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "keyshard e2e CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let (ca, cert, key) = (path("ca.pem"), path("tls.pem"), path("tls.key"));
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&cert, leaf.pem()).unwrap();
        std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
        let signing = keyshard_core::keys::generate().unwrap();
        let (signing_path, cms_pub) = (path("cms-signing.pem"), path("cms.pub"));
        std::fs::write(
            &signing_path,
            keyshard_core::keys::signing_key_to_pem(&signing).unwrap(),
        )
        .unwrap();
        std::fs::write(
            &cms_pub,
            keyshard_core::keys::verifying_key_to_pem(&signing.verifying_key()).unwrap(),
        )
        .unwrap();

        let ek_ca = path("ek-ca");
        let vm_tpm = ok(Swtpm::start_with_ek_certificates(&path("vm-tpm"), &ek_ca));
        let host_tpms: Vec<Swtpm> = HOSTS
            .iter()
            .map(|(id, _)| ok(Swtpm::start_with_ek_certificates(&path(id), &ek_ca)))
            .collect();
        let bundle: Vec<u8> = ek_ca_certificates(&ek_ca)
            .iter()
            .flat_map(|p| std::fs::read(p).unwrap())
            .collect();
        std::fs::write(path("ek-ca.pem"), bundle).unwrap();

        let cms = ok(Daemon::start(
            "keyshard cms",
            Command::new(&env.keyshard)
                .arg("cms")
                .arg("--listen=127.0.0.1:0")
                .arg(format!("--store=redb:{}", path("cms.redb").display()))
                .arg("--tls-cert")
                .arg(&cert)
                .arg("--tls-key")
                .arg(&key)
                .arg("--signing-key")
                .arg(&signing_path)
                .arg("--ek-ca")
                .arg(path("ek-ca.pem"))
                // Host admission is not what this test is about.
                .arg("--allow-any-host"),
            "ready: cms listening on https://",
            Duration::from_secs(30),
            &path("cms.log"),
        ));
        let addr = cms
            .ready_line()
            .strip_prefix("ready: cms listening on https://")
            .and_then(|rest| rest.split(' ').next())
            .unwrap()
            .to_owned();
        let mut lab = Self {
            keyshard: env.keyshard.clone(),
            ca,
            cert,
            key,
            cms_pub,
            cms_url: format!("https://{addr}"),
            hosts: Vec::new(),
            _host_tpms: Vec::new(),
            vm_tpm,
            _cms: cms,
            dir,
        };
        lab.hosts = HOSTS
            .iter()
            .zip(&host_tpms)
            .map(|((id, domain), tpm)| lab.start_host(id, domain, tpm))
            .collect();
        lab._host_tpms = host_tpms;
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_host(&self, id: &str, domain: &str, tpm: &Swtpm) -> Daemon {
        ok(Daemon::start(
            id,
            Command::new(&self.keyshard)
                .arg("shard-host")
                .arg("--cms")
                .arg(&self.cms_url)
                .arg("--ca")
                .arg(&self.ca)
                .arg("--cms-key")
                .arg(&self.cms_pub)
                .arg("--listen=127.0.0.1:0")
                .arg("--host-id")
                .arg(id)
                .arg("--domain")
                .arg(domain)
                .arg("--tcti")
                .arg(tpm.tcti())
                .arg("--state-dir")
                .arg(self.path(&format!("state-{id}")))
                .arg("--tls-cert")
                .arg(&self.cert)
                .arg("--tls-key")
                .arg(&self.key),
            "ready: shard host ",
            Duration::from_secs(60),
            &self.path(&format!("{id}.log")),
        ))
    }

    fn keyshard(&self, args: &[&str]) -> String {
        let output = Command::new(&self.keyshard).args(args).output().unwrap();
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "keyshard {args:?}: {out}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        out
    }

    /// Enrols the VM's TPM as instance vm1; the `init --cms` arguments that place the host
    /// shares for it.
    fn placing_args(&self) -> Vec<String> {
        let out = self.keyshard(&[
            "instance",
            "enroll",
            "--cms",
            &self.cms_url,
            "--ca",
            &self.ca.to_string_lossy(),
            "--instance-id",
            VM,
            "--tcti",
            &self.vm_tpm.tcti(),
            "--pcrs",
            "sha256:0,7",
        ]);
        let ak_name = out
            .split("ak name ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| panic!("{out}"));
        let instances = self.path("instances.json");
        std::fs::write(
            &instances,
            format!(r#"{{"instances": [{{"id": "{VM}", "ak_name": "{ak_name}"}}]}}"#),
        )
        .unwrap();
        let client = self.path("client.key");
        self.keyshard(&["credential", "keygen", "--out", &client.to_string_lossy()]);
        let path = |p: &Path| p.to_string_lossy().into_owned();
        vec![
            "--cms".into(),
            self.cms_url.clone(),
            "--ca".into(),
            path(&self.ca),
            "--client-pub".into(),
            path(&self.path("client.key.pub")),
            "--instance-policy".into(),
            path(&instances),
        ]
    }
}

#[test]
#[ignore = "needs QEMU, swtpm, tpm2-tools and built images; run by make e2e"]
fn item8_the_guest_unlocks_with_relayed_host_shares_and_names_its_stopped_shard_hosts() {
    let env = ok(E2eEnv::from_env());
    let mut lab = Lab::start(&env);
    let policy = lab.path("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let scenario = ok(Scenario::init_with_args(
        "host-relay",
        &policy.to_string_lossy(),
        &lab.placing_args(),
    ));
    assert_eq!(
        ok(scenario.manifest_holders()),
        ["vhd-1", "tpm-1", "host-1", "host-2"]
    );
    let daemons = ok(scenario.start_daemons());
    let sockets: Vec<PathBuf> = daemons.iter().map(|d| d.socket.clone()).collect();
    let coordinator = ok(scenario.start_coordinator_with(
        VM,
        &[
            "--vm-tcti".into(),
            lab.vm_tpm.tcti(),
            "--cms-deadline-ms=3000".into(),
            "--host-deadline-ms=2000".into(),
        ],
    ));

    // A guest that cannot take the tpm share would need both host shares; this one takes the
    // tpm share and one host share (k = 3 with the vhd fragment).
    let outcome = ok(scenario.boot(
        "host-relay-unlock",
        sockets.clone(),
        Some(coordinator.socket.clone()),
    ));
    let report = outcome.report();
    eprintln!(
        "host-relay-unlock: boot took {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
    assert!(
        outcome.console.has_marker("unlocked"),
        "the volume stayed locked\n{report}"
    );
    assert_eq!(
        outcome.console.volume_file().as_deref(),
        Some(scenario.volume_content.as_str()),
        "{report}"
    );
    let audit = ok(coordinator.audit());
    let releases: Vec<String> = keyshard_e2e::audit::releases(&audit)
        .iter()
        .map(|e| e.summary())
        .collect();
    assert!(
        releases.contains(&format!("{VM}: released host-1")),
        "{releases:?}\n{report}"
    );

    // The shard hosts stopped: locked, and the guest names both host holders' shard hosts.
    for host in &mut lab.hosts {
        host.stop().unwrap();
    }
    let outcome = ok(scenario.boot(
        "host-relay-stopped",
        sockets,
        Some(coordinator.socket.clone()),
    ));
    let report = outcome.report();
    eprintln!(
        "host-relay-stopped: boot took {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
    assert!(!outcome.console.has_marker("unlocked"), "{report}");
    assert!(
        !outcome.console.text().contains(&scenario.volume_content),
        "{report}"
    );
    let stderr = outcome.console.guest_stderr().unwrap_or_default();
    for holder in ["host-1", "host-2"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(holder) && l.contains("shard host shard-")),
            "keyshard-guest did not name {holder}'s shard host\n{report}"
        );
    }
}
