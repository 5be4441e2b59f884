//! `keyshard cms` as a network service (issue 9, item 1): the real binary on loopback with a
//! certificate from a CA made per test, driven by real TLS clients (reqwest on rustls, and curl),
//! on a redb file and on a real etcd. Bad input of every kind gets a JSON error and changes
//! nothing; broken TLS (half a ClientHello, plain HTTP) costs one connection and nothing else.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "../../keyshard-cms/tests/common/etcd.rs"]
mod etcd;
#[allow(dead_code)]
#[path = "common/cms.rs"]
mod harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{Cms, Pki, curl};
use keyshard_cms::server::{ErrorBody, NonceResponse, StatusResponse};
use keyshard_cms::store::{Nonce, Repository, Store, StoreError};
use reqwest::StatusCode;

async fn status(pki: &Pki, cms: &Cms) -> StatusResponse {
    let response = pki
        .client()
        .get(cms.url("/v1/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    response.json().await.unwrap()
}

async fn issue_nonce(client: &reqwest::Client, cms: &Cms, body: Option<&str>) -> NonceResponse {
    let mut request = client.post(cms.url("/v1/nonces"));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: NonceResponse = response.json().await.unwrap();
    assert_eq!(answer.nonce.len(), 64, "{answer:?}");
    assert!(
        answer
            .nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{answer:?}"
    );
    answer
}

fn redb_url(pki: &Pki) -> (PathBuf, String) {
    let path = pki.dir.path().join("cms.redb");
    let url = format!("redb:{}", path.display());
    (path, url)
}

/// Nonces the redb file holds, read with redb itself from the table the store documents.
fn nonces_in(path: &Path) -> u64 {
    use redb::{ReadableTableMetadata, TableDefinition};
    const NONCES: TableDefinition<&[u8], u64> = TableDefinition::new("nonces");
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    txn.open_table(NONCES).unwrap().len().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_status_and_single_use_nonces_over_tls_on_redb() {
    let pki = Pki::new();
    let (path, url) = redb_url(&pki);
    let cms = Cms::start(&pki, &url);
    assert_eq!(
        status(&pki, &cms).await,
        StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store: "redb".to_owned(),
        }
    );
    let client = pki.client();
    let first = issue_nonce(&client, &cms, None).await;
    assert_eq!(first.expires_in_ms, 30_000);
    let second = issue_nonce(&client, &cms, Some(r#"{"ttl_ms": 5000}"#)).await;
    assert_eq!(second.expires_in_ms, 5000);
    assert_ne!(first.nonce, second.nonce);
    cms.stop();

    // The nonces went through the store: the file (released on SIGTERM) takes each once.
    let store = Store::open(&url).await.unwrap();
    for answer in [&first, &second] {
        let nonce = Nonce::from_hex(&answer.nonce).unwrap();
        store.nonce_take(&nonce).await.unwrap();
        assert!(matches!(
            store.nonce_take(&nonce).await,
            Err(StoreError::NonceUnknown)
        ));
    }
    drop(store);
    assert_eq!(nonces_in(&path), 0);
}

/// One bad request: what is sent, and the status and code expected back.
struct Bad {
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn bad(
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
) -> Bad {
    Bad {
        method,
        path,
        content_type,
        body: body.into(),
        status,
        code,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_bad_requests_get_json_errors_and_change_nothing() {
    let pki = Pki::new();
    let (path, url) = redb_url(&pki);
    let cms = Cms::start(&pki, &url);
    let client = pki.client();
    let json = Some("application/json");
    let mut oversized = br#"{"ttl_ms": 1"#.to_vec();
    oversized.resize(64 * 1024 + 1, b' ');
    oversized.push(b'}');
    let cases = [
        bad("GET", "/nope", None, "", 404, "not_found"),
        bad("GET", "/v1/nope", None, "", 404, "not_found"),
        bad("GET", "/v2/status", None, "", 404, "unsupported_version"),
        bad("POST", "/v0/nonces", json, "{}", 404, "unsupported_version"),
        bad("GET", "/v1/nonces", None, "", 405, "method_not_allowed"),
        bad("DELETE", "/v1/status", None, "", 405, "method_not_allowed"),
        bad("POST", "/v1/nonces", json, "{", 400, "malformed_json"),
        bad("POST", "/v1/nonces", json, "{}x", 400, "malformed_json"),
        bad(
            "POST",
            "/v1/nonces",
            json,
            [0xff, 0xfe],
            400,
            "malformed_json",
        ),
        bad(
            "POST",
            "/v1/nonces",
            json,
            r#"{"ttl_ms": "5"}"#,
            422,
            "invalid_request",
        ),
        bad(
            "POST",
            "/v1/nonces",
            json,
            r#"{"ttl_ms": -5}"#,
            422,
            "invalid_request",
        ),
        bad(
            "POST",
            "/v1/nonces",
            json,
            r#"{"ttl_ms": 1.5}"#,
            422,
            "invalid_request",
        ),
        bad(
            "POST",
            "/v1/nonces",
            json,
            r#"{"ttl": 5}"#,
            422,
            "invalid_request",
        ),
        bad(
            "POST",
            "/v1/nonces",
            json,
            r#"{"ttl_ms": 0}"#,
            422,
            "invalid_request",
        ),
        bad(
            "POST",
            "/v1/nonces",
            json,
            r#"{"ttl_ms": 30001}"#,
            422,
            "invalid_request",
        ),
        bad("POST", "/v1/nonces", json, "[5000]", 422, "invalid_request"),
        bad(
            "POST",
            "/v1/nonces",
            Some("text/plain"),
            "{}",
            415,
            "unsupported_media_type",
        ),
        bad(
            "POST",
            "/v1/nonces",
            None,
            "{}",
            415,
            "unsupported_media_type",
        ),
        bad("POST", "/v1/nonces", json, oversized, 413, "body_too_large"),
    ];
    for case in cases {
        let what = format!(
            "{} {} {:?} ({} bytes)",
            case.method,
            case.path,
            case.content_type,
            case.body.len()
        );
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
        let mut request = client.request(method, cms.url(case.path)).body(case.body);
        if let Some(content_type) = case.content_type {
            request = request.header("content-type", content_type);
        }
        let started = Instant::now();
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(response.status().as_u16(), case.status, "{what}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/json",
            "{what}"
        );
        let body: ErrorBody = response.json().await.unwrap();
        assert_eq!(body.error.code, case.code, "{what}: {body:?}");
        assert!(!body.error.message.is_empty(), "{what}");
        assert!(!body.error.message.contains('\n'), "{what}: {body:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{what}: slow");
    }
    // A head past the server's 16 KiB: hyper refuses it before any handler runs.
    let response = client
        .get(cms.url("/v1/status"))
        .header("x-padding", "a".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    // Still serving; and the one good request is the one nonce in the store.
    assert_eq!(status(&pki, &cms).await.store, "redb");
    issue_nonce(&client, &cms, Some("{}")).await;
    cms.stop();
    assert_eq!(nonces_in(&path), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_curl_reads_status_nonces_and_errors_and_needs_tls13() {
    let pki = Pki::new();
    let (_, url) = redb_url(&pki);
    let cms = Cms::start(&pki, &url);
    let ca = pki.ca.to_str().unwrap();
    let base = [
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        "--cacert",
        ca,
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let args = with(extra);
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let (code, out, err) = run(&[&cms.url("/v1/status")]);
    assert_eq!(code, 0, "{err}");
    let answer: StatusResponse = serde_json::from_str(&out).unwrap();
    assert_eq!(answer.store, "redb");

    let (code, out, err) = run(&["-X", "POST", &cms.url("/v1/nonces")]);
    assert_eq!(code, 0, "{err}");
    let nonce: NonceResponse = serde_json::from_str(&out).unwrap();
    assert_eq!(nonce.nonce.len(), 64);

    let (code, out, err) = run(&["--json", r#"{"ttl_ms": "x"}"#, &cms.url("/v1/nonces")]);
    assert_eq!(code, 0, "{err}");
    let error: ErrorBody = serde_json::from_str(&out).unwrap();
    assert_eq!(error.error.code, "invalid_request");

    let (code, out, err) = run(&["--write-out", "\n%{http_code}", &cms.url("/v2/status")]);
    assert_eq!(code, 0, "{err}");
    let (body, http_code) = out.rsplit_once('\n').unwrap();
    assert_eq!(http_code, "404");
    let error: ErrorBody = serde_json::from_str(body).unwrap();
    assert_eq!(error.error.code, "unsupported_version");

    // 8 MiB: refused on its Content-Length; curl asks `Expect: 100-continue` first and reads the
    // 413 without uploading it (reqwest, which does not ask, would see its upload cut off).
    let big = pki.dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 8 << 20]).unwrap();
    let (code, out, err) = run(&[
        "--header",
        "content-type: application/json",
        "--data-binary",
        &format!("@{}", big.display()),
        "--write-out",
        "\n%{http_code}",
        &cms.url("/v1/nonces"),
    ]);
    assert_eq!(code, 0, "{err}");
    let (body, http_code) = out.rsplit_once('\n').unwrap();
    assert_eq!(http_code, "413");
    let error: ErrorBody = serde_json::from_str(body).unwrap();
    assert_eq!(error.error.code, "body_too_large");

    // TLS 1.2 at most: refused in the handshake.
    let (code, out, _) = run(&["--tls-max", "1.2", &cms.url("/v1/status")]);
    assert_ne!(code, 0, "TLS 1.2 was accepted: {out}");
    // Plain HTTP to the TLS port: no HTTP answer.
    let plain = format!("http://{}/v1/status", cms.addr);
    let (code, out, _) = run(&[&plain]);
    assert_ne!(code, 0, "plain HTTP got an answer: {out}");
    // Without the CA: the certificate is not trusted.
    let (code, _, err) = curl(&["--silent", "--show-error", &cms.url("/v1/status")]);
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    let (code, _, err) = run(&[&cms.url("/v1/status")]);
    assert_eq!(code, 0, "no longer serving: {err}");
    cms.stop();
}

/// The first TLS record a real client sends: a rustls ClientHello.
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut connection =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    assert_eq!(hello.first(), Some(&0x16), "not a handshake record");
    hello
}

/// A TLS connection to `addr` that trusts `pki`'s CA, with the handshake done.
fn tls_stream(
    pki: &Pki,
    addr: SocketAddr,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.ca).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connection =
        rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, TcpStream::connect(addr).unwrap());
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

/// Whether the server closes `stream` (any read that is not a timeout) within `limit`.
fn closed_within(
    stream: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    limit: Duration,
) -> bool {
    stream.sock.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("an answer to half a request: {:?}", &buf[..n]),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Reads until the peer closes (Ok: what it sent) or `limit` passes (Err).
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(received),
            Err(_) => return Err(started.elapsed()),
        }
        if started.elapsed() > limit {
            return Err(started.elapsed());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_truncated_handshakes_heads_and_plain_http_leave_the_server_serving() {
    let pki = Pki::new();
    let (_, url) = redb_url(&pki);
    let cms = Cms::start(&pki, &url);
    let hello = client_hello();
    let half = &hello[..hello.len() / 2];

    // Half a ClientHello, then silence: the connection is held open...
    let mut stalled = TcpStream::connect(cms.addr).unwrap();
    stalled.write_all(half).unwrap();
    // ...half a ClientHello and a close, and a record header promising more than it sends.
    for bytes in [half, &[0x16, 0x03, 0x01, 0x40, 0x00, 0x01][..]] {
        let mut cut = TcpStream::connect(cms.addr).unwrap();
        cut.write_all(bytes).unwrap();
        drop(cut);
    }
    // A finished handshake and half a request head, then silence.
    let mut half_head = tls_stream(&pki, cms.addr);
    half_head
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    half_head.flush().unwrap();
    // None of them keeps others from being served.
    let started = Instant::now();
    assert_eq!(status(&pki, &cms).await.store, "redb");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Plain HTTP on the TLS port: never an HTTP answer, and the connection is closed.
    let mut plain = TcpStream::connect(cms.addr).unwrap();
    plain
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let answer = read_until_closed(&mut plain, Duration::from_secs(5)).expect("not closed");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // The stalled handshake is cut at the server's 10 s handshake deadline.
    let waited = started.elapsed();
    let closed = read_until_closed(&mut stalled, Duration::from_secs(14) - waited);
    assert!(
        closed.is_ok(),
        "half a ClientHello held its connection for 14 s"
    );
    assert!(started.elapsed() >= Duration::from_secs(9), "cut too early");
    // The half head is cut at the server's 10 s head deadline.
    let left = Duration::from_secs(14).saturating_sub(started.elapsed());
    assert!(
        closed_within(&mut half_head, left),
        "half a request head held its connection for 14 s"
    );

    assert_eq!(status(&pki, &cms).await.version, env!("CARGO_PKG_VERSION"));
    cms.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_status_and_single_use_nonces_on_etcd() {
    let etcd = etcd::EtcdServer::start().await;
    let pki = Pki::new();
    let cms = Cms::start(&pki, &etcd.store_url());
    assert_eq!(status(&pki, &cms).await.store, "etcd");
    let client = pki.client();
    let answer = issue_nonce(&client, &cms, Some(r#"{"ttl_ms": 20000}"#)).await;
    assert_eq!(answer.expires_in_ms, 20_000);
    // Another replica on the same etcd takes it once, while the server runs.
    let replica = Store::open(&etcd.store_url()).await.unwrap();
    let nonce = Nonce::from_hex(&answer.nonce).unwrap();
    replica.nonce_take(&nonce).await.unwrap();
    assert!(matches!(
        replica.nonce_take(&nonce).await,
        Err(StoreError::NonceUnknown)
    ));
    let response = client
        .post(cms.url("/v1/nonces"))
        .header("content-type", "application/json")
        .body(r#"{"ttl_ms": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    cms.stop();
}

#[test]
fn item1_unreadable_tls_files_stop_the_start_with_one_line() {
    let pki = Pki::new();
    let (_, url) = redb_url(&pki);
    let missing = pki.dir.path().join("missing.pem");
    for (cert, key, signing, says) in [
        (&missing, &pki.key, &pki.signing, "missing.pem"),
        (&pki.cert, &pki.cert, &pki.signing, "no usable private key"),
        (&pki.key, &pki.key, &pki.signing, "no CERTIFICATE block"),
        (&pki.cert, &pki.key, &missing, "missing.pem"),
        (&pki.cert, &pki.key, &pki.cert, "cms.pem"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_keyshard"))
            .args(["cms", "--listen=127.0.0.1:0", &format!("--store={url}")])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--signing-key")
            .arg(signing)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(output.stdout.is_empty());
    }
}
