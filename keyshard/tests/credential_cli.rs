//! `keyshard credential keygen|put|map` (issue 9, items 3 and 5 from the client's side): the real
//! `keyshard` binary as the client of the real `keyshard cms` on loopback (redb), with six shard
//! hosts that each have their own swtpm (with EK certificates), enrol and register with real
//! TPM2_Certify output; and the client's failures a user meets: refusals, a foreign CA, a CMS
//! that is down or does not answer.

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

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::{Cms, Pki};
use hosts::{HOSTS, ShardHost};
use keyshard_cms::server::NonceResponse;
use keyshard_cms::server::hosts::HostRegistrationRequest;
use keyshard_cms::store::Nonce;
use reqwest::StatusCode;

const SECRET: &[u8] = b"postgres://app:s3cr3t-p4ssw0rd-0123456789@db.internal/prod";

/// Registers `host` in its lab domain over the CMS's API, as cms_credentials.rs does.
async fn register(client: &reqwest::Client, cms: &Cms, host: &ShardHost) {
    let response = client
        .post(cms.url("/v1/hosts/challenge"))
        .send()
        .await
        .unwrap();
    let nonce: NonceResponse = response.json().await.unwrap();
    let nonce = Nonce::from_hex(&nonce.nonce).unwrap();
    let (_, region, operator) = HOSTS
        .iter()
        .find(|(id, ..)| *id == host.id.as_str())
        .unwrap();
    let registration = host.registration(nonce, region, operator);
    let response = client
        .put(cms.url(&format!("/v1/hosts/{}", host.id.as_str())))
        .json(&HostRegistrationRequest::from_registration(&registration))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

/// `keyshard ARGS` with `stdin` fed in; its output.
fn keyshard(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyshard"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts exit 1 and one `keyshard:` line on stderr; returns that line.
fn failed_line(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("keyshard: "), "{stderr}");
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    lines[0].to_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The client's files: key pair, the CMS's public key, the credential.
struct ClientFiles {
    key: PathBuf,
    public: PathBuf,
    other_key: PathBuf,
    cms_key: PathBuf,
    secret: PathBuf,
}

impl ClientFiles {
    fn new(pki: &Pki) -> Self {
        let dir = pki.dir.path();
        let (key, other_key) = (dir.join("client.key"), dir.join("other.key"));
        for file in [&key, &other_key] {
            let out = keyshard(&["credential", "keygen", "--out", p(file)], b"");
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        let public = dir.join("client.key.pub");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&public).unwrap().trim().len(), 64);
        let signing = keyshard_core::keys::signing_key_from_pem(
            &std::fs::read_to_string(&pki.signing).unwrap(),
        )
        .unwrap();
        let cms_key = dir.join("cms-signing.pem.pub");
        std::fs::write(
            &cms_key,
            keyshard_core::keys::verifying_key_to_pem(&signing.verifying_key()).unwrap(),
        )
        .unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        Self {
            key,
            public,
            other_key,
            cms_key,
            secret,
        }
    }
}

fn put(cms: &str, ca: &Path, files: &ClientFiles, name: &str, k: &str, n: &str) -> Vec<String> {
    [
        "credential",
        "put",
        "--cms",
        cms,
        "--ca",
        p(ca),
        "--name",
        name,
        "--file",
        p(&files.secret),
        "--client-pub",
        p(&files.public),
        "--threshold",
        k,
        "--shares",
        n,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn map(cms: &str, ca: &Path, key: &Path, cms_key: &Path, name: &str) -> Vec<String> {
    [
        "credential",
        "map",
        "--cms",
        cms,
        "--ca",
        p(ca),
        "--name",
        name,
        "--client-key",
        p(key),
        "--cms-key",
        p(cms_key),
    ]
    .map(str::to_owned)
    .to_vec()
}

fn run(args: &[String]) -> Output {
    keyshard(&args.iter().map(String::as_str).collect::<Vec<_>>(), b"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_item5_put_and_map_through_the_cli() {
    let pki = Pki::new();
    let mut hosts: Vec<_> = HOSTS
        .iter()
        .map(|(id, ..)| ShardHost::start_with_ek_certificates(id, &pki.ek_ca_dir()))
        .collect();
    let cms = Cms::start_enrolling(
        &pki,
        &format!("redb:{}", pki.dir.path().join("cms.redb").display()),
    );
    let client = pki.client();
    for host in &mut hosts {
        let id = host.id.to_string();
        keyshard::cli::enrol::enrol(
            &pki.cms_client(&cms),
            keyshard_cms::enrolment::EnrolmentKind::Host,
            &id,
            host.tpm.get_mut().unwrap(),
        )
        .await
        .unwrap();
        register(&client, &cms, host).await;
    }
    let files = ClientFiles::new(&pki);
    let base = cms.url("");

    // put 3 of 4, the credential read from stdin: the summary names epoch, k, n, the hosts.
    let mut args = put(&base, &pki.ca, &files, "db", "3", "4");
    let file_at = args.iter().position(|a| a == "--file").unwrap() + 1;
    args[file_at] = "-".to_owned();
    let out = keyshard(&args.iter().map(String::as_str).collect::<Vec<_>>(), SECRET);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(
        summary.starts_with("credential db: epoch 1, 3 of 4 shares\n"),
        "{summary}"
    );
    let put_hosts: Vec<_> = summary
        .lines()
        .filter_map(|l| l.strip_prefix("  share "))
        .map(|l| l.split(": ").nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(put_hosts.len(), 4, "{summary}");
    assert!(summary.contains("correlated domains: none"), "{summary}");
    assert!(!summary.contains(std::str::from_utf8(SECRET).unwrap()));

    // map opens with the client's key and shows the same 4 hosts, their endpoints and epoch 1.
    let out = run(&map(&base, &pki.ca, &files.key, &files.cms_key, "db"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.starts_with("credential db: epoch 1, 3 of 4 shares\n"),
        "{shown}"
    );
    for (index, host) in put_hosts.iter().enumerate() {
        let line = format!(
            "  share {}: {host} at https://{host}.invalid:8443 (key ",
            index + 1
        );
        assert!(shown.contains(&line), "{line} not in\n{shown}");
    }
    // ...and as JSON.
    let mut json_args = map(&base, &pki.ca, &files.key, &files.cms_key, "db");
    json_args.push("--json".to_owned());
    let out = run(&json_args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (json["epoch"].as_u64(), json["k"].as_u64()),
        (Some(1), Some(3))
    );
    let json_hosts: Vec<_> = json["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["host"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(json_hosts, put_hosts);

    // Another client's key: the CMS does not hand the map out; one line naming the refusal.
    let line = failed_line(&run(&map(
        &base,
        &pki.ca,
        &files.other_key,
        &files.cms_key,
        "db",
    )));
    assert!(line.contains("forbidden"), "{line}");
    // A CMS that hands the client's sealed map to another key anyway: it does not open there.
    let public = std::fs::read_to_string(&files.public).unwrap();
    let sealed = client
        .get(cms.url(&format!("/v1/credentials/db/map?client={}", public.trim())))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (rogue, server) = canned_server(&pki, vec![answer("200 OK", &sealed, true)]);
    let line = failed_line(&run(&map(
        &rogue,
        &pki.ca,
        &files.other_key,
        &files.cms_key,
        "db",
    )));
    assert!(line.contains("does not open"), "{line}");
    server.join().unwrap();
    // A CMS key that is not the one that signed: the map is refused by the client.
    let wrong_cms = pki.dir.path().join("wrong-cms.pub");
    let wrong = keyshard_core::keys::generate().unwrap();
    std::fs::write(
        &wrong_cms,
        keyshard_core::keys::verifying_key_to_pem(&wrong.verifying_key()).unwrap(),
    )
    .unwrap();
    let line = failed_line(&run(&map(&base, &pki.ca, &files.key, &wrong_cms, "db")));
    assert!(line.contains("signature"), "{line}");

    // The same name again: exit 1 naming `exists`.
    let line = failed_line(&run(&put(&base, &pki.ca, &files, "db", "2", "3")));
    assert!(line.contains("exists"), "{line}");
    // 3 of 5 over two operators: refused naming the domain; allowed with --allow-correlated.
    let line = failed_line(&run(&put(&base, &pki.ca, &files, "db2", "3", "5")));
    assert!(
        line.contains("placement_refused") && line.contains("operator"),
        "{line}"
    );
    let mut allowed = put(&base, &pki.ca, &files, "db2", "3", "5");
    allowed.push("--allow-correlated".to_owned());
    let out = run(&allowed);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let correlated = text(&out.stdout);
    assert!(
        correlated
            .lines()
            .any(|l| l.starts_with("correlated domains: ") && l.contains("operator")),
        "{correlated}"
    );

    // A CA that is not the CMS's: a TLS error line, nothing sent.
    let foreign = Pki::new();
    let line = failed_line(&run(&put(&base, &foreign.ca, &files, "db3", "3", "4")));
    assert!(line.contains("TLS handshake"), "{line}");
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    let line = failed_line(&run(&map(
        &base,
        &foreign.ca,
        &files.key,
        &files.cms_key,
        "db",
    )));
    assert!(line.contains("TLS handshake"), "{line}");
    cms.stop();
    drop(hosts);
}

#[test]
fn item3_a_cms_that_is_down_or_silent_fails_within_the_timeout() {
    let pki = Pki::new();
    let files = ClientFiles::new(&pki);

    // Down: nothing listens on the port.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let down = format!("https://127.0.0.1:{port}");
    let start = Instant::now();
    let line = failed_line(&run(&put(&down, &pki.ca, &files, "db", "3", "4")));
    assert!(line.contains("cannot connect to the CMS"), "{line}");
    assert!(start.elapsed() < Duration::from_secs(5));

    // Silent: the kernel accepts the connection, nobody speaks TLS; --timeout 2 ends it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = format!("https://{}", listener.local_addr().unwrap());
    let mut args = map(&silent, &pki.ca, &files.key, &files.cms_key, "db");
    args.extend(["--timeout".to_owned(), "2".to_owned()]);
    let start = Instant::now();
    let line = failed_line(&run(&args));
    let took = start.elapsed();
    assert!(line.contains("within 2 s"), "{line}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    drop(listener);

    // Not a CMS URL: refused before any connection.
    let line = failed_line(&run(&put(
        "http://127.0.0.1:1",
        &pki.ca,
        &files,
        "db",
        "3",
        "4",
    )));
    assert!(line.contains("https://"), "{line}");
}

/// A TLS server on loopback with the CMS's certificate that answers each connection, in turn,
/// with the next canned HTTP response (head, then body bytes), whatever was asked.
fn canned_server(
    pki: &Pki,
    answers: Vec<(String, Vec<u8>)>,
) -> (String, std::thread::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::Read as _;
    let certs = CertificateDer::pem_slice_iter(&std::fs::read(&pki.cert).unwrap())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(&std::fs::read(&pki.key).unwrap()).unwrap();
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        for (head, body) in answers {
            let (tcp, _) = listener.accept().unwrap();
            let connection = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(connection, tcp);
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && request.len() < 64 * 1024 {
                if tls.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                request.push(byte[0]);
            }
            // The client may hang up once it has read enough: write errors end this answer.
            let _ = tls.write_all(head.as_bytes());
            for chunk in body.chunks(64 * 1024) {
                if tls.write_all(chunk).is_err() {
                    break;
                }
            }
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (url, thread)
}

fn answer(status: &str, body: &[u8], length: bool) -> (String, Vec<u8>) {
    let length = if length {
        format!("content-length: {}\r\n", body.len())
    } else {
        String::new()
    };
    (
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{length}connection: close\r\n\r\n"
        ),
        body.to_vec(),
    )
}

#[test]
fn item5_malformed_huge_or_hostile_answers_are_one_line_errors_not_panics() {
    let pki = Pki::new();
    let files = ClientFiles::new(&pki);
    let huge = vec![b' '; 8 * 1024 * 1024];
    let cases: Vec<((String, Vec<u8>), &str)> = vec![
        (
            answer("200 OK", b"not json", true),
            "not a valid map answer",
        ),
        (answer("200 OK", &huge, true), "larger than"),
        (answer("200 OK", &huge, false), "larger than"),
        (
            answer("409 Conflict", b"<html>busy</html>", true),
            "HTTP 409 without a readable error",
        ),
        (
            answer(
                "403 Forbidden",
                br#"{"error":{"code":"forbidden","message":"line one\nkeyshard: forged line"}}"#,
                true,
            ),
            "refused (403, forbidden): line one keyshard: forged line",
        ),
        (
            answer("200 OK", br#"{"name":"db","sealed_map":"S1NNUwE="}"#, true),
            "shard map",
        ),
        (
            answer("200 OK", br#"{"name":"db","sealed_map":"***"}"#, true),
            "sealed_map is not base64",
        ),
    ];
    let (url, server) = canned_server(&pki, cases.iter().map(|(a, _)| a.clone()).collect());
    for (_, expected) in &cases {
        let line = failed_line(&run(&map(&url, &pki.ca, &files.key, &files.cms_key, "db")));
        assert!(line.contains(expected), "{expected:?} not in {line}");
    }
    server.join().unwrap();
}
