//! The lab's TLS certificates: one CA made for the lab (rcgen, ECDSA P-256) and, signed by it,
//! a certificate per server (the CMS, each shard host) for 127.0.0.1 and localhost. The CA's
//! private key is never written: once the lab's certificates are issued it is dropped, so the
//! lab directory cannot mint more.

use std::fs;
use std::path::{Path, PathBuf};

use keyshard_core::files::{self, Overwrite};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::error::{LabError, Result, io_context};

/// A server's certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCertificate {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, mode 0600).
    pub key: PathBuf,
}

/// Writes the CA certificate to `ca_path` and, for each `(name, dir)`, `dir/tls.pem` and
/// `dir/tls.key` for a server called `name` at 127.0.0.1 and localhost.
pub fn issue(ca_path: &Path, servers: &[(&str, &Path)]) -> Result<Vec<ServerCertificate>> {
    let certificate = |e: rcgen::Error| LabError::Certificate(e.to_string());
    let ca_key = KeyPair::generate().map_err(certificate)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(certificate)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "keyshard lab CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(certificate)?;
    fs::write(ca_path, ca_cert.pem())
        .map_err(io_context(format!("writing {}", ca_path.display())))?;
    let issuer = Issuer::new(ca_params, ca_key);
    servers
        .iter()
        .map(|(name, dir)| {
            let key = KeyPair::generate().map_err(certificate)?;
            let mut params =
                CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                    .map_err(certificate)?;
            params
                .distinguished_name
                .push(DnType::CommonName, format!("keyshard lab {name}"));
            let cert = params.signed_by(&key, &issuer).map_err(certificate)?;
            files::create_private_dir(dir)?;
            let out = ServerCertificate {
                cert: dir.join("tls.pem"),
                key: dir.join("tls.key"),
            };
            fs::write(&out.cert, cert.pem())
                .map_err(io_context(format!("writing {}", out.cert.display())))?;
            files::write_private(&out.key, key.serialize_pem().as_bytes(), Overwrite::Refuse)?;
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn every_server_gets_its_own_key_and_a_certificate_for_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let ca = dir.path().join("ca.pem");
        let issued = issue(&ca, &[("cms", &a), ("host-1", &b)]).unwrap();
        assert_eq!(issued.len(), 2);
        assert!(
            fs::read_to_string(&ca)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        let keys: Vec<String> = issued
            .iter()
            .map(|s| fs::read_to_string(&s.key).unwrap())
            .collect();
        assert_ne!(keys[0], keys[1]);
        for server in &issued {
            let mode = fs::metadata(&server.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{}: {mode:o}", server.key.display());
        }
        // No CA private key is left anywhere in the directory.
        for entry in walk(dir.path()) {
            let text = fs::read_to_string(&entry).unwrap_or_default();
            if entry.ends_with("tls.key") {
                continue;
            }
            assert!(!text.contains("PRIVATE KEY"), "{}", entry.display());
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }
}
