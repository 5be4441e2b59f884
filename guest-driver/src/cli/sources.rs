//! The options both subcommands share: which fragment sources to read (named ones, or the ones
//! sysfs lists) and how long to wait for them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use super::CliError;
use crate::discovery::{self, DEFAULT_SYSFS_ROOT};
use crate::source::{SourceSpec, VolumeSource};

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
    /// How long to wait for the devices, in seconds; a device that has not answered by then
    /// counts as missing.
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    pub selection: SourceSelection,
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
        Ok(Self {
            selection: if named.is_empty() {
                SourceSelection::Discover
            } else {
                SourceSelection::Named(named)
            },
            timeout,
            sysfs_root: PathBuf::from(DEFAULT_SYSFS_ROOT),
        })
    }
}

impl SourceConfig {
    /// The sources to read; discovery may find none.
    pub fn sources(&self) -> Result<Vec<Box<dyn VolumeSource>>, CliError> {
        let specs = match &self.selection {
            SourceSelection::Named(specs) => specs.clone(),
            SourceSelection::Discover => discovery::fragment_devices(&self.sysfs_root)?
                .into_iter()
                .map(|device| {
                    log::info!(
                        "found fragment device {} ({})",
                        device.path.display(),
                        device.serial
                    );
                    SourceSpec::Device {
                        path: device.path,
                        serial: Some(device.serial),
                    }
                })
                .collect(),
        };
        Ok(specs
            .into_iter()
            .map(|spec| spec.into_source(&self.sysfs_root))
            .collect())
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
        let config = SourceConfig::try_from(args(&[], &[], "2.5")).unwrap();
        assert_eq!(config.selection, SourceSelection::Discover);
        assert_eq!(config.timeout, Duration::from_millis(2500));
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

    #[test]
    fn discovery_reads_the_sysfs_tree_it_is_given() {
        let root = tempfile::tempdir().unwrap();
        for (name, serial) in [("vdb", "ksf-vhd-1"), ("vda", "boot")] {
            let dir = root.path().join("block").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("serial"), serial).unwrap();
        }
        let config = SourceConfig {
            selection: SourceSelection::Discover,
            timeout: DEFAULT_TIMEOUT,
            sysfs_root: root.path().to_owned(),
        };
        let sources = config.sources().unwrap();
        let found: Vec<_> = sources
            .iter()
            .map(|s| (s.location(), s.known_serial()))
            .collect();
        assert_eq!(found, [("/dev/vdb".into(), Some("ksf-vhd-1".into()))]);
    }
}
