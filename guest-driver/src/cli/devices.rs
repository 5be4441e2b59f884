//! `keyshard-guest devices`: the block devices and their serials, each read in a worker, so the
//! guest's init can find its volume by serial without ever reading a device itself (a device
//! that does not answer is listed as such, and never holds the boot).

use std::path::PathBuf;
use std::sync::Arc;

use super::CliError;
use super::sources::parse_timeout;
use crate::agent;
use crate::discovery::{DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT, Discovery, WorkerProber};
use crate::worker::WorkerLauncher;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Stop once a device with this serial is found (and the others have answered, or
    /// --settle has passed); exit 1 if none is found in time.
    #[arg(long, value_name = "SERIAL")]
    pub until_serial: Option<String>,
    /// How long to wait for devices to appear and answer, in seconds.
    #[arg(long, value_name = "SECS", default_value = "10")]
    pub timeout: String,
    /// With --until-serial: how long to wait for the other devices once it is found.
    #[arg(long, value_name = "SECS", default_value = "0.5")]
    pub settle: String,
    /// Where sysfs is (tests).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_SYSFS_ROOT, hide = true)]
    pub sysfs_root: PathBuf,
    /// Where the block devices sysfs lists are (tests).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DEV_ROOT, hide = true)]
    pub dev_root: PathBuf,
}

#[derive(Debug)]
pub struct Config {
    pub until_serial: Option<String>,
    pub timeout: std::time::Duration,
    pub settle: std::time::Duration,
    pub sysfs_root: PathBuf,
    pub dev_root: PathBuf,
}

impl TryFrom<Args> for Config {
    type Error = CliError;

    fn try_from(args: Args) -> Result<Self, CliError> {
        let seconds = |option: &str, text: &str| {
            parse_timeout(text)
                .map_err(|why| CliError::InvalidArgument(format!("{option} {text}: {why}")))
        };
        Ok(Self {
            timeout: seconds("--timeout", &args.timeout)?,
            settle: seconds("--settle", &args.settle)?,
            until_serial: args.until_serial,
            sysfs_root: args.sysfs_root,
            dev_root: args.dev_root,
        })
    }
}

/// One line per device: `/dev/vdb ksf-vhd-1`; `-` for a device without a serial, `?` for one
/// whose serial is not known (the reason goes to stderr).
pub fn run(config: Config) -> Result<(), CliError> {
    let launcher = WorkerLauncher::this_program();
    let discovery = Discovery {
        sysfs_root: config.sysfs_root.clone(),
        prober: Arc::new(WorkerProber {
            launcher,
            sysfs_root: config.sysfs_root,
            dev_root: config.dev_root,
            snp: false,
        }),
        device_wait: config.timeout,
    };
    let devices = agent::list_devices(
        discovery,
        config.until_serial.as_deref(),
        config.settle,
        config.timeout,
    )?;
    let mut found = false;
    for (location, serial) in &devices {
        match serial {
            Ok(serial) if serial.is_empty() => println!("{location} -"),
            Ok(serial) => {
                found |= config.until_serial.as_deref() == Some(serial.as_str());
                println!("{location} {serial}");
            }
            Err(why) => {
                println!("{location} ?");
                log::warn!("{location}: {why}");
            }
        }
    }
    match &config.until_serial {
        Some(serial) if !found => Err(CliError::InvalidArgument(format!(
            "no block device with serial {serial} within {}",
            agent::describe_timeout(config.timeout)
        ))),
        _ => Ok(()),
    }
}
