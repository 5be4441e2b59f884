//! What the coordinator requires of an SEV-SNP guest before it releases a `sev` share (TOML).
//! [`SnpPolicy::parse`] reads and checks it; a policy that parses is valid.
//!
//! ```toml
//! # launch digests of the guest images allowed (48 bytes, hex)
//! measurements = ["7a1e5c26...3e1a0dc39b2c60bd95b9c480cd81841f"]
//! allow_debug = false            # default false: a debug guest's memory is readable by the host
//! allow_migration_agent = false  # default false
//! vmpl = 0                       # default 0: the report must come from VMPL 0
//! min_report_version = 2         # default 2
//!
//! # The platform and the guest policy the guest was launched with (defaults shown):
//! allow_smt = true               # false: refuse SMT on at the host (PLATFORM_INFO.SMT_EN)
//!                                # and a guest policy that allows SMT (POLICY.SMT)
//! require_tsme = false           # true: refuse unless TSME is on (PLATFORM_INFO.TSME_EN)
//! require_single_socket = false  # true: refuse unless POLICY.SINGLE_SOCKET is set
//! min_abi = "0.0"                # the guest policy's ABI minimum (POLICY.ABI_MAJOR.ABI_MINOR)
//!                                # must be at least this: the guest refused older firmware
//!
//! [min_tcb]                      # required; component by component, and REPORTED_TCB,
//! bootloader = 3                 # COMMITTED_TCB and LAUNCH_TCB must each meet it
//! tee = 0
//! snp = 8
//! microcode = 115
//! # fmc = 1                      # Turin only
//! ```

use serde::Deserialize;

use super::report::MEASUREMENT_LEN;
use super::tcb::Tcb;

/// The oldest report version keyshard understands (older firmware wrote other layouts).
pub const MIN_REPORT_VERSION: u32 = 2;
/// The newest report version whose layout keyshard knows; newer ones are refused.
pub const MAX_REPORT_VERSION: u32 = 5;
/// Highest VMPL there is.
pub const MAX_VMPL: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnpPolicyError {
    #[error("not a valid SEV-SNP policy: {0}")]
    Syntax(String),
    #[error("measurements is empty: no guest could ever be released a share")]
    NoMeasurements,
    #[error("measurements[{index}] is not {MEASUREMENT_LEN} bytes of hex: {reason}")]
    Measurement { index: usize, reason: String },
    #[error("measurements[{index}] is listed twice")]
    DuplicateMeasurement { index: usize },
    #[error("vmpl = {0}: VMPLs are 0 to {MAX_VMPL}")]
    Vmpl(u32),
    #[error(
        "min_report_version = {0}: keyshard reads report versions {MIN_REPORT_VERSION} to {MAX_REPORT_VERSION}"
    )]
    ReportVersion(u32),
    #[error("min_abi = {0:?}: expected MAJOR.MINOR, each 0 to 255 (e.g. \"1.51\")")]
    Abi(String),
}

pub type Result<T> = std::result::Result<T, SnpPolicyError>;

/// A checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpPolicy {
    pub measurements: Vec<[u8; MEASUREMENT_LEN]>,
    pub allow_debug: bool,
    pub allow_migration_agent: bool,
    pub vmpl: u32,
    pub min_report_version: u32,
    /// REPORTED_TCB, COMMITTED_TCB and LAUNCH_TCB must each meet it.
    pub min_tcb: Tcb,
    pub platform: PlatformPolicy,
}

/// A firmware ABI version, MAJOR.MINOR, ordered as a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct AbiVersion {
    pub major: u8,
    pub minor: u8,
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl std::str::FromStr for AbiVersion {
    type Err = SnpPolicyError;

    fn from_str(text: &str) -> Result<Self> {
        let invalid = || SnpPolicyError::Abi(text.to_owned());
        let (major, minor) = text.split_once('.').ok_or_else(invalid)?;
        let part = |p: &str| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            p.parse::<u8>().map_err(|_| invalid())
        };
        Ok(Self {
            major: part(major)?,
            minor: part(minor)?,
        })
    }
}

/// What the policy asks of the host platform (PLATFORM_INFO) and of the guest policy the guest
/// was launched with, beyond debug and migration. The defaults ask nothing, because most hosts
/// run with SMT on and without TSME, and most guests launch with ABI minimum 0.0; an operator
/// who knows the hosts tightens them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformPolicy {
    /// False: refuse a report from a host with SMT on (a sibling thread shares the core's
    /// caches with the guest) or from a guest whose policy would accept SMT.
    pub allow_smt: bool,
    /// True: refuse unless the host runs with TSME (all of its memory encrypted).
    pub require_tsme: bool,
    /// True: refuse unless the guest policy pins the guest to one socket.
    pub require_single_socket: bool,
    /// The guest policy's ABI minimum must be at least this: a guest launched with a lower
    /// minimum would also have run on older SEV firmware.
    pub min_abi: AbiVersion,
}

impl Default for PlatformPolicy {
    fn default() -> Self {
        Self {
            allow_smt: true,
            require_tsme: false,
            require_single_socket: false,
            min_abi: AbiVersion::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    measurements: Vec<String>,
    #[serde(default)]
    allow_debug: bool,
    #[serde(default)]
    allow_migration_agent: bool,
    #[serde(default)]
    vmpl: u32,
    #[serde(default = "default_report_version")]
    min_report_version: u32,
    #[serde(default = "default_true")]
    allow_smt: bool,
    #[serde(default)]
    require_tsme: bool,
    #[serde(default)]
    require_single_socket: bool,
    #[serde(default)]
    min_abi: Option<String>,
    min_tcb: TcbFile,
}

fn default_report_version() -> u32 {
    MIN_REPORT_VERSION
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TcbFile {
    bootloader: u8,
    tee: u8,
    snp: u8,
    microcode: u8,
    #[serde(default)]
    fmc: Option<u8>,
}

fn measurement(index: usize, text: &str) -> Result<[u8; MEASUREMENT_LEN]> {
    let invalid = |reason: String| SnpPolicyError::Measurement { index, reason };
    let bytes = hex::decode(text.trim()).map_err(|e| invalid(e.to_string()))?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| invalid(format!("{len} bytes")))
}

impl SnpPolicy {
    pub fn parse(text: &str) -> Result<Self> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| SnpPolicyError::Syntax(one_line(&e)))?;
        if file.measurements.is_empty() {
            return Err(SnpPolicyError::NoMeasurements);
        }
        let mut measurements = Vec::with_capacity(file.measurements.len());
        for (index, text) in file.measurements.iter().enumerate() {
            let m = measurement(index, text)?;
            if measurements.contains(&m) {
                return Err(SnpPolicyError::DuplicateMeasurement { index });
            }
            measurements.push(m);
        }
        if file.vmpl > MAX_VMPL {
            return Err(SnpPolicyError::Vmpl(file.vmpl));
        }
        if !(MIN_REPORT_VERSION..=MAX_REPORT_VERSION).contains(&file.min_report_version) {
            return Err(SnpPolicyError::ReportVersion(file.min_report_version));
        }
        let min_abi = match &file.min_abi {
            Some(text) => text.trim().parse()?,
            None => AbiVersion::default(),
        };
        let t = file.min_tcb;
        Ok(Self {
            measurements,
            allow_debug: file.allow_debug,
            allow_migration_agent: file.allow_migration_agent,
            vmpl: file.vmpl,
            min_report_version: file.min_report_version,
            min_tcb: Tcb {
                bootloader: t.bootloader,
                tee: t.tee,
                snp: t.snp,
                microcode: t.microcode,
                fmc: t.fmc,
            },
            platform: PlatformPolicy {
                allow_smt: file.allow_smt,
                require_tsme: file.require_tsme,
                require_single_socket: file.require_single_socket,
                min_abi,
            },
        })
    }

    pub fn allows_measurement(&self, measurement: &[u8; MEASUREMENT_LEN]) -> bool {
        self.measurements.contains(measurement)
    }
}

/// toml's errors span several lines with a caret diagram; one line is enough here.
fn one_line(error: &toml::de::Error) -> String {
    let message = error.message().trim().to_owned();
    match error.span() {
        Some(span) => format!("{message} (at byte {})", span.start),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M1: &str = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f";

    fn text(body: &str) -> String {
        format!(
            "measurements = [\"{M1}\"]\n{body}\n[min_tcb]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n"
        )
    }

    #[test]
    fn defaults_are_strict() {
        let policy = SnpPolicy::parse(&text("")).unwrap();
        assert_eq!(policy.measurements.len(), 1);
        assert!(!policy.allow_debug);
        assert!(!policy.allow_migration_agent);
        assert_eq!(policy.vmpl, 0);
        assert_eq!(policy.min_report_version, 2);
        assert_eq!(
            policy.min_tcb,
            Tcb {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115,
                fmc: None
            }
        );
        assert_eq!(policy.platform, PlatformPolicy::default());
        assert!(policy.platform.allow_smt && !policy.platform.require_tsme);
        assert!(!policy.platform.require_single_socket);
        assert_eq!(policy.platform.min_abi, AbiVersion { major: 0, minor: 0 });
        let m: [u8; 48] = hex::decode(M1).unwrap().try_into().unwrap();
        assert!(policy.allows_measurement(&m));
        assert!(!policy.allows_measurement(&[0; 48]));
    }

    #[test]
    fn explicit_fields_are_read() {
        let policy = SnpPolicy::parse(&text(
            "allow_debug = true\nallow_migration_agent = true\nvmpl = 2\nmin_report_version = 3",
        ))
        .unwrap();
        assert!(policy.allow_debug && policy.allow_migration_agent);
        assert_eq!((policy.vmpl, policy.min_report_version), (2, 3));
    }

    #[test]
    fn platform_and_guest_policy_options_are_read() {
        let policy = SnpPolicy::parse(&text(
            "allow_smt = false\nrequire_tsme = true\nrequire_single_socket = true\nmin_abi = \"1.51\"",
        ))
        .unwrap();
        assert_eq!(
            policy.platform,
            PlatformPolicy {
                allow_smt: false,
                require_tsme: true,
                require_single_socket: true,
                min_abi: AbiVersion {
                    major: 1,
                    minor: 51
                },
            }
        );
        // Ordered as a pair: 1.51 is below 2.0 and above 1.9.
        assert!(AbiVersion { major: 2, minor: 0 } > policy.platform.min_abi);
        assert!(AbiVersion { major: 1, minor: 9 } < policy.platform.min_abi);
        for bad in ["1", "1.", ".5", "1.256", "a.b", "1.2.3", "-1.0", "+1.0", ""] {
            assert_eq!(
                SnpPolicy::parse(&text(&format!("min_abi = \"{bad}\""))),
                Err(SnpPolicyError::Abi(bad.to_owned())),
                "{bad}"
            );
        }
        assert!(matches!(
            SnpPolicy::parse(&text("allow_smt = \"no\"")),
            Err(SnpPolicyError::Syntax(_))
        ));
    }

    #[test]
    fn malformed_policies_are_refused() {
        assert!(matches!(
            SnpPolicy::parse(&text("allow_debgu = false")),
            Err(SnpPolicyError::Syntax(_))
        ));
        assert!(matches!(
            SnpPolicy::parse(&format!("measurements = [\"{M1}\"]\n")),
            Err(SnpPolicyError::Syntax(_))
        ));
        assert_eq!(
            SnpPolicy::parse(&text("vmpl = 4")),
            Err(SnpPolicyError::Vmpl(4))
        );
        assert_eq!(
            SnpPolicy::parse(&text("min_report_version = 1")),
            Err(SnpPolicyError::ReportVersion(1))
        );
        assert_eq!(
            SnpPolicy::parse(&text("min_report_version = 6")),
            Err(SnpPolicyError::ReportVersion(6))
        );
        let empty = text("").replace(&format!("\"{M1}\""), "");
        assert_eq!(
            SnpPolicy::parse(&empty),
            Err(SnpPolicyError::NoMeasurements)
        );
        let short = text("").replace(M1, &M1[..94]);
        assert!(matches!(
            SnpPolicy::parse(&short),
            Err(SnpPolicyError::Measurement { index: 0, .. })
        ));
        let twice = text("").replace(&format!("\"{M1}\""), &format!("\"{M1}\", \"{M1}\""));
        assert_eq!(
            SnpPolicy::parse(&twice),
            Err(SnpPolicyError::DuplicateMeasurement { index: 1 })
        );
        let unknown_tcb = format!("{}extra = 1\n", text(""));
        assert!(matches!(
            SnpPolicy::parse(&unknown_tcb),
            Err(SnpPolicyError::Syntax(_))
        ));
        let spl_too_big = text("").replace("microcode = 115", "microcode = 256");
        assert!(matches!(
            SnpPolicy::parse(&spl_too_big),
            Err(SnpPolicyError::Syntax(_))
        ));
    }
}
