//! CLI errors and how they reach the user: one line each on stderr, and the exit code.

use std::path::PathBuf;

use keyshard_core::manifest::ManifestError;
use keyshard_core::quorum::QuorumError;

use crate::discovery::DiscoveryError;
use keyshard_core::files::FileError;

/// Exit code when fewer than k valid fragments were found.
pub const EXIT_QUORUM_NOT_MET: u8 = 2;
/// Exit code for every other error.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}: {source}", path.display())]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("no keyshard devices found (no block device serial starts with ksf- or ksb-)")]
    NoDevices,
    #[error("{0}")]
    Quorum(#[from] QuorumError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{bad} of {total} fragment sources could not be read or hold unparseable fragments")]
    ReadFailed { bad: usize, total: usize },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Quorum(QuorumError::NotMet { .. }) => EXIT_QUORUM_NOT_MET,
            _ => EXIT_FAILURE,
        }
    }

    /// The lines to print on stderr. For a quorum not met: one line per holder that was missing
    /// or rejected, then the count of valid fragments against k.
    pub fn report(&self) -> Vec<String> {
        let Self::Quorum(QuorumError::NotMet { rejected, .. }) = self else {
            return vec![self.to_string()];
        };
        let mut lines: Vec<String> = rejected.iter().map(ToString::to_string).collect();
        lines.push(self.to_string());
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyshard_core::quorum::{RejectReason, Rejection};

    #[test]
    fn quorum_not_met_lists_each_holder_then_the_count() {
        let error = CliError::Quorum(QuorumError::NotMet {
            valid: 1,
            needed: Some(2),
            rejected: vec![
                Rejection {
                    source: "vhd-2".into(),
                    reason: RejectReason::Unavailable("no device with serial ksf-vhd-2".into()),
                },
                Rejection {
                    source: "ksf-vhd-3 (/dev/vdd)".into(),
                    reason: RejectReason::BadSignature,
                },
                Rejection {
                    source: "ksf-vhd-1 (/dev/vdb)".into(),
                    reason: RejectReason::IncompleteEpoch {
                        epoch: 1,
                        valid: 1,
                        k: 2,
                    },
                },
            ],
        });
        assert_eq!(error.exit_code(), EXIT_QUORUM_NOT_MET);
        assert_eq!(
            error.report(),
            [
                "missing vhd-2: no device with serial ksf-vhd-2",
                "rejected ksf-vhd-3 (/dev/vdd): bad signature: tampered, or not signed by the trusted dealer key",
                "unused ksf-vhd-1 (/dev/vdb): epoch 1 has only 1 valid of the 2 shares it needs",
                "quorum not met: 1 valid fragment(s) of one epoch, 2 needed",
            ]
        );
    }

    #[test]
    fn other_errors_are_one_line_and_exit_1() {
        let error = CliError::File(keyshard_core::files::FileError::Terminal);
        assert_eq!(error.exit_code(), EXIT_FAILURE);
        assert_eq!(error.report().len(), 1);
    }
}
