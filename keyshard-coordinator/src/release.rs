//! What the coordinator answers: nonces on request, and releases that pass their holder's checks,
//! sealed to the request's key. Every answer goes to the audit log.
//!
//! The class-specific checks sit behind [`HolderReleaser`]: `tpm` holders attest the host, `sev`
//! holders check the guest's SNP report. The coordinator itself checks what every class shares:
//! the holder exists and has that class, an SNP nonce was issued to this VM, unused, recently.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use keyshard_core::HolderId;
use keyshard_core::broker::{Body, Evidence, HostQuote, Message, RefusalCode};
use keyshard_core::envelope::{self, PUBLIC_KEY_LEN, ReleaseContext};
use keyshard_core::holder::HolderClass;
use zeroize::Zeroizing;

use super::audit::{AuditEntry, AuditKind, AuditLog, Verdict};
use super::host_relay::{HostShareRelay, HostShareRequest};
use super::mailbox::RequestHandler;
use super::nonces::{Clock, NONCE_LIFETIME, NonceBook};
use super::rate_limit::{DEFAULT_RATE_LIMIT, RateLimit, RateLimiter};

/// A refusal as the guest sees it: a code and a reason (no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefusalCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// What a release request offers, for the holder's checks.
pub struct ReleaseCheck<'a> {
    pub vm_id: &'a str,
    pub holder: &'a HolderId,
    pub request_key: &'a [u8; PUBLIC_KEY_LEN],
    pub evidence: &'a Evidence,
}

/// Releases one class of holder: checks the evidence, returns the holder's signed fragment.
pub trait HolderReleaser: Send + Sync {
    fn release(&self, check: &ReleaseCheck<'_>) -> Result<Zeroizing<Vec<u8>>, Refusal>;

    /// [`Self::release`], and the host quote the answer carries for the guest to check (`tpm`
    /// releases that carried a guest nonce). The coordinator calls this one.
    fn release_attested(
        &self,
        check: &ReleaseCheck<'_>,
    ) -> Result<(Zeroizing<Vec<u8>>, Option<HostQuote>), Refusal> {
        self.release(check).map(|fragment| (fragment, None))
    }
}

pub struct Coordinator {
    holders: BTreeMap<HolderId, (HolderClass, Arc<dyn HolderReleaser>)>,
    /// `host` holders and their slot in the credential their shares are stored as.
    host_holders: BTreeMap<HolderId, u8>,
    /// Relays `host` releases; none: they are refused, saying so.
    host_relay: Option<Arc<dyn HostShareRelay>>,
    /// The VMs this key's shares are bound to (`keyshard init --vm-id`); others are refused.
    bound_vms: BTreeSet<String>,
    /// Requests per VM, refused beyond the limit before any work.
    rate: RateLimiter,
    nonce_books: Mutex<HashMap<String, Arc<NonceBook>>>,
    clock: Arc<dyn Clock>,
    audit: AuditLog,
}

impl Coordinator {
    /// A coordinator that answers the brokers of `bound_vms` only.
    pub fn new(
        clock: Arc<dyn Clock>,
        audit: AuditLog,
        bound_vms: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            holders: BTreeMap::new(),
            host_holders: BTreeMap::new(),
            host_relay: None,
            bound_vms: bound_vms.into_iter().collect(),
            rate: RateLimiter::new(DEFAULT_RATE_LIMIT, clock.clone()),
            nonce_books: Mutex::new(HashMap::new()),
            clock,
            audit,
        }
    }

    /// Writes out the audit log's pending repeat counts (on the way out: the log may outlive
    /// this call in a mailbox thread that is still winding down).
    pub fn flush_audit(&self) {
        self.audit.flush();
    }

    /// Replaces the per-VM rate limit ([`DEFAULT_RATE_LIMIT`] by default).
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate = RateLimiter::new(limit, self.clock.clone());
        self
    }

    /// Serves `holder` of `class` through `releaser`.
    pub fn add_holder(
        &mut self,
        holder: HolderId,
        class: HolderClass,
        releaser: Arc<dyn HolderReleaser>,
    ) {
        self.holders.insert(holder, (class, releaser));
    }

    /// Serves `holder`, a `host` holder in `slot` of its credential, through the relay.
    pub fn add_host_holder(&mut self, holder: HolderId, slot: u8) {
        self.host_holders.insert(holder, slot);
    }

    /// Relays the `host` holders' releases through `relay`.
    pub fn set_host_relay(&mut self, relay: Arc<dyn HostShareRelay>) {
        self.host_relay = Some(relay);
    }

    /// Whether `holder` is one this coordinator serves, of any class.
    fn serves(&self, holder: &HolderId) -> bool {
        self.holders.contains_key(holder) || self.host_holders.contains_key(holder)
    }

    /// A `host` release: relayed to the CMS and the shard host, whose answer the coordinator
    /// passes on as it came (sealed to the request key by the shard host).
    fn release_host(
        &self,
        vm_id: &str,
        holder: &HolderId,
        request_key: &[u8; PUBLIC_KEY_LEN],
        evidence: &Evidence,
    ) -> Result<Body, Refusal> {
        let slot = *self.host_holders.get(holder).ok_or_else(|| {
            Refusal::new(
                RefusalCode::UnknownHolder,
                format!("no host holder {holder} here"),
            )
        })?;
        if *evidence != Evidence::VmTpm {
            return Err(Refusal::new(
                RefusalCode::Malformed,
                "a host release carries VM TPM evidence (tag 3)",
            ));
        }
        let relay = self.host_relay.as_ref().ok_or_else(|| {
            Refusal::new(
                RefusalCode::HostShare,
                "this coordinator relays no host shares: it needs the VM's TPM (--vm-tcti) and \
                 a state placed through a CMS (keyshard init --cms)",
            )
        })?;
        let shard = relay.relay(&HostShareRequest {
            vm_id,
            holder,
            slot,
            request_key,
        })?;
        Ok(Body::HostReleased {
            holder_id: holder.clone(),
            credential: shard.credential,
            epoch: shard.epoch,
            index: shard.index,
            host: shard.host,
            released: shard.released,
        })
    }

    fn nonce_book(&self, vm_id: &str) -> Result<Arc<NonceBook>, Refusal> {
        let mut books = self
            .nonce_books
            .lock()
            .map_err(|_| Refusal::new(RefusalCode::Internal, "nonce book unavailable"))?;
        Ok(books
            .entry(vm_id.to_owned())
            .or_insert_with(|| Arc::new(NonceBook::new(self.clock.clone())))
            .clone())
    }

    fn issue_nonce(&self, vm_id: &str) -> Result<Body, Refusal> {
        let nonce = self
            .nonce_book(vm_id)?
            .issue()
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
        Ok(Body::Nonce {
            nonce,
            valid_for_ms: u32::try_from(NONCE_LIFETIME.as_millis()).unwrap_or(u32::MAX),
        })
    }

    fn release(
        &self,
        vm_id: &str,
        request_id: u64,
        class: HolderClass,
        holder: &HolderId,
        request_key: &[u8; PUBLIC_KEY_LEN],
        evidence: &Evidence,
    ) -> Result<Body, Refusal> {
        if class == HolderClass::Host {
            return self.release_host(vm_id, holder, request_key, evidence);
        }
        let (holder_class, releaser) = self.holders.get(holder).ok_or_else(|| {
            Refusal::new(
                RefusalCode::UnknownHolder,
                format!("no holder {holder} here"),
            )
        })?;
        if *holder_class != class {
            return Err(Refusal::new(
                RefusalCode::UnknownHolder,
                format!("holder {holder} is a {holder_class} holder, not {class}"),
            ));
        }
        if let Evidence::Snp { nonce, .. } = evidence {
            // Spent even if the evidence then fails: a nonce buys one attempt.
            self.nonce_book(vm_id)?
                .redeem(nonce)
                .map_err(|e| Refusal::new(RefusalCode::Nonce, e.to_string()))?;
        }
        let (fragment, host_quote) = releaser.release_attested(&ReleaseCheck {
            vm_id,
            holder,
            request_key,
            evidence,
        })?;
        let context = ReleaseContext {
            request_id,
            class,
            holder_id: holder.clone(),
        };
        let envelope = envelope::seal(request_key, &fragment, &context)
            .map_err(|e| Refusal::new(RefusalCode::Malformed, format!("request key: {e}")))?;
        Ok(Body::Released {
            class,
            holder_id: holder.clone(),
            envelope,
            host_quote,
        })
    }
}

/// The audit reason for a release naming a holder that does not exist: without the name, which
/// the guest chooses freely (the guest still hears it in the refusal).
const UNKNOWN_HOLDER_AUDITED: &str = "no such holder here";

impl RequestHandler for Coordinator {
    fn answer(&self, vm_id: &str, request: &Message) -> Body {
        let kind = match request.body {
            Body::NonceRequest => AuditKind::Nonce,
            _ => AuditKind::Release,
        };
        let mut entry = AuditEntry::new(vm_id, request.request_id, kind);
        // Cheap refusals first: a flood is refused before any TPM or SNP work.
        let answer = if !self.rate.allow(vm_id) {
            let limit = self.rate.limit();
            Err(Refusal::new(
                RefusalCode::RateLimited,
                format!(
                    "too many requests from this VM: at most {} at once, then {} a second; ask again later",
                    limit.burst, limit.per_second
                ),
            ))
        } else if !self.bound_vms.contains(vm_id) {
            Err(Refusal::new(
                RefusalCode::VmNotBound,
                format!("this key's shares are not bound to VM {vm_id}"),
            ))
        } else {
            match &request.body {
                Body::NonceRequest => self.issue_nonce(vm_id),
                Body::Release {
                    class,
                    holder_id,
                    request_key,
                    evidence,
                } => self.release(
                    vm_id,
                    request.request_id,
                    *class,
                    holder_id,
                    request_key,
                    evidence,
                ),
                _ => Err(Refusal::new(RefusalCode::UnknownKind, "not a request")),
            }
        };
        // The audit line names the holder only when it exists and the request got past the
        // rate limit: otherwise the name is the guest's free choice, and a new name per request
        // would open a new folded run (one line) per request.
        let rate_limited =
            matches!(&answer, Err(refusal) if refusal.code == RefusalCode::RateLimited);
        if let Body::Release {
            class, holder_id, ..
        } = &request.body
            && !rate_limited
        {
            if self.serves(holder_id) {
                entry.class = Some(class.to_string());
                entry.holder = Some(holder_id.to_string());
            } else {
                entry.reason = Some(UNKNOWN_HOLDER_AUDITED.to_owned());
            }
        }
        match answer {
            Ok(body) => {
                entry.verdict = match kind {
                    AuditKind::Nonce => Verdict::Issued,
                    AuditKind::Release => Verdict::Released,
                };
                self.audit.record(&entry);
                body
            }
            Err(refusal) => {
                if entry.reason.is_none() {
                    entry.reason = Some(refusal.reason.clone());
                }
                // A repeat is counted in the audit log; only the first of a run is logged.
                if self.audit.record(&entry) {
                    log::error!(
                        "{vm_id}: refused {kind:?} for {}: {}",
                        entry.holder.as_deref().unwrap_or("-"),
                        refusal.reason
                    );
                }
                Body::Refused {
                    code: refusal.code,
                    reason: refusal.reason,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
