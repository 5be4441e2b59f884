//! Release benchmark, printed as figures, every release through a real `BrokerMailbox` served
//! over vhost-user and the guest-driver broker client:
//! - `tpm` releases from the coordinator on swtpm, p50 and p99;
//! - `sev` releases on test-signed SNP evidence, p50 and p99 and releases per second as the
//!   client sees them, and the coordinator's own rate answering the same requests in-process;
//! - `SnpVerifier::verify` per second on one core, with the VCEK's chain cached.
//!
//! Goals: `tpm` p50 under 50 ms; at least 1,000 `sev` verifications per second per
//! core (the coordinator's work, not the client's polling).

// Benchmark code: a panic here is a broken benchmark.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[allow(dead_code)]
#[path = "../../keyshard-attest/tests/common/snp_chain.rs"]
mod snp_chain;
#[allow(dead_code)]
#[path = "../../keyshard-tpm/tests/common/swtpm.rs"]
mod swtpm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_driver::broker::BrokerClient;
use guest_driver::broker::mailbox::VhostUserMailbox;
use guest_driver::snp::ReportSource;
use keyshard_attest::snp::{
    PlatformPolicy, Product, Report, SnpPolicy, SnpVerifier, report_data_binding,
};
use keyshard_coordinator::at_rest;
use keyshard_coordinator::audit::AuditLog;
use keyshard_coordinator::mailbox::{BrokerMailbox, RequestHandler};
use keyshard_coordinator::nonces::SystemClock;
use keyshard_coordinator::release::Coordinator;
use keyshard_coordinator::setup;
use keyshard_coordinator::sev_release::{SevHolder, SevReleaser};
use keyshard_coordinator::state::StateDir;
use keyshard_core::broker::{Body, Evidence, Message, NONCE_LEN};
use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::envelope::{ReleaseContext, RequestKey};
use keyshard_core::files::Overwrite;
use keyshard_core::policy::Policy;
use keyshard_core::{HolderClass, HolderId, KeyId};
use keyshard_tpm::{Tpm, TpmConfig, TpmService};
use vhost_keyshard::device::media::BlockMedia;
use vhost_keyshard::device::serve::{BoundSocket, ServeError, Stopper};

use snp_chain::{MEASUREMENT, ReportSpec, TCB, TestCa, TestVcek, VcekSpec, build_report};

const TPM_WARMUP: usize = 5;
const TPM_RELEASES: usize = 100;
const SEV_WARMUP: usize = 20;
const SEV_RELEASES: usize = 300;
const VERIFY_WARMUP: usize = 100;
const VERIFICATIONS: usize = 2_000;
const VM_ID: &str = "vm1";
const UNLIMITED: keyshard_coordinator::rate_limit::RateLimit =
    keyshard_coordinator::rate_limit::RateLimit {
        burst: u32::MAX,
        per_second: u32::MAX,
    };

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// A broker mailbox served on its own socket and thread; stopped and joined on drop.
struct ServedMailbox {
    socket: PathBuf,
    stopper: Arc<Stopper>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl ServedMailbox {
    fn start(dir: &Path, handler: Arc<dyn RequestHandler>) -> Self {
        let socket = dir.join("ksb-vm1.sock");
        let mailbox = BrokerMailbox::new(VM_ID, handler).unwrap();
        let bound = BoundSocket::bind(&socket, Default::default()).unwrap();
        let stopper = Stopper::new().unwrap();
        let serving = stopper.clone();
        let thread = std::thread::spawn(move || {
            bound.serve(
                "ksb-vm1",
                Arc::new(mailbox) as Arc<dyn BlockMedia>,
                &serving,
            )
        });
        Self {
            socket,
            stopper,
            thread: Some(thread),
        }
    }

    fn client(&self) -> BrokerClient {
        BrokerClient::new(Box::new(VhostUserMailbox::new(self.socket.clone())))
    }
}

impl Drop for ServedMailbox {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap().unwrap();
        }
    }
}

/// p50 and p99 of `samples`, in milliseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let millis = |q: f64| {
        samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3
    };
    (millis(0.50), millis(0.99))
}

fn per_second(count: usize, samples: &[Duration]) -> f64 {
    count as f64 / samples.iter().sum::<Duration>().as_secs_f64()
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// `tpm` releases: a coordinator initialised on a fresh swtpm, as `keyshard init` leaves it.
fn bench_tpm(dir: &Path) {
    let swtpm = swtpm::Swtpm::start();
    let state_dir = StateDir::new(dir);
    let secret = keyshard_core::keys::generate().unwrap().to_bytes().to_vec();
    let dealer_key = keyshard_core::keys::generate().unwrap();
    keyshard_coordinator::init::init(
        &state_dir,
        &Policy::parse(include_str!("../../examples/vhd-tpm.toml")).unwrap(),
        &secret,
        &dealer_key,
        Some(&mut Tpm::open(&swtpm.tcti()).unwrap()),
        Overwrite::Refuse,
        &[VM_ID.to_owned()],
    )
    .unwrap();
    let service = TpmService::spawn(TpmConfig::new(swtpm.tcti())).unwrap();
    let state = setup::load_state(&state_dir).unwrap();
    // The bench measures the release path itself, not the per-VM rate limit.
    let coordinator = setup::coordinator(&state_dir, &state, Some(service))
        .unwrap()
        .with_rate_limit(UNLIMITED);
    let served = ServedMailbox::start(dir, Arc::new(coordinator));
    let mut client = served.client();
    let holder = HolderId::new("tpm-1").unwrap();
    let manifest = std::fs::read_to_string(state_dir.manifest()).unwrap();
    let host = keyshard_core::manifest::Manifest::parse(&manifest)
        .unwrap()
        .host_attestation;

    for _ in 0..TPM_WARMUP {
        client
            .release_tpm(&holder, host.as_ref(), deadline())
            .unwrap();
    }
    let mut samples: Vec<Duration> = (0..TPM_RELEASES)
        .map(|_| {
            let start = Instant::now();
            let fragment = client
                .release_tpm(&holder, host.as_ref(), deadline())
                .unwrap();
            let elapsed = start.elapsed();
            assert!(!fragment.is_empty());
            elapsed
        })
        .collect();
    let (p50, p99) = percentiles(&mut samples);
    println!(
        "tpm releases through the broker mailbox, swtpm, {TPM_RELEASES} after {TPM_WARMUP} warm-up"
    );
    println!("  client (request written -> envelope opened)   p50 {p50:8.2} ms   p99 {p99:8.2} ms");
    println!("  p50 < 50 ms: {}", verdict(p50 < 50.0));
    drop(served);
    drop(swtpm);
}

/// What the `sev` benchmarks share: a test CA, a VCEK, the policy and one dealt fragment.
struct SevSetup {
    ca: TestCa,
    vcek: TestVcek,
    policy: SnpPolicy,
    holder: HolderId,
    fragment: Vec<u8>,
}

impl SevSetup {
    fn new() -> Self {
        let ca = TestCa::new(4096, Product::Milan);
        let vcek = ca.issue_vcek(&VcekSpec::default());
        let policy = SnpPolicy {
            measurements: vec![MEASUREMENT],
            allow_debug: false,
            allow_migration_agent: false,
            vmpl: 0,
            min_report_version: 2,
            min_tcb: TCB,
            platform: PlatformPolicy::default(),
        };
        let plan = DealPlan {
            key_id: KeyId::new("bench").unwrap(),
            epoch: 1,
            k: 2,
            holders: HolderSlot::numbered(HolderClass::Sev, 2).collect(),
        };
        let dealer_key = keyshard_core::keys::generate().unwrap();
        let fragments = dealer::deal(&[0x5a; 32], &plan, &dealer_key).unwrap();
        Self {
            ca,
            vcek,
            policy,
            holder: HolderId::numbered(HolderClass::Sev, 1),
            fragment: fragments[0].encoded().to_vec(),
        }
    }

    /// A report from the test VCEK carrying `report_data`, as the firmware would sign it.
    fn report(&self, report_data: [u8; 64]) -> Vec<u8> {
        let spec = ReportSpec {
            report_data,
            ..ReportSpec::default()
        };
        build_report(&spec, &self.vcek.key)
    }

    /// A coordinator with one `sev` holder, the VCEK found in its local store (`vcek_dir`).
    fn coordinator(&self, dir: &Path) -> Coordinator {
        let vcek_dir = dir.join("vceks");
        std::fs::create_dir_all(&vcek_dir).unwrap();
        std::fs::write(vcek_dir.join("milan.der"), &self.vcek.der).unwrap();
        let key = at_rest::new_data_key().unwrap();
        let encrypted_fragment = at_rest::encrypt(&key, &self.holder, &self.fragment).unwrap();
        let releaser = SevReleaser::new(
            Arc::new(SnpVerifier::new(self.ca.anchors())),
            Some(self.policy.clone()),
            keyshard_attest::snp::VcekStore::open(&vcek_dir).unwrap(),
            vec![SevHolder {
                id: self.holder.clone(),
                key,
                encrypted_fragment,
            }],
        );
        let mut coordinator = Coordinator::new(
            Arc::new(SystemClock),
            AuditLog::open(&dir.join("audit.log")).unwrap(),
            [VM_ID.to_owned()],
        )
        .with_rate_limit(UNLIMITED);
        coordinator.add_holder(self.holder.clone(), HolderClass::Sev, Arc::new(releaser));
        coordinator
    }

    /// A release request for `nonce` with a fresh key and a report bound to both.
    fn request(&self, nonce: [u8; NONCE_LEN]) -> (RequestKey, Body) {
        let key = RequestKey::generate().unwrap();
        let report = self.report(report_data_binding(&nonce, &key.public_key()));
        let body = Body::Release {
            class: HolderClass::Sev,
            holder_id: self.holder.clone(),
            request_key: key.public_key(),
            evidence: Evidence::Snp {
                nonce,
                report,
                vcek: Vec::new(),
            },
        };
        (key, body)
    }
}

/// One `sev` release through the mailbox, the report signed before the clock starts: the
/// release request written, the released answer read, the envelope opened.
fn timed_sev_release(client: &mut BrokerClient, sev: &SevSetup) -> Duration {
    let nonce = client.nonce(deadline()).unwrap();
    let (key, body) = sev.request(nonce);
    let start = Instant::now();
    let answer = client.exchange(body, deadline()).unwrap();
    let Body::Released {
        class,
        holder_id,
        envelope,
        ..
    } = answer.body
    else {
        panic!("not released: {:?}", answer.body);
    };
    let context = ReleaseContext {
        request_id: answer.request_id,
        class,
        holder_id,
    };
    let fragment = key.open(&envelope, &context).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(fragment.as_slice(), sev.fragment.as_slice());
    elapsed
}

/// Signs reports for `BrokerClient::release_sev`, keeping count of the time spent signing.
struct TimedReports<'a> {
    sev: &'a SevSetup,
    signing: Duration,
}

impl ReportSource for TimedReports<'_> {
    fn report(&mut self, report_data: &[u8; 64]) -> guest_driver::snp::Result<Vec<u8>> {
        let start = Instant::now();
        let report = self.sev.report(*report_data);
        self.signing += start.elapsed();
        Ok(report)
    }
}

fn bench_sev(dir: &Path, sev: &SevSetup) {
    let coordinator = Arc::new(sev.coordinator(dir));
    let served = ServedMailbox::start(dir, coordinator.clone());
    let mut client = served.client();

    for _ in 0..SEV_WARMUP {
        timed_sev_release(&mut client, sev);
    }
    let mut samples: Vec<Duration> = (0..SEV_RELEASES)
        .map(|_| timed_sev_release(&mut client, sev))
        .collect();
    let client_rate = per_second(SEV_RELEASES, &samples);
    let (p50, p99) = percentiles(&mut samples);

    // The whole of `release_sev` (nonce exchange included), less the time spent signing.
    let mut reports = TimedReports {
        sev,
        signing: Duration::ZERO,
    };
    let mut full: Vec<Duration> = (0..SEV_RELEASES)
        .map(|_| {
            let signed_before = reports.signing;
            let start = Instant::now();
            let fragment = client
                .release_sev(&sev.holder, &mut reports, deadline())
                .unwrap();
            let elapsed = start.elapsed() - (reports.signing - signed_before);
            assert_eq!(fragment.as_slice(), sev.fragment.as_slice());
            elapsed
        })
        .collect();
    let (full_p50, full_p99) = percentiles(&mut full);
    drop(client);
    drop(served);

    // The coordinator's side alone: the same requests answered in-process, one thread.
    let ask_nonce = |id| Message {
        request_id: id,
        body: Body::NonceRequest,
    };
    let mut handled: Vec<Duration> = Vec::with_capacity(SEV_RELEASES);
    for i in 0..(SEV_WARMUP + SEV_RELEASES) as u64 {
        let Body::Nonce { nonce, .. } = coordinator.answer(VM_ID, &ask_nonce(2 * i + 1)) else {
            panic!("no nonce");
        };
        let (_key, body) = sev.request(nonce);
        let request = Message {
            request_id: 2 * i + 2,
            body,
        };
        let start = Instant::now();
        let answer = coordinator.answer(VM_ID, &request);
        let elapsed = start.elapsed();
        assert!(matches!(answer, Body::Released { .. }), "{answer:?}");
        if i >= SEV_WARMUP as u64 {
            handled.push(elapsed);
        }
    }
    let coordinator_rate = per_second(SEV_RELEASES, &handled);
    let (c50, c99) = percentiles(&mut handled);

    println!(
        "sev releases, test-signed SNP evidence, VCEK from the local store, {SEV_RELEASES} after \
         {SEV_WARMUP} warm-up (reports signed outside the clock)"
    );
    println!(
        "  client release exchange (-> envelope opened)  p50 {p50:8.2} ms   p99 {p99:8.2} ms   \
         {client_rate:8.0} releases/s"
    );
    println!(
        "  client release_sev (nonce + release)          p50 {full_p50:8.2} ms   p99 {full_p99:8.2} ms"
    );
    println!(
        "  coordinator answer() in-process, one thread   p50 {:8.3} ms   p99 {:8.3} ms   \
         {coordinator_rate:8.0} releases/s",
        c50, c99
    );
    println!(
        "  coordinator >= 1,000 sev releases/s per core: {}",
        verdict(coordinator_rate >= 1000.0)
    );
}

/// `SnpVerifier::verify` alone, one thread, the VCEK's chain verdict cached after the first.
fn bench_verify(sev: &SevSetup) {
    let verifier = SnpVerifier::new(sev.ca.anchors());
    let binding = report_data_binding(&[0x4E; NONCE_LEN], &[0x6B; 32]);
    let report = Report::from_bytes(&sev.report(binding)).unwrap();
    for _ in 0..VERIFY_WARMUP {
        verifier
            .verify(&report, &sev.vcek.der, &sev.policy, &binding)
            .unwrap();
    }
    let start = Instant::now();
    for _ in 0..VERIFICATIONS {
        verifier
            .verify(
                std::hint::black_box(&report),
                &sev.vcek.der,
                &sev.policy,
                &binding,
            )
            .unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(verifier.cached_vceks(), 1);
    let rate = VERIFICATIONS as f64 / elapsed.as_secs_f64();
    println!(
        "SNP verification, one thread, chain cached, {VERIFICATIONS} after {VERIFY_WARMUP} warm-up"
    );
    println!(
        "  SnpVerifier::verify   {:8.1} us each   {rate:8.0} /s",
        elapsed.as_secs_f64() * 1e6 / VERIFICATIONS as f64
    );
    println!("  >= 1,000 /s: {}", verdict(rate >= 1000.0));
}

fn main() {
    let tpm_dir = tempfile::tempdir().unwrap();
    bench_tpm(tpm_dir.path());

    let sev = SevSetup::new();
    let sev_dir = tempfile::tempdir().unwrap();
    bench_sev(sev_dir.path(), &sev);
    bench_verify(&sev);
}
