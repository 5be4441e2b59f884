//! SEV-SNP attestation reports for `sev` share requests: the REPORT_DATA that binds a report to
//! one request (SHA-512 of the coordinator's nonce and the request's public key), and the real
//! report source, the firmware behind `/dev/sev-guest` (through the `sev` crate's ioctl).
//!
//! The `/dev/sev-guest` path runs only on SEV-SNP hardware; elsewhere it fails with
//! [`SnpError::NoDevice`]. Tests use a [`ReportSource`] double.

use std::io;
use std::path::Path;

use keyshard_core::broker::{MAX_REPORT_LEN, NONCE_LEN};
use keyshard_core::envelope::PUBLIC_KEY_LEN;
use sha2::{Digest, Sha512};

/// The SEV-SNP guest device; an SNP guest's kernel (`sev-guest` driver) provides it.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";
/// The REPORT_DATA field of an SNP report.
pub const REPORT_DATA_LEN: usize = 64;
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

/// SHA-512(nonce || request key): what the report for a share request must carry, so that a
/// replayed report (old nonce) or a relayed one (another key) does not verify.
pub fn report_data_binding(
    nonce: &[u8; NONCE_LEN],
    request_key: &[u8; PUBLIC_KEY_LEN],
) -> [u8; REPORT_DATA_LEN] {
    Sha512::new()
        .chain_update(nonce)
        .chain_update(request_key)
        .finalize()
        .into()
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

    #[test]
    fn the_binding_is_sha512_of_the_nonce_then_the_key() {
        let nonce = [1u8; 32];
        let key = [2u8; 32];
        let mut joined = nonce.to_vec();
        joined.extend_from_slice(&key);
        let expected: [u8; 64] = Sha512::digest(&joined).into();
        assert_eq!(report_data_binding(&nonce, &key), expected);
        assert_ne!(report_data_binding(&key, &nonce), expected);
        // The same known answer as the coordinator's binding: SHA-512 of 64 zero bytes.
        let zero: String = report_data_binding(&[0; 32], &[0; 32])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            zero,
            "7be9fda48f4179e611c698a73cff09faf72869431efee6eaad14de0cb44bbf66\
             503f752b7a8eb17083355f3ce6eb7d2806f236b25af96a24e22b887405c20081"
        );
    }

    #[test]
    fn without_the_guest_device_the_firmware_says_so() {
        if is_snp_guest() {
            return; // on SNP hardware the real path is taken
        }
        let error = SevGuestFirmware.report(&[0; 64]).unwrap_err();
        assert!(matches!(error, SnpError::NoDevice), "{error:?}");
        assert_eq!(
            error.to_string(),
            "not an SEV-SNP guest (no /dev/sev-guest)"
        );
    }
}
