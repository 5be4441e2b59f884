//! `keyshard policy check`: is a policy valid, and what does it mean.

use std::path::PathBuf;

use keyshard_core::HolderClass;
use keyshard_core::adversary::Adversary;
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
    for line in describe(&policy) {
        println!(
            "{}",
            line.replace("{file}", &config.file.display().to_string())
        );
    }
    Ok(())
}

/// What `policy check` prints for a valid policy: the shares, the PCRs, and for each adversary
/// whether the policy resists it. `{file}` stands for the policy's path.
pub fn describe(policy: &Policy) -> Vec<String> {
    let mut lines = vec![format!(
        "{{file}}: ok: {} shares ({}), threshold {}",
        policy.shares(),
        holder_summary(policy),
        policy.threshold
    )];
    let pcrs = policy.tpm.as_ref().map(|tpm| {
        let list: Vec<String> = tpm.pcrs.iter().map(u8::to_string).collect();
        format!("{} PCRs {}", tpm.pcr_bank.as_str(), list.join(", "))
    });
    let sealed_classes: Vec<&str> = [HolderClass::Tpm, HolderClass::Sev]
        .into_iter()
        .filter(|c| policy.holders.get(*c) > 0)
        .map(HolderClass::as_str)
        .collect();
    let sealed = !sealed_classes.is_empty();
    if let (Some(pcrs), true) = (&pcrs, sealed) {
        lines.push(format!(
            "{} shares sealed to {pcrs}",
            sealed_classes.join(" and ")
        ));
    }
    if let Some(evidence) = policy.host_evidence().filter(|_| policy.holders.host > 0) {
        lines.push(format!(
            "host shares released to {evidence} evidence: {}",
            evidence.explanation()
        ));
    }
    for exposure in policy.exposures() {
        let adversary = exposure.adversary;
        lines.push(format!("{adversary}: {exposure}"));
        match adversary {
            Adversary::ChangedBootChain => lines.push(match (&pcrs, sealed) {
                (Some(pcrs), true) => format!(
                    "  only if {pcrs} measure the change: a change they do not measure is not \
                     detected, and that adversary is then root on this host"
                ),
                _ => "  no share is sealed to the TPM, so the boot state is not checked".to_owned(),
            }),
            Adversary::HostRoot if !exposure.resists() => lines.push(
                "  accepted because allow_host_reachable_quorum = true: root on this host can \
                 rebuild the secret without the guest"
                    .to_owned(),
            ),
            _ => {}
        }
    }
    if policy.holders.recovery > 0 {
        let with =
            |adversary| policy.exposure(adversary).shares() + u32::from(policy.holders.recovery);
        lines.push(format!(
            "recovery share: kept offline, so none of these obtains it; a stolen state directory \
             together with it obtains {} of the {} shares needed",
            with(Adversary::StolenStateDirectory),
            policy.threshold
        ));
        lines.push(format!(
            "  only while it is kept off this host: a recovery file or code left on it is read by \
             a changed firmware or boot chain too, which then obtains {} of the {} shares needed",
            with(Adversary::ChangedBootChain),
            policy.threshold
        ));
    }
    lines
}
