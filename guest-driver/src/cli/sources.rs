//! The options both subcommands share: which fragment sources to read and which broker mailbox
//! to ask (named ones, or the ones sysfs lists) and how long to wait for them; and the agent's
//! inputs they make. Block devices are always read in worker processes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::CliError;
use crate::agent::Inputs;
use crate::broker::mailbox::MailboxSpec;
use crate::broker::shares::{InProcessFetcher, ShareFetcher};
use crate::discovery::{DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT, Discovery, WorkerProber};
use crate::snp::{ReportSource, SevGuestFirmware};
use crate::source::SourceSpec;
use crate::worker::WorkerLauncher;
use crate::worker::broker::WorkerBroker;

/// The longest wait accepted: a boot that waits longer has a problem no timeout fixes.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// A fragment device's vhost-user-blk socket, read directly (on a host). Repeatable.
    #[arg(long = "vhost-user", value_name = "SOCKET")]
    pub vhost_user: Vec<PathBuf>,
    /// A block device or image file holding a fragment volume. Repeatable. With neither
    /// --vhost-user nor --device, the devices whose serial starts with ksf- are read.
    #[arg(long = "device", value_name = "PATH")]
    pub device: Vec<PathBuf>,
    /// The broker mailbox's vhost-user-blk socket, used directly (on a host), for the tpm and
    /// sev shares.
    #[arg(long = "broker-vhost-user", value_name = "SOCKET")]
    pub broker_vhost_user: Option<PathBuf>,
    /// The broker mailbox as a block device or image file. Without --broker-vhost-user or
    /// --broker-device, the device whose serial starts with ksb- is used when the fragment
    /// devices are discovered too, and no broker when they are named.
    #[arg(long = "broker-device", value_name = "PATH")]
    pub broker_device: Option<PathBuf>,
    /// How long to wait for the devices and the coordinator, in seconds; a device or holder
    /// that has not answered by then counts as missing.
    #[arg(long, value_name = "SECS", default_value = "10")]
    pub timeout: String,
    /// When devices are discovered: how long to look for the devices the manifest lists before
    /// working with those found, in seconds.
    #[arg(long, value_name = "SECS", default_value = "2")]
    pub device_wait: String,
    /// Where sysfs is (tests).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_SYSFS_ROOT, hide = true)]
    pub sysfs_root: PathBuf,
    /// Where the block devices sysfs lists are (tests).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DEV_ROOT, hide = true)]
    pub dev_root: PathBuf,
}

/// Where the fragments come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSelection {
    Named(Vec<SourceSpec>),
    /// Every block device whose serial starts with `ksf-`.
    Discover,
}

/// Which broker mailbox to ask for the `tpm` and `sev` shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerSelection {
    Named(MailboxSpec),
    /// The block device whose serial starts with `ksb-`, if there is one.
    Discover,
    /// None: fragment sources were named and no broker was.
    NoBroker,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    pub selection: SourceSelection,
    pub broker: BrokerSelection,
    pub timeout: Duration,
    pub device_wait: Duration,
    /// Where sysfs is: `/sys`, or a test tree.
    pub sysfs_root: PathBuf,
    /// Where the devices sysfs lists are: `/dev`, or a test tree.
    pub dev_root: PathBuf,
}

impl TryFrom<SourceArgs> for SourceConfig {
    type Error = CliError;

    fn try_from(args: SourceArgs) -> Result<Self, CliError> {
        let timeout = parse_timeout(&args.timeout).map_err(|why| {
            CliError::InvalidArgument(format!("--timeout {}: {why}", args.timeout))
        })?;
        let device_wait = parse_timeout(&args.device_wait).map_err(|why| {
            CliError::InvalidArgument(format!("--device-wait {}: {why}", args.device_wait))
        })?;
        refuse_repeats("--vhost-user", &args.vhost_user)?;
        refuse_repeats("--device", &args.device)?;
        let named: Vec<SourceSpec> = args
            .vhost_user
            .into_iter()
            .map(SourceSpec::VhostUser)
            .chain(args.device.into_iter().map(SourceSpec::Device))
            .collect();
        let broker = match (args.broker_vhost_user, args.broker_device) {
            (Some(_), Some(_)) => {
                return Err(CliError::InvalidArgument(
                    "--broker-vhost-user and --broker-device name two brokers; give one".into(),
                ));
            }
            (Some(socket), None) => BrokerSelection::Named(MailboxSpec::VhostUser(socket)),
            (None, Some(path)) => {
                BrokerSelection::Named(MailboxSpec::Device { path, serial: None })
            }
            (None, None) if named.is_empty() => BrokerSelection::Discover,
            (None, None) => BrokerSelection::NoBroker,
        };
        Ok(Self {
            selection: if named.is_empty() {
                SourceSelection::Discover
            } else {
                SourceSelection::Named(named)
            },
            broker,
            timeout,
            device_wait,
            sysfs_root: args.sysfs_root,
            dev_root: args.dev_root,
        })
    }
}

impl SourceConfig {
    /// What the agent reads and asks: named sources (block devices in workers), the named broker
    /// (a block device through `launcher`'s workers), or discovery in sysfs. `snp`: whether `sev` shares are asked
    /// for with reports from `/dev/sev-guest`.
    pub fn inputs(&self, launcher: &WorkerLauncher, snp: bool) -> Inputs {
        let sources = match &self.selection {
            SourceSelection::Named(specs) => specs
                .iter()
                .cloned()
                .map(|spec| spec.into_source(&self.sysfs_root))
                .collect(),
            SourceSelection::Discover => Vec::new(),
        };
        let broker: Option<Box<dyn ShareFetcher>> = match &self.broker {
            BrokerSelection::Named(MailboxSpec::Device { path, serial }) => {
                Some(Box::new(WorkerBroker {
                    launcher: launcher.clone(),
                    path: path.clone(),
                    serial: serial.clone(),
                    sysfs_root: self.sysfs_root.clone(),
                    snp,
                }))
            }
            BrokerSelection::Named(spec) => {
                let reports = snp.then(|| Box::new(SevGuestFirmware) as Box<dyn ReportSource>);
                Some(Box::new(InProcessFetcher::new(
                    spec.clone().into_mailbox(&self.sysfs_root),
                    reports,
                )))
            }
            BrokerSelection::Discover | BrokerSelection::NoBroker => None,
        };
        let discover =
            self.selection == SourceSelection::Discover || self.broker == BrokerSelection::Discover;
        let discovery = discover.then(|| Discovery {
            sysfs_root: self.sysfs_root.clone(),
            prober: Arc::new(WorkerProber {
                launcher: launcher.clone(),
                sysfs_root: self.sysfs_root.clone(),
                dev_root: self.dev_root.clone(),
                snp,
            }),
            device_wait: self.device_wait,
        });
        Inputs {
            sources,
            broker,
            discovery,
        }
    }
}

/// A device read twice would count twice, and a socket served to one client at a time would
/// make the second connection wait for the first: refuse both.
fn refuse_repeats(option: &str, paths: &[PathBuf]) -> Result<(), CliError> {
    let mut seen = BTreeSet::new();
    match paths.iter().find(|path| !seen.insert(*path)) {
        Some(path) => Err(CliError::InvalidArgument(format!(
            "{option} {} is given twice",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// Seconds, whole or decimal: `10`, `2.5`. More than 0, at most an hour.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite())
        .ok_or_else(|| "not a number of seconds".to_owned())?;
    if seconds <= 0.0 {
        return Err("must be more than 0".into());
    }
    if seconds > MAX_TIMEOUT.as_secs_f64() {
        return Err(format!("at most {} seconds", MAX_TIMEOUT.as_secs()));
    }
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|timeout| !timeout.is_zero())
        .ok_or_else(|| "must be more than 0".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::DEFAULT_TIMEOUT;
    use crate::discovery::DEFAULT_DEVICE_WAIT;

    fn args(vhost_user: &[&str], device: &[&str], timeout: &str) -> SourceArgs {
        SourceArgs {
            vhost_user: vhost_user.iter().map(PathBuf::from).collect(),
            device: device.iter().map(PathBuf::from).collect(),
            broker_vhost_user: None,
            broker_device: None,
            timeout: timeout.into(),
            device_wait: "2".into(),
            sysfs_root: DEFAULT_SYSFS_ROOT.into(),
            dev_root: DEFAULT_DEV_ROOT.into(),
        }
    }

    #[test]
    fn named_sources_are_kept_in_order_and_none_means_discover() {
        let config = SourceConfig::try_from(args(&["/run/a.sock"], &["/dev/vdb"], "10")).unwrap();
        assert_eq!(
            config.selection,
            SourceSelection::Named(vec![
                SourceSpec::VhostUser("/run/a.sock".into()),
                SourceSpec::Device("/dev/vdb".into()),
            ])
        );
        assert_eq!(config.timeout, Duration::from_secs(10));
        assert_eq!(config.device_wait, DEFAULT_DEVICE_WAIT);
        assert_eq!(config.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(config.dev_root, PathBuf::from("/dev"));
        // Named fragment sources and no broker named: no broker.
        assert_eq!(config.broker, BrokerSelection::NoBroker);
        let config = SourceConfig::try_from(args(&[], &[], "2.5")).unwrap();
        assert_eq!(config.selection, SourceSelection::Discover);
        assert_eq!(config.broker, BrokerSelection::Discover);
        assert_eq!(config.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn a_broker_is_named_by_socket_or_by_path_but_not_both() {
        let mut with_socket = args(&["/run/vhd-1.sock"], &[], "10");
        with_socket.broker_vhost_user = Some("/run/ksb.sock".into());
        assert_eq!(
            SourceConfig::try_from(with_socket.clone()).unwrap().broker,
            BrokerSelection::Named(MailboxSpec::VhostUser("/run/ksb.sock".into()))
        );
        let mut with_device = args(&[], &[], "10");
        with_device.broker_device = Some("/dev/vdd".into());
        let config = SourceConfig::try_from(with_device).unwrap();
        assert_eq!(config.selection, SourceSelection::Discover);
        assert_eq!(
            config.broker,
            BrokerSelection::Named(MailboxSpec::Device {
                path: "/dev/vdd".into(),
                serial: None
            })
        );
        with_socket.broker_device = Some("/dev/vdd".into());
        assert_eq!(
            SourceConfig::try_from(with_socket).unwrap_err().to_string(),
            "--broker-vhost-user and --broker-device name two brokers; give one"
        );
    }

    #[test]
    fn bad_timeouts_and_repeated_sources_are_refused() {
        for (timeout, why) in [
            ("0", "must be more than 0"),
            ("-1", "must be more than 0"),
            ("ten", "not a number of seconds"),
            ("NaN", "not a number of seconds"),
            ("inf", "not a number of seconds"),
            ("3601", "at most 3600 seconds"),
            ("1e-12", "must be more than 0"),
        ] {
            let error = SourceConfig::try_from(args(&[], &[], timeout)).unwrap_err();
            assert_eq!(error.to_string(), format!("--timeout {timeout}: {why}"));
        }
        let mut bad_wait = args(&[], &[], "10");
        bad_wait.device_wait = "soon".into();
        assert_eq!(
            SourceConfig::try_from(bad_wait).unwrap_err().to_string(),
            "--device-wait soon: not a number of seconds"
        );
        let error =
            SourceConfig::try_from(args(&["/a.sock", "/b.sock", "/a.sock"], &[], "1")).unwrap_err();
        assert_eq!(error.to_string(), "--vhost-user /a.sock is given twice");
        let error = SourceConfig::try_from(args(&[], &["/dev/vdb", "/dev/vdb"], "1")).unwrap_err();
        assert_eq!(error.to_string(), "--device /dev/vdb is given twice");
    }

    #[test]
    fn inputs_read_named_devices_in_workers_and_discover_otherwise() {
        let launcher = WorkerLauncher::new("/bin/false");
        let named = SourceConfig::try_from(args(&["/run/a.sock"], &["/dev/vdb"], "1")).unwrap();
        let inputs = named.inputs(&launcher, false);
        let locations: Vec<String> = inputs.sources.iter().map(|s| s.location()).collect();
        assert_eq!(locations, ["socket /run/a.sock", "/dev/vdb"]);
        assert!(inputs.broker.is_none() && inputs.discovery.is_none());

        let mut discovering = args(&[], &[], "1");
        discovering.broker_device = Some("/dev/vdd".into());
        let inputs = SourceConfig::try_from(discovering)
            .unwrap()
            .inputs(&launcher, false);
        assert!(inputs.sources.is_empty());
        assert_eq!(inputs.broker.as_ref().unwrap().location(), "/dev/vdd");
        let discovery = inputs.discovery.unwrap();
        assert_eq!(discovery.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(discovery.prober.location("vdc"), "/dev/vdc");
        assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(10));
    }
}
