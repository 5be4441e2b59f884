//! Releasing `sev` holders: only to a guest whose SEV-SNP report verifies against the policy,
//! bound to this request (REPORT_DATA = SHA-512(nonce || request key)); the coordinator has
//! already spent the nonce. The holders' data keys were unsealed from the TPM once at start, so a
//! release costs one report check, not a TPM round trip.

use std::sync::Arc;

use keyshard_core::HolderId;
use keyshard_core::broker::{Evidence, RefusalCode};
use zeroize::Zeroizing;

use super::at_rest::{self, DataKey};
use super::release::{HolderReleaser, Refusal, ReleaseCheck};
use keyshard_attest::snp::{Report, SnpPolicy, SnpVerifier, VcekStore, report_data_binding};

/// One `sev` holder's fragment, and the data key that opens it.
pub struct SevHolder {
    pub id: HolderId,
    pub key: DataKey,
    pub encrypted_fragment: Vec<u8>,
}

pub struct SevReleaser {
    verifier: Arc<SnpVerifier>,
    /// `None`: no policy was configured, and every release is refused (fail closed).
    policy: Option<SnpPolicy>,
    vceks: VcekStore,
    holders: Vec<SevHolder>,
}

impl SevReleaser {
    pub fn new(
        verifier: Arc<SnpVerifier>,
        policy: Option<SnpPolicy>,
        vceks: VcekStore,
        holders: Vec<SevHolder>,
    ) -> Self {
        Self {
            verifier,
            policy,
            vceks,
            holders,
        }
    }
}

impl HolderReleaser for SevReleaser {
    fn release(&self, check: &ReleaseCheck<'_>) -> Result<Zeroizing<Vec<u8>>, Refusal> {
        let holder = self
            .holders
            .iter()
            .find(|h| &h.id == check.holder)
            .ok_or_else(|| {
                Refusal::new(
                    RefusalCode::UnknownHolder,
                    format!("no sev holder {}", check.holder),
                )
            })?;
        let Evidence::Snp {
            nonce,
            report,
            vcek,
        } = check.evidence
        else {
            return Err(Refusal::new(
                RefusalCode::SnpEvidence,
                "an sev release needs an SNP report",
            ));
        };
        let policy = self.policy.as_ref().ok_or_else(|| {
            Refusal::new(RefusalCode::SnpPolicy, "no SEV-SNP policy is configured")
        })?;
        let report = Report::from_bytes(report)
            .map_err(|e| Refusal::new(RefusalCode::SnpEvidence, format!("SNP report: {e}")))?;
        let vcek_der: &[u8] = if vcek.is_empty() {
            self.vceks.lookup(&report).ok_or_else(|| {
                Refusal::new(
                    RefusalCode::SnpEvidence,
                    "no cached VCEK for this chip and TCB",
                )
            })?
        } else {
            vcek
        };
        let binding = report_data_binding(nonce, check.request_key);
        self.verifier
            .verify(&report, vcek_der, policy, &binding)
            .map_err(|e| {
                let code = if e.is_policy() {
                    RefusalCode::SnpPolicy
                } else {
                    RefusalCode::SnpEvidence
                };
                Refusal::new(code, format!("SNP: {e}"))
            })?;
        at_rest::decrypt(&holder.key, &holder.id, &holder.encrypted_fragment).map_err(|e| {
            Refusal::new(
                RefusalCode::Internal,
                format!("stored fragment of {}: {e}", holder.id),
            )
        })
    }
}
