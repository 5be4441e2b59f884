//! Harness for keyshard's end-to-end tests: starts real processes (fragment daemons, the
//! coordinator, swtpm, QEMU) on temporary sockets and ports and stops them when a test ends, pass
//! or fail.
//!
//! - [`process`]: a guard that kills a child's whole process group on drop (also while a test
//!   panics), daemons that are ready once they print a line, and one-shot tools.
//! - [`qemu`]: boots a guest through `qemu-configs/run-qemu.sh` under a wall-clock limit and keeps
//!   its console; [`console`] reads the init's `KEYSHARD-E2E:` markers back out of it.
//! - [`images`]: the guest initramfs and the LUKS2 test volume, through `images/*.sh`.
//! - [`env`]: where the binaries and the kernel are (environment variables set by `make e2e`).
//! - [`scenario`]: a split key (or a coordinator state from `keyshard init`), its volume and
//!   initramfs, its fragment daemons and coordinator: what a test boots; and many VMs' states
//!   under one root and one swtpm, served by one `keyshard coordinator --state-root`.
//! - [`swtpm`]: a software TPM for the coordinator, and PCR extends with tpm2-tools.
//! - [`audit`]: the coordinator's audit log, read back.

pub mod audit;
pub mod console;
pub mod env;
pub mod images;
pub mod process;
pub mod qemu;
pub mod scenario;
pub mod swtpm;

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "{var} is not set: run the end-to-end tests with `make e2e`, which builds what they need and sets it"
    )]
    MissingEnv { var: &'static str },
    #[error("{var}: {reason}")]
    BadEnv { var: &'static str, reason: String },
    #[error("{tool} is not installed: run `make deps` (Debian package {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{what} not found at {}", path.display())]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("cannot start {name}: {source}")]
    Spawn { name: String, source: io::Error },
    #[error("{name} failed ({status}); stderr:\n{stderr}")]
    ToolFailed {
        name: String,
        status: String,
        stderr: String,
    },
    #[error(
        "{name} exited ({status}) before printing a line starting with {prefix:?}; stderr:\n{stderr}"
    )]
    ExitedBeforeReady {
        name: String,
        prefix: String,
        status: String,
        stderr: String,
    },
    #[error(
        "{name} printed no line starting with {prefix:?} within {seconds} s; stderr:\n{stderr}"
    )]
    NotReady {
        name: String,
        prefix: String,
        seconds: u64,
        stderr: String,
    },
    #[error("{}: not a fragment: {source}", path.display())]
    Fragment {
        path: PathBuf,
        source: keyshard_core::fragment::FragmentError,
    },
    #[error("{}: not a manifest: {source}", path.display())]
    Manifest {
        path: PathBuf,
        source: keyshard_core::manifest::ManifestError,
    },
    #[error(
        "this scenario has no coordinator state or TPM: deal it with Scenario::init, not Scenario::split"
    )]
    NoCoordinatorState,
    #[error("{}:{line}: not an audit entry: {source}", path.display())]
    Audit {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

pub type Result<T> = std::result::Result<T, HarnessError>;

/// Wraps an `io::Error` with what was being done.
pub(crate) fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}
