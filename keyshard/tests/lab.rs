//! The lab and the harness on it (issue 9, item 9 and "what must be shown"): `keyshard lab up`
//! with the real binaries (six shard hosts in 3 regions x 2 operators, each its own swtpm and
//! process, a CMS on redb or on a real etcd, an instance TPM), then what a user does with it
//! through the `keyshard` commands, and `keyshard lab down`.
//!
//! Every lab is brought down when its test ends, pass or fail ([`LabRun`]'s drop).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use keyshard_lab::labfile::Lab;
use keyshard_lab::process::{self, Liveness, ProcessRecord, Stopped};

const KEYSHARD: &str = env!("CARGO_BIN_EXE_keyshard");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    )
}

fn keyshard(args: &[&str]) -> Output {
    Command::new(KEYSHARD)
        .args(args)
        .env("TSS2_LOG", "all+NONE")
        .output()
        .unwrap()
}

/// A lab brought up in a temporary directory; `keyshard lab down` when dropped.
struct LabRun {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    lab: Lab,
    up_stdout: String,
}

impl LabRun {
    fn up(store: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lab");
        let output = keyshard(&[
            "lab",
            "up",
            "--dir",
            dir.to_str().unwrap(),
            "--hosts",
            "6",
            "--store",
            store,
            "--bin",
            KEYSHARD,
        ]);
        if !output.status.success() {
            let logs = dir.join("logs");
            let mut tails = String::new();
            for entry in fs::read_dir(&logs).into_iter().flatten().flatten() {
                let body = fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = body.lines().rev().take(5).collect();
                tails.push_str(&format!("--- {}\n", entry.path().display()));
                for line in tail.into_iter().rev() {
                    tails.push_str(line);
                    tails.push('\n');
                }
            }
            panic!("lab up failed: {}\n{tails}", describe(&output));
        }
        let lab = Lab::read(&dir).unwrap();
        Self {
            _tmp: tmp,
            dir,
            lab,
            up_stdout: text(&output.stdout),
        }
    }

    fn dir(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    fn cms_args(&self) -> Vec<String> {
        vec![
            "--cms".to_owned(),
            self.lab.cms.url.clone(),
            "--ca".to_owned(),
            self.lab.ca_certificate.to_str().unwrap().to_owned(),
        ]
    }

    fn run(&self, args: &[String]) -> Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keyshard(&args)
    }

    /// `credential put NAME` of `secret`, k of n, fetchable by the lab's instance.
    fn put(&self, name: &str, secret: &[u8], k: u8, n: u8, extra: &[&str]) -> Output {
        let file = self.path(&format!("{name}.secret"));
        fs::write(&file, secret).unwrap();
        let mut args = vec!["credential".to_owned(), "put".to_owned()];
        args.extend(self.cms_args());
        args.extend(
            [
                "--name",
                name,
                "--file",
                &file,
                "--client-pub",
                self.lab.client.public_key.to_str().unwrap(),
                "--threshold",
                &k.to_string(),
                "--shares",
                &n.to_string(),
                "--instance-policy",
                self.lab.instance.policy.to_str().unwrap(),
            ]
            .map(str::to_owned),
        );
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        self.run(&args)
    }

    fn map(&self, name: &str, client_key: &Path) -> Output {
        let mut args = vec!["credential".to_owned(), "map".to_owned()];
        args.extend(self.cms_args());
        args.extend(
            [
                "--name",
                name,
                "--client-key",
                client_key.to_str().unwrap(),
                "--cms-key",
                self.lab.cms.signing_key_public.to_str().unwrap(),
            ]
            .map(str::to_owned),
        );
        self.run(&args)
    }

    fn fetch(&self, name: &str, out: &str) -> Output {
        let mut args = vec!["credential".to_owned(), "fetch".to_owned()];
        args.extend(self.cms_args());
        args.extend(
            [
                "--cms-key",
                self.lab.cms.signing_key_public.to_str().unwrap(),
                "--name",
                name,
                "--instance-id",
                &self.lab.instance.id,
                "--client-key",
                self.lab.client.private_key.to_str().unwrap(),
                "--tcti",
                &self.lab.instance.tcti,
                "--out",
                &self.path(out),
            ]
            .map(str::to_owned),
        );
        self.run(&args)
    }

    fn host(&self, id: &str) -> &keyshard_lab::labfile::Host {
        self.lab.hosts.iter().find(|h| h.id == id).unwrap()
    }

    /// Stops one shard host's process (SIGTERM), as an outage would.
    fn stop_host(&self, id: &str) {
        let outcome = process::stop(&[&self.host(id).process], Duration::from_secs(5)).unwrap();
        assert_eq!(outcome, [Stopped::Terminated], "{id}");
    }

    fn down(&self, extra: &[&str]) -> Output {
        let mut args = vec!["lab", "down", "--dir", self.dir()];
        args.extend_from_slice(extra);
        keyshard(&args)
    }
}

impl Drop for LabRun {
    fn drop(&mut self) {
        if self.dir.join("lab.json").exists() {
            let _ = self.down(&[]);
        }
    }
}

/// The share lines of `credential put`: (index, host).
fn placed_hosts(put_stdout: &str) -> Vec<String> {
    put_stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("share "))
        .filter_map(|rest| rest.split_once(": "))
        .map(|(_, host)| host.trim().to_owned())
        .collect()
}

fn alive(record: &ProcessRecord) -> bool {
    record.liveness() == Liveness::Ours
}

/// Item 9: six hosts in 3 regions x 2 operators, each its own swtpm and process that outlives
/// `lab up`; a second `up` on the running lab is refused; `down` stops every process and keeps
/// the data; `down --purge` removes it.
#[test]
fn item9_lab_up_starts_six_hosts_and_an_instance_and_down_stops_them() {
    let run = LabRun::up("redb");
    let lab = &run.lab;
    assert_eq!(lab.hosts.len(), 6);
    let mut domains: Vec<(String, String)> = lab
        .hosts
        .iter()
        .map(|h| (h.region.clone(), h.operator.clone()))
        .collect();
    domains.sort();
    domains.dedup();
    assert_eq!(
        domains.len(),
        6,
        "every region x operator pair once: {domains:?}"
    );
    let mut tctis: Vec<&str> = lab.hosts.iter().map(|h| h.tcti.as_str()).collect();
    tctis.push(&lab.instance.tcti);
    tctis.sort_unstable();
    tctis.dedup();
    assert_eq!(tctis.len(), 7, "each host and the instance its own TPM");
    let processes = lab.processes();
    assert_eq!(processes.len(), 6 + 1 + 6 + 1);
    for record in &processes {
        assert!(alive(record), "{} is not running after lab up", record.name);
        assert!(record.log.starts_with(run.dir.join("logs")), "{record:?}");
    }
    assert!(lab.store.starts_with("redb:"), "{}", lab.store);
    assert!(
        run.up_stdout.contains("credential put"),
        "{}",
        run.up_stdout
    );
    assert!(
        run.up_stdout.contains("lab down --dir"),
        "{}",
        run.up_stdout
    );
    let policy = fs::read_to_string(&lab.instance.policy).unwrap();
    assert!(policy.contains(&lab.instance.ak_name), "{policy}");
    // No key the lab made is readable by others.
    for key in [
        &lab.client.private_key,
        &lab.hosts[0].state_dir.with_file_name("tls.key"),
    ] {
        let mode = fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{}: {mode:o}", key.display());
    }

    // Closed host admission: the CMS runs with `--hosts`, a list of exactly the lab's hosts in
    // their domains (each then registers as listed: the put below places on them).
    let cmdline = fs::read(format!("/proc/{}/cmdline", lab.cms.process.pid)).unwrap();
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(text).collect();
    let listed = run.dir.join(keyshard_lab::up::ADMITTED_HOSTS_FILE);
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--hosts" && Path::new(&w[1]) == listed),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|arg| arg == "--allow-any-host"),
        "{args:?}"
    );
    let admitted: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&listed).unwrap()).unwrap();
    let mut entries: Vec<(String, String, String)> = admitted["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            assert_eq!(h["max_weight"], 1, "{h}");
            let field = |name: &str| h[name].as_str().unwrap().to_owned();
            (field("id"), field("region"), field("operator"))
        })
        .collect();
    let mut hosts: Vec<(String, String, String)> = lab
        .hosts
        .iter()
        .map(|h| (h.id.clone(), h.region.clone(), h.operator.clone()))
        .collect();
    entries.sort();
    hosts.sort();
    assert_eq!(entries, hosts);
    assert!(
        run.up_stdout
            .contains(keyshard_lab::up::ADMITTED_HOSTS_FILE),
        "{}",
        run.up_stdout
    );

    // The map the CMS serves names only the lab's hosts, each at its lab endpoint.
    let put = run.put("lab-check", b"lab secret", 3, 4, &[]);
    assert!(put.status.success(), "{}", describe(&put));
    let map = run.map("lab-check", &lab.client.private_key);
    assert!(map.status.success(), "{}", describe(&map));
    let map_text = text(&map.stdout);
    for host in placed_hosts(&text(&put.stdout)) {
        let endpoint = &run.host(&host).endpoint;
        assert!(
            map_text.contains(&format!("{host} at {endpoint}")),
            "{map_text}"
        );
    }

    // A second lab on the running one is refused, and changes nothing.
    let again = keyshard(&["lab", "up", "--dir", run.dir(), "--bin", KEYSHARD]);
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));
    assert!(
        text(&again.stderr).contains("a lab is running"),
        "{}",
        describe(&again)
    );
    assert_eq!(Lab::read(&run.dir).unwrap(), run.lab);
    assert!(processes.iter().all(|r| alive(r)));

    let down = run.down(&[]);
    assert!(down.status.success(), "{}", describe(&down));
    for record in &processes {
        assert!(!alive(record), "{} survived lab down", record.name);
        assert!(
            text(&down.stdout).contains(&format!("stopped {} (pid {})", record.name, record.pid)),
            "{}",
            describe(&down)
        );
    }
    assert!(run.dir.join("lab.json").exists() && run.dir.join("cms/cms.redb").exists());
    // Down again: nothing runs, nothing is signalled.
    let twice = run.down(&[]);
    assert!(twice.status.success(), "{}", describe(&twice));
    assert!(
        text(&twice.stdout).contains("host-1 (pid"),
        "{}",
        describe(&twice)
    );
    assert!(
        !text(&twice.stdout).contains("stopped"),
        "{}",
        describe(&twice)
    );
    // A stopped lab's directory is not reused by up.
    let reuse = keyshard(&["lab", "up", "--dir", run.dir(), "--bin", KEYSHARD]);
    assert_eq!(reuse.status.code(), Some(1), "{}", describe(&reuse));
    assert!(
        text(&reuse.stderr).contains("not empty"),
        "{}",
        describe(&reuse)
    );
    let purge = run.down(&["--purge"]);
    assert!(purge.status.success(), "{}", describe(&purge));
    assert!(!run.dir.exists());
}

/// Item 9: a `lab up` that fails half-way stops every process it started. Here every shard host
/// exits at once (a `--bin` wrapper refuses `shard-host`), after the swtpms and the CMS are up.
#[test]
fn item9_a_failed_lab_up_stops_what_it_started() {
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = tmp.path().join("keyshard");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = shard-host ]; then echo 'shard-host: refused by the test' >&2; exit 3; fi\nexec {KEYSHARD} \"$@\"\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("lab");
    let output = keyshard(&[
        "lab",
        "up",
        "--dir",
        dir.to_str().unwrap(),
        "--bin",
        wrapper.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("host-"), "{stderr}");
    assert!(stderr.contains("refused by the test"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!dir.join("lab.json").exists() && !dir.join("lab.starting.json").exists());
    // The CMS and every swtpm ran (their logs say so) and none runs now.
    assert!(dir.join("logs/cms.log").exists() && dir.join("logs/swtpm-host-6.log").exists());
    let survivors = processes_naming(&dir);
    assert!(survivors.is_empty(), "still running: {survivors:?}");
}

/// `lab up` in a new directory with shard hosts that never get ready (a `--bin` wrapper runs a
/// loop for `shard-host`), returned once the six hosts have started: the CMS, seven swtpms and
/// six hosts run then.
fn lab_up_stuck_on_hosts(tmp: &Path) -> (std::process::Child, PathBuf) {
    let wrapper = tmp.join("keyshard");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = shard-host ]; then while :; do sleep 1; done; fi\nexec {KEYSHARD} \"$@\"\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.join("lab");
    let mut child = Command::new(KEYSHARD)
        .args(["lab", "up", "--dir", dir.to_str().unwrap(), "--bin"])
        .arg(&wrapper)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !dir.join("logs/host-6.log").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the hosts never started"
        );
        assert!(child.try_wait().unwrap().is_none(), "lab up ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Six hosts, seven swtpms, the CMS.
    assert!(processes_naming(&dir).len() >= 14);
    (child, dir)
}

/// Item 9: SIGINT to `lab up` while it waits for the shard hosts stops everything it started,
/// and it says it was interrupted.
#[test]
fn item9_an_interrupted_lab_up_stops_what_it_started() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, dir) = lab_up_stuck_on_hosts(tmp.path());
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("interrupted"),
        "{}",
        describe(&output)
    );
    let survivors = processes_naming(&dir);
    assert!(survivors.is_empty(), "still running: {survivors:?}");
    assert!(!dir.join("lab.starting.json").exists());
}

/// Item 9: `lab up` killed outright (SIGKILL: it cannot stop anything) leaves its journal of
/// what it started; a second `up` there is refused, and `lab down` stops all of it.
#[test]
fn item9_lab_down_stops_what_a_killed_lab_up_started() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, dir) = lab_up_stuck_on_hosts(tmp.path());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dir.join("lab.json").exists());
    assert!(
        processes_naming(&dir).len() >= 14,
        "the killed up's processes run on"
    );
    let again = keyshard(&[
        "lab",
        "up",
        "--dir",
        dir.to_str().unwrap(),
        "--bin",
        KEYSHARD,
    ]);
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));
    assert!(
        text(&again.stderr).contains("a lab is running"),
        "{}",
        describe(&again)
    );
    let down = keyshard(&["lab", "down", "--dir", dir.to_str().unwrap()]);
    assert!(down.status.success(), "{}", describe(&down));
    assert!(
        text(&down.stdout).contains("stopped cms"),
        "{}",
        describe(&down)
    );
    let survivors = processes_naming(&dir);
    assert!(survivors.is_empty(), "still running: {survivors:?}");
    assert!(!dir.join("lab.starting.json").exists());
}

/// Item 9: `lab up` whose stdout is closed (`lab up | head -1`) still brings the whole lab up
/// and records it, rather than dying half-way with its processes running and no lab.json.
#[test]
fn item9_lab_up_with_a_closed_stdout_comes_up_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(KEYSHARD)
        .args([
            "lab",
            "up",
            "--dir",
            dir.to_str().unwrap(),
            "--bin",
            KEYSHARD,
        ])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let lab = Lab::read(&dir).unwrap_or_else(|e| panic!("{e}: {}", describe(&output)));
    // The summary could not be printed: that is the one error.
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("stdout"),
        "{}",
        describe(&output)
    );
    assert!(lab.processes().iter().all(|r| alive(r)), "{lab:?}");
    let down = keyshard(&["lab", "down", "--dir", dir.to_str().unwrap(), "--purge"]);
    assert!(down.status.success(), "{}", describe(&down));
    assert!(lab.processes().iter().all(|r| !alive(r)));
}

/// Every process on this machine with `dir` on its command line.
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.to_str().unwrap().as_bytes().to_vec();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let zombie = fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            });
            (!zombie
                && cmdline
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice()))
            .then(|| format!("{pid}: {}", text(&cmdline).replace('\0', " ")))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The harness: what must be shown, on redb and on etcd.
// ---------------------------------------------------------------------------------------------

use base64::Engine as _;
use keyshard_attest::tpm::PcrSelection;
use keyshard_core::policy::PcrBank;
use keyshard_shards::HostId;
use keyshard_shards::ecies::ShardBinding;
use keyshard_shards::instance::{self, FetchKey, InstanceEvidence, ReleasedShard};
use keyshard_tpm::Tpm;
use serde_json::{Value, json};

/// The test acting as the instance over HTTPS, step by step (what `credential fetch` does in
/// one go), so that it can replay, copy and look at what travels.
struct Direct {
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    tcti: String,
    instance: String,
    cms: String,
}

/// A CMS answer to a fetch: the grants, one per shard.
struct Grants {
    key: FetchKey,
    grants: Vec<Value>,
}

impl Direct {
    fn new(run: &LabRun) -> Self {
        let ca =
            reqwest::Certificate::from_pem(&fs::read(&run.lab.ca_certificate).unwrap()).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self {
            http,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            tcti: run.lab.instance.tcti.clone(),
            instance: run.lab.instance.id.clone(),
            cms: run.lab.cms.url.clone(),
        }
    }

    /// POSTs `body` as JSON: the status and the answer's JSON.
    fn post(&self, url: &str, body: &Value) -> (u16, Value) {
        self.runtime.block_on(async {
            let response = self.http.post(url).json(body).send().await.unwrap();
            let status = response.status().as_u16();
            let bytes = response.bytes().await.unwrap();
            let value =
                serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(text(&bytes)));
            (status, value)
        })
    }

    /// Evidence over `selection` answering `nonce` and binding `key`, from the instance's TPM.
    fn evidence(&self, nonce: [u8; 32], key: &FetchKey, selection: &PcrSelection) -> String {
        let mut tpm = Tpm::open(&self.tcti).unwrap();
        let qualifying = instance::qualifying_data(&nonce, &key.public_key());
        let quote = tpm.quote(selection, &qualifying).unwrap();
        let pcrs = tpm.read_pcrs(selection).unwrap();
        hex::encode(InstanceEvidence::new(nonce, key.public_key(), quote, pcrs).to_bytes())
    }

    /// The CMS's challenge: its nonce and the PCR selection it wants.
    fn challenge(&self) -> ([u8; 32], PcrSelection) {
        let (status, answer) = self.post(
            &format!("{}/v1/instances/{}/challenge", self.cms, self.instance),
            &json!({}),
        );
        assert_eq!(status, 200, "{answer}");
        (
            nonce_of(&answer),
            selection(answer["pcrs"].as_str().unwrap()),
        )
    }

    /// The fetch body for `name` with fresh evidence.
    fn fetch_body(&self, key: &FetchKey) -> Value {
        let (nonce, selection) = self.challenge();
        json!({"instance": self.instance, "evidence": self.evidence(nonce, key, &selection)})
    }

    fn fetch_url(&self, name: &str) -> String {
        format!("{}/v1/credentials/{name}/fetch", self.cms)
    }

    /// A fetch answered by the CMS.
    fn grants(&self, name: &str) -> Grants {
        let key = FetchKey::generate().unwrap();
        let body = self.fetch_body(&key);
        let (status, answer) = self.post(&self.fetch_url(name), &body);
        assert_eq!(status, 200, "{answer}");
        Grants {
            key,
            grants: answer["grants"].as_array().unwrap().clone(),
        }
    }

    /// Asks the shard host at `endpoint` to release `grant` (its sealed shard and grant, as the
    /// CMS sent them): the status, the answer, and the body sent.
    fn release(&self, endpoint: &str, grant: &Value, key: &FetchKey) -> (u16, Value, Value) {
        let (status, answer) = self.post(&format!("{endpoint}/v1/nonces"), &json!({}));
        assert_eq!(status, 200, "{answer}");
        // A host checks the PCRs the instance registered: the CMS's selection.
        let (_, selection) = self.challenge();
        let body = json!({
            "grant": grant["grant"],
            "sealed_shard": grant["sealed_shard"],
            "evidence": self.evidence(nonce_of(&answer), key, &selection),
        });
        let (status, answer) = self.post(&format!("{endpoint}/v1/release"), &body);
        (status, answer, body)
    }
}

fn nonce_of(answer: &Value) -> [u8; 32] {
    let mut nonce = [0u8; 32];
    hex::decode_to_slice(answer["nonce"].as_str().unwrap(), &mut nonce).unwrap();
    nonce
}

/// "sha256:0,7" as a selection.
fn selection(text: &str) -> PcrSelection {
    let indices: Vec<u8> = text
        .strip_prefix("sha256:")
        .unwrap()
        .split(',')
        .map(|i| i.parse().unwrap())
        .collect();
    PcrSelection::new(PcrBank::Sha256, &indices).unwrap()
}

fn error_code(answer: &Value) -> &str {
    answer["error"]["code"]
        .as_str()
        .unwrap_or("(no error code)")
}

/// Every encoding a store might keep bytes in: raw, hex, base64.
fn encodings(bytes: &[u8]) -> [Vec<u8>; 3] {
    [
        bytes.to_vec(),
        hex::encode(bytes).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(bytes)
            .into_bytes(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// What must be shown, on one store: put, map, fetch; n - k hosts down and fetch again; one
/// more down and exit 2 naming them; a changed PCR refused by the CMS and by a host asked
/// directly; a replayed quote refused; the map closed to another client key; a shard copied
/// to another host refused there; no plaintext share in the store.
fn harness(store: &str) {
    let run = LabRun::up(store);
    let secret = {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).unwrap();
        format!("lab-secret-{}", hex::encode(bytes)).into_bytes()
    };

    // Six hosts in two operators cannot spread 3 of 5 (one operator holds 3): refused without
    // --allow-correlated. The harness uses 3 of 4, which spreads.
    let correlated = run.put("wide", &secret, 3, 5, &[]);
    assert_eq!(
        correlated.status.code(),
        Some(1),
        "{}",
        describe(&correlated)
    );
    let put = run.put("demo", &secret, 3, 4, &[]);
    assert!(put.status.success(), "{}", describe(&put));
    assert!(
        text(&put.stdout).contains("correlated domains: none"),
        "{}",
        describe(&put)
    );
    let placed = placed_hosts(&text(&put.stdout));
    assert_eq!(placed.len(), 4, "{}", describe(&put));

    // The map opens with the client's key, and not with another.
    let map = run.map("demo", &run.lab.client.private_key);
    assert!(map.status.success(), "{}", describe(&map));
    assert!(
        text(&map.stdout).contains("3 of 4 shares"),
        "{}",
        describe(&map)
    );
    let other = run.dir.join("other.key");
    let keygen = keyshard(&["credential", "keygen", "--out", other.to_str().unwrap()]);
    assert!(keygen.status.success(), "{}", describe(&keygen));
    let foreign = run.map("demo", &other);
    assert_eq!(foreign.status.code(), Some(1), "{}", describe(&foreign));
    assert!(foreign.stdout.is_empty(), "{}", describe(&foreign));

    // Fetch, as the instance.
    let fetched = run.fetch("demo", "demo.1");
    assert!(fetched.status.success(), "{}", describe(&fetched));
    assert_eq!(fs::read(run.path("demo.1")).unwrap(), secret);
    assert!(
        text(&fetched.stdout).contains("fetched demo epoch 1"),
        "{}",
        describe(&fetched)
    );

    // Step by step: a replayed fetch is refused by the CMS; every host releases its shard to a
    // fresh quote, and refuses the same release replayed, and a shard copied from another host.
    let direct = Direct::new(&run);
    let key = FetchKey::generate().unwrap();
    let body = direct.fetch_body(&key);
    let (status, answer) = direct.post(&direct.fetch_url("demo"), &body);
    assert_eq!(status, 200, "{answer}");
    let (status, replayed) = direct.post(&direct.fetch_url("demo"), &body);
    assert_eq!(
        (status, error_code(&replayed)),
        (403, "nonce_refused"),
        "{replayed}"
    );
    let grants = answer["grants"].as_array().unwrap().clone();
    assert_eq!(grants.len(), 4);
    let cms_key = keyshard_core::keys::verifying_key_from_pem(
        &fs::read_to_string(&run.lab.cms.signing_key_public).unwrap(),
    )
    .unwrap();
    let mut shares: Vec<Vec<u8>> = Vec::new();
    for grant in &grants {
        let host = grant["host"].as_str().unwrap();
        let endpoint = &run.host(host).endpoint;
        let (status, answer, body) = direct.release(endpoint, grant, &key);
        assert_eq!(status, 200, "{host}: {answer}");
        let released =
            ReleasedShard::from_bytes(&hex::decode(answer["released"].as_str().unwrap()).unwrap())
                .unwrap();
        let binding = ShardBinding {
            credential: keyshard_core::KeyId::new("demo").unwrap(),
            epoch: 1,
            index: u8::try_from(grant["index"].as_u64().unwrap()).unwrap(),
            host: HostId::new(host).unwrap(),
        };
        let fragment = key.open(&released, &binding).unwrap();
        let verified = keyshard_core::fragment::Fragment::parse(&fragment)
            .unwrap()
            .verify(&cms_key)
            .unwrap();
        shares.push(verified.share().value().to_vec());
        shares.push(fragment.to_vec());
        let (status, replayed) = direct.post(&format!("{endpoint}/v1/release"), &body);
        assert_eq!(
            (status, error_code(&replayed)),
            (403, "nonce_refused"),
            "{host}: {replayed}"
        );
    }
    // Host A's sealed shard and grant, sent to host B.
    let (a, b) = (&grants[0], &grants[1]);
    let b_endpoint = &run.host(b["host"].as_str().unwrap()).endpoint;
    let (status, copied, _) = direct.release(b_endpoint, a, &key);
    assert_eq!(
        (status, error_code(&copied)),
        (403, "grant_refused"),
        "{copied}"
    );
    // Host A's sealed shard under host B's own grant.
    let mixed = json!({"grant": b["grant"], "sealed_shard": a["sealed_shard"]});
    let (status, copied, _) = direct.release(b_endpoint, &mixed, &key);
    assert_eq!(
        (status, error_code(&copied)),
        (403, "grant_refused"),
        "{copied}"
    );

    // n - k = 1 host down: the fetch still rebuilds; one more: exit 2, naming both.
    run.stop_host(&placed[0]);
    let fetched = run.fetch("demo", "demo.2");
    assert!(fetched.status.success(), "{}", describe(&fetched));
    assert_eq!(fs::read(run.path("demo.2")).unwrap(), secret);
    run.stop_host(&placed[1]);
    let quorum = run.fetch("demo", "demo.3");
    assert_eq!(quorum.status.code(), Some(2), "{}", describe(&quorum));
    let said = format!("{}{}", text(&quorum.stdout), text(&quorum.stderr));
    for host in &placed[..2] {
        assert!(
            said.contains(&format!("host {host}: failed")),
            "{host}: {said}"
        );
    }
    assert!(!run.dir.join("demo.3").exists());

    // A changed PCR: grants taken before, the instance's PCR 7 extended; the CMS refuses the
    // fetch and a live host asked directly refuses the release, both naming PCR 7.
    let live = &placed[2];
    let before = direct.grants("demo");
    let live_grant = before
        .grants
        .iter()
        .find(|g| g["host"].as_str() == Some(live.as_str()))
        .unwrap()
        .clone();
    let extend = Command::new("tpm2_pcrextend")
        .arg(format!("7:sha256={}", "5a".repeat(32)))
        .env("TPM2TOOLS_TCTI", &run.lab.instance.tcti)
        .output()
        .unwrap();
    assert!(extend.status.success(), "{}", describe(&extend));
    let refused = run.fetch("demo", "demo.4");
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("evidence_refused") && stderr.contains("sha256:7"),
        "{stderr}"
    );
    let (status, answer, _) = direct.release(&run.host(live).endpoint, &live_grant, &before.key);
    assert_eq!(
        (status, error_code(&answer)),
        (403, "evidence_refused"),
        "{answer}"
    );
    assert!(answer.to_string().contains("sha256:7"), "{answer}");

    // The store holds no plaintext share, and not the credential: the dump is searched for each
    // share (its value and its whole signed fragment) and the secret, raw, hex and base64.
    let dump = match &run.lab.etcd {
        Some(etcd) => {
            let output = Command::new("etcdctl")
                .args(["--endpoints", &etcd.url, "get", "--prefix", ""])
                .env("ETCDCTL_API", "3")
                .output()
                .unwrap();
            assert!(output.status.success(), "{}", describe(&output));
            output.stdout
        }
        None => {
            // The redb file, read after the CMS stopped (and flushed it).
            let down = run.down(&[]);
            assert!(down.status.success(), "{}", describe(&down));
            fs::read(run.dir.join("cms/cms.redb")).unwrap()
        }
    };
    assert!(
        contains(&dump, b"demo"),
        "the dump holds no credential at all"
    );
    // The search finds what the store does hold: each sealed shard (ciphertext), in one of
    // the encodings. So a plaintext share stored the same way would be found too.
    for grant in &grants {
        let sealed = hex::decode(grant["sealed_shard"].as_str().unwrap()).unwrap();
        assert!(
            encodings(&sealed).iter().any(|e| contains(&dump, e)),
            "the dump does not hold {}'s sealed shard in any encoding searched",
            grant["host"]
        );
    }
    for needle in shares.iter().map(Vec::as_slice).chain([secret.as_slice()]) {
        for encoded in encodings(needle) {
            assert!(
                !contains(&dump, &encoded),
                "the store holds a plaintext share or secret"
            );
        }
    }

    // A shard ciphertext copied to another host does not decrypt there: with the lab down, host
    // B's own TPM (its swtpm state, started again) and its decrypt key (its state directory)
    // open B's sealed shard, to the fragment B released, and not A's, under either binding.
    let down = run.down(&[]);
    assert!(down.status.success(), "{}", describe(&down));
    for record in run.lab.processes() {
        assert!(!alive(record), "{} survived lab down", record.name);
    }
    let (a, b) = (&grants[0], &grants[1]);
    let b_host = run.host(b["host"].as_str().unwrap());
    let swtpm = keyshard_e2e::swtpm::Swtpm::start(&b_host.tpm_state).unwrap();
    let tpm = keyshard_tpm::TpmService::spawn(keyshard_tpm::TpmConfig::new(swtpm.tcti())).unwrap();
    let key =
        keyshard_tpm::DecryptKey::parse(&fs::read(b_host.state_dir.join("decrypt-key")).unwrap())
            .unwrap();
    let b_tpm = keyshard_cms::shard_host::tpm_key::TpmDecryptKey::new(tpm, key).unwrap();
    let binding = |grant: &Value| ShardBinding {
        credential: keyshard_core::KeyId::new("demo").unwrap(),
        epoch: 1,
        index: u8::try_from(grant["index"].as_u64().unwrap()).unwrap(),
        host: HostId::new(grant["host"].as_str().unwrap()).unwrap(),
    };
    let sealed = |grant: &Value| {
        keyshard_shards::ecies::SealedShard::from_bytes(
            &hex::decode(grant["sealed_shard"].as_str().unwrap()).unwrap(),
        )
        .unwrap()
    };
    let own = keyshard_shards::ecies::open(&b_tpm, &binding(b), &sealed(b)).unwrap();
    assert!(
        shares.iter().any(|s| s.as_slice() == own.as_slice()),
        "B's shard is not what B released"
    );
    assert!(keyshard_shards::ecies::open(&b_tpm, &binding(a), &sealed(a)).is_err());
    assert!(keyshard_shards::ecies::open(&b_tpm, &binding(b), &sealed(a)).is_err());
}

/// What must be shown, with the CMS on redb.
#[test]
fn item9_harness_on_redb() {
    harness("redb");
}

/// What must be shown, with the CMS on a real etcd the lab starts.
#[test]
fn item9_harness_on_etcd() {
    harness("etcd");
}
