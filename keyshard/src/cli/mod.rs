//! The `keyshard` command line: argument structs, their validation into configs, and dispatch.
//! Each subcommand lives in its own module with `Args` (what clap parses), `Config` (what was
//! validated, via `TryFrom<Args>`) and `run`.

pub mod cms;
pub mod cms_client;
pub mod combine;
pub mod coordinator;
pub mod credential;
pub mod enrol;
pub mod error;
pub mod fetch;
pub mod host_relay;
pub mod init;
pub mod inspect;
pub mod instance;
pub mod keygen;
pub mod lab;
mod load;
pub mod policy;
pub mod reseal;
pub mod shard_host;
pub mod snp;
pub mod split;

use clap::{Parser, Subcommand};

pub use error::CliError;

/// keyshard: a secret only a quorum of attested holders can rebuild.
#[derive(Debug, Parser)]
#[command(name = "keyshard", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a dealer key pair (Ed25519, PKCS#8 PEM): FILE (0600) and FILE.pub.
    Keygen(keygen::Args),
    /// Split a secret k of n into signed fragment files.
    Split(split::Args),
    /// Rebuild the secret from fragment files.
    Combine(combine::Args),
    /// Show fragment metadata (never share bytes).
    Inspect(inspect::Args),
    /// Sharing policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// AMD SEV-SNP attestation evidence.
    Snp(snp::Args),
    /// Set up a coordinator state directory: deal a key by a policy, seal tpm/sev shares to the TPM.
    Init(init::Args),
    /// Serve broker mailboxes (one per VM) and release attested shares.
    Coordinator(coordinator::Args),
    /// Re-seal tpm/sev shares to the current PCRs with the recovery share (after a firmware update).
    Reseal(reseal::Args),
    /// Serve the credential management service (HTTPS JSON API) until SIGTERM.
    Cms(cms::Args),
    /// Client side of the credential service: client keys, put, shard map.
    #[command(subcommand)]
    Credential(credential::Command),
    /// Serve a shard host: register its TPM-held decrypt key with the CMS, release shards to attested instances over HTTPS, until SIGTERM.
    ShardHost(shard_host::Args),
    /// Compute instances: enrol an instance's TPM and register its golden PCRs with the CMS.
    #[command(subcommand)]
    Instance(instance::Command),
    /// A local lab on loopback: CMS, shard hosts, instance TPM (development only).
    #[command(subcommand)]
    Lab(lab::Command),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file and say what it means.
    Check(policy::CheckArgs),
}

/// A clap usage error as one line: the message (arguments it lists joined with commas), without
/// the `error:` prefix, the usage block and the hint that follow it.
pub fn usage_error_line(error: &clap::Error) -> String {
    keyshard_core::usage::one_line(&error.render().to_string())
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Keygen(args) => keygen::run(args.try_into()?),
        Command::Split(args) => split::run(args.try_into()?),
        Command::Combine(args) => combine::run(args.try_into()?),
        Command::Inspect(args) => inspect::run(args.try_into()?),
        Command::Policy(PolicyCommand::Check(args)) => policy::check(args.into()),
        Command::Snp(args) => snp::run(args.try_into()?),
        Command::Init(args) => init::run(args.try_into()?),
        Command::Coordinator(args) => coordinator::run(args.try_into()?),
        Command::Reseal(args) => reseal::run(args.try_into()?),
        Command::Cms(args) => cms::run(args.try_into()?),
        Command::Credential(command) => credential::run(command),
        Command::ShardHost(args) => shard_host::run(args.try_into()?),
        Command::Instance(command) => instance::run(command),
        Command::Lab(command) => lab::run(command),
    }
}
