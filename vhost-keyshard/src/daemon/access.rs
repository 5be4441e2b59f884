//! `--socket-owner USER[:GROUP]` and `--socket-mode MODE`, shared by `vhost-keyshard` and
//! `keyshard coordinator`: who may connect to a device's socket (the QEMU or libvirt user).

use crate::device::serve::{DEFAULT_MODE, SocketAccess};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("--socket-mode {0:?}: expected an octal mode up to 777, e.g. 600 or 0660")]
    Mode(String),
    #[error("--socket-owner {spec:?}: no such {what}")]
    Unknown { spec: String, what: &'static str },
    #[error("--socket-owner {0:?}: expected USER[:GROUP] (names or numeric ids)")]
    Owner(String),
    #[error("--socket-owner {spec:?}: looking up {name:?}: {reason}")]
    Lookup {
        spec: String,
        name: String,
        reason: String,
    },
}

/// Socket file options, flattened into a command's arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SocketArgs {
    /// Owner of every socket file: USER[:GROUP], names or numeric ids (the QEMU or libvirt user).
    /// Connections from other users than root, this process's user and this owner are cut.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub socket_owner: Option<String>,
    /// Mode of every socket file, octal (default 600: only the owner may connect).
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
}

impl TryFrom<&SocketArgs> for SocketAccess {
    type Error = AccessError;

    fn try_from(args: &SocketArgs) -> Result<Self, AccessError> {
        let mode = match &args.socket_mode {
            Some(text) => parse_mode(text)?,
            None => DEFAULT_MODE,
        };
        let (owner, group) = match &args.socket_owner {
            Some(spec) => parse_owner(spec)?,
            None => (None, None),
        };
        Ok(Self { mode, owner, group })
    }
}

fn parse_mode(text: &str) -> Result<u32, AccessError> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| !digits.is_empty() && *mode <= 0o777)
        .ok_or_else(|| AccessError::Mode(text.to_owned()))
}

fn parse_owner(spec: &str) -> Result<(Option<u32>, Option<u32>), AccessError> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() && group.is_none_or(str::is_empty) {
        return Err(AccessError::Owner(spec.to_owned()));
    }
    let uid = match user {
        "" => None,
        name => Some(resolve(spec, name, Kind::User)?),
    };
    let gid = match group {
        None | Some("") => None,
        Some(name) => Some(resolve(spec, name, Kind::Group)?),
    };
    Ok((uid, gid))
}

#[derive(Clone, Copy)]
enum Kind {
    User,
    Group,
}

/// A numeric id as is, else the name looked up in the system's user or group database.
fn resolve(spec: &str, name: &str, kind: Kind) -> Result<u32, AccessError> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let lookup_error = |reason: String| AccessError::Lookup {
        spec: spec.to_owned(),
        name: name.to_owned(),
        reason,
    };
    if name.contains('\0') {
        return Err(AccessError::Owner(spec.to_owned()));
    }
    let found = match kind {
        Kind::User => user_id(name),
        Kind::Group => group_id(name),
    }
    .map_err(|e| lookup_error(e.to_string()))?;
    found.ok_or(AccessError::Unknown {
        spec: spec.to_owned(),
        what: match kind {
            Kind::User => "user",
            Kind::Group => "group",
        },
    })
}

fn user_id(name: &str) -> nix::Result<Option<u32>> {
    Ok(nix::unistd::User::from_name(name)?.map(|user| user.uid.as_raw()))
}

fn group_id(name: &str) -> nix::Result<Option<u32>> {
    Ok(nix::unistd::Group::from_name(name)?.map(|group| group.gid.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(owner: Option<&str>, mode: Option<&str>) -> Result<SocketAccess, AccessError> {
        SocketAccess::try_from(&SocketArgs {
            socket_owner: owner.map(str::to_owned),
            socket_mode: mode.map(str::to_owned),
        })
    }

    #[test]
    fn defaults_to_0600_and_no_owner() {
        assert_eq!(access(None, None).unwrap(), SocketAccess::default());
        assert_eq!(SocketAccess::default().mode, 0o600);
    }

    #[test]
    fn modes_are_octal_and_bounded() {
        assert_eq!(access(None, Some("660")).unwrap().mode, 0o660);
        assert_eq!(access(None, Some("0660")).unwrap().mode, 0o660);
        assert_eq!(access(None, Some("0o600")).unwrap().mode, 0o600);
        for bad in ["", "8", "rw", "1777", "-600", "0o"] {
            assert_eq!(
                access(None, Some(bad)),
                Err(AccessError::Mode(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn owners_by_name_or_number() {
        let root = access(Some("root"), None).unwrap();
        assert_eq!((root.owner, root.group), (Some(0), None));
        let both = access(Some("root:root"), None).unwrap();
        assert_eq!((both.owner, both.group), (Some(0), Some(0)));
        let numeric = access(Some("107:64055"), None).unwrap();
        assert_eq!((numeric.owner, numeric.group), (Some(107), Some(64055)));
        let group_only = access(Some(":0"), None).unwrap();
        assert_eq!((group_only.owner, group_only.group), (None, Some(0)));
        assert!(matches!(
            access(Some("no-such-user-here"), None),
            Err(AccessError::Unknown { what: "user", .. })
        ));
        assert!(matches!(
            access(Some("root:no-such-group-here"), None),
            Err(AccessError::Unknown { what: "group", .. })
        ));
        assert_eq!(access(Some(":"), None), Err(AccessError::Owner(":".into())));
    }
}
