//! `keyshard coordinator`: serve the broker mailboxes until SIGTERM, either of every VM under a
//! state root (`--state-root`, watched for VMs added and removed) or of the VMs given with
//! `--broker` from one state directory. With `--vm-tcti` (one state directory), it relays the
//! state's `host` shares from their shard hosts ([`super::host_relay`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keyshard_core::HolderId;
use keyshard_core::broker::SERIAL_PREFIX;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::CliError;
use super::host_relay::CmsRelay;
use keyshard_coordinator::host_relay::HostShareRelay;
use keyshard_coordinator::mailbox::{BrokerMailbox, RequestHandler};
use keyshard_coordinator::setup;
use keyshard_coordinator::state::{State, StateDir};
use keyshard_coordinator::state_root::{Event, POLL_INTERVAL, StateRootServer};
use keyshard_tpm::{TpmConfig, TpmService, resolve_tcti};
use vhost_keyshard::daemon::access::SocketArgs;
use vhost_keyshard::daemon::{self, DaemonError, ServedDevice};
use vhost_keyshard::device::serve::{BoundSocket, SocketAccess};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Serve every VM under DIR: each DIR/VMID/ is a state directory `keyshard init` made, served
    /// on DIR/VMID/broker.sock (serial ksb-VMID); VMs added or removed are picked up while running.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["state_dir", "broker"])]
    pub state_root: Option<PathBuf>,
    /// One state directory `keyshard init` made (with --broker).
    #[arg(long, value_name = "DIR", required_unless_present = "state_root")]
    pub state_dir: Option<PathBuf>,
    /// A VM's broker device: VMID=SOCKET (serial ksb-VMID), with --state-dir. Repeat for each VM.
    #[arg(long, value_name = "VMID=SOCKET", requires = "state_dir")]
    pub broker: Vec<String>,
    /// The TPM (default: $TPM2TOOLS_TCTI, else $TCTI, else device:/dev/tpmrm0).
    #[arg(long, value_name = "TCTI")]
    pub tcti: Option<String>,
    /// Write the process id here once every socket listens.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// The VM's TPM (its swtpm), which the coordinator quotes for the guest's `host` shares
    /// (with --state-dir; the state must come from `keyshard init --cms`). Without it, `host`
    /// releases are refused, saying so.
    #[arg(long, value_name = "TCTI", requires = "state_dir")]
    pub vm_tcti: Option<String>,
    /// Milliseconds the CMS's challenge and fetch may take for one `host` release.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub cms_deadline_ms: u64,
    /// Milliseconds one shard host's nonce and release may take.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub host_deadline_ms: u64,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Debug)]
pub struct Config {
    pub served: Served,
    pub tcti: String,
    pub pidfile: Option<PathBuf>,
    /// The VM's TPM and the deadlines, for relaying `host` shares.
    pub host_relay: Option<HostRelayConfig>,
    /// Mode and owner of every broker socket file.
    pub access: SocketAccess,
}

/// How `host` releases are relayed.
#[derive(Debug)]
pub struct HostRelayConfig {
    pub vm_tcti: String,
    pub cms_deadline: Duration,
    pub host_deadline: Duration,
}

/// Which VMs are served.
#[derive(Debug)]
pub enum Served {
    /// Every VM directory under a root, watched.
    Root(PathBuf),
    /// The VMs named with --broker, from one state directory.
    Brokers {
        state_dir: StateDir,
        /// (vm id, socket)
        brokers: Vec<(String, PathBuf)>,
    },
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
        let served = match (args.state_root, args.state_dir) {
            (Some(root), _) => Served::Root(root),
            (None, Some(_)) if brokers.is_empty() => {
                return Err(CliError::InvalidArgument(
                    "--state-dir needs at least one --broker VMID=SOCKET".into(),
                ));
            }
            (None, Some(dir)) => Served::Brokers {
                state_dir: StateDir::new(dir),
                brokers,
            },
            (None, None) => {
                return Err(CliError::InvalidArgument(
                    "give --state-root DIR, or --state-dir DIR with --broker VMID=SOCKET".into(),
                ));
            }
        };
        Ok(Self {
            served,
            tcti: resolve_tcti(args.tcti.as_deref()),
            pidfile: args.pidfile,
            host_relay: args.vm_tcti.map(|vm_tcti| HostRelayConfig {
                vm_tcti,
                cms_deadline: Duration::from_millis(args.cms_deadline_ms),
                host_deadline: Duration::from_millis(args.host_deadline_ms),
            }),
            access: SocketAccess::try_from(&args.socket)
                .map_err(|e| CliError::InvalidArgument(e.to_string()))?,
        })
    }
}

/// Refuses a `--broker` for a VM the key's shares are not bound to: it would be refused every
/// release anyway, and serving it hides the mistake until a boot fails.
fn check_bound(
    state_dir: &StateDir,
    brokers: &[(String, PathBuf)],
    bound: &[String],
) -> Result<(), CliError> {
    let dir = state_dir.root().display();
    if bound.is_empty() {
        return Err(CliError::InvalidArgument(format!(
            "{dir}: the key's shares are bound to no VM (a state from before VM binding, with fragments this build no longer reads): keyshard init --force --vm-id ID deals a NEW key and replaces these shares, so first keep a copy of {dir} and enroll the new key in the VM's volume (or pass the old key with --secret-file)"
        )));
    }
    let unbound: Vec<&str> = brokers
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
    daemon::raise_open_files_limit();
    match &config.served {
        Served::Root(root) => run_state_root(root, &config, signals),
        Served::Brokers { state_dir, brokers } => run_brokers(state_dir, brokers, &config, signals),
    }
}

fn run_brokers(
    state_dir: &StateDir,
    brokers: &[(String, PathBuf)],
    config: &Config,
    signals: Signals,
) -> Result<(), CliError> {
    let state = setup::load_state(state_dir)?;
    check_bound(state_dir, brokers, &state.vm_ids)?;
    let tpm = if state.attested_holders().next().is_some() {
        let service = TpmService::spawn(TpmConfig::new(config.tcti.clone()))?;
        if service.info().software {
            log::warn!("{} is a software TPM ({})", config.tcti, service.info());
        }
        Some(service)
    } else {
        None
    };
    let mut coordinator = setup::coordinator(state_dir, &state, tpm)?;
    if let Some(relay) = host_relay(state_dir, &state, config.host_relay.as_ref())? {
        coordinator.set_host_relay(relay);
    }
    let coordinator = Arc::new(coordinator);
    let handler: Arc<dyn RequestHandler> = coordinator.clone();
    let devices = brokers
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

/// The relay of the state's `host` shares, when it has some and `--vm-tcti` was given.
fn host_relay(
    state_dir: &StateDir,
    state: &State,
    config: Option<&HostRelayConfig>,
) -> Result<Option<Arc<dyn HostShareRelay>>, CliError> {
    let has_host = state.host_slots().next().is_some();
    let (config, link) = match (config, &state.cms) {
        (None, _) => {
            if has_host {
                log::warn!(
                    "the state has host shares but no --vm-tcti: their releases will be refused"
                );
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(CliError::InvalidArgument(format!(
                "--vm-tcti: {}: the state has no host shares placed through a CMS",
                state_dir.root().display()
            )));
        }
        (Some(config), Some(link)) => (config, link),
    };
    let vm_tpm = TpmService::spawn(TpmConfig::new(config.vm_tcti.clone()))?;
    let relay = CmsRelay::new(
        state_dir,
        state.key_id.clone(),
        link,
        vm_tpm,
        config.cms_deadline,
        config.host_deadline,
    )?;
    Ok(Some(Arc::new(relay)))
}

/// Serves every VM under `root` and follows the directory until a stop signal: one line on
/// stdout per VM served, refused or stopped, and the TPM operations spent at the end.
fn run_state_root(root: &Path, config: &Config, mut signals: Signals) -> Result<(), CliError> {
    let (mut server, events) = StateRootServer::start(root, config.access, config.tcti.clone())
        .map_err(|e| CliError::InvalidArgument(format!("--state-root: {e}")))?;
    print_events(&events);
    warn_if_few_open_files(server.vm_count());
    let at_ready = server.tpm_operations();
    daemon::announce(
        &format!(
            "ready: serving {} VM(s) under {}",
            server.served().len(),
            root.display()
        ),
        config.pidfile.as_deref(),
    )?;
    loop {
        if let Some(signal) = signals.pending().next() {
            log::info!("signal {signal}: stopping");
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
        print_events(&server.watch_once());
    }
    let total = server.tpm_operations();
    server.stop();
    if let Some(pidfile) = &config.pidfile {
        daemon::remove_pidfile_if_ours(pidfile);
    }
    print_events_line(&format!(
        "stopped: tpm operations: {total} ({at_ready} before ready)"
    ));
    Ok(())
}

/// Open files a VM costs: about 5 idle (socket, mailbox, eventfds), about 10 more while its
/// QEMU is connected; and some for the process itself.
const FILES_PER_VM: u64 = 15;
const FILES_BASE: u64 = 64;

/// Says when the open files limit (already raised to the hard one) is too low for the VMs
/// served: a boot storm would then fail connections with `Too many open files`.
fn warn_if_few_open_files(vms: usize) {
    let needed = FILES_BASE + FILES_PER_VM * u64::try_from(vms).unwrap_or(u64::MAX / 16);
    if let Some(limit) = daemon::open_files_limit()
        && limit < needed
    {
        log::warn!(
            "open files limit {limit} is below the ~{needed} that {vms} connected VMs need: raise the hard limit (LimitNOFILE= in the unit, ulimit -Hn)"
        );
    }
}

fn print_events(events: &[Event]) {
    for event in events {
        print_events_line(&event.to_string());
    }
}

/// One line on stdout, flushed at once: a launcher or a test follows them as they come. Control
/// characters (a newline in a directory's name) are escaped, so a name cannot forge a line.
fn print_events_line(line: &str) {
    let line = escape_controls(line);
    let mut stdout = std::io::stdout().lock();
    // The same events are in the log; a closed stdout is no reason to stop serving.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// `line` with its control characters escaped (`\n` for a newline).
fn escape_controls(line: &str) -> String {
    let mut escaped = String::with_capacity(line.len());
    for c in line.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
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

    fn check(config: &Config, bound: &[String]) -> Result<(), CliError> {
        let Served::Brokers { state_dir, brokers } = &config.served else {
            panic!("not the --broker form: {config:?}");
        };
        check_bound(state_dir, brokers, bound)
    }

    fn parse(argv: &[&str]) -> Result<Config, CliError> {
        let argv = ["coordinator"].iter().chain(argv);
        Command::try_parse_from(argv)
            .map_err(|e| CliError::InvalidArgument(e.to_string()))
            .and_then(|command| Config::try_from(command.args))
    }

    #[test]
    fn a_state_root_is_served_alone_and_a_state_dir_needs_a_broker() {
        let root = parse(&["--state-root", "/r"]).unwrap();
        assert!(matches!(&root.served, Served::Root(dir) if dir == Path::new("/r")));
        assert!(parse(&["--state-root", "/r", "--state-dir", "/s"]).is_err());
        assert!(parse(&["--state-root", "/r", "--broker", "vm1=/b.sock"]).is_err());
        let alone = parse(&["--state-dir", "/s"]).unwrap_err().to_string();
        assert!(alone.contains("--broker"), "{alone}");
        assert!(parse(&[]).is_err());
    }

    /// Review L4: a directory named with a newline printed a forged `ready:` line.
    #[test]
    fn a_name_with_a_newline_cannot_forge_an_event_line() {
        let event = Event::Refused {
            vm: "n\nready: serving 99 VM(s)".into(),
            reason: "x".into(),
        };
        let line = escape_controls(&event.to_string());
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.starts_with("refused n\\nready"), "{line}");
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
        let err = check(&c, &bound).unwrap_err().to_string();
        assert!(err.contains("--broker vm2: not bound"), "{err}");
        assert!(err.contains("bound VM ids: vm1, vm9"), "{err}");
        assert!(check(&config(&[]).unwrap(), &bound).is_ok());
        let none = check(&config(&[]).unwrap(), &[]).unwrap_err().to_string();
        assert!(none.contains("bound to no VM"), "{none}");
    }

    /// Item 4 (review): the refusal of a state from before VM binding said "run keyshard init
    /// --vm-id ID again"; init (with --force, as it then asks) deals a new random key and replaces
    /// every share of the old one, which the VM's volume still needs.
    #[test]
    fn item4_an_unbound_state_says_that_init_deals_a_new_key() {
        let none = check(&config(&[]).unwrap(), &[]).unwrap_err().to_string();
        assert!(!none.contains("again"), "{none}");
        assert!(none.contains("NEW key"), "{none}");
        assert!(none.contains("--secret-file"), "{none}");
        assert!(!none.contains('\n'), "{none}");
    }
}
