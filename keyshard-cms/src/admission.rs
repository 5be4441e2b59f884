//! The operator's list of admitted shard hosts (`keyshard cms --hosts FILE`): which host ids may
//! enrol and register, in which failure domain, up to which placement weight, and optionally
//! with which TPM (its EK).
//!
//! Without a list, a host's id, region, operator and weight are whatever the registering host
//! says: anyone with a genuine TPM can enrol a free host id, claim any domain, and claim the
//! largest weight, so three such hosts in three claimed domains win k shares of every credential
//! put after them (weighted rendezvous hashing gives the heaviest host every index it may take).
//! With a list, the CMS refuses (403 `forbidden`) the enrolment of a host id that is not listed,
//! or by another TPM than the listed EK; and a registration of an unlisted id, in another region
//! or operator than listed, or heavier than its `max_weight`.
//!
//! # File (JSON, strict: unknown fields are refused)
//!
//! | field | value |
//! |---|---|
//! | `hosts` | 1..=1024 entries, each id once |
//! | `hosts[].id` | the host id |
//! | `hosts[].region`, `hosts[].operator` | the failure domain the host must register in |
//! | `hosts[].max_weight` | the largest placement weight it may register (1..=2^32-1; default 1) |
//! | `hosts[].ek_sha256` | optional: SHA-256 of the TPM's EK SubjectPublicKeyInfo (64 hex), the only TPM that may enrol the id |
//!
//! What it protects against: a stranger's genuine TPM enrolling as a host, a host claiming a
//! failure domain or weight the operator did not give it, and (with `ek_sha256`) another TPM
//! taking a listed id first. What it does not: a listed host's operator lying when the list
//! was written, or k listed hosts colluding.

use std::collections::HashMap;
use std::num::NonZeroU32;

use keyshard_shards::{DomainName, FailureDomain, HostId};
use serde::Deserialize;

/// The most hosts a list admits.
pub const MAX_HOSTS: usize = 1024;

/// Why a list does not parse, or a host is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("host list: {0}")]
    Parse(String),
    #[error("host {id} is not on the CMS's list of admitted hosts")]
    NotListed { id: HostId },
    #[error("host {id} is admitted in {expected}, not {claimed}")]
    Domain {
        id: HostId,
        expected: String,
        claimed: String,
    },
    #[error("host {id} may register a weight of at most {max}, not {claimed}")]
    Weight { id: HostId, max: u32, claimed: u32 },
    #[error("host {id} is admitted for another TPM (EK sha256 {expected}), not this one")]
    Ek { id: HostId, expected: String },
}

/// Result of admission checks.
pub type Result<T> = std::result::Result<T, AdmissionError>;

/// One admitted host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmittedHost {
    pub domain: FailureDomain,
    pub max_weight: NonZeroU32,
    pub ek_sha256: Option<[u8; 32]>,
}

/// The operator's list (module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAdmission {
    hosts: HashMap<HostId, AdmittedHost>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListFile {
    hosts: Vec<EntryFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    id: String,
    region: String,
    operator: String,
    #[serde(default = "one")]
    max_weight: u32,
    #[serde(default)]
    ek_sha256: Option<String>,
}

fn one() -> u32 {
    1
}

impl HostAdmission {
    /// Parses the JSON list (module documentation); the first bad entry is named.
    pub fn parse(json: &[u8]) -> Result<Self> {
        let bad = |reason: String| AdmissionError::Parse(reason);
        let file: ListFile = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        if file.hosts.is_empty() || file.hosts.len() > MAX_HOSTS {
            return Err(bad(format!(
                "{} hosts: want 1..={MAX_HOSTS}",
                file.hosts.len()
            )));
        }
        let mut hosts = HashMap::with_capacity(file.hosts.len());
        for (position, entry) in file.hosts.into_iter().enumerate() {
            let at = |reason: String| bad(format!("hosts[{position}]: {reason}"));
            let id = HostId::new(entry.id).map_err(|e| at(e.to_string()))?;
            let region = DomainName::new(&entry.region).map_err(|e| at(format!("region: {e}")))?;
            let operator =
                DomainName::new(&entry.operator).map_err(|e| at(format!("operator: {e}")))?;
            let max_weight = NonZeroU32::new(entry.max_weight)
                .ok_or_else(|| at("max_weight: must be 1 or more".to_owned()))?;
            let ek_sha256 = entry
                .ek_sha256
                .map(|text| {
                    let mut digest = [0u8; 32];
                    hex::decode_to_slice(&text, &mut digest)
                        .map(|()| digest)
                        .map_err(|_| at("ek_sha256: not 64 hex digits".to_owned()))
                })
                .transpose()?;
            let admitted = AdmittedHost {
                domain: FailureDomain { region, operator },
                max_weight,
                ek_sha256,
            };
            if hosts.insert(id.clone(), admitted).is_some() {
                return Err(at(format!("host {id} is listed twice")));
            }
        }
        Ok(Self { hosts })
    }

    /// How many hosts are admitted.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether no host is admitted (never true of a parsed list).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Whether the TPM with EK digest `ek` may enrol as host `id`.
    pub fn check_enrolment(&self, id: &HostId, ek: &[u8; 32]) -> Result<()> {
        let admitted = self.entry(id)?;
        match admitted.ek_sha256 {
            Some(expected) if &expected != ek => Err(AdmissionError::Ek {
                id: id.clone(),
                expected: hex::encode(expected),
            }),
            _ => Ok(()),
        }
    }

    /// Whether host `id` may register in `domain` with `weight`.
    pub fn check_registration(
        &self,
        id: &HostId,
        domain: &FailureDomain,
        weight: NonZeroU32,
    ) -> Result<()> {
        let admitted = self.entry(id)?;
        if &admitted.domain != domain {
            return Err(AdmissionError::Domain {
                id: id.clone(),
                expected: describe(&admitted.domain),
                claimed: describe(domain),
            });
        }
        if weight > admitted.max_weight {
            return Err(AdmissionError::Weight {
                id: id.clone(),
                max: admitted.max_weight.get(),
                claimed: weight.get(),
            });
        }
        Ok(())
    }

    fn entry(&self, id: &HostId) -> Result<&AdmittedHost> {
        self.hosts
            .get(id)
            .ok_or_else(|| AdmissionError::NotListed { id: id.clone() })
    }
}

fn describe(domain: &FailureDomain) -> String {
    format!("region {}, operator {}", domain.region, domain.operator)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn domain(region: &str, operator: &str) -> FailureDomain {
        FailureDomain {
            region: DomainName::new(region).unwrap(),
            operator: DomainName::new(operator).unwrap(),
        }
    }

    fn weight(w: u32) -> NonZeroU32 {
        NonZeroU32::new(w).unwrap()
    }

    /// Review of issue 9: a host's id, domain and weight were whatever it claimed; with the
    /// operator's list, only a listed id registers, in its listed domain, at most its weight,
    /// and (with `ek_sha256`) only its TPM enrols it.
    #[test]
    fn review9_only_listed_hosts_register_in_their_domain_and_weight() {
        let ek = [7u8; 32];
        let list = HostAdmission::parse(
            format!(
                r#"{{"hosts": [
                    {{"id": "host-1", "region": "eu", "operator": "acme"}},
                    {{"id": "host-2", "region": "us", "operator": "globex", "max_weight": 4,
                      "ek_sha256": "{}"}}
                ]}}"#,
                hex::encode(ek)
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(list.len(), 2);
        let h1 = HostId::new("host-1").unwrap();
        let h2 = HostId::new("host-2").unwrap();
        let h3 = HostId::new("host-3").unwrap();
        assert_eq!(
            list.check_registration(&h1, &domain("eu", "acme"), weight(1)),
            Ok(())
        );
        assert_eq!(
            list.check_registration(&h2, &domain("us", "globex"), weight(4)),
            Ok(())
        );
        for (id, claimed, w, says) in [
            (&h3, domain("eu", "acme"), 1, "not on the CMS's list"),
            (&h1, domain("ap", "acme"), 1, "admitted in region eu"),
            (&h1, domain("eu", "globex"), 1, "operator acme, not"),
            (&h1, domain("eu", "acme"), 2, "at most 1, not 2"),
            (&h2, domain("us", "globex"), u32::MAX, "at most 4"),
        ] {
            let err = list
                .check_registration(id, &claimed, weight(w))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err} should say {says}");
        }
        assert_eq!(list.check_enrolment(&h1, &[1; 32]), Ok(()));
        assert_eq!(list.check_enrolment(&h2, &ek), Ok(()));
        assert!(matches!(
            list.check_enrolment(&h2, &[1; 32]),
            Err(AdmissionError::Ek { .. })
        ));
        assert!(matches!(
            list.check_enrolment(&h3, &ek),
            Err(AdmissionError::NotListed { .. })
        ));
    }

    #[test]
    fn lists_parse_strictly() {
        for (json, says) in [
            (r#"{"hosts": []}"#, "0 hosts"),
            (
                r#"{"hosts": [{"id": "H", "region": "eu", "operator": "a"}]}"#,
                "hosts[0]",
            ),
            (
                r#"{"hosts": [{"id": "h", "region": "eu", "operator": "a", "x": 1}]}"#,
                "unknown field",
            ),
            (
                r#"{"hosts": [{"id": "h", "region": "eu", "operator": "a", "max_weight": 0}]}"#,
                "max_weight",
            ),
            (
                r#"{"hosts": [{"id": "h", "region": "eu", "operator": "a", "ek_sha256": "zz"}]}"#,
                "ek_sha256",
            ),
            (
                r#"{"hosts": [{"id": "h", "region": "eu", "operator": "a"},
                              {"id": "h", "region": "us", "operator": "b"}]}"#,
                "listed twice",
            ),
            ("[", "host list"),
        ] {
            let err = HostAdmission::parse(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err} should say {says}");
        }
    }
}
