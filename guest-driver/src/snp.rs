//! SEV-SNP attestation reports for `sev` share requests: the REPORT_DATA that binds a report to
//! one request (SHA-512 of the coordinator's nonce and the request's public key), and the real
//! report source, the firmware behind `/dev/sev-guest` (through the `sev` crate's ioctl).
//!
//! The `/dev/sev-guest` path runs only on SEV-SNP hardware; elsewhere it fails with
//! [`SnpError::NoDevice`]. Tests use a [`ReportSource`] double.

use std::io;
use std::path::Path;

use keyshard_core::broker::MAX_REPORT_LEN;
pub use keyshard_core::broker::{REPORT_DATA_LEN, report_data_binding};

/// The SEV-SNP guest device; an SNP guest's kernel (`sev-guest` driver) provides it.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";
/// The VMPL the report is asked for: the coordinator accepts only VMPL 0.
const REPORT_VMPL: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum SnpError {
    #[error("not an SEV-SNP guest (no {SEV_GUEST_DEVICE})")]
    NoDevice,
    #[error("cannot open {SEV_GUEST_DEVICE}: {0}")]
    Open(io::Error),
    #[error("SNP_GET_REPORT failed: {0}")]
    Firmware(String),
    #[error("the firmware returned a report of {len} bytes, outside 1..={MAX_REPORT_LEN}")]
    ReportLength { len: usize },
}

pub type Result<T> = std::result::Result<T, SnpError>;

/// Where attestation reports come from: the firmware, or a test double.
pub trait ReportSource: Send {
    /// A fresh report carrying `report_data`, raw as the firmware signed it.
    fn report(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Vec<u8>>;
}

/// Whether this machine looks like an SEV-SNP guest: its guest device exists.
pub fn is_snp_guest() -> bool {
    Path::new(SEV_GUEST_DEVICE).exists()
}

/// The AMD secure processor, reached through `/dev/sev-guest`.
#[derive(Debug, Default)]
pub struct SevGuestFirmware;

impl ReportSource for SevGuestFirmware {
    fn report(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Vec<u8>> {
        let mut firmware = sev::firmware::guest::Firmware::open().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                SnpError::NoDevice
            } else {
                SnpError::Open(e)
            }
        })?;
        // Message version None: version 1.
        let report = firmware
            .get_report(None, Some(*report_data), Some(REPORT_VMPL))
            .map_err(|e| SnpError::Firmware(e.to_string()))?;
        if report.is_empty() || report.len() > MAX_REPORT_LEN {
            return Err(SnpError::ReportLength { len: report.len() });
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere and checks something everywhere (it used to return early, as a pass, on
    /// SNP hardware): without /dev/sev-guest the firmware says so; with it, the firmware
    /// answers a report of the firmware's length carrying our REPORT_DATA. Only the first
    /// branch runs here; the second runs on SEV-SNP guests only.
    #[test]
    fn the_firmware_answers_only_where_the_guest_device_exists() {
        let report_data = [0x5A; 64];
        if !is_snp_guest() {
            let error = SevGuestFirmware.report(&report_data).unwrap_err();
            assert!(matches!(error, SnpError::NoDevice), "{error:?}");
            assert_eq!(
                error.to_string(),
                "not an SEV-SNP guest (no /dev/sev-guest)"
            );
        } else {
            let report = SevGuestFirmware.report(&report_data).unwrap();
            // ATTESTATION_REPORT: 0x4A0 bytes, REPORT_DATA at 0x50.
            assert_eq!(report.len(), 0x4A0);
            assert_eq!(report.get(0x50..0x90), Some(&report_data[..]));
        }
    }
}
