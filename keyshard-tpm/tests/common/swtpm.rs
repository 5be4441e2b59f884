//! A throw-away swtpm (TPM 2.0 simulator) for the tests: a fresh TPM with its state in a
//! temporary directory, killed on drop even when the test panics. The process handling (a free
//! port pair below the ephemeral range, retried when lost, readiness, SIGTERM then SIGKILL) is
//! keyshard-e2e's harness, the one swtpm launcher of the workspace; this file only adds the
//! temporary directory and turns its errors into test failures. A missing `swtpm` fails the
//! test with the package to install; it never skips.

use std::path::Path;
use std::time::Duration;

use keyshard_e2e::swtpm::Swtpm as Harness;

/// A running swtpm.
pub struct Swtpm {
    // Declared first: stopped before its state directory is removed.
    tpm: Harness,
    dir: tempfile::TempDir,
}

impl Swtpm {
    /// A fresh TPM: new seeds, PCRs reset, no persistent keys.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tpm = Harness::start(dir.path()).unwrap_or_else(|e| panic!("swtpm: {e}"));
        Self { tpm, dir }
    }

    /// A TPM manufactured by `swtpm_setup` with EK certificates from the local CA in `ca`
    /// (created by the first TPM of that directory, shared by the next).
    pub fn start_with_ek_certificates(ca: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tpm = Harness::start_with_ek_certificates(dir.path(), ca)
            .unwrap_or_else(|e| panic!("swtpm with EK certificates: {e}"));
        Self { tpm, dir }
    }

    /// "swtpm:host=127.0.0.1,port=P", for `Tpm::open` and `TPM2TOOLS_TCTI`.
    pub fn tcti(&self) -> String {
        self.tpm.tcti()
    }

    /// Stops swtpm and starts it again on the same state and port: its clients' TPM went away
    /// and came back.
    pub fn restart_in_place(&mut self) {
        self.tpm
            .restart_in_place(Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("restarting swtpm: {e}"));
    }

    /// Stops swtpm (SIGTERM): its clients' commands fail until it is started again.
    pub fn stop(&mut self) {
        self.tpm
            .stop(Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("stopping swtpm: {e}"));
    }

    pub fn pid(&self) -> u32 {
        self.tpm.pid()
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops swtpm (SIGTERM, so it saves its state) and starts it again on the same state and
    /// a new port: a reboot. Seeds and persistent keys survive; PCRs are reset.
    pub fn restart(&mut self) {
        self.tpm
            .stop(Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("stopping swtpm: {e}"));
        self.tpm = Harness::start(self.dir.path()).unwrap_or_else(|e| panic!("swtpm: {e}"));
    }
}
