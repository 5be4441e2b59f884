//! `keyshard coordinator`: serve one broker mailbox per VM from a state directory until SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use keyshard_core::HolderId;
use keyshard_core::broker::SERIAL_PREFIX;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::CliError;
use keyshard_coordinator::mailbox::{BrokerMailbox, RequestHandler};
use keyshard_coordinator::setup;
use keyshard_coordinator::state::StateDir;
use keyshard_tpm::{TpmConfig, TpmService, resolve_tcti};
use vhost_keyshard::daemon::access::SocketArgs;
use vhost_keyshard::daemon::{self, DaemonError, ServedDevice};
use vhost_keyshard::device::serve::{BoundSocket, SocketAccess};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The state directory `keyshard init` made.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// A VM's broker device: VMID=SOCKET (serial ksb-VMID). Repeat for each VM.
    #[arg(long, value_name = "VMID=SOCKET", required = true)]
    pub broker: Vec<String>,
    /// The TPM (default: $TPM2TOOLS_TCTI, else $TCTI, else device:/dev/tpmrm0).
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
    /// Write the process id here once every socket listens.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Debug)]
pub struct Config {
    pub state_dir: StateDir,
    /// (vm id, socket)
    pub brokers: Vec<(String, PathBuf)>,
    pub tcti: String,
    pub pidfile: Option<PathBuf>,
    /// Mode and owner of every broker socket file.
    pub access: SocketAccess,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let mut brokers: Vec<(String, PathBuf)> = Vec::new();
        for spec in &args.broker {
            let (vm, socket) = keyshard_core::usage::key_value(spec).map_err(|_| {
                CliError::InvalidArgument(format!("--broker {spec:?}: expected VMID=SOCKET"))
            })?;
            // The serial ksb-<vm id> must fit virtio-blk's 20 bytes: same rules as a holder id.
            HolderId::new(vm)
                .map_err(|e| CliError::InvalidArgument(format!("--broker {spec:?}: vm id: {e}")))?;
            if brokers
                .iter()
                .any(|(other, path)| other == vm || path.as_path() == std::path::Path::new(socket))
            {
                return Err(CliError::InvalidArgument(format!(
                    "--broker {spec:?}: vm id or socket given twice"
                )));
            }
            brokers.push((vm.to_owned(), PathBuf::from(socket)));
        }
        Ok(Self {
            state_dir: StateDir::new(args.state_dir),
            brokers,
            tcti: resolve_tcti(args.tcti.as_deref()),
            pidfile: args.pidfile,
            access: SocketAccess::try_from(&args.socket)
                .map_err(|e| CliError::InvalidArgument(e.to_string()))?,
        })
    }
}

/// Refuses a `--broker` for a VM the key's shares are not bound to: it would be refused every
/// release anyway, and serving it hides the mistake until a boot fails.
fn check_bound(config: &Config, bound: &[String]) -> Result<(), CliError> {
    let dir = config.state_dir.root().display();
    if bound.is_empty() {
        return Err(CliError::InvalidArgument(format!(
            "{dir}: the key's shares are bound to no VM (a state from before VM binding, with fragments this build no longer reads): keyshard init --force --vm-id ID deals a NEW key and replaces these shares, so first keep a copy of {dir} and enroll the new key in the VM's volume (or pass the old key with --secret-file)"
        )));
    }
    let unbound: Vec<&str> = config
        .brokers
        .iter()
        .map(|(vm, _)| vm.as_str())
        .filter(|vm| !bound.iter().any(|b| b == vm))
        .collect();
    if unbound.is_empty() {
        return Ok(());
    }
    Err(CliError::InvalidArgument(format!(
        "--broker {}: not bound to the key in {dir}; bound VM ids: {}",
        unbound.join(", "),
        bound.join(", ")
    )))
}

pub fn run(config: Config) -> Result<(), CliError> {
    let signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| CliError::from(DaemonError::Signals(e)))?;
    let state = setup::load_state(&config.state_dir)?;
    check_bound(&config, &state.vm_ids)?;
    let tpm = if state.attested_holders().next().is_some() {
        let service = TpmService::spawn(TpmConfig::new(config.tcti.clone()))?;
        if service.info().software {
            log::warn!("{} is a software TPM ({})", config.tcti, service.info());
        }
        Some(service)
    } else {
        None
    };
    let coordinator = Arc::new(setup::coordinator(&config.state_dir, &state, tpm)?);
    let handler: Arc<dyn RequestHandler> = coordinator.clone();
    let devices = config
        .brokers
        .iter()
        .map(|(vm, socket)| {
            let mailbox = BrokerMailbox::new(vm, handler.clone()).map_err(DaemonError::Spawn)?;
            Ok(ServedDevice {
                name: format!("{SERIAL_PREFIX}{vm}"),
                socket: BoundSocket::bind(socket, config.access).map_err(DaemonError::from)?,
                media: Arc::new(mailbox),
            })
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    let served = daemon::serve_until_signal(devices, config.pidfile.as_deref(), signals);
    coordinator.flush_audit();
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn config(extra: &[&str]) -> Result<Config, CliError> {
        let mut argv = vec![
            "coordinator",
            "--state-dir",
            "/s",
            "--broker",
            "vm1=/b.sock",
        ];
        argv.extend_from_slice(extra);
        Config::try_from(Command::try_parse_from(argv).unwrap().args)
    }

    #[test]
    fn broker_sockets_are_0600_unless_told() {
        assert_eq!(config(&[]).unwrap().access, SocketAccess::default());
        let c = config(&["--socket-owner", "0", "--socket-mode", "660"]).unwrap();
        assert_eq!((c.access.owner, c.access.mode), (Some(0), 0o660));
        assert!(matches!(
            config(&["--socket-mode", "u+rw"]),
            Err(CliError::InvalidArgument(_))
        ));
    }

    #[test]
    fn item4_a_broker_for_an_unbound_vm_is_refused_with_the_bound_ids() {
        let c = config(&["--broker", "vm2=/c.sock"]).unwrap();
        let bound = ["vm1".to_owned(), "vm9".to_owned()];
        let err = check_bound(&c, &bound).unwrap_err().to_string();
        assert!(err.contains("--broker vm2: not bound"), "{err}");
        assert!(err.contains("bound VM ids: vm1, vm9"), "{err}");
        assert!(check_bound(&config(&[]).unwrap(), &bound).is_ok());
        let none = check_bound(&config(&[]).unwrap(), &[])
            .unwrap_err()
            .to_string();
        assert!(none.contains("bound to no VM"), "{none}");
    }

    /// Item 4 (review): the refusal of a state from before VM binding said "run keyshard init
    /// --vm-id ID again"; init (with --force, as it then asks) deals a new random key and replaces
    /// every share of the old one, which the VM's volume still needs.
    #[test]
    fn item4_an_unbound_state_says_that_init_deals_a_new_key() {
        let none = check_bound(&config(&[]).unwrap(), &[])
            .unwrap_err()
            .to_string();
        assert!(!none.contains("again"), "{none}");
        assert!(none.contains("NEW key"), "{none}");
        assert!(none.contains("--secret-file"), "{none}");
        assert!(!none.contains('\n'), "{none}");
    }
}
