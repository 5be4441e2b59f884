//! A real, single-member etcd for a test: Debian's etcd-server on loopback, on free ports, with
//! its data in a temporary directory, killed when the guard drops (also when the test panics).

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyshard_cms::store::{Key, Repository, Store};
use keyshard_e2e::HarnessError;
use keyshard_e2e::process::{ChildGuard, describe_status};

/// How long etcd may take to listen and elect itself leader.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts with new ports when another process took one between choosing and binding.
const PORT_ATTEMPTS: usize = 5;

/// A running etcd; dropping it kills etcd and deletes its data.
pub struct EtcdServer {
    // Dropped in this order: etcd first, then its directory.
    _guard: ChildGuard,
    _dir: tempfile::TempDir,
    client_url: String,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers a read as leader. Panics, with etcd's log, when it
    /// cannot; with "run `make deps`" when etcd is not installed.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("etcd.log");
        let mut lost = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut command = Command::new("etcd");
            command
                .arg("--name=keyshard-test")
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=keyshard-test={peer_url}"))
                // A single member elects itself after one election timeout: keep it short.
                .arg("--heartbeat-interval=50")
                .arg("--election-timeout=500")
                .arg("--logger=zap")
                .arg("--log-outputs=stderr")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).unwrap());
            let mut guard = match ChildGuard::spawn("etcd", &mut command) {
                Err(HarnessError::Spawn { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    panic!(
                        "{}",
                        HarnessError::MissingTool {
                            tool: "etcd",
                            package: "etcd-server",
                        }
                    );
                }
                other => other.unwrap(),
            };
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if let Some(status) = guard.try_wait().unwrap() {
                    let text = fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("address already in use") {
                        lost.push((client, peer));
                        break;
                    }
                    panic!(
                        "etcd exited ({}) before it answered; its log:\n{text}",
                        describe_status(&status)
                    );
                }
                if TcpStream::connect(("127.0.0.1", client)).is_ok()
                    && answers(&format!("etcd:{client_url}")).await
                {
                    return Self {
                        _guard: guard,
                        _dir: dir,
                        client_url,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd did not answer within {READY_TIMEOUT:?}; its log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("etcd: the ports {lost:?} were all taken by other processes");
    }

    /// `etcd:http://127.0.0.1:PORT`, for [`Store::open`].
    pub fn store_url(&self) -> String {
        format!("etcd:{}", self.client_url)
    }
}

/// Whether the store at `url` answers a read (etcd refuses reads until it has a leader).
async fn answers(url: &str) -> bool {
    let Ok(store) = Store::open(url).await else {
        return false;
    };
    store.get(&Key::new("ready").unwrap()).await.is_ok()
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
