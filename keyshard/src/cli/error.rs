//! CLI errors and how they reach the user: one line each on stderr, and the exit code.

use std::path::PathBuf;

use keyshard_core::dealer::DealError;
use keyshard_core::keys::KeyError;
use keyshard_core::policy::PolicyError;
use keyshard_core::quorum::QuorumError;

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
    Key { path: PathBuf, source: KeyError },
    #[error("{}: {source}", path.display())]
    Policy { path: PathBuf, source: PolicyError },
    #[error("{0}")]
    Deal(#[from] DealError),
    #[error("{0}")]
    Quorum(#[from] QuorumError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{bad} of {total} fragments are unreadable or fail the signature check")]
    InspectFailed { bad: usize, total: usize },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    #[error("SEV-SNP evidence refused: {0}")]
    SnpRefused(#[from] keyshard_attest::snp::VerifyError),
    #[error(transparent)]
    Init(#[from] keyshard_coordinator::init::InitError),
    #[error("reseal: {0}")]
    Reseal(#[from] keyshard_coordinator::reseal::ResealError),
    #[error(transparent)]
    Setup(#[from] keyshard_coordinator::setup::SetupError),
    #[error(transparent)]
    Daemon(#[from] vhost_keyshard::daemon::DaemonError),
    #[error("TPM: {0}")]
    Tpm(#[from] keyshard_tpm::TpmError),
    #[error("cms: {0}")]
    Cms(#[from] keyshard_cms::server::ServerError),
    #[error("store: {0}")]
    Store(#[from] keyshard_cms::store::StoreError),
    #[error(transparent)]
    Credential(#[from] super::credential::CredentialCliError),
    #[error("enrolment: {0}")]
    Enrol(#[from] super::enrol::EnrolError),
    #[error("lab: {0}")]
    Lab(#[from] keyshard_lab::LabError),
    #[error(transparent)]
    Fetch(#[from] super::fetch::FetchError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot handle SIGTERM/SIGINT: {0}")]
    Signals(std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Quorum(QuorumError::NotMet { .. }) => EXIT_QUORUM_NOT_MET,
            Self::Fetch(super::fetch::FetchError::QuorumNotMet { .. }) => EXIT_QUORUM_NOT_MET,
            _ => EXIT_FAILURE,
        }
    }

    /// The lines to print on stderr: the error, then one line per rejected fragment.
    pub fn report(&self) -> Vec<String> {
        let mut lines = vec![self.to_string()];
        if let Self::Quorum(QuorumError::NotMet { rejected, .. }) = self {
            lines.extend(rejected.iter().map(ToString::to_string));
        }
        lines
    }
}
