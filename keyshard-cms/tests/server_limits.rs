//! The CMS server's connection cap and graceful stop (issue 9, item 1), in process: a server
//! bound on loopback with a self-signed certificate, tight limits, and raw rustls clients.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyshard_cms::server::{CmsServer, Limits, tls};
use keyshard_cms::store::Store;
use rustls::pki_types::CertificateDer;

fn client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The first bytes a real TLS client sends.
fn client_hello() -> Vec<u8> {
    let mut connection = rustls::ClientConnection::new(
        client_config(rustls::RootCertStore::empty()),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

/// `GET /v1/status` over a fresh TLS connection; the whole answer.
fn get_status(addr: SocketAddr, root: CertificateDer<'static>) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let connection =
        rustls::ClientConnection::new(client_config(roots), "127.0.0.1".try_into().unwrap())
            .unwrap();
    let mut stream = rustls::StreamOwned::new(connection, TcpStream::connect(addr).unwrap());
    stream
        .sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    // The server closes without close_notify after `Connection: close`: an EOF error ends it.
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_connections_over_the_cap_wait_for_a_slot_and_stop_is_graceful() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cms.pem"), dir.path().join("cms.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let root = certified.cert.der().clone();
    let store = Store::open(&format!("redb:{}", dir.path().join("s.redb").display()))
        .await
        .unwrap();
    let limits = Limits {
        max_connections: 1,
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = CmsServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        store,
        tls::server_config(&cert, &key).unwrap(),
        limits,
        ed25519_dalek::SigningKey::from_bytes(&[0x11; 32]),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));

    // The one slot is held by half a ClientHello...
    let hello = client_hello();
    let mut holder = TcpStream::connect(addr).unwrap();
    holder.write_all(&hello[..hello.len() / 2]).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a good request waits until the handshake deadline frees it, then is served.
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || get_status(addr, root))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""store":"redb""#), "{answer}");
    assert!(
        waited >= Duration::from_millis(600),
        "served at once: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");

    // Stopping: serve returns, and the port no longer accepts.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve did not return after the stop")
        .unwrap();
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
}
