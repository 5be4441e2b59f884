//! What the coordinator answers: nonces on request, and releases that pass their holder's checks,
//! sealed to the request's key. Every answer goes to the audit log.
//!
//! The class-specific checks sit behind [`HolderReleaser`]: `tpm` holders attest the host, `sev`
//! holders check the guest's SNP report. The coordinator itself checks what every class shares:
//! the holder exists and has that class, an SNP nonce was issued to this VM, unused, recently.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use keyshard_core::HolderId;
use keyshard_core::broker::{Body, Evidence, Message, RefusalCode};
use keyshard_core::envelope::{self, PUBLIC_KEY_LEN, ReleaseContext};
use keyshard_core::holder::HolderClass;
use zeroize::Zeroizing;

use super::audit::{AuditEntry, AuditLog, now_rfc3339};
use super::mailbox::RequestHandler;
use super::nonces::{Clock, NONCE_LIFETIME, NonceBook};

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
}

pub struct Coordinator {
    holders: BTreeMap<HolderId, (HolderClass, Arc<dyn HolderReleaser>)>,
    /// The VMs this key's shares are bound to (`keyshard init --vm-id`); others are refused.
    bound_vms: BTreeSet<String>,
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
            bound_vms: bound_vms.into_iter().collect(),
            nonce_books: Mutex::new(HashMap::new()),
            clock,
            audit,
        }
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
        let fragment = releaser.release(&ReleaseCheck {
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
        })
    }
}

impl RequestHandler for Coordinator {
    fn answer(&self, vm_id: &str, request: &Message) -> Body {
        let mut entry = AuditEntry {
            time: now_rfc3339(),
            vm: vm_id.to_owned(),
            request: format!("{:x}", request.request_id),
            kind: "release",
            class: None,
            holder: None,
            verdict: "refused",
            reason: None,
        };
        let answer = match &request.body {
            _ if !self.bound_vms.contains(vm_id) => {
                if let Body::Release {
                    class, holder_id, ..
                } = &request.body
                {
                    entry.class = Some(class.to_string());
                    entry.holder = Some(holder_id.to_string());
                } else {
                    entry.kind = "nonce";
                }
                Err(Refusal::new(
                    RefusalCode::VmNotBound,
                    format!("this key's shares are not bound to VM {vm_id}"),
                ))
            }
            Body::NonceRequest => {
                entry.kind = "nonce";
                self.issue_nonce(vm_id)
            }
            Body::Release {
                class,
                holder_id,
                request_key,
                evidence,
            } => {
                entry.class = Some(class.to_string());
                entry.holder = Some(holder_id.to_string());
                self.release(
                    vm_id,
                    request.request_id,
                    *class,
                    holder_id,
                    request_key,
                    evidence,
                )
            }
            _ => Err(Refusal::new(RefusalCode::UnknownKind, "not a request")),
        };
        let body = match answer {
            Ok(body) => {
                entry.verdict = if entry.kind == "nonce" {
                    "issued"
                } else {
                    "released"
                };
                body
            }
            Err(refusal) => {
                entry.reason = Some(refusal.reason.clone());
                log::error!(
                    "{vm_id}: refused {} for {}: {}",
                    entry.kind,
                    entry.holder.as_deref().unwrap_or("-"),
                    refusal.reason
                );
                Body::Refused {
                    code: refusal.code,
                    reason: refusal.reason,
                }
            }
        };
        self.audit.record(&entry);
        body
    }
}

#[cfg(test)]
mod tests;
