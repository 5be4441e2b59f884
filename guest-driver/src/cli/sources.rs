//! The options both subcommands share: which fragment sources to read and which broker mailbox
//! to ask (named ones, or the ones sysfs lists) and how long to wait for them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use super::CliError;
use crate::broker::mailbox::MailboxSpec;
use crate::discovery::{self, DEFAULT_SYSFS_ROOT};
use crate::source::SourceSpec;

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

/// What was selected, discovery done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub sources: Vec<SourceSpec>,
    pub broker: Option<MailboxSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    pub selection: SourceSelection,
    pub broker: BrokerSelection,
    pub timeout: Duration,
    /// Where sysfs is: `/sys`, or a test tree.
    pub sysfs_root: PathBuf,
}

impl TryFrom<SourceArgs> for SourceConfig {
    type Error = CliError;

    fn try_from(args: SourceArgs) -> Result<Self, CliError> {
        let timeout = parse_timeout(&args.timeout).map_err(|why| {
            CliError::InvalidArgument(format!("--timeout {}: {why}", args.timeout))
        })?;
        refuse_repeats("--vhost-user", &args.vhost_user)?;
        refuse_repeats("--device", &args.device)?;
        let named: Vec<SourceSpec> = args
            .vhost_user
            .into_iter()
            .map(SourceSpec::VhostUser)
            .chain(
                args.device
                    .into_iter()
                    .map(|path| SourceSpec::Device { path, serial: None }),
            )
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
            sysfs_root: PathBuf::from(DEFAULT_SYSFS_ROOT),
        })
    }
}

impl SourceConfig {
    /// The fragment sources to read and the broker to ask; discovery may find none. Several
    /// broker devices are an error.
    pub fn select(&self) -> Result<Selected, CliError> {
        let needs_sysfs =
            self.selection == SourceSelection::Discover || self.broker == BrokerSelection::Discover;
        let found = if needs_sysfs {
            discovery::devices(&self.sysfs_root)?
        } else {
            discovery::Devices::default()
        };
        let sources = match &self.selection {
            SourceSelection::Named(specs) => specs.clone(),
            SourceSelection::Discover => found
                .fragments
                .iter()
                .map(|device| {
                    log::info!("found fragment device {}", device.describe());
                    SourceSpec::Device {
                        path: device.path.clone(),
                        serial: Some(device.serial.clone()),
                    }
                })
                .collect(),
        };
        let broker = match &self.broker {
            BrokerSelection::Named(spec) => Some(spec.clone()),
            BrokerSelection::NoBroker => None,
            BrokerSelection::Discover => found.broker()?.map(|device| {
                log::info!("found broker device {}", device.describe());
                MailboxSpec::Device {
                    path: device.path.clone(),
                    serial: Some(device.serial.clone()),
                }
            }),
        };
        Ok(Selected { sources, broker })
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

    fn args(vhost_user: &[&str], device: &[&str], timeout: &str) -> SourceArgs {
        SourceArgs {
            vhost_user: vhost_user.iter().map(PathBuf::from).collect(),
            device: device.iter().map(PathBuf::from).collect(),
            broker_vhost_user: None,
            broker_device: None,
            timeout: timeout.into(),
        }
    }

    #[test]
    fn named_sources_are_kept_in_order_and_none_means_discover() {
        let config = SourceConfig::try_from(args(&["/run/a.sock"], &["/dev/vdb"], "10")).unwrap();
        assert_eq!(
            config.selection,
            SourceSelection::Named(vec![
                SourceSpec::VhostUser("/run/a.sock".into()),
                SourceSpec::Device {
                    path: "/dev/vdb".into(),
                    serial: None
                },
            ])
        );
        assert_eq!(config.timeout, Duration::from_secs(10));
        assert_eq!(config.sysfs_root, PathBuf::from("/sys"));
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
        let error =
            SourceConfig::try_from(args(&["/a.sock", "/b.sock", "/a.sock"], &[], "1")).unwrap_err();
        assert_eq!(error.to_string(), "--vhost-user /a.sock is given twice");
        let error = SourceConfig::try_from(args(&[], &["/dev/vdb", "/dev/vdb"], "1")).unwrap_err();
        assert_eq!(error.to_string(), "--device /dev/vdb is given twice");
    }

    fn sysfs(devices: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (name, serial) in devices {
            let dir = root.path().join("block").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("serial"), serial).unwrap();
        }
        root
    }

    fn discovering(root: &std::path::Path) -> SourceConfig {
        SourceConfig {
            selection: SourceSelection::Discover,
            broker: BrokerSelection::Discover,
            timeout: DEFAULT_TIMEOUT,
            sysfs_root: root.to_owned(),
        }
    }

    #[test]
    fn discovery_reads_the_sysfs_tree_it_is_given() {
        let root = sysfs(&[("vdb", "ksf-vhd-1"), ("vda", "boot"), ("vdc", "ksb-vm-7")]);
        let selected = discovering(root.path()).select().unwrap();
        assert_eq!(
            selected,
            Selected {
                sources: vec![SourceSpec::Device {
                    path: "/dev/vdb".into(),
                    serial: Some("ksf-vhd-1".into())
                }],
                broker: Some(MailboxSpec::Device {
                    path: "/dev/vdc".into(),
                    serial: Some("ksb-vm-7".into())
                }),
            }
        );
    }

    #[test]
    fn two_broker_devices_are_an_error_and_named_sources_skip_discovery() {
        let root = sysfs(&[
            ("vdb", "ksf-vhd-1"),
            ("vdc", "ksb-vm-7"),
            ("vdd", "ksb-vm-8"),
        ]);
        let error = discovering(root.path()).select().unwrap_err();
        assert_eq!(
            error.to_string(),
            "several broker devices (serial ksb-...), one is expected: /dev/vdc (ksb-vm-7), \
             /dev/vdd (ksb-vm-8)"
        );
        // Everything named: sysfs is not read at all (this one does not exist).
        let config = SourceConfig {
            selection: SourceSelection::Named(vec![SourceSpec::VhostUser("/run/a.sock".into())]),
            broker: BrokerSelection::Named(MailboxSpec::VhostUser("/run/ksb.sock".into())),
            timeout: DEFAULT_TIMEOUT,
            sysfs_root: root.path().join("absent"),
        };
        let selected = config.select().unwrap();
        assert_eq!(selected.sources.len(), 1);
        assert_eq!(
            selected.broker,
            Some(MailboxSpec::VhostUser("/run/ksb.sock".into()))
        );
    }
}
