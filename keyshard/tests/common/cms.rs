//! The `keyshard cms` harness of keyshard's CMS tests: a CA and server certificate made per test,
//! the CMS's signing key, a directory for the swtpm local CA that issues the test TPMs' EK
//! certificates (`--ek-ca`), the real binary on loopback, the CLI's own HTTPS client and
//! enrolment, and curl.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keyshard_e2e::process::Daemon;

pub const READY: &str = "ready: cms listening on https://";

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost, as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CMS's Ed25519 signing key, PEM, as `keyshard keygen` writes it.
    pub signing: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "keyshard test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "keyshard cms");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let (ca, cert, key) = (
            dir.path().join("ca.pem"),
            dir.path().join("cms.pem"),
            dir.path().join("cms.key"),
        );
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&cert, leaf.pem()).unwrap();
        std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
        let signing = dir.path().join("cms-signing.pem");
        let signing_key = keyshard_core::keys::generate().unwrap();
        std::fs::write(
            &signing,
            keyshard_core::keys::signing_key_to_pem(&signing_key)
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        Self {
            dir,
            ca,
            cert,
            key,
            signing,
        }
    }

    /// The directory of the swtpm local CA the test TPMs' EK certificates come from: created
    /// by the first TPM manufactured with it, shared by the others (one CA per test).
    pub fn ek_ca_dir(&self) -> PathBuf {
        self.dir.path().join("ek-ca")
    }

    /// The `--ek-ca` bundle (the local CA's root and issuer, PEM), written from the CA that the
    /// first TPM made with [`Pki::ek_ca_dir`] created.
    pub fn ek_bundle(&self) -> PathBuf {
        let pem: Vec<u8> = keyshard_e2e::swtpm::ek_ca_certificates(&self.ek_ca_dir())
            .iter()
            .flat_map(|path| {
                std::fs::read(path).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e} (start a TPM with EK certificates first)",
                        path.display()
                    )
                })
            })
            .collect();
        let bundle = self.dir.path().join("ek-ca.pem");
        std::fs::write(&bundle, pem).unwrap();
        bundle
    }

    /// The CLI's own CMS client (`keyshard::cli::cms_client`) for `cms`, trusting this CA.
    pub fn cms_client(&self, cms: &Cms) -> keyshard::cli::cms_client::CmsClient {
        keyshard::cli::cms_client::CmsClient::new(&keyshard::cli::credential::CmsConfig {
            base: cms.url(""),
            ca: self.ca.clone(),
            timeout: Duration::from_secs(20),
        })
        .unwrap()
    }

    /// A reqwest client that trusts this CA only.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap();
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }
}

/// A running `keyshard cms`; SIGTERM, then SIGKILL, when dropped.
pub struct Cms {
    pub daemon: Daemon,
    pub addr: SocketAddr,
}

impl Cms {
    /// A CMS on `store` without `--ek-ca`: enrolment is disabled.
    pub fn start(pki: &Pki, store: &str) -> Self {
        Self::start_with(pki, store, &[])
    }

    /// A CMS on `store` that enrols TPMs whose EK certificates chain to `pki`'s EK CA
    /// ([`Pki::ek_bundle`]: a TPM with EK certificates must have been made first), admitting
    /// any such host (`--allow-any-host`: these tests are not about host admission).
    pub fn start_enrolling(pki: &Pki, store: &str) -> Self {
        let bundle = pki.ek_bundle();
        Self::start_with(
            pki,
            store,
            &[
                "--ek-ca".as_ref(),
                bundle.as_os_str(),
                "--allow-any-host".as_ref(),
            ],
        )
    }

    /// A CMS on `store` with `extra` arguments.
    pub fn start_with(pki: &Pki, store: &str, extra: &[&std::ffi::OsStr]) -> Self {
        let log = pki.dir.path().join(format!(
            "cms-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = Command::new(env!("CARGO_BIN_EXE_keyshard"));
        command
            .env("RUST_LOG", "info")
            .arg("cms")
            .arg("--listen=127.0.0.1:0")
            .arg(format!("--store={store}"))
            .arg("--tls-cert")
            .arg(&pki.cert)
            .arg("--tls-key")
            .arg(&pki.key)
            .arg("--signing-key")
            .arg(&pki.signing)
            .args(extra);
        let daemon = Daemon::start("cms", &mut command, READY, Duration::from_secs(30), &log)
            .unwrap_or_else(|e| panic!("{e}"));
        let line = daemon.ready_line();
        assert!(line.ends_with(&format!("(store {store})")), "{line}");
        let addr = line
            .strip_prefix(READY)
            .and_then(|rest| rest.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        Self { daemon, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// SIGTERM; the server must exit 0 within the harness's grace period.
    pub fn stop(mut self) {
        let status = self.daemon.stop().unwrap();
        assert!(
            status.success(),
            "cms exited {status:?}; stderr:\n{}",
            self.daemon.stderr()
        );
    }
}

/// curl's exit code, stdout and stderr.
pub fn curl(args: &[&str]) -> (i32, String, String) {
    let output = match Command::new("curl").args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("curl is not installed: run `make deps`")
        }
        Err(e) => panic!("curl: {e}"),
    };
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
