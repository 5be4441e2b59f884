//! `vhost-keyshard` arguments and their validation into a [`Config`]: which fragment devices to
//! serve, on which sockets.

use std::collections::BTreeSet;
use std::path::PathBuf;

use keyshard_core::HolderId;

use super::access::{AccessError, SocketArgs};
use crate::device::serve::SocketAccess;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no device to serve: give --socket-path with --fragment, or --device")]
    NoDevice,
    #[error("--fragment needs --socket-path (or use --device socket=...,fragment=...)")]
    FragmentWithoutSocket,
    #[error("socket {0} has no --fragment")]
    NoFragment(String),
    #[error("socket {0} is given twice")]
    DuplicateSocket(String),
    #[error("--device {spec:?}: {reason}")]
    BadDeviceSpec { spec: String, reason: String },
    #[error("invalid holder id: {0}")]
    HolderId(String),
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Serves read-only virtio-blk fragment devices over vhost-user. Each device's serial is
/// `ksf-<holder-id>`; the holder id defaults to the first fragment's.
#[derive(Debug, clap::Parser)]
#[command(name = "vhost-keyshard", version, about, long_about = None)]
pub struct Args {
    /// UNIX socket of a single device (with --fragment and optionally --holder-id).
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Fragment file for the --socket-path device; repeat for several.
    #[arg(long, value_name = "FILE")]
    pub fragment: Vec<PathBuf>,
    /// Holder id of the --socket-path device.
    #[arg(long, value_name = "ID")]
    pub holder_id: Option<String>,
    /// Another device: `socket=PATH,fragment=FILE[,fragment=FILE...][,holder-id=ID]`; repeat to
    /// serve many devices from one process.
    #[arg(long, value_name = "SPEC")]
    pub device: Vec<String>,
    /// Write the process id here once every socket listens.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    #[command(flatten)]
    pub socket: SocketArgs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub socket: PathBuf,
    pub fragments: Vec<PathBuf>,
    pub holder_id: Option<HolderId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub devices: Vec<DeviceConfig>,
    pub pidfile: Option<PathBuf>,
    /// Mode and owner of every socket file.
    pub access: SocketAccess,
}

fn holder_id(text: String) -> Result<HolderId, ConfigError> {
    HolderId::new(text).map_err(|e| ConfigError::HolderId(e.to_string()))
}

/// Parses `socket=PATH,fragment=FILE,...,holder-id=ID`.
fn parse_device_spec(spec: &str) -> Result<DeviceConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::BadDeviceSpec {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let mut socket = None;
    let mut fragments = Vec::new();
    let mut holder = None;
    for pair in keyshard_core::usage::key_values(spec) {
        let (key, value) = pair.map_err(|e| bad(&e.to_string()))?;
        match key {
            "socket" if socket.is_none() => socket = Some(PathBuf::from(value)),
            "socket" => return Err(bad("socket given twice")),
            "fragment" => fragments.push(PathBuf::from(value)),
            "holder-id" => holder = Some(holder_id(value.to_owned())?),
            _ => return Err(bad("keys are socket, fragment and holder-id")),
        }
    }
    let socket = socket.ok_or_else(|| bad("socket= is missing"))?;
    Ok(DeviceConfig {
        socket,
        fragments,
        holder_id: holder,
    })
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let mut devices = Vec::new();
        match args.socket_path {
            Some(socket) => devices.push(DeviceConfig {
                socket,
                fragments: args.fragment,
                holder_id: args.holder_id.map(holder_id).transpose()?,
            }),
            None if !args.fragment.is_empty() || args.holder_id.is_some() => {
                return Err(ConfigError::FragmentWithoutSocket);
            }
            None => {}
        }
        for spec in &args.device {
            devices.push(parse_device_spec(spec)?);
        }
        if devices.is_empty() {
            return Err(ConfigError::NoDevice);
        }
        let mut sockets = BTreeSet::new();
        for device in &devices {
            let name = device.socket.display().to_string();
            if device.fragments.is_empty() {
                return Err(ConfigError::NoFragment(name));
            }
            if !sockets.insert(&device.socket) {
                return Err(ConfigError::DuplicateSocket(name));
            }
        }
        Ok(Self {
            devices,
            pidfile: args.pidfile,
            access: SocketAccess::try_from(&args.socket)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["vhost-keyshard"];
        argv.extend_from_slice(args);
        Config::try_from(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn one_device_from_the_short_form() {
        let c = config(&[
            "--socket-path",
            "/run/a.sock",
            "--fragment",
            "f1",
            "--fragment",
            "f2",
        ])
        .unwrap();
        assert_eq!(
            c.devices,
            vec![DeviceConfig {
                socket: "/run/a.sock".into(),
                fragments: vec!["f1".into(), "f2".into()],
                holder_id: None,
            }]
        );
    }

    #[test]
    fn many_devices_from_device_specs() {
        let c = config(&[
            "--device",
            "socket=/run/a.sock,fragment=a1,holder-id=vhd-1",
            "--device",
            "socket=/run/b.sock,fragment=b1,fragment=b2",
            "--pidfile",
            "/run/k.pid",
        ])
        .unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(
            c.devices[0].holder_id,
            Some(HolderId::new("vhd-1").unwrap())
        );
        assert_eq!(c.devices[1].fragments.len(), 2);
        assert_eq!(c.pidfile, Some("/run/k.pid".into()));
        assert_eq!(c.access, SocketAccess::default());
    }

    #[test]
    fn socket_owner_and_mode_apply_to_every_device() {
        let c = config(&[
            "--device",
            "socket=/run/a.sock,fragment=a1",
            "--socket-owner",
            "0:0",
            "--socket-mode",
            "660",
        ])
        .unwrap();
        assert_eq!(
            c.access,
            SocketAccess {
                mode: 0o660,
                owner: Some(0),
                group: Some(0)
            }
        );
        assert!(matches!(
            config(&["--device", "socket=s,fragment=f", "--socket-mode", "9"]),
            Err(ConfigError::Access(AccessError::Mode(_)))
        ));
    }

    #[test]
    fn refuses_incomplete_or_ambiguous_input() {
        assert_eq!(config(&[]), Err(ConfigError::NoDevice));
        assert_eq!(
            config(&["--fragment", "f"]),
            Err(ConfigError::FragmentWithoutSocket)
        );
        assert_eq!(
            config(&["--socket-path", "s"]),
            Err(ConfigError::NoFragment("s".into()))
        );
        assert_eq!(
            config(&[
                "--socket-path",
                "s",
                "--fragment",
                "f",
                "--device",
                "socket=s,fragment=g"
            ]),
            Err(ConfigError::DuplicateSocket("s".into()))
        );
        assert!(matches!(
            config(&[
                "--socket-path",
                "s",
                "--fragment",
                "f",
                "--holder-id",
                "Bad Id"
            ]),
            Err(ConfigError::HolderId(_))
        ));
        for spec in [
            "fragment=f",
            "socket=s,socket=t,fragment=f",
            "socket=s,colour=red",
            "socket=,fragment=f",
            "socket",
        ] {
            assert!(
                matches!(
                    config(&["--device", spec]),
                    Err(ConfigError::BadDeviceSpec { .. })
                ),
                "{spec}"
            );
        }
    }
}
