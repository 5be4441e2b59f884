//! One test suite for both store backends (issue 9, items 1 and 7): every test in `suite` runs
//! once on a redb file and once on a real etcd (Debian's etcd-server 3.4, started per test), as
//! `redb::NAME` and `etcd::NAME`. Replicas are separate handles on the same store: clones of one
//! open redb file, separate etcd connections.

// Test code: a panic here is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyshard_cms::store::{
    CasOutcome, DeleteOutcome, Expected, Key, KeyPrefix, MAX_LIST_LIMIT, MAX_NONCE_TTL,
    MAX_VALUE_LEN, Nonce, REQUEST_TIMEOUT, Repository, Revision, Store, StoreError,
};
use tokio::sync::Barrier;

use common::etcd::EtcdServer;

/// How many tasks race in the race tests.
const RACERS: usize = 8;

/// A store for one test, and as many replicas (handles on it) as the test asks for.
trait Backend: Sized {
    async fn start() -> Self;
    async fn replica(&self) -> Store;
}

struct RedbBackend {
    _dir: tempfile::TempDir,
    store: Store,
}

impl Backend for RedbBackend {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("redb:{}", dir.path().join("cms.redb").display());
        let store = Store::open(&url).await.unwrap();
        Self { _dir: dir, store }
    }

    async fn replica(&self) -> Store {
        // redb is one process's file: replicas in one process share the open database.
        self.store.clone()
    }
}

struct EtcdBackend {
    server: EtcdServer,
}

impl Backend for EtcdBackend {
    async fn start() -> Self {
        Self {
            server: EtcdServer::start().await,
        }
    }

    async fn replica(&self) -> Store {
        Store::open(&self.server.store_url()).await.unwrap()
    }
}

fn key(text: &str) -> Key {
    Key::new(text).unwrap()
}

fn prefix(text: &str) -> KeyPrefix {
    KeyPrefix::new(text).unwrap()
}

fn written(outcome: CasOutcome) -> Revision {
    match outcome {
        CasOutcome::Written(revision) => revision,
        CasOutcome::Conflict { current } => panic!("conflict, the key is at {current:?}"),
    }
}

/// The tests, each generic over the backend.
mod suite {
    use super::*;

    pub async fn item1_get_put_and_revisions(backend: &impl Backend) {
        let store = backend.replica().await;
        let k = key("hosts/h1");
        assert_eq!(store.get(&k).await.unwrap(), None);
        let first = store.put(&k, b"one").await.unwrap();
        let entry = store.get(&k).await.unwrap().unwrap();
        assert_eq!(
            (entry.value.as_slice(), entry.revision),
            (&b"one"[..], first)
        );
        let second = store.put(&k, b"two").await.unwrap();
        assert!(second > first, "{second} after {first}");
        let other = store.put(&key("hosts/h2"), b"").await.unwrap();
        assert!(other > second);
        assert_eq!(store.get(&k).await.unwrap().unwrap().value, b"two");
        assert_eq!(
            store.get(&key("hosts/h2")).await.unwrap().unwrap().value,
            b""
        );
        // What one replica wrote, another reads.
        let replica = backend.replica().await;
        assert_eq!(replica.get(&k).await.unwrap().unwrap().revision, second);
    }

    pub async fn item1_compare_and_swap_and_delete_follow_the_revision(backend: &impl Backend) {
        let store = backend.replica().await;
        let k = key("credentials/db/map");
        let created = written(
            store
                .compare_and_swap(&k, Expected::Absent, b"v1")
                .await
                .unwrap(),
        );
        // Created already: a second create conflicts and names the revision that is there.
        assert_eq!(
            store
                .compare_and_swap(&k, Expected::Absent, b"other")
                .await
                .unwrap(),
            CasOutcome::Conflict {
                current: Some(created)
            }
        );
        let updated = written(
            store
                .compare_and_swap(&k, Expected::Revision(created), b"v2")
                .await
                .unwrap(),
        );
        // A stale read neither writes nor deletes.
        assert_eq!(
            store
                .compare_and_swap(&k, Expected::Revision(created), b"stale")
                .await
                .unwrap(),
            CasOutcome::Conflict {
                current: Some(updated)
            }
        );
        assert_eq!(
            store.delete(&k, created).await.unwrap(),
            DeleteOutcome::Conflict {
                current: Some(updated)
            }
        );
        assert_eq!(store.get(&k).await.unwrap().unwrap().value, b"v2");
        assert_eq!(
            store.delete(&k, updated).await.unwrap(),
            DeleteOutcome::Deleted
        );
        assert_eq!(store.get(&k).await.unwrap(), None);
        assert_eq!(
            store.delete(&k, updated).await.unwrap(),
            DeleteOutcome::Conflict { current: None }
        );
        assert_eq!(
            store
                .compare_and_swap(&k, Expected::Revision(updated), b"gone")
                .await
                .unwrap(),
            CasOutcome::Conflict { current: None }
        );
        // Re-created, the key gets a revision no earlier read can match.
        let again = written(
            store
                .compare_and_swap(&k, Expected::Absent, b"v3")
                .await
                .unwrap(),
        );
        assert!(again > updated);
        for old in [created, updated] {
            assert!(matches!(
                store
                    .compare_and_swap(&k, Expected::Revision(old), b"x")
                    .await
                    .unwrap(),
                CasOutcome::Conflict { .. }
            ));
        }
        // A revision no store gave out matches nothing either.
        let never = Revision::new(u64::MAX).unwrap();
        assert!(matches!(
            store.delete(&k, never).await.unwrap(),
            DeleteOutcome::Conflict { .. }
        ));
        assert_eq!(store.get(&k).await.unwrap().unwrap().value, b"v3");
    }

    /// Every racer read the same state; each writes its own value from a different replica.
    /// Exactly one may win, the others learn the winner's revision, and the winner's value is
    /// what stays. A put without the compare would let every racer "win".
    pub async fn item1_cas_race_exactly_one_wins(backend: &impl Backend) {
        let mut replicas = Vec::new();
        for _ in 0..RACERS {
            replicas.push(backend.replica().await);
        }
        let k = key("credentials/raced/epoch");
        for round in 0..6 {
            let read = replicas[0].get(&k).await.unwrap().map(|e| e.revision);
            let expected = Expected::from(read);
            let barrier = Arc::new(Barrier::new(RACERS));
            let mut tasks = Vec::new();
            for (racer, store) in replicas.iter().cloned().enumerate() {
                let barrier = barrier.clone();
                let k = k.clone();
                tasks.push(tokio::spawn(async move {
                    let value = format!("round {round} racer {racer}");
                    barrier.wait().await;
                    let outcome = store
                        .compare_and_swap(&k, expected, value.as_bytes())
                        .await
                        .unwrap();
                    (value, outcome)
                }));
            }
            let mut winners = Vec::new();
            let mut losers = Vec::new();
            for task in tasks {
                match task.await.unwrap() {
                    (value, CasOutcome::Written(revision)) => winners.push((value, revision)),
                    (_, CasOutcome::Conflict { current }) => losers.push(current),
                }
            }
            assert_eq!(
                winners.len(),
                1,
                "round {round} ({expected:?}): {winners:?}"
            );
            let (value, revision) = winners.pop().unwrap();
            assert_eq!(losers.len(), RACERS - 1);
            for current in losers {
                // A loser saw the winner's write (or one after it: there is none here).
                assert_eq!(current, Some(revision), "round {round}");
            }
            let stored = replicas[RACERS - 1].get(&k).await.unwrap().unwrap();
            assert_eq!(
                (stored.value, stored.revision),
                (value.into_bytes(), revision)
            );
        }
    }

    pub async fn item1_delete_race_exactly_one_wins(backend: &impl Backend) {
        let mut replicas = Vec::new();
        for _ in 0..RACERS {
            replicas.push(backend.replica().await);
        }
        let k = key("hosts/leaving");
        for round in 0..4 {
            let revision = replicas[0].put(&k, b"record").await.unwrap();
            let barrier = Arc::new(Barrier::new(RACERS));
            let mut tasks = Vec::new();
            for store in &replicas {
                let store = store.clone();
                let barrier = barrier.clone();
                let k = k.clone();
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    store.delete(&k, revision).await.unwrap()
                }));
            }
            let mut deleted = 0;
            for task in tasks {
                match task.await.unwrap() {
                    DeleteOutcome::Deleted => deleted += 1,
                    DeleteOutcome::Conflict { current } => assert_eq!(current, None),
                }
            }
            assert_eq!(deleted, 1, "round {round}");
        }
    }

    pub async fn item1_list_is_bounded_ordered_and_pages(backend: &impl Backend) {
        let store = backend.replica().await;
        let mut names: Vec<String> = (0..25).map(|i| format!("hosts/h{i}")).collect();
        for name in &names {
            store.put(&key(name), name.as_bytes()).await.unwrap();
        }
        for other in ["hostsx", "hosts-other/a", "other/hosts/h1", "a"] {
            store.put(&key(other), b"not a host").await.unwrap();
        }
        names.sort();

        let page = store.list(&prefix("hosts/"), None, 10).await.unwrap();
        assert!(page.more);
        let keys: Vec<&str> = page.entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, names[..10]);
        for (k, entry) in &page.entries {
            assert_eq!(entry.value, k.as_str().as_bytes());
        }

        // Paging from the last key returns every key once, in order, and then says no more.
        let mut seen = Vec::new();
        let mut after: Option<Key> = None;
        loop {
            let page = store
                .list(&prefix("hosts/"), after.as_ref(), 7)
                .await
                .unwrap();
            assert!(page.entries.len() <= 7);
            seen.extend(page.entries.iter().map(|(k, _)| k.as_str().to_owned()));
            after = page.entries.last().map(|(k, _)| k.clone());
            if !page.more {
                break;
            }
        }
        assert_eq!(seen, names);

        // A prefix is a plain string prefix: "hosts/h1" lists h1 and h10..h19, nothing else.
        let ones = store.list(&prefix("hosts/h1"), None, 50).await.unwrap();
        assert!(!ones.more);
        assert_eq!(ones.entries.len(), 11);
        let everything = store
            .list(&KeyPrefix::all(), None, MAX_LIST_LIMIT)
            .await
            .unwrap();
        assert_eq!(everything.entries.len(), names.len() + 4);
        // start_after outside the prefix: before it lists from the start, after it lists nothing.
        let before = store
            .list(&prefix("hosts/"), Some(&key("a")), 50)
            .await
            .unwrap();
        assert_eq!(before.entries.len(), 25);
        let beyond = store
            .list(&prefix("hosts/"), Some(&key("zz")), 50)
            .await
            .unwrap();
        assert!(beyond.entries.is_empty() && !beyond.more);
        assert!(
            store
                .list(&prefix("nothing/"), None, 5)
                .await
                .unwrap()
                .entries
                .is_empty()
        );

        for limit in [0, MAX_LIST_LIMIT + 1, usize::MAX] {
            assert!(
                matches!(
                    store.list(&prefix("hosts/"), None, limit).await,
                    Err(StoreError::ListLimit { .. })
                ),
                "{limit}"
            );
        }
    }

    /// The largest listing (MAX_LIST_LIMIT values of MAX_VALUE_LEN) comes back whole; one byte
    /// more in a value is refused and writes nothing.
    pub async fn item1_sizes_are_bounded(backend: &impl Backend) {
        let store = backend.replica().await;
        let big = vec![0xa5; MAX_VALUE_LEN];
        for i in 0..MAX_LIST_LIMIT {
            store.put(&key(&format!("big/{i:03}")), &big).await.unwrap();
        }
        let page = store
            .list(&prefix("big/"), None, MAX_LIST_LIMIT)
            .await
            .unwrap();
        assert_eq!(page.entries.len(), MAX_LIST_LIMIT);
        assert!(!page.more);
        assert!(page.entries.iter().all(|(_, e)| e.value == big));

        let too_big = vec![0; MAX_VALUE_LEN + 1];
        let k = key("big/too-big");
        assert!(matches!(
            store.put(&k, &too_big).await,
            Err(StoreError::ValueTooLarge { .. })
        ));
        assert!(matches!(
            store.compare_and_swap(&k, Expected::Absent, &too_big).await,
            Err(StoreError::ValueTooLarge { .. })
        ));
        assert_eq!(store.get(&k).await.unwrap(), None);
    }

    /// Issue item 7: of many takers racing on two replicas, exactly one gets each nonce.
    pub async fn item7_nonce_single_use_across_replicas(backend: &impl Backend) {
        let replicas = [backend.replica().await, backend.replica().await];
        for round in 0..10 {
            let nonce = replicas[round % 2]
                .nonce_issue(Duration::from_secs(30))
                .await
                .unwrap();
            let barrier = Arc::new(Barrier::new(RACERS));
            let mut tasks = Vec::new();
            for racer in 0..RACERS {
                let store = replicas[racer % 2].clone();
                let barrier = barrier.clone();
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    store.nonce_take(&nonce).await
                }));
            }
            let mut accepted = 0;
            for task in tasks {
                match task.await.unwrap() {
                    Ok(()) => accepted += 1,
                    Err(StoreError::NonceUnknown) => {}
                    Err(other) => panic!("round {round}: {other}"),
                }
            }
            assert_eq!(accepted, 1, "round {round}");
            for store in &replicas {
                assert!(matches!(
                    store.nonce_take(&nonce).await,
                    Err(StoreError::NonceUnknown)
                ));
            }
        }
    }

    /// Issue item 7: nonces are random, and one never issued is refused.
    pub async fn item7_nonces_are_fresh_and_only_issued_ones_count(backend: &impl Backend) {
        let store = backend.replica().await;
        let mut issued = HashSet::new();
        for _ in 0..20 {
            assert!(issued.insert(store.nonce_issue(Duration::from_secs(5)).await.unwrap()));
        }
        let forged = Nonce::from_bytes([7; 32]);
        assert!(matches!(
            store.nonce_take(&forged).await,
            Err(StoreError::NonceUnknown)
        ));
        for nonce in &issued {
            store.nonce_take(nonce).await.unwrap();
        }
        for ttl in [Duration::ZERO, MAX_NONCE_TTL + Duration::from_secs(1)] {
            assert!(matches!(
                store.nonce_issue(ttl).await,
                Err(StoreError::NonceTtl { .. })
            ));
        }
    }

    /// Issue item 7: a nonce is never accepted after its expiry (and is used up by the try).
    pub async fn item7_nonce_expires(backend: &impl Backend) {
        let replicas = [backend.replica().await, backend.replica().await];
        let ttl = Duration::from_millis(300);
        let issued_at = Instant::now();
        let late = replicas[0].nonce_issue(ttl).await.unwrap();
        // Taken in time on the other replica: accepted.
        let in_time = replicas[0]
            .nonce_issue(Duration::from_secs(30))
            .await
            .unwrap();
        replicas[1].nonce_take(&in_time).await.unwrap();
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        assert!(issued_at.elapsed() > ttl);
        assert!(matches!(
            replicas[1].nonce_take(&late).await,
            Err(StoreError::NonceExpired { .. })
        ));
        assert!(matches!(
            replicas[0].nonce_take(&late).await,
            Err(StoreError::NonceUnknown)
        ));
    }
}

macro_rules! suite_for {
    ($backend:ident, $fixture:ty, [$($test:ident),* $(,)?]) => {
        mod $backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let backend = <$fixture>::start().await;
                    suite::$test(&backend).await;
                }
            )*
        }
    };
}

macro_rules! suite_tests {
    ($($backend:ident: $fixture:ty),* $(,)?) => {
        $(
            suite_for!($backend, $fixture, [
                item1_get_put_and_revisions,
                item1_compare_and_swap_and_delete_follow_the_revision,
                item1_cas_race_exactly_one_wins,
                item1_delete_race_exactly_one_wins,
                item1_list_is_bounded_ordered_and_pages,
                item1_sizes_are_bounded,
                item7_nonce_single_use_across_replicas,
                item7_nonces_are_fresh_and_only_issued_ones_count,
                item7_nonce_expires,
            ]);
        )*
    };
}

suite_tests!(redb: RedbBackend, etcd: EtcdBackend);

/// Reopening a redb file keeps values, revisions and unused nonces, and revisions keep growing.
#[tokio::test]
async fn item1_redb_reopen_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redb:{}", dir.path().join("cms.redb").display());
    let k = key("hosts/h1");
    let (revision, nonce) = {
        let store = Store::open(&url).await.unwrap();
        let revision = written(
            store
                .compare_and_swap(&k, Expected::Absent, b"kept")
                .await
                .unwrap(),
        );
        (
            revision,
            store.nonce_issue(Duration::from_secs(60)).await.unwrap(),
        )
    };
    let store = Store::open(&url).await.unwrap();
    let entry = store.get(&k).await.unwrap().unwrap();
    assert_eq!(
        (entry.value.as_slice(), entry.revision),
        (&b"kept"[..], revision)
    );
    let next = store.put(&key("hosts/h2"), b"new").await.unwrap();
    assert!(next > revision);
    store.nonce_take(&nonce).await.unwrap();
}

/// redb is one process's file: a second open while one is open fails, naming the file.
#[tokio::test]
async fn item1_redb_second_open_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cms.redb");
    let url = format!("redb:{}", path.display());
    let _first = Store::open(&url).await.unwrap();
    let err = Store::open(&url).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Redb { .. }), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

/// Bad URLs fail with one clear line, before touching anything; an etcd that does not answer
/// fails within the request timeout.
#[tokio::test]
async fn item1_bad_store_urls_are_refused() {
    for (url, says) in [
        ("", "want redb:PATH or etcd:"),
        ("redb:", "no path"),
        ("etcd:", "no endpoint"),
        ("etcd:localhost:2379", "want http://HOST:PORT"),
        (
            "etcd:https://127.0.0.1:2379",
            "TLS to etcd is not supported",
        ),
        ("etcd:http://127.0.0.1:99999", "not a number in 1..=65535"),
        ("postgres://db", "unknown store"),
    ] {
        let err = Store::open(url).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Url { .. }), "{url:?}: {text}");
        assert!(text.contains(says), "{url:?}: {text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("cms.redb");
    let err = Store::open(&format!("redb:{}", missing.display()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Redb { .. }), "{err}");

    let port = common::etcd::free_port();
    let started = Instant::now();
    let err = Store::open(&format!("etcd:http://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Etcd { .. } | StoreError::EtcdTimeout { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

/// Outside a tokio runtime the store refuses instead of panicking.
#[test]
fn item1_store_without_a_runtime_is_an_error() {
    let future = Store::open("redb:/nonexistent/never-created.redb");
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(Err(StoreError::NoRuntime)) => {}
        other => panic!("{:?}", other.map(|r| r.map(|_| ()))),
    }
}

/// Issue item 7 on etcd: a nonce is a key under `keyshard/v1/nonce/` with a lease a little
/// longer than its lifetime, so etcd removes a nonce nobody takes; a taken nonce's lease is
/// revoked at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item7_etcd_nonces_live_under_a_lease() {
    let server = EtcdServer::start().await;
    let store = Store::open(&server.store_url()).await.unwrap();
    let endpoint = server.store_url().trim_start_matches("etcd:").to_owned();
    let mut raw = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();

    let forgotten = store.nonce_issue(Duration::from_millis(1)).await.unwrap();
    let taken = store.nonce_issue(Duration::from_secs(60)).await.unwrap();
    let lease_of = |nonce: &Nonce| format!("keyshard/v1/nonce/{}", nonce.to_hex());
    let found = raw.get(lease_of(&taken), None).await.unwrap();
    let lease = found.kvs()[0].lease();
    assert_ne!(lease, 0, "the nonce key has no lease");
    let ttl = raw.lease_time_to_live(lease, None).await.unwrap().ttl();
    assert!(
        (55..=62).contains(&ttl),
        "lease TTL {ttl} s for a 60 s nonce"
    );

    store.nonce_take(&taken).await.unwrap();
    assert!(
        raw.get(lease_of(&taken), None)
            .await
            .unwrap()
            .kvs()
            .is_empty()
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while raw.lease_time_to_live(lease, None).await.unwrap().ttl() != -1 {
        assert!(
            Instant::now() < deadline,
            "the taken nonce's lease was not revoked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nobody takes the 1 ms nonce: its lease (2 s, whole seconds) removes it.
    let deadline = Instant::now() + Duration::from_secs(6);
    while !raw
        .get(lease_of(&forgotten), None)
        .await
        .unwrap()
        .kvs()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the forgotten nonce is still in etcd"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An etcd endpoint that accepts connections and never answers: Store::open gives up within
/// the request timeout instead of hanging.
#[tokio::test]
async fn item1_etcd_that_never_answers_times_out() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let err = Store::open(&format!("etcd:http://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            StoreError::EtcdTimeout { .. } | StoreError::Etcd { .. }
        ),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < REQUEST_TIMEOUT + Duration::from_secs(2),
        "{took:?}: {err}"
    );
    drop(silent);
}
