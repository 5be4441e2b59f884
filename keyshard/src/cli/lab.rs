//! `keyshard lab up|down`: a local credential-service lab on loopback (`keyshard_lab`): a CMS,
//! shard hosts in 3 regions x 2 operators and an instance TPM, each its own swtpm and process,
//! recorded in `DIR/lab.json`. A development tool: it protects nothing.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use keyshard_lab::down;
use keyshard_lab::up::{self, StoreKind, UpConfig};

use super::CliError;
use super::credential::print_lines;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Start a lab in DIR: CMS, shard hosts, instance TPM (each its own swtpm), lab.json.
    Up(UpArgs),
    /// Stop the lab in DIR (SIGTERM, then SIGKILL); its data stays unless --purge.
    Down(DownArgs),
}

/// The CMS's store in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// redb in DIR/cms/cms.redb.
    Redb,
    /// an etcd started on loopback, its data in DIR/etcd.
    Etcd,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The lab's directory: new or empty.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Shard hosts, spread over regions eu/us/ap and operators acme/globex.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u8).range(1..=i64::from(up::MAX_HOSTS)))]
    pub hosts: u8,
    /// The CMS's store.
    #[arg(long, value_enum, default_value_t = Store::Redb)]
    pub store: Store,
    /// The keyshard binary the lab's processes run (this one when absent).
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// The lab's directory.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Remove the lab's directory once everything has stopped.
    #[arg(long)]
    pub purge: bool,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub grace: u64,
}

impl TryFrom<UpArgs> for UpConfig {
    type Error = CliError;

    fn try_from(args: UpArgs) -> Result<Self, CliError> {
        let bin = match args.bin {
            Some(bin) => bin,
            None => std::env::current_exe().map_err(|e| {
                CliError::InvalidArgument(format!("cannot find this keyshard binary: {e}"))
            })?,
        };
        let store = match args.store {
            Store::Redb => StoreKind::Redb,
            Store::Etcd => StoreKind::Etcd,
        };
        Ok(UpConfig::new(args.dir, args.hosts, store, &bin)?)
    }
}

/// Runs a `lab` subcommand.
pub fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Up(args) => {
            let config = UpConfig::try_from(args)?;
            // Progress is best effort: a closed stdout must not fail (or panic) a lab half up.
            let lab = up::up(&config, &mut |line| {
                let _ = writeln!(std::io::stdout(), "{line}");
            })?;
            print_lines(&up::commands(&lab))
        }
        Command::Down(args) => print_lines(&down::down(
            &args.dir,
            args.purge,
            Duration::from_secs(args.grace),
        )?),
    }
}
