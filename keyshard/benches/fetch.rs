//! `make bench-fetch`: credential fetch on loopback (issue 9, "What must be shown"). The real
//! `keyshard cms` (redb) and five `keyshard shard-host` processes, each on its own swtpm with EK
//! certificates (five regions, five operators, so 3 of 5 spreads), and an instance swtpm enrolled
//! with `keyshard instance enroll`; a 3-of-5 credential. Prints figures; asserts no timing.
//!
//! 1. Fetch latency: `KEYSHARD_BENCH_FETCH_N` fetches (default 50, at most 1000) through the
//!    library the CLI runs (`keyshard::cli::fetch::fetch`, one TpmService for all of them),
//!    p50/p99 of the whole and of each phase; then a few runs of the CLI itself (process start,
//!    TPM open and file write included).
//! 2. Attested map requests per CMS core: `KEYSHARD_BENCH_MAP_N` (default and most 1000)
//!    rounds of challenge + quote + `POST /v1/credentials/{name}/fetch`, the CMS's CPU time
//!    read from /proc before and after (in 10 ms ticks): requests per CPU-second of the CMS is
//!    requests per core.
//! 3. One swtpm alone: a quote, opening the TPM, and a shard host's per-release TPM work, for
//!    where the time goes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "../tests/common/cms.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../tests/common/shard_lab.rs"]
mod shard_lab;

use std::path::Path;
use std::time::{Duration, Instant};

use keyshard::cli::credential::CmsConfig;
use keyshard::cli::fetch::collect::HostStatus;
use keyshard::cli::fetch::{Clients, FetchParams, fetch};
use keyshard_core::KeyId;
use keyshard_e2e::swtpm::Swtpm;
use keyshard_shards::instance::{self, FetchKey, InstanceEvidence};
use keyshard_shards::map::ClientKey;
use keyshard_tpm::{TpmConfig, TpmService};
use shard_lab::{LabFiles, ShardLab};

const SECRET: &[u8] = b"a 32-byte database credential..";

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(1, 1000)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn row(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "  {name:<34} p50 {:>9}  p99 {:>9}  (n = {})",
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        samples.len()
    );
}

/// utime + stime of `pid`, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn lab_files(pki: &harness::Pki) -> LabFiles {
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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let fetches = env_count("KEYSHARD_BENCH_FETCH_N", 50);
    let map_requests = env_count("KEYSHARD_BENCH_MAP_N", 1000);
    let bin = Path::new(env!("CARGO_BIN_EXE_keyshard"));
    let pki = harness::Pki::new();
    let files = lab_files(&pki);
    let store = format!("redb:{}", pki.dir.path().join("cms.redb").display());
    let domains = [
        ("eu", "acme"),
        ("us", "globex"),
        ("ap", "initech"),
        ("sa", "umbrella"),
        ("af", "hooli"),
    ];
    let started = Instant::now();
    let lab = ShardLab::start(bin, &files, &store, &domains);
    lab.put("db", SECRET, 3, 5);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "fetch bench: CMS (redb) + 5 shard hosts + instance, each its own swtpm, on loopback; \
         3 of 5; {cores} cores on this machine, shared by all of it (lab up in {})",
        ms(started.elapsed())
    );

    let tpm = TpmService::spawn(TpmConfig::new(lab.instance.tcti())).unwrap();
    let cms = CmsConfig {
        base: lab.cms_url(),
        ca: files.ca.clone(),
        timeout: Duration::from_secs(10),
    };
    let client = std::fs::read_to_string(&lab.client_key).unwrap();
    let client: [u8; 32] = hex::decode(client.trim()).unwrap().try_into().unwrap();
    let cms_key = keyshard_core::keys::verifying_key_from_pem(
        &std::fs::read_to_string(&files.signing_pub).unwrap(),
    )
    .unwrap();
    let params = FetchParams {
        name: KeyId::new("db").unwrap(),
        instance: lab.instance_id.clone(),
        client: ClientKey::from_bytes(&client).unwrap(),
        cms_key,
        host_deadline: Duration::from_secs(5),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients = Clients::new(&cms, params.host_deadline).unwrap();

    // 1. Fetch latency.
    for _ in 0..2 {
        runtime.block_on(fetch(&params, &clients, &tpm)).unwrap();
    }
    let mut phases: [Vec<Duration>; 7] = Default::default();
    let mut host_nonce = Vec::new();
    let mut host_quote = Vec::new();
    let mut host_release = Vec::new();
    let mut host_round = Vec::new();
    let tpm_calls_before = tpm.calls();
    for _ in 0..fetches {
        // New clients each time: every fetch pays its TLS handshakes, as the CLI does.
        let clients = Clients::new(&cms, params.host_deadline).unwrap();
        let fetched = runtime.block_on(fetch(&params, &clients, &tpm)).unwrap();
        assert_eq!(fetched.secret.as_slice(), SECRET);
        let t = fetched.timings;
        for (slot, value) in phases.iter_mut().zip([
            t.total,
            t.challenge + t.cms_quote + t.cms_fetch,
            t.challenge,
            t.cms_quote,
            t.cms_fetch,
            t.open_map,
            t.hosts,
        ]) {
            slot.push(value);
        }
        for host in fetched
            .hosts
            .iter()
            .filter(|h| h.status == HostStatus::Released)
        {
            host_nonce.push(host.timings.nonce);
            host_quote.push(host.timings.quote);
            host_release.push(host.timings.release);
            host_round.push(host.timings.round);
        }
    }
    let tpm_calls = tpm.calls() - tpm_calls_before;
    println!(
        "\n1. fetch latency, {fetches} fetches in-process, new TLS connections each (TPM calls per fetch: {:.1})",
        tpm_calls as f64 / fetches as f64
    );
    let names = [
        "total (goal: p50 < 50 ms)",
        "CMS: challenge + quote + fetch",
        "  challenge",
        "  fetch key, quote, PCR read",
        "  POST fetch",
        "open map, check grants",
        "host rounds (until k rebuilt)",
    ];
    for (name, samples) in names.iter().zip(phases) {
        row(name, samples);
    }
    println!("  per released host (its round):");
    row("  nonce (incl. TLS handshake)", host_nonce);
    row("  quote (incl. waiting for the TPM)", host_quote);
    row("  release", host_release);
    row("  the whole round", host_round);

    let runs = 5.min(fetches);
    let mut cli = Vec::new();
    for i in 0..runs {
        let out = pki.dir.path().join(format!("cli-{i}.secret"));
        let args = lab.fetch_args("db", &out);
        let started = Instant::now();
        let output = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        cli.push(started.elapsed());
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    row("the CLI (process, TPM open, file)", cli);
    let out = pki.dir.path().join("cli-debug.secret");
    // KEYSHARD_BENCH_CLI_WRAP="strace -f -tt -o /tmp/fetch.trace": run that one under a tool.
    let wrap = std::env::var("KEYSHARD_BENCH_CLI_WRAP").unwrap_or_default();
    let mut words: Vec<String> = wrap.split_whitespace().map(str::to_owned).collect();
    words.push(bin.display().to_string());
    let output = std::process::Command::new(&words[0])
        .args(&words[1..])
        .env("RUST_LOG", "keyshard=debug")
        .args(lab.fetch_args("db", &out))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if let Some(line) = stderr.lines().find(|l| l.contains("fetch timings")) {
        println!(
            "  one CLI run, its own account: {}",
            line.trim_start_matches("keyshard: debug: ")
        );
    }

    // 3. The TPM alone.
    let selection = "sha256:0,7".parse().unwrap();
    let mut quotes = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        tpm.quote(&selection, &[7; 32]).unwrap();
        quotes.push(started.elapsed());
    }
    let mut opens = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let opened = TpmService::spawn(TpmConfig::new(lab.instance.tcti())).unwrap();
        opens.push(started.elapsed());
        drop(opened);
    }
    // What a shard host's TPM does per release (keyshard-tpm's ecdh_z_gen: load the decrypt
    // key, a salted session, ECDH_ZGen, flushes), timed here on a spare swtpm, alone.
    let spare = Swtpm::start(&pki.dir.path().join("tpm-spare")).unwrap();
    let spare_tpm = TpmService::spawn(TpmConfig::new(spare.tcti())).unwrap();
    let decrypt = spare_tpm.create_decrypt_key().unwrap();
    let mut zgens = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        spare_tpm.ecdh_z_gen(&decrypt, decrypt.point()).unwrap();
        zgens.push(started.elapsed());
    }
    println!("\n3. one swtpm alone, nothing else running on it");
    row("quote (the instance's)", quotes);
    row("open (what the CLI does first)", opens);
    row("a host's ZGen (load, session, ZGen)", zgens);

    // 2. Attested map requests per CMS core.
    let http = pki.client();
    let cms_pid = lab.cms.pid();
    let ticks_per_second = u64::try_from(unsafe_free_clk_tck()).unwrap_or(100);
    let key = FetchKey::generate().unwrap();
    let (mut cms_time, mut client_time) = (Duration::ZERO, Duration::ZERO);
    let ticks_before = cpu_ticks(cms_pid);
    let wall = Instant::now();
    runtime.block_on(async {
        for _ in 0..map_requests {
            let started = Instant::now();
            let challenge: serde_json::Value = http
                .post(format!(
                    "{}/v1/instances/{}/challenge",
                    lab.cms_url(),
                    lab.instance_id
                ))
                .json(&serde_json::json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            cms_time += started.elapsed();
            let started = Instant::now();
            let nonce: [u8; 32] = hex::decode(challenge["nonce"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            let qualifying = instance::qualifying_data(&nonce, &key.public_key());
            let (quote, pcrs) = {
                let (tpm, selection) = (tpm.clone(), selection.clone());
                tokio::task::spawn_blocking(move || {
                    (
                        tpm.quote(&selection, &qualifying).unwrap(),
                        tpm.read_pcrs(&selection).unwrap(),
                    )
                })
                .await
                .unwrap()
            };
            let evidence =
                hex::encode(InstanceEvidence::new(nonce, key.public_key(), quote, pcrs).to_bytes());
            client_time += started.elapsed();
            let started = Instant::now();
            let answer = http
                .post(format!("{}/v1/credentials/db/fetch", lab.cms_url()))
                .json(&serde_json::json!({"instance": lab.instance_id, "evidence": evidence}))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status().as_u16(), 200);
            answer.bytes().await.unwrap();
            cms_time += started.elapsed();
        }
    });
    let wall = wall.elapsed();
    let ticks = cpu_ticks(cms_pid) - ticks_before;
    let cms_cpu = Duration::from_secs_f64(ticks as f64 / ticks_per_second as f64);
    println!(
        "\n2. attested map requests (challenge + quote + POST fetch), {map_requests} in a row, one client"
    );
    println!(
        "  wall {} ({:.0} requests/s; the client's quotes took {}, the CMS's two round trips {})",
        ms(wall),
        map_requests as f64 / wall.as_secs_f64(),
        ms(client_time),
        ms(cms_time)
    );
    println!(
        "  CMS CPU time {} = {:.2} ms per request: {:.0} requests per CMS CPU-second (per core; goal >= 1000)",
        ms(cms_cpu),
        cms_cpu.as_secs_f64() * 1000.0 / map_requests as f64,
        if cms_cpu.is_zero() {
            f64::INFINITY
        } else {
            map_requests as f64 / cms_cpu.as_secs_f64()
        }
    );
    println!(
        "  (CPU time from /proc/{cms_pid}/stat at {ticks_per_second} ticks/s: +-1 tick = +-{:.1} ms)",
        1000.0 / ticks_per_second as f64
    );
}

/// The clock tick rate of /proc's CPU times.
fn unsafe_free_clk_tck() -> i64 {
    // getconf CLK_TCK: no unsafe code for a number that is 100 on every Linux here.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}
