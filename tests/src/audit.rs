//! The coordinator's audit log (`<state dir>/audit.log`), read back: one JSON object per line,
//! one line per request it answered, released or refused, with the reason. Answers identical to
//! an earlier line within a minute are folded into one line with `repeated: N`, written when
//! that minute ends or the coordinator stops: read the log after stopping it to see them all.

use std::path::Path;

use serde::Deserialize;

use crate::{HarnessError, Result, io_context};

/// One answer of the coordinator, as logged. Fields the tests do not look at are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuditEntry {
    pub vm: String,
    /// `nonce` or `release`.
    pub kind: String,
    pub class: Option<String>,
    pub holder: Option<String>,
    /// `issued`, `released` or `refused`.
    pub verdict: String,
    pub reason: Option<String>,
    /// A folded line: this many more answers identical to an earlier line.
    pub repeated: Option<u64>,
}

impl AuditEntry {
    /// `vm1: released tpm-1`, `vm1: refused tpm-1: <reason>`, `vm1: issued nonce`, and
    /// ` (repeated N)` after a folded line: for assertion messages.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "{}: {} {}",
            self.vm,
            self.verdict,
            self.holder.as_deref().unwrap_or(&self.kind)
        );
        if let Some(reason) = &self.reason {
            text.push_str(": ");
            text.push_str(reason);
        }
        if let Some(repeated) = self.repeated {
            text.push_str(&format!(" (repeated {repeated})"));
        }
        text
    }
}

/// Every entry of the log at `path`, in order; no log yet is no entries.
pub fn read(path: &Path) -> Result<Vec<AuditEntry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_context(format!("reading {}", path.display()))(e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line).map_err(|source| HarnessError::Audit {
                path: path.to_owned(),
                line: index + 1,
                source,
            })
        })
        .collect()
}

/// The release entries only (a SEV-SNP guest also asks for nonces), in order.
pub fn releases(entries: &[AuditEntry]) -> Vec<&AuditEntry> {
    entries.iter().filter(|e| e.kind == "release").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_lines_the_coordinator_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(
            &path,
            concat!(
                r#"{"time":"2026-11-22T01:00:00Z","vm":"vm1","request":"00ff","kind":"release","class":"tpm","holder":"tpm-1","verdict":"released"}"#,
                "\n",
                r#"{"time":"2026-11-22T01:00:09Z","vm":"vm1","request":"0100","kind":"nonce","verdict":"issued"}"#,
                "\n",
                r#"{"time":"2026-11-22T01:00:10Z","vm":"vm1","request":"0101","kind":"release","class":"tpm","holder":"tpm-1","verdict":"refused","reason":"PCR 7 (sha256) differs from its golden value"}"#,
                "\n",
                r#"{"time":"2026-11-22T01:00:30Z","vm":"vm1","request":"0107","kind":"release","class":"tpm","holder":"tpm-1","verdict":"released","repeated":2,"since":"2026-11-22T01:00:20Z"}"#,
                "\n"
            ),
        )
        .unwrap();
        let entries = read(&path).unwrap();
        assert_eq!(entries.len(), 4);
        let releases = releases(&entries);
        assert_eq!(releases.len(), 3);
        assert_eq!(releases[2].repeated, Some(2));
        assert_eq!(releases[2].summary(), "vm1: released tpm-1 (repeated 2)");
        assert_eq!(releases[0].summary(), "vm1: released tpm-1");
        assert_eq!(entries[1].summary(), "vm1: issued nonce");
        assert_eq!(releases[1].verdict, "refused");
        assert_eq!(
            releases[1].reason.as_deref(),
            Some("PCR 7 (sha256) differs from its golden value")
        );
    }

    #[test]
    fn no_log_is_no_entries_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        assert!(read(&path).unwrap().is_empty());
        std::fs::write(&path, "{\"vm\":\"vm1\"}\nnot json\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("audit.log:1"), "{err}");
    }
}
