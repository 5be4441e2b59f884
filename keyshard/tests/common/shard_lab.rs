//! A small loopback credential-service lab for the fetch test and the fetch benchmark: the real
//! `keyshard cms` (with `--ek-ca`), `keyshard shard-host` processes each on its own swtpm with
//! EK certificates, and an instance swtpm enrolled with `keyshard instance enroll`. Every
//! process is stopped when the lab is dropped. (`keyshard lab` is the full tool; this stays
//! small and starts only what a fetch needs.)

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyshard_e2e::process::Daemon;
use keyshard_e2e::swtpm::{Swtpm, ek_ca_certificates};

pub const CMS_READY: &str = "ready: cms listening on https://";
pub const HOST_READY: &str = "ready: shard host ";

/// The TLS and signing files of the lab: one CA, one 127.0.0.1 certificate the CMS and every
/// host serve, the CMS signing key (PEM) and its `.pub`.
#[derive(Debug, Clone)]
pub struct LabFiles {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub signing: PathBuf,
    pub signing_pub: PathBuf,
}

/// One shard host: its swtpm and its process.
pub struct LabHost {
    pub id: String,
    pub endpoint: String,
    pub daemon: Option<Daemon>,
    pub swtpm: Swtpm,
}

/// The lab.
pub struct ShardLab {
    pub bin: PathBuf,
    pub files: LabFiles,
    pub cms: Daemon,
    pub cms_addr: SocketAddr,
    pub hosts: Vec<LabHost>,
    pub instance_id: String,
    pub instance: Swtpm,
    /// The instance's AK name (hex) as `instance enroll` printed it.
    pub instance_ak_name: String,
    pub client_key: PathBuf,
    pub client_pub: PathBuf,
}

fn daemon(name: &str, command: &mut Command, ready: &str, log: &Path) -> Daemon {
    Daemon::start(name, command, ready, Duration::from_secs(60), log)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Runs `bin args`, panicking with its output unless it exits 0; returns stdout.
pub fn run_ok(bin: &Path, args: &[&str]) -> String {
    let output = Command::new(bin).args(args).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        output.status.success(),
        "keyshard {}: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        args.join(" "),
        output.status
    );
    stdout
}

impl ShardLab {
    /// Starts the CMS on `store`, `domains.len()` shard hosts (`host-1`...; domain
    /// `region=R,operator=O` each) and enrols the instance `vm-1`; writes a client key pair.
    pub fn start(bin: &Path, files: &LabFiles, store: &str, domains: &[(&str, &str)]) -> Self {
        let ek_ca = files.dir.join("ek-ca");
        // The EK CA is made by the first manufacture: the instance's TPM first.
        let instance = Swtpm::start_with_ek_certificates(&files.dir.join("tpm-instance"), &ek_ca)
            .unwrap_or_else(|e| panic!("instance swtpm: {e}"));
        let bundle = files.dir.join("ek-ca.pem");
        let mut pem = String::new();
        for cert in ek_ca_certificates(&ek_ca) {
            pem.push_str(&std::fs::read_to_string(cert).unwrap());
        }
        std::fs::write(&bundle, pem).unwrap();

        let mut command = Command::new(bin);
        command
            .env("RUST_LOG", "warn")
            .arg("cms")
            .arg("--listen=127.0.0.1:0")
            .arg(format!("--store={store}"))
            .arg("--tls-cert")
            .arg(&files.cert)
            .arg("--tls-key")
            .arg(&files.key)
            .arg("--signing-key")
            .arg(&files.signing)
            .arg("--ek-ca")
            .arg(&bundle)
            // Host admission is not what this harness tests.
            .arg("--allow-any-host");
        let cms = daemon("cms", &mut command, CMS_READY, &files.dir.join("cms.log"));
        let cms_addr: SocketAddr = cms
            .ready_line()
            .strip_prefix(CMS_READY)
            .and_then(|rest| rest.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        let cms_url = format!("https://{cms_addr}");

        let mut hosts = Vec::new();
        for (i, (region, operator)) in domains.iter().enumerate() {
            let id = format!("host-{}", i + 1);
            let swtpm =
                Swtpm::start_with_ek_certificates(&files.dir.join(format!("tpm-{id}")), &ek_ca)
                    .unwrap_or_else(|e| panic!("{id} swtpm: {e}"));
            let mut command = Command::new(bin);
            command
                .env("RUST_LOG", "warn")
                .arg("shard-host")
                .args(["--cms", &cms_url])
                .arg("--ca")
                .arg(&files.ca)
                .arg("--cms-key")
                .arg(&files.signing_pub)
                .args(["--listen", "127.0.0.1:0", "--host-id", &id])
                .args(["--domain", &format!("region={region},operator={operator}")])
                .args(["--tcti", &swtpm.tcti()])
                .arg("--state-dir")
                .arg(files.dir.join(format!("state-{id}")))
                .arg("--tls-cert")
                .arg(&files.cert)
                .arg("--tls-key")
                .arg(&files.key);
            let host = daemon(
                &id,
                &mut command,
                HOST_READY,
                &files.dir.join(format!("{id}.log")),
            );
            let endpoint = host.ready_line().rsplit(' ').next().unwrap().to_owned();
            hosts.push(LabHost {
                id,
                endpoint,
                daemon: Some(host),
                swtpm,
            });
        }

        let ca = files.ca.to_str().unwrap();
        let instance_id = "vm-1".to_owned();
        let enrolled = run_ok(
            bin,
            &[
                "instance",
                "enroll",
                "--cms",
                &cms_url,
                "--ca",
                ca,
                "--instance-id",
                &instance_id,
                "--tcti",
                &instance.tcti(),
                "--pcrs",
                "sha256:0,7",
            ],
        );
        let instance_ak_name = enrolled
            .split("ak name ")
            .nth(1)
            .and_then(|rest| rest.split([',', ' ', '\n']).next())
            .unwrap_or_else(|| panic!("instance enroll printed {enrolled:?}"))
            .to_owned();

        let client_key = files.dir.join("client.key");
        run_ok(
            bin,
            &[
                "credential",
                "keygen",
                "--out",
                client_key.to_str().unwrap(),
            ],
        );
        let client_pub = files.dir.join("client.key.pub");
        Self {
            bin: bin.to_owned(),
            files: files.clone(),
            cms,
            cms_addr,
            hosts,
            instance_id,
            instance,
            instance_ak_name,
            client_key,
            client_pub,
        }
    }

    pub fn cms_url(&self) -> String {
        format!("https://{}", self.cms_addr)
    }

    /// `credential put` of `secret` as `name`, k of n, fetchable by the lab's instance.
    pub fn put(&self, name: &str, secret: &[u8], k: u8, n: u8) -> String {
        let file = self.files.dir.join(format!("{name}.secret"));
        std::fs::write(&file, secret).unwrap();
        let policy = self.files.dir.join(format!("{name}.instances.json"));
        std::fs::write(
            &policy,
            serde_json::json!({"instances": [{"id": self.instance_id, "ak_name": self.instance_ak_name}]})
                .to_string(),
        )
        .unwrap();
        run_ok(
            &self.bin,
            &[
                "credential",
                "put",
                "--cms",
                &self.cms_url(),
                "--ca",
                self.files.ca.to_str().unwrap(),
                "--name",
                name,
                "--file",
                file.to_str().unwrap(),
                "--client-pub",
                self.client_pub.to_str().unwrap(),
                "--threshold",
                &k.to_string(),
                "--shares",
                &n.to_string(),
                "--instance-policy",
                policy.to_str().unwrap(),
            ],
        )
    }

    /// The arguments of `credential fetch` of `name` into `out`.
    pub fn fetch_args(&self, name: &str, out: &Path) -> Vec<String> {
        [
            "credential",
            "fetch",
            "--cms",
            &self.cms_url(),
            "--ca",
            self.files.ca.to_str().unwrap(),
            "--cms-key",
            self.files.signing_pub.to_str().unwrap(),
            "--name",
            name,
            "--instance-id",
            &self.instance_id,
            "--client-key",
            self.client_key.to_str().unwrap(),
            "--tcti",
            &self.instance.tcti(),
            "--out",
            out.to_str().unwrap(),
            "--host-deadline-ms",
            "3000",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Stops shard host `id`'s process (its swtpm keeps running).
    pub fn stop_host(&mut self, id: &str) {
        let host = self.hosts.iter_mut().find(|h| h.id == id).unwrap();
        if let Some(mut daemon) = host.daemon.take() {
            let _ = daemon.stop();
        }
    }
}
