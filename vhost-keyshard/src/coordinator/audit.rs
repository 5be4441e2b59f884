//! The audit log: one JSON line per request the coordinator answers, released or refused,
//! with the reason. It never holds secret bytes: no shares, no keys, no evidence.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// RFC 3339, UTC.
    pub time: String,
    pub vm: String,
    /// The guest's request id, hex.
    pub request: String,
    /// `nonce` or `release`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// `issued`, `released` or `refused`.
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    /// Appends to `path` (created 0600).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Writes one line; a failure is logged, never fatal to the answer.
    pub fn record(&self, entry: &AuditEntry) {
        let line = match serde_json::to_string(entry) {
            Ok(line) => line,
            Err(e) => {
                log::error!("audit entry not written: {e}");
                return;
            }
        };
        let written = self
            .file
            .lock()
            .map_err(|_| io::Error::other("audit log lock poisoned"))
            .and_then(|mut file| writeln!(file, "{line}").and_then(|()| file.flush()));
        if let Err(e) = written {
            log::error!("audit entry not written: {e}");
        }
    }
}

/// Now, as the log writes it.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn appends_one_json_line_per_entry_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        let entry = AuditEntry {
            time: now_rfc3339(),
            vm: "vm1".into(),
            request: "2a".into(),
            kind: "release",
            class: Some("tpm".into()),
            holder: Some("tpm-1".into()),
            verdict: "refused",
            reason: Some("PCR 7 differs from its golden value".into()),
        };
        log.record(&entry);
        log.record(&AuditEntry {
            verdict: "released",
            reason: None,
            ..entry.clone()
        });
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["verdict"], "refused");
        assert_eq!(lines[0]["reason"], "PCR 7 differs from its golden value");
        assert!(lines[1].get("reason").is_none());
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Reopening appends.
        AuditLog::open(&path).unwrap().record(&entry);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }
}
