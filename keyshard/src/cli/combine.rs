//! `keyshard combine`: rebuild the secret from fragment files.

use std::path::PathBuf;

use keyshard_core::KeyId;
use keyshard_core::quorum::{self, QuorumRequest};

use super::{CliError, load};
use keyshard_core::files::{Overwrite, SecretSink};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The dealer's public key: only fragments it signed are used.
    #[arg(long, value_name = "FILE.pub")]
    pub verify_key: PathBuf,
    /// Fragment files; unreadable or invalid ones are skipped with a reason.
    #[arg(value_name = "FRAGMENT", required = true)]
    pub fragments: Vec<PathBuf>,
    /// Write the secret to FILE (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Rebuild this key when the fragments belong to several.
    #[arg(long, value_name = "ID")]
    pub key_id: Option<String>,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug)]
pub struct Config {
    pub verify_key: PathBuf,
    pub fragments: Vec<PathBuf>,
    pub sink: SecretSink,
    pub key_id: Option<KeyId>,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let key_id = args
            .key_id
            .map(KeyId::new)
            .transpose()
            .map_err(|e| CliError::InvalidArgument(format!("--key-id: {e}")))?;
        Ok(Self {
            verify_key: args.verify_key,
            fragments: args.fragments,
            sink: SecretSink::new(
                args.out,
                if args.force {
                    Overwrite::Replace
                } else {
                    Overwrite::Refuse
                },
            ),
            key_id,
        })
    }
}

pub fn run(config: Config) -> Result<(), CliError> {
    let dealer = load::verifying_key(&config.verify_key)?;
    config.sink.check()?;
    let candidates: Vec<_> = config
        .fragments
        .iter()
        .map(|p| load::fragment_candidate(p))
        .collect();
    let request = QuorumRequest {
        dealer: &dealer,
        key_id: config.key_id.as_ref(),
        threshold: None,
        key_check_value: None,
    };
    let outcome = quorum::rebuild(&request, &candidates)?;
    for rejection in &outcome.rejected {
        eprintln!(
            "keyshard: skipped {}: {}",
            rejection.source, rejection.reason
        );
    }
    config.sink.deliver(&outcome.secret)?;
    let used: Vec<&str> = outcome.used.iter().map(|u| u.source.as_str()).collect();
    eprintln!(
        "keyshard: rebuilt key {} (epoch {}, deal {}) from {} of {} fragments: {}",
        outcome.key_id,
        outcome.epoch,
        outcome.deal,
        outcome.used.len(),
        candidates.len(),
        used.join(", ")
    );
    Ok(())
}
