//! A software TPM for the tests that seal shares to "the host's" TPM: `swtpm` (Debian package
//! swtpm) on 127.0.0.1, its state in a directory of the test, killed with the test; and PCR
//! extends through `tpm2_pcrextend` (Debian package tpm2-tools), which is how a test changes the
//! host's measured state. The tests never touch a real TPM.
//!
//! [`Swtpm::start_with_command_log`] also has swtpm log every command it is sent
//! (`--log file=..,level=2`), so a test or a benchmark can count what really reached the TPM,
//! independently of what the coordinator says it asked for ([`Swtpm::commands_logged_since`]).
//!
//! [`Swtpm::start_with_ek_certificates`] first manufactures the TPM with `swtpm_setup` (Debian
//! package swtpm-tools): an RSA 2048 and an ECC P-384 endorsement key, each with an EK
//! certificate in the TPM's NV, issued by a local CA in a directory the test gives. The
//! manufacturing, the swtpm command line and the port choice are `keyshard_lab::swtpm`'s, which
//! `keyshard lab up` uses too: one definition for the lab and the tests.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, describe_status, run_tool};
use crate::{HarnessError, Result, io_context};

const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: u32 = 8;

/// A running swtpm; dropping it kills it. The TCTI uses `port` for TPM commands and `port + 1`
/// for its control channel.
#[derive(Debug)]
pub struct Swtpm {
    guard: ChildGuard,
    port: u16,
    state: PathBuf,
    command_log: Option<PathBuf>,
}

/// The swtpm log level from which every command read on the server port is logged with its bytes.
const COMMAND_LOG_LEVEL: u8 = 2;

impl Swtpm {
    /// Starts a fresh TPM (new seeds, PCRs reset) with its state in `state`, which is created.
    /// A port pair lost to another process is retried on another pair.
    pub fn start(state: &Path) -> Result<Self> {
        Self::start_inner(state, None, None)
    }

    /// Stops swtpm (SIGTERM, so it saves its state) and starts it again on the same state and
    /// the same ports: to its clients, the TPM went away for a moment and came back (a restart
    /// of the simulator, a TPM reset). PCRs are reset; seeds and persistent keys survive.
    pub fn restart_in_place(&mut self, grace: Duration) -> Result<()> {
        self.stop(grace)?;
        let state = self.state.clone();
        let log = self.command_log.clone();
        *self = Self::start_inner(&state, log.as_deref(), Some(self.port))?;
        Ok(())
    }

    /// Like [`Self::start`], with swtpm logging every TPM command it processes to `log`
    /// (`--log file=LOG,level=2`): read back with [`Self::commands_logged_since`]. The log grows
    /// by a few hundred bytes a command.
    pub fn start_with_command_log(state: &Path, log: &Path) -> Result<Self> {
        Self::start_inner(state, Some(log), None)
    }

    /// Like [`Self::start`], on a TPM first manufactured by `swtpm_setup --create-ek-cert`:
    /// endorsement keys and their certificates from the local CA in `ca` (created on first use,
    /// then reused). [`ek_ca_certificates`] lists the CA's certificates. `state` must not hold
    /// a TPM yet.
    pub fn start_with_ek_certificates(state: &Path, ca: &Path) -> Result<Self> {
        manufacture(state, ca)?;
        Self::start(state)
    }

    /// `port`: that pair only (a restart in place), else free pairs tried in turn.
    fn start_inner(state: &Path, command_log: Option<&Path>, fixed: Option<u16>) -> Result<Self> {
        fs::create_dir_all(state).map_err(io_context(format!("creating {}", state.display())))?;
        let stderr_log = state.join("swtpm.stderr.log");
        let mut lost = Vec::new();
        for attempt in 0..PORT_ATTEMPTS {
            let port = match fixed {
                Some(port) => port,
                None => free_port_pair(attempt)?,
            };
            let stderr = fs::File::create(&stderr_log)
                .map_err(io_context(format!("creating {}", stderr_log.display())))?;
            let mut command = keyshard_lab::swtpm::socket_command(state, port);
            command
                .args(command_log.map(|log| {
                    format!(
                        "--log=file={},level={COMMAND_LOG_LEVEL},truncate",
                        log.display()
                    )
                }))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
            let mut guard = match ChildGuard::spawn("swtpm", &mut command) {
                Err(HarnessError::Spawn { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    return Err(HarnessError::MissingTool {
                        tool: "swtpm",
                        package: "swtpm",
                    });
                }
                other => other?,
            };
            let deadline = Instant::now() + LISTEN_TIMEOUT;
            loop {
                if let Some(status) = guard.try_wait()? {
                    let stderr = fs::read_to_string(&stderr_log).unwrap_or_default();
                    if stderr.contains("Address already in use") {
                        lost.push(port);
                        if fixed.is_some() {
                            // The same pair, again: the old process's sockets are going away.
                            thread::sleep(Duration::from_millis(200));
                        }
                        break;
                    }
                    return Err(HarnessError::ExitedBeforeReady {
                        name: format!("swtpm on port {port}"),
                        prefix: "(listening)".to_owned(),
                        status: describe_status(&status),
                        stderr,
                    });
                }
                // The control port is bound after the server port: when it answers, both do.
                // It must be *this* swtpm that listens: another test's swtpm may hold the pair
                // (ours then exits with "Address already in use", seen above on the next turn).
                if TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
                    && listens_on(guard.pid(), port + 1)
                {
                    return Ok(Self {
                        guard,
                        port,
                        state: state.to_owned(),
                        command_log: command_log.map(Path::to_owned),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(HarnessError::NotReady {
                        name: format!("swtpm on ports {port}/{}", port + 1),
                        prefix: "(listening)".to_owned(),
                        seconds: LISTEN_TIMEOUT.as_secs(),
                        stderr: fs::read_to_string(&stderr_log).unwrap_or_default(),
                    });
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Err(HarnessError::Io {
            context: format!("starting swtpm: ports {lost:?} were all taken by other processes"),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        })
    }

    /// `swtpm:host=127.0.0.1,port=P`: for `keyshard init/coordinator --tcti` and
    /// `TPM2TOOLS_TCTI`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Stops swtpm with SIGTERM, so it saves its state, and SIGKILL if it has not ended after
    /// `grace`. [`Swtpm::start`] on the same state directory is then a reboot: seeds and
    /// persistent keys survive, PCRs are reset.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.guard.terminate(grace)
    }

    /// The size of the command log now: a mark for [`Self::commands_logged_since`]. Zero without
    /// a command log.
    pub fn command_log_len(&self) -> Result<u64> {
        let Some(log) = &self.command_log else {
            return Ok(0);
        };
        fs::metadata(log)
            .map(|m| m.len())
            .map_err(io_context(format!("reading {}", log.display())))
    }

    /// The command codes of every TPM command swtpm processed since the log was `mark` bytes
    /// long ([`Self::command_log_len`]), in order. An error if swtpm was started without a
    /// command log.
    pub fn commands_logged_since(&self, mark: u64) -> Result<Vec<TpmCommand>> {
        let Some(log) = &self.command_log else {
            return Err(HarnessError::Io {
                context: "swtpm was started without a command log (start_with_command_log)"
                    .to_owned(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        };
        let mut text = Vec::new();
        fs::File::open(log)
            .and_then(|mut file| {
                file.seek(SeekFrom::Start(mark))?;
                file.read_to_end(&mut text)
            })
            .map_err(io_context(format!("reading {}", log.display())))?;
        Ok(parse_command_log(&String::from_utf8_lossy(&text)))
    }

    /// The sha256 bank's value of `pcr`, lower-case hex (`tpm2_pcrread`).
    pub fn read_pcr(&self, pcr: u8) -> Result<String> {
        let output = self.tpm2_tool("tpm2_pcrread", &format!("sha256:{pcr}"))?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "  sha256:\n    7 : 0x3D45...\n"
        text.lines()
            .filter_map(|line| line.trim().split_once(':'))
            .find(|(index, _)| index.trim() == pcr.to_string())
            .and_then(|(_, value)| value.trim().strip_prefix("0x"))
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| HarnessError::ToolFailed {
                name: "tpm2_pcrread".to_owned(),
                status: "no value in its output".to_owned(),
                stderr: text.into_owned(),
            })
    }

    /// `tpm2_pcrextend PCR:sha256=DIGEST`: the host's measured state changes, as after booting
    /// another bootloader or with Secure Boot turned off (PCR 7).
    pub fn extend_pcr(&self, pcr: u8, digest: &[u8; 32]) -> Result<()> {
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.tpm2_tool("tpm2_pcrextend", &format!("{pcr}:sha256={hex}"))
            .map(drop)
    }

    /// Runs a tpm2-tools command against this TPM.
    fn tpm2_tool(&self, tool: &'static str, arg: &str) -> Result<Output> {
        let result = run_tool(
            tool,
            Command::new(tool)
                .arg(arg)
                .env("TPM2TOOLS_TCTI", self.tcti()),
        );
        match result {
            Err(HarnessError::Spawn { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(HarnessError::MissingTool {
                    tool,
                    package: "tpm2-tools",
                })
            }
            other => other,
        }
    }
}

pub use keyshard_lab::swtpm::ek_ca_certificates;

/// `keyshard_lab::swtpm::manufacture`, its errors as the harness's.
fn manufacture(state: &Path, ca: &Path) -> Result<()> {
    keyshard_lab::swtpm::manufacture(state, ca).map_err(from_lab)
}

/// A lab error as the harness's: a missing tool stays a missing tool.
fn from_lab(error: keyshard_lab::LabError) -> HarnessError {
    match error {
        keyshard_lab::LabError::MissingTool { tool, package } => {
            HarnessError::MissingTool { tool, package }
        }
        other => HarnessError::ToolFailed {
            name: "swtpm".to_owned(),
            status: "failed".to_owned(),
            stderr: other.to_string(),
        },
    }
}

/// One TPM command swtpm logged: its command code (TPM2_CC), when the log showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TpmCommand(pub Option<u32>);

impl TpmCommand {
    /// The command's name (TPM 2.0 Part 2, TPM_CC), for the commands keyshard and tpm2-tools
    /// send; `CC 0x...` for another.
    pub fn name(self) -> String {
        let Some(code) = self.0 else {
            return "(unreadable)".to_owned();
        };
        let name = match code {
            0x120 => "EvictControl",
            0x131 => "CreatePrimary",
            0x144 => "Startup",
            0x14e => "NV_Read",
            0x151 => "PolicySecret",
            0x153 => "Create",
            0x155 => "HMAC",
            0x157 => "Load",
            0x158 => "Quote",
            0x15d => "Sign",
            0x15e => "Unseal",
            0x161 => "ContextLoad",
            0x162 => "ContextSave",
            0x165 => "FlushContext",
            0x167 => "LoadExternal",
            0x16b => "PolicyAuthValue",
            0x16c => "PolicyCommandCode",
            0x171 => "PolicyOR",
            0x173 => "ReadPublic",
            0x176 => "StartAuthSession",
            0x177 => "VerifySignature",
            0x17a => "GetCapability",
            0x17b => "GetRandom",
            0x17d => "Hash",
            0x17e => "PCR_Read",
            0x17f => "PolicyPCR",
            0x180 => "PolicyRestart",
            0x181 => "ReadClock",
            0x182 => "PCR_Extend",
            0x189 => "PolicyGetDigest",
            0x18a => "TestParms",
            0x18c => "PolicyPassword",
            0x191 => "CreateLoaded",
            other => return format!("CC {other:#x}"),
        };
        name.to_owned()
    }
}

/// The commands in a swtpm log (level 2 and above). swtpm writes each command it reads on the
/// server port as a line ` SWTPM_IO_Read: length N` followed by its bytes in hex, 16 a line, and
/// each response as ` SWTPM_IO_Write: ...`; the control channel's traffic is `Ctrl Cmd`/`Ctrl Rsp`
/// and is not counted. A command's header is tag (2 bytes), size (4), command code (4), so the
/// code is in the first hex line.
pub fn parse_command_log(text: &str) -> Vec<TpmCommand> {
    let mut lines = text.lines();
    let mut commands = Vec::new();
    while let Some(line) = lines.next() {
        if !line.trim_start().starts_with("SWTPM_IO_Read:") {
            continue;
        }
        let header: Vec<u8> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map_while(|byte| u8::from_str_radix(byte, 16).ok())
            .collect();
        let code = header
            .get(6..10)
            .and_then(|code| <[u8; 4]>::try_from(code).ok())
            .map(u32::from_be_bytes);
        commands.push(TpmCommand(code));
    }
    commands
}

use keyshard_lab::swtpm::listens_on;

fn free_port_pair(attempt: u32) -> Result<u16> {
    keyshard_lab::swtpm::free_port_pair(attempt).map_err(|e| HarnessError::Io {
        context: e.to_string(),
        source: io::Error::from(io::ErrorKind::AddrInUse),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        let pid = libc::pid_t::try_from(pid).unwrap();
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    #[test]
    fn a_pcr_extend_changes_the_pcr_and_the_tpm_dies_with_its_guard() {
        let dir = tempfile::tempdir().unwrap();
        let swtpm = Swtpm::start(&dir.path().join("tpm")).unwrap();
        assert!(
            swtpm.tcti().ends_with(&format!(",port={}", swtpm.port())),
            "{}",
            swtpm.tcti()
        );
        let before = swtpm.read_pcr(7).unwrap();
        assert_eq!(before, "0".repeat(64), "a fresh TPM starts with PCR 7 zero");
        swtpm.extend_pcr(7, &[0x5a; 32]).unwrap();
        let after = swtpm.read_pcr(7).unwrap();
        assert_eq!(after.len(), 64);
        assert_ne!(after, before);
        assert_eq!(swtpm.read_pcr(0).unwrap(), before, "only PCR 7 moved");

        let pid = swtpm.pid();
        drop(swtpm);
        assert!(!alive(pid), "swtpm outlived its guard");
    }

    #[test]
    fn the_command_log_counts_each_command_swtpm_processed() {
        let dir = tempfile::tempdir().unwrap();
        let swtpm =
            Swtpm::start_with_command_log(&dir.path().join("tpm"), &dir.path().join("cmd.log"))
                .unwrap();
        swtpm.read_pcr(7).unwrap();
        let mark = swtpm.command_log_len().unwrap();
        assert!(mark > 0, "swtpm logged nothing");
        swtpm.read_pcr(7).unwrap();
        swtpm.read_pcr(0).unwrap();
        let commands = swtpm.commands_logged_since(mark).unwrap();
        let reads = commands.iter().filter(|c| c.name() == "PCR_Read").count();
        assert_eq!(reads, 2, "{commands:?}");
        assert!(commands.iter().all(|c| c.0.is_some()), "{commands:?}");
        let all = swtpm.commands_logged_since(0).unwrap();
        assert_eq!(all.iter().filter(|c| c.name() == "PCR_Read").count(), 3);

        let unlogged = Swtpm::start(&dir.path().join("tpm2")).unwrap();
        assert_eq!(unlogged.command_log_len().unwrap(), 0);
        assert!(unlogged.commands_logged_since(0).is_err());
    }

    #[test]
    fn a_command_log_names_commands_by_their_code() {
        let log = " Ctrl Cmd: length 5\n 00 00 00 05 00 \n SWTPM_IO_Read: length 22\n \
                   80 01 00 00 00 16 00 00 01 7A 00 00 00 06 00 00 \n 01 05 00 00 00 04 \n \
                   SWTPM_IO_Write: length 19\n 80 01 00 00 00 13 00 00 00 00 00 00 00 00 01 00 \n \
                   SWTPM_IO_Read: length 3\n 80 01 00\n SWTPM_IO_Read: length 10\n \
                   80 01 00 00 00 0A 00 00 01 58\n";
        let names: Vec<String> = parse_command_log(log)
            .into_iter()
            .map(TpmCommand::name)
            .collect();
        assert_eq!(names, ["GetCapability", "(unreadable)", "Quote"]);
    }

    #[test]
    fn a_manufactured_tpm_has_ek_certificates_from_the_local_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let swtpm = Swtpm::start_with_ek_certificates(&dir.path().join("tpm"), &ca).unwrap();
        for cert in ek_ca_certificates(&ca) {
            let pem = fs::read_to_string(&cert).unwrap();
            assert!(
                pem.starts_with("-----BEGIN CERTIFICATE-----"),
                "{}",
                cert.display()
            );
        }
        // The RSA EK certificate's NV index is defined, and the TPM still has every bank.
        let output = swtpm.tpm2_tool("tpm2_getcap", "handles-nv-index").unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("0x1C00002"), "{text}");
        assert_eq!(swtpm.read_pcr(7).unwrap(), "0".repeat(64));
        // A second TPM of the same CA: the CA is reused, not re-created.
        let root = fs::read(&ek_ca_certificates(&ca)[0]).unwrap();
        let _second = Swtpm::start_with_ek_certificates(&dir.path().join("tpm2"), &ca).unwrap();
        assert_eq!(fs::read(&ek_ca_certificates(&ca)[0]).unwrap(), root);
    }
}
