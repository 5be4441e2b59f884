//! The `keyshard-guest` command line: argument structs, their validation into configs, and
//! dispatch. Each subcommand lives in its own module with `Args` (what clap parses), `Config`
//! (what was validated, via `TryFrom<Args>`) and `run`.

pub mod devices;
pub mod error;
pub mod read;
pub mod sources;
pub mod unlock;
pub mod worker;

use clap::{Parser, Subcommand};

pub use error::CliError;

/// The program name, which prefixes every line on stderr.
pub const PROGRAM: &str = "keyshard-guest";

/// keyshard-guest: reads fragment devices, asks the coordinator for the attested shares, and
/// rebuilds the secret when a quorum agrees.
#[derive(Debug, Parser)]
#[command(name = "keyshard-guest", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List each fragment device's serial and its fragments' metadata (never share bytes), and
    /// the broker mailbox.
    Read(read::Args),
    /// Rebuild the secret named by a manifest from the fragment devices and the shares the
    /// coordinator releases through the broker mailbox.
    Unlock(unlock::Args),
    /// List the block devices and their serials, each read in a worker process: a device that
    /// does not answer is listed with `?`, and never holds the caller.
    Devices(devices::Args),
    /// Read a device for the agent, in a child process (internal).
    #[command(hide = true)]
    Worker(worker::Args),
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Read(args) => read::run(args.try_into()?),
        Command::Unlock(args) => unlock::run(args.try_into()?),
        Command::Devices(args) => devices::run(args.try_into()?),
        Command::Worker(args) => worker::run(args),
    }
}
