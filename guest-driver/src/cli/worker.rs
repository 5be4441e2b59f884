//! `keyshard-guest worker`: what the agent runs in a child process to touch a device (see
//! `crate::worker`). Not for users: it reports records on stdout for the agent to read.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::CliError;
use crate::broker::mailbox::MailboxSpec;
use crate::worker::RecordWriter;
use crate::worker::broker::{self, HolderArg};
use crate::worker::probe::{self, ProbeScope, ProbeTarget};
use keyshard_core::manifest::HostAttestation;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub task: Task,
}

#[derive(Debug, clap::Subcommand)]
pub enum Task {
    /// Report a device's serial and, for a fragment device, its volume.
    Probe(ProbeArgs),
    /// Ask the coordinator through a broker block device for holders' shares.
    Broker(BrokerArgs),
}

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    #[arg(long)]
    pub sysfs_root: PathBuf,
    /// A device listed as <sysfs-root>/block/NAME, at <dev-root>/NAME.
    #[arg(long, requires = "dev_root", conflicts_with = "path")]
    pub name: Option<String>,
    #[arg(long)]
    pub dev_root: Option<PathBuf>,
    /// A device or image file named on the command line.
    #[arg(long, required_unless_present = "name")]
    pub path: Option<PathBuf>,
    #[arg(long)]
    pub serial_only: bool,
}

#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    #[arg(long)]
    pub path: PathBuf,
    #[arg(long)]
    pub serial: Option<String>,
    #[arg(long)]
    pub sysfs_root: PathBuf,
    #[arg(long)]
    pub timeout_ms: u64,
    #[arg(long)]
    pub snp: bool,
    #[arg(long = "holder", value_name = "INDEX:CLASS:ID")]
    pub holders: Vec<HolderArg>,
    /// The manifest's pins of the host TPM (AK:BANK:PCRS:DIGEST), for `tpm` shares.
    #[arg(long, value_name = "AK:BANK:PCRS:DIGEST")]
    pub host_attestation: Option<HostAttestation>,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let mut out = RecordWriter::new(std::io::stdout().lock());
    match args.task {
        Task::Probe(args) => {
            let target = match (args.name, args.dev_root, args.path) {
                (Some(name), Some(dev_root), _) => ProbeTarget::Listed {
                    sysfs_root: args.sysfs_root,
                    dev_root,
                    name,
                },
                (_, _, Some(path)) => ProbeTarget::Path {
                    path,
                    sysfs_root: args.sysfs_root,
                },
                _ => {
                    return Err(CliError::InvalidArgument(
                        "worker probe: give --name with --dev-root, or --path".into(),
                    ));
                }
            };
            let scope = if args.serial_only {
                ProbeScope::SerialOnly
            } else {
                ProbeScope::FragmentVolume
            };
            probe::run(&target, scope, &mut out);
        }
        Task::Broker(args) => {
            let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
            let mailbox = MailboxSpec::Device {
                path: args.path,
                serial: args.serial,
            };
            broker::run(
                mailbox,
                &args.sysfs_root,
                &args.holders,
                args.snp,
                args.host_attestation.as_ref(),
                deadline,
                &mut out,
            );
        }
    }
    let _ = std::io::stdout().flush();
    Ok(())
}
