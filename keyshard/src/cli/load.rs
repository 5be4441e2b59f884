//! Loading what the subcommands take as files: dealer keys and fragments.

use std::path::Path;

use keyshard_core::fragment::MAX_FRAGMENT_LEN;
use keyshard_core::keys::{self, DealerSigningKey, DealerVerifyingKey};
use keyshard_core::quorum::Candidate;

use super::CliError;
use keyshard_core::files;

/// PEM keys are a few hundred bytes; anything much larger is not a key.
const MAX_KEY_FILE_LEN: usize = 16 * 1024;

pub fn signing_key(path: &Path) -> Result<DealerSigningKey, CliError> {
    let pem = files::read_text(path, MAX_KEY_FILE_LEN)?;
    keys::signing_key_from_pem(&pem).map_err(|source| CliError::Key {
        path: path.to_owned(),
        source,
    })
}

pub fn verifying_key(path: &Path) -> Result<DealerVerifyingKey, CliError> {
    let pem = files::read_text(path, MAX_KEY_FILE_LEN)?;
    keys::verifying_key_from_pem(&pem).map_err(|source| CliError::Key {
        path: path.to_owned(),
        source,
    })
}

/// A fragment file as a quorum candidate; a file that cannot be read is an unavailable one.
/// Reading one byte past the largest valid fragment lets the parser report the size.
pub fn fragment_candidate(path: &Path) -> Candidate {
    let source = path.display().to_string();
    match files::read_limited(path, MAX_FRAGMENT_LEN + 1) {
        Ok(bytes) => Candidate {
            source,
            content: Ok(bytes),
        },
        Err(files::FileError::Io { source: e, .. }) => {
            Candidate::unavailable(source, e.to_string())
        }
        Err(e) => Candidate::unavailable(source, e.to_string()),
    }
}
