//! `--socket-owner USER[:GROUP]` and `--socket-mode MODE`, shared by `vhost-keyshard` and
//! `keyshard coordinator`: who may connect to a device's socket (the QEMU or libvirt user).

use std::ffi::{CStr, CString};

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
    let c_name = CString::new(name).map_err(|_| AccessError::Owner(spec.to_owned()))?;
    let found = match kind {
        Kind::User => user_id(&c_name),
        Kind::Group => group_id(&c_name),
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

/// Buffer for getpwnam_r/getgrnam_r; retried larger on ERANGE, up to a bound.
const LOOKUP_BUFFER: usize = 4096;
const LOOKUP_BUFFER_MAX: usize = 1 << 20;

fn user_id(name: &CStr) -> std::io::Result<Option<u32>> {
    let mut size = LOOKUP_BUFFER;
    loop {
        let mut buffer = vec![0 as libc::c_char; size];
        // SAFETY: passwd is plain old data; all zeroes is a valid value to be overwritten.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local (`name` is NUL-terminated, `buffer` has the
        // length passed); getpwnam_r writes only into `entry`, `buffer` and `result`.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &raw mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &raw mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(entry.pw_uid)),
            libc::ERANGE if size < LOOKUP_BUFFER_MAX => size *= 2,
            libc::ENOENT | libc::ESRCH => return Ok(None),
            code => return Err(std::io::Error::from_raw_os_error(code)),
        }
    }
}

fn group_id(name: &CStr) -> std::io::Result<Option<u32>> {
    let mut size = LOOKUP_BUFFER;
    loop {
        let mut buffer = vec![0 as libc::c_char; size];
        // SAFETY: group is plain old data; all zeroes is a valid value to be overwritten.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_id`, for getgrnam_r.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &raw mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &raw mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(entry.gr_gid)),
            libc::ERANGE if size < LOOKUP_BUFFER_MAX => size *= 2,
            libc::ENOENT | libc::ESRCH => return Ok(None),
            code => return Err(std::io::Error::from_raw_os_error(code)),
        }
    }
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
