//! The server's TLS configuration: a PEM certificate chain and private key, TLS 1.3 only, ALPN
//! `http/1.1`, rustls on the aws-lc-rs provider.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::{Result, ServerError};

/// The largest certificate or key file read, in bytes.
const MAX_PEM_LEN: u64 = 1024 * 1024;

/// Reads the chain (leaf first) from `cert` and its key (PKCS#8, PKCS#1 or SEC1 PEM) from
/// `key`, and builds a TLS 1.3-only server configuration that offers HTTP/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = read_chain(cert)?;
    let key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    let read_error = |source| ServerError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_PEM_LEN {
        return Err(ServerError::Pem {
            path: path.to_owned(),
            reason: format!("{len} bytes; a PEM file here is at most {MAX_PEM_LEN}"),
        });
    }
    std::fs::read(path).map_err(read_error)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Pem {
            path: path.to_owned(),
            reason: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(ServerError::Pem {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read_pem(path)?;
    // The key's bytes stay out of the message: rustls names only the PEM problem.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| ServerError::Pem {
        path: path.to_owned(),
        reason: format!("no usable private key: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_malformed_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem\n").unwrap();
        for (cert, key, says) in [
            (&missing, &garbage, "missing.pem"),
            (&garbage, &garbage, "no CERTIFICATE block"),
        ] {
            let err = server_config(cert, key).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
