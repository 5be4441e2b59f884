//! The audit log: one JSON line per request the coordinator answers, released or refused,
//! with the reason. It never holds secret bytes: no shares, no keys, no evidence.
//!
//! Repeats are folded so that a guest cannot fill the disk: the first answer of a kind (same
//! vm, kind, class, holder, verdict and reason) is written at once; identical answers within
//! [`FOLD_WINDOW`] after it are only counted, and written as one line with `repeated: N` (and
//! the time of the first and last repeat) when the window closes, when the log is closed, or
//! when too many different runs are open at once.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long identical answers fold into one line.
pub const FOLD_WINDOW: Duration = Duration::from_secs(60);
/// Runs open at once at most; beyond, the oldest is written out and closed.
const MAX_OPEN_RUNS: usize = 256;
/// How often the background flusher looks for closed windows.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditKind {
    Nonce,
    Release,
}

/// What the coordinator answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Issued,
    Released,
    Refused,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// RFC 3339, UTC; for a folded line, the time of the last repeat.
    pub time: String,
    pub vm: String,
    /// The guest's request id, hex; for a folded line, the last repeat's.
    pub request: String,
    pub kind: AuditKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A folded line: this many more answers identical to an earlier line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeated: Option<u64>,
    /// A folded line: the time of the first of those repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl AuditEntry {
    pub fn new(vm: &str, request_id: u64, kind: AuditKind) -> Self {
        Self {
            time: now_rfc3339(),
            vm: vm.to_owned(),
            request: format!("{request_id:x}"),
            kind,
            class: None,
            holder: None,
            verdict: Verdict::Refused,
            reason: None,
            repeated: None,
            since: None,
        }
    }
}

/// What makes two answers the same for folding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RunKey {
    vm: String,
    kind: AuditKind,
    class: Option<String>,
    holder: Option<String>,
    verdict: Verdict,
    reason: Option<String>,
}

impl RunKey {
    fn of(entry: &AuditEntry) -> Self {
        Self {
            vm: entry.vm.clone(),
            kind: entry.kind,
            class: entry.class.clone(),
            holder: entry.holder.clone(),
            verdict: entry.verdict,
            reason: entry.reason.clone(),
        }
    }
}

/// An open run: a line was written when it opened; later repeats are counted here.
struct Run {
    opened: Instant,
    repeats: u64,
    first_repeat: Option<String>,
    last: Option<AuditEntry>,
}

struct Inner {
    file: File,
    runs: BTreeMap<RunKey, Run>,
    window: Duration,
}

impl Inner {
    fn write(&mut self, entry: &AuditEntry) {
        let written = serde_json::to_string(entry)
            .map_err(io::Error::other)
            .and_then(|line| writeln!(self.file, "{line}"))
            .and_then(|()| self.file.flush());
        if let Err(e) = written {
            log::error!("audit entry not written: {e}");
        }
    }

    /// Writes the count of a run's repeats, if any.
    fn write_repeats(&mut self, run: Run) {
        if let (Some(mut last), Some(since)) = (run.last, run.first_repeat)
            && run.repeats > 0
        {
            last.repeated = Some(run.repeats);
            last.since = Some(since);
            self.write(&last);
        }
    }

    /// True when a line was written, false when the entry was counted as a repeat.
    fn record(&mut self, entry: &AuditEntry, now: Instant) -> bool {
        let key = RunKey::of(entry);
        let window = self.window;
        if let Some(run) = self
            .runs
            .get_mut(&key)
            .filter(|run| now.saturating_duration_since(run.opened) < window)
        {
            run.repeats += 1;
            run.first_repeat.get_or_insert_with(|| entry.time.clone());
            run.last = Some(entry.clone());
            return false;
        }
        if let Some(run) = self.runs.remove(&key) {
            self.write_repeats(run);
        }
        if self.runs.len() >= MAX_OPEN_RUNS {
            let oldest = self
                .runs
                .iter()
                .min_by_key(|(_, run)| run.opened)
                .map(|(key, _)| key.clone());
            if let Some(run) = oldest.and_then(|key| self.runs.remove(&key)) {
                self.write_repeats(run);
            }
        }
        self.write(entry);
        self.runs.insert(
            key,
            Run {
                opened: now,
                repeats: 0,
                first_repeat: None,
                last: None,
            },
        );
        true
    }

    /// Closes the runs whose window has passed (all of them when `now` is None).
    fn close_runs(&mut self, now: Option<Instant>) {
        let window = self.window;
        let closed: Vec<RunKey> = self
            .runs
            .iter()
            .filter(|(_, run)| {
                now.is_none_or(|now| now.saturating_duration_since(run.opened) >= window)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in closed {
            if let Some(run) = self.runs.remove(&key) {
                self.write_repeats(run);
            }
        }
    }
}

pub struct AuditLog {
    inner: Arc<Mutex<Inner>>,
}

impl AuditLog {
    /// Appends to `path` (created 0600), folding repeats over [`FOLD_WINDOW`].
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_folding(path, FOLD_WINDOW)
    }

    /// Appends to `path`, folding repeats over `window`. A thread of its own writes out the
    /// counts of closed windows; it ends with the log.
    pub fn open_folding(path: &Path, window: Duration) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let inner = Arc::new(Mutex::new(Inner {
            file,
            runs: BTreeMap::new(),
            window,
        }));
        let weak: Weak<Mutex<Inner>> = Arc::downgrade(&inner);
        let tick = FLUSH_EVERY.min(window.max(Duration::from_millis(10)));
        thread::Builder::new()
            .name("audit-flush".into())
            .spawn(move || {
                loop {
                    thread::sleep(tick);
                    let Some(inner) = weak.upgrade() else { return };
                    if let Ok(mut inner) = inner.lock() {
                        inner.close_runs(Some(Instant::now()));
                    }
                }
            })?;
        Ok(Self { inner })
    }

    /// Writes one line, or counts it as a repeat (then false); a failure is logged, never
    /// fatal to the answer.
    pub fn record(&self, entry: &AuditEntry) -> bool {
        match self.inner.lock() {
            Ok(mut inner) => inner.record(entry, Instant::now()),
            Err(_) => {
                log::error!("audit entry not written: the audit log lock is poisoned");
                true
            }
        }
    }
}

impl AuditLog {
    /// Writes the counts of every open run now (on the way out).
    pub fn flush(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.close_runs(None);
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.flush();
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
            class: Some("tpm".into()),
            holder: Some("tpm-1".into()),
            reason: Some("PCR 7 differs from its golden value".into()),
            ..AuditEntry::new("vm1", 0x2a, AuditKind::Release)
        };
        log.record(&entry);
        log.record(&AuditEntry {
            verdict: Verdict::Released,
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
        assert_eq!(lines[0]["kind"], "release");
        assert_eq!(lines[0]["request"], "2a");
        // Reopening appends.
        AuditLog::open(&path).unwrap().record(&entry);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Item 7: 8,091 identical refusals were 8,091 lines (1.1 MB a minute).
    #[test]
    fn item7_identical_answers_fold_into_one_counted_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        let flood = AuditEntry {
            reason: Some("too many requests".into()),
            ..AuditEntry::new("vm1", 1, AuditKind::Release)
        };
        for i in 0..10_000u64 {
            log.record(&AuditEntry {
                request: format!("{i:x}"),
                ..flood.clone()
            });
        }
        // Another VM's answer is written at once, not held behind the flood.
        log.record(&AuditEntry {
            verdict: Verdict::Issued,
            ..AuditEntry::new("vm2", 7, AuditKind::Nonce)
        });
        let written = lines(&path);
        assert_eq!(written.len(), 2, "{written:?}");
        assert_eq!(written[0]["request"], "0");
        assert!(written[0].get("repeated").is_none());
        assert_eq!(written[1]["vm"], "vm2");
        // Closing the log writes the count.
        drop(log);
        let written = lines(&path);
        assert_eq!(written.len(), 3);
        assert_eq!(written[2]["repeated"], 9_999);
        assert_eq!(written[2]["request"], format!("{:x}", 9_999));
        assert_eq!(written[2]["reason"], "too many requests");
        assert!(written[2]["since"].is_string());
        assert!(std::fs::metadata(&path).unwrap().len() < 1024);
    }

    #[test]
    fn a_closed_window_is_written_without_waiting_for_the_next_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open_folding(&path, Duration::from_millis(100)).unwrap();
        let entry = AuditEntry::new("vm1", 1, AuditKind::Nonce);
        for _ in 0..3 {
            log.record(&entry);
        }
        std::thread::sleep(Duration::from_millis(400));
        let written = lines(&path);
        assert_eq!(written.len(), 2, "{written:?}");
        assert_eq!(written[1]["repeated"], 2);
        // A new window: written at once again.
        log.record(&entry);
        assert_eq!(lines(&path).len(), 3);
    }
}
