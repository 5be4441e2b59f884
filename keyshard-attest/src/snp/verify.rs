//! [`SnpVerifier`]: SEV-SNP evidence checked in a fixed order, each step small and returning what
//! the next needs, each refusal a distinct [`VerifyError`]. Evidence first (the VCEK's chain to
//! the pinned roots, its extensions, the report's signature), then the coordinator's policy.

use std::fmt;
use std::sync::Arc;

use aws_lc_rs::signature::ParsedPublicKey;

use super::anchors::{AnchorError, TrustAnchors};
use super::cache::VerdictCache;
use super::chain::{self, ChainError};
use super::policy::{AbiVersion, MAX_REPORT_VERSION, SnpPolicy};
use super::product::Product;
use super::report::{
    CHIP_ID_LEN, GuestPolicy, MEASUREMENT_LEN, PlatformInfo, REPORT_DATA_LEN, Report, ReportError,
};
use super::signature::{self, SIG_ALGO_ECDSA_P384_SHA384, SignatureError};
use super::tcb::Tcb;
use super::vcek::{Vcek, VcekError, VcekInfo};

/// Why evidence was refused. Every check has its own variant, so logs and tests can tell them
/// apart; none carries secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed report: {0}")]
    Report(#[from] ReportError),
    #[error("{0}")]
    Vcek(#[from] VcekError),
    #[error("no trust anchors are pinned for {0} VCEKs")]
    NoAnchors(Product),
    #[error("certificate chain: {0}")]
    Chain(#[from] ChainError),
    #[error(
        "report signature algorithm {0} is not ECDSA P-384 with SHA-384 ({SIG_ALGO_ECDSA_P384_SHA384})"
    )]
    SignatureAlgorithm(u32),
    #[error("report signature: {0}")]
    ReportSignature(SignatureError),
    #[error("the report is signed by key {0} (key_info SIGNING_KEY), not by the VCEK (0)")]
    SigningKey(u32),
    #[error("report version {found} is outside the accepted {minimum}..={MAX_REPORT_VERSION}")]
    Version { found: u32, minimum: u32 },
    #[error("guest policy {0} has reserved bit 17 clear")]
    PolicyReservedBit(GuestPolicy),
    #[error("guest policy {0} allows debugging: the host could read the guest's memory")]
    Debug(GuestPolicy),
    #[error("guest policy {0} allows a migration agent")]
    MigrationAgent(GuestPolicy),
    #[error("the report comes from VMPL {found}, VMPL {required} is required")]
    Vmpl { found: u32, required: u32 },
    #[error("measurement {found} is not in the policy's allow-list")]
    Measurement { found: String },
    #[error("the reported TCB ({reported}) is not the VCEK's TCB ({vcek})")]
    TcbMismatch { reported: Tcb, vcek: Tcb },
    #[error("{field} ({found}) is below the minimum TCB ({minimum})")]
    TcbBelowMinimum {
        field: TcbField,
        found: Tcb,
        minimum: Tcb,
    },
    #[error("SMT is enabled on the host (PLATFORM_INFO {0}) and the policy does not allow SMT")]
    SmtEnabled(PlatformInfo),
    #[error("guest policy {0} allows SMT and the policy does not")]
    GuestAllowsSmt(GuestPolicy),
    #[error("TSME is not enabled on the host (PLATFORM_INFO {0}) and the policy requires it")]
    TsmeDisabled(PlatformInfo),
    #[error("guest policy {0} does not pin the guest to a single socket, as the policy requires")]
    NotSingleSocket(GuestPolicy),
    #[error("guest policy ABI minimum {found} is below the policy's min_abi {minimum}")]
    AbiBelowMinimum {
        found: AbiVersion,
        minimum: AbiVersion,
    },
    #[error("CHIP_ID is masked (all zero), so it cannot be matched to the VCEK")]
    ChipIdMasked,
    #[error("CHIP_ID is not the VCEK's hwID")]
    ChipId,
    #[error("REPORT_DATA is not the expected binding of this request's nonce and key")]
    ReportData,
}

impl VerifyError {
    /// True when the evidence is genuine but the policy refuses it; false when the evidence
    /// itself (report, VCEK, chain, signature) does not hold up.
    pub fn is_policy(&self) -> bool {
        !matches!(
            self,
            Self::Report(_)
                | Self::Vcek(_)
                | Self::NoAnchors(_)
                | Self::Chain(_)
                | Self::SignatureAlgorithm(_)
                | Self::ReportSignature(_)
                | Self::SigningKey(_)
        )
    }
}

pub type Result<T> = std::result::Result<T, VerifyError>;

/// The report's three TCB fields that the minimum applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcbField {
    /// What the VCEK was derived from.
    Reported,
    /// What the firmware will not roll back below.
    Committed,
    /// What the guest was launched under.
    Launch,
}

impl fmt::Display for TcbField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Reported => "REPORTED_TCB",
            Self::Committed => "COMMITTED_TCB",
            Self::Launch => "LAUNCH_TCB",
        })
    }
}

/// A VCEK whose chain to the pinned roots verified, with what its extensions say and its key
/// parsed for the report signature.
pub struct TrustedVcek {
    pub info: VcekInfo,
    key: ParsedPublicKey,
}

impl fmt::Debug for TrustedVcek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedVcek")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// A report whose signature verified under a trusted VCEK: genuine, not yet acceptable.
#[derive(Debug, Clone)]
pub struct Evidence<'a> {
    pub report: &'a Report,
    pub vcek: Arc<TrustedVcek>,
}

/// What a verified report says, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub product: Product,
    pub report_version: u32,
    pub policy: GuestPolicy,
    pub vmpl: u32,
    pub measurement: [u8; MEASUREMENT_LEN],
    pub reported_tcb: Tcb,
    pub chip_id: [u8; CHIP_ID_LEN],
}

/// Checks VCEKs (once each, cached) and reports against pinned trust anchors.
#[derive(Debug)]
pub struct SnpVerifier {
    anchors: TrustAnchors,
    cache: VerdictCache,
}

impl SnpVerifier {
    pub fn new(anchors: TrustAnchors) -> Self {
        Self {
            anchors,
            cache: VerdictCache::default(),
        }
    }

    /// With AMD's roots as the `sev` crate ships them: what production uses.
    pub fn with_amd_roots() -> std::result::Result<Self, AnchorError> {
        TrustAnchors::amd().map(Self::new)
    }

    /// Steps 1 to 3, cached per VCEK: [`trust_vcek`].
    pub fn trusted_vcek(&self, vcek_der: &[u8]) -> Result<Arc<TrustedVcek>> {
        self.cache.get_or_check(vcek_der, || {
            trust_vcek(&self.anchors, vcek_der).map(Arc::new)
        })
    }

    /// The evidence alone: the VCEK (cached) and the report's signature. No policy.
    pub fn verify_evidence<'a>(&self, report: &'a Report, vcek_der: &[u8]) -> Result<Evidence<'a>> {
        let vcek = self.trusted_vcek(vcek_der)?;
        check_signature(report, &vcek)?;
        Ok(Evidence { report, vcek })
    }

    /// Everything, in order: evidence, policy, then REPORT_DATA against the binding the caller
    /// expects (for a share request, [`keyshard_core::broker::report_data_binding`]).
    pub fn verify(
        &self,
        report: &Report,
        vcek_der: &[u8],
        policy: &SnpPolicy,
        expected_report_data: &[u8; REPORT_DATA_LEN],
    ) -> Result<Verdict> {
        let evidence = self.verify_evidence(report, vcek_der)?;
        let verdict = check_policy(&evidence, policy)?;
        check_report_data(&evidence, expected_report_data)?;
        Ok(verdict)
    }

    /// How many VCEK verdicts are cached.
    pub fn cached_vceks(&self) -> usize {
        self.cache.len()
    }

    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }
}

/// Steps 1 to 3, uncached: (1) parse the VCEK and pick the pinned roots of the product it
/// names; (2) ARK -> ASK -> VCEK; (3) read its extensions (TCB SPLs, hwID) and its P-384 key.
pub fn trust_vcek(anchors: &TrustAnchors, vcek_der: &[u8]) -> Result<TrustedVcek> {
    let vcek = Vcek::from_der(vcek_der)?;
    let pinned = anchors
        .get(vcek.product())
        .ok_or(VerifyError::NoAnchors(vcek.product()))?;
    chain::verify_chain(pinned, &vcek)?;
    let info = vcek.info()?;
    let key = signature::vcek_key(&info.public_key).map_err(|_| VcekError::NotP384)?;
    Ok(TrustedVcek { info, key })
}

/// Steps 4 to 6: the signature algorithm, the signature over the raw bytes, and that the VCEK
/// (not a VLEK or no key) is what signed.
pub fn check_signature(report: &Report, vcek: &TrustedVcek) -> Result<()> {
    if report.sig_algo() != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(VerifyError::SignatureAlgorithm(report.sig_algo()));
    }
    signature::verify_report_signature(report, &vcek.key).map_err(VerifyError::ReportSignature)?;
    match report.signing_key() {
        0 => Ok(()),
        other => Err(VerifyError::SigningKey(other)),
    }
}

/// What [`check_policy`] checks, in its order, for a user told which checks were not made.
pub const POLICY_CHECKS: [&str; 12] = [
    "report version",
    "debug bit",
    "migration-agent bit",
    "SMT (PLATFORM_INFO and guest policy)",
    "TSME",
    "single socket",
    "guest ABI minimum",
    "VMPL",
    "measurement",
    "REPORTED_TCB = the VCEK's TCB",
    "REPORTED_TCB, COMMITTED_TCB and LAUNCH_TCB >= the minimum TCB",
    "CHIP_ID = the VCEK's hwID",
];

/// Steps 7 to 13, on evidence whose signature verified.
pub fn check_policy(evidence: &Evidence<'_>, policy: &SnpPolicy) -> Result<Verdict> {
    let report = evidence.report;
    let vcek = &evidence.vcek.info;
    check_version(report, policy)?;
    check_guest_policy(report, policy)?;
    check_platform(report, policy)?;
    check_vmpl(report, policy)?;
    check_measurement(report, policy)?;
    let reported_tcb = check_tcb(report, vcek, policy)?;
    check_chip_id(report, vcek)?;
    Ok(Verdict {
        product: vcek.product,
        report_version: report.version(),
        policy: report.policy(),
        vmpl: report.vmpl(),
        measurement: *report.measurement(),
        reported_tcb,
        chip_id: *report.chip_id(),
    })
}

/// Step 7: a version whose layout is known, at least the policy's minimum.
fn check_version(report: &Report, policy: &SnpPolicy) -> Result<()> {
    if (policy.min_report_version..=MAX_REPORT_VERSION).contains(&report.version()) {
        Ok(())
    } else {
        Err(VerifyError::Version {
            found: report.version(),
            minimum: policy.min_report_version,
        })
    }
}

/// Step 8: the guest policy the guest was launched with: no debugging, no migration agent
/// (unless the policy allows them), and the must-be-one bit set.
fn check_guest_policy(report: &Report, policy: &SnpPolicy) -> Result<()> {
    let guest = report.policy();
    if !guest.reserved_one() {
        return Err(VerifyError::PolicyReservedBit(guest));
    }
    if guest.debug() && !policy.allow_debug {
        return Err(VerifyError::Debug(guest));
    }
    if guest.migration_agent() && !policy.allow_migration_agent {
        return Err(VerifyError::MigrationAgent(guest));
    }
    Ok(())
}

/// Step 8b: the platform (PLATFORM_INFO) and the rest of the guest policy, as far as the
/// policy asks: SMT, TSME, a single socket, the ABI minimum.
fn check_platform(report: &Report, policy: &SnpPolicy) -> Result<()> {
    let wanted = &policy.platform;
    let platform = report.platform_info();
    let guest = report.policy();
    if !wanted.allow_smt {
        if platform.smt_enabled() {
            return Err(VerifyError::SmtEnabled(platform));
        }
        if guest.smt_allowed() {
            return Err(VerifyError::GuestAllowsSmt(guest));
        }
    }
    if wanted.require_tsme && !platform.tsme_enabled() {
        return Err(VerifyError::TsmeDisabled(platform));
    }
    if wanted.require_single_socket && !guest.single_socket() {
        return Err(VerifyError::NotSingleSocket(guest));
    }
    let (major, minor) = guest.abi_minimum();
    let found = AbiVersion { major, minor };
    if found < wanted.min_abi {
        return Err(VerifyError::AbiBelowMinimum {
            found,
            minimum: wanted.min_abi,
        });
    }
    Ok(())
}

/// Step 9: the privilege level that asked for the report.
fn check_vmpl(report: &Report, policy: &SnpPolicy) -> Result<()> {
    if report.vmpl() == policy.vmpl {
        Ok(())
    } else {
        Err(VerifyError::Vmpl {
            found: report.vmpl(),
            required: policy.vmpl,
        })
    }
}

/// Step 10: the launch measurement is one the policy allows.
fn check_measurement(report: &Report, policy: &SnpPolicy) -> Result<()> {
    if policy.allows_measurement(report.measurement()) {
        Ok(())
    } else {
        Err(VerifyError::Measurement {
            found: hex::encode(report.measurement()),
        })
    }
}

/// Step 11: REPORTED_TCB is the VCEK's (the VCEK is derived from it), and it, COMMITTED_TCB
/// and LAUNCH_TCB each meet the minimum component by component: a guest launched before a
/// firmware update, or on a platform whose committed TCB still allows a rollback, is refused
/// like one reporting an old TCB. Returns REPORTED_TCB.
fn check_tcb(report: &Report, vcek: &VcekInfo, policy: &SnpPolicy) -> Result<Tcb> {
    let reported = Tcb::from_bytes(vcek.product, report.reported_tcb());
    if reported != vcek.tcb {
        return Err(VerifyError::TcbMismatch {
            reported,
            vcek: vcek.tcb,
        });
    }
    for (field, raw) in [
        (TcbField::Reported, report.reported_tcb()),
        (TcbField::Committed, report.committed_tcb()),
        (TcbField::Launch, report.launch_tcb()),
    ] {
        let found = Tcb::from_bytes(vcek.product, raw);
        if !found.meets(&policy.min_tcb) {
            return Err(VerifyError::TcbBelowMinimum {
                field,
                found,
                minimum: policy.min_tcb,
            });
        }
    }
    Ok(reported)
}

/// Step 12: CHIP_ID names the VCEK's chip.
fn check_chip_id(report: &Report, vcek: &VcekInfo) -> Result<()> {
    if report.chip_id().iter().all(|&b| b == 0) {
        return Err(VerifyError::ChipIdMasked);
    }
    if vcek.product.chip_id_matches(&vcek.hwid, report.chip_id()) {
        Ok(())
    } else {
        Err(VerifyError::ChipId)
    }
}

/// Step 13: REPORT_DATA is what the caller expects (the nonce binding).
pub fn check_report_data(evidence: &Evidence<'_>, expected: &[u8; REPORT_DATA_LEN]) -> Result<()> {
    if evidence.report.report_data() == expected {
        Ok(())
    } else {
        Err(VerifyError::ReportData)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::fixtures::{MILAN_VCEK_DER, milan_report_bytes};
    use crate::snp::policy::PlatformPolicy;

    fn real_policy(report: &Report) -> SnpPolicy {
        SnpPolicy {
            measurements: vec![*report.measurement()],
            allow_debug: false,
            allow_migration_agent: false,
            vmpl: 0,
            min_report_version: 2,
            min_tcb: Tcb {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115,
                fmc: None,
            },
            platform: PlatformPolicy::default(),
        }
    }

    #[test]
    fn real_milan_evidence_verifies_with_a_matching_policy() {
        let verifier = SnpVerifier::with_amd_roots().unwrap();
        let report = Report::from_bytes(&milan_report_bytes()).unwrap();
        let verdict = verifier
            .verify(
                &report,
                MILAN_VCEK_DER,
                &real_policy(&report),
                report.report_data(),
            )
            .unwrap();
        assert_eq!(verdict.product, Product::Milan);
        assert_eq!(verdict.reported_tcb.microcode, 115);
        assert_eq!(verifier.cached_vceks(), 1);
        // The same VCEK again: served from the cache.
        verifier.verify_evidence(&report, MILAN_VCEK_DER).unwrap();
        assert_eq!(verifier.cached_vceks(), 1);
    }

    #[test]
    fn refusals_on_real_evidence() {
        let verifier = SnpVerifier::with_amd_roots().unwrap();
        let report = Report::from_bytes(&milan_report_bytes()).unwrap();
        let policy = real_policy(&report);
        let err = verifier
            .verify(&report, MILAN_VCEK_DER, &policy, &[0; 64])
            .unwrap_err();
        assert_eq!(err, VerifyError::ReportData);
        assert!(err.is_policy());
        let strict = SnpPolicy {
            min_tcb: Tcb {
                microcode: 116,
                ..policy.min_tcb
            },
            ..policy.clone()
        };
        let err = verifier
            .verify(&report, MILAN_VCEK_DER, &strict, report.report_data())
            .unwrap_err();
        assert!(matches!(err, VerifyError::TcbBelowMinimum { .. }), "{err}");
        let newer = SnpPolicy {
            min_report_version: 3,
            ..policy
        };
        let err = verifier
            .verify(&report, MILAN_VCEK_DER, &newer, report.report_data())
            .unwrap_err();
        assert_eq!(
            err,
            VerifyError::Version {
                found: 2,
                minimum: 3
            }
        );
    }

    #[test]
    fn evidence_refusals_are_not_policy_refusals() {
        let verifier = SnpVerifier::new(TrustAnchors::none());
        let report = Report::from_bytes(&milan_report_bytes()).unwrap();
        let err = verifier
            .verify_evidence(&report, MILAN_VCEK_DER)
            .unwrap_err();
        assert_eq!(err, VerifyError::NoAnchors(Product::Milan));
        assert!(!err.is_policy());
        let mut bytes = milan_report_bytes();
        bytes[0x34] = 2;
        let other_algo = Report::from_bytes(&bytes).unwrap();
        let amd = SnpVerifier::with_amd_roots().unwrap();
        assert_eq!(
            amd.verify_evidence(&other_algo, MILAN_VCEK_DER)
                .unwrap_err(),
            VerifyError::SignatureAlgorithm(2)
        );
    }
}
