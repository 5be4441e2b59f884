//! The etcd v3 backend (etcd-client, plain HTTP/2 gRPC; works against etcd 3.4): values under
//! `keyshard/v1/kv/`, compare-and-swap as one transaction on the key's mod revision, nonces under
//! `keyshard/v1/nonce/` attached to a lease and taken by a transactional delete.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto::{PbResponseOp, PbTxnOpResponse};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, KvClient,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnResponse,
};

use super::nonce::{self, Nonce};
use super::url::EtcdEndpoint;
use super::{
    CasOutcome, DeleteOutcome, Entry, Expected, Key, KeyPrefix, Listing, Repository, Result,
    Revision, StoreError, check_limit, check_value,
};

/// How long one call to etcd may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

const KV_PREFIX: &str = "keyshard/v1/kv/";
const NONCE_PREFIX: &str = "keyshard/v1/nonce/";

/// The largest answer accepted from etcd: a full listing ([`super::MAX_LIST_LIMIT`] values of
/// [`super::MAX_VALUE_LEN`] with their keys) is about 6.6 MB; tonic's default limit is 4 MiB.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// A store on an etcd cluster. Clones share one connection; every handle (every replica) that
/// names the same cluster sees the same values and nonces.
#[derive(Clone)]
pub struct EtcdStore {
    client: Arc<Client>,
    /// The endpoints, for messages.
    endpoints: Arc<str>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// etcd's range end for every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or there were none): "\0" means "to the end of the key space".
    vec![0]
}

fn kv_key(key: &str) -> Vec<u8> {
    format!("{KV_PREFIX}{key}").into_bytes()
}

fn nonce_key(nonce: &Nonce) -> Vec<u8> {
    format!("{NONCE_PREFIX}{}", nonce.to_hex()).into_bytes()
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` and checks that one of them answers.
    pub async fn connect(endpoints: &[EtcdEndpoint]) -> Result<Self> {
        let urls: Vec<String> = endpoints.iter().map(EtcdEndpoint::url).collect();
        let names: Arc<str> = Arc::from(urls.join(","));
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_require_leader(true);
        let client = call(&names, "connect", Client::connect(urls, Some(options))).await?;
        let store = Self {
            client: Arc::new(client),
            endpoints: names,
        };
        let mut maintenance = store.client.maintenance_client();
        let status = call(&store.endpoints, "status", maintenance.status()).await?;
        log::info!(
            "store: etcd {} (server {})",
            store.endpoints,
            status.version()
        );
        Ok(store)
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_ANSWER_BYTES)
    }

    async fn call<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        call(&self.endpoints, op, request).await
    }

    fn answer(&self, op: &'static str, reason: impl Into<String>) -> StoreError {
        StoreError::EtcdAnswer {
            endpoints: self.endpoints.to_string(),
            op,
            reason: reason.into(),
        }
    }

    /// The revision a write committed at: the header's revision of its answer.
    fn committed_revision(
        &self,
        op: &'static str,
        header: Option<&etcd_client::ResponseHeader>,
    ) -> Result<Revision> {
        let revision = header
            .ok_or_else(|| self.answer(op, "no header"))?
            .revision();
        u64::try_from(revision)
            .ok()
            .and_then(Revision::new)
            .ok_or_else(|| self.answer(op, format!("revision {revision}")))
    }

    /// An etcd key-value as an [`Entry`].
    fn entry(&self, op: &'static str, kv: &KeyValue) -> Result<Entry> {
        Ok(Entry {
            value: kv.value().to_vec(),
            revision: self.mod_revision(op, kv.mod_revision())?,
        })
    }

    fn mod_revision(&self, op: &'static str, revision: i64) -> Result<Revision> {
        u64::try_from(revision)
            .ok()
            .and_then(Revision::new)
            .ok_or_else(|| self.answer(op, format!("mod revision {revision}")))
    }

    /// The current revision from the `get` a failed transaction ran in its else branch.
    fn conflict_revision(&self, op: &'static str, txn: &TxnResponse) -> Result<Option<Revision>> {
        match first_response(txn) {
            Some(PbTxnOpResponse::ResponseRange(range)) => range
                .kvs
                .first()
                .map(|kv| self.mod_revision(op, kv.mod_revision))
                .transpose(),
            _ => Err(self.answer(op, "the transaction's else branch returned no range")),
        }
    }
}

/// The answer of a transaction's first operation.
fn first_response(txn: &TxnResponse) -> Option<&PbTxnOpResponse> {
    txn.0
        .responses
        .first()
        .and_then(|op: &PbResponseOp| op.response.as_ref())
}

/// Runs one etcd request under [`REQUEST_TIMEOUT`].
async fn call<T>(
    endpoints: &Arc<str>,
    op: &'static str,
    request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    tokio::runtime::Handle::try_current().map_err(|_| StoreError::NoRuntime)?;
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(source)) => Err(StoreError::Etcd {
            endpoints: endpoints.to_string(),
            op,
            source: Box::new(source),
        }),
        Err(_) => Err(StoreError::EtcdTimeout {
            endpoints: endpoints.to_string(),
            op,
            timeout: REQUEST_TIMEOUT,
        }),
    }
}

impl Repository for EtcdStore {
    async fn get(&self, key: &Key) -> Result<Option<Entry>> {
        let mut kv = self.kv();
        let answer = self.call("get", kv.get(kv_key(key.as_str()), None)).await?;
        answer
            .kvs()
            .first()
            .map(|found| self.entry("get", found))
            .transpose()
    }

    async fn put(&self, key: &Key, value: &[u8]) -> Result<Revision> {
        check_value(value)?;
        let mut kv = self.kv();
        let answer = self
            .call("put", kv.put(kv_key(key.as_str()), value, None))
            .await?;
        self.committed_revision("put", answer.header())
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expected: Expected,
        value: &[u8],
    ) -> Result<CasOutcome> {
        check_value(value)?;
        let name = kv_key(key.as_str());
        let compare = match expected {
            Expected::Absent => Compare::version(name.clone(), CompareOp::Equal, 0),
            // A revision beyond i64 is none etcd gave out: compare with -1, which never matches.
            Expected::Revision(revision) => Compare::mod_revision(
                name.clone(),
                CompareOp::Equal,
                i64::try_from(revision.get()).unwrap_or(-1),
            ),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(name.clone(), value, None)])
            .or_else([TxnOp::get(name, None)]);
        let mut kv = self.kv();
        let answer = self.call("compare-and-swap", kv.txn(txn)).await?;
        if answer.succeeded() {
            let revision = self.committed_revision("compare-and-swap", answer.header())?;
            return Ok(CasOutcome::Written(revision));
        }
        Ok(CasOutcome::Conflict {
            current: self.conflict_revision("compare-and-swap", &answer)?,
        })
    }

    async fn delete(&self, key: &Key, expected: Revision) -> Result<DeleteOutcome> {
        let name = kv_key(key.as_str());
        let compare = Compare::mod_revision(
            name.clone(),
            CompareOp::Equal,
            i64::try_from(expected.get()).unwrap_or(-1),
        );
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::delete(name.clone(), None)])
            .or_else([TxnOp::get(name, None)]);
        let mut kv = self.kv();
        let answer = self.call("delete", kv.txn(txn)).await?;
        if answer.succeeded() {
            return Ok(DeleteOutcome::Deleted);
        }
        Ok(DeleteOutcome::Conflict {
            current: self.conflict_revision("delete", &answer)?,
        })
    }

    async fn list(
        &self,
        prefix: &KeyPrefix,
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Listing> {
        check_limit(limit)?;
        let first = kv_key(prefix.as_str());
        let end = prefix_end(&first);
        let start = match start_after.map(|key| kv_key(key.as_str())) {
            // The smallest key after `after` is `after` followed by a zero byte.
            Some(mut after) if after >= first => {
                after.push(0);
                after
            }
            _ => first,
        };
        if start >= end {
            return Ok(Listing {
                entries: Vec::new(),
                more: false,
            });
        }
        // One more than asked for, to tell whether more follow.
        let ask = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(ask)
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let mut kv = self.kv();
        let answer = self.call("list", kv.get(start, Some(options))).await?;
        let mut entries = Vec::new();
        let mut more = answer.more();
        for found in answer.kvs() {
            if entries.len() == limit {
                more = true;
                break;
            }
            let key = std::str::from_utf8(found.key())
                .ok()
                .and_then(|name| name.strip_prefix(KV_PREFIX))
                .and_then(|name| Key::new(name).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    location: format!("etcd {} under {KV_PREFIX}", self.endpoints),
                    reason: "a key outside the key layout".to_owned(),
                })?;
            if !prefix.matches(key.as_str()) {
                return Err(self.answer("list", "a key outside the range asked for"));
            }
            entries.push((key, self.entry("list", found)?));
        }
        Ok(Listing { entries, more })
    }

    async fn nonce_issue(&self, ttl: Duration) -> Result<Nonce> {
        nonce::check_ttl(ttl)?;
        let nonce = Nonce::random()?;
        // The lease only collects the key: it outlives the expiry by up to two seconds (whole
        // seconds, and etcd's own minimum), and nonce_take checks the expiry itself.
        let lease_seconds = i64::try_from(ttl.as_secs())
            .unwrap_or(i64::MAX)
            .saturating_add(2);
        let mut lease = self.client.lease_client();
        let granted = self
            .call("grant nonce lease", lease.grant(lease_seconds, None))
            .await?;
        let expiry = nonce::expiry_ms(ttl)?;
        let name = nonce_key(&nonce);
        let txn = Txn::new()
            .when([Compare::version(name.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                name,
                expiry.to_be_bytes(),
                Some(PutOptions::new().with_lease(granted.id())),
            )]);
        let mut kv = self.kv();
        let answer = self.call("issue nonce", kv.txn(txn)).await?;
        if !answer.succeeded() {
            return Err(StoreError::Corrupt {
                location: format!("etcd {} under {NONCE_PREFIX}", self.endpoints),
                reason: "a fresh random nonce is already there".to_owned(),
            });
        }
        Ok(nonce)
    }

    async fn nonce_take(&self, nonce: &Nonce) -> Result<()> {
        let name = nonce_key(nonce);
        // Delete only if it is there: of several takers, on any replica, etcd lets exactly one
        // transaction see it.
        let txn = Txn::new()
            .when([Compare::version(name.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::delete(
                name,
                Some(DeleteOptions::new().with_prev_key()),
            )]);
        let mut kv = self.kv();
        let answer = self.call("take nonce", kv.txn(txn)).await?;
        if !answer.succeeded() {
            return Err(StoreError::NonceUnknown);
        }
        let deleted = match first_response(&answer) {
            Some(PbTxnOpResponse::ResponseDeleteRange(deleted)) if deleted.deleted == 1 => deleted,
            _ => return Err(StoreError::NonceUnknown),
        };
        let (expiry, lease) = match deleted.prev_kvs.first() {
            Some(prev) => match <[u8; 8]>::try_from(prev.value.as_slice()) {
                Ok(bytes) => (u64::from_be_bytes(bytes), prev.lease),
                Err(_) => {
                    return Err(StoreError::Corrupt {
                        location: format!("etcd {} nonce {nonce}", self.endpoints),
                        reason: format!("an expiry of {} bytes, not 8", prev.value.len()),
                    });
                }
            },
            None => return Err(self.answer("take nonce", "no previous value")),
        };
        self.release_lease(lease);
        nonce::check_not_expired(expiry, nonce::now_ms()?)
    }
}

impl EtcdStore {
    /// Revokes a used nonce's lease in the background, so leases do not wait out their TTL; a
    /// failure only leaves the lease to expire.
    fn release_lease(&self, lease: i64) {
        if lease == 0 {
            return;
        }
        let mut client = self.client.lease_client();
        let endpoints = self.endpoints.clone();
        tokio::spawn(async move {
            if let Err(e) = call(&endpoints, "revoke nonce lease", client.revoke(lease)).await {
                log::debug!("store: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"keyshard/v1/kv/"), b"keyshard/v1/kv0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
