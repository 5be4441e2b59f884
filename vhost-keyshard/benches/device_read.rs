//! Fragment device benchmark, printed as figures:
//! - 4 KiB reads at queue depth 1 over vhost-user through the guest-driver frontend, p50 and p99,
//!   from vhost-keyshard and from qemu-storage-daemon serving the same bytes from a file;
//! - resident memory of one vhost-keyshard process serving 1 and 64 devices, idle and with a
//!   frontend connected to every device.
//!
//! `make bench-devices` runs it (it needs qemu-storage-daemon). Goals (issue 3): vhost-keyshard's
//! p50 at most half of qemu-storage-daemon's; under 8 MiB resident for one device.

// Benchmark code: a panic here is a broken benchmark.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_driver::vhost_user::VhostUserBlk;
use keyshard_core::dealer::{self, DealPlan, HolderSlot};
use keyshard_core::{HolderClass, KeyId};
use keyshard_e2e::process::{LineWait, read_lines_in_background, wait_for_line};

const READ_LEN: usize = 4096;
const WARMUP_READS: usize = 2_000;
const MEASURED_READS: usize = 20_000;
const MANY_DEVICES: usize = 64;

/// A child process killed when the benchmark ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Five fragments of a 1 KiB secret: a volume of a little over 6 KiB, so a 4 KiB read fits.
fn write_fragments(dir: &Path) -> Vec<PathBuf> {
    let key = keyshard_core::keys::generate().unwrap();
    let plan = DealPlan {
        key_id: KeyId::new("bench").unwrap(),
        epoch: 1,
        k: 2,
        holders: HolderSlot::numbered(HolderClass::Vhd, 5).collect(),
    };
    dealer::deal(&[0x5a; 1024], &plan, &key)
        .unwrap()
        .iter()
        .map(|fragment| {
            let path = dir.join(format!("fragment-{}.ksf", fragment.header().index));
            std::fs::write(&path, fragment.encoded()).unwrap();
            path
        })
        .collect()
}

fn start_vhost_keyshard(sockets: &[PathBuf], fragments: &[PathBuf]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vhost-keyshard"));
    for socket in sockets {
        let mut spec = format!("socket={}", socket.display());
        for fragment in fragments {
            spec.push_str(&format!(",fragment={}", fragment.display()));
        }
        command.args(["--device", &spec]);
    }
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start vhost-keyshard");
    let stdout = read_lines_in_background(child.stdout.take().unwrap(), Arc::default());
    match wait_for_line(&stdout, "", Duration::from_secs(10)) {
        LineWait::Found(line) => assert!(line.starts_with("ready"), "vhost-keyshard: {line}"),
        other => panic!("vhost-keyshard did not get ready within 10 s: {other:?}"),
    }
    Process(child)
}

fn start_qemu_storage_daemon(image: &Path, socket: &Path) -> Process {
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=file0,filename={},read-only=on", image.display()),
            "--export",
            &format!(
                "type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,addr.path={},writable=off",
                socket.display()
            ),
        ])
        .spawn()
        .expect("start qemu-storage-daemon (package qemu-system-common)");
    let until = deadline();
    while !socket.exists() {
        assert!(Instant::now() < until, "qemu-storage-daemon did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    Process(child)
}

/// p50 and p99 of 4 KiB reads at queue depth 1, in microseconds.
fn read_latency(socket: &Path) -> (f64, f64) {
    let mut device = VhostUserBlk::connect(socket, deadline()).expect("connect");
    for _ in 0..WARMUP_READS {
        device.read_at(0, READ_LEN, deadline()).unwrap();
    }
    let mut samples: Vec<Duration> = (0..MEASURED_READS)
        .map(|_| {
            let start = Instant::now();
            let data = device.read_at(0, READ_LEN, deadline()).unwrap();
            let elapsed = start.elapsed();
            assert_eq!(data.len(), READ_LEN);
            elapsed
        })
        .collect();
    samples.sort_unstable();
    let micros = |q: f64| {
        samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    (micros(0.50), micros(0.99))
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Resident memory of one daemon serving `count` devices: idle, then with every device connected
/// and read once.
fn memory_with_devices(dir: &Path, fragments: &[PathBuf], count: usize) -> (u64, u64) {
    let sockets: Vec<PathBuf> = (0..count)
        .map(|i| dir.join(format!("many-{count}-{i}.sock")))
        .collect();
    let daemon = start_vhost_keyshard(&sockets, fragments);
    std::thread::sleep(Duration::from_millis(200));
    let idle = resident_kib(daemon.0.id());
    let connections: Vec<VhostUserBlk> = sockets
        .iter()
        .map(|socket| {
            let mut device = VhostUserBlk::connect(socket, deadline()).expect("connect");
            device.read_at(0, 512, deadline()).unwrap();
            device
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let connected = resident_kib(daemon.0.id());
    drop(connections);
    (idle, connected)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let fragments = write_fragments(dir.path());
    let ours = dir.path().join("vhost-keyshard.sock");
    let daemon = start_vhost_keyshard(std::slice::from_ref(&ours), &fragments);

    // qemu-storage-daemon serves the very bytes vhost-keyshard serves, read back through it.
    let image = dir.path().join("volume.img");
    let mut probe = VhostUserBlk::connect(&ours, deadline()).expect("connect");
    let capacity = usize::try_from(probe.capacity_bytes()).unwrap();
    std::fs::write(
        &image,
        probe.read_at(0, capacity, deadline()).unwrap().as_slice(),
    )
    .unwrap();
    drop(probe);
    let theirs = dir.path().join("qsd.sock");
    let _qsd = start_qemu_storage_daemon(&image, &theirs);

    println!(
        "4 KiB reads, queue depth 1, {MEASURED_READS} reads after {WARMUP_READS} warm-up, guest-driver frontend"
    );
    let (qsd_p50, qsd_p99) = read_latency(&theirs);
    let (our_p50, our_p99) = read_latency(&ours);
    println!("  qemu-storage-daemon   p50 {qsd_p50:8.1} us   p99 {qsd_p99:8.1} us");
    println!("  vhost-keyshard        p50 {our_p50:8.1} us   p99 {our_p99:8.1} us");
    let ratio = our_p50 / qsd_p50;
    println!(
        "  p50 ratio {ratio:.2} (goal <= 0.50: {})",
        if ratio <= 0.5 { "met" } else { "NOT met" }
    );
    drop(daemon);

    println!("resident memory of one vhost-keyshard process");
    for count in [1, MANY_DEVICES] {
        let (idle, connected) = memory_with_devices(dir.path(), &fragments, count);
        println!(
            "  {count:3} device(s): idle {:6.2} MiB, all connected {:6.2} MiB",
            idle as f64 / 1024.0,
            connected as f64 / 1024.0
        );
        if count == 1 {
            let ok = connected < 8 * 1024;
            println!(
                "  one device under 8 MiB: {}",
                if ok { "met" } else { "NOT met" }
            );
        }
    }
}
