//! `keyshard policy check`: is a policy valid, and what does it mean.

use std::path::PathBuf;

use keyshard_core::HolderClass;
use keyshard_core::policy::Policy;

use super::CliError;
use keyshard_core::files;

const MAX_POLICY_LEN: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy file (TOML).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug)]
pub struct CheckConfig {
    pub file: PathBuf,
}

impl From<CheckArgs> for CheckConfig {
    fn from(args: CheckArgs) -> Self {
        Self { file: args.file }
    }
}

/// Reads and checks a policy file.
pub fn load(path: &std::path::Path) -> Result<Policy, CliError> {
    let text = files::read_text(path, MAX_POLICY_LEN)?;
    Policy::parse(&text).map_err(|source| CliError::Policy {
        path: path.to_owned(),
        source,
    })
}

/// "vhd 2, tpm 1": the classes that get shares.
fn holder_summary(policy: &Policy) -> String {
    HolderClass::ALL
        .into_iter()
        .filter(|c| policy.holders.get(*c) > 0)
        .map(|c| format!("{c} {}", policy.holders.get(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn check(config: CheckConfig) -> Result<(), CliError> {
    let policy = load(&config.file)?;
    println!(
        "{}: ok: {} shares ({}), threshold {}",
        config.file.display(),
        policy.shares(),
        holder_summary(&policy),
        policy.threshold
    );
    if let (Some(tpm), true) = (&policy.tpm, policy.holders.tpm > 0) {
        let pcrs: Vec<String> = tpm.pcrs.iter().map(u8::to_string).collect();
        println!(
            "tpm shares sealed to {} PCRs {}",
            tpm.pcr_bank.as_str(),
            pcrs.join(", ")
        );
    }
    if policy.host_visible_quorum() {
        println!(
            "warning: the {} vhd shares alone reach the threshold; whoever runs the host can rebuild \
             the secret (accepted because allow_host_visible_quorum = true)",
            policy.host_visible_shares()
        );
    }
    Ok(())
}
