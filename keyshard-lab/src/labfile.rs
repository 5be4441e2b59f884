//! `DIR/lab.json`: what `keyshard lab up` started and where everything is, for the user, the
//! tests, the demo and `keyshard lab down`. Paths are absolute.
//!
//! ```json
//! {"version": 1, "dir": "/abs/DIR", "bin": "/abs/keyshard", "store": "redb:/abs/DIR/cms/cms.redb",
//!  "ca_certificate": "DIR/pki/ca.pem", "ek_ca": "DIR/ek-ca/bundle.pem",
//!  "cms": {"url": "https://127.0.0.1:PORT", "signing_key_public": "DIR/cms/signing.pem.pub",
//!          "process": {...}},
//!  "client": {"private_key": "DIR/client/client.key", "public_key": "DIR/client/client.key.pub"},
//!  "etcd": null | {"url": "http://127.0.0.1:PORT", "process": {...}},
//!  "hosts": [{"id": "host-1", "region": "eu", "operator": "acme",
//!             "endpoint": "https://127.0.0.1:PORT", "tcti": "swtpm:host=127.0.0.1,port=P",
//!             "state_dir": "DIR/hosts/host-1/state", "tpm_state": "DIR/hosts/host-1/tpm",
//!             "process": {...}, "swtpm": {...}}, ...],
//!  "instance": {"id": "instance-1", "tcti": "...", "ak_name": "000b...",
//!               "policy": "DIR/instance/policy.json", "swtpm": {...}}}
//! ```
//!
//! A process is `{"name", "program", "pid", "start_time", "log"}` ([`ProcessRecord`]).

use std::path::{Path, PathBuf};

use keyshard_core::files::{self, Overwrite};
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::process::ProcessRecord;

/// The file's name in the lab directory.
pub const LAB_FILE: &str = "lab.json";
/// While `lab up` runs: the processes started so far, so that `lab down` can stop a lab whose
/// `up` was killed (SIGKILL) before it wrote `lab.json`. Removed once `lab.json` is written.
pub const STARTING_FILE: &str = "lab.starting.json";
/// The version written; others are refused.
pub const LAB_FILE_VERSION: u32 = 1;
/// The largest lab file read.
const MAX_LAB_FILE_LEN: usize = 1024 * 1024;

/// The whole lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lab {
    pub version: u32,
    pub dir: PathBuf,
    /// The `keyshard` binary every lab process runs.
    pub bin: PathBuf,
    /// The CMS's `--store`.
    pub store: String,
    /// The CA of every TLS certificate in the lab (`--ca` of the clients).
    pub ca_certificate: PathBuf,
    /// The EK CA bundle (swtpm_setup's local CA) the CMS checks EK certificates against.
    pub ek_ca: PathBuf,
    pub cms: Cms,
    pub client: Client,
    pub etcd: Option<Etcd>,
    pub hosts: Vec<Host>,
    pub instance: Instance,
}

/// The credential service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cms {
    pub url: String,
    /// The CMS's verifying key (`--cms-key` of the clients).
    pub signing_key_public: PathBuf,
    pub process: ProcessRecord,
}

/// The client's key pair (`credential keygen`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
}

/// The etcd the lab started for `--store etcd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Etcd {
    pub url: String,
    pub process: ProcessRecord,
}

/// One shard host and its TPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub id: String,
    pub region: String,
    pub operator: String,
    pub endpoint: String,
    pub tcti: String,
    /// The shard host's `--state-dir` (its `decrypt-key`).
    pub state_dir: PathBuf,
    /// The swtpm's state directory.
    pub tpm_state: PathBuf,
    pub process: ProcessRecord,
    pub swtpm: ProcessRecord,
}

/// The compute instance: only its TPM runs; `credential fetch` is the instance's side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub id: String,
    pub tcti: String,
    /// The AK name `instance enroll` printed: what an instance policy pins.
    pub ak_name: String,
    /// An instance policy file naming this instance (`credential put --instance-policy`).
    pub policy: PathBuf,
    pub swtpm: ProcessRecord,
}

/// Writes the processes `lab up` has started so far to `DIR/lab.starting.json` (whole: a
/// temporary file and a rename).
pub fn write_starting(dir: &Path, processes: &[ProcessRecord]) -> Result<()> {
    let text = serde_json::to_string_pretty(processes)
        .map_err(|e| LabError::InvalidArgument(format!("{STARTING_FILE}: {e}")))?;
    files::write_atomic(
        &dir.join(STARTING_FILE),
        format!("{text}\n").as_bytes(),
        0o644,
        Overwrite::Replace,
    )?;
    Ok(())
}

/// The processes of `DIR/lab.starting.json`, if there is one.
pub fn read_starting(dir: &Path) -> Result<Option<Vec<ProcessRecord>>> {
    let path = dir.join(STARTING_FILE);
    if path.symlink_metadata().is_err() {
        return Ok(None);
    }
    let bytes = files::read_limited(&path, MAX_LAB_FILE_LEN)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| LabError::LabFile {
            path,
            reason: e.to_string(),
        })
}

impl Lab {
    /// Every process, in the order `lab down` stops them: shard hosts, the CMS, etcd, then the
    /// TPMs.
    pub fn processes(&self) -> Vec<&ProcessRecord> {
        let mut out: Vec<&ProcessRecord> = self.hosts.iter().map(|h| &h.process).collect();
        out.push(&self.cms.process);
        out.extend(self.etcd.iter().map(|e| &e.process));
        out.extend(self.hosts.iter().map(|h| &h.swtpm));
        out.push(&self.instance.swtpm);
        out
    }

    /// Writes `DIR/lab.json` whole (temporary file and rename).
    pub fn write(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LabError::InvalidArgument(format!("lab.json: {e}")))?;
        let path = self.dir.join(LAB_FILE);
        files::write_atomic(
            &path,
            format!("{text}\n").as_bytes(),
            0o644,
            Overwrite::Replace,
        )?;
        Ok(())
    }

    /// Reads `DIR/lab.json`; [`LabError::NoLab`] when there is none.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(LAB_FILE);
        if path.symlink_metadata().is_err() {
            return Err(LabError::NoLab(dir.to_owned()));
        }
        let bytes = files::read_limited(&path, MAX_LAB_FILE_LEN)?;
        let lab: Self = serde_json::from_slice(&bytes).map_err(|e| LabError::LabFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if lab.version != LAB_FILE_VERSION {
            return Err(LabError::LabFile {
                path,
                reason: format!(
                    "version {} (this keyshard reads version {LAB_FILE_VERSION})",
                    lab.version
                ),
            });
        }
        Ok(lab)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn record(name: &str, pid: u32) -> ProcessRecord {
        ProcessRecord {
            name: name.to_owned(),
            program: "keyshard".to_owned(),
            pid,
            start_time: 7,
            log: PathBuf::from(format!("/lab/logs/{name}.log")),
        }
    }

    fn lab(dir: &Path) -> Lab {
        let host = |i: u32| Host {
            id: format!("host-{i}"),
            region: "eu".to_owned(),
            operator: "acme".to_owned(),
            endpoint: format!("https://127.0.0.1:{}", 9000 + i),
            tcti: "swtpm:host=127.0.0.1,port=20000".to_owned(),
            state_dir: dir.join("state"),
            tpm_state: dir.join("tpm"),
            process: record(&format!("host-{i}"), 100 + i),
            swtpm: record(&format!("swtpm-host-{i}"), 200 + i),
        };
        Lab {
            version: LAB_FILE_VERSION,
            dir: dir.to_owned(),
            bin: PathBuf::from("/bin/keyshard"),
            store: "redb:/lab/cms/cms.redb".to_owned(),
            ca_certificate: dir.join("ca.pem"),
            ek_ca: dir.join("ek.pem"),
            cms: Cms {
                url: "https://127.0.0.1:8443".to_owned(),
                signing_key_public: dir.join("s.pub"),
                process: record("cms", 10),
            },
            client: Client {
                private_key: dir.join("c.key"),
                public_key: dir.join("c.key.pub"),
            },
            etcd: Some(Etcd {
                url: "http://127.0.0.1:2379".to_owned(),
                process: record("etcd", 11),
            }),
            hosts: vec![host(1), host(2)],
            instance: Instance {
                id: "instance-1".to_owned(),
                tcti: "swtpm:host=127.0.0.1,port=20002".to_owned(),
                ak_name: "000b".to_owned(),
                policy: dir.join("policy.json"),
                swtpm: record("swtpm-instance", 300),
            },
        }
    }

    #[test]
    fn a_lab_file_reads_back_and_lists_daemons_before_tpms() {
        let dir = tempfile::tempdir().unwrap();
        let lab = lab(dir.path());
        lab.write().unwrap();
        assert_eq!(Lab::read(dir.path()).unwrap(), lab);
        let names: Vec<&str> = lab.processes().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "host-1",
                "host-2",
                "cms",
                "etcd",
                "swtpm-host-1",
                "swtpm-host-2",
                "swtpm-instance"
            ]
        );
    }

    #[test]
    fn another_version_an_unknown_field_or_no_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Lab::read(dir.path()), Err(LabError::NoLab(_))));
        let mut lab = lab(dir.path());
        lab.version = 2;
        lab.write().unwrap();
        let err = Lab::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
        lab.version = LAB_FILE_VERSION;
        lab.write().unwrap();
        let path = dir.path().join(LAB_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("\"version\"", "\"extra\": 1, \"version\"", 1),
        )
        .unwrap();
        let err = Lab::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("not a lab file") && err.contains("extra"),
            "{err}"
        );
    }
}
