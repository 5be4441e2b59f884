//! The SEV-SNP ATTESTATION_REPORT as received: exactly 1184 raw bytes, kept unchanged for the
//! signature check, with the little-endian fields the verifier reads at their fixed offsets
//! (SNP firmware ABI, "ATTESTATION_REPORT Structure"; stable for report versions 2 to 5).

use std::fmt;

/// Length of every report version so far.
pub const REPORT_LEN: usize = 0x4A0;
/// Bytes `0..SIGNED_LEN` are what the VCEK signs.
pub const SIGNED_LEN: usize = 0x2A0;

pub const OFF_VERSION: usize = 0x00;
pub const OFF_GUEST_SVN: usize = 0x04;
pub const OFF_POLICY: usize = 0x08;
pub const OFF_VMPL: usize = 0x30;
pub const OFF_SIG_ALGO: usize = 0x34;
pub const OFF_CURRENT_TCB: usize = 0x38;
pub const OFF_PLATFORM_INFO: usize = 0x40;
/// bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY (0 VCEK, 1 VLEK, 7 none).
pub const OFF_KEY_INFO: usize = 0x48;
pub const OFF_REPORT_DATA: usize = 0x50;
pub const OFF_MEASUREMENT: usize = 0x90;
pub const OFF_HOST_DATA: usize = 0xC0;
pub const OFF_REPORTED_TCB: usize = 0x180;
/// Report version 3 and later: CPUID family, model, stepping.
pub const OFF_CPUID: usize = 0x188;
pub const OFF_CHIP_ID: usize = 0x1A0;
pub const OFF_COMMITTED_TCB: usize = 0x1E0;
pub const OFF_LAUNCH_TCB: usize = 0x1F0;
/// Signature r and s: 72 bytes each, little-endian, of which the low 48 are used.
pub const OFF_SIG_R: usize = 0x2A0;
pub const OFF_SIG_S: usize = 0x2E8;
pub const SIG_COMPONENT_LEN: usize = 72;

pub const MEASUREMENT_LEN: usize = 48;
pub const REPORT_DATA_LEN: usize = 64;
pub const CHIP_ID_LEN: usize = 64;

/// A hex text report may carry whitespace; anything longer than this is not a report.
const MAX_HEX_TEXT_LEN: usize = 4 * REPORT_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("an SNP report is {REPORT_LEN} bytes, this one is {0}")]
    Length(usize),
    #[error("not a raw {REPORT_LEN}-byte report, nor hex text: {0}")]
    NotHex(String),
    #[error("field at offset {offset:#x} lies outside the report")]
    Field { offset: usize },
}

pub type Result<T> = std::result::Result<T, ReportError>;

/// The guest policy word (offset 0x08): bits 7:0 ABI_MINOR, 15:8 ABI_MAJOR, then flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPolicy(pub u64);

impl GuestPolicy {
    /// The guest may run with SMT enabled on the host.
    pub const SMT: u64 = 1 << 16;
    /// Bit 17 is reserved and must be one (the firmware refuses to launch a guest otherwise).
    pub const RESERVED_ONE: u64 = 1 << 17;
    pub const MIGRATE_MA: u64 = 1 << 18;
    pub const DEBUG: u64 = 1 << 19;
    /// The guest may be activated on one socket only.
    pub const SINGLE_SOCKET: u64 = 1 << 20;

    /// The lowest firmware ABI the guest agreed to run on: (ABI_MAJOR, ABI_MINOR).
    pub fn abi_minimum(self) -> (u8, u8) {
        let [minor, major, ..] = self.0.to_le_bytes();
        (major, minor)
    }

    pub fn smt_allowed(self) -> bool {
        self.0 & Self::SMT != 0
    }

    pub fn single_socket(self) -> bool {
        self.0 & Self::SINGLE_SOCKET != 0
    }

    pub fn debug(self) -> bool {
        self.0 & Self::DEBUG != 0
    }

    pub fn migration_agent(self) -> bool {
        self.0 & Self::MIGRATE_MA != 0
    }

    pub fn reserved_one(self) -> bool {
        self.0 & Self::RESERVED_ONE != 0
    }
}

/// PLATFORM_INFO (offset 0x40): how the host platform was configured when the report was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformInfo(pub u64);

impl PlatformInfo {
    pub const SMT_EN: u64 = 1 << 0;
    pub const TSME_EN: u64 = 1 << 1;

    pub fn smt_enabled(self) -> bool {
        self.0 & Self::SMT_EN != 0
    }

    pub fn tsme_enabled(self) -> bool {
        self.0 & Self::TSME_EN != 0
    }
}

impl fmt::Display for PlatformInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for GuestPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A report's raw bytes and the fields read from them. The fields are copies of the raw bytes,
/// read once and never changed, so what is checked is what the signature covers.
#[derive(Clone, PartialEq, Eq)]
pub struct Report {
    raw: Box<[u8; REPORT_LEN]>,
    version: u32,
    guest_svn: u32,
    policy: GuestPolicy,
    vmpl: u32,
    sig_algo: u32,
    platform_info: PlatformInfo,
    key_info: u32,
    report_data: [u8; REPORT_DATA_LEN],
    measurement: [u8; MEASUREMENT_LEN],
    host_data: [u8; 32],
    reported_tcb: [u8; 8],
    chip_id: [u8; CHIP_ID_LEN],
    committed_tcb: [u8; 8],
    launch_tcb: [u8; 8],
    signature_r: [u8; SIG_COMPONENT_LEN],
    signature_s: [u8; SIG_COMPONENT_LEN],
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Report")
            .field("version", &self.version)
            .field("policy", &self.policy)
            .field("vmpl", &self.vmpl)
            .field("measurement", &hex::encode(self.measurement))
            .finish_non_exhaustive()
    }
}

/// `N` bytes at `offset`.
fn field<const N: usize>(raw: &[u8], offset: usize) -> Result<[u8; N]> {
    raw.get(offset..)
        .and_then(|tail| tail.first_chunk::<N>())
        .copied()
        .ok_or(ReportError::Field { offset })
}

fn u32_at(raw: &[u8], offset: usize) -> Result<u32> {
    field::<4>(raw, offset).map(u32::from_le_bytes)
}

impl Report {
    /// A raw report: exactly [`REPORT_LEN`] bytes, nothing tolerated.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let raw: Box<[u8; REPORT_LEN]> = Box::new(
            bytes
                .try_into()
                .map_err(|_| ReportError::Length(bytes.len()))?,
        );
        let r = raw.as_slice();
        Ok(Self {
            version: u32_at(r, OFF_VERSION)?,
            guest_svn: u32_at(r, OFF_GUEST_SVN)?,
            policy: GuestPolicy(u64::from_le_bytes(field(r, OFF_POLICY)?)),
            vmpl: u32_at(r, OFF_VMPL)?,
            sig_algo: u32_at(r, OFF_SIG_ALGO)?,
            platform_info: PlatformInfo(u64::from_le_bytes(field(r, OFF_PLATFORM_INFO)?)),
            key_info: u32_at(r, OFF_KEY_INFO)?,
            report_data: field(r, OFF_REPORT_DATA)?,
            measurement: field(r, OFF_MEASUREMENT)?,
            host_data: field(r, OFF_HOST_DATA)?,
            reported_tcb: field(r, OFF_REPORTED_TCB)?,
            chip_id: field(r, OFF_CHIP_ID)?,
            committed_tcb: field(r, OFF_COMMITTED_TCB)?,
            launch_tcb: field(r, OFF_LAUNCH_TCB)?,
            signature_r: field(r, OFF_SIG_R)?,
            signature_s: field(r, OFF_SIG_S)?,
            raw,
        })
    }

    /// A report as hex text (upper or lower case); ASCII whitespace anywhere is ignored.
    /// It must decode to exactly [`REPORT_LEN`] bytes.
    pub fn from_hex(text: &str) -> Result<Self> {
        if text.len() > MAX_HEX_TEXT_LEN {
            return Err(ReportError::NotHex(format!(
                "{} characters, more than {MAX_HEX_TEXT_LEN}",
                text.len()
            )));
        }
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = hex::decode(compact).map_err(|e| ReportError::NotHex(e.to_string()))?;
        Self::from_bytes(&bytes)
    }

    /// A report file's contents: exactly [`REPORT_LEN`] bytes are a raw report; anything else
    /// must be hex text that decodes to one. (A raw report is never valid hex text of a report:
    /// that is twice as long.)
    pub fn from_file_contents(bytes: &[u8]) -> Result<Self> {
        if bytes.len() == REPORT_LEN {
            return Self::from_bytes(bytes);
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ReportError::NotHex(format!("{} bytes of binary data", bytes.len())))?;
        Self::from_hex(text)
    }

    /// All 1184 bytes, as received.
    pub fn as_bytes(&self) -> &[u8; REPORT_LEN] {
        &self.raw
    }

    /// The bytes the signature covers, as received.
    pub fn signed_bytes(&self) -> &[u8; SIGNED_LEN] {
        // REPORT_LEN > SIGNED_LEN, so the chunk always exists; the fallback is unreachable.
        self.raw
            .first_chunk::<SIGNED_LEN>()
            .unwrap_or(&[0; SIGNED_LEN])
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn guest_svn(&self) -> u32 {
        self.guest_svn
    }

    pub fn policy(&self) -> GuestPolicy {
        self.policy
    }

    pub fn vmpl(&self) -> u32 {
        self.vmpl
    }

    pub fn sig_algo(&self) -> u32 {
        self.sig_algo
    }

    pub fn key_info(&self) -> u32 {
        self.key_info
    }

    pub fn report_data(&self) -> &[u8; REPORT_DATA_LEN] {
        &self.report_data
    }

    pub fn measurement(&self) -> &[u8; MEASUREMENT_LEN] {
        &self.measurement
    }

    pub fn host_data(&self) -> &[u8; 32] {
        &self.host_data
    }

    /// REPORTED_TCB as stored; its meaning depends on the product (see [`super::tcb::Tcb`]).
    pub fn reported_tcb(&self) -> [u8; 8] {
        self.reported_tcb
    }

    /// COMMITTED_TCB: the TCB the firmware will not roll back below.
    pub fn committed_tcb(&self) -> [u8; 8] {
        self.committed_tcb
    }

    /// LAUNCH_TCB: the TCB when the guest was launched (older than the current one if the
    /// firmware was updated while the guest ran).
    pub fn launch_tcb(&self) -> [u8; 8] {
        self.launch_tcb
    }

    pub fn platform_info(&self) -> PlatformInfo {
        self.platform_info
    }

    pub fn chip_id(&self) -> &[u8; CHIP_ID_LEN] {
        &self.chip_id
    }

    /// Signature r: 72 bytes little-endian.
    pub fn signature_r(&self) -> &[u8; SIG_COMPONENT_LEN] {
        &self.signature_r
    }

    /// Signature s: 72 bytes little-endian.
    pub fn signature_s(&self) -> &[u8; SIG_COMPONENT_LEN] {
        &self.signature_s
    }

    /// SIGNING_KEY (key_info bits 4:2): 0 is the VCEK.
    pub fn signing_key(&self) -> u32 {
        (self.key_info >> 2) & 0b111
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::fixtures::milan_report_bytes;

    #[test]
    fn real_report_fields() {
        let report = Report::from_bytes(&milan_report_bytes()).unwrap();
        assert_eq!(report.version, 2);
        assert_eq!(report.policy, GuestPolicy(0x30000));
        assert!(!report.policy.debug() && !report.policy.migration_agent());
        assert!(report.policy.reserved_one());
        assert_eq!(report.vmpl, 0);
        assert_eq!(report.sig_algo, 1);
        assert_eq!(report.signing_key(), 0);
        assert_eq!(report.reported_tcb, [3, 0, 0, 0, 0, 0, 8, 0x73]);
        assert_eq!(report.committed_tcb, [3, 0, 0, 0, 0, 0, 8, 0x73]);
        assert_eq!(report.launch_tcb, [3, 0, 0, 0, 0, 0, 8, 0x73]);
        // SMT on, TSME off; the guest allows SMT, asks for ABI 0.0, any socket.
        assert_eq!(report.platform_info, PlatformInfo(1));
        assert!(report.platform_info.smt_enabled() && !report.platform_info.tsme_enabled());
        assert!(report.policy.smt_allowed() && !report.policy.single_socket());
        assert_eq!(report.policy.abi_minimum(), (0, 0));
        assert_eq!(GuestPolicy(0x13_3301).abi_minimum(), (0x33, 0x01));
        assert_eq!(
            report.as_bytes().as_slice(),
            milan_report_bytes().as_slice()
        );
        assert_eq!(
            report.signed_bytes().as_slice(),
            &milan_report_bytes()[..SIGNED_LEN]
        );
        assert_eq!(
            report.measurement.as_slice(),
            &milan_report_bytes()[OFF_MEASUREMENT..OFF_MEASUREMENT + 48]
        );
    }

    #[test]
    fn length_is_strict() {
        let bytes = milan_report_bytes();
        assert_eq!(
            Report::from_bytes(&bytes[..REPORT_LEN - 1]),
            Err(ReportError::Length(REPORT_LEN - 1))
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Report::from_bytes(&longer),
            Err(ReportError::Length(REPORT_LEN + 1))
        );
        assert_eq!(Report::from_bytes(&[]), Err(ReportError::Length(0)));
    }

    #[test]
    fn hex_text_with_whitespace_and_raw_files_both_parse() {
        let bytes = milan_report_bytes();
        let hex_text = hex::encode_upper(&bytes);
        let wrapped: String = hex_text
            .as_bytes()
            .chunks(64)
            .map(|line| format!("{}\n", std::str::from_utf8(line).unwrap()))
            .collect();
        let from_hex = Report::from_file_contents(wrapped.as_bytes()).unwrap();
        let from_raw = Report::from_file_contents(&bytes).unwrap();
        assert_eq!(from_hex, from_raw);
    }

    #[test]
    fn malformed_files_are_refused() {
        let bytes = milan_report_bytes();
        // hex of a short report
        let short = hex::encode(&bytes[..100]);
        assert_eq!(
            Report::from_file_contents(short.as_bytes()),
            Err(ReportError::Length(100))
        );
        // binary data of the wrong length
        assert!(matches!(
            Report::from_file_contents(&[0xFF; 1000]),
            Err(ReportError::NotHex(_))
        ));
        // an odd number of hex digits, or a non-hex character
        assert!(matches!(
            Report::from_hex("abc"),
            Err(ReportError::NotHex(_))
        ));
        assert!(matches!(
            Report::from_hex("zz"),
            Err(ReportError::NotHex(_))
        ));
        assert!(matches!(
            Report::from_hex(&"0".repeat(MAX_HEX_TEXT_LEN + 2)),
            Err(ReportError::NotHex(_))
        ));
    }
}
