//! Names in the credential service: a shard host's id, a compute instance's id and the failure
//! domains a host sits in.
//!
//! A credential is named by a [`KeyId`](keyshard_core::KeyId), the same name its fragments and
//! its key check value carry, so these are only the names that keyshard-core does not have.

use std::fmt;
use std::str::FromStr;

pub use keyshard_core::holder::NameError;
use keyshard_core::holder::check_name;

/// Longest shard host id.
pub const MAX_HOST_ID_LEN: usize = 64;
/// Longest region or operator name.
pub const MAX_DOMAIN_NAME_LEN: usize = 64;

/// Declares an id type of 1..=64 bytes of `a-z 0-9 . _ -` (lower-case ASCII, so it reads the same
/// everywhere it is bound), with `new`, `as_str`, `Display` and `FromStr`; `$what` names it in
/// errors.
macro_rules! lower_case_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Checks 1..=64 bytes of `a-z 0-9 . _ -`.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_name(
                    $what,
                    &value,
                    MAX_HOST_ID_LEN,
                    "a-z, 0-9, '.', '_' and '-'",
                    |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b),
                )?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
    };
}

lower_case_id!(
    /// Names one shard host, e.g. `host-eu-1` (shard ciphertexts, placement hashes, the shard
    /// map bind it).
    HostId,
    "host id"
);

lower_case_id!(
    /// Names one compute instance, e.g. `vm-web-1`: the same characters as a [`HostId`], so it
    /// reads the same wherever it is bound (grants, the store).
    InstanceId,
    "instance id"
);

/// Names a region or an operator, e.g. `eu-west` or `acme`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

impl DomainName {
    /// Checks 1..=64 bytes of `A-Z a-z 0-9 . _ -`.
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        check_name(
            "domain name",
            &value,
            MAX_DOMAIN_NAME_LEN,
            "A-Z, a-z, 0-9, '.', '_' and '-'",
            |b| b.is_ascii_alphanumeric() || b"._-".contains(&b),
        )?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DomainName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Where a shard host sits: two hosts in one region, or run by one operator, fail together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FailureDomain {
    pub region: DomainName,
    pub operator: DomainName,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_are_lower_case_and_bounded() {
        assert!(HostId::new("host-eu-1.a_b").is_ok());
        assert!(HostId::new("h".repeat(64)).is_ok());
        assert!(matches!(
            HostId::new("h".repeat(65)),
            Err(NameError::TooLong { len: 65, .. })
        ));
        assert!(matches!(HostId::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            HostId::new("Host-1"),
            Err(NameError::BadCharacter { .. })
        ));
        assert!(matches!(
            HostId::new("host 1"),
            Err(NameError::BadCharacter { .. })
        ));
    }

    #[test]
    fn instance_ids_take_the_characters_of_host_ids() {
        assert!(InstanceId::new("vm-web-1.a_b").is_ok());
        assert!(InstanceId::new("i".repeat(64)).is_ok());
        assert!(matches!(
            InstanceId::new("i".repeat(65)),
            Err(NameError::TooLong { len: 65, .. })
        ));
        assert!(matches!(InstanceId::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            InstanceId::new("VM-1"),
            Err(NameError::BadCharacter { .. })
        ));
    }

    #[test]
    fn domain_names_allow_upper_case_but_no_separators() {
        assert!(DomainName::new("EU-West.2").is_ok());
        assert!(matches!(
            DomainName::new("eu,west"),
            Err(NameError::BadCharacter { .. })
        ));
        assert!(matches!(
            DomainName::new("region=eu"),
            Err(NameError::BadCharacter { .. })
        ));
        assert!(matches!(
            DomainName::new("x".repeat(65)),
            Err(NameError::TooLong { .. })
        ));
    }
}
