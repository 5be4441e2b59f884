//! Who holds a share (holder class and holder id) and which secret it belongs to (key id).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest holder id: the device serial `ksf-<holder-id>` must fit in virtio-blk's 20 bytes.
pub const MAX_HOLDER_ID_LEN: usize = 16;
/// Longest key id.
pub const MAX_KEY_ID_LEN: usize = 64;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long, at most {max} are allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} may hold only {allowed}")]
    BadCharacter {
        what: &'static str,
        allowed: &'static str,
    },
    #[error("unknown holder class {0:?} (expected vhd, tpm, sev, host or recovery)")]
    UnknownClass(String),
}

/// Where a share lives, which decides what releases it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HolderClass {
    /// A fragment device attached to the guest: readable by root on the host.
    Vhd,
    /// Sealed to the host TPM under a PCR policy.
    Tpm,
    /// Released only to a guest whose SEV-SNP report verifies.
    Sev,
    /// A remote shard host (later).
    Host,
    /// The recovery share: kept offline by the operator (a file or a printed code), used only
    /// by `keyshard reseal`, never asked for at boot.
    Recovery,
}

impl HolderClass {
    pub const ALL: [HolderClass; 5] = [Self::Vhd, Self::Tpm, Self::Sev, Self::Host, Self::Recovery];

    /// The class's code in the fragment format.
    pub fn code(self) -> u8 {
        match self {
            Self::Vhd => 1,
            Self::Tpm => 2,
            Self::Sev => 3,
            Self::Host => 4,
            Self::Recovery => 5,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|class| class.code() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vhd => "vhd",
            Self::Tpm => "tpm",
            Self::Sev => "sev",
            Self::Host => "host",
            Self::Recovery => "recovery",
        }
    }
}

impl fmt::Display for HolderClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HolderClass {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|class| class.as_str() == s)
            .ok_or_else(|| NameError::UnknownClass(s.to_owned()))
    }
}

/// Checks a name: not empty, at most `max` bytes, every byte `is_allowed` (`allowed` says which,
/// for the error). Holder and key ids here; shard host ids and failure domains in
/// keyshard-shards.
pub fn check_name(
    what: &'static str,
    value: &str,
    max: usize,
    allowed: &'static str,
    is_allowed: fn(u8) -> bool,
) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > max {
        return Err(NameError::TooLong {
            what,
            len: value.len(),
            max,
        });
    }
    if !value.bytes().all(is_allowed) {
        return Err(NameError::BadCharacter { what, allowed });
    }
    Ok(())
}

/// Names one holder, e.g. `vhd-1`; lower-case so it can be a device serial as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct HolderId(String);

impl HolderId {
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        check_name(
            "holder id",
            &value,
            MAX_HOLDER_ID_LEN,
            "a-z, 0-9, '.', '_' and '-'",
            |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b),
        )?;
        Ok(Self(value))
    }

    /// The default id of the `index`-th holder of a class: `vhd-1`, `tpm-1`, ...
    pub fn numbered(class: HolderClass, index: u8) -> Self {
        Self(format!("{}-{index}", class.as_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<HolderId> for String {
    fn from(id: HolderId) -> Self {
        id.0
    }
}

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HolderId {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Names the secret that a fragment is a share of; every fragment of one secret carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct KeyId(String);

impl KeyId {
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        check_name(
            "key id",
            &value,
            MAX_KEY_ID_LEN,
            "A-Z, a-z, 0-9, '.', '_' and '-'",
            |b| b.is_ascii_alphanumeric() || b"._-".contains(&b),
        )?;
        Ok(Self(value))
    }

    /// A fresh random key id (`key-` and 16 hex digits), for splits that name none.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes)?;
        Ok(Self(format!("key-{}", hex::encode(bytes))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> Self {
        id.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for KeyId {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_codes_round_trip_and_unknown_codes_are_none() {
        for class in HolderClass::ALL {
            assert_eq!(HolderClass::from_code(class.code()), Some(class));
            assert_eq!(class.as_str().parse::<HolderClass>(), Ok(class));
        }
        assert_eq!(HolderClass::from_code(0), None);
        assert_eq!(HolderClass::from_code(6), None);
        assert!("disk".parse::<HolderClass>().is_err());
    }

    #[test]
    fn holder_ids_fit_a_device_serial() {
        assert!(HolderId::new("vhd-1").is_ok());
        assert!(HolderId::new("a".repeat(16)).is_ok());
        assert!(matches!(
            HolderId::new("a".repeat(17)),
            Err(NameError::TooLong { len: 17, .. })
        ));
        assert!(matches!(HolderId::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            HolderId::new("VHD-1"),
            Err(NameError::BadCharacter { .. })
        ));
        assert!(HolderId::new("vhd 1").is_err());
        assert_eq!(HolderId::numbered(HolderClass::Tpm, 2).as_str(), "tpm-2");
    }

    #[test]
    fn key_ids_are_bounded_and_printable() {
        assert!(KeyId::new("Root-Volume_2.luks").is_ok());
        assert!(KeyId::new("x".repeat(65)).is_err());
        assert!(KeyId::new("a/b").is_err());
        assert!(KeyId::new("é").is_err());
        let a = KeyId::random().unwrap();
        let b = KeyId::random().unwrap();
        assert_ne!(a, b);
        assert!(KeyId::new(a.as_str()).is_ok());
    }
}
